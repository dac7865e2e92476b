//! diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x/2.x (incl. 9-channel inpainting),
//! loaded strictly from a diffusers `unet/` folder, with an attention probe for training losses.
//!
//! Module paths mirror diffusers weight names: `conv_in`, `time_embedding.linear_{1,2}`,
//! `down_blocks.{i}.{resnets,attentions,downsamplers}`, `mid_block`, `up_blocks.{i}...`,
//! `conv_norm_out`, `conv_out`. Everything back-propagates (attention uses the differentiable
//! `ops::softmax_last_dim`).

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod resnet;

pub use config::UNetConfig;

use crate::model::nn::{Conv2d, GroupNorm};
use crate::model::weights::Vb;
use attention::{RunCtx, TransformerParams};
use blocks::{BlockSpec, DownBlock, MidBlock, UpBlock};
use candle_core::{DType, Module, Result, Tensor};
use config::{block_type, CROSS_DOWN, CROSS_UP};
use embeddings::{timestep_sinusoid, TimestepEmbedding};
use resnet::ResnetParams;

/// Which cross-attention maps to capture: query grids whose longer side is in `resolutions`
/// (e.g. `[16]`); empty = every cross-attention layer.
#[derive(Clone, Debug, Default)]
pub struct AttentionProbe {
    pub resolutions: Vec<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct ForwardOptions {
    pub probe: Option<AttentionProbe>,
    /// Detach the key and value rows of token 0 in every cross-attention (Custom Diffusion's
    /// mask: the start token gives W_K/W_V no gradient). Forward values are unchanged.
    pub detach_start_token_kv: bool,
    /// Recompute the resnets' and the unprobed transformers' activations in the backward pass
    /// instead of keeping them (diffusers' `--gradient_checkpointing`; `model::checkpoint`).
    /// Every weight inside those blocks must be frozen: the cross-attention keys and values
    /// are computed outside them, so K/V training and new embeddings work; DreamBooth's
    /// whole-UNet training is refused. Forward values are unchanged.
    pub gradient_checkpointing: bool,
}

/// One captured cross-attention map.
#[derive(Clone, Debug)]
pub struct CapturedAttention {
    /// Diffusers module path of the attn2 module,
    /// e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    pub layer: String,
    pub height: usize,
    pub width: usize,
    /// `softmax(Q K^T / sqrt(d))`, [B, heads, H*W, T], f32, still in the autograd graph.
    pub probs: Tensor,
}

#[derive(Clone, Debug)]
pub struct UNetOutput {
    pub sample: Tensor,
    /// In forward order (down blocks, mid block, up blocks).
    pub attention: Vec<CapturedAttention>,
}

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    dtype: DType,
}

impl UNet2DConditionModel {
    pub fn new(vb: Vb, cfg: &UNetConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let r = cfg.resolved()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let groups = cfg.norm_num_groups.unwrap_or(32);
        let temb = cfg.time_embed_dim();
        let resnet = ResnetParams { temb_channels: temb, groups, eps: cfg.norm_eps, output_scale_factor: 1.0 };
        let attn = |i: usize, cross: bool| {
            cross.then_some(TransformerParams {
                heads: r.heads[i],
                num_layers: r.transformer_layers[i],
                context_dim: cfg.cross_attention_dim,
                groups,
                use_linear_projection: cfg.use_linear_projection,
                upcast_attention: cfg.upcast_attention,
            })
        };

        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            let cross = block_type(&cfg.down_block_types[i]) == CROSS_DOWN;
            let spec = BlockSpec { num_layers: r.layers[i], attention: attn(i, cross), resnet };
            let down = (i + 1 < n).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock::new(vb.pp("down_blocks").pp(i), c_in, ch[i], spec, down)?);
        }

        let mid_block = match &cfg.mid_block_type {
            Some(_) => {
                let spec = BlockSpec {
                    num_layers: 1,
                    attention: attn(n - 1, true),
                    resnet: ResnetParams { output_scale_factor: cfg.mid_block_scale_factor, ..resnet },
                };
                Some(MidBlock::new(vb.pp("mid_block"), ch[n - 1], spec)?)
            }
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let j = n - 1 - i; // the matching down block
            let c_out = ch[j];
            let c_prev = ch[(j + 1).min(n - 1)];
            let c_in = ch[j.saturating_sub(1)];
            let cross = block_type(&cfg.up_block_types[i]) == CROSS_UP;
            let spec = BlockSpec { num_layers: r.layers[j] + 1, attention: attn(j, cross), resnet };
            up_blocks.push(UpBlock::new(vb.pp("up_blocks").pp(i), c_in, c_out, c_prev, spec, i + 1 < n)?);
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, ch[0], cfg.norm_eps)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            dtype: vb.dtype(),
        })
    }

    /// Predicted noise (or v) for `sample` [B, C, H, W] at `timesteps` [B] (one per sample, any
    /// numeric dtype; a single value is broadcast) given `context` [B, T, D].
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with(sample, timesteps, context, &ForwardOptions::default())?.sample)
    }

    pub fn forward_with(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor, opts: &ForwardOptions) -> Result<UNetOutput> {
        let (b, _, _, _) = sample.dims4()?;
        let cfg = &self.config;
        let mut cx = RunCtx { opts, captured: Vec::new() };

        // Time embedding: sinusoid in f32, then the model dtype (as diffusers).
        let t = timesteps.flatten_all()?;
        let t = match t.elem_count() {
            1 if b != 1 => t.broadcast_as(b)?,
            m if m == b => t,
            m => candle_core::bail!("unet: {m} timesteps for a batch of {b}"),
        };
        let t_emb = timestep_sinusoid(&t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)?;
        let emb = self.time_embedding.forward(&t_emb.to_dtype(self.dtype)?)?;

        let mut x = sample.to_dtype(self.dtype)?;
        if cfg.center_input_sample {
            x = x.affine(2.0, -1.0)?;
        }
        let context = context.to_dtype(self.dtype)?;
        x = self.conv_in.forward(&x)?;

        let mut skips = vec![x.clone()];
        for blk in &self.down_blocks {
            let (h, s) = blk.forward(&x, &emb, &context, &mut cx)?;
            x = h;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &emb, &context, &mut cx)?;
        }
        for blk in &self.up_blocks {
            let take = blk.resnets.len().min(skips.len());
            let res = skips.split_off(skips.len() - take);
            // Upsample to the next skip's size: x2, or diffusers' `upsample_size` for odd sizes.
            let size = skips.last().map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)));
            x = blk.forward(&x, res, &emb, &context, size, &mut cx)?;
        }

        let x = self.conv_norm_out.forward_silu(&x)?;
        let sample = self.conv_out.forward(&x)?;
        Ok(UNetOutput { sample, attention: cx.captured })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
