//! Smoke tests of the toy-world commands on the bundled toy model (the full runs are by hand;
//! their results are in the README): `disendiff demo`, a reduced `disendiff toy bench`, and a
//! reduced three-concept bench (`--concepts-per-scene 3`).

mod common;



#[test]
fn reduced_toy_bench_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench");
    let (ok, err) = common::disendiff(&[
        "toy", "bench", "--scenes", "1", "--steps", "2", "--num-images", "1", "--sample-steps", "2",
        "--methods", "disendiff,custom-diffusion,textual-inversion,dreambooth,base,disendiff/no-ss",
        "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for method in ["disendiff", "custom-diffusion", "textual-inversion", "dreambooth", "base", "disendiff/no-ss"] {
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

    // A rerun into the same OUT resumes: finished runs (run.json) are not trained again, an
    // unfinished one is, and the report comes out the same (train time of the retrained run aside).
    let kept = out.join("scene-1/disendiff/concepts.safetensors");
    let kept_time = std::fs::metadata(&kept).unwrap().modified().unwrap();
    std::fs::remove_file(out.join("scene-1/custom-diffusion/run.json")).unwrap();
    let args = |n: &'static str| -> Vec<String> {
        ["toy", "bench", "--scenes", "1", "--steps", "2", "--num-images", n, "--sample-steps", "2", "--methods",
         "disendiff,custom-diffusion,textual-inversion,dreambooth,base,disendiff/no-ss", "--out", out.to_str().unwrap()]
            .iter().map(|s| s.to_string()).collect()
    };
    let (ok, err) = common::disendiff(&args("1").iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(std::fs::metadata(&kept).unwrap().modified().unwrap(), kept_time, "a finished run was trained again");
    assert!(out.join("scene-1/custom-diffusion/run.json").is_file(), "the unfinished run was not redone");
    let mut again: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let mut first = report.clone();
    for r in [&mut first, &mut again] {
        r["methods"]["custom-diffusion"]["train_seconds"] = serde_json::Value::Null;
    }
    assert_eq!(first, again, "the resumed bench's report differs");
    // other settings into the same OUT are refused, naming the run
    let (ok, err) = common::disendiff(&args("2").iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("other settings") && err.contains("scene-1"), "{err}");
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

/// Three concepts end to end: a three-object scene is trained on (all three modifier tokens in
/// the caption), its four prompt sets are generated and scored, the attention columns are over
/// three concepts (L_bind up to 3, L_s&s a mean of pairwise IoUs), and rescoring the kept
/// images reads the three sets back.
#[test]
fn reduced_three_concept_bench() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench3");
    let (ok, err) = common::disendiff(&[
        "toy", "bench", "--scenes", "1", "--concepts-per-scene", "3", "--steps", "2", "--num-images", "1",
        "--sample-steps", "2", "--methods", "disendiff", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["settings"]["concepts_per_scene"], 3);
    let m = &report["methods"]["disendiff"];
    for key in ["combined", "concept1", "concept2", "concept3", "mean"] {
        let f = m["fidelity"][key].as_f64().unwrap_or_else(|| panic!("no fidelity.{key}"));
        assert!((0.0..=1.0).contains(&f), "fidelity.{key} = {f}");
    }
    let l_bind = m["attention"]["l_bind"].as_f64().unwrap();
    let l_ss = m["attention"]["l_ss"].as_f64().unwrap();
    assert!((0.0..=3.0).contains(&l_bind) && (0.0..=1.0).contains(&l_ss), "l_bind {l_bind}, l_ss {l_ss}");
    let log = std::fs::read_to_string(out.join("scene-1/disendiff/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
    for set in ["combined", "concept1", "concept2", "concept3"] {
        assert!(out.join(format!("scene-1/disendiff/images/{set}-0-0.png")).is_file(), "no {set} image");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| Concept3 |") && md.contains("of 3 concepts"), "{md}");
    let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert!(table.len() >= 3 && table.iter().all(|l| l.matches('|').count() == table[0].matches('|').count()), "ragged table: {table:?}");
    let (ok, err) = common::disendiff(&["toy", "rescore", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let per_scene = std::fs::read_to_string(out.join("per-scene.md")).unwrap();
    let row = per_scene.lines().find(|l| l.starts_with("| 1 | disendiff |")).expect("a row for scene 1");
    let cols: Vec<&str> = row.split('|').map(str::trim).collect();
    let fidelity: f64 = cols[3].parse().unwrap();
    assert!((fidelity - m["fidelity"]["mean"].as_f64().unwrap()).abs() < 1e-3, "{row}");
    assert_eq!(cols[9], "12", "rescore did not read the 4 sets x 3 prompts x 1 image: {row}");
}
