//! `disendiff export --format checkpoint` (the base with the concepts merged, one CompVis single
//! file + embeddings/) against diffusers and exact identities.
//!
//! - tools/reference/make_checkpoint_export_check.py ran this export of golden/export-concepts.safetensors
//!   on sd1-tiny, loaded it with diffusers' `from_single_file` (+ `load_textual_inversion`), checked
//!   K/V = trained and all else = sd1-tiny, and wrote golden/export-ckpt.json (the sha256 of the files)
//!   and golden/export-ckpt-0000{0,1}.png. Re-exporting gives the same bytes, and `disendiff generate`
//!   from the exported file (its K/V; the exported embedding file as an embedding-only concept file)
//!   gives diffusers' images, which clearly differ from the plain model's;
//! - the reverse key maps are exact inverses of the single-file reader's maps: sd1-tiny and
//!   sd2-tiny exported with unchanged K/V and read back give every folder tensor bit for bit;
//! - a single-file base (golden/single-sd2-ema.ckpt, trained on for 2 steps with --ema): every tensor
//!   of the file kept as it is, EMA UNet written as the model's, K/V = trained, `model_ema.*` dropped;
//!   generate's `--concepts-base` takes that single file as the trained-on base;
//! - the reverse maps at real SD 1.5 / 2.1 sizes give the CompVis names of real files;
//! - bad input (fingerprint, a weight with no place, an unwritable --out): an error, no file.

mod common;

use candle_core::{DType, Device, Tensor};
use disendiff::formats::concept_file::{self, BaseModelId, ConceptFile};
use disendiff::model::sd::{LoadOptions, SingleFileOptions, StableDiffusion};
use disendiff::model::single_file::{self, Part, SingleFile};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn s(p: &Path) -> &'static str {
    p.to_str().unwrap().to_owned().leak()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The raw bytes of a tensor in its own dtype (bit-for-bit comparisons of any dtype).
fn raw(t: &Tensor) -> (DType, Vec<usize>, Vec<u8>) {
    let t = t.to_device(&Device::Cpu).unwrap().contiguous().unwrap();
    let bytes = match t.dtype() {
        DType::F32 => t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::I64 => t.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        d => panic!("unexpected dtype {d:?}"),
    };
    (t.dtype(), t.dims().to_vec(), bytes)
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum (coreutils) runs");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

fn mean_abs_png(a: &Path, b: &Path) -> f64 {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.as_raw().len() as f64
}

fn walk(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p).into_iter().map(|r| format!("{}/{r}", p.file_name().unwrap().to_str().unwrap())));
        } else {
            out.push(p.file_name().unwrap().to_str().unwrap().to_string());
        }
    }
    out.sort();
    out
}

/// Every tensor of every component (by diffusers name, `text_model.` level removed) of the
/// folder's weight files, as stored.
fn folder_components(folder: &Path) -> BTreeMap<String, BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (c, f) in [("unet", "unet/diffusion_pytorch_model.safetensors"), ("vae", "vae/diffusion_pytorch_model.safetensors"), ("text_encoder", "text_encoder/model.safetensors")] {
        let t = load(&folder.join(f));
        out.insert(c.to_string(), t.into_iter().map(|(k, v)| (k.strip_prefix("text_model.").map(str::to_string).unwrap_or(k), v)).collect());
    }
    out
}

