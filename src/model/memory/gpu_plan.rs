//! The GPU memory plan of one SD1.5 DisenDiff micro-batch (BENCHMARKS.md's GPU section):
//! `disendiff bench --memory-plan` prints it, row by row with each saving (mixed precision,
//! attention without every layer's full probabilities, gradient checkpointing), counted from
//! the shapes as the parent module counts a CPU run. Separate from [`super::training`] (the
//! CPU run's refusal check), which it does not change.

use super::{Shapes, Training};
use crate::model::unet::UNetConfig;
use crate::model::vae::VaeConfig;
use anyhow::{bail, Result};
use candle_core::DType;

/// Which memory savings a GPU training step uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuSavings {
    /// Frozen weights and activations in bf16/f16 (2 bytes); trainable K/V, the new embedding
    /// rows, their gradients and AdamW's moments in f32.
    pub mixed_precision: bool,
    /// The attention backward recomputes the probabilities (flash-attention style) instead of
    /// keeping every layer's [B, heads, N, M] probabilities; only the probe's cross-attention
    /// maps (read by the DisenDiff losses) are kept.
    pub no_full_probabilities: bool,
    /// Gradient checkpointing of the UNet's resnets and transformers: only each block's input
    /// is kept and one block at a time is recomputed during the backward; the probed level's
    /// transformers are kept in full, as `model::checkpoint`'s caller in the UNet does.
    pub checkpointing: bool,
}

/// One row of the plan: bytes at the step's peak, by kind.
#[derive(Clone, Debug)]
pub struct GpuPlanRow {
    pub savings: GpuSavings,
    /// Frozen weights of the UNet, text encoder and VAE encoder.
    pub frozen_weights: u64,
    /// Trainable tensors, their gradients and AdamW's two moments (f32), plus their low-precision
    /// copies at the linear's boundary under mixed precision.
    pub trainable: u64,
    /// Activations the autograd graph keeps for the backward (attention probabilities included).
    pub kept: u64,
    /// Of `kept`, the attention probabilities.
    pub probabilities: u64,
    /// The backward's working set on top (the gradients flowing through the largest block, and
    /// under checkpointing that block's recomputed activations).
    pub working: u64,
}

impl GpuPlanRow {
    pub fn total(&self) -> u64 {
        self.frozen_weights + self.trainable + self.kept + self.working
    }
}

/// The plan: one row per combination of savings, in the order they are added.
#[derive(Clone, Debug)]
pub struct GpuPlan {
    pub resolution: usize,
    pub batch: usize,
    pub rows: Vec<GpuPlanRow>,
}

/// Parameter counts of the diffusers SD1.5 components that the step holds besides the UNet
/// (counted from `runwayml/stable-diffusion-v1-5`'s weight files): the CLIP ViT-L/14 text
/// encoder and the VAE's encoder with `quant_conv`.
const SD15_TEXT_ENCODER_PARAMS: u64 = 123_060_480;
const SD15_VAE_ENCODER_PARAMS: u64 = 34_163_664;

