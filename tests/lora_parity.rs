//! LoRA files (`--lora FILE[:SCALE]`, `disendiff::patch::LoraPatch`) against diffusers and exact
//! identities.
//!
//! - `disendiff generate --lora FILE:0.7` with the kohya and the PEFT file of
//!   tools/reference/make_lora_fixtures.py gives diffusers' PNGs after `load_lora_weights` +
//!   `fuse_lora(lora_scale=0.7)` within 1/255, and clearly not the image without the LoRA;
//! - every merged weight is base + SCALE x alpha/rank x up @ down, computed here from the
//!   file's tensors; taking the LoRA off restores the base bit for bit;
//! - mixed alphas, a missing alpha, LoCon 3x3 entries, `.diff` and `.diff_b` (which the
//!   diffusers goldens cannot cover: diffusers applies one alpha per file and refuses `.diff`),
//!   keys that match nothing (an error listing them, unless allowed), and a concept file on a
//!   LoRA'd model (K/V = LoRA'd base + (trained - trained-on base));
//! - a kohya file in the original LDM names (`lora_unet_input_blocks_1_1_...`), renamed here
//!   with A1111's `convert_diffusers_name_to_compvis` formulas, patches exactly the same weights
//!   to exactly the same values as the diffusers-named file.

mod common;

use candle_core::{DType, Device, Tensor};
use disendiff::formats::concept_file::{self, BaseModelId, Concept, ConceptMeta};
use disendiff::model::sd::{LoadOptions, StableDiffusion};
use disendiff::patch::{LoraSpec, PatchedModel, TrainedBase};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SCALE: f64 = 0.7;
const K0: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";

