//! Image-to-image (SDEdit, Meng et al. 2022), step for step as diffusers'
//! `StableDiffusionImg2ImgPipeline` with a `DDIMScheduler`:
//!
//! 1. encode the prompt and the negative prompt with the text encoder;
//! 2. encode the image [-1, 1] with the VAE and scale it: `x0 = scaling_factor * z`, where `z` is
//!    the posterior **mean** (diffusers draws a sample of the posterior with its generator; the
//!    mean keeps the image's content exactly and leaves the seed only the added noise), repeated
//!    for each image;
//! 3. run only the last `int(steps * strength)` DDIM timesteps ([`SamplingParams::timesteps`])
//!    and start from `x0` noised to the first of them, `sqrt(a_t) x0 + sqrt(1 - a_t) noise`;
//! 4. the shared loop ([`super::denoise`]) over those timesteps, then decode as text-to-image.

use super::denoise::{Denoise, Plain};
use super::latents::{decode_latents, encode_image};
use super::sampling::SamplingParams;
use crate::model::sd::StableDiffusion;
use crate::scheduler::NoiseSchedule;
use crate::util;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Clone, Debug)]
pub struct Img2ImgParams {
    /// Prompt, steps, strength (0 keeps the image, 1 is pure noise, as text-to-image), guidance...
    pub sampling: SamplingParams,
    /// The start image [1 or num_images, 3, H, W] in [-1, 1] (e.g. [`util::rgb_to_tensor`]).
    pub image: Tensor,
    /// The noise added to the image latents [num_images, 4, H/f, W/f]; drawn from `seed` when
    /// absent (given, it makes a run comparable with another implementation).
    pub noise: Option<Tensor>,
}

impl Img2ImgParams {
    /// diffusers' defaults: 50 steps, strength 0.8, guidance 7.5, eta 0.
    pub fn new(prompt: &str, image: Tensor) -> Self {
        Self { sampling: SamplingParams::new(prompt, 0.8), image, noise: None }
    }
}

/// Runs the sampler from the noised image and returns the final (scaled) latents.
/// `on_step(i, total)` is called after each of the `total` steps run.
pub fn sample_latents(sd: &StableDiffusion, p: &Img2ImgParams, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
    let n = p.sampling.num_images;
    let scheduler = p.sampling.scheduler(sd)?;
    let timesteps = p.sampling.timesteps(&scheduler)?;
    let x0 = encode_image(sd, &p.image)?;
    let x0 = match x0.dim(0)? {
        b if b == n => x0,
        1 => x0.repeat((n, 1, 1, 1))?,
        b => bail!("{b} start images for {n} images (give 1 or {n})"),
    };
    let mut rng = util::seeded_rng(p.sampling.seed);
    let noise = match &p.noise {
        Some(e) => {
            if e.dims() != x0.dims() {
                bail!("the noise has shape {:?}, but the image latents are {:?}", e.dims(), x0.dims());
            }
            e.to_device(&sd.device)?.to_dtype(DType::F32)?
        }
        None => util::randn(&mut rng, x0.dims(), &sd.device)?,
    };
    let t0 = Tensor::new(vec![timesteps[0] as i64; n], &sd.device)?;
    let latents = NoiseSchedule::new(sd.scheduler_config.clone()).add_noise(&x0, &noise, &t0)?;
    let prompt = p.sampling.prompt_embeddings(sd)?;
    let run = Denoise { sd, prompt: &prompt, scheduler: &scheduler, timesteps, eta: p.sampling.eta };
    run.run(latents, &mut rng, &mut Plain, on_step)
}

/// The whole pipeline: prompt and image -> images [N, 3, H, W] in [0, 1].
pub fn generate(sd: &StableDiffusion, p: &Img2ImgParams, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
    let latents = sample_latents(sd, p, on_step)?;
    decode_latents(sd, &latents)
}