impl GpuPlan {
    /// The plan as a markdown table (sizes in GB of 10^9 bytes), with the PyTorch/diffusers
    /// configuration that keeps the same tensors.
    pub fn table(&self) -> String {
        let gb = |b: u64| format!("{:.2}", b as f64 / 1e9);
        let mut out = format!(
            "SD1.5 DisenDiff micro-batch: {} images at {}x{} px ({}x{} latents), UNet K/V + 2 embedding rows trained with AdamW\n\n",
            self.batch, self.resolution, self.resolution, self.resolution / 8, self.resolution / 8
        );
        out += "| savings | frozen weights GB | trainable + grads + AdamW GB | kept activations GB (of which probabilities) | backward working set GB | peak GB | disendiff | PyTorch/diffusers with the same savings |\n";
        out += "|---|---|---|---|---|---|---|---|\n";
        for r in &self.rows {
            let s = r.savings;
            let what = match (s.mixed_precision, s.no_full_probabilities, s.checkpointing) {
                (false, false, false) => "none (f32, every layer's probabilities kept)",
                (true, false, false) => "mixed precision",
                (true, true, false) => "mixed precision + no full probabilities",
                (true, true, true) => "mixed precision + no full probabilities + checkpointing",
                (false, true, false) => "no full probabilities (f32)",
                (false, true, true) => "no full probabilities + checkpointing (f32)",
                _ => "other",
            };
            let ours = match (s.mixed_precision, s.no_full_probabilities, s.checkpointing) {
                (_, false, false) => "earlier `train` on CUDA (before `attention_recompute`)",
                (false, true, false) => "`train` on CUDA (`attention_recompute`)",
                (true, true, false) => "`train --dtype bf16` on CUDA (`attention_recompute`)",
                (false, true, true) => "`train --gradient-checkpointing` on CUDA",
                (true, true, true) => "`train --dtype bf16 --gradient-checkpointing` on CUDA",
                _ => "not implemented",
            };
            let theirs = match (s.mixed_precision, s.no_full_probabilities, s.checkpointing) {
                (false, false, false) => "classic AttnProcessor on every layer, f32",
                (true, false, false) => "`--mixed_precision bf16`, classic AttnProcessor on every layer",
                (_, true, false) => "SDPA (AttnProcessor2_0) except the probed cross-attention",
                (_, true, true) => "the same + `--gradient_checkpointing` (recomputes the probed blocks too: a little less kept)",
                _ => "",
            };
            out += &format!(
                "| {what} | {} | {} | {} ({}) | {} | **{}** | {ours} | {theirs} |\n",
                gb(r.frozen_weights), gb(r.trainable), gb(r.kept), gb(r.probabilities), gb(r.working), gb(r.total())
            );
        }
        out
    }
}

/// The GPU memory plan of one DisenDiff micro-batch on SD1.5 (2 images at 512 px, the 16x16
/// probe, K/V of every cross-attention and two embedding rows trained).
pub fn sd15_gpu_training_plan() -> Result<GpuPlan> {
    let unet = UNetConfig::from_json_str(
        r#"{"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 8}"#,
    )?;
    let unet_params = unet_parameters(&unet)?;
    let s = Shapes::from_configs(&unet, &VaeConfig::default(), 77, DType::F32, false)?;
    // the plan counts its own trainable K/V and their state (gpu_training_row)
    let t = Training { resolution: 512, batch: 2, attn_resolution: 16, trainable_params: 0, grad_accum: 1, state_bytes: 8, checkpointed: false };
    let combos = [(false, false, false), (true, false, false), (true, true, false), (true, true, true), (false, true, false), (false, true, true)];
    let mut rows = Vec::new();
    for (mixed_precision, no_full_probabilities, checkpointing) in combos {
        let savings = GpuSavings { mixed_precision, no_full_probabilities, checkpointing };
        rows.push(gpu_training_row(&s, &t, unet.cross_attention_dim as u64, unet_params, savings)?);
    }
    Ok(GpuPlan { resolution: t.resolution, batch: t.batch, rows })
}