fn sd1() -> PathBuf {
    common::fixture("sd1-tiny")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    f32(t).flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (f32(a) - f32(b)).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The base weights of sd1-tiny, by the patch layer's names (`text_encoder.` for the text encoder).
fn base_weights() -> HashMap<String, Tensor> {
    let mut w: HashMap<String, Tensor> = load(&sd1().join("unet/diffusion_pytorch_model.safetensors"));
    for (n, t) in load(&sd1().join("text_encoder/model.safetensors")) {
        w.insert(format!("text_encoder.{n}"), t);
    }
    w
}

fn mean_abs_png(a: &Path, b: &Path) -> f64 {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.as_raw().len() as f64
}

/// `disendiff generate` with diffusers' call of make_lora_fixtures.py, `extra` flags added.
fn generate(out: &Path, extra: &[&str]) -> (bool, String) {
    let latents = common::fixture("golden/lora-latents.safetensors");
    let mut args = vec![
        "generate", "--model", sd1().to_str().unwrap().to_owned().leak(), "--prompt", "a red ball and a blue box",
        "--negative-prompt", "blurry", "--steps", "10", "--guidance-scale", "6", "--num-images", "2",
        "--height", "64", "--width", "64", "--latents", latents.to_str().unwrap().to_owned().leak(),
        "--out", out.to_str().unwrap().to_owned().leak(),
    ];
    args.extend_from_slice(extra);
    common::disendiff(&args)
}

fn check_cli(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let arg = if name == "none" { Vec::new() } else {
        let f = common::fixture(&format!("golden/lora-{name}.safetensors"));
        vec!["--lora".to_string(), format!("{}:{SCALE}", f.display())]
    };
    let arg: Vec<&str> = arg.iter().map(|s| s.as_str()).collect();
    let (ok, err) = generate(&out, &arg);
    assert!(ok, "{err}");
    for i in 0..2 {
        let got = out.join(format!("{i:05}.png"));
        let mad = mean_abs_png(&got, &common::fixture(&format!("golden/lora-{name}-{i:05}.png")));
        println!("{name}: image {i} mean abs diff from diffusers {mad:.4} (of 255)");
        assert!(mad <= 1.0, "{name}: PNG {i} differs from diffusers' by {mad}/255 on average");
        if name != "none" {
            let off = mean_abs_png(&got, &common::fixture(&format!("golden/lora-none-{i:05}.png")));
            println!("{name}: image {i} mean abs diff from the image without the LoRA {off:.4}");
            assert!(off >= 3.0, "{name}: the LoRA hardly changes image {i} ({off}/255)");
        }
    }
}

#[test]
fn generate_without_lora_matches_diffusers() {
    check_cli("none");
}

#[test]
fn generate_with_kohya_lora_matches_diffusers_fuse_lora() {
    check_cli("kohya");
}

#[test]
fn generate_with_peft_lora_matches_diffusers_fuse_lora() {
    check_cli("peft");
}

/// The expected change of each weight of a kohya or PEFT file, computed from its tensors.
fn expected_deltas(file: &Path, scale: f64) -> Vec<(String, Tensor)> {
    let t = load(file);
    let mut out = Vec::new();
    for (key, down) in &t {
        let (up_key, alpha_key, name) = if let Some(m) = key.strip_suffix(".lora_down.weight") {
            let name = match m.strip_prefix("lora_te_text_model_") {
                Some(rest) => format!("text_encoder.{}", underscored_to_path(rest)),
                None => underscored_to_path(m.strip_prefix("lora_unet_").unwrap()),
            };
            (format!("{m}.lora_up.weight"), Some(format!("{m}.alpha")), name)
        } else if let Some(m) = key.strip_suffix(".lora_A.weight") {
            let name = match m.strip_prefix("text_encoder.text_model.") {
                Some(rest) => format!("text_encoder.{rest}"),
                None => m.strip_prefix("unet.").unwrap().to_string(),
            };
            (format!("{m}.lora_B.weight"), None, name)
        } else {
            continue;
        };
        let up = &t[&up_key];
        let r = down.dim(0).unwrap();
        let alpha = alpha_key.and_then(|k| t.get(&k)).map_or(r as f64, |a| f32(a).to_scalar::<f32>().unwrap() as f64);
        let d_in = down.elem_count() / r;
        let prod = f32(up).reshape((up.dim(0).unwrap(), r)).unwrap().matmul(&f32(down).reshape((r, d_in)).unwrap()).unwrap();
        out.push((format!("{name}.weight"), (prod * (alpha / r as f64 * scale)).unwrap()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The module path of the fixtures' kohya names (whose only underscores inside a part are
/// those listed here).
fn underscored_to_path(s: &str) -> String {
    let keep = ["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
        "self_attn", "q_proj", "k_proj", "v_proj", "out_proj"];
    let mut p = s.replace('_', ".");
    for k in keep {
        p = p.replace(&k.replace('_', "."), k);
    }
    p
}

#[test]
fn merged_weights_are_base_plus_scaled_product_and_come_off_bit_for_bit() {
    let base = base_weights();
    for name in ["kohya", "peft"] {
        let file = common::fixture(&format!("golden/lora-{name}.safetensors"));
        let spec = LoraSpec { path: file.clone(), scale: SCALE };
        let (mut m, warnings) = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec], false).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let want = expected_deltas(&file, SCALE);
        assert_eq!(want.len(), 20, "{name}: the fixture's entries");
        assert!(want.iter().any(|(n, _)| n.starts_with("text_encoder.")));
        let mut worst = 0f32;
        for (n, d) in &want {
            let got = m.sd.weight_var(n).unwrap_or_else(|| panic!("{name}: {n} is not patchable")).as_tensor().copy().unwrap();
            let expect = (f32(&base[n]) + d.reshape(base[n].dims()).unwrap()).unwrap();
            let err = max_abs(&got, &expect);
            assert!(max_abs(d, &d.zeros_like().unwrap()) > 1e-3, "{name}: {n}: a zero change");
            worst = worst.max(err);
            assert!(err <= 1e-6, "{name}: {n} is off by {err}");
        }
        println!("{name}: {} weights, worst abs error {worst:.2e}", want.len());
        let g = common::load_golden("sd1");
        let unet_with = m.sd.unet.forward(&g["unet.sample"], &g["unet.timesteps"], &g["unet.context"]).unwrap();

        m.remove_loras().unwrap();
        assert!(m.patches.is_empty());
        for (n, _) in &want {
            assert_eq!(bits(m.sd.weight_var(n).unwrap().as_tensor()), bits(&base[n]), "{name}: {n} not restored bit for bit");
        }
        let fresh = StableDiffusion::load(&sd1(), &LoadOptions::default()).unwrap();
        let after = m.sd.unet.forward(&g["unet.sample"], &g["unet.timesteps"], &g["unet.context"]).unwrap();
        let plain = fresh.unet.forward(&g["unet.sample"], &g["unet.timesteps"], &g["unet.context"]).unwrap();
        assert_eq!(bits(&after), bits(&plain), "{name}: the UNet without the LoRA is not the base's");
        assert!(max_abs(&unet_with, &plain) > 1e-3, "{name}: the LoRA did not change the UNet output");
        let ids = fresh.tokenizer.encode("a red ball").ids;
        let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        assert_eq!(bits(&m.sd.text_encoder.forward(&ids).unwrap()), bits(&fresh.text_encoder.forward(&ids).unwrap()));
    }
}

fn randn(seed: u64, dims: &[usize]) -> Tensor {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    disendiff::util::randn(&mut rng, dims, &Device::Cpu).unwrap()
}

#[test]
fn mixed_alphas_locon_and_diff_entries_are_exact() {
    let base = base_weights();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("k.safetensors");
    let attn1_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let conv = "up_blocks.2.resnets.0.conv1";
    let ff2 = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2";
    let fc1 = "encoder.layers.1.mlp.fc1";
    let shape = |n: &str| base[n].dims().to_vec();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let k0_mod = K0.strip_suffix(".weight").unwrap();
    let sk = shape(K0);
    t.insert(format!("lora_unet_{}.lora_down.weight", k0_mod.replace('.', "_")), randn(1, &[4, sk[1]]));
    t.insert(format!("lora_unet_{}.lora_up.weight", k0_mod.replace('.', "_")), randn(2, &[sk[0], 4]));
    t.insert(format!("lora_unet_{}.alpha", k0_mod.replace('.', "_")), Tensor::new(8f32, &Device::Cpu).unwrap());
    let sq = shape(&format!("{attn1_q}.weight"));
    t.insert(format!("lora_unet_{}.lora_down.weight", attn1_q.replace('.', "_")), randn(3, &[2, sq[1]]));
    t.insert(format!("lora_unet_{}.lora_up.weight", attn1_q.replace('.', "_")), randn(4, &[sq[0], 2]));
    t.insert(format!("lora_unet_{}.alpha", attn1_q.replace('.', "_")), Tensor::new(1f32, &Device::Cpu).unwrap());
    let sc = shape(&format!("{conv}.weight"));
    t.insert(format!("lora_unet_{}.lora_down.weight", conv.replace('.', "_")), randn(5, &[3, sc[1], 3, 3]));
    t.insert(format!("lora_unet_{}.lora_up.weight", conv.replace('.', "_")), randn(6, &[sc[0], 3, 1, 1]));
    let sf = shape(&format!("{ff2}.weight"));
    t.insert(format!("lora_unet_{}.diff", ff2.replace('.', "_")), randn(7, &sf));
    t.insert(format!("lora_unet_{}.diff_b", ff2.replace('.', "_")), randn(8, &[sf[0]]));
    let st = shape(&format!("text_encoder.{fc1}.weight"));
    t.insert(format!("lora_te_text_model_{}.lora_down.weight", fc1.replace('.', "_")), randn(9, &[4, st[1]]));
    t.insert(format!("lora_te_text_model_{}.lora_up.weight", fc1.replace('.', "_")), randn(10, &[st[0], 4]));
    t.insert(format!("lora_te_text_model_{}.alpha", fc1.replace('.', "_")), Tensor::new(6f32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, &file).unwrap();

    let key = |m: &str, p: &str| t[&format!("{m}.{p}")].clone();
    let product = |m: &str, scale: f64| -> Tensor {
        let (d, u) = (key(m, "lora_down.weight"), key(m, "lora_up.weight"));
        let r = d.dim(0).unwrap();
        (u.reshape((u.dim(0).unwrap(), r)).unwrap().matmul(&d.reshape((r, d.elem_count() / r)).unwrap()).unwrap() * scale).unwrap()
    };
    let s = 0.5;
    let ku = |m: &str| format!("lora_unet_{}", m.replace('.', "_"));
    let want: Vec<(String, Tensor)> = vec![
        (K0.to_string(), product(&ku(k0_mod), 8.0 / 4.0 * s)),
        (format!("{attn1_q}.weight"), product(&ku(attn1_q), 1.0 / 2.0 * s)),
        (format!("{conv}.weight"), product(&ku(conv), s).reshape(sc.as_slice()).unwrap()),
        (format!("{ff2}.weight"), (key(&ku(ff2), "diff") * s).unwrap()),
        (format!("{ff2}.bias"), (key(&ku(ff2), "diff_b") * s).unwrap()),
        (format!("text_encoder.{fc1}.weight"), product(&format!("lora_te_text_model_{}", fc1.replace('.', "_")), 6.0 / 4.0 * s)),
    ];
    let spec = LoraSpec { path: file.clone(), scale: s };
    let (mut m, _) = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec], false).unwrap();
    for (n, d) in &want {
        let got = m.sd.weight_var(n).unwrap().as_tensor().copy().unwrap();
        let err = max_abs(&got, &(f32(&base[n]) + d).unwrap());
        println!("{n}: abs error {err:.2e}");
        assert!(err <= 1e-6, "{n} is off by {err}");
    }
    m.remove_loras().unwrap();
    for (n, _) in &want {
        assert_eq!(bits(m.sd.weight_var(n).unwrap().as_tensor()), bits(&base[n]), "{n} not restored");
    }
}

#[test]
fn unmatched_keys_are_an_error_listing_them_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = load(&common::fixture("golden/lora-kohya.safetensors"));
    t.insert("lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight".into(), randn(1, &[4, 16]));
    t.insert("lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight".into(), randn(2, &[16, 4]));
    t.insert("model.diffusion_model.foo".into(), randn(3, &[2]));
    let file = tmp.path().join("bad.safetensors");
    candle_core::safetensors::save(&t, &file).unwrap();
    let spec = LoraSpec { path: file.clone(), scale: 1.0 };
    let err = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec.clone()], false).err().unwrap().to_string();
    assert!(err.contains("lora_unet_down_blocks_9_attentions_0_proj_in") && err.contains("model.diffusion_model.foo"), "{err}");
    assert!(err.contains("--lora-allow-unmatched"), "{err}");

    let (m, warnings) = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec], true).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].starts_with("2 of the"), "{warnings:?}");
    assert_eq!(m.patches.labels().len(), 1);

    // the CLI: an error, no output
    let out = tmp.path().join("out");
    let (ok, err) = common::disendiff(&["generate", "--model", sd1().to_str().unwrap(), "--prompt", "x", "--steps", "1",
        "--lora", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("match no weight"), "{err}");
    assert!(!out.join("00000.png").exists());
    let (ok, err) = common::disendiff(&["generate", "--model", sd1().to_str().unwrap(), "--prompt", "x", "--steps", "1",
        "--lora", &format!("{}:0.5", file.display()), "--lora-allow-unmatched", "--out", out.to_str().unwrap()]);
    assert!(ok && err.contains("warning: 2 of the"), "{err}");
}

