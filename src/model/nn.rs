//! Layers shared by the text encoder, UNet and VAE, each loaded from its diffusers path.
//!
//! All ops here back-propagate (see `ops.rs` for why that is not a given in candle).

use super::{kernels, ops};
use super::weights::Vb;
use anyhow::Result;
use candle_core::{DType, Module, Tensor};

/// `y = x W^T + b` over the last dimension (torch.nn.Linear).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }

    /// `forward(x) + residual`: outside the autograd graph the residual is the product's
    /// starting value (no separate add pass).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let k = x.dim(candle_core::D::Minus1)?;
        let o = self.weight.dim(0)?;
        let rows = x.elem_count() / k.max(1);
        if self.weight.dtype() == x.dtype() && residual.elem_count() == rows * o {
            let (x2, r2) = (x.reshape((rows, k))?, residual.reshape((rows, o))?);
            if let Some(y) = ops::linear_residual_untracked(&x2, &self.weight, self.bias.as_ref(), &r2)? {
                return y.reshape(residual.dims());
            }
        }
        self.forward(x)? + residual
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let w = if self.weight.dtype() != x.dtype() { self.weight.to_dtype(x.dtype())? } else { self.weight.clone() };
        let y = ops::linear(&x.reshape((rows, in_dim))?, &w, self.bias.as_ref())?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// 2-D convolution, NCHW (torch.nn.Conv2d with square kernel).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn new(vb: Vb, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        let bias = Some(vb.get(c_out, "bias")?);
        Ok(Self { weight, bias, stride, padding })
    }

    /// `forward(x) + image_bias[:, :, None, None] + residual` (`image_bias` [B, C_out]):
    /// outside the autograd graph both are the product's starting value (no add passes).
    pub fn forward_accumulate(&self, x: &Tensor, image_bias: Option<&Tensor>, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        if let Some(y) = ops::conv2d_accumulate_untracked(x, &self.weight, self.bias.as_ref(), image_bias, residual, self.padding, self.stride)? {
            return Ok(y);
        }
        let mut y = self.forward(x)?;
        if let Some(t) = image_bias {
            y = y.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        match residual {
            Some(r) => r + y,
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::conv2d(x, &self.weight, self.bias.as_ref(), self.padding, self.stride)
    }
}

/// Group normalisation over NC... tensors (torch.nn.GroupNorm), statistics in f32.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: Vb, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        anyhow::ensure!(
            channels % groups == 0,
            "{}: {channels} channels cannot be split into {groups} groups (norm_num_groups)",
            vb.prefix()
        );
        Ok(Self { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, groups, eps })
    }
}

impl GroupNorm {
    /// Whether the fused kernel applies: f32 on the CPU, nothing in the autograd graph.
    fn fused(&self, x: &Tensor) -> bool {
        ops::fast_cpu(&[x, &self.weight, &self.bias])
    }

    /// `silu(group_norm(x))`, in one pass where the fused kernel applies.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused(x) {
            return kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true);
        }
        ops::silu(&self.forward(x)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused(x) {
            return kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, false);
        }
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let xg = x.to_dtype(DType::F32)?.reshape((b * self.groups, ()))?;
        let xn = ops::normalize_last_dim(&xg, self.eps)?.reshape(dims.clone())?.to_dtype(dtype)?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        ops::affine(&xn, &self.weight, &self.bias, &shape)
    }
}

/// Layer normalisation over the last dimension (torch.nn.LayerNorm), statistics in f32.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Exact (erf) GELU, as torch's default.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu_erf()
}

