//! diffusers' `ResnetBlock2D` (time_embedding_norm "default", SiLU), `Downsample2D` and
//! `Upsample2D` (both with a 3x3 conv), as used by `UNet2DConditionModel`.

use crate::model::checkpoint::checkpoint;
use crate::model::nn::{Conv2d, GroupNorm, Linear};
use crate::model::ops;
use crate::model::weights::Vb;
use candle_core::{Module, Result, Tensor};

/// `norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb))) -> norm2 -> SiLU -> conv2`, plus the
/// (1x1 `conv_shortcut` when channels change) residual, divided by `output_scale_factor`.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

/// Construction parameters shared by every resnet of a UNet.
#[derive(Clone, Copy, Debug)]
pub struct ResnetParams {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: Vb, c_in: usize, c_out: usize, p: ResnetParams) -> anyhow::Result<Self> {
        let conv_shortcut =
            if c_in != c_out { Some(Conv2d::new(vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), p.groups, c_in, p.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: Linear::new(vb.pp("time_emb_proj"), p.temb_channels, c_out, true)?,
            norm2: GroupNorm::new(vb.pp("norm2"), p.groups, c_out, p.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: p.output_scale_factor,
        })
    }

    /// `x`: [B, C_in, H, W]; `temb`: [B, temb_channels].
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // the time embedding and the shortcut are the convolutions' starting values
        let t = self.time_emb_proj.forward(&ops::silu(temb)?)?;
        let h = self.conv1.forward_accumulate(&self.norm1.forward_silu(x)?, Some(&t), None)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = self.conv2.forward_accumulate(&self.norm2.forward_silu(&h)?, None, Some(&shortcut))?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out.affine(1.0 / self.output_scale_factor, 0.0)
        }
    }

    /// [`Self::forward`], its activations recomputed in the backward pass when `checkpointed`
    /// and `x` is in an autograd graph (`model::checkpoint`; the block's weights and `temb`
    /// must then be frozen).
    pub fn forward_checkpointed(&self, x: &Tensor, temb: &Tensor, checkpointed: bool) -> Result<Tensor> {
        if !(checkpointed && x.track_op()) {
            return self.forward(x, temb);
        }
        let (this, temb) = (self.clone(), temb.clone());
        checkpoint(&[x], Box::new(move |xs: &[Tensor]| this.forward(&xs[0], &temb)))
    }
}

/// 3x3 conv with stride 2 (`downsamplers.0.conv`); with `downsample_padding` 0 the input is
/// first zero-padded by one on the right and bottom, as diffusers does.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub padding: usize,
}

impl Downsample2D {
    pub fn new(vb: Vb, channels: usize, padding: usize) -> anyhow::Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding)?, padding })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            self.conv.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling to `size` (x2 when `None`), then a 3x3 conv (`upsamplers.0.conv`).
#[derive(Clone, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: Vb, channels: usize) -> anyhow::Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}
