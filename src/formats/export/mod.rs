//! Exports of a concept file for other tools: diffusers' Custom Diffusion folder
//! ([`diffusers`]), a kohya-named network file with embedding files for AUTOMATIC1111,
//! ComfyUI, InvokeAI and kohya's scripts ([`webui`], the low-rank form by [`svd`]), and the
//! base model with the concepts merged as one CompVis single file ([`checkpoint`]).
//!
//! All need the concept file's K/V weights grouped per attention module; the webui file, the
//! list of every attention layer (which diffusers' loader wants) and the merged model need the
//! base model (a diffusers folder or a single file), whose weights are read here and checked
//! against the fingerprint the concept file records.

pub mod checkpoint;
pub mod diffusers;
pub mod svd;
pub mod webui;

use crate::formats::concept_file::{self, ConceptFile};
use crate::model::sd::{open_base_unet_f32, SingleFileOptions};
use crate::model::single_file::SingleFile;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The base model's UNet weights the concept file changes (by diffusers name, f32) and the
/// attention modules of its UNet (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`,
/// ...: every module with a `to_q.weight`), read from `path`.
pub struct Base {
    pub path: PathBuf,
    pub weights: BTreeMap<String, Tensor>,
    pub attention_modules: Vec<String>,
    /// The UNet config's layers per down block, one entry per block.
    pub layers_per_block: Vec<usize>,
    /// The opened file when the base is a single file (`None`: a diffusers folder).
    pub single_file: Option<Arc<SingleFile>>,
    /// How the single file was read (its `--ema` choice matters to the merged checkpoint).
    pub single_opts: SingleFileOptions,
}

/// Reads the base model `folder` (a diffusers folder, or a single file read with `single`)
/// for `file` (from `source`, for messages), refusing a model whose weights are not the ones
/// the file was trained on (fingerprint) or lack its layers.
pub fn read_base(folder: &Path, file: &ConceptFile, source: &Path, single: &SingleFileOptions) -> Result<Base> {
    let unet = open_base_unet_f32(folder, single)?;
    let store = &unet.store;
    let mut weights = BTreeMap::new();
    for name in file.unet_weights.keys() {
        let Some(shape) = store.shape_of(name) else {
            bail!("{} has no UNet weight {name}, so it is not the model {} was trained on", folder.display(), source.display());
        };
        let shape = candle_core::Shape::from(shape.to_vec());
        weights.insert(name.clone(), store.get(name, &shape)?.to_dtype(DType::F32)?);
    }
    let recorded = &file.meta.base_model;
    if !recorded.fingerprint.is_empty() {
        let list: Vec<(String, Tensor)> = weights.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        let fp = concept_file::fingerprint(&list, unet.token_table)?;
        if fp != recorded.fingerprint {
            bail!(
                "{} (fingerprint {fp}) is not the model {} was trained on ({}, fingerprint {}): pass that model with --model",
                folder.display(),
                source.display(),
                recorded.path,
                recorded.fingerprint
            );
        }
    }
    let mut attention_modules: Vec<String> =
        store.tensor_shapes().filter_map(|(n, _)| n.strip_suffix(".to_q.weight").map(str::to_string)).collect();
    attention_modules.sort();
    let layers_per_block = unet.unet_config.layers_per_block.expand(unet.unet_config.block_out_channels.len(), "layers_per_block")?;
    Ok(Base { path: folder.to_path_buf(), weights, attention_modules, layers_per_block, single_file: unet.single_file, single_opts: single.clone() })
}

/// Which projection of an attention module a concept-file weight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    Key,
    Value,
}

/// Splits `<module>.to_k.weight` / `<module>.to_v.weight` into (module, projection); any other
/// weight is an error: the exports hold cross-attention K/V only.
pub fn split_kv(name: &str) -> Result<(&str, Projection)> {
    if let Some(m) = name.strip_suffix(".to_k.weight") {
        return Ok((m, Projection::Key));
    }
    if let Some(m) = name.strip_suffix(".to_v.weight") {
        return Ok((m, Projection::Value));
    }
    bail!("the concept file holds {name}, but the exports carry only attention to_k/to_v weights")
}

/// The file name stem of a modifier token: `<new1>` -> `new1` (letters, digits, `-`, `_`, `.`
/// kept; anything else is an error so that a file name never surprises).
pub fn token_stem(token: &str) -> Result<String> {
    let stem = token.strip_prefix('<').and_then(|t| t.strip_suffix('>')).unwrap_or(token);
    if stem.is_empty() || stem.starts_with('.') || !stem.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("the token {token:?} does not make a file name (letters, digits, '-', '_', '.'): choose one with --names");
    }
    Ok(stem.to_string())
}

/// Serialises f32 tensors (CPU) with metadata, creating the parent folder, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: std::collections::HashMap<String, String>) -> Result<()> {
    let mut owned = Vec::new();
    for (k, t) in tensors {
        owned.push((k.clone(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?));
    }
    let bytes = safetensors::serialize(owned.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .with_context(|| format!("serialising {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::util::write_atomic(path, &bytes)
}

/// Serialises tensors as they are (their dtypes kept; moved to the CPU) with metadata,
/// creating the parent folder, atomically.
pub fn write_safetensors_as_is(path: &Path, tensors: &[(String, Tensor)], metadata: std::collections::HashMap<String, String>) -> Result<()> {
    let mut owned = Vec::new();
    for (k, t) in tensors {
        owned.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let bytes = safetensors::serialize(owned.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .with_context(|| format!("serialising {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::util::write_atomic(path, &bytes)
}
