//! The training side of DDPM (Ho et al. 2020): forward noising `q(x_t | x_0)` at one timestep
//! per sample, and the regression target for each `prediction_type`, as diffusers'
//! `DDPMScheduler.add_noise` / `get_velocity` compute them.

use super::config::{PredictionType, SchedulerConfig};
use candle_core::{DType, Result, Tensor};

/// `alphas_cumprod` of a schedule and the forward-noising formulas.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
}

/// The schedule used for training (diffusers calls it the DDPM scheduler).
pub type Ddpm = NoiseSchedule;

impl NoiseSchedule {
    pub fn new(config: SchedulerConfig) -> Self {
        let alphas_cumprod = config.alphas_cumprod();
        Self { config, alphas_cumprod }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    /// `alphas_cumprod[t]` (float32 values, as diffusers holds them).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Per-sample coefficients `(sqrt(a_t), sqrt(1 - a_t))`, shaped `[B, 1, 1, ...]` to
    /// broadcast against `like`. `timesteps` is an integer (u32/i64) or float tensor of shape [B].
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let ts: Vec<i64> = timesteps.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        let b = like.dim(0)?;
        if ts.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", ts.len());
        }
        let mut sa = Vec::with_capacity(b);
        let mut s1a = Vec::with_capacity(b);
        for &t in &ts {
            if t < 0 || t as usize >= self.alphas_cumprod.len() {
                candle_core::bail!("timestep {t} outside 0..{}", self.alphas_cumprod.len());
            }
            let a = self.alphas_cumprod[t as usize] as f32;
            sa.push(a.sqrt());
            s1a.push((1.0 - a).sqrt());
        }
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, like.rank() - 1));
        let dev = like.device();
        let sa = Tensor::from_vec(sa, shape.clone(), dev)?.to_dtype(like.dtype())?;
        let s1a = Tensor::from_vec(s1a, shape, dev)?.to_dtype(like.dtype())?;
        Ok((sa, s1a))
    }

    /// `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`, with one timestep per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sa, s1a) = self.coefficients(timesteps, x0)?;
        x0.broadcast_mul(&sa)?.add(&noise.broadcast_mul(&s1a)?)
    }

    /// `v = sqrt(a_t) noise - sqrt(1 - a_t) x0`.
    pub fn get_velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sa, s1a) = self.coefficients(timesteps, x0)?;
        noise.broadcast_mul(&sa)?.sub(&x0.broadcast_mul(&s1a)?)
    }

    /// What the denoiser is trained to output: noise, velocity or x0 by `prediction_type`.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        match self.config.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.get_velocity(x0, noise, timesteps),
            PredictionType::Sample => Ok(x0.clone()),
        }
    }
}
