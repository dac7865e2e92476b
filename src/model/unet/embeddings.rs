//! Timestep embeddings: diffusers' `get_timestep_embedding` sinusoid (`time_proj`, always
//! computed in f32, one timestep per sample) and the `TimestepEmbedding` MLP (`time_embedding`).

use crate::model::nn::Linear;
use crate::model::ops;
use crate::model::weights::Vb;
use candle_core::{DType, Module, Result, Tensor};

/// Sinusoidal embedding `[B, dim]` (f32) of `timesteps` `[B]` (any numeric dtype), exactly as
/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift=freq_shift,
/// scale=1, max_period=10000)`.
pub fn timestep_sinusoid(timesteps: &Tensor, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let ln_max = (10000f64).ln() as f32;
    let denom = (half as f64 - freq_shift) as f32;
    // torch: exp((-ln(max_period) * arange(half, f32)) / (half - shift)), all in f32.
    let freqs: Vec<f32> = (0..half).map(|i| ((-ln_max * i as f32) / denom).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.reshape(((), 1))?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `linear_1 -> SiLU -> linear_2` (diffusers `TimestepEmbedding` with act_fn "silu").
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: Vb, in_dim: usize, time_embed_dim: usize) -> anyhow::Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, time_embed_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&ops::silu(&self.linear_1.forward(x)?)?)
    }
}
