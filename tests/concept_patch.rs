//! The patch layer (`disendiff::patch`): a concept file applied to a loaded model and reverted
//! gives the base model's outputs back bit for bit; concepts swap without reloading; a lower
//! patch (a LoRA) goes under the concepts whatever the order of calls; a related base gets the
//! difference with a warning naming both models; an unrelated architecture is refused; a
//! 9-channel inpainting UNet with sd1-tiny's layers (built here as diffusers builds inpainting
//! models: conv_in widened to 9 input channels, then its own fine-tuning) gets K/V = its base +
//! (trained - trained-on base), and `disendiff inpaint --concepts --concepts-base` runs on it.
//!
//! The concept files here are made by the test from the fixture's own weights (trained = base
//! x 1.25 + 0.01), so every expected value is computed independently of the patch code.

mod common;

use candle_core::{DType, Device, Tensor};
use disendiff::formats::concept_file::{self, BaseModelId, Concept, ConceptMeta};
use disendiff::model::sd::{LoadOptions, StableDiffusion};
use disendiff::patch::{BaseValues, Layer, Patch, PatchStack, PatchedModel, TrainedBase, Undo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const K0: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";

fn sd1() -> PathBuf {
    common::fixture("sd1-tiny")
}

fn unet_file(root: &Path) -> PathBuf {
    root.join("unet/diffusion_pytorch_model.safetensors")
}

fn unet_tensors(root: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(unet_file(root), &Device::Cpu).unwrap()
}

fn is_kv(name: &str) -> bool {
    name.ends_with("attn2.to_k.weight") || name.ends_with("attn2.to_v.weight")
}

/// A concept file "trained" on `root`: every attn2 K/V weight W becomes `W * scale + 0.01`,
/// two tokens with rows filled with `row_value`.
fn make_concept_file(root: &Path, out: &Path, scale: f64, row_value: f32) -> HashMap<String, Tensor> {
    let base = unet_tensors(root);
    let mut base_kv: Vec<(String, Tensor)> =
        base.iter().filter(|(n, _)| is_kv(n)).map(|(n, t)| (n.clone(), t.to_dtype(DType::F32).unwrap())).collect();
    base_kv.sort_by(|a, b| a.0.cmp(&b.0));
    let trained: Vec<(String, Tensor)> = base_kv.iter().map(|(n, t)| (n.clone(), t.affine(scale, 0.01).unwrap())).collect();
    let te: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("text_encoder/config.json")).unwrap()).unwrap();
    let (vocab, hidden) = (te["vocab_size"].as_u64().unwrap() as usize, te["hidden_size"].as_u64().unwrap() as usize);
    let meta = ConceptMeta {
        concept: vec![
            Concept { modifier: "<new1>".into(), class_word: "cat".into(), initializer: "pll".into() },
            Concept { modifier: "<new2>".into(), class_word: "dog".into(), initializer: "ktn".into() },
        ],
        method: "disendiff".into(),
        hyperparameters: serde_json::json!({}),
        base_model: BaseModelId {
            path: root.display().to_string(),
            fingerprint: concept_file::fingerprint(&base_kv, (vocab, hidden)).unwrap(),
        },
    };
    let rows = Tensor::full(row_value, (2, hidden), &Device::Cpu).unwrap();
    concept_file::save(out, &meta, &trained, &rows).unwrap();
    trained.into_iter().collect()
}

/// A copy of sd1-tiny whose K/V weights were changed (a fine-tuned or merged base): W * 0.9.
fn related_base(dir: &Path) -> PathBuf {
    let out = dir.join("related");
    common::copy_dir(&sd1(), &out);
    let mut w = unet_tensors(&out);
    for (n, t) in w.iter_mut() {
        if is_kv(n) {
            *t = (&*t * 0.9).unwrap();
        }
    }
    candle_core::safetensors::save(&w, unet_file(&out)).unwrap();
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// The outputs a patch can change: the UNet on the golden inputs, and the text encoder on a
/// prompt that names the modifier tokens (tokenized as plain text when they are not loaded).
fn outputs(sd: &StableDiffusion) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let g = common::load_golden(if sd.unet_config.cross_attention_dim == 32 { "sd1" } else { "sd2" });
    let unet = sd.unet.forward(&g["unet.sample"], &g["unet.timesteps"], &g["unet.context"]).unwrap();
    let ids = sd.tokenizer.encode("a <new1> cat and a <new2> dog").ids;
    let ids_t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let text = sd.text_encoder.forward(&ids_t).unwrap();
    (bits(&unet), bits(&text), ids)
}

