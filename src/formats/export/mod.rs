//! Exports of a concept file for other tools: diffusers' Custom Diffusion folder
//! ([`diffusers`]) and a kohya-named network file with embedding files for AUTOMATIC1111,
//! ComfyUI, InvokeAI and kohya's scripts ([`webui`]), the low-rank form by [`svd`].
//!
//! Both need the concept file's K/V weights grouped per attention module; the webui file and
//! the list of every attention layer (which diffusers' loader wants) need the base model, whose
//! weights are read here and checked against the fingerprint the concept file records.

pub mod diffusers;
pub mod svd;
pub mod webui;

use crate::formats::concept_file::{self, ConceptFile};
use crate::model::clip::ClipTextConfig;
use crate::model::sd::open_unet_f32;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The base model's UNet weights the concept file changes (by diffusers name, f32) and the
/// attention modules of its UNet (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`,
/// ...: every module with a `to_q.weight`), read from `folder`.
pub struct Base {
    pub weights: BTreeMap<String, Tensor>,
    pub attention_modules: Vec<String>,
}


/// Reads the base model `folder` for `file` (from `source`, for messages), refusing a model
/// whose weights are not the ones the file was trained on (fingerprint) or lack its layers.
pub fn read_base(folder: &Path, file: &ConceptFile, source: &Path) -> Result<Base> {
    let store = open_unet_f32(folder)?;
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
        let te = ClipTextConfig::from_file(&folder.join("text_encoder/config.json"))?;
        let list: Vec<(String, Tensor)> = weights.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        let fp = concept_file::fingerprint(&list, (te.vocab_size, te.hidden_size))?;
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
    Ok(Base { weights, attention_modules })
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
