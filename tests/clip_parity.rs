//! The CLIP metrics against transformers (golden `clip.*`, tools/reference/make_clip_fixtures.py):
//! PIL's bicubic resize (exact bytes), `CLIPImageProcessor` pixel values, both towers'
//! projected features, CLIPScore and image alignment, `disendiff clip-score`, and bad inputs.

mod common;

use candle_core::{DType, Device, Tensor};
use disendiff::model::clip_model::ClipModel;
use disendiff::model::pil_resize::resize_bicubic;
use std::path::PathBuf;

fn golden_json() -> serde_json::Value {
    let p = common::fixture("golden/clip.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn model() -> ClipModel {
    ClipModel::load(&common::fixture("clip-tiny"), &Device::Cpu).unwrap()
}

fn u8_image(t: &Tensor) -> image::RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    image::RgbImage::from_raw(w as u32, h as u32, v).unwrap()
}

fn images(dir: &std::path::Path, names: &[serde_json::Value]) -> Vec<image::RgbImage> {
    names.iter().map(|n| disendiff::util::load_rgb(&dir.join(n.as_str().unwrap())).unwrap()).collect()
}

#[test]
fn pil_bicubic_resize_is_exact() {
    let g = common::load_golden("clip");
    let src = u8_image(&g["resize.source"]);
    let targets = golden_json()["resize_targets"].as_array().unwrap().clone();
    assert!(targets.len() >= 4);
    let mut catmull_rom_differs = false;
    for t in targets {
        let (w, h) = (t[0].as_u64().unwrap() as u32, t[1].as_u64().unwrap() as u32);
        let want = u8_image(&g[&format!("resize.{w}x{h}")]);
        let got = resize_bicubic(&src, w, h);
        let diff = got.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
        println!("resize {}x{} -> {w}x{h}: {diff} bytes differ", src.width(), src.height());
        assert_eq!(diff, 0, "PIL bicubic {w}x{h}: {diff} bytes differ");
        catmull_rom_differs |= image::imageops::resize(&src, w, h, image::imageops::FilterType::CatmullRom) != want;
    }
    // The goldens tell the filters apart: the image crate's CatmullRom is not PIL's bicubic.
    assert!(catmull_rom_differs);
}

