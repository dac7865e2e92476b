//! The diffusers-named tensors of a model's UNet, VAE and text encoder -> one CompVis (LDM /
//! A1111) state dict, the inverse of this module's reading maps, for `export --format
//! checkpoint` from a diffusers folder.
//!
//! Each name goes through the reverse function next to its forward map (unet_keys.rs,
//! vae_keys.rs, text_encoder_keys.rs; facts source: diffusers'
//! scripts/convert_diffusers_to_original_stable_diffusion.py): VAE mid-block attention linear
//! weights `[c, c]` become 1x1 convolutions `[c, c, 1, 1]`; an OpenCLIP (SD2) text encoder gets
//! its q/k/v fused back into `in_proj_weight` / `in_proj_bias` (q, k, v stacked along dim 0).
//! The map is total: a tensor with no CompVis name is an error naming it, never dropped. Values
//! and dtypes are kept as they are. An SD1 text encoder also gets the int64 `position_ids`
//! buffer real SD1 files carry (no reader needs it; older A1111 builds load it).

use super::text_encoder_keys::{reverse_clip, reverse_open_clip, OpenClipKey, Third};
use super::{unet_keys, vae_keys, CLIP, OPEN_CLIP, UNET, VAE};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// The components to write, by diffusers name, with what their configs say about the layout.
pub struct Components<'a> {
    pub unet: &'a BTreeMap<String, Tensor>,
    /// The UNet config's layers per down block, one entry per block.
    pub layers_per_block: &'a [usize],
    pub vae: &'a BTreeMap<String, Tensor>,
    /// The VAE's resolution levels (`block_out_channels.len()`).
    pub vae_blocks: usize,
    /// The text encoder's tensors (`text_model.` level optional).
    pub text_encoder: &'a BTreeMap<String, Tensor>,
    /// Whether the text encoder is written in SD2's OpenCLIP layout (else SD1's CLIP).
    pub open_clip: bool,
}

/// The CompVis state dict of `c`.
pub fn to_compvis(c: &Components) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut unplaced: Vec<String> = Vec::new();
    let put = |out: &mut BTreeMap<String, Tensor>, key: String, t: Tensor, from: &str| -> Result<()> {
        if out.insert(key.clone(), t).is_some() {
            bail!("two tensors map to {key} (the second is {from})");
        }
        Ok(())
    };

    let layout = unet_keys::UnetLayout::new(c.layers_per_block);
    let up_attention = |b: usize| {
        let p = format!("up_blocks.{b}.attentions.");
        c.unet.keys().any(|k| k.starts_with(&p))
    };
    for (name, t) in c.unet {
        match layout.reverse(name, up_attention) {
            Some(k) => put(&mut out, format!("{UNET}{k}"), t.clone(), &format!("UNet {name}"))?,
            None => unplaced.push(format!("UNet {name}")),
        }
    }

    for (name, t) in c.vae {
        match vae_keys::reverse(name, c.vae_blocks) {
            Some(v) if v.squeeze => {
                let (o, i) = t.dims2().with_context(|| format!("VAE {name} should be a linear weight [c, c]"))?;
                put(&mut out, format!("{VAE}{}", v.name), t.reshape((o, i, 1, 1))?, &format!("VAE {name}"))?
            }
            Some(v) => put(&mut out, format!("{VAE}{}", v.name), t.clone(), &format!("VAE {name}"))?,
            None => unplaced.push(format!("VAE {name}")),
        }
    }

    let mut fused: BTreeMap<String, [Option<(String, Tensor)>; 3]> = BTreeMap::new();
    let mut positions = None;
    for (name, t) in c.text_encoder {
        if name.ends_with("embeddings.position_ids") {
            // a buffer, not a weight: rebuilt below for SD1, absent from OpenCLIP
            continue;
        }
        if c.open_clip {
            match reverse_open_clip(name) {
                Some(OpenClipKey::Plain(k)) => put(&mut out, format!("{OPEN_CLIP}{k}"), t.clone(), &format!("text encoder {name}"))?,
                Some(OpenClipKey::Fused(k, third)) => {
                    let slot = &mut fused.entry(k).or_default()[third as usize];
                    if slot.replace((name.clone(), t.clone())).is_some() {
                        bail!("two text-encoder tensors are the {third:?} part of one in-projection ({name})");
                    }
                }
                None => unplaced.push(format!("text encoder {name}")),
            }
        } else {
            match reverse_clip(name) {
                Some(k) => {
                    if k == "text_model.embeddings.position_embedding.weight" {
                        positions = Some(t.dim(0).with_context(|| format!("text encoder {name} has no rows"))?);
                    }
                    put(&mut out, format!("{CLIP}{k}"), t.clone(), &format!("text encoder {name}"))?
                }
                None => unplaced.push(format!("text encoder {name}")),
            }
        }
    }
    for (key, parts) in fused {
        let mut got = Vec::new();
        for (third, part) in [Third::Q, Third::K, Third::V].into_iter().zip(parts) {
            let Some((name, t)) = part else {
                bail!("the text encoder has no {third:?} projection for {OPEN_CLIP}{key}, so q/k/v cannot be fused");
            };
            got.push((name, t));
        }
        if got.iter().any(|(_, t)| t.dims() != got[0].1.dims() || t.dtype() != got[0].1.dtype()) {
            let shapes: Vec<String> = got.iter().map(|(n, t)| format!("{n} {:?} {:?}", t.dims(), t.dtype())).collect();
            bail!("the q/k/v projections of {OPEN_CLIP}{key} differ in shape or dtype: {}", shapes.join(", "));
        }
        let ts: Vec<&Tensor> = got.iter().map(|(_, t)| t).collect();
        put(&mut out, format!("{OPEN_CLIP}{key}"), Tensor::cat(&ts, 0)?, &key)?;
    }
    if let Some(n) = positions {
        let ids = Tensor::arange(0i64, n as i64, &Device::Cpu)?.unsqueeze(0)?;
        put(&mut out, format!("{CLIP}text_model.embeddings.position_ids"), ids, "position_ids")?;
    }

    if !unplaced.is_empty() {
        bail!(
            "{} tensor(s) have no CompVis name, so the single file cannot hold them: {}",
            unplaced.len(),
            unplaced.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}