/// A concept file "trained" on sd1-tiny: every attn2 K/V weight W becomes W * 1.25 + 0.01.
fn make_concept_file(out: &Path) -> HashMap<String, Tensor> {
    let base = load(&sd1().join("unet/diffusion_pytorch_model.safetensors"));
    let is_kv = |n: &str| n.ends_with("attn2.to_k.weight") || n.ends_with("attn2.to_v.weight");
    let mut base_kv: Vec<(String, Tensor)> = base.iter().filter(|(n, _)| is_kv(n)).map(|(n, t)| (n.clone(), f32(t))).collect();
    base_kv.sort_by(|a, b| a.0.cmp(&b.0));
    let trained: Vec<(String, Tensor)> = base_kv.iter().map(|(n, t)| (n.clone(), t.affine(1.25, 0.01).unwrap())).collect();
    let te: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sd1().join("text_encoder/config.json")).unwrap()).unwrap();
    let (vocab, hidden) = (te["vocab_size"].as_u64().unwrap() as usize, te["hidden_size"].as_u64().unwrap() as usize);
    let meta = ConceptMeta {
        concept: vec![Concept { modifier: "<new1>".into(), class_word: "cat".into(), initializer: "pll".into() }],
        method: "disendiff".into(),
        hyperparameters: serde_json::json!({}),
        base_model: BaseModelId { path: sd1().display().to_string(), fingerprint: concept_file::fingerprint(&base_kv, (vocab, hidden)).unwrap() },
    };
    concept_file::save(out, &meta, &trained, &Tensor::full(0.5f32, (1, hidden), &Device::Cpu).unwrap()).unwrap();
    trained.into_iter().collect()
}

