//! `disendiff demo`: the whole method end to end on the bundled toy model, with no input:
//! a personalization scene of the toy world, DisenDiff training on it, images of the concepts
//! together and alone with edits, the attention maps, and a report.

use crate::pipelines::attention_maps::{grid, overlay, token_maps};
use crate::pipelines::text2img::Text2ImageParams;
use crate::toyworld::experiment::{self, default_toy_model, enlarge, ToyTrainOptions};
use crate::training::method::Method;
use crate::toyworld::task::Task;
use crate::util;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Output folder (report.md, images, concepts).
    #[arg(long, default_value = "demo-out", value_name = "DIR", visible_alias = "output-dir", alias = "output_dir")]
    pub out: PathBuf,
    /// The toy base model (default: the bundled assets/toy-model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Which personalization scene of the toy world to learn.
    #[arg(long, default_value_t = 1)]
    pub scene: u64,
    /// Training steps.
    #[arg(long, default_value_t = 150, alias = "steps", alias = "max_train_steps")]
    pub max_train_steps: usize,
    /// AdamW learning rate (toy scale).
    #[arg(long, default_value_t = 1e-3, alias = "learning_rate")]
    pub learning_rate: f64,
    /// Images per prompt.
    #[arg(long, default_value_t = 4, alias = "num_images")]
    pub num_images: usize,
    /// DDIM steps of the generated images.
    #[arg(long, default_value_t = 30, alias = "sample-steps", alias = "num_inference_steps")]
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale of the generated images.
    #[arg(long, default_value_t = 5.0, alias = "guidance_scale")]
    pub guidance_scale: f64,
    /// Seed of training (and, plus 100, of the generated images).
    #[arg(long, default_value_t = super::DEFAULT_SEED)]
    pub seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    super::validate::sampling(a.num_inference_steps, a.guidance_scale, None, Some(a.num_images))?;
    super::validate::at_least("--max-train-steps", a.max_train_steps, 1)?;
    super::validate::positive("--learning-rate", a.learning_rate)?;
    let model_dir = a.model.clone().unwrap_or_else(default_toy_model);
    experiment::check_toy_model(&model_dir)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let task = Task::new(a.scene);
    eprintln!("scene {}: \"{}\"", a.scene, task.caption());
    util::save_png(&enlarge(&task.image, 4), &a.out.join("scene.png"))?;

    let mut opts = ToyTrainOptions::new(Some(Method::Disendiff.preset(&[])?));
    opts.steps = a.max_train_steps;
    opts.learning_rate = a.learning_rate;
    opts.seed = a.seed;
    let pb = super::progress_bar(a.max_train_steps as u64, "training DisenDiff");
    let (model, seconds) = experiment::train(&model_dir, &task, &opts, &a.out.join("run"), |r| {
        pb.set_position(r.step as u64);
        pb.set_message(format!("loss {:.4} bind {:.3} ss {:.3}", r.loss, r.l_bind, r.l_ss));
    })?;
    pb.finish_and_clear();
    eprintln!("trained in {seconds:.0} s");

    let sets = task.prompt_sets();
    let all: Vec<(&str, &crate::toyworld::task::PromptSpec)> = sets
        .combined
        .iter()
        .map(|p| ("both concepts", p))
        .chain(sets.single[0].iter().map(|p| ("concept 1 alone", p)))
        .chain(sets.single[1].iter().map(|p| ("concept 2 alone", p)))
        .collect();
    let pb = super::progress_bar(all.len() as u64, "generating");
    let mut report = String::new();
    writeln!(report, "# disendiff demo\n")?;
    writeln!(
        report,
        "The toy base model (`{}`) learned two concepts from one image with DisenDiff: \
         {} steps in {seconds:.0} s on this machine.\n",
        model_dir.display(),
        a.max_train_steps
    )?;
    writeln!(report, "Training image, caption `{}`:\n\n![scene](scene.png)\n", task.caption())?;
    writeln!(report, "## Generated\n\n{} images per prompt, DDIM {} steps, guidance {}.\n", a.num_images, a.num_inference_steps, a.guidance_scale)?;
    for (i, (group, spec)) in all.iter().enumerate() {
        let images = experiment::generate(&model, &spec.prompt, a.num_images, a.seed + 100, a.num_inference_steps, a.guidance_scale)?;
        let big: Vec<_> = images.iter().map(|im| enlarge(im, 2)).collect();
        let name = format!("prompt-{:02}.png", i + 1);
        util::save_png(&grid(&big, big.len()), &a.out.join(&name))?;
        writeln!(report, "**{group}**: `{}`\n\n![{name}]({name})\n", spec.prompt)?;
        pb.set_position(i as u64 + 1);
    }
    pb.finish_and_clear();

    // Attention maps of the training caption (the paper's Fig. 4 view).
    let mut p = Text2ImageParams::new(&model.sd, &task.caption());
    p.steps = a.num_inference_steps;
    p.guidance_scale = a.guidance_scale;
    p.seed = a.seed + 100;
    let latent = model.sd.default_size() / model.sd.vae_scale_factor();
    let maps = token_maps(&model.sd, &p, latent)?;
    let image = enlarge(&util::to_rgb8(&maps.images)?.remove(0), 2);
    let mut tiles = vec![image.clone()];
    let mut labels = vec!["image".to_string()];
    for (pos, label) in &maps.tokens {
        tiles.push(overlay(&maps.maps.get(*pos)?, &image)?);
        labels.push(label.clone());
    }
    util::save_png(&grid(&tiles, tiles.len()), &a.out.join("attention.png"))?;
    writeln!(report, "## Cross-attention maps\n\n`{}` ({latent}x{latent}, mean over steps, heads and layers), left to right: {}.\n\n![attention](attention.png)\n", task.caption(), labels.join(", "))?;
    writeln!(report, "The learned concepts are in `run/concepts.safetensors`; use them with\n`disendiff generate --model {} --concepts {}/run/concepts.safetensors --prompt \"...\"`.", model_dir.display(), a.out.display())?;
    let path = a.out.join("report.md");
    util::write_atomic(&path, report.as_bytes())?;
    println!("{}", path.display());
    Ok(())
}
