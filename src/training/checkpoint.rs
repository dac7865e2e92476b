//! Training checkpoints, `OUT/checkpoints/step-NNNNNN.safetensors`, and what keeps them usable
//! when a run dies: a kill, a power cut, a full disk or a damaged file.
//!
//! A checkpoint holds the trained tensors (`param.<name>`), the AdamW state (`adam.m.<name>`,
//! `adam.v.<name>`) and the metadata `step` and `config` (the run's settings as JSON). It is
//! written atomically and durably ([`util::write_atomic`]) and the folder pruned to the newest
//! N (diffusers' `checkpoints_total_limit`) only after the new one is on disk. `latest` reads the
//! newest checkpoint that can be read, saying on stderr which newer ones it skipped and why; an
//! explicit path is read exactly, with no fallback. The JSON-lines training log is trimmed to the
//! steps of the checkpoint a run resumes from, so a resumed run logs each step once, as an
//! uninterrupted run does.

use crate::util;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which checkpoint a run resumes from (`--resume-from-checkpoint latest|PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest readable checkpoint of `OUT/checkpoints` (none: start at step 0).
    Latest,
    /// Exactly this file: a path, or the name of a file in `OUT/checkpoints`.
    Path(PathBuf),
}

impl ResumeFrom {
    pub fn parse(s: &str) -> Self {
        if s == "latest" {
            Self::Latest
        } else {
            Self::Path(PathBuf::from(s))
        }
    }
}

/// A checkpoint read back, its tensors on the requested device.
pub struct Checkpoint {
    pub path: PathBuf,
    pub step: usize,
    /// The settings of the run that wrote it ([`TrainConfig::to_json`](super::trainer::TrainConfig::to_json)).
    pub config: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

/// `OUT/checkpoints`.
pub fn folder(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// `OUT/checkpoints/step-NNNNNN.safetensors`.
pub fn path_of(out: &Path, step: usize) -> PathBuf {
    folder(out).join(format!("step-{step:06}.safetensors"))
}

/// The step of a checkpoint file name `step-NNNNNN.safetensors` (temporary files, which start
/// with a dot, and other names are not checkpoints).
fn step_of(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("step-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checkpoints of `OUT/checkpoints`, oldest first (none when the folder does not exist).
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = folder(out);
    let entries = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("listing {} failed: {e}", dir.display()),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(step) = entry.file_name().to_str().and_then(step_of) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// What to tell a user whose run stopped on a write error: where to resume from.
pub fn resume_hint(out: &Path) -> String {
    match list(out).ok().and_then(|l| l.last().cloned()) {
        Some((_, path)) => format!("the last good checkpoint is {}: free space and rerun with --resume", path.display()),
        None => "no checkpoint was written yet: free space and rerun".to_string(),
    }
}

/// Writes the checkpoint of `step` (atomically), then deletes the oldest ones beyond the newest
/// `keep`. A failed write names the file and the checkpoint to resume from; the checkpoints
/// already on disk are untouched by it.
pub fn write(out: &Path, step: usize, tensors: &HashMap<String, Tensor>, config: &serde_json::Value, keep: Option<usize>) -> Result<PathBuf> {
    let path = path_of(out, step);
    let dir = folder(out);
    std::fs::create_dir_all(&dir).map_err(|e| anyhow!("creating {} failed: {e}; {}", dir.display(), resume_hint(out)))?;
    let mut info = HashMap::new();
    info.insert("step".to_string(), step.to_string());
    info.insert("config".to_string(), config.to_string());
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(info))
        .with_context(|| format!("serialising the checkpoint {}", path.display()))?;
    util::write_atomic(&path, &bytes).map_err(|e| anyhow!("{e}; {}", resume_hint(out)))?;
    if let Some(keep) = keep {
        let all = list(out)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_file(old).with_context(|| format!("removing the old checkpoint {} (--checkpoints-total-limit {keep})", old.display()))?;
        }
    }
    Ok(path)
}

/// Reads a checkpoint that must hold every tensor of `expected` (name, shape) and the metadata.
pub fn read(path: &Path, expected: &[(String, Vec<usize>)], device: &Device) -> Result<Checkpoint> {
    parse(path, expected, device).with_context(|| format!("{} is not a usable checkpoint", path.display()))
}

fn parse(path: &Path, expected: &[(String, Vec<usize>)], device: &Device) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("reading it failed: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("not a readable safetensors file (truncated or corrupt?): {e}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let info = header.metadata().clone().context("it has no metadata")?;
    let step: usize = info.get("step").context("its metadata has no step")?.parse().context("its metadata `step` is not a number")?;
    let config = serde_json::from_str(info.get("config").context("its metadata has no config")?).context("its metadata `config` is not JSON")?;
    for (name, shape) in expected {
        let view = st.tensor(name).map_err(|_| anyhow!("it has no tensor {name}"))?;
        if view.shape() != shape.as_slice() {
            bail!("its tensor {name} has shape {:?}, the model's {shape:?}", view.shape());
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    Ok(Checkpoint { path: path.to_path_buf(), step, config, tensors })
}

/// The newest checkpoint of `OUT/checkpoints` that can be read; every newer one that cannot is
/// named on stderr with the reason and skipped. `None` when there is none to read.
pub fn read_latest(out: &Path, expected: &[(String, Vec<usize>)], device: &Device) -> Result<Option<Checkpoint>> {
    let all = list(out)?;
    let mut skipped = false;
    for (_, path) in all.iter().rev() {
        match parse(path, expected, device) {
            Ok(c) => {
                if skipped {
                    eprintln!("resuming from the older checkpoint {}", path.display());
                }
                return Ok(Some(c));
            }
            Err(e) => {
                eprintln!("warning: checkpoint {} cannot be used ({e:#}): falling back to the one before", path.display());
                skipped = true;
            }
        }
    }
    if skipped {
        eprintln!("warning: no checkpoint in {} can be used: starting at step 0", folder(out).display());
    }
    Ok(None)
}

/// The file `--resume-from-checkpoint PATH` names: PATH itself, or a file of `OUT/checkpoints`
/// (diffusers names checkpoints relative to the output folder).
pub fn resolve(out: &Path, path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_absolute() {
        bail!("the checkpoint {} does not exist", path.display());
    }
    let inside = folder(out).join(path);
    if inside.is_file() {
        return Ok(inside);
    }
    bail!("the checkpoint {} does not exist (nor {})", path.display(), inside.display())
}

/// Keeps the lines of the JSON-lines log at `path` whose `step` is at most `step` (and drops a
/// line torn by a kill), so that a run resumed at `step` appends its steps after them.
pub fn trim_log(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("reading {} failed: {e}", path.display()),
    };
    let keep = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step as u64)
    };
    let kept: String = text.lines().filter(|l| keep(l)).map(|l| format!("{l}\n")).collect();
    if kept != text {
        util::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_step_files_are_checkpoints() {
        assert_eq!(step_of("step-000012.safetensors"), Some(12));
        assert_eq!(step_of(".step-000012.safetensors.tmp77"), None);
        assert_eq!(step_of("step-.safetensors"), None);
        assert_eq!(step_of("step-00001a.safetensors"), None);
        assert_eq!(step_of("concepts.safetensors"), None);
    }

    #[test]
    fn trim_log_keeps_steps_up_to_the_checkpoint_and_drops_torn_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("train_log.jsonl");
        std::fs::write(&log, "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n{\"step\":3,\"loss\":0.3}\n{\"step\":4,\"lo").unwrap();
        trim_log(&log, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n");
        trim_log(&log, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
        trim_log(&tmp.path().join("none.jsonl"), 3).unwrap();
        assert!(!tmp.path().join("none.jsonl").exists());
    }

    #[test]
    fn write_prunes_to_the_newest_and_read_checks_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let tensors = HashMap::from([("param.w".to_string(), t)]);
        let config = serde_json::json!({"seed": 1});
        for step in 1..=4 {
            write(tmp.path(), step, &tensors, &config, Some(2)).unwrap();
        }
        let steps: Vec<usize> = list(tmp.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![3, 4]);
        let good = vec![("param.w".to_string(), vec![2, 3])];
        let c = read(&path_of(tmp.path(), 4), &good, &Device::Cpu).unwrap();
        assert_eq!((c.step, c.config), (4, config));
        let missing = vec![("param.v".to_string(), vec![2, 3])];
        let e = format!("{:#}", read(&path_of(tmp.path(), 4), &missing, &Device::Cpu).err().unwrap());
        assert!(e.contains("step-000004.safetensors") && e.contains("no tensor param.v"), "{e}");
        let shape = vec![("param.w".to_string(), vec![3, 2])];
        let e = format!("{:#}", read(&path_of(tmp.path(), 4), &shape, &Device::Cpu).err().unwrap());
        assert!(e.contains("shape [2, 3]"), "{e}");
    }
}