#[test]
fn concepts_on_a_lora_model_add_their_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let cf = tmp.path().join("c.safetensors");
    let trained = make_concept_file(&cf);
    let base = base_weights();
    let lora = common::fixture("golden/lora-kohya.safetensors");
    let want_lora: HashMap<String, Tensor> = expected_deltas(&lora, SCALE).into_iter().collect();
    assert!(want_lora.contains_key(K0), "the fixture LoRA changes {K0}");

    let spec = LoraSpec { path: lora, scale: SCALE };
    let (mut m, _) = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec], false).unwrap();
    m.add_concepts(&cf, TrainedBase::Refuse).unwrap();
    let k0 = m.sd.weight_var(K0).unwrap().as_tensor().copy().unwrap();
    let b = f32(&base[K0]);
    let want = ((&b + want_lora[K0].reshape(b.dims()).unwrap()).unwrap() + (&trained[K0] - &b).unwrap()).unwrap();
    let err = max_abs(&k0, &want);
    println!("K0 on the LoRA'd model: abs error {err:.2e}");
    assert!(err <= 1e-6, "K0 = LoRA'd base + (trained - base) is off by {err}");
    // a K/V the LoRA does not change is the trained weight itself
    let v_mid = "up_blocks.2.attentions.2.transformer_blocks.0.attn2.to_v.weight";
    assert!(!want_lora.contains_key(v_mid));
    assert_eq!(bits(m.sd.weight_var(v_mid).unwrap().as_tensor()), bits(&trained[v_mid]));

    // the LoRA off: the concepts stay, now on the plain base
    m.remove_loras().unwrap();
    assert_eq!(m.patches.labels(), vec![cf.display().to_string()]);
    assert!(max_abs(m.sd.weight_var(K0).unwrap().as_tensor(), &trained[K0]) <= 1e-6);
    m.remove_concepts().unwrap();
    assert_eq!(bits(m.sd.weight_var(K0).unwrap().as_tensor()), bits(&base[K0]));
}

