//! The one denoising loop under every pipeline: DDIM with classifier-free guidance, step for step
//! as the loop of diffusers' Stable Diffusion pipelines (`StableDiffusionPipeline`,
//! `...Img2ImgPipeline`, `...InpaintPipeline` with a `DDIMScheduler`).
//!
//! For each timestep: build the UNet input from the current latents ([`Hooks::unet_input`]: the
//! latents for text-to-image and image-to-image, `cat(latents, mask, masked-image latents)` for a
//! 9-channel inpainting UNet), double it for [uncond; cond], run the UNet, guide
//! `eps = eps_u + g (eps_c - eps_u)`, take a DDIM step with `eta`, then let the pipeline change
//! the new latents ([`Hooks::after_step`]: a 4-channel inpainting pipeline pastes the known region
//! back, noised to the next timestep). [`Hooks::probe`] / [`Hooks::observe`] see the conditional
//! branch's cross-attention (the attention-map view). What differs between pipelines is only the
//! starting latents, the timesteps run ([`get_timesteps`] for `strength` < 1) and these hooks.

use crate::model::sd::StableDiffusion;
use crate::model::unet::{AttentionProbe, CapturedAttention, ForwardOptions};
use crate::scheduler::DdimScheduler;
use crate::util;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;

/// Context embeddings [N, 77, D] of a prompt, repeated for `n` images.
pub fn encode_prompt(sd: &StableDiffusion, prompt: &str, n: usize) -> Result<Tensor> {
    let ids = sd.tokenizer.encode_warn(prompt);
    let len = ids.len();
    let ids = Tensor::from_vec(ids, (1, len), &sd.device)?;
    let hidden = sd.text_encoder.forward(&ids)?;
    Ok(hidden.repeat((n, 1, 1))?.to_dtype(sd.dtype)?)
}

/// The text conditioning of a guided sample: `[uncond; cond]` embeddings when `guidance_scale`
/// is above 1 (diffusers' `do_classifier_free_guidance`), the prompt's alone otherwise.
#[derive(Clone, Debug)]
pub struct PromptEmbeddings {
    /// [2N, 77, D] (negative prompt first) when guided, else [N, 77, D].
    pub context: Tensor,
    pub guidance_scale: f64,
    pub num_images: usize,
}

impl PromptEmbeddings {
    pub fn new(sd: &StableDiffusion, prompt: &str, negative_prompt: &str, num_images: usize, guidance_scale: f64) -> Result<Self> {
        if num_images == 0 {
            bail!("num_images must be at least 1");
        }
        let cond = encode_prompt(sd, prompt, num_images)?;
        let context = if guidance_scale > 1.0 {
            let uncond = encode_prompt(sd, negative_prompt, num_images)?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond
        };
        Ok(Self { context, guidance_scale, num_images })
    }

    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// diffusers' `get_timesteps(num_inference_steps, strength)` of the image-to-image and
/// inpainting pipelines: a start from an image noised to `strength` runs only the last
/// `min(int(steps * strength), steps)` of the scheduler's timesteps.
pub fn get_timesteps(timesteps: &[usize], num_inference_steps: usize, strength: f64) -> Result<&[usize]> {
    if !(0.0..=1.0).contains(&strength) {
        bail!("strength must be in [0, 1], got {strength}");
    }
    let init_timestep = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    let t_start = num_inference_steps.saturating_sub(init_timestep).min(timesteps.len());
    let tail = &timesteps[t_start..];
    if tail.is_empty() {
        bail!("strength {strength} with {num_inference_steps} steps runs no denoising step (steps x strength must be at least 1)");
    }
    Ok(tail)
}

/// What a pipeline adds to the shared loop. Every method has the text-to-image default.
pub trait Hooks {
    /// The UNet input [N, in_channels, h, w] at timestep `t` built from the latents [N, 4, h, w]
    /// (before the doubling for guidance; DDIM's `scale_model_input` is the identity, so
    /// building then doubling is diffusers' doubling then concatenating).
    fn unet_input(&mut self, latents: &Tensor, _t: usize) -> Result<Tensor> {
        Ok(latents.clone())
    }

    /// The latents to continue with after the DDIM step from `t`; `next` is the timestep the
    /// following step starts from (`None` after the last step).
    fn after_step(&mut self, latents: Tensor, _t: usize, _next: Option<usize>) -> Result<Tensor> {
        Ok(latents)
    }

    /// Which cross-attention layers to capture at each step (none by default).
    fn probe(&self) -> Option<AttentionProbe> {
        None
    }

    /// Sees each step's captured cross-attention of the conditional branch
    /// ([N, heads, HW, T] per layer) when [`Hooks::probe`] asks for some.
    fn observe(&mut self, _captured: &[CapturedAttention]) -> Result<()> {
        Ok(())
    }
}

/// Text-to-image: the defaults of every hook.
pub struct Plain;

impl Hooks for Plain {}

/// One run of the loop: the model, its conditioning and the timesteps to visit.
pub struct Denoise<'a> {
    pub sd: &'a StableDiffusion,
    pub prompt: &'a PromptEmbeddings,
    pub scheduler: &'a DdimScheduler,
    /// From the noisiest: all of `scheduler.timesteps()`, or the tail [`get_timesteps`] gives.
    pub timesteps: &'a [usize],
    /// DDIM eta; with eta > 0 each step's variance noise is drawn from the loop's generator.
    pub eta: f64,
}

