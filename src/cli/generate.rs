//! `disendiff generate`: text-to-image, writing `OUT/00000.png`, `00001.png`, ...

use super::{ConceptArgs, ModelArgs};
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::util;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt; modifier tokens of loaded concepts (e.g. <new1>) may be used.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (classifier-free guidance's unconditional prompt).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Number of DDIM steps.
    #[arg(long, default_value_t = 50, visible_alias = "steps", alias = "num_inference_steps")]
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale (1 or less disables guidance).
    #[arg(long, default_value_t = 7.5, alias = "guidance_scale")]
    pub guidance_scale: f64,
    /// DDIM eta: 0 is deterministic, 1 is DDPM-like (the paper's evaluation used 1).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Seed of the initial noise (and of the eta noise).
    #[arg(long, default_value_t = super::DEFAULT_SEED)]
    pub seed: u64,
    /// Images to generate.
    #[arg(long, default_value_t = 1, alias = "num_images", alias = "num-images-per-prompt", alias = "num_images_per_prompt")]
    pub num_images: usize,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Initial noise: a safetensors file with one tensor `latents` [N, 4, H/8, W/8]
    /// (as diffusers' `latents=` argument), to compare with other implementations.
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,
    #[command(flatten)]
    pub concepts: ConceptArgs,
    /// Output folder.
    #[arg(long, value_name = "DIR", visible_alias = "output-dir", alias = "output_dir")]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let opts = a.model.load_options()?;
    let latents = match &a.latents {
        Some(path) => {
            if !path.is_file() {
                bail!("latents file {} does not exist", path.display());
            }
            let mut map = candle_core::safetensors::load(path, &opts.device)
                .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
            let t = map
                .remove("latents")
                .with_context(|| format!("{} has no tensor named `latents`", path.display()))?;
            Some(t)
        }
        None => None,
    };
    let model = super::load_model(&a.model, &a.concepts)?;
    let sd = &model.sd;
    let mut p = Text2ImageParams::new(sd, &a.prompt);
    p.negative_prompt = a.negative_prompt.clone();
    p.steps = a.num_inference_steps;
    p.guidance_scale = a.guidance_scale;
    p.eta = a.eta;
    p.seed = a.seed;
    p.num_images = a.num_images;
    if let Some(h) = a.height {
        p.height = h;
    }
    if let Some(w) = a.width {
        p.width = w;
    }
    p.latents = latents;
    // Validate before any work, and before creating the output folder.
    text2img::latent_shape(sd, &p)?;
    if let Some(l) = &p.latents {
        let want = text2img::latent_shape(sd, &p)?;
        if l.dims() != want {
            bail!(
                "{}: `latents` has shape {:?}, but {} image(s) of {}x{} need {:?}",
                a.latents.as_ref().unwrap().display(),
                l.dims(),
                p.num_images,
                p.height,
                p.width,
                want
            );
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let pb = super::progress_bar(p.steps as u64, "sampling");
    let images = text2img::generate(sd, &p, |i, _| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    for (i, img) in util::to_rgb8(&images)?.iter().enumerate() {
        let path = a.out.join(format!("{i:05}.png"));
        util::save_png(img, &path)?;
        println!("{}", path.display());
    }
    Ok(())
}
