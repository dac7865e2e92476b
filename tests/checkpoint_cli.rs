//! Checkpoints that survive more than a kill, end to end on the tiny fixture model: a damaged
//! newest checkpoint is skipped for the one before, `--checkpoints-total-limit` keeps the newest,
//! a write that fails for lack of space (a file-size limit) stops training naming the file and
//! leaves every file readable, and every resumed run ends bit for bit where the uninterrupted
//! run ends, with the same log.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Runs `disendiff train` on the small, fast setting of tests/train_cli.rs (64 px, batch 1, one
/// micro-batch per step, 8x8 attention maps), under a file-size limit in KiB when given;
/// returns (success, stderr) and fails on a panic.
fn train_limited(out: &Path, extra: &[&str], fsize_kib: Option<u64>) -> (bool, String) {
    let m = common::fixture("sd1-tiny").to_str().unwrap().to_string();
    let img = common::fixture("golden/sd1-pipe-00000.png").to_str().unwrap().to_string();
    let mut args = vec![
        "train", "--model", &m, "--image", &img, "--caption", "<new1> cat and <new2> dog",
        "--out", out.to_str().unwrap(), "--resolution", "64", "--attn-resolution", "8",
        "--train-batch-size", "1", "--gradient-accumulation-steps", "1",
    ];
    args.extend_from_slice(extra);
    let bin = env!("CARGO_BIN_EXE_disendiff");
    let mut cmd = match fsize_kib {
        None => std::process::Command::new(bin),
        Some(kib) => {
            // bash's `ulimit -f` counts 1024-byte blocks.
            let mut c = std::process::Command::new("bash");
            c.arg("-c").arg(format!("ulimit -f {kib} && exec \"$0\" \"$@\"")).arg(bin);
            c
        }
    };
    let output = cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args(&args).output().expect("run disendiff");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!stderr.contains("panicked"), "disendiff panicked:\n{stderr}");
    (output.status.success(), stderr)
}

fn train(out: &Path, extra: &[&str]) -> (bool, String) {
    train_limited(out, extra, None)
}

/// The uninterrupted reference: 4 steps with a checkpoint after steps 1, 2 and 3.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoint_cli_reference");
        let _ = std::fs::remove_dir_all(&dir);
        let (ok, err) = train(&dir, &["--max-train-steps", "4", "--checkpointing-steps", "1"]);
        assert!(ok, "{err}");
        assert_eq!(steps_of(&dir), vec![1, 2, 3]);
        assert_eq!(log_steps(&dir), vec![1, 2, 3, 4]);
        dir
    })
}

fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The concept file of `out` holds exactly the reference's tensors, bit for bit.
fn assert_same_concepts(out: &Path) {
    let want = tensors(&reference().join("concepts.safetensors"));
    let got = tensors(&out.join("concepts.safetensors"));
    let mut names: Vec<_> = want.keys().collect();
    names.sort();
    let mut got_names: Vec<_> = got.keys().collect();
    got_names.sort();
    assert_eq!(names, got_names);
    for name in names {
        let bits = |t: &candle_core::Tensor| -> Vec<u32> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
        };
        assert_eq!(bits(&want[name]), bits(&got[name]), "{name} differs from the uninterrupted run");
    }
}

/// The steps of `OUT/checkpoints`, oldest first.
fn steps_of(out: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .map(|n| n.strip_prefix("step-").and_then(|n| n.strip_suffix(".safetensors")).unwrap_or_else(|| panic!("{n} in checkpoints/")).parse().unwrap())
        .collect();
    steps.sort();
    steps
}

/// The `step` of each line of `OUT/train_log.jsonl`.
fn log_steps(out: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

fn checkpoint(out: &Path, step: usize) -> PathBuf {
    out.join(format!("checkpoints/step-{step:06}.safetensors"))
}

/// Every file under `dir` is complete: no temporary files, every safetensors file parses with
/// its tensors, every log line is JSON.
fn assert_all_readable(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(!name.starts_with('.') && !name.contains(".tmp"), "temporary file left: {}", path.display());
        if path.is_dir() {
            assert_all_readable(&path);
        } else if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!st.names().is_empty(), "{} holds no tensors", path.display());
        } else if name.ends_with(".jsonl") {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{}: {line:?}: {e}", path.display()));
            }
        }
    }
}

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    // A run "killed" after step 3: checkpoints after steps 1 and 2, a log of 3 steps.
    let (ok, err) = train(&b, &["--max-train-steps", "3", "--checkpointing-steps", "1"]);
    assert!(ok, "{err}");
    assert_eq!(steps_of(&b), vec![1, 2]);
    assert_eq!(log_steps(&b), vec![1, 2, 3]);
    // The newest checkpoint is cut short, as a disk that lost its tail would leave it.
    let newest = checkpoint(&b, 2);
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(len / 2).unwrap();

    let (ok, err) = train(&b, &["--max-train-steps", "4", "--checkpointing-steps", "1", "--resume"]);
    assert!(ok, "{err}");
    assert!(err.contains(&format!("checkpoint {} cannot be used", newest.display())) && err.contains("falling back"), "{err}");
    assert!(err.contains(&format!("resuming from the older checkpoint {}", checkpoint(&b, 1).display())), "{err}");
    assert!(err.contains("resuming at step 1"), "{err}");
    assert_same_concepts(&b);
    // Steps 2 and 3 were trained again: the log holds each step once, as the uninterrupted log.
    assert_eq!(log_steps(&b), vec![1, 2, 3, 4]);
    assert_eq!(steps_of(&b), vec![1, 2, 3]);
    assert_all_readable(&b);
}