impl Denoise<'_> {
    /// Denoises `latents` [N, 4, h, w] (already scaled by `init_noise_sigma` or noised to the
    /// first timestep) over `self.timesteps`. `on_step(i, total)` is called after each step.
    pub fn run(
        &self,
        mut latents: Tensor,
        rng: &mut StdRng,
        hooks: &mut impl Hooks,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (sd, n) = (self.sd, self.prompt.num_images);
        if latents.dim(0)? != n {
            bail!("{} starting latents for {n} images", latents.dim(0)?);
        }
        let guided = self.prompt.guided();
        let total = self.timesteps.len();
        for (i, &t) in self.timesteps.iter().enumerate() {
            let x = hooks.unet_input(&latents, t)?;
            let input = if guided { Tensor::cat(&[&x, &x], 0)? } else { x };
            let input = self.scheduler.scale_model_input(input, t);
            let ts = Tensor::new(vec![t as f32; input.dim(0)?], &sd.device)?;
            let probe = hooks.probe();
            let observing = probe.is_some();
            let opts = ForwardOptions { probe, ..Default::default() };
            let result = sd.unet.forward_with(&input.to_dtype(sd.dtype)?, &ts, &self.prompt.context, &opts)?;
            if observing {
                let cond: Vec<CapturedAttention> = result
                    .attention
                    .iter()
                    .map(|a| {
                        let probs = if guided { a.probs.narrow(0, n, n)? } else { a.probs.clone() };
                        Ok(CapturedAttention { probs, ..a.clone() })
                    })
                    .collect::<Result<_>>()?;
                hooks.observe(&cond)?;
            }
            let out = result.sample.to_dtype(DType::F32)?;
            let eps = if guided {
                let (u, c) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
                (&u + ((c - &u)? * self.prompt.guidance_scale)?)?
            } else {
                out
            };
            let noise = if self.eta > 0.0 { Some(util::randn(rng, latents.dims(), &sd.device)?) } else { None };
            latents = self.scheduler.step(&eps, t, &latents, self.eta, noise.as_ref())?;
            latents = hooks.after_step(latents, t, self.timesteps.get(i + 1).copied())?;
            on_step(i + 1, total);
        }
        Ok(latents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sd::LoadOptions;

    /// 4-channel inpainting's blend `(1 - mask) * known + mask * latents` after each step,
    /// recording the (t, next) pairs the loop passes.
    struct Blend {
        mask: f64,
        known: Tensor,
        seen: Vec<(usize, Option<usize>)>,
    }

    impl Hooks for Blend {
        fn after_step(&mut self, latents: Tensor, t: usize, next: Option<usize>) -> Result<Tensor> {
            self.seen.push((t, next));
            Ok(((&self.known * (1.0 - self.mask))? + (latents * self.mask)?)?)
        }
    }

    #[test]
    fn after_step_output_is_what_the_loop_continues_with() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1-tiny");
        let sd = StableDiffusion::load(&root, &LoadOptions::default()).unwrap();
        let prompt = PromptEmbeddings::new(&sd, "a cat", "", 2, 7.5).unwrap();
        let scheduler = DdimScheduler::new(&sd.scheduler_config, 10).unwrap();
        let timesteps = get_timesteps(scheduler.timesteps(), 10, 0.4).unwrap();
        let run = Denoise { sd: &sd, prompt: &prompt, scheduler: &scheduler, timesteps, eta: 0.0 };
        let mut rng = util::seeded_rng(3);
        let start = util::randn(&mut rng, &[2, 4, 8, 8], &sd.device).unwrap();
        let known = util::randn(&mut rng, &[2, 4, 8, 8], &sd.device).unwrap();
        let plain = run.run(start.clone(), &mut rng, &mut Plain, |_, _| {}).unwrap();

        // mask 1 keeps every step's latents: exactly the plain loop
        let mut keep = Blend { mask: 1.0, known: known.clone(), seen: vec![] };
        let mut calls = vec![];
        let kept = run.run(start.clone(), &mut rng, &mut keep, |i, n| calls.push((i, n))).unwrap();
        let diff = (&kept - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        assert_eq!(keep.seen, vec![(301, Some(201)), (201, Some(101)), (101, Some(1)), (1, None)]);
        assert_eq!(calls, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);

        // mask 0 replaces them: the result is the pasted tensor, and differs from the plain loop
        let mut paste = Blend { mask: 0.0, known: known.clone(), seen: vec![] };
        let pasted = run.run(start.clone(), &mut rng, &mut paste, |_, _| {}).unwrap();
        let diff = (&pasted - &known).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        let moved = (&plain - &known).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 1e-2, "{moved}");

        // a wrong batch is an error, not a broadcast
        assert!(run.run(start.narrow(0, 0, 1).unwrap(), &mut rng, &mut Plain, |_, _| {}).is_err());
    }

    #[test]
    fn get_timesteps_is_diffusers_tail() {
        // DDIM leading spacing, 10 steps, steps_offset 1: [901, 801, ..., 1]
        let ts: Vec<usize> = (0..10).rev().map(|i| i * 100 + 1).collect();
        // strength 0.75: int(7.5) = 7 steps from t_start 3 -> timesteps[3:] = [601, ..., 1]
        assert_eq!(get_timesteps(&ts, 10, 0.75).unwrap(), &ts[3..]);
        assert_eq!(get_timesteps(&ts, 10, 0.75).unwrap()[0], 601);
        assert_eq!(get_timesteps(&ts, 10, 1.0).unwrap(), &ts[..]);
        // int(10 * 0.3) = int(3.0000000000000004) = 3
        assert_eq!(get_timesteps(&ts, 10, 0.3).unwrap().len(), 3);
        assert_eq!(get_timesteps(&ts, 10, 0.1).unwrap(), &[1]);
        assert!(get_timesteps(&ts, 10, 0.09).is_err());
        assert!(get_timesteps(&ts, 10, 1.5).is_err());
        assert!(get_timesteps(&ts, 10, -0.1).is_err());
    }
}
