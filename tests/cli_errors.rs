//! `disendiff generate` end to end, and its answers to bad input: a clear message and a
//! non-zero exit, never a panic, and no output written.

mod common;

use std::path::{Path, PathBuf};



/// A private copy of the sd1 fixture model that a test may damage.
fn model_copy(tmp: &Path) -> PathBuf {
    let m = tmp.join("model");
    common::copy_dir(&common::fixture("sd1-tiny"), &m);
    m
}

fn generate(model: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a red ball", "--steps", "2"];
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    common::disendiff(&args)
}

#[test]
fn generate_writes_numbered_pngs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (ok, err) = generate(&common::fixture("sd1-tiny"), &out, &["--num-images", "2", "--height", "32", "--width", "48"]);
    assert!(ok, "{err}");
    for name in ["00000.png", "00001.png"] {
        let img = image::open(out.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (48, 32));
    }
}

#[test]
fn missing_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = generate(&tmp.path().join("nope"), &tmp.path().join("out"), &[]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn missing_weights_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    std::fs::remove_file(m.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let (ok, err) = generate(&m, &tmp.path().join("out"), &[]);
    assert!(!ok);
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, err) = generate(&m, &tmp.path().join("out"), &[]);
    assert!(!ok);
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("corrupt"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn config_with_a_field_it_cannot_honour() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    let p = m.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["class_embed_type"] = "timestep".into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let (ok, err) = generate(&m, &tmp.path().join("out"), &[]);
    assert!(!ok);
    assert!(err.contains("class_embed_type"), "{err}");
}

#[test]
fn config_that_does_not_match_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    let p = m.join("vae/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["latent_channels"] = 8.into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let (ok, err) = generate(&m, &tmp.path().join("out"), &[]);
    assert!(!ok);
    assert!(err.contains("shape"), "{err}");
}

#[test]
fn size_not_divisible_by_the_vae_factor() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = generate(&common::fixture("sd1-tiny"), &tmp.path().join("out"), &["--height", "60"]);
    assert!(!ok);
    assert!(err.contains("multiples of 8"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn latents_file_of_the_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let lat = tmp.path().join("latents.safetensors");
    let t = candle_core::Tensor::zeros((1, 4, 5, 5), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents".to_string(), t)]), &lat).unwrap();
    let (ok, err) = generate(&common::fixture("sd1-tiny"), &tmp.path().join("out"), &["--latents", lat.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("[1, 4, 5, 5]"), "{err}");
    assert!(!tmp.path().join("out").exists());
    // Not a safetensors file at all.
    std::fs::write(&lat, b"hello").unwrap();
    let (ok, err) = generate(&common::fixture("sd1-tiny"), &tmp.path().join("out"), &["--latents", lat.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("safetensors"), "{err}");
}

#[test]
fn latents_file_matches_the_golden_pipeline_through_the_cli() {
    // diffusers' own PNG for the same latents/prompt/steps/guidance: within 1/255 on average.
    let tmp = tempfile::tempdir().unwrap();
    let g = common::load_golden("sd1");
    let lat = tmp.path().join("latents.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents".to_string(), g["pipe.latents"].clone())]), &lat)
        .unwrap();
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/sd1.json")).unwrap()).unwrap();
    let pipe = &settings["pipe"];
    let out = tmp.path().join("out");
    let n = g["pipe.latents"].dim(0).unwrap().to_string();
    let steps = pipe["steps"].to_string();
    let guidance = pipe["guidance_scale"].to_string();
    let h = pipe["height"].to_string();
    let w = pipe["width"].to_string();
    let (ok, err) = common::disendiff(&[
        "generate", "--model", common::fixture("sd1-tiny").to_str().unwrap(),
        "--prompt", pipe["prompt"].as_str().unwrap(),
        "--negative-prompt", pipe["negative_prompt"].as_str().unwrap(),
        "--steps", &steps, "--guidance-scale", &guidance, "--eta", "0",
        "--num-images", &n, "--height", &h, "--width", &w,
        "--latents", lat.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for i in 0..g["pipe.latents"].dim(0).unwrap() {
        let ours = image::open(out.join(format!("{i:05}.png"))).unwrap().to_rgb8();
        let theirs = image::open(common::fixture(&format!("golden/sd1-pipe-{i:05}.png"))).unwrap().to_rgb8();
        let mad: f64 = ours.as_raw().iter().zip(theirs.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>()
            / ours.as_raw().len() as f64;
        assert!(mad <= 1.0, "image {i}: mean abs diff {mad}/255");
    }
}

/// Numeric flags are checked before any work, the message naming the flag, nothing written.
#[test]
fn bad_numbers_name_their_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let m = common::fixture("sd1-tiny");
    for (extra, flag) in [
        (&["--guidance-scale", "nan"][..], "--guidance-scale"),
        (&["--eta=-3"][..], "--eta"),
        (&["--eta", "1.5"][..], "--eta"),
        (&["--num-inference-steps", "0"][..], "--num-inference-steps"),
        (&["--num-images", "0"][..], "--num-images"),
    ] {
        let (ok, err) = generate(&m, &out, extra);
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(flag), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
    let img = common::fixture("golden/sd1-pipe-00000.png");
    for (extra, flag) in [(&["--learning-rate", "nan"][..], "--learning-rate"), (&["--max-train-steps", "0"][..], "--max-train-steps")] {
        let mut args = vec![
            "train", "--model", m.to_str().unwrap(), "--image", img.to_str().unwrap(), "--caption", "<new1> cat",
            "--out", out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, err) = common::disendiff(&args);
        assert!(!ok && err.contains(flag), "{extra:?}: {err}");
        assert!(!out.exists());
    }
}

/// A folder where a file is expected, and a file where a folder is, are named as such.
#[test]
fn folders_and_files_are_told_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let m = common::fixture("sd1-tiny");
    let (ok, err) = common::disendiff(&[
        "train", "--model", m.to_str().unwrap(), "--image", tmp.path().to_str().unwrap(), "--caption", "<new1> cat",
        "--out", out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("is a folder, not a file"), "{err}");
    let file = common::fixture("golden/sd1-pipe-00000.png");
    let (ok, err) = generate(&file, &out, &[]);
    assert!(!ok && err.contains("is a file, not a model folder"), "{err}");
    assert!(!out.exists());
}
