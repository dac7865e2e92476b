//! Smoke tests of the toy-world commands on the bundled toy model (the full runs are by hand;
//! their results are in the README): `disendiff demo` and a reduced `disendiff toy bench`.

mod common;



#[test]
fn reduced_toy_bench_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let (ok, err) = common::disendiff(&[
        "toy", "bench", "--scenes", "1", "--steps", "2", "--num-images", "1", "--sample-steps", "2",
        "--methods", "disendiff,custom-diffusion,textual-inversion,base,disendiff/no-ss",
        "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for method in ["disendiff", "custom-diffusion", "textual-inversion", "base", "disendiff/no-ss"] {
        let m = &report["methods"][method];
        for key in ["combined", "concept1", "concept2", "mean"] {
            let f = m["fidelity"][key].as_f64().unwrap_or_else(|| panic!("{method} lacks fidelity.{key}"));
            assert!((0.0..=1.0).contains(&f), "{method} fidelity.{key} = {f}");
        }
        for key in ["leakage", "other_object", "look_swap", "leak_similarity", "composition", "prompt_fidelity", "train_seconds"] {
            assert!(m[key].as_f64().is_some(), "{method} lacks {key}");
        }
        for key in ["l_bind", "l_ss", "class_iou_own", "class_iou_other"] {
            let v = m["attention"][key].as_f64().unwrap_or_else(|| panic!("{method} lacks attention.{key}"));
            let max = if key == "l_bind" { 2.0 } else { 1.0 }; // summed over the 2 concepts
            assert!((0.0..=max).contains(&v), "{method} attention.{key} = {v}");
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| disendiff |"));
    assert!(out.join("scene-1/disendiff/images/concept1-0-0.png").is_file(), "the bench keeps every generated image");
    // re-scoring the kept images gives the report's numbers back
    let (ok, err) = common::disendiff(&["toy", "rescore", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let per_scene = std::fs::read_to_string(out.join("per-scene.md")).unwrap();
    let all = per_scene.lines().find(|l| l.starts_with("| all | disendiff |")).expect("a total row for disendiff");
    let leakage: f64 = all.split('|').nth(4).unwrap().trim().parse().unwrap();
    assert!((leakage - report["methods"]["disendiff"]["leakage"].as_f64().unwrap()).abs() < 1e-3, "{all}");
}

#[test]
fn demo_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let (ok, err) = common::disendiff(&["demo", "--steps", "2", "--num-images", "1", "--sample-steps", "2", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for f in ["report.md", "scene.png", "attention.png", "prompt-01.png", "run/concepts.safetensors"] {
        assert!(out.join(f).is_file(), "demo did not write {f}");
    }
}