fn weight(sd: &StableDiffusion, name: &str) -> Tensor {
    sd.unet_weight_var(name).unwrap().as_tensor().copy().unwrap()
}

#[test]
fn apply_then_revert_gives_the_base_back_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (fa, fb) = (tmp.path().join("a.safetensors"), tmp.path().join("b.safetensors"));
    let trained_a = make_concept_file(&sd1(), &fa, 1.25, 0.5);
    make_concept_file(&sd1(), &fb, 0.75, -0.5);

    let mut m = PatchedModel::load(&sd1(), &LoadOptions::default()).unwrap();
    let base = outputs(&m.sd);
    let (described, warnings) = m.add_concepts(&fa, TrainedBase::Refuse).unwrap();
    assert_eq!(described, "<new1> cat, <new2> dog");
    assert!(warnings.is_empty(), "{warnings:?}");
    // On its own base the trained weights are set exactly.
    for (name, t) in &trained_a {
        assert_eq!(bits(&weight(&m.sd, name)), bits(t), "{name}");
    }
    let with_a = outputs(&m.sd);
    assert_ne!(with_a.0, base.0, "the concepts did not change the UNet");
    assert_ne!(with_a.1, base.1, "the concepts did not change the text encoder");
    assert_eq!(m.sd.tokenizer.token_id("<new1>"), Some(49408));

    m.remove_concepts().unwrap();
    assert_eq!(outputs(&m.sd), base, "reverting did not restore the base model");
    assert_eq!(m.sd.tokenizer.token_id("<new1>"), None);
    assert!(m.sd.text_encoder.extra_embeddings().is_none());

    // Swapping to another file without reloading equals loading it fresh.
    m.add_concepts(&fb, TrainedBase::Refuse).unwrap();
    let mut fresh = PatchedModel::load(&sd1(), &LoadOptions::default()).unwrap();
    fresh.add_concepts(&fb, TrainedBase::Refuse).unwrap();
    assert_eq!(outputs(&m.sd), outputs(&fresh.sd));
    // Two files with the same tokens cannot both be on.
    let err = m.add_concepts(&fa, TrainedBase::Refuse).unwrap_err().to_string();
    assert!(err.contains("already in the vocabulary"), "{err}");
    assert_eq!(outputs(&m.sd), outputs(&fresh.sd), "a refused file changed the model");
}

/// A stand-in for a LoRA: adds 0.125 to one weight.
struct AddToWeight(&'static str);

impl Patch for AddToWeight {
    fn layer(&self) -> Layer {
        Layer::Lora
    }
    fn label(&self) -> String {
        format!("+0.125 on {}", self.0)
    }
    fn apply(&self, sd: &mut StableDiffusion, _base: &BaseValues) -> anyhow::Result<(Undo, Vec<String>)> {
        let var = sd.unet_weight_var(self.0).unwrap();
        let old = var.as_tensor().copy()?;
        var.set(&(&old + 0.125)?)?;
        Ok((Undo { weights: vec![(self.0.to_string(), old)], ..Default::default() }, vec![]))
    }
}

#[test]
fn loras_go_under_concepts_whatever_the_order() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.safetensors");
    let trained = make_concept_file(&sd1(), &f, 1.25, 0.5);
    let base_k0 = unet_tensors(&sd1())[K0].to_dtype(DType::F32).unwrap();

    let concepts = || Box::new(disendiff::patch::ConceptPatch::load(&f, TrainedBase::Refuse).unwrap());
    let mut a = StableDiffusion::load(&sd1(), &LoadOptions::default()).unwrap();
    let base = outputs(&a);
    let mut sa = PatchStack::new();
    sa.push(&mut a, concepts()).unwrap();
    sa.push(&mut a, Box::new(AddToWeight(K0))).unwrap();
    assert_eq!(sa.labels()[0], format!("+0.125 on {K0}"), "the LoRA is not below the concepts");

    let mut b = StableDiffusion::load(&sd1(), &LoadOptions::default()).unwrap();
    let mut sb = PatchStack::new();
    sb.push(&mut b, Box::new(AddToWeight(K0))).unwrap();
    sb.push(&mut b, concepts()).unwrap();
    assert_eq!(outputs(&a), outputs(&b));

    // On a weight the LoRA changed, the concepts add their difference from the base.
    let want = ((&base_k0 + 0.125).unwrap() + (&trained[K0] - &base_k0).unwrap()).unwrap();
    assert_eq!(bits(&weight(&a, K0)), bits(&want));
    sa.clear(&mut a).unwrap();
    assert_eq!(outputs(&a), base);
}

