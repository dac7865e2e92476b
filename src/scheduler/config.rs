//! The noise schedule of a diffusers `scheduler/scheduler_config.json`.
//!
//! Every SD folder ships one (SD1.5 a `PNDMScheduler` config, SD2.x a `DDIMScheduler` one); the
//! beta and timestep fields mean the same whatever `_class_name` says, so both the DDPM training
//! noise and the DDIM sampler are built from it. Defaults are those of diffusers' `DDIMScheduler`.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The most training timesteps a scheduler config may declare (its schedules hold one value per step).
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// What the denoiser predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise (SD1.x).
    Epsilon,
    /// The velocity `sqrt(a) * noise - sqrt(1 - a) * x0` (SD2.x 768).
    VPrediction,
    /// The clean sample x0.
    Sample,
}

/// How inference timesteps are spread over the training ones (diffusers' `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// How the betas are laid out over the training timesteps.
#[derive(Clone, Debug, PartialEq)]
pub enum BetaSchedule {
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), N)^2` (latent diffusion).
    ScaledLinear,
    /// Glide's cosine schedule, betas capped at 0.999.
    SquaredcosCapV2,
    /// Given explicitly (`trained_betas`).
    Trained(Vec<f64>),
}

/// The fields of `scheduler_config.json` that define the noise schedule and the sampler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    /// DDIM's last step goes to alpha_cumprod 1 (true) or to alphas_cumprod[0] (false).
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub timestep_spacing: TimestepSpacing,
    /// Clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]` in DDIM steps.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            prediction_type: PredictionType::Epsilon,
            set_alpha_to_one: true,
            steps_offset: 0,
            timestep_spacing: TimestepSpacing::Leading,
            clip_sample: true,
            clip_sample_range: 1.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl SchedulerConfig {
    /// The SD1.5 schedule (scaled linear 0.00085..0.012, epsilon, steps_offset 1, no clipping).
    pub fn sd15() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            set_alpha_to_one: false,
            steps_offset: 1,
            clip_sample: false,
            ..Self::default()
        }
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in scheduler config {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).context("not a valid scheduler config")?;
        let d = Self::default();
        let beta_schedule = match (raw.trained_betas, raw.beta_schedule.as_deref()) {
            (Some(b), _) => BetaSchedule::Trained(b),
            (None, None | Some("linear")) => BetaSchedule::Linear,
            (None, Some("scaled_linear")) => BetaSchedule::ScaledLinear,
            (None, Some("squaredcos_cap_v2")) => BetaSchedule::SquaredcosCapV2,
            (None, Some(o)) => {
                bail!("beta_schedule \"{o}\" is not supported (linear, scaled_linear, squaredcos_cap_v2)")
            }
        };
        let prediction_type = match raw.prediction_type.as_deref() {
            None | Some("epsilon") => PredictionType::Epsilon,
            Some("v_prediction") => PredictionType::VPrediction,
            Some("sample") => PredictionType::Sample,
            Some(o) => bail!("prediction_type \"{o}\" is not supported (epsilon, v_prediction, sample)"),
        };
        let timestep_spacing = match raw.timestep_spacing.as_deref() {
            None | Some("leading") => TimestepSpacing::Leading,
            Some("trailing") => TimestepSpacing::Trailing,
            Some("linspace") => TimestepSpacing::Linspace,
            Some(o) => bail!("timestep_spacing \"{o}\" is not supported (leading, trailing, linspace)"),
        };
        if raw.thresholding == Some(true) {
            bail!("thresholding (dynamic thresholding of x0) is not supported; set it to false");
        }
        let cfg = Self {
            num_train_timesteps: raw.num_train_timesteps.unwrap_or(d.num_train_timesteps),
            beta_start: raw.beta_start.unwrap_or(d.beta_start),
            beta_end: raw.beta_end.unwrap_or(d.beta_end),
            beta_schedule,
            prediction_type,
            set_alpha_to_one: raw.set_alpha_to_one.unwrap_or(d.set_alpha_to_one),
            steps_offset: raw.steps_offset.unwrap_or(d.steps_offset),
            timestep_spacing,
            clip_sample: raw.clip_sample.unwrap_or(d.clip_sample),
            clip_sample_range: raw.clip_sample_range.unwrap_or(d.clip_sample_range),
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr.unwrap_or(false),
        };
        if cfg.num_train_timesteps == 0 {
            bail!("num_train_timesteps must be positive");
        }
        // The schedules allocate one value per training step: bound what a config may ask for.
        if cfg.num_train_timesteps > MAX_TRAIN_TIMESTEPS {
            bail!("num_train_timesteps {} is more than {MAX_TRAIN_TIMESTEPS} (Stable Diffusion uses 1000)", cfg.num_train_timesteps);
        }
        if let BetaSchedule::Trained(b) = &cfg.beta_schedule {
            if b.len() != cfg.num_train_timesteps {
                bail!("trained_betas has {} values but num_train_timesteps is {}", b.len(), cfg.num_train_timesteps);
            }
        }
        Ok(cfg)
    }

    /// The betas as diffusers computes them (float32 values, returned widened to f64).
    pub fn betas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match &self.beta_schedule {
            BetaSchedule::Linear => linspace_f32(self.beta_start as f32, self.beta_end as f32, n),
            BetaSchedule::ScaledLinear => linspace_f32(self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => {
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            BetaSchedule::Trained(b) => b.iter().map(|&x| x as f32).collect(),
        };
        let betas = if self.rescale_betas_zero_snr { rescale_zero_terminal_snr(&betas) } else { betas };
        betas.into_iter().map(f64::from).collect()
    }

    /// `alphas_cumprod` as diffusers holds it: float32 alphas, a cumulative product accumulated in
    /// double (torch's CPU cumprod) and stored as float32; returned widened to f64.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        cumprod_f32(&self.betas().iter().map(|&b| 1.0 - b as f32).collect::<Vec<_>>())
            .into_iter()
            .map(f64::from)
            .collect()
    }
}

/// torch.linspace in float32 (CPU kernel: first half from the start, second half from the end).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - i - 1) as f32 }).collect()
}

fn cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut s: Vec<f32> = cumprod_f32(&alphas).into_iter().map(f32::sqrt).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    let scale = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v = (*v - st) * scale;
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

#[derive(Deserialize)]
struct RawConfig {
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<String>,
    set_alpha_to_one: Option<bool>,
    steps_offset: Option<usize>,
    timestep_spacing: Option<String>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    thresholding: Option<bool>,
    rescale_betas_zero_snr: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_json_and_errors() {
        let sd15 = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;
        let c = SchedulerConfig::from_json(sd15).unwrap();
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(c.steps_offset, 1);
        assert!(!c.set_alpha_to_one && !c.clip_sample);
        let ac = c.alphas_cumprod();
        assert!((ac[0] - 0.99915).abs() < 1e-6, "{}", ac[0]);
        assert!((ac[999] - 0.0046).abs() < 1e-4, "{}", ac[999]);
        let e = SchedulerConfig::from_json(r#"{"beta_schedule": "sigmoid"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("sigmoid"));
        assert!(SchedulerConfig::from_json(r#"{"thresholding": true}"#).is_err());
        let z = SchedulerConfig { rescale_betas_zero_snr: true, ..SchedulerConfig::sd15() };
        assert_eq!(z.alphas_cumprod()[999], 0.0);
    }
}