/// Parameters of a UNet of config `cfg`, counted from its shapes the way diffusers builds it
/// (resnets with time-embedding projections, transformers with GEGLU feed-forwards, 1x1 or
/// linear projections, down/up samplers, the mid block; SD1.5 gives 859,520,964).
pub fn unet_parameters(cfg: &UNetConfig) -> Result<u64> {
    let r = cfg.resolved()?;
    let ch: Vec<u64> = cfg.block_out_channels.iter().map(|&c| c as u64).collect();
    let n = ch.len();
    let ctx = cfg.cross_attention_dim as u64;
    let temb = 4 * ch[0];
    let conv = |i: u64, o: u64, k: u64| i * o * k * k + o;
    let norm = |c: u64| 2 * c;
    let resnet = |i: u64, o: u64| {
        norm(i) + conv(i, o, 3) + (temb * o + o) + norm(o) + conv(o, o, 3) + if i != o { conv(i, o, 1) } else { 0 }
    };
    let transformer = |c: u64| {
        let attn = |kv: u64| c * c + 2 * kv * c + c * c + c; // q, k, v (no bias), out (+ bias)
        let block = 3 * norm(c) + attn(c) + attn(ctx) + (c * 8 * c + 8 * c) + (4 * c * c + c);
        // group norm, proj_in/proj_out (1x1 conv or linear: the same count), the blocks
        norm(c) + 2 * (c * c + c) + block
    };
    let mut p = conv(cfg.in_channels as u64, ch[0], 3) + (ch[0] * temb + temb) + (temb * temb + temb);
    let attn: Vec<bool> = cfg.down_block_types.iter().map(|t| t.contains("CrossAttn")).collect();
    // down path
    let mut c_in = ch[0];
    for l in 0..n {
        for _ in 0..r.layers[l] {
            p += resnet(c_in, ch[l]);
            if attn[l] {
                p += transformer(ch[l]);
            }
            c_in = ch[l];
        }
        if l + 1 < n {
            p += conv(ch[l], ch[l], 3); // downsampler
        }
    }
    // mid block: resnet, transformer, resnet
    p += 2 * resnet(ch[n - 1], ch[n - 1]) + transformer(ch[n - 1]);
    // up path: level n-1 .. 0, layers + 1 resnets each, reading the skips
    let mut skips: Vec<u64> = vec![ch[0]];
    for l in 0..n {
        for _ in 0..r.layers[l] {
            skips.push(ch[l]);
        }
        if l + 1 < n {
            skips.push(ch[l]);
        }
    }
    let mut prev = ch[n - 1];
    for l in (0..n).rev() {
        for _ in 0..=r.layers[l] {
            let skip = skips.pop().unwrap_or(ch[l]);
            p += resnet(prev + skip, ch[l]);
            if attn[l] {
                p += transformer(ch[l]);
            }
            prev = ch[l];
        }
        if l > 0 {
            p += conv(ch[l], ch[l], 3); // upsampler
        }
    }
    p += norm(ch[0]) + conv(ch[0], cfg.out_channels as u64, 3);
    Ok(p)
}

