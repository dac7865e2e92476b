//! Reading the official DisenDiff / Custom Diffusion `delta.ckpt` against the concept file it was
//! made from.
//!
//! tools/reference/make_delta_ckpt_fixture.py wrote golden/delta-ckpt/ with `torch.save`: the
//! trained concept file golden/export-concepts.safetensors with its K/V weights renamed to
//! CompVis names by the pairs diffusers' own single-file converter produced
//! (golden/single-names.json) and its embedding row as `embed` (next to the state dict, and in a
//! second file inside it), plus files that must be refused.
//! - read for sd1-tiny's layout, both files give the concept file's weights and row bit for bit;
//! - `generate --concepts delta.ckpt` on the same latents gives the PNGs of `generate --concepts`
//!   with the concept file (within 1/255) and clearly differs from diffusers' plain-model image;
//! - an unknown key, a wrong shape, a pickle calling os.system, a wrong number of
//!   --modifier-tokens are refused with errors that name the reason.

mod common;

use candle_core::{DType, Tensor};
use disendiff::formats::{concept_file, delta_ckpt};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    common::fixture(&format!("golden/delta-ckpt/{name}"))
}

fn s(p: &Path) -> &'static str {
    p.to_str().unwrap().to_owned().leak()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// sd1-tiny's UNet: two layers in each of its down blocks.
const SD1_TINY_LAYERS: [usize; 3] = [2, 2, 2];

#[test]
fn both_layouts_read_as_the_concept_file_they_were_made_from() {
    let want = concept_file::load(&common::fixture("golden/export-concepts.safetensors")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("sd1-tiny/unet/config.json")).unwrap()).unwrap();
    let n_blocks = cfg["block_out_channels"].as_array().unwrap().len();
    assert_eq!(cfg["layers_per_block"].as_u64(), Some(2));
    assert_eq!(n_blocks, SD1_TINY_LAYERS.len());
    for name in ["delta.ckpt", "delta-inner.ckpt"] {
        let (got, note) = delta_ckpt::load(&fixture(name), &SD1_TINY_LAYERS, None).unwrap();
        assert!(note.unwrap().contains("<new1>"));
        assert_eq!(got.unet_weights.keys().collect::<Vec<_>>(), want.unet_weights.keys().collect::<Vec<_>>(), "{name}");
        for (k, w) in &want.unet_weights {
            assert_eq!(bits(&got.unet_weights[k]), bits(w), "{name}: {k}");
        }
        assert_eq!(got.embeddings.dims(), want.embeddings.dims());
        assert_eq!(bits(&got.embeddings), bits(&want.embeddings), "{name}: embed");
        assert_eq!(got.meta.concept.iter().map(|c| c.modifier.as_str()).collect::<Vec<_>>(), ["<new1>"]);
        assert!(got.meta.base_model.fingerprint.is_empty());
    }
    // named tokens; a count that is not the rows' is refused
    let (got, note) = delta_ckpt::load(&fixture("delta.ckpt"), &SD1_TINY_LAYERS, Some(&["<cat>".to_string()])).unwrap();
    assert!(note.is_none());
    assert_eq!(got.meta.concept[0].modifier, "<cat>");
    let two = ["<a>".to_string(), "<b>".to_string()];
    let err = format!("{:#}", delta_ckpt::load(&fixture("delta.ckpt"), &SD1_TINY_LAYERS, Some(&two)).err().expect("2 tokens for 1 row"));
    assert!(err.contains("2 token(s)") && err.contains("1 rows"), "{err}");
    // a layout with one layer per block has no attention at input_blocks.4 (its downsampler)
    let err = format!("{:#}", delta_ckpt::load(&fixture("delta.ckpt"), &[1, 1, 1], None).err().expect("the wrong layout"));
    assert!(err.contains("no place in the configured UNet"), "{err}");
    assert_eq!(delta_ckpt::parse_modifier_tokens("<new1>+<new2>").unwrap(), ["<new1>", "<new2>"]);
    assert!(delta_ckpt::parse_modifier_tokens("<new1>++<new2>").is_err());
}

fn mean_abs_png(a: &Path, b: &Path) -> f64 {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.as_raw().len() as f64
}

