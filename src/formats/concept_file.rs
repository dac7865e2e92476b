//! disendiff's concept file: what a training run learned, in one safetensors file.
//!
//! Tensors:
//! - the fine-tuned UNet weights under their diffusers names, e.g.
//!   `down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight` (full weights, not
//!   differences);
//! - one embedding row per modifier token, keyed by the token itself (`<new1>`: [hidden]), as
//!   diffusers' `learned_embeds.safetensors` does.
//!
//! Metadata (`__metadata__`, strings): `format` = `disendiff-concepts`, `version`, `concepts`
//! (JSON list of {modifier, class_word, initializer}), `method`, `hyperparameters` (JSON),
//! `base_model` (JSON: the folder it was trained on and a fingerprint of its weights).
//! Applying a file to a model is the patch layer's job (`crate::patch`): on the base model it
//! was trained on, on a related base as a difference, or refused.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT: &str = "disendiff-concepts";
pub const VERSION: &str = "1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaseModelId {
    /// The model folder it was trained on (absolute where it could be resolved).
    pub path: String,
    /// FNV-1a 64 of the base values of the trained UNet weights and the text encoder table
    /// shape (hex); equal fingerprints mean the same base weights.
    pub fingerprint: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConceptMeta {
    pub concept: Vec<Concept>,
    pub method: String,
    pub hyperparameters: serde_json::Value,
    pub base_model: BaseModelId,
}

/// One learned concept: its new token, the class word after it in the training caption
/// (docs/method.md §3) and the vocabulary token that initialised its embedding.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Concept {
    /// The new token, e.g. `<new1>`.
    pub modifier: String,
    /// The class word after it in the caption, e.g. `cat`.
    pub class_word: String,
    /// Vocabulary entry whose embedding row initialised the new token (e.g. `pll`).
    pub initializer: String,
}

/// A loaded concept file.
pub struct ConceptFile {
    pub meta: ConceptMeta,
    /// UNet weights by diffusers name.
    pub unet_weights: BTreeMap<String, Tensor>,
    /// Embedding rows [n, hidden] in concept order.
    pub embeddings: Tensor,
}

fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= *b as u64;
        *hash = hash.wrapping_mul(0x100000001b3);
    }
}

/// Fingerprint of a base model: the *base* values of the trained UNet weights (by name, in
/// name order) and the shape of the text encoder's vocabulary table, taken before any concept
/// is applied.
pub fn fingerprint(weights: &[(String, Tensor)], token_table: (usize, usize)) -> Result<String> {
    let mut sorted: Vec<&(String, Tensor)> = weights.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, t) in sorted {
        fnv1a(&mut h, name.as_bytes());
        let vals = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for x in vals {
            fnv1a(&mut h, &x.to_le_bytes());
        }
    }
    let (rows, cols) = token_table;
    fnv1a(&mut h, format!("{rows}x{cols}").as_bytes());
    Ok(format!("{h:016x}"))
}

/// Writes a concept file atomically.
pub fn save(path: &Path, meta: &ConceptMeta, unet_weights: &[(String, Tensor)], embeddings: &Tensor) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in unet_weights {
        tensors.push((name.clone(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?));
    }
    for (i, c) in meta.concept.iter().enumerate() {
        tensors.push((c.modifier.clone(), embeddings.get(i)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?));
    }
    let mut info = HashMap::new();
    info.insert("format".to_string(), FORMAT.to_string());
    info.insert("version".to_string(), VERSION.to_string());
    info.insert("concepts".to_string(), serde_json::to_string(&meta.concept)?);
    info.insert("method".to_string(), meta.method.clone());
    info.insert("hyperparameters".to_string(), meta.hyperparameters.to_string());
    info.insert("base_model".to_string(), serde_json::to_string(&meta.base_model)?);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(info))?;
    crate::util::write_atomic(path, &bytes)
}

/// Reads a concept file, checking its format.
pub fn load(path: &Path) -> Result<ConceptFile> {
    crate::util::require_file(path, "concept file")?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a readable safetensors file (truncated or corrupt?)", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let info = header.metadata().clone().unwrap_or_default();
    if info.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("{} is not a disendiff concept file (no `format: {FORMAT}` metadata)", path.display());
    }
    let get = |k: &str| info.get(k).with_context(|| format!("{}: metadata has no {k}", path.display()));
    let concept: Vec<Concept> = serde_json::from_str(get("concepts")?)?;
    let meta = ConceptMeta {
        concept,
        method: get("method")?.clone(),
        hyperparameters: serde_json::from_str(get("hyperparameters")?)?,
        base_model: serde_json::from_str(get("base_model")?)?,
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut unet_weights = BTreeMap::new();
    let mut rows = Vec::new();
    for c in &meta.concept {
        rows.push(tensors.get(&c.modifier).with_context(|| format!("{}: no embedding for {}", path.display(), c.modifier))?.clone());
    }
    for (name, t) in tensors {
        if !meta.concept.iter().any(|c| c.modifier == name) {
            unet_weights.insert(name, t);
        }
    }
    drop(st);
    let embeddings = Tensor::stack(&rows, 0)?;
    Ok(ConceptFile { meta, unet_weights, embeddings })
}
