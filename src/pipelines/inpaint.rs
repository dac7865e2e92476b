//! Inpainting, step for step as diffusers' `StableDiffusionInpaintPipeline` with a
//! `DDIMScheduler`: repaint the white part of a mask, keep the rest of the picture.
//!
//! 1. the mask is made grayscale (PIL's `convert("L")`) and binarised at 0.5 ([`mask_from_rgb`]);
//!    the masked image is `image * (mask < 0.5)`; the mask at latent size is its nearest-neighbour
//!    subsample (`F.interpolate`'s default mode, [`mask_latents`]);
//! 2. the image and the masked image are VAE-encoded and scaled; both read the posterior **mean**
//!    (diffusers draws a sample of the posterior with its generator; the mean is deterministic);
//! 3. the timesteps are the last `int(steps * strength)` ([`SamplingParams::timesteps`]); the start
//!    latents are `noise * init_noise_sigma` at strength 1, else the image latents noised to the
//!    first of them;
//! 4. the shared loop ([`super::denoise`]) with the model's kind of inpainting:
//!    - a 9-channel inpainting UNet gets `cat(latents, mask, masked-image latents)` as input;
//!    - a plain 4-channel UNet gets the latents, and after each step the known region is pasted
//!      back: `(1 - mask) * add_noise(image latents, noise, t_next) + mask * latents` (the image
//!      latents themselves after the last step);
//! 5. decode; [`paste_unmasked`] optionally puts the original pixels back outside the mask.

use super::denoise::{Denoise, Hooks};
use super::latents::{decode_latents, encode_image};
use super::sampling::SamplingParams;
use crate::model::sd::StableDiffusion;
use crate::scheduler::{DdimScheduler, NoiseSchedule};
use crate::util;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

#[derive(Clone, Debug)]
pub struct InpaintParams {
    /// Prompt, steps, strength (1, the default, starts from pure noise), guidance...
    pub sampling: SamplingParams,
    /// The picture [1 or num_images, 3, H, W] in [-1, 1] (e.g. [`util::rgb_to_tensor`]).
    pub image: Tensor,
    /// The binarised mask [1 or num_images, 1, H, W]: 1 where to repaint ([`mask_from_rgb`]).
    pub mask: Tensor,
    /// The noise [num_images, 4, H/f, W/f] (the start at strength 1, the noise added to the image
    /// latents otherwise, and the noise of the 4-channel blend); drawn from `seed` when absent.
    pub noise: Option<Tensor>,
}

impl InpaintParams {
    /// diffusers' defaults: 50 steps, strength 1, guidance 7.5, eta 0.
    pub fn new(prompt: &str, image: Tensor, mask: Tensor) -> Self {
        Self { sampling: SamplingParams::new(prompt, 1.0), image, mask, noise: None }
    }
}

/// An RGB mask -> the binarised mask [1, 1, H, W] (1 = repaint) as diffusers' mask processor
/// makes it: PIL's grayscale `L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`, then `L / 255 >= 0.5`.
pub fn mask_from_rgb(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let gray = luma(img);
    mask_from_luma(&gray, device)
}

/// PIL's `convert("L")` of an RGB image (ITU-R 601-2 luma, rounded as PIL does).
pub fn luma(img: &image::RgbImage) -> image::GrayImage {
    let (w, h) = img.dimensions();
    let px = img.pixels().map(|p| ((19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000) >> 16) as u8);
    image::GrayImage::from_raw(w, h, px.collect()).expect("one gray value per pixel")
}

/// A grayscale mask -> [1, 1, H, W] of 0 and 1, binarised at 0.5 (`L / 255 >= 0.5`).
pub fn mask_from_luma(gray: &image::GrayImage, device: &Device) -> Result<Tensor> {
    let (w, h) = gray.dimensions();
    let v: Vec<f32> = gray.as_raw().iter().map(|&l| if l as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, (1, 1, h as usize, w as usize), device)?)
}

/// The mask [B, 1, H, W] at latent size [B, 1, h, w]: `F.interpolate(mask, size=(h, w))`, whose
/// default mode `nearest` reads source pixel `floor(i * H / h)`.
pub fn mask_latents(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, hin, win) = mask.dims4()?;
    let index = |out: usize, inp: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let idx: Vec<u32> = (0..out).map(|i| ((i as f32 * scale).floor() as usize).min(inp - 1) as u32).collect();
        Ok(Tensor::from_vec(idx, out, mask.device())?)
    };
    Ok(mask.index_select(&index(h, hin)?, 2)?.index_select(&index(w, win)?, 3)?)
}

