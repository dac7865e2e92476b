//! One DisenDiff forward pass on a micro-batch, up to the losses (docs/method.md §2, §5):
//!
//! ```text
//!   emb     = token_embedding(ids) + position_embedding, detached except at modifier tokens
//!   context = text_encoder(emb)
//!   x_t     = sqrt(a_t) x0 + sqrt(1 - a_t) eps,  t ~ U{0..999} per sample
//!   eps_hat = UNet(x_t, t, context)   (start-token K/V detached, 16x16 attention captured)
//!   L       = mean_b( Σ_{c,h,w} (eps_hat − eps)² · mask / Σ_{h,w} mask )
//!             + w_bind · L_bind + w_ss · L_s&s
//! ```
//!
//! The diffusion term is the official masked form (4x the per-element mean for 4 latent
//! channels), with which the official attention weight is w_bind = w_ss = 0.01 (the paper
//! mentions 0.001 for L_s&s in some cases). The attention terms come from
//! [`crate::calibration`] over the target samples only. The two gradient masks are the
//! preset's ([`GradientMasks`]).

use super::model::Personalized;
use crate::calibration::{self, CalibrationConfig, ConceptPositions};
use crate::model::unet::{AttentionProbe, ForwardOptions};
use crate::scheduler::NoiseSchedule;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Custom Diffusion's two gradient masks (docs/method.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GradientMasks {
    /// Detach the text-embedding output at every position but the modifier tokens'.
    pub modifier_rows_only: bool,
    /// Detach the start token's key and value inside every cross-attention.
    pub detach_start_token_kv: bool,
}

impl Default for GradientMasks {
    fn default() -> Self {
        Self { modifier_rows_only: true, detach_start_token_kv: true }
    }
}

/// How the losses and the gradients of a step are formed.
#[derive(Clone, Debug)]
pub struct LossConfig {
    /// Weight of L_bind (0 = Custom Diffusion / Textual Inversion).
    pub bind_weight: f64,
    /// Weight of L_s&s.
    pub ss_weight: f64,
    pub calibration: CalibrationConfig,
    /// Side of the query grid whose cross-attention maps are used (16 for SD1.5 at 512).
    pub attn_resolution: usize,
    /// Ablation "all-scale maps": average every cross-attention layer, resized to
    /// `attn_resolution`.
    pub all_scales: bool,
    pub masks: GradientMasks,
    /// Recompute the UNet blocks' activations in the backward pass (`--gradient-checkpointing`;
    /// frozen blocks only, see [`crate::model::unet::ForwardOptions`]). The gradients are the
    /// same to rounding.
    pub gradient_checkpointing: bool,
}

impl Default for LossConfig {
    /// DisenDiff's official settings.
    fn default() -> Self {
        Self {
            bind_weight: 0.01,
            ss_weight: 0.01,
            calibration: CalibrationConfig::default(),
            attn_resolution: 16,
            all_scales: false,
            masks: GradientMasks::default(),
            gradient_checkpointing: false,
        }
    }
}

impl LossConfig {
    /// Whether the attention terms enter the loss.
    pub fn uses_attention(&self) -> bool {
        self.bind_weight != 0.0 || self.ss_weight != 0.0
    }
}

/// The inputs of one micro-batch.
pub struct MicroBatch {
    /// Token ids [B, 77] (u32).
    pub ids: Tensor,
    /// Clean latents as the UNet sees them (already scaled) [B, C, h, w].
    pub x0: Tensor,
    pub noise: Tensor,
    /// One timestep per sample [B].
    pub timesteps: Tensor,
    /// Loss mask [B, 1, h, w].
    pub mask: Tensor,
    /// Per sample: the concepts' token positions for target samples, `None` for
    /// regularisation samples (no attention loss).
    pub targets: Vec<Option<Vec<ConceptPositions>>>,
}

/// The losses of a micro-batch, scalar tensors in the autograd graph.
pub struct StepLosses {
    pub total: Tensor,
    pub diffusion: Tensor,
    pub l_bind: Tensor,
    pub l_ss: Tensor,
    /// Processed-map inputs of the calibration, per target sample [T, s, s] (for inspection).
    pub maps: Vec<Tensor>,
}