/// Writes f32 tensors with safetensors metadata (candle's writer takes none).
fn save_with_metadata(tensors: &[(String, Tensor)], metadata: HashMap<String, String>, path: &Path) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let v = f32(t).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n.clone(), t.dims().to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, Some(metadata), path).unwrap();
}

#[test]
fn peft_adapter_config_in_the_metadata_sets_the_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_weights();
    let m = K0.strip_suffix(".weight").unwrap();
    let sk = base[K0].dims().to_vec();
    let (down, up) = (randn(11, &[4, sk[1]]), randn(12, &[sk[0], 4]));
    let tensors = vec![(format!("unet.{m}.lora_A.weight"), down.clone()), (format!("unet.{m}.lora_B.weight"), up.clone())];
    let config = |extra: &str| {
        HashMap::from([("lora_adapter_metadata".to_string(), format!(r#"{{"unet.r": 4, "unet.lora_alpha": 8{extra}}}"#))])
    };
    let file = tmp.path().join("p.safetensors");
    save_with_metadata(&tensors, config(""), &file);
    let spec = LoraSpec { path: file.clone(), scale: 0.5 };
    let (pm, _) = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec.clone()], false).unwrap();
    let want = (f32(&base[K0]) + (up.matmul(&down).unwrap() * (8.0 / 4.0 * 0.5)).unwrap()).unwrap();
    let err = max_abs(pm.sd.weight_var(K0).unwrap().as_tensor(), &want);
    assert!(err <= 1e-6, "K0 with lora_alpha 8, r 4, scale 0.5 is off by {err}");

    // what would change the formula is refused, not ignored
    for extra in [r#", "unet.alpha_pattern": {"x": 2}"#, r#", "unet.use_rslora": true"#] {
        save_with_metadata(&tensors, config(extra), &file);
        let err = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec.clone()], false).err().unwrap().to_string();
        assert!(err.contains("adapter config"), "{err}");
    }
}

