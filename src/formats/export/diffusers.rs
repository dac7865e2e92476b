//! `export --format diffusers`: a concept file as diffusers' Custom Diffusion folder.
//!
//! - `DIR/pytorch_custom_diffusion_weights.safetensors`: the trained K/V under
//!   `<module>.processor.to_k_custom_diffusion.weight` / `to_v_custom_diffusion.weight` (full
//!   weights), and an empty tensor (shape [0]) under `<module>.processor` for every other
//!   attention layer of the UNet. diffusers (0.29 and later) applies the file only with
//!   `unet.load_attn_procs(DIR, weight_name=..., _pipeline=pipe)`, and then passes a processor
//!   per key to `set_attn_processor`, which refuses a dict that does not name every attention
//!   layer (attn1 included); an empty entry becomes a processor without trained K/V
//!   (`_process_custom_diffusion`, `len(value) == 0`). The concept file's own metadata (concepts,
//!   base model) goes into the header so that disendiff reads the folder back exactly.
//! - `DIR/<token stem>.safetensors` per modifier token: one tensor keyed by the token
//!   (`<new1>`: [dim]) for `pipe.load_textual_inversion(path)`.

use super::{split_kv, token_stem, write_safetensors, Base, Projection};
use crate::formats::concept_file::{self, ConceptFile};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The weights file's name, as diffusers' `CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE`.
pub const WEIGHT_NAME: &str = "pytorch_custom_diffusion_weights.safetensors";
/// The `format` metadata of the weights file disendiff writes.
pub const FORMAT: &str = "disendiff-custom-diffusion";

/// The key of a trained projection of `module`.
pub fn processor_key(module: &str, p: Projection) -> String {
    match p {
        Projection::Key => format!("{module}.processor.to_k_custom_diffusion.weight"),
        Projection::Value => format!("{module}.processor.to_v_custom_diffusion.weight"),
    }
}

/// The tensors of the weights file (keys in order), from the file's K/V and the base's
/// attention modules. Every module the file trains must have both K and V and be one of the
/// base's attention modules.
pub fn weight_tensors(file: &ConceptFile, base: &Base) -> Result<Vec<(String, Tensor)>> {
    let mut trained: BTreeMap<&str, (Option<&Tensor>, Option<&Tensor>)> = BTreeMap::new();
    for (name, t) in &file.unet_weights {
        let (module, p) = split_kv(name)?;
        let e = trained.entry(module).or_default();
        match p {
            Projection::Key => e.0 = Some(t),
            Projection::Value => e.1 = Some(t),
        }
    }
    let mut out = Vec::new();
    for (module, (k, v)) in &trained {
        let (Some(k), Some(v)) = (k, v) else {
            bail!("the concept file holds only one of {module}.to_k/.to_v: diffusers' Custom Diffusion processor needs both");
        };
        if !base.attention_modules.iter().any(|m| m == module) {
            bail!("{module} of the concept file is not an attention layer of the base model");
        }
        out.push((processor_key(module, Projection::Key), k.to_dtype(DType::F32)?));
        out.push((processor_key(module, Projection::Value), v.to_dtype(DType::F32)?));
    }
    let empty = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
    for module in &base.attention_modules {
        if !trained.contains_key(module.as_str()) {
            out.push((format!("{module}.processor"), empty.clone()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The header metadata: the concept file's, so that the folder reads back as the same concepts.
pub fn metadata(file: &ConceptFile) -> Result<HashMap<String, String>> {
    let meta = &file.meta;
    Ok(HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), concept_file::VERSION.to_string()),
        ("concepts".to_string(), serde_json::to_string(&meta.concept)?),
        ("method".to_string(), meta.method.clone()),
        ("hyperparameters".to_string(), meta.hyperparameters.to_string()),
        ("base_model".to_string(), serde_json::to_string(&meta.base_model)?),
    ]))
}

/// Writes the folder; returns the files written.
pub fn write(file: &ConceptFile, base: &Base, out: &Path) -> Result<Vec<PathBuf>> {
    // Everything is checked before anything is written.
    let weights = weight_tensors(file, base)?;
    let mut embedding_files: Vec<PathBuf> = Vec::new();
    for c in &file.meta.concept {
        let path = out.join(format!("{}.safetensors", token_stem(&c.modifier)?));
        if embedding_files.contains(&path) || path.file_name() == Some(WEIGHT_NAME.as_ref()) {
            bail!("two files of the export would be named {}", path.display());
        }
        embedding_files.push(path);
    }
    let path = out.join(WEIGHT_NAME);
    write_safetensors(&path, &weights, metadata(file)?)?;
    let mut written = vec![path];
    for (i, (c, path)) in file.meta.concept.iter().zip(embedding_files).enumerate() {
        let row = file.embeddings.get(i)?.to_dtype(DType::F32)?;
        write_safetensors(&path, &[(c.modifier.clone(), row)], HashMap::new())?;
        written.push(path);
    }
    Ok(written)
}