/// The text-encoder context, with Custom Diffusion's gradient mask on the embeddings when
/// `modifier_rows_only`: gradients reach the embedding only at modifier-token positions.
pub fn masked_context(model: &Personalized, ids: &Tensor, modifier_rows_only: bool) -> Result<Tensor> {
    let te = &model.sd.text_encoder;
    let emb = te.embed(ids)?;
    if !modifier_rows_only {
        return Ok(te.encode_embeddings(&emb)?);
    }
    let ids_v = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let (b, t) = ids.dims2()?;
    let m: Vec<f32> =
        ids_v.iter().flat_map(|row| row.iter().map(|id| if model.modifier_ids.contains(id) { 1.0 } else { 0.0 })).collect();
    let m = Tensor::from_vec(m, (b, t, 1), ids.device())?.to_dtype(emb.dtype())?;
    let emb = (emb.broadcast_mul(&m)? + emb.detach().broadcast_mul(&(1.0 - &m)?)?)?;
    Ok(te.encode_embeddings(&emb)?)
}

/// Runs the forward pass and returns the losses.
pub fn forward_losses(model: &Personalized, noise_schedule: &NoiseSchedule, batch: &MicroBatch, cfg: &LossConfig) -> Result<StepLosses> {
    let b = batch.x0.dim(0)?;
    if batch.targets.len() != b {
        bail!("{} target descriptions for a batch of {b}", batch.targets.len());
    }
    let context = masked_context(model, &batch.ids, cfg.masks.modifier_rows_only)?;
    let noisy = noise_schedule.add_noise(&batch.x0, &batch.noise, &batch.timesteps)?;
    let target = noise_schedule.training_target(&batch.x0, &batch.noise, &batch.timesteps)?;
    let use_attention = cfg.uses_attention() && batch.targets.iter().any(|t| t.is_some());
    let probe = use_attention.then(|| AttentionProbe { resolutions: if cfg.all_scales { vec![] } else { vec![cfg.attn_resolution] } });
    let opts = ForwardOptions { probe, detach_start_token_kv: cfg.masks.detach_start_token_kv, gradient_checkpointing: cfg.gradient_checkpointing };
    let out = model.sd.unet.forward_with(&noisy.to_dtype(model.sd.dtype)?, &batch.timesteps, &context, &opts)?;
    let pred = out.sample.to_dtype(DType::F32)?;

    // Masked diffusion loss: Σ_{c,h,w} err²·mask / Σ_{h,w} mask per sample, mean over the batch.
    let err = (pred - target.to_dtype(DType::F32)?)?.sqr()?.broadcast_mul(&batch.mask)?;
    let per_sample = err.sum((1, 2, 3))?.div(&batch.mask.sum((1, 2, 3))?)?;
    let diffusion = per_sample.mean_all()?;

    let zero = Tensor::zeros((), DType::F32, diffusion.device())?;
    let (l_bind, l_ss, maps) = if use_attention {
        let layers: Vec<(Tensor, usize, usize)> = out.attention.iter().map(|a| (a.probs.clone(), a.height, a.width)).collect();
        if layers.is_empty() {
            bail!(
                "no cross-attention layer has a {0}x{0} query grid at this image size: pick --attn-resolution from the UNet's grids",
                cfg.attn_resolution
            );
        }
        let all_maps = calibration::average_maps(&layers, cfg.attn_resolution)?;
        let mut samples = Vec::new();
        for (i, t) in batch.targets.iter().enumerate() {
            if let Some(pos) = t {
                samples.push((all_maps[i].clone(), pos.clone()));
            }
        }
        let l = cfg.calibration.losses(&samples)?;
        let maps = samples.into_iter().map(|(m, _)| m).collect();
        (l.l_bind, l.l_ss, maps)
    } else {
        (zero.clone(), zero, Vec::new())
    };
    let total = ((&diffusion + (&l_bind * cfg.bind_weight)?)? + (&l_ss * cfg.ss_weight)?)?;
    Ok(StepLosses { total, diffusion, l_bind, l_ss, maps })
}