/// Images [N, 3, H, W] in [0, 1] with the original picture [1 or N, 3, H, W] in [-1, 1] put back
/// where the mask [1 or N, 1, H, W] is 0 (the repainted region alone comes from the model).
pub fn paste_unmasked(images: &Tensor, image: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if images.dims()[2..] != image.dims()[2..] || images.dims()[2..] != mask.dims()[2..] {
        bail!("images {:?}, picture {:?} and mask {:?} differ in size", images.dims(), image.dims(), mask.dims());
    }
    let original = ((image.to_dtype(DType::F32)? + 1.0)? / 2.0)?;
    let keep = (1.0 - mask)?;
    Ok(images.broadcast_mul(mask)?.broadcast_add(&original.broadcast_mul(&keep)?)?)
}

/// What a run starts from, checked: everything a 9- or 4-channel model needs in the loop.
struct Prepared {
    timesteps: Vec<usize>,
    /// [N, 1, h, w]
    mask: Tensor,
    /// [N, 4, h, w] scaled latents of the picture and of `picture * (mask < 0.5)`.
    image_latents: Tensor,
    masked_image_latents: Tensor,
    noise: Tensor,
    latents: Tensor,
}

/// The checks of [`sample_latents`] that need no model run: settings, sizes and the UNet's
/// input channels (4 or 9). Returns the latent shape [N, 4, H/f, W/f].
pub fn check(sd: &StableDiffusion, p: &InpaintParams) -> Result<[usize; 4]> {
    let n = p.sampling.num_images;
    p.sampling.scheduler(sd)?;
    match sd.unet_config.in_channels {
        4 | 9 => {}
        c => bail!("the UNet has {c} input channels; inpainting needs a 4-channel (plain) or 9-channel (inpainting) UNet"),
    }
    let (b, c, h, w) = p.image.dims4()?;
    let f = sd.vae_scale_factor();
    if c != 3 || h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
        bail!("the image must be [B, 3, H, W] with H and W positive multiples of {f} (the VAE factor), got {:?}", p.image.dims());
    }
    if b != 1 && b != n {
        bail!("{b} images for {n} outputs (give 1 or {n})");
    }
    let (mb, mc, mh, mw) = p.mask.dims4()?;
    if mc != 1 || (mh, mw) != (h, w) {
        bail!("the mask must be [B, 1, {h}, {w}] like the image {:?}, got {:?}", p.image.dims(), p.mask.dims());
    }
    if mb != 1 && mb != n {
        bail!("{mb} masks for {n} outputs (give 1 or {n})");
    }
    let shape = [n, 4, h / f, w / f];
    if let Some(e) = &p.noise {
        if e.dims() != shape {
            bail!("the noise (--latents) has shape {:?}, but {n} image(s) of {h}x{w} need {shape:?}", e.dims());
        }
    }
    Ok(shape)
}

fn repeat_to(t: Tensor, n: usize) -> Result<Tensor> {
    Ok(if t.dim(0)? == n { t } else { t.repeat((n, 1, 1, 1))? })
}

fn prepare(sd: &StableDiffusion, p: &InpaintParams, scheduler: &DdimScheduler, rng: &mut rand::rngs::StdRng) -> Result<Prepared> {
    let shape = check(sd, p)?;
    let n = p.sampling.num_images;
    let timesteps = p.sampling.timesteps(scheduler)?.to_vec();
    let image = p.image.to_device(&sd.device)?.to_dtype(DType::F32)?;
    let mask = p.mask.to_device(&sd.device)?.to_dtype(DType::F32)?;
    let keep = mask.lt(0.5)?.to_dtype(DType::F32)?;
    let masked = image.broadcast_mul(&keep)?;
    let image_latents = repeat_to(encode_image(sd, &image)?, n)?;
    let masked_image_latents = repeat_to(encode_image(sd, &masked)?, n)?;
    let mask = repeat_to(mask_latents(&mask, shape[2], shape[3])?, n)?;
    let noise = match &p.noise {
        Some(e) => e.to_device(&sd.device)?.to_dtype(DType::F32)?,
        None => util::randn(rng, &shape, &sd.device)?,
    };
    let latents = if p.sampling.strength == 1.0 {
        (&noise * scheduler.init_noise_sigma())?
    } else {
        let t0 = Tensor::new(vec![timesteps[0] as i64; n], &sd.device)?;
        NoiseSchedule::new(sd.scheduler_config.clone()).add_noise(&image_latents, &noise, &t0)?
    };
    Ok(Prepared { timesteps, mask, image_latents, masked_image_latents, noise, latents })
}

/// A 9-channel inpainting UNet's input: `cat(latents, mask, masked-image latents)`.
struct NineChannel<'a> {
    mask: &'a Tensor,
    masked_image_latents: &'a Tensor,
}

impl Hooks for NineChannel<'_> {
    fn unet_input(&mut self, latents: &Tensor, _t: usize) -> Result<Tensor> {
        Ok(Tensor::cat(&[latents, self.mask, self.masked_image_latents], 1)?)
    }
}