#[test]
fn checkpoints_total_limit_keeps_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let c = tmp.path().join("c");
    let (ok, err) = train(&c, &["--max-train-steps", "4", "--checkpointing-steps", "1", "--checkpoints_total_limit", "2"]);
    assert!(ok, "{err}");
    assert_eq!(steps_of(&c), vec![2, 3]);
    assert_same_concepts(&c);
    // The kept checkpoints are the reference's.
    for step in [2, 3] {
        let (want, got) = (tensors(&checkpoint(reference(), step)), tensors(&checkpoint(&c, step)));
        assert_eq!(want.len(), got.len());
        for (name, t) in &want {
            let d = (t - &got[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "step {step}: {name}");
        }
    }
    let (ok, err) = train(&tmp.path().join("zero"), &["--max-train-steps", "1", "--checkpoints-total-limit", "0"]);
    assert!(!ok && err.contains("--checkpoints-total-limit must be at least 1"), "{err}");
}

#[test]
fn full_disk_stops_training_naming_the_file_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    // A first run writes its checkpoint after step 1 (and the concept file after step 2).
    let (ok, err) = train(&d, &["--max-train-steps", "2", "--checkpointing-steps", "1"]);
    assert!(ok, "{err}");
    assert_eq!(steps_of(&d), vec![1]);
    // Continued to 4 steps on a "disk" with room for half a checkpoint: its step-2 checkpoint
    // cannot be written. Every checkpoint has the same size, so the limit is measured on one.
    let size = std::fs::metadata(checkpoint(reference(), 1)).unwrap().len();
    let concepts_size = std::fs::metadata(reference().join("concepts.safetensors")).unwrap().len();
    let limit_kib = size / 2 / 1024;
    // Room for the log (a few hundred bytes) but not for the checkpoint.
    assert!(limit_kib >= 8, "checkpoints of {size} bytes are too small for this test");
    let (ok, err) = train_limited(&d, &["--max-train-steps", "4", "--checkpointing-steps", "1", "--resume"], Some(limit_kib));
    assert!(!ok, "a write past the file-size limit was not reported:\n{err}");
    let failed = checkpoint(&d, 2);
    let want = format!(
        "writing {} failed: File too large (os error 27); the last good checkpoint is {}: free space and rerun with --resume",
        failed.display(),
        checkpoint(&d, 1).display()
    );
    assert!(err.contains(&want), "expected {want:?} in:\n{err}");
    assert!(err.contains("resuming at step 1"), "{err}");
    assert!(!failed.exists(), "a partial {} was left", failed.display());
    assert_eq!(steps_of(&d), vec![1]);
    assert_all_readable(&d);
    // The concept file of the first run is intact (no partial overwrite).
    assert_eq!(std::fs::metadata(d.join("concepts.safetensors")).unwrap().len(), concepts_size);

    // With space again, --resume ends exactly where the uninterrupted run ends.
    let (ok, err) = train(&d, &["--max-train-steps", "4", "--checkpointing-steps", "1", "--resume"]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 1"), "{err}");
    assert_same_concepts(&d);
    assert_eq!(log_steps(&d), vec![1, 2, 3, 4]);
    assert_all_readable(&d);
}

