//! `export --format checkpoint`: the base model with a concept file's cross-attention K/V
//! merged in, as one CompVis-layout `.safetensors` (AUTOMATIC1111's and ComfyUI's
//! `models/Stable-diffusion/`, diffusers' `from_single_file`), plus one embedding file per
//! modifier token (`embeddings/<word>.safetensors`, as `--format webui` writes them).
//!
//! The concept file stores the full trained K/V weights of the base it was trained on (checked
//! by fingerprint in `read_base`), so merging into that base means writing the trained weights,
//! cast to the dtype the base stores that tensor in.
//! - A diffusers folder: every UNet, VAE and text-encoder tensor under its CompVis name
//!   (`model::single_file::to_compvis`, a total map: a tensor with no CompVis name is an error),
//!   dtypes kept.
//! - A single file: every tensor of the file as it is (names, dtypes, schedule buffers), the
//!   attn2 to_k/to_v replaced; `model_ema.*` is dropped, so no reader can pick up unmerged EMA
//!   copies: without `--ema` the non-EMA UNet is the merged model's, with `--ema` the EMA
//!   weights are written under the non-EMA names (`model.diffusion_model.*`) and merged there.
//!
//! The metadata is one key, `disendiff_export` (JSON with sorted keys: base, concept file,
//! tokens, what was merged), so the same inputs give the same bytes.

use super::webui::{trigger_words, write_embeddings};
use super::{token_stem, write_safetensors_as_is, Base};
use crate::formats::concept_file::ConceptFile;
use crate::model::clip::ClipTextConfig;
use crate::model::single_file::to_compvis::{to_compvis, Components};
use crate::model::single_file::{self, ema_key, Part, SingleFile, EMA, UNET};
use crate::model::vae::VaeConfig;
use crate::model::weights::component_weight_files;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The metadata key of the merged file.
pub const METADATA_KEY: &str = "disendiff_export";

/// Writes `out/<name>.safetensors` (the merged model) and `out/embeddings/<word>.safetensors`;
/// `source` is the concept file's path (recorded in the metadata). Nothing is written when any
/// check fails; a failed embedding write removes the model file written before it.
pub fn write(file: &ConceptFile, base: &Base, source: &Path, out: &Path, name: &str, names: &HashMap<String, String>) -> Result<Vec<PathBuf>> {
    let stem = token_stem(name).with_context(|| format!("--name {name}"))?;
    let words = trigger_words(file, names)?;
    let (tensors, ema_note) = match &base.single_file {
        Some(sf) => (from_single_file(sf, base, file)?, single_file_note(sf, base)),
        None => (from_folder(&base.path, base, file)?, "a diffusers folder, every UNet, VAE and text-encoder tensor under its CompVis name".to_string()),
    };
    let tokens: Vec<&str> = file.meta.concept.iter().map(|c| c.modifier.as_str()).collect();
    let info: BTreeMap<&str, serde_json::Value> = BTreeMap::from([
        ("base_model", serde_json::Value::from(base.path.display().to_string())),
        ("base_fingerprint", file.meta.base_model.fingerprint.clone().into()),
        ("base_read_as", ema_note.into()),
        ("concept_file", source.display().to_string().into()),
        ("method", file.meta.method.clone().into()),
        ("tokens", tokens.into()),
        ("trigger_words", words.clone().into()),
        ("embeddings", words.iter().map(|w| format!("embeddings/{w}.safetensors")).collect::<Vec<_>>().into()),
        (
            "merged",
            format!("{} cross-attention to_k/to_v weights set to the concept file's trained weights", file.unet_weights.len()).into(),
        ),
        ("generator", format!("disendiff {} export --format checkpoint", env!("CARGO_PKG_VERSION")).into()),
    ]);
    let metadata = HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&info)?)]);
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let path = out.join(format!("{stem}.safetensors"));
    write_safetensors_as_is(&path, &list, metadata)?;
    let mut files = vec![path.clone()];
    match write_embeddings(file, out, &words) {
        Ok(e) => files.extend(e),
        Err(e) => {
            // the model file alone is no complete export; a failure to remove it changes nothing
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    }
    Ok(files)
}

