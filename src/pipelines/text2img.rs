//! Text-to-image with classifier-free guidance and the DDIM sampler, step for step as diffusers'
//! `StableDiffusionPipeline` with a `DDIMScheduler`:
//!
//! 1. encode the prompt and the negative prompt (empty by default) with the text encoder;
//! 2. start from Gaussian latents [N, 4, H/8, W/8] (or given ones);
//! 3. for each DDIM timestep: run the UNet on [uncond; cond], guide
//!    `eps = eps_u + g (eps_c - eps_u)`, take a DDIM step with `eta`;
//! 4. decode `latents / scaling_factor (+ shift)` with the VAE to an image in [0, 1].

use crate::model::sd::StableDiffusion;
use crate::model::unet::{AttentionProbe, CapturedAttention, ForwardOptions};
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

/// Context embeddings [N, 77, D] of a prompt, repeated for `n` images.
pub fn encode_prompt(sd: &StableDiffusion, prompt: &str, n: usize) -> Result<Tensor> {
    let ids = sd.tokenizer.encode_warn(prompt);
    let len = ids.len();
    let ids = Tensor::from_vec(ids, (1, len), &sd.device)?;
    let hidden = sd.text_encoder.forward(&ids)?;
    Ok(hidden.repeat((n, 1, 1))?.to_dtype(sd.dtype)?)
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
    sample_latents_observed(sd, p, None, |_| Ok(()), on_step)
}

/// [`sample_latents`] with the UNet's attention probe on: `observe` sees each step's captured
/// cross-attention of the conditional branch ([N, heads, HW, T] per layer).
pub fn sample_latents_observed(
    sd: &StableDiffusion,
    p: &Text2ImageParams,
    probe: Option<AttentionProbe>,
    mut observe: impl FnMut(&[CapturedAttention]) -> Result<()>,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    if p.num_images == 0 {
        bail!("num_images must be at least 1");
    }
    if p.steps == 0 {
        bail!("steps must be at least 1");
    }
    let shape = latent_shape(sd, p)?;
    let mut rng = util::seeded_rng(p.seed);
    let mut latents = match &p.latents {
        Some(l) => {
            if l.dims() != shape {
                bail!("the latents have shape {:?}, but these settings need {:?}", l.dims(), shape);
            }
            l.to_device(&sd.device)?.to_dtype(DType::F32)?
        }
        None => util::randn(&mut rng, &shape, &sd.device)?,
    };
    let scheduler = DdimScheduler::new(&sd.scheduler_config, p.steps)?;
    latents = (latents * scheduler.init_noise_sigma())?;

    let guided = p.guidance_scale > 1.0;
    let cond = encode_prompt(sd, &p.prompt, p.num_images)?;
    let context = if guided {
        let uncond = encode_prompt(sd, &p.negative_prompt, p.num_images)?;
        Tensor::cat(&[&uncond, &cond], 0)?
    } else {
        cond
    };
    let n = p.num_images;
    let total = scheduler.timesteps().len();
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let ts = Tensor::new(vec![t as f32; input.dim(0)?], &sd.device)?;
        let opts = ForwardOptions { probe: probe.clone(), detach_start_token_kv: false };
        let result = sd.unet.forward_with(&input.to_dtype(sd.dtype)?, &ts, &context, &opts)?;
        if probe.is_some() {
            let cond: Vec<CapturedAttention> = result
                .attention
                .iter()
                .map(|a| {
                    let probs = if guided { a.probs.narrow(0, n, n)? } else { a.probs.clone() };
                    Ok(CapturedAttention { probs, ..a.clone() })
                })
                .collect::<Result<_>>()?;
            observe(&cond)?;
        }
        let out = result.sample.to_dtype(DType::F32)?;
        let eps = if guided {
            let (u, c) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
            (&u + ((c - &u)? * p.guidance_scale)?)?
        } else {
            out
        };
        let noise = if p.eta > 0.0 { Some(util::randn(&mut rng, &shape, &sd.device)?) } else { None };
        latents = scheduler.step(&eps, t, &latents, p.eta, noise.as_ref())?;
        on_step(i + 1, total);
    }
    Ok(latents)
}

/// Decodes scaled latents to images [N, 3, H, W] in [0, 1].
pub fn decode_latents(sd: &StableDiffusion, latents: &Tensor) -> Result<Tensor> {
    let z = ((latents / sd.vae.scaling_factor())? + sd.vae.shift_factor())?;
    let img = sd.vae.decode(&z.to_dtype(sd.dtype)?)?.to_dtype(DType::F32)?;
    Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// The whole pipeline: prompt -> images [N, 3, H, W] in [0, 1].
pub fn generate(sd: &StableDiffusion, p: &Text2ImageParams, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
    let latents = sample_latents(sd, p, on_step)?;
    decode_latents(sd, &latents)
}