#[test]
fn resume_from_checkpoint_path_or_latest() {
    let tmp = tempfile::tempdir().unwrap();
    let e = tmp.path().join("e");
    let first = checkpoint(reference(), 1);
    // diffusers' spelling with a path: exactly that checkpoint, into another output folder.
    let (ok, err) = train(&e, &["--max-train-steps", "4", "--checkpointing-steps", "1", "--resume_from_checkpoint", first.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 1"), "{err}");
    assert_same_concepts(&e);
    assert_eq!(steps_of(&e), vec![2, 3]);
    assert_eq!(log_steps(&e), vec![2, 3, 4]);

    // `latest` is the newest checkpoint of OUT (step 3).
    let (ok, err) = train(&e, &["--max-train-steps", "4", "--checkpointing-steps", "1", "--resume-from-checkpoint", "latest"]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 3"), "{err}");
    assert_same_concepts(&e);
    assert_eq!(log_steps(&e), vec![2, 3, 4]);

    // A file name is looked up in OUT/checkpoints.
    let (ok, err) = train(&e, &["--max-train-steps", "4", "--checkpointing-steps", "1", "--resume_from_checkpoint", "step-000002.safetensors"]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 2"), "{err}");
    assert_same_concepts(&e);
    assert_eq!(log_steps(&e), vec![2, 3, 4]);

    // An unreadable PATH is an error naming it, with no fallback to another checkpoint.
    let bad = tmp.path().join("garbled.safetensors");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&bad, &bytes).unwrap();
    for (path, want) in [(bad.to_str().unwrap(), "is not a usable checkpoint"), ("/nonexistent/step-000001.safetensors", "does not exist")] {
        let (ok, err) = train(&e, &["--max-train-steps", "4", "--resume_from_checkpoint", path]);
        assert!(!ok, "{path} was accepted:\n{err}");
        assert!(err.contains(path) && err.contains(want), "{path}: expected {want:?} in:\n{err}");
        assert!(!err.contains("resuming at step"), "{err}");
    }
    // --resume and a checkpoint path together are refused; so is a fresh run over checkpoints.
    let (ok, err) = train(&e, &["--resume", "--resume-from-checkpoint", "latest"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    std::fs::remove_file(e.join("concepts.safetensors")).unwrap();
    let (ok, err) = train(&e, &["--max-train-steps", "4"]);
    assert!(!ok && err.contains("holds checkpoints of an earlier run"), "{err}");
    assert_eq!(log_steps(&e), vec![2, 3, 4]);
}

/// Ctrl-C (SIGINT) during training: the run finishes its step, writes a checkpoint, exits
/// non-zero saying how to resume, and the resumed run ends bit for bit where an uninterrupted
/// one does.
#[test]
fn ctrl_c_stops_with_a_checkpoint_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = ["--max-train-steps", "30", "--checkpointing-steps", "0"];
    let whole = tmp.path().join("whole");
    let (ok, err) = train(&whole, &steps);
    assert!(ok, "{err}");

    let cut = tmp.path().join("cut");
    let m = common::fixture("sd1-tiny").to_str().unwrap().to_string();
    let img = common::fixture("golden/sd1-pipe-00000.png").to_str().unwrap().to_string();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "train", "--model", &m, "--image", &img, "--caption", "<new1> cat and <new2> dog",
            "--out", cut.to_str().unwrap(), "--resolution", "64", "--attn-resolution", "8",
            "--train-batch-size", "1", "--gradient-accumulation-steps", "1",
        ])
        .args(steps)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = cut.join("train_log.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(true, |t| t.lines().count() == 0) {
        assert!(start.elapsed().as_secs() < 120, "training never logged a step");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the interrupted run exited 0:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("stopped after step") && err.contains("--resume"), "{err}");
    assert!(!cut.join("concepts.safetensors").exists(), "an interrupted run wrote its concept file");
    let stopped = log_steps(&cut).len();
    assert!(stopped < 30, "the run was not stopped early");
    assert_eq!(steps_of(&cut), vec![stopped], "the checkpoint of the step it stopped after");

    let (ok, err) = train(&cut, &[&steps[..], &["--resume"]].concat());
    assert!(ok, "{err}");
    let (a, b) = (tensors(&whole.join("concepts.safetensors")), tensors(&cut.join("concepts.safetensors")));
    for (name, t) in &a {
        let d = (t - &b[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{name} differs after the interrupted run resumed");
    }
    assert_eq!(log_steps(&cut), log_steps(&whole));
}

/// `--adam-state-dtype bf16`: the checkpoint keeps m and v in bf16, a run resumed from it ends
/// bit for bit where the uninterrupted bf16 run ends, the result differs from the f32 run's
/// (the state's rounding is real), and resuming with the other state dtype is refused.
#[test]
fn bf16_adam_state_is_checkpointed_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    let bf16 = ["--adam-state-dtype", "bf16", "--checkpointing-steps", "1"];
    let (ok, err) = train(&full, &[&bf16[..], &["--max-train-steps", "3"]].concat());
    assert!(ok, "{err}");
    let (ok, err) = train(&part, &[&bf16[..], &["--max-train-steps", "2"]].concat());
    assert!(ok, "{err}");
    let state = tensors(&checkpoint(&part, 1));
    let adam: Vec<_> = state.iter().filter(|(k, _)| k.starts_with("adam.")).collect();
    assert!(!adam.is_empty() && adam.iter().all(|(_, t)| t.dtype() == candle_core::DType::BF16), "AdamW state not kept in bf16");
    let (ok, err) = train(&part, &["--max-train-steps", "3", "--resume"]);
    assert!(!ok && err.contains("setting"), "resuming a bf16-state run with f32 state was not refused: {err}");
    let (ok, err) = train(&part, &[&bf16[..], &["--max-train-steps", "3", "--resume"]].concat());
    assert!(ok, "{err}");
    let (a, b) = (tensors(&full.join("concepts.safetensors")), tensors(&part.join("concepts.safetensors")));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let d = (t - &b[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k} differs after resume by {d}");
    }
    let f32_run = tmp.path().join("f32");
    let (ok, err) = train(&f32_run, &["--max-train-steps", "3"]);
    assert!(ok, "{err}");
    let c = tensors(&f32_run.join("concepts.safetensors"));
    let differs = a.iter().any(|(k, t)| (t - &c[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    assert!(differs, "bf16 state gave the f32 run's weights exactly: the flag did nothing");
}
