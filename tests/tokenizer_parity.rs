//! The CLIP tokenizer against transformers' `CLIPTokenizer` (golden/tokenizer.json, made by
//! tools/reference/make_sd_fixtures.py) and the ids known from docs/candle.md §6.

mod common;

use disendiff::model::tokenizer::ClipTokenizer;

fn tokenizer(pad: &str) -> ClipTokenizer {
    let folder = if pad == "!" { "sd2-tiny/tokenizer" } else { "sd1-tiny/tokenizer" };
    ClipTokenizer::from_dir(&common::fixture(folder)).expect("tokenizer folder")
}

#[test]
fn matches_transformers_on_every_golden_case() {
    let text = std::fs::read_to_string(common::fixture("golden/tokenizer.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 15, "too few golden cases");
    let mut failures = Vec::new();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let pad = case["pad_token"].as_str().unwrap();
        let mut tok = tokenizer(pad);
        for added in case["added_tokens"].as_array().into_iter().flatten() {
            tok.add_token(added.as_str().unwrap()).unwrap();
        }
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(prompt).ids;
        if got != want {
            failures.push(format!("{prompt:?} (pad {pad}):\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn known_ids_and_added_tokens() {
    let mut tok = tokenizer("<|endoftext|>");
    let ids = tok.encode("a photo of a cat").ids;
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&i| i == 49407));
    assert_eq!(tok.encode("sks").ids[1], 48136);
    assert_eq!(tok.add_token("<new1>").unwrap(), 49408);
    assert_eq!(tok.add_token("<new2>").unwrap(), 49409);
    let ids = tok.encode("A  photo of a <new1> dog, 2 cats!").ids;
    assert_eq!(&ids[..12], &[49406, 320, 1125, 539, 320, 49408, 1929, 267, 273, 3989, 256, 49407]);
    // Tokens already in the vocabulary are refused, as are duplicates.
    assert!(tok.add_token("cat</w>").is_err());
    assert!(tok.add_token("<new1>").is_err());
}

#[test]
fn long_prompts_are_truncated_to_77_with_end_token() {
    let tok = tokenizer("!");
    let long = "red ".repeat(100);
    let e = tok.encode(&long);
    assert_eq!(e.ids.len(), 77);
    assert_eq!(e.ids[76], 49407);
    assert!(!e.truncated.is_empty());
    let short = tok.encode("a cat");
    assert_eq!(short.ids[4], 0, "SD2 pads with '!' (id 0)");
}

/// The same golden cases through a `tokenizer.json`-only folder (as some SD repositories and
/// transformers 5 ship), built here from the fixture's vocab.json + merges.txt.
#[test]
fn tokenizer_json_folder_gives_the_same_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::fixture("sd2-tiny/tokenizer");
    let vocab: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<String> = std::fs::read_to_string(src.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let json = serde_json::json!({
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        "added_tokens": [{"id": 49406, "content": "<|startoftext|>"}, {"id": 49407, "content": "<|endoftext|>"}],
    });
    std::fs::write(tmp.path().join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer_config.json"), tmp.path().join("tokenizer_config.json")).unwrap();
    std::fs::copy(src.join("special_tokens_map.json"), tmp.path().join("special_tokens_map.json")).unwrap();
    let from_json = ClipTokenizer::from_dir(tmp.path()).unwrap();
    let text = std::fs::read_to_string(common::fixture("golden/tokenizer.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut n = 0;
    for case in cases.iter().filter(|c| c["pad_token"] == "!" && c["added_tokens"].as_array().is_none_or(|a| a.is_empty())) {
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(from_json.encode(case["prompt"].as_str().unwrap()).ids, want, "{}", case["prompt"]);
        n += 1;
    }
    assert!(n >= 10, "only {n} cases");
}