/// A plain 4-channel UNet: after each step the known region is the image latents noised to the
/// next timestep (the image latents after the last).
struct Blend<'a> {
    mask: &'a Tensor,
    image_latents: &'a Tensor,
    noise: &'a Tensor,
    schedule: NoiseSchedule,
}

impl Hooks for Blend<'_> {
    fn after_step(&mut self, latents: Tensor, _t: usize, next: Option<usize>) -> Result<Tensor> {
        let known = match next {
            Some(t) => {
                let ts = Tensor::new(vec![t as i64; latents.dim(0)?], latents.device())?;
                self.schedule.add_noise(self.image_latents, self.noise, &ts)?
            }
            None => self.image_latents.clone(),
        };
        Ok(known.broadcast_mul(&(1.0 - self.mask)?)?.broadcast_add(&latents.broadcast_mul(self.mask)?)?)
    }
}

/// The number of denoising steps a run of `p` takes (for a progress bar).
pub fn steps_run(sd: &StableDiffusion, p: &InpaintParams) -> Result<usize> {
    let scheduler = DdimScheduler::new(&sd.scheduler_config, p.sampling.steps)?;
    Ok(p.sampling.timesteps(&scheduler)?.len())
}

/// Runs the sampler and returns the final (scaled) latents [N, 4, H/f, W/f].
/// `on_step(i, total)` is called after each of the `total` steps run.
pub fn sample_latents(sd: &StableDiffusion, p: &InpaintParams, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
    let scheduler = DdimScheduler::new(&sd.scheduler_config, p.sampling.steps.max(1))?;
    let mut rng = util::seeded_rng(p.sampling.seed);
    let prep = prepare(sd, p, &scheduler, &mut rng)?;
    let prompt = p.sampling.prompt_embeddings(sd)?;
    let run = Denoise { sd, prompt: &prompt, scheduler: &scheduler, timesteps: &prep.timesteps, eta: p.sampling.eta };
    if sd.unet_config.in_channels == 9 {
        let mut hooks = NineChannel { mask: &prep.mask, masked_image_latents: &prep.masked_image_latents };
        run.run(prep.latents.clone(), &mut rng, &mut hooks, on_step)
    } else {
        let schedule = NoiseSchedule::new(sd.scheduler_config.clone());
        let mut hooks = Blend { mask: &prep.mask, image_latents: &prep.image_latents, noise: &prep.noise, schedule };
        run.run(prep.latents.clone(), &mut rng, &mut hooks, on_step)
    }
}

/// The whole pipeline: prompt, picture and mask -> images [N, 3, H, W] in [0, 1].
pub fn generate(sd: &StableDiffusion, p: &InpaintParams, on_step: impl FnMut(usize, usize)) -> Result<Tensor> {
    let latents = sample_latents(sd, p, on_step)?;
    decode_latents(sd, &latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_is_pils_convert_l() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0))
        let cases = [([255, 0, 0], 76), ([0, 255, 0], 150), ([0, 0, 255], 29), ([255, 255, 255], 255), ([7, 7, 7], 7), ([10, 200, 30], 124)];
        for (rgb, want) in cases {
            let img = image::RgbImage::from_raw(1, 1, rgb.to_vec()).unwrap();
            assert_eq!(luma(&img).as_raw()[0], want, "{rgb:?}");
        }
    }

    #[test]
    fn mask_binarises_at_half_and_subsamples_nearest() {
        let gray = image::GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        let m = mask_from_luma(&gray, &Device::Cpu).unwrap();
        assert_eq!(m.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 0.0, 1.0, 1.0]);
        // 6x6 -> 3x3 reads rows/cols 0, 2, 4; 6x6 -> 4x4 reads floor(i * 1.5) = 0, 1, 3, 4
        let v: Vec<f32> = (0..36).map(|i| i as f32).collect();
        let t = Tensor::from_vec(v, (1, 1, 6, 6), &Device::Cpu).unwrap();
        let s = mask_latents(&t, 3, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(s, vec![0.0, 2.0, 4.0, 12.0, 14.0, 16.0, 24.0, 26.0, 28.0]);
        let s = mask_latents(&t, 4, 4).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&s[..4], &[0.0, 1.0, 3.0, 4.0]);
        assert_eq!(&s[4..8], &[6.0, 7.0, 9.0, 10.0]);
    }

    #[test]
    fn paste_keeps_the_original_outside_the_mask() {
        let d = Device::Cpu;
        let images = Tensor::full(0.25f32, (2, 3, 1, 2), &d).unwrap();
        let image = Tensor::full(0.5f32, (1, 3, 1, 2), &d).unwrap(); // 0.75 in [0, 1]
        let mask = Tensor::from_vec(vec![1f32, 0.0], (1, 1, 1, 2), &d).unwrap();
        let out = paste_unmasked(&images, &image, &mask).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out, [0.25, 0.75].repeat(6));
    }
}