fn max_abs_png(a: &Path, b: &Path) -> u8 {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

/// `disendiff generate` on export_roundtrip's latents with `--concepts C` and `extra` flags.
fn generate(out: &Path, concepts: &Path, extra: &[&str]) -> (bool, String) {
    let latents = common::fixture("golden/export-latents.safetensors");
    let mut args = vec![
        "generate", "--model", s(&common::fixture("sd1-tiny")), "--prompt", "photo of a <new1> cat", "--steps", "10",
        "--guidance-scale", "6", "--num-images", "2", "--height", "64", "--width", "64", "--latents", s(&latents),
        "--concepts", s(concepts), "--strict-tokens", "--out", s(out),
    ];
    args.extend_from_slice(extra);
    common::disendiff(&args)
}

#[test]
fn generate_with_the_delta_ckpt_gives_the_concept_files_images() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = generate(&tmp.path().join("ckpt"), &fixture("delta.ckpt"), &[]);
    assert!(ok, "{err}");
    assert!(err.contains("does not name its modifier tokens"), "{err}");
    assert!(err.contains("does not record the model it was trained on"), "{err}");
    let (ok, err) = generate(&tmp.path().join("file"), &common::fixture("golden/export-concepts.safetensors"), &[]);
    assert!(ok, "{err}");
    for i in 0..2 {
        let png = format!("{i:05}.png");
        let (got, want) = (tmp.path().join("ckpt").join(&png), tmp.path().join("file").join(&png));
        let worst = max_abs_png(&got, &want);
        println!("image {i}: delta.ckpt vs the concept file: max abs diff {worst} (of 255)");
        assert!(worst <= 1, "image {i}: delta.ckpt gives a different image ({worst}/255)");
        let off = mean_abs_png(&got, &common::fixture(&format!("golden/export-base-{i:05}.png")));
        println!("image {i}: delta.ckpt vs the plain model (diffusers): mean abs diff {off:.4}");
        assert!(off >= 3.0, "image {i} hardly differs from the plain model's ({off}/255): the delta.ckpt was not applied");
    }
    // --modifier-tokens names the row; the prompt's <new1> is then no concept's
    let (ok, err) = generate(&tmp.path().join("named"), &fixture("delta.ckpt"), &["--modifier-tokens", "<cat1>"]);
    assert!(!ok && err.contains("<new1>"), "{err}");
}

#[test]
fn bad_delta_ckpts_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown-key.ckpt", "attn2.to_z.weight"),
        ("wrong-shape.ckpt", "has shape [17, 32]"),
        ("os-system.ckpt", "system, which is not a tensor"),
    ];
    for (name, want) in cases {
        let (ok, err) = generate(&tmp.path().join(name), &fixture(name), &[]);
        assert!(!ok, "{name} was accepted");
        assert!(err.contains(want), "{name}: {err}");
        assert!(!tmp.path().join(name).join("00000.png").exists());
    }
    // --modifier-tokens with something that is not a delta.ckpt
    let (ok, err) = generate(&tmp.path().join("x"), &common::fixture("golden/export-concepts.safetensors"), &["--modifier-tokens", "<a>"]);
    assert!(!ok && err.contains("--modifier-tokens belongs to a delta.ckpt"), "{err}");
}

#[test]
fn export_of_the_delta_ckpt_gives_the_concept_files_diffusers_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cd");
    let (ok, err) = common::disendiff(&[
        "export", "--concepts", s(&fixture("delta.ckpt")), "--model", s(&common::fixture("sd1-tiny")), "--format", "diffusers",
        "--out", s(&out),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("does not name its modifier tokens"), "{err}");
    let want_dir = common::fixture("golden/export-diffusers");
    for name in ["pytorch_custom_diffusion_weights.safetensors", "new1.safetensors"] {
        let got = candle_core::safetensors::load(out.join(name), &candle_core::Device::Cpu).unwrap();
        let want = candle_core::safetensors::load(want_dir.join(name), &candle_core::Device::Cpu).unwrap();
        let mut keys: Vec<_> = got.keys().collect();
        keys.sort();
        let mut want_keys: Vec<_> = want.keys().collect();
        want_keys.sort();
        assert_eq!(keys, want_keys, "{name}");
        for (k, w) in &want {
            assert_eq!(got[k].dims(), w.dims(), "{name}: {k}");
            if w.elem_count() > 0 {
                assert_eq!(bits(&got[k]), bits(w), "{name}: {k}");
            }
        }
    }
    let (ok, err) = common::disendiff(&["export", "--concepts", s(&fixture("delta.ckpt")), "--format", "diffusers", "--out", s(&out)]);
    assert!(!ok && err.contains("pass it with --model"), "{err}");
}