/// One plan row. Per level of P latent pixels, C channels and h heads, with e the bytes of an
/// activation (f32 4, bf16 2), what the autograd graph keeps (each op keeps the inputs its
/// backward reads):
/// - a resnet: 6 C P (group norm in/out, SiLU out, conv1 out, group norm 2 out, SiLU out);
/// - a transformer: 31 C P (group norm and proj_in inputs, LayerNorm in/out x3, q/k/v, the
///   attention outputs, the GEGLU's 8C projection, gelu(gate) and product, proj_out's input);
/// - its probabilities: h P (P + 77), f32 softmax outputs (4 bytes), plus their low-precision
///   copy the product with V reads under mixed precision (2 bytes more);
/// - down (layers) and up (layers + 1) path per level, the mid block (2 resnets, 1 transformer)
///   at the deepest level.
///
/// Under checkpointing each resnet and transformer keeps only its input (the up path's resnets:
/// input and skip) and the probe's maps; the backward recomputes one block, so its working set
/// is that block's kept tensors plus their gradients. Without checkpointing the working set is
/// the gradients flowing through the largest block (as large as its kept tensors).
fn gpu_training_row(s: &Shapes, t: &Training, ctx_dim: u64, unet_params: u64, sv: GpuSavings) -> Result<GpuPlanRow> {
    let f = s.vae_factor;
    let side = t.resolution as u64;
    if side == 0 || side % f != 0 {
        bail!("the resolution must be a positive multiple of {f} (the VAE factor), got {side}");
    }
    let b = t.batch.max(1) as u64;
    let e: u64 = if sv.mixed_precision { 2 } else { 4 };
    let latent = (side / f).pow(2);
    let probed = (t.attn_resolution as u64).pow(2);
    let n = s.unet_channels.len();
    let tokens = s.context_len;
    let mut kept = 0u64;
    let mut probabilities = 0u64;
    let mut largest_block = 0u64;
    let mut kv_params = 0u64;
    for l in 0..n {
        let p = latent >> (2 * l);
        let c = s.unet_channels[l];
        let attn = s.unet_attention[l];
        let h = s.unet_heads[l];
        let mut resnets = 2 * s.unet_layers[l] + 1;
        let mut transformers = if attn { 2 * s.unet_layers[l] + 1 } else { 0 };
        if l == n - 1 {
            // the mid block
            resnets += 2;
            transformers += 1;
        }
        let resnet_kept = 6 * c * p * e * b;
        let transformer_kept = 31 * c * p * e * b;
        let prob_bytes = if sv.mixed_precision { 6 } else { 4 };
        let full_probs = h * p * (p + tokens) * prob_bytes * b;
        let probe_probs = if p == probed { h * p * tokens * 4 * b } else { 0 };
        let probs_per_transformer = if sv.no_full_probabilities { probe_probs } else { full_probs };
        kv_params += transformers * 2 * ctx_dim * c;
        if sv.checkpointing {
            // block inputs (the up path's resnets read the skip too); the probed level's
            // transformers are not recomputed (their maps feed the losses): kept in full
            let per_transformer = if p == probed { transformer_kept + probs_per_transformer } else { c * p * e * b };
            kept += resnets * 2 * c * p * e * b + transformers * per_transformer;
            probabilities += transformers * probe_probs;
            let block = (transformer_kept + probs_per_transformer).max(resnet_kept);
            largest_block = largest_block.max(if transformers > 0 { block } else { resnet_kept });
        } else {
            kept += resnets * resnet_kept + transformers * (transformer_kept + probs_per_transformer);
            probabilities += transformers * probs_per_transformer;
            largest_block = largest_block.max(resnet_kept).max(if transformers > 0 { transformer_kept + probs_per_transformer } else { 0 });
        }
    }
    // checkpointing: the recomputed block's activations and their gradients; otherwise the
    // gradients through the largest block
    let working = if sv.checkpointing { 2 * largest_block } else { largest_block };
    let frozen = (unet_params - kv_params + SD15_TEXT_ENCODER_PARAMS + SD15_VAE_ENCODER_PARAMS) * e;
    let trainable_params = kv_params + 2 * ctx_dim;
    // f32 values, gradients and two moments; the low-precision copy at the linear's boundary
    let trainable = trainable_params * 4 * 4 + if sv.mixed_precision { kv_params * 2 } else { 0 };
    Ok(GpuPlanRow { savings: sv, frozen_weights: frozen, trainable, kept, probabilities, working })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU plan (printed with --nocapture; BENCHMARKS.md's table is `disendiff bench
    /// --memory-plan`): the UNet's parameter count from the config is diffusers' exact one,
    /// each saving lowers the peak, and mixed precision halves the frozen weights exactly.
    #[test]
    fn sd15_gpu_plan() {
        let plan = sd15_gpu_training_plan().unwrap();
        println!("{}", plan.table());
        let unet = UNetConfig::from_json_str(
            r#"{"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 768, "attention_head_dim": 8}"#,
        )
        .unwrap();
        assert_eq!(unet_parameters(&unet).unwrap(), 859_520_964);
        let r = &plan.rows;
        assert!(r[0].total() > r[1].total() && r[1].total() > r[2].total() && r[2].total() > r[3].total());
        assert!(r[0].total() > r[4].total() && r[4].total() > r[5].total());
        assert_eq!(r[0].frozen_weights, 2 * r[1].frozen_weights);
        // without full probabilities only the probe's 16x16 cross-attention maps remain:
        // 5 transformers at 16x16 (2 down, 3 up) x 8 heads x 256 pixels x 77 tokens x 4 bytes x 2 images
        let probe = (2 + 3) * 8 * 256 * 77 * 4 * 2;
        assert_eq!(r[2].probabilities, probe);
    }
}