#[test]
fn a_related_base_gets_the_difference_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.safetensors");
    let trained = make_concept_file(&sd1(), &f, 1.25, 0.5);
    let related = related_base(tmp.path());
    let base_w = unet_tensors(&sd1());
    let related_w = unet_tensors(&related);

    let mut m = PatchedModel::load(&related, &LoadOptions::default()).unwrap();
    let before = outputs(&m.sd);
    let err = m.add_concepts(&f, TrainedBase::Refuse).unwrap_err().to_string();
    assert!(err.contains("was trained on the base model") && err.contains("--concepts-base"), "{err}");
    // Naming a folder that is not the model it was trained on is refused too.
    let err = m.add_concepts(&f, TrainedBase::Folder(related.clone())).unwrap_err().to_string();
    assert!(err.contains("is not the model"), "{err}");
    assert_eq!(outputs(&m.sd), before, "a refused file changed the model");

    let (_, warnings) = m.add_concepts(&f, TrainedBase::Folder(sd1())).unwrap();
    assert_eq!(warnings.len(), 1);
    let w = &warnings[0];
    assert!(w.contains(&sd1().display().to_string()) && w.contains(&related.display().to_string()), "{w}");
    for (name, t) in &trained {
        let b = base_w[name].to_dtype(DType::F32).unwrap();
        let want = (related_w[name].to_dtype(DType::F32).unwrap() + (t - &b).unwrap()).unwrap();
        assert_eq!(bits(&weight(&m.sd, name)), bits(&want), "{name}");
    }
    m.remove_concepts().unwrap();
    assert_eq!(outputs(&m.sd), before);

    // The command line: the same, with the warning on stderr.
    let out = tmp.path().join("gen");
    let (ok, err) = common::disendiff(&[
        "generate", "--model", related.to_str().unwrap(), "--concepts", f.to_str().unwrap(),
        "--concepts-base", sd1().to_str().unwrap(), "--prompt", "a <new1> cat", "--num-inference-steps", "1",
        "--height", "64", "--width", "64", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("warning:") && err.contains("different model"), "{err}");
    assert!(out.join("00000.png").is_file());
}

#[test]
fn an_unrelated_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.safetensors");
    make_concept_file(&sd1(), &f, 1.25, 0.5);
    let sd2 = common::fixture("sd2-tiny");
    let mut m = PatchedModel::load(&sd2, &LoadOptions::default()).unwrap();
    let before = outputs(&m.sd);
    for base in [TrainedBase::Refuse, TrainedBase::Folder(sd1())] {
        let err = m.add_concepts(&f, base).unwrap_err().to_string();
        assert!(err.contains("does not have") || err.contains("has shape"), "{err}");
        assert!(err.contains("the file was made for"), "{err}");
    }
    assert_eq!(outputs(&m.sd), before);
    assert!(m.patches.is_empty());
}

/// A prompt word written like a modifier token that no loaded file holds (a typo) is named in a
/// warning with the loaded ones, or refused with --strict-tokens before anything is written.
#[test]
fn unknown_modifier_tokens_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.safetensors");
    make_concept_file(&sd1(), &f, 1.25, 0.5);
    let model = sd1();
    let run = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "generate", "--model", model.to_str().unwrap(), "--concepts", f.to_str().unwrap(), "--prompt",
            "a <new3> cat and a <new1> dog", "--num-inference-steps", "1", "--height", "64", "--width", "64",
            "--out", out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        common::disendiff(&args)
    };
    let (ok, err) = run(&[], &tmp.path().join("a"));
    assert!(ok, "{err}");
    assert!(err.contains("warning: <new3>") && err.contains("<new1>, <new2>"), "{err}");
    let (ok, err) = run(&["--strict-tokens"], &tmp.path().join("b"));
    assert!(!ok && err.contains("<new3>") && err.contains("--strict-tokens"), "{err}");
    assert!(!tmp.path().join("b").exists());
}

