//! The UNet's down, mid and up blocks: diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn` and `CrossAttnUpBlock2D` / `UpBlock2D` (a block without
//! attentions is the plain variant).

use super::attention::{RunCtx, TransformerParams, Transformer2DModel};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetParams, Upsample2D};
use crate::model::weights::Vb;
use candle_core::{Module, Result, Tensor};

/// `resnets.{i}` (+ `attentions.{i}`) then an optional `downsamplers.0`.
#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

/// What differs between blocks: channels, layer counts, attention (None = no attentions).
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    pub num_layers: usize,
    pub attention: Option<TransformerParams>,
    pub resnet: ResnetParams,
}

fn attentions(vb: &Vb, spec: &BlockSpec, channels: usize, n: usize) -> anyhow::Result<Vec<Transformer2DModel>> {
    match spec.attention {
        None => Ok(Vec::new()),
        Some(p) => (0..n).map(|i| Transformer2DModel::new(vb.pp("attentions").pp(i), channels, p)).collect(),
    }
}

impl DownBlock {
    pub fn new(vb: Vb, c_in: usize, c_out: usize, spec: BlockSpec, downsample: Option<usize>) -> anyhow::Result<Self> {
        let resnets = (0..spec.num_layers)
            .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), if i == 0 { c_in } else { c_out }, c_out, spec.resnet))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let downsampler = match downsample {
            Some(pad) => Some(Downsample2D::new(vb.pp("downsamplers").pp(0), c_out, pad)?),
            None => None,
        };
        Ok(Self { attentions: attentions(&vb, &spec, c_out, spec.num_layers)?, resnets, downsampler })
    }

    /// Returns the block output and the skip connections it contributes.
    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, cx: &mut RunCtx) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward_checkpointed(&h, temb, cx.opts.gradient_checkpointing)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, cx)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `resnets.0`, then (`attentions.{i}`, `resnets.{i+1}`) pairs.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// `spec.num_layers` is the number of attention layers (1 for SD).
    pub fn new(vb: Vb, channels: usize, spec: BlockSpec) -> anyhow::Result<Self> {
        let resnets = (0..=spec.num_layers)
            .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), channels, channels, spec.resnet))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { attentions: attentions(&vb, &spec, channels, spec.num_layers)?, resnets })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, cx: &mut RunCtx) -> Result<Tensor> {
        let mut h = self.resnets[0].forward_checkpointed(x, temb, cx.opts.gradient_checkpointing)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context, cx)?;
            h = resnet.forward_checkpointed(&h, temb, cx.opts.gradient_checkpointing)?;
        }
        Ok(h)
    }
}

/// `resnets.{i}` on [h, skip] concatenations (+ `attentions.{i}`), then an optional `upsamplers.0`.
#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `c_in`: channels of the deepest skip this block reads (diffusers' `in_channels`);
    /// `c_prev`: channels coming from the previous up block (or the mid block).
    pub fn new(vb: Vb, c_in: usize, c_out: usize, c_prev: usize, spec: BlockSpec, upsample: bool) -> anyhow::Result<Self> {
        let n = spec.num_layers;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i == n - 1 { c_in } else { c_out };
                let from = if i == 0 { c_prev } else { c_out };
                ResnetBlock2D::new(vb.pp("resnets").pp(i), from + skip, c_out, spec.resnet)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let upsampler = if upsample { Some(Upsample2D::new(vb.pp("upsamplers").pp(0), c_out)?) } else { None };
        Ok(Self { attentions: attentions(&vb, &spec, c_out, n)?, resnets, upsampler })
    }

    /// `skips`: this block's skip connections in the order they were produced (the last is
    /// consumed first); `size`: spatial size to upsample to (that of the next skip).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        size: Option<(usize, usize)>,
        cx: &mut RunCtx,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = resnet.forward_checkpointed(&Tensor::cat(&[&h, skip], 1)?, temb, cx.opts.gradient_checkpointing)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, cx)?;
            }
        }
        match &self.upsampler {
            Some(u) => u.forward(&h, size),
            None => Ok(h),
        }
    }
}