#[test]
fn pixel_values_match_clip_image_processor() {
    let g = common::load_golden("clip");
    let j = golden_json();
    let m = model();
    for (key, dir, names) in [
        ("pixel_values", common::fixture("golden"), j["images"].as_array().unwrap()),
        ("ref_pixel_values", common::fixture("golden/clip-refs"), j["references"].as_array().unwrap()),
    ] {
        let imgs = images(&dir, names);
        let pix = m.processor.preprocess_batch(&imgs, &Device::Cpu).unwrap();
        let want = &g[key];
        let max = (&pix - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        println!("{key}: max abs diff {max:.3e}");
        assert!(max <= 1e-6, "{key}: max abs diff {max}");
    }
    // The sizes cover a same-size image, a downscale and an upscale, both crop directions.
    let sizes: Vec<(u32, u32)> = images(&common::fixture("golden"), j["images"].as_array().unwrap()).iter().map(|i| i.dimensions()).collect();
    assert!(sizes.iter().any(|&(w, h)| w > h && h > 32) && sizes.iter().any(|&(w, h)| h > w && w < 32));
}

#[test]
fn image_and_text_features_match_transformers() {
    let g = common::load_golden("clip");
    let m = model();
    for (pix, want) in [("pixel_values", "image_embeds"), ("ref_pixel_values", "ref_embeds")] {
        let got = m.image_features_pixels(&g[pix]).unwrap();
        let err = common::rel_err(&got, &g[want]);
        println!("{want}: rel err {err:.3e}");
        assert!(err <= 1e-4, "{want}: rel err {err}");
    }
    let texts: Vec<String> = golden_json()["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = m.encode_texts(&refs);
    let want_ids: Vec<Vec<u32>> = g["input_ids"].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    assert_eq!(ids, want_ids, "token ids (with truncation of the long text) differ from transformers'");
    let got = m.text_features(&refs).unwrap();
    let err = common::rel_err(&got, &g["text_embeds"]);
    println!("text_embeds: rel err {err:.3e}");
    assert!(err <= 1e-4, "text_embeds: rel err {err}");
}

/// The CLI's `--json` output on the fixture pairs against the reference scores.
#[test]
fn clip_score_cli_matches_reference_scores() {
    let j = golden_json();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "clip-score",
            "--clip-model",
            "tests/fixtures/clip-tiny",
            "--pairs",
            "tests/fixtures/golden/clip-pairs.json",
            "--references",
            "tests/fixtures/golden/clip-refs",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "clip-score failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let per = v["per_image"].as_array().unwrap();
    let pairs = j["pairs"].as_array().unwrap();
    assert_eq!(per.len(), pairs.len());
    for (i, p) in per.iter().enumerate() {
        assert_eq!(p["image"], pairs[i]["image"]);
        assert_eq!(p["prompt"], pairs[i]["prompt"]);
        for key in ["clipscore", "image_alignment"] {
            let (got, want) = (p[key].as_f64().unwrap(), j[key][i].as_f64().unwrap());
            println!("{} {key}: {got:.6} vs {want:.6}", pairs[i]["image"]);
            assert!((got - want).abs() <= 1e-3, "{key} of pair {i}: {got} vs {want}");
        }
    }
    // One cosine is negative and clamped to 0 (the fixture is chosen so).
    assert!(j["clipscore"].as_array().unwrap().iter().any(|s| s.as_f64() == Some(0.0)));
    for key in ["mean_clipscore", "mean_image_alignment"] {
        let (got, want) = (v[key].as_f64().unwrap(), j[key].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-3, "{key}: {got} vs {want}");
    }
    // The long prompt was truncated: said on stderr.
    assert!(stderr.contains("truncated"), "no truncation warning:\n{stderr}");
}

#[test]
fn clip_score_without_references_has_no_image_alignment() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["clip-score", "--clip-model", "tests/fixtures/clip-tiny", "--pairs", "tests/fixtures/golden/clip-pairs.json", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let j = golden_json();
    for (i, p) in v["per_image"].as_array().unwrap().iter().enumerate() {
        assert!(p["image_alignment"].is_null());
        assert!((p["clipscore"].as_f64().unwrap() - j["clipscore"][i].as_f64().unwrap()).abs() <= 1e-3);
    }
    assert!(v["mean_image_alignment"].is_null());
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("disendiff-clip-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn clip_score(model: &str, pairs: &str) -> (bool, String) {
    common::disendiff(&["clip-score", "--clip-model", model, "--pairs", pairs])
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = "tests/fixtures/clip-tiny";
    let (ok, err) = clip_score(model, "tests/fixtures/golden/no-such-pairs.json");
    assert!(!ok && err.contains("no-such-pairs.json"), "{err}");

    let d = tmp("bad");
    std::fs::write(d.join("broken.json"), "[{\"image\": ").unwrap();
    let (ok, err) = clip_score(model, d.join("broken.json").to_str().unwrap());
    assert!(!ok && err.contains("broken.json") && err.contains("JSON"), "{err}");

    std::fs::write(d.join("shape.json"), "[{\"img\": \"a.png\"}]").unwrap();
    let (ok, err) = clip_score(model, d.join("shape.json").to_str().unwrap());
    assert!(!ok && err.contains("shape.json") && err.contains("image"), "{err}");

    std::fs::write(d.join("not-an-image.png"), "hello").unwrap();
    std::fs::write(d.join("pairs.json"), "[{\"image\": \"not-an-image.png\", \"prompt\": \"a dog\"}]").unwrap();
    let (ok, err) = clip_score(model, d.join("pairs.json").to_str().unwrap());
    assert!(!ok && err.contains("not-an-image.png"), "{err}");

    // A config without the vision tower's patch_size.
    let m = d.join("model");
    common::copy_dir(&common::fixture("clip-tiny"), &m);
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vision_config"].as_object_mut().unwrap().remove("patch_size");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (ok, err) = clip_score(m.to_str().unwrap(), "tests/fixtures/golden/clip-pairs.json");
    assert!(!ok && err.contains("patch_size") && err.contains("config.json"), "{err}");

    // A preprocessor config without image_std.
    common::copy_dir(&common::fixture("clip-tiny"), &m);
    let pp = m.join("preprocessor_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pp).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("image_std");
    std::fs::write(&pp, cfg.to_string()).unwrap();
    let (ok, err) = clip_score(m.to_str().unwrap(), "tests/fixtures/golden/clip-pairs.json");
    assert!(!ok && err.contains("image_std"), "{err}");

    // An empty references folder.
    let refs = d.join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let (ok, err) = common::disendiff(&[
        "clip-score", "--clip-model", model, "--pairs", "tests/fixtures/golden/clip-pairs.json", "--references", refs.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("refs"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// The layout of `openai/clip-vit-base-patch32`: `position_ids` buffers in the weights,
/// `text_config.eos_token_id` 2 (the end token found as the largest id), a preprocessor config
/// written as `CLIPFeatureExtractor` (plain-number `size` / `crop_size`, no rescale keys). The
/// same weights give the same features and pixel values.
#[test]
fn openai_layout_loads_and_matches() {
    let d = tmp("openai");
    let m = d.join("model");
    common::copy_dir(&common::fixture("clip-tiny"), &m);
    let st = m.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let ids = |n: i64| Tensor::arange(0i64, n, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    tensors.insert("text_model.embeddings.position_ids".into(), ids(77));
    tensors.insert("vision_model.embeddings.position_ids".into(), ids(17));
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["eos_token_id"] = 2.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let pp = serde_json::json!({
        "crop_size": 32, "do_center_crop": true, "do_normalize": true, "do_resize": true,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 32
    });
    std::fs::write(m.join("preprocessor_config.json"), pp.to_string()).unwrap();

    let model = ClipModel::load(&m, &Device::Cpu).unwrap();
    assert_eq!(model.pooling, disendiff::model::clip_model::TextPooling::ArgMax);
    let g = common::load_golden("clip");
    let j = golden_json();
    let imgs = images(&common::fixture("golden"), j["images"].as_array().unwrap());
    let pix = model.processor.preprocess_batch(&imgs, &Device::Cpu).unwrap();
    assert_eq!(common::rel_err(&pix, &g["pixel_values"]), 0.0);
    let err = common::rel_err(&model.image_features_pixels(&pix).unwrap(), &g["image_embeds"]);
    assert!(err <= 1e-4, "image features: rel err {err}");
    let texts: Vec<String> = j["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let err = common::rel_err(&model.text_features(&refs).unwrap(), &g["text_embeds"]);
    assert!(err <= 1e-4, "text features: rel err {err}");
    let _ = std::fs::remove_dir_all(&d);
}
