//! Text-to-image with classifier-free guidance and the DDIM sampler, step for step as diffusers'
//! `StableDiffusionPipeline` with a `DDIMScheduler`:
//!
//! 1. encode the prompt and the negative prompt (empty by default) with the text encoder;
//! 2. start from Gaussian latents [N, 4, H/8, W/8] (or given ones) times `init_noise_sigma`;
//! 3. run every DDIM timestep of the shared loop ([`super::denoise`]) on the latents;
//! 4. decode `latents / scaling_factor (+ shift)` with the VAE to an image in [0, 1].

use super::denoise::{Denoise, Hooks, Plain, PromptEmbeddings};
pub use super::denoise::encode_prompt;
pub use super::latents::decode_latents;
use crate::model::sd::StableDiffusion;
use crate::scheduler::DdimScheduler;
use crate::util;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Clone, Debug)]
pub struct Text2ImageParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub eta: f64,
    pub seed: u64,
    pub num_images: usize,
    pub height: usize,
    pub width: usize,
    /// Initial noise [num_images, C, H/f, W/f]; drawn from `seed` when absent.
    pub latents: Option<Tensor>,
}

impl Text2ImageParams {
    /// diffusers' defaults for a model: 50 steps, guidance 7.5, eta 0, the model's native size.
    pub fn new(sd: &StableDiffusion, prompt: &str) -> Self {
        let side = sd.default_size();
        Self {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            steps: 50,
            guidance_scale: 7.5,
            eta: 0.0,
            seed: 0,
            num_images: 1,
            height: side,
            width: side,
            latents: None,
        }
    }
}

/// The latent shape for `params`, checking the size against the VAE factor.
pub fn latent_shape(sd: &StableDiffusion, p: &Text2ImageParams) -> Result<[usize; 4]> {
    let f = sd.vae_scale_factor();
    if p.height == 0 || p.width == 0 || p.height % f != 0 || p.width % f != 0 {
        bail!("height and width must be positive multiples of {f} (the VAE factor), got {}x{}", p.height, p.width);
    }
    let c = sd.vae_config.latent_channels;
    Ok([p.num_images, c, p.height / f, p.width / f])
}

/// Runs the sampler and returns the final latents (scaled, as the UNet sees them).
/// `on_step(i, total)` is called after each step.
pub fn sample_latents(sd: &StableDiffusion, p: &Text2ImageParams, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
    sample_latents_with(sd, p, &mut Plain, on_step)
}

/// [`sample_latents`] with the loop's hooks (e.g. an attention observer).
pub fn sample_latents_with(
    sd: &StableDiffusion,
    p: &Text2ImageParams,
    hooks: &mut impl Hooks,
    on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    if p.num_images == 0 {
        bail!("num_images must be at least 1");
    }
    if p.steps == 0 {
        bail!("steps must be at least 1");
    }
    let shape = latent_shape(sd, p)?;
    let mut rng = util::seeded_rng(p.seed);
    let latents = match &p.latents {
        Some(l) => {
            if l.dims() != shape {
                bail!("the latents have shape {:?}, but these settings need {:?}", l.dims(), shape);
            }
            l.to_device(&sd.device)?.to_dtype(DType::F32)?
        }
        None => util::randn(&mut rng, &shape, &sd.device)?,
    };
    let scheduler = DdimScheduler::new(&sd.scheduler_config, p.steps)?;
    let latents = (latents * scheduler.init_noise_sigma())?;
    let prompt = PromptEmbeddings::new(sd, &p.prompt, &p.negative_prompt, p.num_images, p.guidance_scale)?;
    let run = Denoise { sd, prompt: &prompt, scheduler: &scheduler, timesteps: scheduler.timesteps(), eta: p.eta };
    run.run(latents, &mut rng, hooks, on_step)
}

/// The whole pipeline: prompt -> images [N, 3, H, W] in [0, 1].
pub fn generate(sd: &StableDiffusion, p: &Text2ImageParams, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
    let latents = sample_latents(sd, p, on_step)?;
    decode_latents(sd, &latents)
}
