//! `disendiff train`: learn the concepts of one image (DisenDiff, or the paper's baselines and
//! ablations as presets of the same trainer) and write `OUT/concepts.safetensors`.

use super::ModelArgs;
use crate::calibration::SeparationKind;
use crate::pipelines::class_images::class_images;
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::training::adamw::AdamWConfig;
use crate::training::concepts::{class_word_pieces, default_initializers, modifier_tokens_in, parse_concepts};
use crate::training::data;
use crate::training::model::{Personalized, UNetTrainable};
use crate::training::step::LossConfig;
use crate::training::trainer::{TrainConfig, Trainer};
use crate::util;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// K/V + modifier embeddings with the attention calibration (L_bind + L_s&s).
    Disendiff,
    /// The same trainer without the attention losses.
    CustomDiffusion,
    /// Only the modifier embeddings (lr 5e-4, batch 4, 5000 steps by default).
    TextualInversion,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ablation {
    /// Drop L_bind.
    NoBind,
    /// Drop L_s&s.
    NoSs,
    /// L_separate: plain intersection of the class maps instead of their IoU (Eq. 4).
    SeparateIntersection,
    /// No squaring of the class maps.
    NoSuppression,
    /// Class maps to the 4th power.
    TwiceSuppression,
    /// No Gaussian filter.
    NoGaussian,
    /// Average the maps of every cross-attention layer, resized to --attn-resolution.
    AllScales,
    /// Train attn2.to_q as well as to_k/to_v.
    TrainQ,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The photo with the concepts (PNG or JPEG; centre-cropped to a square).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Caption naming each concept by a modifier token before its class word,
    /// e.g. "<new1> cat and <new2> dog".
    #[arg(long)]
    pub caption: String,
    /// Output folder: concepts.safetensors, train_log.jsonl, checkpoints/, validation/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "disendiff")]
    pub method: Method,
    /// Modifier tokens, '+'-separated (default: the <...> words of the caption, in order).
    #[arg(long, value_name = "A+B")]
    pub modifier_tokens: Option<String>,
    /// Vocabulary tokens whose embeddings initialise the modifiers, '+'-separated
    /// (default: pll+ktn as the official code; the class words for textual-inversion).
    #[arg(long, value_name = "A+B")]
    pub initializer_tokens: Option<String>,
    /// Prompt template around the caption ({} = the caption).
    #[arg(long, default_value = "photo of a {}")]
    pub template: String,
    /// Optimiser steps (default 250; 5000 for textual-inversion).
    #[arg(long, alias = "steps")]
    pub max_train_steps: Option<usize>,
    /// Samples per micro-batch (default 2; 4 for textual-inversion).
    #[arg(long)]
    pub train_batch_size: Option<usize>,
    /// Micro-batches accumulated per optimiser step.
    #[arg(long, default_value_t = 4)]
    pub gradient_accumulation_steps: usize,
    /// AdamW learning rate as used (default 8e-5 = 1e-5 x batch 2 x accumulation 4 of the
    /// official run; 5e-4 for textual-inversion).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Multiply --learning-rate by batch size x accumulation steps (diffusers' --scale_lr).
    #[arg(long)]
    pub scale_lr: bool,
    /// Weight of L_bind + L_s&s (official masked loss form: 0.01).
    #[arg(long, default_value_t = 0.01)]
    pub attn_weight: f64,
    /// Query-grid side of the cross-attention maps used (default: latent side / 4, i.e. 16
    /// for SD at 512x512).
    #[arg(long)]
    pub attn_resolution: Option<usize>,
    /// Paper ablations (repeatable).
    #[arg(long, value_enum)]
    pub ablation: Vec<Ablation>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Training image side in pixels (default: the model's native size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Turn off Custom Diffusion's scale/crop augmentation.
    #[arg(long)]
    pub no_augment: bool,
    /// Regularisation images: a folder of images with captions (name.png + name.txt).
    #[arg(long, value_name = "DIR", conflicts_with = "num_class_images")]
    pub reg_dir: Option<PathBuf>,
    /// Generate this many regularisation images with the base model from --class-prompt
    /// (cached in --class-data-dir).
    #[arg(long)]
    pub num_class_images: Option<usize>,
    /// Prompt of generated regularisation images (default: "a cat and a dog" from the class words).
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// Cache folder of generated class images (default OUT/class_images).
    #[arg(long, value_name = "DIR")]
    pub class_data_dir: Option<PathBuf>,
    /// Write a checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 50)]
    pub checkpointing_steps: usize,
    /// Continue from the newest checkpoint in OUT/checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// Prompt of validation images written every --validation-steps steps.
    #[arg(long)]
    pub validation_prompt: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub validation_steps: usize,
}

fn split_plus(s: &str) -> Vec<String> {
    s.split('+').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
}

pub fn run(a: Args) -> Result<()> {
    let opts = a.model.load_options()?;
    // Validate everything cheap before loading anything.
    let target = data::load_target(&a.image)?;
    drop(target);
    let modifiers = match &a.modifier_tokens {
        Some(m) => split_plus(m),
        None => modifier_tokens_in(&a.caption),
    };
    let ti = a.method == Method::TextualInversion;
    if !a.template.contains("{}") {
        bail!("--template must contain {{}} where the caption goes, got {:?}", a.template);
    }
    let initializers = match &a.initializer_tokens {
        Some(i) => split_plus(i),
        None if ti => parse_concepts(&a.caption, &modifiers, &vec![String::new(); modifiers.len()])?
            .into_iter()
            .map(|c| c.class_word)
            .collect(),
        None => default_initializers(modifiers.len().max(1))?,
    };
    let concepts = parse_concepts(&a.caption, &modifiers, &initializers)?;
    let reg = match &a.reg_dir {
        Some(d) => data::read_reg_folder(d)?,
        None => Vec::new(),
    };
    let concepts_path = a.out.join("concepts.safetensors");
    if concepts_path.exists() && !a.resume {
        bail!("{} already exists: choose another --out, or --resume to continue that run", concepts_path.display());
    }

    let mut trainable = if ti { UNetTrainable::Nothing } else { UNetTrainable::CrossAttnKV };
    if a.ablation.contains(&Ablation::TrainQ) {
        if ti {
            bail!("--ablation train-q needs a method that trains the UNet");
        }
        trainable = UNetTrainable::CrossAttnQKV;
    }
    eprintln!("loading {}", a.model.model.display());
    let model = Personalized::load(&a.model.model, &opts, &concepts, trainable)?;
    for c in &concepts {
        let pieces = class_word_pieces(&model.sd.tokenizer, &c.class_word);
        if pieces > 1 {
            eprintln!("note: class word {:?} is {pieces} tokens; its last token stands for it in the attention losses", c.class_word);
        }
    }

    let mut loss = LossConfig { attn_weight: if a.method == Method::Disendiff { a.attn_weight } else { 0.0 }, ..Default::default() };
    for ab in &a.ablation {
        match ab {
            Ablation::NoBind => loss.calibration.bind = false,
            Ablation::NoSs => loss.calibration.separate = false,
            Ablation::SeparateIntersection => loss.calibration.separation = SeparationKind::Intersection,
            Ablation::NoSuppression => loss.calibration.suppression_power = 1,
            Ablation::TwiceSuppression => loss.calibration.suppression_power = 4,
            Ablation::NoGaussian => loss.calibration.gaussian = false,
            Ablation::AllScales => loss.all_scales = true,
            Ablation::TrainQ => {}
        }
    }
    if !a.ablation.is_empty() && a.method != Method::Disendiff {
        eprintln!("note: ablations change the attention losses, which only --method disendiff uses");
    }
    let resolution = a.resolution.unwrap_or(model.sd.default_size());
    loss.attn_resolution = a.attn_resolution.unwrap_or(resolution / model.sd.vae_scale_factor() / 4);
    let batch_size = a.train_batch_size.unwrap_or(if ti { 4 } else { 2 });
    let mut lr = a.learning_rate.unwrap_or(if ti { 5e-4 } else { 8e-5 });
    if a.scale_lr {
        lr *= (batch_size * a.gradient_accumulation_steps) as f64;
    }
    let config = TrainConfig {
        method: format!("{:?}", a.method).to_lowercase(),
        caption: a.caption.clone(),
        template: a.template.clone(),
        steps: a.max_train_steps.unwrap_or(if ti { 5000 } else { 250 }),
        batch_size,
        grad_accum: a.gradient_accumulation_steps,
        adamw: AdamWConfig { lr, ..Default::default() },
        loss,
        train_embeddings: true,
        resolution,
        augment: !a.no_augment,
        seed: a.seed,
        checkpoint_every: a.checkpointing_steps,
    };

    let reg = match a.num_class_images {
        Some(n) if n > 0 => {
            let prompt = a.class_prompt.clone().unwrap_or_else(|| {
                concepts.iter().map(|c| format!("a {}", c.class_word)).collect::<Vec<_>>().join(" and ")
            });
            let dir = a.class_data_dir.clone().unwrap_or_else(|| a.out.join("class_images"));
            let pb = super::progress_bar(n as u64, "class images");
            let images = class_images(&model.sd, &prompt, n, &dir, a.seed, |i, _| pb.set_position(i as u64))?;
            pb.finish_and_clear();
            images
        }
        _ => reg,
    };

    let mut trainer = Trainer::new(model, config, &a.image, reg, &a.out, &a.model.model.display().to_string())?;
    let start = if a.resume { trainer.resume()? } else { 0 };
    if a.resume {
        eprintln!("resuming at step {start}");
    }
    let total = trainer.config.steps;
    eprintln!(
        "training {} concept(s) ({}) with {}: {total} steps x {} micro-batches of {}, lr {:.1e}",
        concepts.len(),
        concepts.iter().map(|c| format!("{} {}", c.modifier, c.class_word)).collect::<Vec<_>>().join(", "),
        trainer.config.method,
        trainer.config.grad_accum,
        trainer.config.batch_size,
        trainer.config.adamw.lr
    );
    let pb = super::progress_bar(total as u64, "training");
    pb.set_position(start as u64);
    let validation = a.validation_prompt.clone();
    let every = a.validation_steps;
    let dir = a.out.join("validation");
    let seed = a.seed;
    let path = trainer.run(start, |r, model| {
        pb.set_position(r.step as u64);
        pb.set_message(format!("loss {:.4} (diff {:.4}, bind {:.4}, ss {:.4})", r.loss, r.diffusion, r.l_bind, r.l_ss));
        if let Some(prompt) = &validation {
            if every > 0 && (r.step % every == 0 || r.step == total) {
                std::fs::create_dir_all(&dir)?;
                let mut p = Text2ImageParams::new(&model.sd, prompt);
                p.seed = seed;
                let img = text2img::generate(&model.sd, &p, |_, _| {})?;
                util::save_png(&util::to_rgb8(&img)?[0], &dir.join(format!("step-{:06}.png", r.step)))?;
            }
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    println!("{}", path.display());
    Ok(())
}
