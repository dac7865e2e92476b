//! `disendiff inpaint`: repaint the white part of a mask in a picture from a prompt, writing
//! `OUT/00000.png`, `00001.png`, ... (the pipeline: [`crate::pipelines::inpaint`]).
//!
//! The picture and the mask are read and checked, and resized to the output size when they differ
//! from it (Lanczos, with a note; the mask is made grayscale before and binarised after, as
//! diffusers' mask processor does), before the model loads and before anything is written.

use super::{ConceptArgs, ModelArgs, SamplingArgs};
use crate::model::memory::Generation;
use crate::pipelines::inpaint::{self, InpaintParams};
use crate::util;
use anyhow::{bail, Context, Result};
use image::imageops::{self, FilterType};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The picture to inpaint (PNG or JPEG).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// The mask (PNG or JPEG, same size as the picture or resized to it): white pixels are
    /// repainted, black ones kept (made grayscale, then binarised at 0.5).
    #[arg(long, value_name = "FILE", alias = "mask_image", alias = "mask-image")]
    pub mask: PathBuf,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// How far the picture is noised before repainting: 1 starts from pure noise, lower keeps
    /// more of the masked region's content.
    #[arg(long, default_value_t = 1.0)]
    pub strength: f64,
    /// Output height in pixels (default: the picture's, rounded down to a multiple of 8).
    #[arg(long)]
    pub height: Option<usize>,
    /// Output width in pixels (default: the picture's, rounded down to a multiple of 8).
    #[arg(long)]
    pub width: Option<usize>,
    /// The noise: a safetensors file with one tensor `latents` [N, 4, H/8, W/8] (diffusers'
    /// `latents=` at strength 1; below 1, the noise added to the picture's latents).
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,
    /// Put the original pixels back outside the mask, so that only the masked region changes
    /// (the VAE otherwise re-renders the whole picture).
    #[arg(long)]
    pub paste_original: bool,
    #[command(flatten)]
    pub concepts: ConceptArgs,
    /// Output folder.
    #[arg(long, value_name = "DIR", visible_alias = "output-dir", alias = "output_dir")]
    pub out: PathBuf,
}

/// The output size: the flags, else the picture's size rounded down to a multiple of `f`.
fn output_size(a: &Args, img: &image::RgbImage, f: usize) -> Result<(usize, usize)> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let height = a.height.unwrap_or(h / f * f);
    let width = a.width.unwrap_or(w / f * f);
    if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
        bail!(
            "output size {width}x{height} (from {}): width and height must be positive multiples of {f}",
            if a.height.is_some() || a.width.is_some() { "--width/--height".to_string() } else { format!("the {w}x{h} image {}", a.image.display()) }
        );
    }
    Ok((height, width))
}

pub fn run(a: Args) -> Result<()> {
    a.sampling.validate()?;
    super::validate::in_range("--strength", a.strength, 0.0, 1.0)?;
    let opts = a.model.load_options()?;
    let picture = util::load_rgb(&a.image).context("reading --image")?;
    let mask_rgb = util::load_rgb(&a.mask).context("reading --mask")?;
    let (height, width) = output_size(&a, &picture, 8)?;
    // the model and the memory check before the pictures are resized to the output size
    let mut model = super::load_model(&a.model, &a.concepts)?;
    if a.sampling.vae_tiling {
        model.sd.vae.enable_tiling();
    }
    let g = Generation { height, width, guidance: a.sampling.guidance_scale > 1.0, encodes_image: true, vae_tiling: a.sampling.vae_tiling };
    super::memory::check_generation(&a.model, &model.sd, &g, "inpainting")?;
    let (w32, h32) = (width as u32, height as u32);
    let picture = if picture.dimensions() != (w32, h32) {
        eprintln!("note: resizing the image {} from {}x{} to {width}x{height}", a.image.display(), picture.width(), picture.height());
        imageops::resize(&picture, w32, h32, FilterType::Lanczos3)
    } else {
        picture
    };
    let gray = inpaint::luma(&mask_rgb);
    let gray = if gray.dimensions() != (w32, h32) {
        eprintln!("note: resizing the mask {} from {}x{} to {width}x{height}", a.mask.display(), gray.width(), gray.height());
        imageops::resize(&gray, w32, h32, FilterType::Lanczos3)
    } else {
        gray
    };
    let mask = inpaint::mask_from_luma(&gray, &opts.device)?;
    let repainted = mask.sum_all()?.to_scalar::<f32>()? as usize;
    if repainted == 0 {
        eprintln!("note: the mask {} has no white pixel: nothing will be repainted", a.mask.display());
    }
    let image = util::rgb_to_tensor(&picture, &opts.device)?;
    let latents = a.latents.as_deref().map(|p| super::images::read_latents(p, &opts.device)).transpose()?;

    let sd = &model.sd;
    super::check_prompt_tokens(sd, &[&a.sampling.prompt, &a.sampling.negative_prompt], a.concepts.strict_tokens)?;
    let (n, seed) = (a.sampling.num_images, a.sampling.seed);
    let mut p = InpaintParams::new(&a.sampling.prompt, image.clone(), mask.clone());
    p.sampling.negative_prompt = a.sampling.negative_prompt.clone();
    p.sampling.steps = a.sampling.num_inference_steps;
    p.sampling.strength = a.strength;
    p.sampling.guidance_scale = a.sampling.guidance_scale;
    p.sampling.eta = a.sampling.eta;
    p.sampling.num_images = n;
    p.noise = latents;
    // Validate before any work, and before creating the output folder.
    inpaint::check(sd, &p)?;
    let total = inpaint::steps_run(sd, &p)?;
    eprintln!(
        "inpainting {width}x{height} with a {}-channel UNet ({repainted} of {} pixels repainted, {total} steps)",
        sd.unet_config.in_channels,
        width * height
    );
    let f = sd.vae_scale_factor();
    let shape = [n, sd.vae_config.latent_channels, height / f, width / f];
    let noise = super::images::initial_noise(p.noise.take(), &shape, seed, &sd.device)?;
    p.sampling.num_images = 1;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    super::images::generate_each(n, &noise, seed, &a.out, "inpainting", total, |noise, step_seed, on_step| {
        let mut q = InpaintParams { noise: Some(noise), ..p.clone() };
        q.sampling.seed = step_seed;
        let images = inpaint::generate(sd, &q, on_step)?;
        if a.paste_original {
            return inpaint::paste_unmasked(&images, &image, &mask);
        }
        Ok(images)
    })
}
