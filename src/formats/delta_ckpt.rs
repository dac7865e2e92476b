//! The official DisenDiff / Custom Diffusion `delta.ckpt` read as a concept file, so that
//! `generate --concepts delta.ckpt` takes what the authors' training scripts save.
//!
//! The file is a `torch.save` of `{"state_dict": {"model.diffusion_model.<...>.attn2.to_k.weight":
//! W, "...to_v.weight": W}, "embed": Tensor[n, dim]}` (docs/formats.md); `embed` may also sit
//! inside the state dict. The weights are full (not differences) and keep CompVis names, which
//! the single-file UNet key map turns into diffusers names for the layout of the model they are
//! applied to (its layers per block). `embed` holds the rows of the modifier tokens in order;
//! the file does not name them, so they come from `--modifier-tokens "<new1>+<new2>"` (the
//! authors' flag) or are `<new1>`..`<newN>`, said in a note. It is read with the project's safe
//! pickle reader (nothing in it is run). Like a diffusers Custom Diffusion folder it records no
//! base model or class words: the patch layer sets its weights on the model given, with a
//! warning. Any other key is refused, a trained query/output weight (`train_q_out`) included:
//! disendiff patches K/V only.

use crate::formats::concept_file::{BaseModelId, Concept, ConceptFile, ConceptMeta};
use crate::model::single_file::{diffusers_names, pickle, Part};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::collections::BTreeMap;
use std::path::Path;

const UNET: &str = "model.diffusion_model.";

/// Whether `path` names a `.ckpt` file (read as a delta.ckpt when given as a concept file).
pub fn is_delta_ckpt(path: &Path) -> bool {
    path.is_file() && path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("ckpt"))
}

/// Parses `--modifier-tokens "<new1>+<new2>"`.
pub fn parse_modifier_tokens(s: &str) -> Result<Vec<String>> {
    let tokens: Vec<String> = s.split('+').map(|t| t.trim().to_string()).collect();
    if let Some(t) = tokens.iter().find(|t| t.is_empty() || t.contains(char::is_whitespace)) {
        bail!("--modifier-tokens {s:?}: {t:?} is not a token (tokens are joined by '+', e.g. \"<new1>+<new2>\")");
    }
    Ok(tokens)
}

/// Reads `path` for a UNet with `layers_per_block` layers per down block; `modifier_tokens`
/// names the rows of `embed`. Returns the concept file and, when the tokens were not given, a
/// note naming the ones assumed.
pub fn load(path: &Path, layers_per_block: &[usize], modifier_tokens: Option<&[String]>) -> Result<(ConceptFile, Option<String>)> {
    let ckpt = pickle::read_checkpoint(path)?;
    let mut embed = ckpt.top_level.get("embed").cloned();
    let mut shapes = BTreeMap::new();
    let mut unknown = Vec::new();
    for (key, t) in &ckpt.tensors {
        if key == "embed" {
            if embed.is_some() {
                bail!("{}: `embed` is both in the state dict and next to it", path.display());
            }
            embed = Some(t.clone());
            continue;
        }
        let kv = key.strip_prefix(UNET).is_some_and(|r| r.ends_with(".attn2.to_k.weight") || r.ends_with(".attn2.to_v.weight"));
        if kv {
            shapes.insert(key.clone(), t.dims().to_vec());
        } else if key.starts_with(UNET) && (key.contains(".attn2.to_q.") || key.contains(".attn2.to_out.")) {
            bail!("{}: {key} is a trained query/output weight (train_q_out), which disendiff does not apply (K/V only)", path.display());
        } else {
            unknown.push(key.clone());
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{}: {} key(s) are not a delta.ckpt's (`{UNET}<...>.attn2.to_k.weight` / `to_v.weight` and `embed`), e.g. {}",
            path.display(),
            unknown.len(),
            unknown.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if shapes.is_empty() {
        bail!("{} holds no trained K/V weight", path.display());
    }
    let names = diffusers_names(&shapes, &Part::Unet { layers_per_block: layers_per_block.to_vec(), ema: false })
        .with_context(|| format!("{}: mapping its CompVis UNet names to the model's layout", path.display()))?;
    let mut unet_weights = BTreeMap::new();
    for (name, (src, _)) in names {
        unet_weights.insert(name, ckpt.tensors[&src].to_dtype(DType::F32)?);
    }

    let embed = embed.with_context(|| format!("{}: no `embed` (the modifier tokens' embedding rows)", path.display()))?;
    let embeddings = match embed.dims() {
        [_, _] => embed,
        [_] => embed.unsqueeze(0)?,
        d => bail!("{}: `embed` has shape {d:?}, expected [n_tokens, dim]", path.display()),
    }
    .to_dtype(DType::F32)?;
    let n = embeddings.dim(0)?;
    if n == 0 {
        bail!("{}: `embed` has no rows", path.display());
    }
    let (tokens, note) = match modifier_tokens {
        Some(t) if t.len() == n => (t.to_vec(), None),
        Some(t) => bail!("{}: --modifier-tokens names {} token(s) ({}), but `embed` has {n} rows", path.display(), t.len(), t.join("+")),
        None => {
            let t: Vec<String> = (1..=n).map(|i| format!("<new{i}>")).collect();
            let note = format!(
                "{} does not name its modifier tokens: its {n} embedding row(s) are taken as {} (set them with --modifier-tokens)",
                path.display(),
                t.join("+")
            );
            (t, Some(note))
        }
    };
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = tokens.iter().find(|t| !seen.insert(*t)) {
        bail!("--modifier-tokens names {dup} twice");
    }
    let meta = ConceptMeta {
        concept: tokens.into_iter().map(|modifier| Concept { modifier, class_word: String::new(), initializer: String::new() }).collect(),
        method: "custom-diffusion / disendiff (delta.ckpt)".into(),
        hyperparameters: serde_json::json!({}),
        base_model: BaseModelId { path: String::new(), fingerprint: String::new() },
    };
    Ok((ConceptFile { meta, unet_weights, embeddings }, note))
}
