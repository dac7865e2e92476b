//! `disendiff generate`: text-to-image, or image-to-image with `--image` and `--strength`,
//! writing `OUT/00000.png`, `00001.png`, ...

use super::{ConceptArgs, ModelArgs, SamplingArgs};
use crate::model::memory::Generation;
use crate::pipelines::img2img::{self, Img2ImgParams};
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::util;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Image height in pixels (default: the model's native size).
    #[arg(long, conflicts_with = "image")]
    pub height: Option<usize>,
    /// Image width in pixels (default: the model's native size).
    #[arg(long, conflicts_with = "image")]
    pub width: Option<usize>,
    /// Image-to-image: start from this picture (PNG or JPEG; its size is the output size, a
    /// multiple of 8), noised by --strength, as diffusers' StableDiffusionImg2ImgPipeline.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// With --image: how far the picture is noised, 0 (kept) to 1 (ignored); the last
    /// int(steps x strength) DDIM steps run.
    #[arg(long, default_value_t = 0.8, requires = "image")]
    pub strength: f64,
    /// Initial noise: a safetensors file with one tensor `latents` [N, 4, H/8, W/8]
    /// (as diffusers' `latents=` argument), to compare with other implementations; with
    /// --image, the noise added to the picture's latents.
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,
    #[command(flatten)]
    pub concepts: ConceptArgs,
    /// Output folder.
    #[arg(long, value_name = "DIR", visible_alias = "output-dir", alias = "output_dir")]
    pub out: PathBuf,
}

/// Checks a `--latents` tensor against the shape the run needs.
fn check_latents(l: &candle_core::Tensor, want: &[usize], path: &std::path::Path, what: &str) -> Result<()> {
    if l.dims() != want {
        bail!("{}: `latents` has shape {:?}, but {what} need {want:?}", path.display(), l.dims());
    }
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    a.sampling.validate()?;
    if a.image.is_some() {
        super::validate::in_range("--strength", a.strength, 0.0, 1.0)?;
    }
    let opts = a.model.load_options()?;
    let latents = a.latents.as_ref().map(|p| super::images::read_latents(p, &opts.device)).transpose()?;
    let picture = a.image.as_ref().map(|p| util::load_rgb(p)).transpose()?;
    let mut model = super::load_model(&a.model, &a.concepts)?;
    if a.sampling.vae_tiling {
        model.sd.vae.enable_tiling();
    }
    let sd = &model.sd;
    super::check_prompt_tokens(sd, &[&a.sampling.prompt, &a.sampling.negative_prompt], a.concepts.strict_tokens)?;
    let (n, seed) = (a.sampling.num_images, a.sampling.seed);
    match picture {
        Some(picture) => {
            let f = sd.vae_scale_factor();
            let (w, h) = (picture.width() as usize, picture.height() as usize);
            if w % f != 0 || h % f != 0 || w == 0 || h == 0 {
                bail!("{}: the picture is {w}x{h}; image-to-image needs sides that are multiples of {f}", a.image.as_ref().unwrap().display());
            }
            let mut p = Img2ImgParams::new(&a.sampling.prompt, util::rgb_to_tensor(&picture, &sd.device)?);
            p.sampling.negative_prompt = a.sampling.negative_prompt.clone();
            p.sampling.steps = a.sampling.num_inference_steps;
            p.sampling.strength = a.strength;
            p.sampling.guidance_scale = a.sampling.guidance_scale;
            p.sampling.eta = a.sampling.eta;
            p.sampling.num_images = 1;
            let shape = [n, sd.vae_config.latent_channels, h / f, w / f];
            if let (Some(l), Some(path)) = (&latents, &a.latents) {
                check_latents(l, &shape, path, &format!("{n} image(s) of {w}x{h}"))?;
            }
            let g = Generation { height: h, width: w, guidance: p.sampling.guidance_scale > 1.0, encodes_image: true, vae_tiling: a.sampling.vae_tiling };
            super::memory::check_generation(&a.model, sd, &g, "image-to-image at")?;
            let noise = super::images::initial_noise(latents, &shape, seed, &sd.device)?;
            std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
            super::images::generate_each(n, &noise, seed, &a.out, "image", p.sampling.steps, |noise, step_seed, on_step| {
                let mut q = Img2ImgParams { noise: Some(noise), ..p.clone() };
                q.sampling.seed = step_seed;
                img2img::generate(sd, &q, on_step)
            })
        }
        None => {
            let mut p = Text2ImageParams::new(sd, &a.sampling.prompt);
            p.negative_prompt = a.sampling.negative_prompt.clone();
            p.steps = a.sampling.num_inference_steps;
            p.guidance_scale = a.sampling.guidance_scale;
            p.eta = a.sampling.eta;
            p.num_images = n;
            if let Some(h) = a.height {
                p.height = h;
            }
            if let Some(w) = a.width {
                p.width = w;
            }
            // Validate before any work, and before creating the output folder.
            let shape = text2img::latent_shape(sd, &p)?;
            if let (Some(l), Some(path)) = (&latents, &a.latents) {
                check_latents(l, &shape, path, &format!("{n} image(s) of {}x{}", p.height, p.width))?;
            }
            let g = Generation { height: p.height, width: p.width, guidance: p.guidance_scale > 1.0, encodes_image: false, vae_tiling: a.sampling.vae_tiling };
            super::memory::check_generation(&a.model, sd, &g, "generating")?;
            let noise = super::images::initial_noise(latents, &shape, seed, &sd.device)?;
            p.num_images = 1;
            std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
            super::images::generate_each(n, &noise, seed, &a.out, "image", p.steps, |noise, step_seed, on_step| {
                text2img::generate(sd, &Text2ImageParams { latents: Some(noise), seed: step_seed, ..p.clone() }, on_step)
            })
        }
    }
}
