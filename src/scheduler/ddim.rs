//! DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", eqs. 12 and 16), as
//! diffusers' `DDIMScheduler.set_timesteps` / `step` compute it (`use_clipped_model_output`
//! false). Scalar coefficients are computed in float32, like diffusers' 0-d float32 tensors.

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
}

/// numpy's `round` (half to even).
fn round_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The inference timesteps of diffusers' `DDIMScheduler.set_timesteps`, in sampling order.
fn inference_timesteps(cfg: &SchedulerConfig, steps: usize) -> Vec<usize> {
    let n = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = n / steps;
            (0..steps).rev().map(|i| i * ratio + cfg.steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            // np.arange(n, 0, -ratio): ceil(n / ratio) values n - i * ratio
            let len = (n as f64 / ratio).ceil() as usize;
            (0..len).map(|i| round_even(n as f64 - i as f64 * ratio) as usize - 1).collect()
        }
        TimestepSpacing::Linspace => {
            // np.linspace(0, n - 1, steps): i * step, the last value exactly n - 1
            let last = (n - 1) as f64;
            let step = if steps > 1 { last / (steps - 1) as f64 } else { 0.0 };
            (0..steps)
                .rev()
                .map(|i| if i + 1 == steps && steps > 1 { n - 1 } else { round_even(i as f64 * step) as usize })
                .collect()
        }
    }
}

impl DdimScheduler {
    /// A sampler for `num_inference_steps` steps over the schedule of `config`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let n = config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n {
            bail!("num_inference_steps must be in 1..={n} (num_train_timesteps), got {num_inference_steps}");
        }
        let alphas_cumprod: Vec<f32> = config.alphas_cumprod().into_iter().map(|a| a as f32).collect();
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let timesteps = inference_timesteps(config, num_inference_steps);
        if let Some(&t) = timesteps.iter().find(|&&t| t >= n) {
            bail!("timestep {t} (steps_offset {}) is outside the {n} training timesteps", config.steps_offset);
        }
        Ok(Self { config: config.clone(), alphas_cumprod, final_alpha_cumprod, num_inference_steps, timesteps })
    }

    /// The timesteps to visit, from the noisiest.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Standard deviation of the initial latent noise.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// DDIM needs no input scaling; kept for symmetry with other samplers.
    pub fn scale_model_input(&self, sample: Tensor, _timestep: usize) -> Tensor {
        sample
    }

    /// `(alpha_prod_t, alpha_prod_t_prev)` for a step from `timestep`.
    fn alphas(&self, timestep: usize) -> candle_core::Result<(f32, f32)> {
        let Some(&a_t) = self.alphas_cumprod.get(timestep) else {
            candle_core::bail!("timestep {timestep} outside 0..{}", self.alphas_cumprod.len())
        };
        let prev = timestep as i64 - (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        Ok((a_t, a_prev))
    }

    /// One DDIM step from `sample` at `timestep` to the previous timestep. With `eta > 0`,
    /// `variance_noise` (standard normal, shaped like `sample`) must be given unless it is
    /// drawn here with candle's generator.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        eta: f64,
        variance_noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (a_t, a_prev) = self.alphas(timestep)?;
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt() as f64, b_t.sqrt() as f64);
        let (x0, eps) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((sample - (model_output * sb)?)? / sa)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = ((sample - (model_output * sa)?)? / sb)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = ((sample * sa)? - (model_output * sb)?)?;
                let eps = ((model_output * sa)? + (sample * sb)?)?;
                (x0, eps)
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std_dev_t = eta as f32 * variance.sqrt();
        let dir_coef = (1.0 - a_prev - std_dev_t * std_dev_t).max(0.0).sqrt();
        let prev = ((x0 * a_prev.sqrt() as f64)? + (eps * dir_coef as f64)?)?;
        if eta > 0.0 {
            let noise = match variance_noise {
                Some(n) => n.clone(),
                None => sample.randn_like(0.0, 1.0)?,
            };
            prev + (noise * std_dev_t as f64)?
        } else {
            Ok(prev)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings() {
        let sd15 = SchedulerConfig::sd15();
        let s = DdimScheduler::new(&sd15, 50).unwrap();
        assert_eq!(s.timesteps().len(), 50);
        assert_eq!((s.timesteps()[0], s.timesteps()[1], s.timesteps()[49]), (981, 961, 1));
        let tr = SchedulerConfig { timestep_spacing: TimestepSpacing::Trailing, ..sd15.clone() };
        let t = DdimScheduler::new(&tr, 50).unwrap();
        assert_eq!((t.timesteps()[0], t.timesteps()[49], t.timesteps().len()), (999, 19, 50));
        let li = SchedulerConfig { timestep_spacing: TimestepSpacing::Linspace, ..sd15 };
        let l = DdimScheduler::new(&li, 4).unwrap();
        assert_eq!(l.timesteps(), &[999, 666, 333, 0]);
        assert!(DdimScheduler::new(&li, 2000).is_err());
    }
}