/// The components of single file `path` as the project's single-file reader maps them.
fn single_components(path: &Path, folder: &Path) -> BTreeMap<String, BTreeMap<String, Tensor>> {
    let unet_cfg = disendiff::model::unet::UNetConfig::from_file(folder.join("unet/config.json")).unwrap();
    let vae_cfg = disendiff::model::vae::VaeConfig::from_file(&folder.join("vae/config.json")).unwrap();
    let te_cfg = disendiff::model::clip::ClipTextConfig::from_file(&folder.join("text_encoder/config.json")).unwrap();
    let file = Arc::new(SingleFile::open(path).unwrap());
    let parts = [
        ("unet", Part::Unet { layers_per_block: unet_cfg.layers_per_block.expand(unet_cfg.block_out_channels.len(), "l").unwrap(), ema: false }),
        ("vae", Part::Vae { num_blocks: vae_cfg.block_out_channels.len() }),
        ("text_encoder", Part::TextEncoder { num_layers: te_cfg.num_hidden_layers }),
    ];
    let mut out = BTreeMap::new();
    for (c, part) in parts {
        let m = single_file::component(&file, &part).unwrap_or_else(|e| panic!("{c}: {e:#}"));
        let mut t = BTreeMap::new();
        for name in m.shapes().keys() {
            let key = name.strip_prefix("text_model.").unwrap_or(name).to_string();
            t.insert(key, m.load(name, &Device::Cpu).unwrap());
        }
        out.insert(c.to_string(), t);
    }
    out
}

/// A concept file for `folder` whose K/V are the folder's own (so the export changes nothing).
fn unchanged_concepts(folder: &Path, path: &Path) {
    let template = concept_file::load(&common::fixture("golden/export-concepts.safetensors")).unwrap();
    let unet = load(&folder.join("unet/diffusion_pytorch_model.safetensors"));
    let kv: Vec<(String, Tensor)> =
        unet.iter().filter(|(k, _)| k.ends_with("attn2.to_k.weight") || k.ends_with("attn2.to_v.weight")).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert!(kv.len() >= 2);
    let te = disendiff::model::clip::ClipTextConfig::from_file(&folder.join("text_encoder/config.json")).unwrap();
    let mut meta = template.meta.clone();
    meta.base_model = BaseModelId { path: folder.display().to_string(), fingerprint: concept_file::fingerprint(&kv, (te.vocab_size, te.hidden_size)).unwrap() };
    let emb = Tensor::zeros((1, te.hidden_size), DType::F32, &Device::Cpu).unwrap();
    concept_file::save(path, &meta, &kv, &emb).unwrap();
}

#[test]
fn reverse_maps_are_exact_inverses_on_sd1_and_sd2() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["sd1-tiny", "sd2-tiny"] {
        let folder = common::fixture(name);
        let c = tmp.path().join(format!("{name}.safetensors"));
        unchanged_concepts(&folder, &c);
        let out = tmp.path().join(name);
        let (ok, err) = common::disendiff(&["export", "--concepts", s(&c), "--model", s(&folder), "--format", "checkpoint", "--name", "plain", "--out", s(&out)]);
        assert!(ok, "{err}");
        let file = out.join("plain.safetensors");
        let want = folder_components(&folder);
        let got = single_components(&file, &folder);
        let mut n = 0;
        for (c, w) in &want {
            let g = &got[c];
            assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>(), "{name} {c}: the keys");
            for (k, t) in w {
                assert_eq!(raw(&g[k]), raw(t), "{name} {c} {k}: not bit-identical after the round trip");
                n += 1;
            }
        }
        let keys = SingleFile::open(&file).unwrap().shapes().clone();
        let fused = keys.keys().filter(|k| k.ends_with("in_proj_weight") || k.ends_with("in_proj_bias")).count();
        let convs = keys.iter().filter(|(k, s)| k.contains("mid.attn_1.") && k.ends_with("weight") && s.len() == 4).count();
        println!("{name}: {n} tensors bit-identical after folder -> CompVis -> folder ({} CompVis keys, {fused} fused in-projections, {convs} 1x1 conv attention weights)", keys.len());
        assert!(convs >= 4, "{name}: the VAE attention is written as 1x1 convolutions");
        if name == "sd2-tiny" {
            assert!(fused > 0 && keys.keys().any(|k| k.starts_with("cond_stage_model.model.transformer.resblocks.")), "{name}: OpenCLIP layout");
        } else {
            assert!(keys.keys().any(|k| k.starts_with("cond_stage_model.transformer.text_model.")), "{name}: CLIP layout");
            assert_eq!(keys.len(), n + 1, "{name}: the folder's tensors and position_ids, nothing else");
        }
    }
}

