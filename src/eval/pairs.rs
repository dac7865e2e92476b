//! The inputs of the CLIP metrics: a pairs file (`[{"image": path relative to the file,
//! "prompt": text}, ...]`) and a folder of reference images.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One scored image and the prompt it was generated from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    /// As written in the file (relative to the file's folder, or absolute).
    pub image: String,
    pub prompt: String,
}

impl Pair {
    /// The image's path, resolved against the pairs file's folder.
    pub fn path(&self, pairs_file: &Path) -> PathBuf {
        pairs_file.parent().unwrap_or(Path::new(".")).join(&self.image)
    }
}

/// Reads a pairs file; it must list at least one pair.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    if !path.is_file() {
        bail!("pairs file {} does not exist", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let pairs: Vec<Pair> = serde_json::from_value(v).with_context(|| {
        format!("{}: expected a list of {{\"image\": path, \"prompt\": text}} objects", path.display())
    })?;
    if pairs.is_empty() {
        bail!("{} lists no pairs", path.display());
    }
    Ok(pairs)
}

/// The image files (PNG, JPEG) of a folder, sorted by name; at least one.
pub fn reference_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading the references folder {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("the references folder {} holds no PNG or JPEG image", dir.display());
    }
    Ok(files)
}
