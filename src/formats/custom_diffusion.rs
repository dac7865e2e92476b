//! A diffusers Custom Diffusion folder read as a concept file, so that `generate --concepts DIR`
//! (and `export`) take what diffusers' `train_custom_diffusion.py` or `export --format
//! diffusers` wrote.
//!
//! The folder holds `pytorch_custom_diffusion_weights.safetensors` (keys
//! `<module>.processor.to_k_custom_diffusion.weight` / `to_v_custom_diffusion.weight`, full
//! weights, and empty `<module>.processor` entries for untrained layers) and one embedding file
//! per modifier token (`<token>.safetensors` or `new1.safetensors`, one tensor keyed by the
//! token, [dim] or [1, dim]). A folder disendiff exported carries the concept file's metadata
//! (concepts, base model fingerprint) and reads back as that file. A folder from diffusers has
//! none: its class words and initializers are unknown (left empty) and so is its base model,
//! recorded with an empty fingerprint, which the patch layer applies as diffusers does (the
//! weights set on the model given) with a warning. Query/output weights (`train_q_out`) are
//! refused: disendiff patches K/V only.

use crate::formats::concept_file::{BaseModelId, Concept, ConceptFile, ConceptMeta};
use crate::formats::export::diffusers::{FORMAT, WEIGHT_NAME};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Whether `path` is a Custom Diffusion folder (a folder holding the weights file).
pub fn is_folder(path: &Path) -> bool {
    path.is_dir() && path.join(WEIGHT_NAME).is_file()
}

fn read(path: &Path) -> Result<(Vec<u8>, std::collections::HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a readable safetensors file (truncated or corrupt?)", path.display()))?;
    let info = header.metadata().clone().unwrap_or_default();
    Ok((bytes, info))
}

/// Reads the folder `dir`.
pub fn load(dir: &Path) -> Result<ConceptFile> {
    let wpath = dir.join(WEIGHT_NAME);
    if !wpath.is_file() {
        bail!("{} is not a Custom Diffusion folder: it has no {WEIGHT_NAME}", dir.display());
    }
    let (bytes, info) = read(&wpath)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("reading the tensors of {}", wpath.display()))?;
    let mut unet_weights = BTreeMap::new();
    for (key, t) in tensors {
        if key.ends_with(".processor") && t.elem_count() == 0 {
            continue;
        }
        let name = if let Some(m) = key.strip_suffix(".processor.to_k_custom_diffusion.weight") {
            format!("{m}.to_k.weight")
        } else if let Some(m) = key.strip_suffix(".processor.to_v_custom_diffusion.weight") {
            format!("{m}.to_v.weight")
        } else if key.contains("to_q_custom_diffusion") || key.contains("to_out_custom_diffusion") {
            bail!("{}: {key} is a trained query/output weight (train_q_out), which disendiff does not apply (K/V only)", wpath.display());
        } else {
            bail!("{}: {key} is not a Custom Diffusion key (`<module>.processor.to_k_custom_diffusion.weight`, ...)", wpath.display());
        };
        unet_weights.insert(name, t.to_dtype(DType::F32)?);
    }
    if unet_weights.is_empty() {
        bail!("{} holds no trained K/V weight", wpath.display());
    }

    // The embeddings: every other safetensors file, one tensor keyed by its token.
    let mut rows: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p == wpath || p.extension().and_then(|x| x.to_str()) != Some("safetensors") {
            continue;
        }
        let t = candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| format!("{} is not a readable safetensors file", p.display()))?;
        let [(token, row)]: [(String, Tensor); 1] = t.into_iter().collect::<Vec<_>>().try_into().map_err(|v: Vec<_>| {
            anyhow::anyhow!("{}: an embedding file holds one tensor keyed by its token, this one holds {}", p.display(), v.len())
        })?;
        let row = match row.dims() {
            [_] => row,
            [1, _] => row.get(0)?,
            d => bail!("{}: the embedding {token} has shape {d:?}, expected [dim] or [1, dim]", p.display()),
        };
        if rows.insert(token.clone(), row.to_dtype(DType::F32)?).is_some() {
            bail!("{}: the token {token} has two embedding files", dir.display());
        }
    }

    let meta = if info.get("format").map(String::as_str) == Some(FORMAT) {
        let get = |k: &str| info.get(k).with_context(|| format!("{}: metadata has no {k}", wpath.display()));
        ConceptMeta {
            concept: serde_json::from_str(get("concepts")?)?,
            method: get("method")?.clone(),
            hyperparameters: serde_json::from_str(get("hyperparameters")?)?,
            base_model: serde_json::from_str(get("base_model")?)?,
        }
    } else {
        let concept = rows
            .keys()
            .map(|t| Concept { modifier: t.clone(), class_word: String::new(), initializer: String::new() })
            .collect();
        ConceptMeta {
            concept,
            method: "custom-diffusion (diffusers folder)".into(),
            hyperparameters: serde_json::json!({}),
            base_model: BaseModelId { path: String::new(), fingerprint: String::new() },
        }
    };
    if meta.concept.is_empty() {
        bail!("{} has no embedding file (one `<token>.safetensors` per modifier token)", dir.display());
    }
    let mut ordered = Vec::new();
    for c in &meta.concept {
        ordered.push(rows.remove(&c.modifier).with_context(|| format!("{}: no embedding file for {}", dir.display(), c.modifier))?);
    }
    if let Some(extra) = rows.keys().next() {
        bail!("{}: the embedding file of {extra} belongs to no concept of the weights file's metadata", dir.display());
    }
    let embeddings = Tensor::stack(&ordered, 0)?;
    Ok(ConceptFile { meta, unet_weights, embeddings })
}

/// A concept file, or a Custom Diffusion folder read as one.
pub fn load_any(path: &Path) -> Result<ConceptFile> {
    if path.is_dir() {
        load(path)
    } else {
        crate::formats::concept_file::load(path)
    }
}