/// An inpainting model made from sd1-tiny as diffusers makes them: conv_in widened from 4 to 9
/// input channels (the original 4 kept, the 5 new ones, mask and masked-image latents, random),
/// `in_channels` 9 in the config, and its own fine-tuning of the K/V (W * 0.9 - 0.002).
fn inpainting_from_sd1(dir: &Path) -> PathBuf {
    let out = dir.join("inpaint");
    common::copy_dir(&sd1(), &out);
    let mut w = unet_tensors(&out);
    let conv_in = w["conv_in.weight"].to_dtype(DType::F32).unwrap();
    let (c, four, kh, kw) = conv_in.dims4().unwrap();
    assert_eq!(four, 4);
    use rand::SeedableRng;
    let extra = disendiff::util::randn(&mut rand::rngs::StdRng::seed_from_u64(5), &[c, 5, kh, kw], &Device::Cpu).unwrap();
    w.insert("conv_in.weight".into(), Tensor::cat(&[&conv_in, &(extra * 0.05).unwrap()], 1).unwrap());
    for (n, t) in w.iter_mut() {
        if is_kv(n) {
            *t = t.affine(0.9, -0.002).unwrap();
        }
    }
    candle_core::safetensors::save(&w, unet_file(&out)).unwrap();
    let cfg_path = out.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["in_channels"] = serde_json::json!(9);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    out
}

/// The UNet of a 9-channel model on the golden inputs with 5 extra channels (a mask of ones
/// and the sample again as the masked-image latents).
fn inpaint_unet_output(sd: &StableDiffusion) -> Vec<u32> {
    let g = common::load_golden("sd1");
    let x = &g["unet.sample"];
    let mask = Tensor::ones((x.dim(0).unwrap(), 1, x.dim(2).unwrap(), x.dim(3).unwrap()), DType::F32, &Device::Cpu).unwrap();
    let input = Tensor::cat(&[x, &mask, x], 1).unwrap();
    bits(&sd.unet.forward(&input, &g["unet.timesteps"], &g["unet.context"]).unwrap())
}

#[test]
fn concepts_on_an_inpainting_unet_add_their_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.safetensors");
    let trained = make_concept_file(&sd1(), &f, 1.25, 0.5);
    let inpaint = inpainting_from_sd1(tmp.path());
    let base_w = unet_tensors(&sd1());
    let inpaint_w = unet_tensors(&inpaint);

    let mut m = PatchedModel::load(&inpaint, &LoadOptions::default()).unwrap();
    assert_eq!(m.sd.unet_config.in_channels, 9);
    let before = inpaint_unet_output(&m.sd);
    // Not the model it was trained on: refused without the trained-on base.
    let err = m.add_concepts(&f, TrainedBase::Refuse).unwrap_err().to_string();
    assert!(err.contains("was trained on the base model") && err.contains("--concepts-base"), "{err}");
    assert!(m.patches.is_empty());

    let (_, warnings) = m.add_concepts(&f, TrainedBase::Folder(sd1())).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(trained.len() >= 2 && trained.len() % 2 == 0, "K and V of every cross-attention layer");
    let mut worst = 0f32;
    for (name, t) in &trained {
        let b = base_w[name].to_dtype(DType::F32).unwrap();
        let own = inpaint_w[name].to_dtype(DType::F32).unwrap();
        let want = (&own + (t - &b).unwrap()).unwrap();
        let got = weight(&m.sd, name);
        assert_eq!(bits(&got), bits(&want), "{name} != inpainting base + (trained - sd1-tiny)");
        // neither the trained weight nor the inpainting model's own: the difference moved over
        let off = |a: &Tensor| (&got - a).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(off(t) > 1e-4 && off(&own) > 1e-4, "{name}");
        worst = worst.max(off(&want));
    }
    println!("{} K/V weights on the inpainting UNet, worst abs error {worst:.1e}", trained.len());
    let with = inpaint_unet_output(&m.sd);
    assert_ne!(with, before, "the concepts did not change the inpainting UNet");
    m.remove_concepts().unwrap();
    assert_eq!(inpaint_unet_output(&m.sd), before, "removing the concepts did not restore the inpainting UNet");

    // The command line: inpaint with the concept file, as the difference from sd1-tiny.
    let image = tmp.path().join("image.png");
    let mask = tmp.path().join("mask.png");
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])).save(&image).unwrap();
    image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x >= 32 { 255 } else { 0 }])).save(&mask).unwrap();
    let out = tmp.path().join("out");
    let (ok, err) = common::disendiff(&[
        "inpaint", "--model", inpaint.to_str().unwrap(), "--image", image.to_str().unwrap(), "--mask", mask.to_str().unwrap(),
        "--concepts", f.to_str().unwrap(), "--concepts-base", sd1().to_str().unwrap(), "--prompt", "a <new1> cat",
        "--num-inference-steps", "2", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("warning:") && err.contains("different model"), "{err}");
    assert!(out.join("00000.png").is_file());
}