fn single_file_note(sf: &SingleFile, base: &Base) -> String {
    let has_ema = sf.shapes().keys().any(|k| k.starts_with(EMA));
    match (base.single_opts.ema, has_ema) {
        (true, _) => "a single file; its EMA UNet weights (--ema) written as model.diffusion_model.*, model_ema.* dropped".to_string(),
        (false, true) => "a single file; its non-EMA UNet weights, model_ema.* dropped".to_string(),
        (false, false) => "a single file, every tensor as it is".to_string(),
    }
}

/// `trained` cast to the dtype of `current` (the base's tensor it replaces), refusing another
/// shape.
fn merged(name: &str, trained: &Tensor, current: &Tensor, place: &str) -> Result<Tensor> {
    if trained.dims() != current.dims() {
        bail!("the concept file's {name} has shape {:?} but {place} has {:?}", trained.dims(), current.dims());
    }
    Ok(trained.to_dtype(current.dtype())?.to_device(&Device::Cpu)?)
}

/// Every tensor of the single file (as stored), K/V merged, `model_ema.*` dropped.
fn from_single_file(sf: &SingleFile, base: &Base, file: &ConceptFile) -> Result<BTreeMap<String, Tensor>> {
    let part = Part::Unet { layers_per_block: base.layers_per_block.clone(), ema: false };
    let names = single_file::diffusers_names(sf.shapes(), &part).with_context(|| sf.path.display().to_string())?;
    let ema = base.single_opts.ema;
    let mut out = BTreeMap::new();
    for key in sf.shapes().keys() {
        if key.starts_with(EMA) {
            continue;
        }
        let t = if ema && key.starts_with(UNET) { sf.tensor(&ema_key(key))? } else { sf.tensor(key)? };
        out.insert(key.clone(), t);
    }
    for (name, trained) in &file.unet_weights {
        let Some((key, _)) = names.get(name) else {
            bail!("the concept file's {name} has no place in {}: no UNet tensor of the file maps to it", sf.path.display());
        };
        let current = out.get(key).with_context(|| format!("{} lost {key}", sf.path.display()))?;
        let t = merged(name, trained, current, &format!("{key} of {}", sf.path.display()))?;
        out.insert(key.clone(), t);
    }
    Ok(out)
}

/// Every tensor of one component of a diffusers folder (the plain files, else the `fp16`
/// variant), as stored.
fn component(folder: &Path, component: &str) -> Result<BTreeMap<String, Tensor>> {
    let stem = if component == "text_encoder" { "model" } else { "diffusion_pytorch_model" };
    let dir = folder.join(component);
    let files = component_weight_files(&dir, stem, None).or_else(|e| component_weight_files(&dir, stem, Some("fp16")).map_err(|_| e))?;
    let mut out = BTreeMap::new();
    for f in files {
        let t = candle_core::safetensors::load(&f, &Device::Cpu).with_context(|| format!("reading {}", f.display()))?;
        for (k, v) in t {
            if out.insert(k.clone(), v).is_some() {
                bail!("{} holds {k} twice (in two shards)", dir.display());
            }
        }
    }
    Ok(out)
}

/// The folder's components under CompVis names, K/V merged.
fn from_folder(folder: &Path, base: &Base, file: &ConceptFile) -> Result<BTreeMap<String, Tensor>> {
    let mut unet = component(folder, "unet")?;
    for (name, trained) in &file.unet_weights {
        let Some(current) = unet.get(name) else {
            bail!("the concept file's {name} has no place in the UNet of {}", folder.display());
        };
        let t = merged(name, trained, current, &format!("the UNet of {}", folder.display()))?;
        unet.insert(name.clone(), t);
    }
    let vae = component(folder, "vae")?;
    let text_encoder = component(folder, "text_encoder")?;
    let vae_cfg = VaeConfig::from_file(&folder.join("vae/config.json"))?;
    let te_cfg = ClipTextConfig::from_file(&folder.join("text_encoder/config.json"))?;
    let c = Components {
        unet: &unet,
        layers_per_block: &base.layers_per_block,
        vae: &vae,
        vae_blocks: vae_cfg.block_out_channels.len(),
        text_encoder: &text_encoder,
        // OpenCLIP ViT-H (SD2) uses GELU, OpenAI's CLIP ViT-L (SD1) quick GELU
        open_clip: te_cfg.hidden_act == "gelu",
    };
    to_compvis(&c).with_context(|| format!("writing {} as a single file", folder.display()))
}
