//! `disendiff eval` (the paper's protocol) on the tiny SD1 model with a concept file made here,
//! 1 image per prompt, the first prompt of each set, 2 DDIM steps: the report's scores equal
//! `disendiff clip-score` (checked against transformers in clip_parity.rs) on the same images
//! and references, and a second run resumes (reuses every image, same report).

mod common;

use candle_core::{DType, Device, Tensor};
use disendiff::formats::concept_file::{self, BaseModelId, Concept, ConceptMeta};
use std::path::{Path, PathBuf};

/// A concept file for sd1-tiny with `<new1>` and `<new2>`: K/V weights x 1.1, rows 0.05.
fn make_concept_file(root: &Path, out: &Path) {
    let base = candle_core::safetensors::load(root.join("unet/diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let mut kv: Vec<(String, Tensor)> = base
        .iter()
        .filter(|(n, _)| n.ends_with("attn2.to_k.weight") || n.ends_with("attn2.to_v.weight"))
        .map(|(n, t)| (n.clone(), t.to_dtype(DType::F32).unwrap()))
        .collect();
    kv.sort_by(|a, b| a.0.cmp(&b.0));
    let trained: Vec<(String, Tensor)> = kv.iter().map(|(n, t)| (n.clone(), t.affine(1.1, 0.0).unwrap())).collect();
    let te: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("text_encoder/config.json")).unwrap()).unwrap();
    let (vocab, hidden) = (te["vocab_size"].as_u64().unwrap() as usize, te["hidden_size"].as_u64().unwrap() as usize);
    let meta = ConceptMeta {
        concept: vec![
            Concept { modifier: "<new1>".into(), class_word: "cat".into(), initializer: "cat".into() },
            Concept { modifier: "<new2>".into(), class_word: "dog".into(), initializer: "dog".into() },
        ],
        method: "disendiff".into(),
        hyperparameters: serde_json::json!({}),
        base_model: BaseModelId { path: root.display().to_string(), fingerprint: concept_file::fingerprint(&kv, (vocab, hidden)).unwrap() },
    };
    concept_file::save(out, &meta, &trained, &Tensor::full(0.05f32, (2, hidden), &Device::Cpu).unwrap()).unwrap();
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff")).current_dir(env!("CARGO_MANIFEST_DIR")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

#[test]
fn eval_protocol_scores_resume_and_match_clip_score() {
    let d = std::env::temp_dir().join(format!("disendiff-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let refs = d.join("refs");
    for (set, name) in [("combined", "r0.png"), ("concept1", "r1.png"), ("concept2", "r0.png")] {
        std::fs::create_dir_all(refs.join(set)).unwrap();
        std::fs::copy(common::fixture("golden/clip-refs").join(name), refs.join(set).join(name)).unwrap();
    }
    let concepts = d.join("concepts.safetensors");
    make_concept_file(&common::fixture("sd1-tiny"), &concepts);
    let out: PathBuf = d.join("out");
    let args = [
        "eval", "--model", "tests/fixtures/sd1-tiny", "--concepts", concepts.to_str().unwrap(), "--dataset", "cat_dog",
        "--references", refs.to_str().unwrap(), "--clip-model", "tests/fixtures/clip-tiny", "--out", out.to_str().unwrap(),
        "--num-images", "1", "--max-prompts", "1", "--steps", "2",
    ];
    let (ok, _, err) = run(&args);
    assert!(ok, "eval failed:\n{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| metric | Combined | Concept1 | Concept2 | Mean |"), "{md}");
    let sets = report["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 3);
    let prompts = disendiff::eval::prompts::EvalPrompts::builtin("cat_dog").unwrap();
    for (s, (name, first, refdir)) in sets.iter().zip([
        ("combined", &prompts.combined[0], "combined"),
        ("concept1", &prompts.concept1[0], "concept1"),
        ("concept2", &prompts.concept2[0], "concept2"),
    ]) {
        assert_eq!(s["set"], name);
        let p = s["prompts"].as_array().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0]["prompt"].as_str().unwrap(), first.as_str());
        // The same image scored by `clip-score` against the same references.
        let img = out.join(format!("images/{name}/00/00000.png"));
        let pairs = d.join(format!("pairs-{name}.json"));
        std::fs::write(&pairs, serde_json::json!([{"image": img.to_str().unwrap(), "prompt": first}]).to_string()).unwrap();
        let (ok, stdout, err) = run(&[
            "clip-score", "--clip-model", "tests/fixtures/clip-tiny", "--pairs", pairs.to_str().unwrap(),
            "--references", refs.join(refdir).to_str().unwrap(), "--json",
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for key in ["clipscore", "image_alignment"] {
            let (a, b) = (p[0][key].as_f64().unwrap(), v["per_image"][0][key].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-9, "{name} {key}: eval {a} vs clip-score {b}");
            assert_eq!(s[key].as_f64().unwrap(), a, "{name}: a set of one prompt has that prompt's {key}");
        }
    }
    let mean = |key: &str| sets.iter().map(|s| s[key].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((report["mean_clipscore"].as_f64().unwrap() - mean("clipscore")).abs() < 1e-12);
    assert!((report["mean_image_alignment"].as_f64().unwrap() - mean("image_alignment")).abs() < 1e-12);

    // Resume: a removed image is generated again identically, the others are reused.
    let img = out.join("images/concept1/00/00000.png");
    let before = std::fs::read(&img).unwrap();
    let kept = out.join("images/combined/00/00000.png");
    let kept_time = std::fs::metadata(&kept).unwrap().modified().unwrap();
    std::fs::remove_file(&img).unwrap();
    let first_report = std::fs::read_to_string(out.join("report.json")).unwrap();
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before, "the regenerated image differs");
    assert_eq!(std::fs::metadata(&kept).unwrap().modified().unwrap(), kept_time, "an existing image was rewritten");
    assert_eq!(std::fs::read_to_string(out.join("report.json")).unwrap(), first_report);

    // Modifier tokens the model does not know are refused (no concept file).
    let (ok, _, err) = run(&[
        "eval", "--model", "tests/fixtures/sd1-tiny", "--dataset", "cat_dog", "--references", refs.to_str().unwrap(),
        "--clip-model", "tests/fixtures/clip-tiny", "--out", out.to_str().unwrap(), "--num-images", "1",
    ]);
    assert!(!ok && err.contains("<new1>"), "{err}");
    let (ok, _, err) = run(&[
        "eval", "--model", "tests/fixtures/sd1-tiny", "--dataset", "dog_cat", "--references", refs.to_str().unwrap(),
        "--clip-model", "tests/fixtures/clip-tiny", "--out", out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("dog_cat"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