/// A kohya module name in diffusers' layout renamed to the LDM layout as A1111's
/// `convert_diffusers_name_to_compvis` (extensions-builtin/Lora/networks.py) does, with its
/// "3" being layers_per_block + 1: down (x, i) -> input_blocks_{1 + 3x + i}, up (x, i) ->
/// output_blocks_{3x + i}, attentions `_1_`, resnets `_0_` with LDM's part names.
fn to_ldm(key: &str, per_level: usize) -> String {
    let resnet_part = |p: &str| match p {
        "conv1" => "in_layers_2",
        "conv2" => "out_layers_3",
        "norm1" => "in_layers_0",
        "norm2" => "out_layers_0",
        "time_emb_proj" => "emb_layers_1",
        "conv_shortcut" => "skip_connection",
        other => panic!("resnet part {other}"),
    };
    let re = |p: &str| regex::Regex::new(p).unwrap();
    let n = |c: &regex::Captures, i: usize| c[i].parse::<usize>().unwrap();
    if let Some(c) = re(r"^lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)$").captures(key) {
        return format!("lora_unet_input_blocks_{}_1_{}", 1 + n(&c, 1) * per_level + n(&c, 2), &c[3]);
    }
    if let Some(c) = re(r"^lora_unet_down_blocks_(\d+)_resnets_(\d+)_([a-z_0-9]+?)(\.[a-z_.]+)$").captures(key) {
        return format!("lora_unet_input_blocks_{}_0_{}{}", 1 + n(&c, 1) * per_level + n(&c, 2), resnet_part(&c[3]), &c[4]);
    }
    if let Some(c) = re(r"^lora_unet_mid_block_attentions_0_(.+)$").captures(key) {
        return format!("lora_unet_middle_block_1_{}", &c[1]);
    }
    if let Some(c) = re(r"^lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)$").captures(key) {
        return format!("lora_unet_output_blocks_{}_1_{}", n(&c, 1) * per_level + n(&c, 2), &c[3]);
    }
    if let Some(c) = re(r"^lora_unet_up_blocks_(\d+)_resnets_(\d+)_([a-z_0-9]+?)(\.[a-z_.]+)$").captures(key) {
        return format!("lora_unet_output_blocks_{}_0_{}{}", n(&c, 1) * per_level + n(&c, 2), resnet_part(&c[3]), &c[4]);
    }
    assert!(key.starts_with("lora_te_"), "no LDM name for {key}");
    key.to_string()
}