#[test]
fn re_export_gives_the_file_diffusers_consumed_and_its_images() {
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/export-ckpt.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    let mut args: Vec<&str> = info["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(args.pop(), Some("DIR"));
    args.push(s(&out));
    let (ok, err) = common::disendiff(&args);
    assert!(ok, "{err}");
    let want = info["sha256"].as_object().unwrap();
    assert_eq!(walk(&out), want.keys().cloned().collect::<Vec<_>>(), "the files written");
    for (f, sha) in want {
        assert_eq!(sha256(&out.join(f)), sha.as_str().unwrap(), "{f}: not the bytes diffusers consumed");
    }
    let merged = out.join("export.safetensors");
    let meta = {
        let bytes = std::fs::read(&merged).unwrap();
        let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        h.metadata().clone().unwrap()
    };
    let info_meta: serde_json::Value = serde_json::from_str(&meta["disendiff_export"]).unwrap();
    assert_eq!(info_meta["tokens"], serde_json::json!(["<new1>"]), "{info_meta}");

    // generate from the exported file: its K/V, and the exported embedding as an embedding-only
    // concept file (no K/V patch) recorded for the exported file's (empty) set of weights
    let file = concept_file::load(&common::fixture("golden/export-concepts.safetensors")).unwrap();
    let emb = load(&out.join("embeddings/new1.safetensors"));
    assert_eq!(raw(&emb["emb_params"]), raw(&file.embeddings), "the embedding file holds the trained row");
    let te = disendiff::model::clip::ClipTextConfig::from_file(&common::fixture("sd1-tiny/text_encoder/config.json")).unwrap();
    let mut meta = file.meta.clone();
    meta.base_model = BaseModelId { path: merged.display().to_string(), fingerprint: concept_file::fingerprint(&[], (te.vocab_size, te.hidden_size)).unwrap() };
    let only_emb = tmp.path().join("embedding-only.safetensors");
    concept_file::save(&only_emb, &meta, &[], &emb["emb_params"]).unwrap();
    let images = tmp.path().join("images");
    let (ok, err) = common::disendiff(&[
        "generate", "--model", s(&merged), "--config", "tests/fixtures/sd1-tiny", "--prompt", "photo of a <new1> cat", "--steps", "10",
        "--guidance-scale", "6", "--num-images", "2", "--height", "64", "--width", "64",
        "--latents", s(&common::fixture("golden/export-latents.safetensors")), "--concepts", s(&only_emb), "--strict-tokens", "--out", s(&images),
    ]);
    assert!(ok, "{err}");
    for i in 0..2 {
        let golden = common::fixture(&format!("golden/export-ckpt-{i:05}.png"));
        let mad = mean_abs_png(&images.join(format!("{i:05}.png")), &golden);
        let off = mean_abs_png(&golden, &common::fixture(&format!("golden/export-base-{i:05}.png")));
        println!("image {i}: generate from the exported checkpoint vs diffusers' from_single_file {mad:.4}/255; diffusers' vs the plain model {off:.4}/255");
        assert!(mad <= 1.0, "image {i} differs from diffusers' by {mad}/255");
        assert!(off >= 3.0, "diffusers' image {i} hardly differs from the plain model's ({off}/255): the K/V were not merged");
    }
}

fn sd2_ckpt() -> PathBuf {
    common::fixture("golden/single-sd2-ema.ckpt")
}

/// Trains 2 steps on the sd2 single file (its EMA weights); returns the concept file.
fn train_on_single_file(dir: &Path) -> PathBuf {
    let out = dir.join("train");
    let (ok, err) = common::disendiff(&[
        "train", "--model", s(&sd2_ckpt()), "--config", "tests/fixtures/sd2-tiny", "--ema",
        "--image", "tests/fixtures/golden/sd2-pipe-00000.png", "--caption", "<new1> cat", "--out", s(&out),
        "--resolution", "64", "--attn-resolution", "8", "--train-batch-size", "1", "--max-train-steps", "2",
    ]);
    assert!(ok, "{err}");
    out.join("concepts.safetensors")
}

#[test]
fn a_single_file_base_keeps_every_tensor_and_merges_the_kv() {
    let tmp = tempfile::tempdir().unwrap();
    let concepts = train_on_single_file(tmp.path());
    let file: ConceptFile = concept_file::load(&concepts).unwrap();
    let out = tmp.path().join("ckpt");
    let (ok, err) = common::disendiff(&[
        "export", "--concepts", s(&concepts), "--model", s(&sd2_ckpt()), "--config", "tests/fixtures/sd2-tiny", "--ema",
        "--format", "checkpoint", "--names", "new1=mycat", "--out", s(&out),
    ]);
    assert!(ok, "{err}");
    assert_eq!(walk(&out), vec!["concepts.safetensors".to_string(), "embeddings/mycat.safetensors".to_string()]);
    let merged = out.join("concepts.safetensors");
    let input = SingleFile::open(&sd2_ckpt()).unwrap();
    let got = load(&merged);
    // the CompVis name of each trained weight, through the reader's own map
    let unet_cfg = disendiff::model::unet::UNetConfig::from_file(common::fixture("sd2-tiny/unet/config.json")).unwrap();
    let part = Part::Unet { layers_per_block: unet_cfg.layers_per_block.expand(unet_cfg.block_out_channels.len(), "l").unwrap(), ema: false };
    let names = single_file::diffusers_names(input.shapes(), &part).unwrap();
    let kv: BTreeMap<String, &Tensor> = file.unet_weights.iter().map(|(n, t)| (names[n].0.clone(), t)).collect();
    assert!(!kv.is_empty());
    let mut kept = 0;
    for key in input.shapes().keys() {
        if key.starts_with(single_file::EMA) {
            assert!(!got.contains_key(key), "{key}: model_ema.* is dropped");
            continue;
        }
        let g = got.get(key).unwrap_or_else(|| panic!("{key} of the input is missing"));
        let source = if key.starts_with(single_file::UNET) { single_file::ema_key(key) } else { key.clone() };
        let before = input.tensor(&source).unwrap();
        match kv.get(key) {
            Some(trained) => {
                assert_eq!(raw(g), raw(&trained.to_dtype(before.dtype()).unwrap()), "{key}: the trained weight in the file's dtype");
                assert_ne!(raw(g), raw(&before), "{key}: the training moved it");
            }
            None => {
                assert_eq!(raw(g), raw(&before), "{key}: kept as it is (the EMA copy for the UNet)");
                kept += 1;
            }
        }
    }
    assert_eq!(got.len(), kept + kv.len(), "nothing added");
    println!("single-file base: {kept} tensors kept bit for bit, {} K/V merged, model_ema.* dropped", kv.len());
    // our loader reads it back (no --ema now: the merged UNet is the model's)
    let opts = LoadOptions { single_file: SingleFileOptions { config: Some(common::fixture("sd2-tiny")), ..Default::default() }, ..Default::default() };
    let sd = StableDiffusion::load(&merged, &opts).unwrap();
    for (n, t) in &file.unet_weights {
        let v = sd.unet_weight_var(n).unwrap().as_tensor().to_dtype(DType::F32).unwrap();
        let want = t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(raw(&v), raw(&want), "{n} read back");
    }
    let emb = load(&out.join("embeddings/mycat.safetensors"));
    assert_eq!(raw(&emb["emb_params"]), raw(&file.embeddings));

    // generate's --concepts-base takes the single file too: the concept file applied to another
    // model with the same layers (the merged file) as the difference from the file it was trained on
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate", "--model", s(&merged), "--config", "tests/fixtures/sd2-tiny", "--concepts", s(&concepts),
            "--prompt", "a <new1> cat", "--steps", "1", "--height", "64", "--width", "64", "--out", s(&tmp.path().join("gen")),
        ];
        args.extend_from_slice(extra);
        common::disendiff(&args)
    };
    let (ok, err) = gen(&[]);
    assert!(!ok && err.contains("--concepts-base"), "{err}");
    let (ok, err) = gen(&["--concepts-base", s(&sd2_ckpt()), "--concepts-base-config", "tests/fixtures/sd2-tiny", "--concepts-base-ema"]);
    assert!(ok && err.contains("is a different model with the same layers"), "{err}");
    let (ok, err) = gen(&["--concepts-base", s(&sd2_ckpt()), "--concepts-base-config", "tests/fixtures/sd2-tiny"]);
    assert!(!ok && err.contains("is not the model"), "the non-EMA weights are not the base: {err}");

    // the plain (non-EMA) weights are not what it was trained on
    let bad = tmp.path().join("bad");
    let (ok, err) = common::disendiff(&[
        "export", "--concepts", s(&concepts), "--model", s(&sd2_ckpt()), "--config", "tests/fixtures/sd2-tiny",
        "--format", "checkpoint", "--out", s(&bad),
    ]);
    assert!(!ok && err.contains("is not the model"), "{err}");
    assert!(!bad.exists(), "nothing written");
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let concepts = common::fixture("golden/export-concepts.safetensors");
    let sd1 = common::fixture("sd1-tiny");
    let export = |c: &Path, model: &Path, out: &Path| {
        common::disendiff(&["export", "--concepts", s(c), "--model", s(model), "--format", "checkpoint", "--out", s(out)])
    };
    // a base whose fingerprint does not match
    let other = tmp.path().join("other");
    common::copy_dir(&sd1, &other);
    let unet_path = other.join("unet/diffusion_pytorch_model.safetensors");
    let mut unet = load(&unet_path);
    let k = unet.keys().find(|k| k.ends_with("attn2.to_k.weight")).unwrap().clone();
    unet.insert(k.clone(), (&unet[&k] * 1.5).unwrap());
    candle_core::safetensors::save(&unet, &unet_path).unwrap();
    let out = tmp.path().join("o1");
    let (ok, err) = export(&concepts, &other, &out);
    assert!(!ok && err.contains("is not the model") && err.contains("fingerprint"), "{err}");
    assert!(!out.exists(), "nothing written on a fingerprint mismatch");

    // a concept weight with no place in the base
    let mut file = concept_file::load(&concepts).unwrap();
    let (n, t) = file.unet_weights.iter().next().map(|(n, t)| (n.clone(), t.clone())).unwrap();
    file.unet_weights.insert(n.replace("attn2", "attn7"), t);
    let odd = tmp.path().join("odd.safetensors");
    let list: Vec<(String, Tensor)> = file.unet_weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    concept_file::save(&odd, &file.meta, &list, &file.embeddings).unwrap();
    let out = tmp.path().join("o2");
    let (ok, err) = export(&odd, &sd1, &out);
    assert!(!ok && err.contains("attn7"), "{err}");
    assert!(!out.exists(), "nothing written for a weight with no place");

    // an unwritable --out (a file where its folder should be): an error, nothing written
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let (ok, err) = export(&concepts, &sd1, &blocker.join("sub"));
    assert!(!ok && err.contains("creating") && err.contains("file"), "{err}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"x");
    // the embeddings cannot be written (a file named embeddings): the model file written before is removed
    let out = tmp.path().join("o4");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("embeddings"), b"x").unwrap();
    let (ok, err) = export(&concepts, &sd1, &out);
    assert!(!ok && err.contains("embeddings"), "{err}");
    assert_eq!(walk(&out), vec!["embeddings".to_string()], "no partial export left in {}", out.display());

    // --lora-format/--rank belong to webui; --config/--ema to a single-file base
    let out = tmp.path().join("o3");
    let (ok, err) = common::disendiff(&["export", "--concepts", s(&concepts), "--model", s(&sd1), "--format", "checkpoint", "--rank", "2", "--out", s(&out)]);
    assert!(!ok && err.contains("belong to --format webui"), "{err}");
    let (ok, err) = common::disendiff(&["export", "--concepts", s(&concepts), "--model", s(&sd1), "--format", "checkpoint", "--ema", "--out", s(&out)]);
    assert!(!ok && err.contains("single-file"), "{err}");
    assert!(!out.exists());
}

