//! The sampling settings that the pipelines starting from a picture share (image-to-image
//! [`super::img2img`], inpainting [`super::inpaint`]), named as diffusers names them
//! (`prompt`, `negative_prompt`, `num_inference_steps`, `strength`, `guidance_scale`, `eta`,
//! `num_images_per_prompt`), and the checks and schedule that follow from them alone.

use super::denoise::{get_timesteps, PromptEmbeddings};
use crate::model::sd::StableDiffusion;
use crate::scheduler::DdimScheduler;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance ("" by default).
    pub negative_prompt: String,
    /// DDIM steps of the full schedule; `int(steps * strength)` of them are run.
    pub steps: usize,
    /// How far the picture is noised before denoising, 0 (kept) to 1 (pure noise).
    pub strength: f64,
    /// Classifier-free guidance scale (1 or less: no guidance).
    pub guidance_scale: f64,
    /// DDIM eta: 0 is deterministic.
    pub eta: f64,
    /// Seed of the noise that is not given, and of the eta noise.
    pub seed: u64,
    /// Images to make (in one batch).
    pub num_images: usize,
}

impl SamplingParams {
    /// diffusers' defaults (50 steps, guidance 7.5, eta 0, one image, no negative prompt) with the
    /// pipeline's default `strength` (image-to-image 0.8, inpainting 1).
    pub fn new(prompt: &str, strength: f64) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            steps: 50,
            strength,
            guidance_scale: 7.5,
            eta: 0.0,
            seed: 0,
            num_images: 1,
        }
    }

    /// Checks the settings (at least one image and one step, a strength in [0, 1] that runs at
    /// least one step) and returns the DDIM scheduler of `steps`.
    pub fn scheduler(&self, sd: &StableDiffusion) -> Result<DdimScheduler> {
        if self.num_images == 0 {
            bail!("num_images must be at least 1");
        }
        if self.steps == 0 {
            bail!("steps must be at least 1");
        }
        let scheduler = DdimScheduler::new(&sd.scheduler_config, self.steps)?;
        self.timesteps(&scheduler)?;
        Ok(scheduler)
    }

    /// The timesteps run: the last `int(steps * strength)` of `scheduler`'s ([`get_timesteps`]).
    pub fn timesteps<'a>(&self, scheduler: &'a DdimScheduler) -> Result<&'a [usize]> {
        get_timesteps(scheduler.timesteps(), self.steps, self.strength)
    }

    /// The prompt and negative prompt encoded for `num_images` images.
    pub fn prompt_embeddings(&self, sd: &StableDiffusion) -> Result<PromptEmbeddings> {
        PromptEmbeddings::new(sd, &self.prompt, &self.negative_prompt, self.num_images, self.guidance_scale)
    }
}