#[test]
fn ldm_named_kohya_file_patches_the_same_weights_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_weights();
    // the fixture's 20 entries (attention Q/K/V/out in down, mid and up blocks, text encoder),
    // plus resnet convolutions (LoCon) in a down and an up block
    let mut t = load(&common::fixture("golden/lora-kohya.safetensors"));
    for (seed, m) in [(21, "down_blocks.1.resnets.1.conv2"), (23, "up_blocks.1.resnets.2.conv_shortcut"), (25, "down_blocks.0.resnets.0.time_emb_proj")] {
        let shape = base[&format!("{m}.weight")].dims().to_vec();
        let k = format!("lora_unet_{}", m.replace('.', "_"));
        let mut down_shape = vec![2, shape[1]];
        down_shape.extend_from_slice(&shape[2..]);
        let mut up_shape = vec![shape[0], 2];
        up_shape.extend(std::iter::repeat(1).take(shape.len() - 2));
        t.insert(format!("{k}.lora_down.weight"), randn(seed, &down_shape));
        t.insert(format!("{k}.lora_up.weight"), randn(seed + 1, &up_shape));
        t.insert(format!("{k}.alpha"), Tensor::new(1.5f32, &Device::Cpu).unwrap());
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(sd1().join("unet/config.json")).unwrap()).unwrap();
    let per_level = cfg["layers_per_block"].as_u64().unwrap() as usize + 1;
    let ldm: HashMap<String, Tensor> = t.iter().map(|(k, v)| (to_ldm(k, per_level), v.clone())).collect();
    assert!(ldm.keys().any(|k| k.starts_with("lora_unet_input_blocks_")) && ldm.keys().any(|k| k.starts_with("lora_unet_output_blocks_")));
    assert!(ldm.keys().any(|k| k.starts_with("lora_unet_middle_block_1_")), "the fixture has a mid-block entry");
    for part in ["_0_in_layers_2.", "_0_out_layers_3.", "_0_emb_layers_1.", "_0_skip_connection."] {
        assert!(ldm.keys().any(|k| k.contains(part)), "no {part} entry");
    }
    let (fd, fl) = (tmp.path().join("diffusers.safetensors"), tmp.path().join("ldm.safetensors"));
    candle_core::safetensors::save(&t, &fd).unwrap();
    candle_core::safetensors::save(&ldm, &fl).unwrap();

    let load_with = |f: &Path| {
        let (m, w) = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[LoraSpec { path: f.to_path_buf(), scale: SCALE }], false).unwrap();
        assert!(w.is_empty(), "{w:?}");
        m
    };
    let (md, ml) = (load_with(&fd), load_with(&fl));
    let names: Vec<String> = t.keys().filter_map(|k| k.strip_suffix(".lora_down.weight")).map(|m| match m.strip_prefix("lora_te_text_model_") {
        Some(rest) => format!("text_encoder.{}.weight", underscored_to_path(rest)),
        None => format!("{}.weight", underscored_to_path(m.strip_prefix("lora_unet_").unwrap()).replace("time.emb.proj", "time_emb_proj").replace("conv.shortcut", "conv_shortcut")),
    }).collect();
    assert_eq!(names.len(), 23, "the fixture's 20 entries and 3 more");
    for n in &names {
        let a = md.sd.weight_var(n).unwrap_or_else(|| panic!("{n} is not patched by the diffusers-named file")).as_tensor();
        let b = ml.sd.weight_var(n).unwrap_or_else(|| panic!("{n} is not patched by the LDM-named file")).as_tensor();
        assert!(max_abs(a, &base[n]) > 1e-4, "{n}: the LoRA did not change it");
        assert_eq!(bits(a), bits(b), "{n}: the LDM-named file gives another weight");
    }
    let g = common::load_golden("sd1");
    let out = |m: &PatchedModel| bits(&m.sd.unet.forward(&g["unet.sample"], &g["unet.timesteps"], &g["unet.context"]).unwrap());
    assert_eq!(out(&md), out(&ml), "the UNet outputs differ");
    println!("{} weights patched identically from LDM and diffusers names", names.len());
}