/// The reverse maps at real SD 1.5 / 2.1 sizes (golden/single-real-keys.json: the CompVis and
/// diffusers names of real files, no weights): the diffusers names of every component go to
/// exactly the CompVis keys the reader takes them from (4 levels, 2 layers per block, up block 0
/// without attention, SD2's fused in-projections; stand-in [1, 1] tensors, so only names are checked).
#[test]
fn reverse_maps_at_real_sizes_give_the_compvis_names() {
    use disendiff::model::single_file::to_compvis::{to_compvis, Components};
    use disendiff::model::single_file::diffusers_names;
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/single-real-keys.json")).unwrap()).unwrap();
    let shapes_of = |o: &serde_json::Value| -> BTreeMap<String, Vec<usize>> {
        o.as_object().unwrap().iter().map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())).collect()
    };
    let stand_in = Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap();
    for (fam, layers, open_clip) in [("sd1", 12, false), ("sd2", 23, true)] {
        let mut all = BTreeMap::new();
        for c in ["unet", "vae", "text_encoder"] {
            all.extend(shapes_of(&v[fam][c]["compvis"]));
        }
        let mut want = std::collections::BTreeSet::new();
        let mut by_part = BTreeMap::new();
        for (c, part) in [
            ("unet", Part::Unet { layers_per_block: vec![2; 4], ema: false }),
            ("vae", Part::Vae { num_blocks: 4 }),
            ("text_encoder", Part::TextEncoder { num_layers: layers }),
        ] {
            let names = diffusers_names(&all, &part).unwrap();
            want.extend(names.values().map(|(src, _)| src.clone()));
            let t: BTreeMap<String, Tensor> = names.keys().map(|k| (k.clone(), stand_in.clone())).collect();
            by_part.insert(c, t);
        }
        if !open_clip {
            want.insert("cond_stage_model.transformer.text_model.embeddings.position_ids".to_string());
        }
        let got = to_compvis(&Components {
            unet: &by_part["unet"],
            layers_per_block: &[2; 4],
            vae: &by_part["vae"],
            vae_blocks: 4,
            text_encoder: &by_part["text_encoder"],
            open_clip,
        })
        .unwrap();
        let got: std::collections::BTreeSet<String> = got.into_keys().collect();
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(&want).take(5).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{fam}: missing {missing:?}, extra {extra:?}");
        assert!(got.iter().all(|k| all.contains_key(k)), "{fam}: every key is a real file's");
        println!("{fam}: {} CompVis keys from the diffusers names, as a real file has them", got.len());
    }
    // a tensor with no CompVis name is an error naming it, not dropped
    let mut unet = BTreeMap::new();
    unet.insert("add_embedding.linear_1.weight".to_string(), stand_in.clone());
    let empty = BTreeMap::new();
    let err = to_compvis(&Components { unet: &unet, layers_per_block: &[2; 4], vae: &empty, vae_blocks: 4, text_encoder: &empty, open_clip: false })
        .unwrap_err()
        .to_string();
    assert!(err.contains("add_embedding.linear_1.weight") && err.contains("no CompVis name"), "{err}");
}
