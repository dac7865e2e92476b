//! `disendiff train --method dreambooth` end to end on sd1-tiny: a 2-step run writes OUT/model, a
//! complete diffusers folder in which every UNet tensor differs from the base and the tokenizer
//! holds the modifier tokens; a run resumed from its step-1 checkpoint writes the same folder;
//! `generate --model OUT/model` gives diffusers' images of that folder within 1/255
//! (golden/dreambooth-*.png from tools/reference/make_dreambooth_check.py, which ran this exact
//! command and loaded the folder with `StableDiffusionPipeline.from_pretrained`), clearly unlike
//! the images with the base UNet put back. With `--train-text-encoder` the same run writes the
//! trained text encoder (golden/dreambooth-te-*, same script), resumes bit for bit, and
//! generates as diffusers; the flag with another method is refused.

mod common;

use candle_core::{Device, Tensor};
use disendiff::model::tokenizer::ClipTokenizer;
use std::collections::HashMap;
use std::path::Path;

/// The training command after `train --out OUT` (the reference script's `TRAIN`).
const TRAIN: [&str; 18] = [
    "--model", "tests/fixtures/sd1-tiny", "--image", "tests/fixtures/golden/sd1-pipe-00000.png",
    "--caption", "<new1> cat and <new2> dog", "--method", "dreambooth", "--resolution", "64",
    "--max-train-steps", "2", "--learning-rate", "1e-3", "--num-class-images", "2",
    "--checkpointing-steps", "1",
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train(out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["train", "--out", s(out)];
    args.extend_from_slice(&TRAIN);
    args.extend_from_slice(extra);
    common::disendiff(&args)
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn mean_abs_png(a: &Path, b: &Path) -> f64 {
    common::images::mean_abs_u8(&image::open(a).unwrap().to_rgb8(), &image::open(b).unwrap().to_rgb8())
}

/// `generate --model MODEL` (the two images of make_dreambooth_check.py's settings) within
/// `max_diff`/255 of diffusers' `golden/{golden}-0000i.png` and at least `min_off`/255 from
/// `golden/{off}-0000i.png`, diffusers' images with the part that trained put back to the base.
fn generate_as_diffusers(model: &Path, gen: &Path, golden: &str, off: &str, max_diff: f64, min_off: f64) {
    let latents = common::fixture("golden/export-latents.safetensors");
    let (ok, err) = common::disendiff(&[
        "generate", "--model", s(model), "--prompt", "photo of a <new1> cat", "--steps", "10", "--guidance-scale", "6",
        "--num-images", "2", "--height", "64", "--width", "64", "--latents", s(&latents), "--strict-tokens", "--out", s(gen),
    ]);
    assert!(ok, "{err}");
    for i in 0..2 {
        let got = gen.join(format!("{i:05}.png"));
        let mad = mean_abs_png(&got, &common::fixture(&format!("golden/{golden}-{i:05}.png")));
        let far = mean_abs_png(&got, &common::fixture(&format!("golden/{off}-{i:05}.png")));
        println!("image {i}: mean abs diff {mad:.5}/255 vs diffusers, {far:.2}/255 vs diffusers' {off}");
        assert!(mad <= max_diff, "image {i} differs from diffusers' by {mad}/255");
        assert!(far >= min_off, "image {i} is close to {off} ({far}/255)");
    }
}

#[test]
fn dreambooth_writes_a_diffusers_folder_that_generates_as_diffusers() {
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/dreambooth-check.json")).unwrap()).unwrap();
    let want: Vec<&str> = info["train_args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(want, TRAIN, "the reference ran another command");

    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let (ok, err) = train(&a, &[]);
    assert!(ok, "{err}");
    let model = a.join("model");
    assert!(!a.join("concepts.safetensors").exists());
    for f in ["model_index.json", "scheduler/scheduler_config.json", "vae/config.json", "unet/config.json", "text_encoder/config.json"] {
        assert!(model.join(f).is_file(), "{f} missing");
    }
    assert!(a.join("checkpoints/step-000001.safetensors").is_file());

    // Every UNet tensor trained; the text encoder has the two rows more; the tokens are there.
    let base = load(&common::fixture("sd1-tiny/unet/diffusion_pytorch_model.safetensors"));
    let tuned = load(&model.join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(tuned.len(), base.len());
    for (k, b) in &base {
        let t = &tuned[k];
        assert_eq!(t.dims(), b.dims(), "{k}");
        let d = (t - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0, "UNet tensor {k} did not change");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("text_encoder/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 49410);
    let te = load(&model.join("text_encoder/model.safetensors"));
    assert_eq!(te["embeddings.token_embedding.weight"].dims(), &[49410, 32]);
    let tok = ClipTokenizer::from_dir(&model.join("tokenizer")).unwrap();
    assert_eq!((tok.token_id("<new1>"), tok.token_id("<new2>")), (Some(49408), Some(49409)));
    assert!(tok.encode("photo of a <new1> cat").ids.contains(&49408));

    // Resumed from the step-1 checkpoint: the same folder, bit for bit.
    let b = tmp.path().join("b");
    std::fs::create_dir_all(b.join("checkpoints")).unwrap();
    std::fs::copy(a.join("checkpoints/step-000001.safetensors"), b.join("checkpoints/step-000001.safetensors")).unwrap();
    common::copy_dir(&a.join("class_images"), &b.join("class_images"));
    let (ok, err) = train(&b, &["--resume"]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 1"), "{err}");
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
        assert!(std::fs::read(model.join(f)).unwrap() == std::fs::read(b.join("model").join(f)).unwrap(), "{f} differs after resume");
    }
    // A finished run is not overwritten; resumed at its end it writes the same folder again.
    let (ok, err) = train(&a, &[]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let before = std::fs::read(model.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let (ok, err) = train(&b, &["--resume"]);
    assert!(ok && err.contains("resuming at step 1"), "{err}");
    assert!(std::fs::read(b.join("model/unet/diffusion_pytorch_model.safetensors")).unwrap() == before);
    assert_eq!(std::fs::read_dir(&b).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count(), 0);

    // generate --model OUT/model against diffusers' images of the same folder.
    generate_as_diffusers(&model, &tmp.path().join("gen"), "dreambooth", "dreambooth-baseunet", 1.0, 3.0);
}

/// Max |a - b| of two tensors (f32).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// `--train-text-encoder`: the same 2-step run with the whole text encoder trained. OUT/model's
/// text encoder is the trained one (every tensor differs from the base's; in the token table
/// only the base's exact zeros of rows no caption uses stay, as weight decay keeps a 0 at 0),
/// the checkpoint holds its variables and AdamW state and a run resumed from step 1 writes the
/// same folder bit for bit, and `generate --model OUT/model` gives diffusers' images of the
/// folder (golden/dreambooth-te-*.png) within 0.001/255, clearly unlike those with the base text
/// encoder put back (golden/dreambooth-te-basete-*.png).
#[test]
fn dreambooth_with_text_encoder_writes_the_trained_text_encoder() {
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/dreambooth-te-check.json")).unwrap()).unwrap();
    let want: Vec<&str> = info["train_args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(want, [&TRAIN[..], &["--train-text-encoder"]].concat(), "the reference ran another command");

    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let (ok, err) = train(&a, &["--train-text-encoder"]);
    assert!(ok, "{err}");
    let model = a.join("model");

    let base = load(&common::fixture("sd1-tiny/text_encoder/model.safetensors"));
    let tuned = load(&model.join("text_encoder/model.safetensors"));
    assert_eq!(tuned.len(), base.len());
    assert_eq!(tuned.len(), 36);
    let table = "embeddings.token_embedding.weight";
    for (k, b) in &base {
        let b = b.to_dtype(candle_core::DType::F32).unwrap();
        let t = &tuned[k];
        assert_eq!(t.dtype(), candle_core::DType::F32, "{k} is not written as trained");
        let t = if k == table {
            assert_eq!(t.dims(), &[49410, 32]);
            t.narrow(0, 0, 49408).unwrap()
        } else {
            t.clone()
        };
        assert_eq!(t.dims(), b.dims(), "{k}");
        assert!(max_abs_diff(&t, &b) > 0.0, "text encoder tensor {k} did not change");
        // Elements that kept their base value: only exact zeros of the table (no gradient reaches
        // a row no caption uses, and weight decay keeps 0 at 0).
        let same: Vec<f32> = t.eq(&b).unwrap().to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let vals: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let kept: Vec<f32> = same.iter().zip(&vals).filter(|(s, _)| **s > 0.0).map(|(_, v)| *v).collect();
        let want_kept = info["unchanged_elements"].get(k.as_str()).map_or(0, |e| e["elements"].as_u64().unwrap() as usize);
        assert_eq!(kept.len(), want_kept, "{k}: {} elements unchanged, diffusers' check counted {want_kept}", kept.len());
        assert!(kept.iter().all(|v| *v == 0.0), "{k}: a non-zero element kept its base value");
    }
    assert_eq!(info["unchanged_elements"][table]["elements"], 2);
    let tok = ClipTokenizer::from_dir(&model.join("tokenizer")).unwrap();
    assert_eq!((tok.token_id("<new1>"), tok.token_id("<new2>")), (Some(49408), Some(49409)));
    assert!(tok.encode("photo of a <new1> cat and <new2> dog").ids.contains(&49409));

    // The step-1 checkpoint holds every text encoder variable with its AdamW state.
    let ckpt = load(&a.join("checkpoints/step-000001.safetensors"));
    for p in ["param.", "adam.m.", "adam.v."] {
        let n = ckpt.keys().filter(|k| k.starts_with(&format!("{p}text_encoder."))).count();
        assert_eq!(n, 36, "{n} text encoder tensors under {p} in the checkpoint");
    }
    // Resumed from it: the same folder, bit for bit.
    let b = tmp.path().join("b");
    std::fs::create_dir_all(b.join("checkpoints")).unwrap();
    std::fs::copy(a.join("checkpoints/step-000001.safetensors"), b.join("checkpoints/step-000001.safetensors")).unwrap();
    common::copy_dir(&a.join("class_images"), &b.join("class_images"));
    let (ok, err) = train(&b, &["--resume"]);
    assert!(!ok && err.contains("other settings"), "resuming a --train-text-encoder run without the flag: {err}");
    let (ok, err) = train(&b, &["--train-text-encoder", "--resume"]);
    assert!(ok && err.contains("resuming at step 1"), "{err}");
    for f in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
        assert!(std::fs::read(model.join(f)).unwrap() == std::fs::read(b.join("model").join(f)).unwrap(), "{f} differs after resume");
    }

    generate_as_diffusers(&model, &tmp.path().join("gen"), "dreambooth-te", "dreambooth-te-basete", 0.001, 1.0);
}

/// `--train-text-encoder` is DreamBooth's: with another method it is refused before anything
/// is written; `train --help` says so.
#[test]
fn train_text_encoder_needs_dreambooth() {
    let tmp = tempfile::tempdir().unwrap();
    for method in ["disendiff", "custom-diffusion", "textual-inversion"] {
        let out = tmp.path().join(method);
        let mut args = vec!["train", "--out", s(&out)];
        let mut rest: Vec<&str> = TRAIN.to_vec();
        let m = rest.iter().position(|a| *a == "--method").unwrap();
        rest[m + 1] = method;
        args.extend_from_slice(&rest);
        args.push("--train-text-encoder");
        let (ok, err) = common::disendiff(&args);
        assert!(!ok, "{method} --train-text-encoder succeeded");
        assert!(err.contains("--train-text-encoder") && err.contains("--method dreambooth"), "{err}");
        assert!(!out.join("checkpoints").exists() && !out.join("model").exists());
    }
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff")).args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--train-text-encoder") && help.contains("DreamBooth only"), "{help}");
}

#[test]
fn dreambooth_refuses_what_it_cannot_write() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = common::fixture("golden/lora-kohya.safetensors");
    let (ok, err) = train(&tmp.path().join("l"), &["--lora", s(&lora)]);
    assert!(!ok && err.contains("--lora"), "{err}");
    assert!(!tmp.path().join("l/model").exists());
    let (ok, err) = train(&tmp.path().join("h"), &["--dtype", "f16"]);
    assert!(!ok && err.contains("--dtype"), "{err}");
    let (ok, err) = train(&tmp.path().join("q"), &["--ablation", "train-q"]);
    assert!(!ok && err.contains("train-q"), "{err}");
}
