//! `disendiff train` end to end on the tiny fixture model: what it writes, resumption that
//! matches an uninterrupted run, concept files on the right and the wrong base model, and
//! clear errors (with nothing written) for bad input; `--lora` merged into the base that is
//! trained on, and generating with the same `--lora` reproducing the trained K/V.

mod common;

use std::path::Path;


fn model() -> String {
    common::fixture("sd1-tiny").to_str().unwrap().to_string()
}

fn image() -> String {
    common::fixture("golden/sd1-pipe-00000.png").to_str().unwrap().to_string()
}

/// A small, fast run: 64 px, batch 1, one micro-batch per step, 8x8 attention maps.
fn train(out: &Path, extra: &[&str]) -> (bool, String) {
    let m = model();
    let img = image();
    let mut args = vec![
        "train", "--model", &m, "--image", &img, "--caption", "<new1> cat and <new2> dog",
        "--out", out.to_str().unwrap(), "--resolution", "64", "--attn-resolution", "8",
        "--train-batch-size", "1", "--gradient-accumulation-steps", "1",
    ];
    args.extend_from_slice(extra);
    common::disendiff(&args)
}

fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn trains_kv_and_embeddings_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let (ok, err) = train(&a, &["--max-train-steps", "3", "--checkpointing-steps", "2"]);
    assert!(ok, "{err}");
    let concepts = a.join("concepts.safetensors");
    let t = tensors(&concepts);
    // 11 cross-attention layers x (to_k, to_v) + two embeddings, nothing else.
    assert_eq!(t.len(), 24);
    assert!(t.keys().all(|k| k.ends_with("attn2.to_k.weight") || k.ends_with("attn2.to_v.weight") || k.starts_with("<new")));
    assert_eq!(t["<new1>"].dims(), &[32]);
    let log = std::fs::read_to_string(a.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    assert!(a.join("checkpoints/step-000002.safetensors").is_file());

    // The weights moved away from the base model.
    let base = candle_core::safetensors::load(common::fixture("sd1-tiny/unet/diffusion_pytorch_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    assert!(max_abs_diff(&t[k], &base[k]) > 0.0);

    // A run "killed" after its step-2 checkpoint and resumed ends exactly where `a` ended.
    let b = tmp.path().join("b");
    std::fs::create_dir_all(b.join("checkpoints")).unwrap();
    std::fs::copy(a.join("checkpoints/step-000002.safetensors"), b.join("checkpoints/step-000002.safetensors")).unwrap();
    let (ok, err) = train(&b, &["--max-train-steps", "3", "--checkpointing-steps", "2", "--resume"]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 2"), "{err}");
    let tb = tensors(&b.join("concepts.safetensors"));
    for (name, ta) in &t {
        assert_eq!(max_abs_diff(ta, &tb[name]), 0.0, "{name} differs after resume");
    }

    // Generation with the concept file, and the attention maps of the caption.
    let out = tmp.path().join("gen");
    let (ok, err) = common::disendiff(&[
        "generate", "--model", &model(), "--concepts", concepts.to_str().unwrap(),
        "--prompt", "a <new1> cat on a beach", "--steps", "2", "--height", "64", "--width", "64",
        "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.join("00000.png").is_file());
    let att = tmp.path().join("att");
    let (ok, err) = common::disendiff(&[
        "attention", "--model", &model(), "--concepts", concepts.to_str().unwrap(),
        "--prompt", "photo of a <new1> cat and <new2> dog", "--steps", "2", "--resolution", "16",
        "--out", att.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for f in ["image.png", "overview.png", "index.html", "04__new1_.png", "05_cat.png"] {
        assert!(att.join(f).is_file(), "attention output lacks {f}");
    }

    // The same file on a model with other weights is refused, naming the model it was made for.
    let other = tmp.path().join("other");
    common::copy_dir(&common::fixture("sd1-tiny"), &other);
    let unet = other.join("unet/diffusion_pytorch_model.safetensors");
    let mut w = tensors(&unet);
    let v = (&w[k] * 1.5).unwrap();
    w.insert(k.to_string(), v);
    candle_core::safetensors::save(&w, &unet).unwrap();
    let (ok, err) = common::disendiff(&[
        "generate", "--model", other.to_str().unwrap(), "--concepts", concepts.to_str().unwrap(),
        "--prompt", "a <new1> cat", "--steps", "1", "--out", tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("was trained on the base model") && err.contains("sd1-tiny"), "{err}");
}

/// `--gradient-checkpointing` trains to the same weights (its gradients equal the plain ones to
/// rounding: tests/train_step_parity.rs); DreamBooth, which trains the checkpointed blocks'
/// weights, is refused before anything is written.
#[test]
fn gradient_checkpointing_trains_as_without() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, ckpt) = (tmp.path().join("plain"), tmp.path().join("ckpt"));
    let (ok, err) = train(&plain, &["--max-train-steps", "2"]);
    assert!(ok, "{err}");
    let (ok, err) = train(&ckpt, &["--max-train-steps", "2", "--gradient-checkpointing"]);
    assert!(ok, "{err}");
    let base = tensors(&common::fixture("sd1-tiny/unet/diffusion_pytorch_model.safetensors"));
    let (a, b) = (tensors(&plain.join("concepts.safetensors")), tensors(&ckpt.join("concepts.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        if let Some(w0) = base.get(name) {
            // what training changed, with and without checkpointing
            let (da, db) = ((ta - w0).unwrap(), (&b[name] - w0).unwrap());
            let err = common::rel_err(&db, &da);
            assert!(err <= 1e-3, "{name}: the checkpointed run's update differs, rel err {err}");
        }
    }
    let db = tmp.path().join("db");
    let (ok, err) = train(&db, &["--method", "dreambooth", "--max-train-steps", "1", "--gradient-checkpointing"]);
    assert!(!ok && err.contains("--gradient-checkpointing") && err.contains("dreambooth"), "{err}");
    assert!(!db.exists(), "a refused run wrote {}", db.display());
}

#[test]
fn textual_inversion_trains_embeddings_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = train(tmp.path(), &["--method", "textual-inversion", "--max-train-steps", "1"]);
    assert!(ok, "{err}");
    let t = tensors(&tmp.path().join("concepts.safetensors"));
    let mut keys: Vec<_> = t.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, vec!["<new1>", "<new2>"]);
    // Initialised from the class words as a prompt tokenizes them (`cat</w>`, id 2368 in the
    // real CLIP vocabulary), not from the word-start piece `cat`.
    let bytes = std::fs::read(tmp.path().join("concepts.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let concepts: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["concepts"]).unwrap();
    assert_eq!(concepts[0]["initializer"], "cat</w>");
    assert_eq!(concepts[1]["initializer"], "dog</w>");
    let sd = disendiff::model::sd::StableDiffusion::load(&common::fixture("sd1-tiny"), &Default::default()).unwrap();
    let prompt_id = sd.tokenizer.encode("cat").ids[1];
    assert_eq!(disendiff::training::model::initializer_id(&sd, "cat</w>").unwrap(), prompt_id);
    assert_eq!(prompt_id, 2368);
}


#[test]
fn bad_input_is_refused_with_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let not_image = tmp.path().join("photo.png");
    std::fs::write(&not_image, b"this is not a png").unwrap();
    let m = model();
    let img = image();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--image", not_image.to_str().unwrap(), "--caption", "<new1> cat"], "not a readable image"),
        (vec!["--image", "/nonexistent/cat.jpg", "--caption", "<new1> cat"], "does not exist"),
        (vec!["--image", &img, "--caption", "a cat and a dog"], "no modifier tokens"),
        (vec!["--image", &img, "--caption", "a cat and <new1>"], "must be followed by its class word"),
        (vec!["--image", &img, "--caption", "cat dog", "--modifier-tokens", "cat"], "already in the vocabulary"),
        (vec!["--image", &img, "--caption", "<new1> cat and <new2> dog", "--initializer-tokens", "pll"], "initialiser"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["train", "--model", &m, "--out", out.to_str().unwrap()];
        args.extend_from_slice(&extra);
        let (ok, err) = common::disendiff(&args);
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(want), "{extra:?}: expected {want:?} in:\n{err}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
}

#[test]
fn three_concepts_and_generated_class_images() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model();
    let img = image();
    let out = tmp.path().join("out");
    let (ok, err) = common::disendiff(&[
        "train", "--model", &m, "--image", &img, "--caption", "<new1> cat, <new2> dog and <new3> cow",
        "--out", out.to_str().unwrap(), "--resolution", "64", "--attn-resolution", "8",
        "--train-batch-size", "2", "--gradient-accumulation-steps", "1", "--max-train-steps", "1",
        "--num-class-images", "2", "--class-prompt", "a cat, a dog and a cow",
    ]);
    assert!(ok, "{err}");
    let t = tensors(&out.join("concepts.safetensors"));
    for tok in ["<new1>", "<new2>", "<new3>"] {
        assert!(t.contains_key(tok), "no embedding for {tok}");
    }
    for f in ["00000.png", "00000.txt", "00001.png"] {
        assert!(out.join("class_images").join(f).is_file(), "class image {f} missing");
    }
    let caption = std::fs::read_to_string(out.join("class_images/00001.txt")).unwrap();
    assert_eq!(caption, "a cat, a dog and a cow");

    // With a batch of one there is no room for them: an error, not a silently unused set.
    let (ok, err) = common::disendiff(&[
        "train", "--model", &m, "--image", &img, "--caption", "<new1> cat and <new2> dog",
        "--out", tmp.path().join("b1").to_str().unwrap(), "--resolution", "64", "--train-batch-size", "1",
        "--max-train-steps", "1", "--class-data-dir", out.join("class_images").to_str().unwrap(),
        "--num-class-images", "2", "--class-prompt", "a cat, a dog and a cow",
    ]);
    assert!(!ok && err.contains("--train-batch-size 2"), "{err}");
}

/// diffusers' `train_custom_diffusion.py` spellings work, and `--help` shows the new names.
#[test]
fn diffusers_spellings_and_help() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (m, img) = (model(), image());
    let (ok, err) = common::disendiff(&[
        "train", "--pretrained_model_name_or_path", &m, "--instance_data_dir", &img,
        "--instance_prompt", "<new1> cat and <new2> dog", "--output_dir", out.to_str().unwrap(),
        "--modifier_token", "<new1>+<new2>", "--initializer_token", "pll+ktn", "--noaug",
        "--max_train_steps", "1", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--resolution", "64", "--attn_resolution", "8", "--learning_rate", "1e-5", "--scale_lr",
        "--ss_weight", "0.001",
    ]);
    assert!(ok, "{err}");
    let (_, header) = {
        let bytes = std::fs::read(out.join("concepts.safetensors")).unwrap();
        let (n, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        (n, h)
    };
    let hp: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["hyperparameters"]).unwrap();
    assert_eq!(hp["ss_weight"], 0.001);
    assert_eq!(hp["bind_weight"], 0.01);
    assert_eq!(hp["augment"], false);
    assert!((hp["learning_rate"].as_f64().unwrap() - 1e-5).abs() < 1e-12, "{hp}");

    for (cmd, flags) in [
        ("generate", &["--num-inference-steps", "--output-dir", "--concepts-base", "--seed <SEED>"][..]),
        ("train", &["--max-train-steps", "--bind-weight", "--ss-weight", "--method <METHOD>"][..]),
        ("demo", &["--max-train-steps", "--num-inference-steps"][..]),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff")).args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        for f in flags {
            assert!(help.contains(f), "`{cmd} --help` lacks {f}:\n{help}");
        }
    }
    // A loss weight for a method without attention losses is an error naming the flag.
    let (ok, err) = train(&tmp.path().join("cd"), &["--method", "custom-diffusion", "--bind-weight", "0.1"]);
    assert!(!ok && err.contains("--bind-weight"), "{err}");
}

/// `train --lora FILE:SCALE` trains on the base with the LoRA merged (a fixed part of it): the
/// concept file records the fingerprint of the merged K/V (computed here from
/// `PatchedModel::load_with_loras`, independently of training), its K/V start from the merged
/// ones, and applying it where the same LoRA is merged sets exactly its trained K/V; on the
/// plain base it is another model (`generate` without the --lora refuses it, naming
/// --concepts-base).
#[test]
fn train_with_lora_bakes_it_into_the_base() {
    use disendiff::formats::concept_file;
    use disendiff::model::sd::LoadOptions;
    use disendiff::patch::{LoraSpec, PatchedModel, TrainedBase};
    let tmp = tempfile::tempdir().unwrap();
    let lora = common::fixture("golden/lora-kohya.safetensors");
    let lora_arg = format!("{}:0.7", lora.display());
    let out = tmp.path().join("run");
    let (ok, err) = train(&out, &["--max-train-steps", "2", "--checkpointing-steps", "0", "--lora", &lora_arg]);
    assert!(ok, "{err}");
    assert!(err.contains("merged into the base"), "{err}");
    let file = out.join("concepts.safetensors");
    let cf = concept_file::load(&file).unwrap();

    let spec = LoraSpec { path: lora.clone(), scale: 0.7 };
    let (mut merged, _) = PatchedModel::load_with_loras(&common::fixture("sd1-tiny"), &LoadOptions::default(), &[spec], false).unwrap();
    let plain = tensors(&common::fixture("sd1-tiny/unet/diffusion_pytorch_model.safetensors"));
    let mut merged_kv = Vec::new();
    for name in cf.unet_weights.keys() {
        let v = merged.sd.unet_weight_var(name).unwrap().as_tensor().copy().unwrap();
        merged_kv.push((name.clone(), v));
    }
    let table = merged.sd.text_encoder.token_embedding().dims2().unwrap();
    assert_eq!(cf.meta.base_model.fingerprint, concept_file::fingerprint(&merged_kv, table).unwrap(), "not the fingerprint of the merged base");
    let plain_kv: Vec<_> = cf.unet_weights.keys().map(|n| (n.clone(), plain[n].clone())).collect();
    assert_ne!(cf.meta.base_model.fingerprint, concept_file::fingerprint(&plain_kv, table).unwrap());
    // Training started from the merged K/V: after 2 small steps the weights the LoRA changes
    // are far nearer the merged values than the plain ones.
    let k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let merged_k = &merged_kv.iter().find(|(n, _)| n == k).unwrap().1;
    let (to_merged, to_plain) = (max_abs_diff(&cf.unet_weights[k], merged_k), max_abs_diff(&cf.unet_weights[k], &plain[k]));
    println!("{k}: trained - merged {to_merged:.2e}, trained - plain {to_plain:.2e}");
    assert!(to_merged * 10.0 < to_plain, "trained {k} is not near the merged base ({to_merged} vs {to_plain})");

    // The same LoRA at generation: exactly the trained K/V.
    merged.add_concepts(&file, TrainedBase::Refuse).unwrap();
    for (name, t) in &cf.unet_weights {
        let got = merged.sd.unet_weight_var(name).unwrap().as_tensor().copy().unwrap();
        assert_eq!(max_abs_diff(&got, t), 0.0, "{name} is not the trained weight");
    }

    let gen = |extra: &[&str], dir: &str| {
        let o = tmp.path().join(dir);
        let mut args = vec!["generate", "--model", &*model().leak(), "--concepts", file.to_str().unwrap(), "--prompt", "a <new1> cat",
            "--steps", "1", "--height", "64", "--width", "64", "--out", o.to_str().unwrap()];
        args.extend_from_slice(extra);
        let r = common::disendiff(&args);
        (r, o.join("00000.png").is_file())
    };
    let ((ok, err), wrote) = gen(&["--lora", &lora_arg], "with");
    assert!(ok && wrote, "{err}");
    let ((ok, err), wrote) = gen(&[], "without");
    assert!(!ok && !wrote && err.contains("--concepts-base"), "{err}");
}
