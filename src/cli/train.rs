//! `disendiff train`: learn the concepts of one image (DisenDiff, or the paper's baselines and
//! ablations as presets of the same trainer) and write `OUT/concepts.safetensors`, or for
//! DreamBooth (which fine-tunes the whole UNet) the diffusers folder `OUT/model/`.
//!
//! With `--lora FILE[:SCALE]` the LoRAs are merged into the base before training and stay a
//! fixed part of it: the concept file holds K/V trained from the merged weights and the
//! fingerprint of those, so it applies (its trained K/V set exactly) where the same LoRAs are
//! merged again (`generate --lora` with the same files and scales); on the plain base it is a
//! different model, applied only as a difference with `--concepts-base`.

use super::{LoraArgs, ModelArgs};
use crate::model::memory::Training;
use crate::pipelines::class_images::class_images;
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::training::adamw::AdamWConfig;
use crate::training::checkpoint::{self, ResumeFrom};
use crate::training::concepts::{class_word_pieces, modifier_tokens_in, parse_concepts};
use crate::training::data;
use crate::training::method::{Ablation, Method};
use crate::training::model::Personalized;
use crate::training::trainer::{result_path, TrainConfig, Trainer};
use crate::util;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub loras: LoraArgs,
    /// The photo with the concepts (PNG or JPEG; centre-cropped to a square).
    #[arg(long, value_name = "FILE", alias = "instance_data_dir")]
    pub image: PathBuf,
    /// Caption naming each concept by a modifier token before its class word,
    /// e.g. "<new1> cat and <new2> dog".
    #[arg(long, alias = "instance_prompt")]
    pub caption: String,
    /// Output folder: concepts.safetensors (dreambooth: model/, a diffusers folder),
    /// train_log.jsonl, checkpoints/, validation/.
    #[arg(long, value_name = "DIR", visible_alias = "output-dir", alias = "output_dir")]
    pub out: PathBuf,
    /// Training method (each a preset of the one trainer; see docs/method.md §8).
    #[arg(long, value_enum, default_value = "disendiff")]
    pub method: Method,
    /// Modifier tokens, '+'-separated (default: the <...> words of the caption, in order).
    #[arg(long, value_name = "A+B", alias = "modifier-token", alias = "modifier_token")]
    pub modifier_tokens: Option<String>,
    /// Vocabulary tokens whose embeddings initialise the modifiers, '+'-separated
    /// (default: pll+ktn as the official code; the class words for textual-inversion).
    #[arg(long, value_name = "A+B", alias = "initializer-token", alias = "initializer_token")]
    pub initializer_tokens: Option<String>,
    /// Prompt template around the caption ({} = the caption).
    #[arg(long, default_value = "photo of a {}")]
    pub template: String,
    /// Optimiser steps (default 250; 5000 for textual-inversion).
    #[arg(long, alias = "steps", alias = "max_train_steps")]
    pub max_train_steps: Option<usize>,
    /// Samples per micro-batch (default 2; 4 for textual-inversion).
    #[arg(long, alias = "train_batch_size")]
    pub train_batch_size: Option<usize>,
    /// Micro-batches accumulated per optimiser step (default 4; 1 for dreambooth).
    #[arg(long, alias = "gradient_accumulation_steps")]
    pub gradient_accumulation_steps: Option<usize>,
    /// AdamW learning rate as used (default 8e-5 = 1e-5 x batch 2 x accumulation 4 of the
    /// official run; 5e-4 for textual-inversion, 5e-6 for dreambooth).
    #[arg(long, alias = "learning_rate")]
    pub learning_rate: Option<f64>,
    /// Multiply --learning-rate by batch size x accumulation steps (diffusers' --scale_lr).
    #[arg(long, alias = "scale_lr")]
    pub scale_lr: bool,
    /// Weight of both attention losses, L_bind and L_s&s (official masked loss form: 0.01).
    #[arg(long, alias = "attn_weight")]
    pub attn_weight: Option<f64>,
    /// Weight of L_bind alone (default: --attn-weight).
    #[arg(long, alias = "bind_weight")]
    pub bind_weight: Option<f64>,
    /// Weight of L_s&s alone (default: --attn-weight; the paper uses 0.001 in some cases).
    #[arg(long, alias = "ss_weight")]
    pub ss_weight: Option<f64>,
    /// Query-grid side of the cross-attention maps the losses read (default: the deepest
    /// down-block cross-attention level with at least 8x8 queries: 16 for SD at 512x512, as
    /// the paper; 8 for the toy model).
    #[arg(long, alias = "attn_resolution")]
    pub attn_resolution: Option<usize>,
    /// Paper ablations (repeatable).
    #[arg(long, value_enum)]
    pub ablation: Vec<Ablation>,
    /// Seed of every random draw (augmentation, timesteps, noise, class images).
    #[arg(long, default_value_t = super::DEFAULT_SEED)]
    pub seed: u64,
    /// Training image side in pixels (default: the model's native size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Fine-tune every text encoder tensor as well, its token table included, at the same
    /// learning rate; OUT/model/text_encoder then holds the trained weights. DreamBooth only
    /// (refused with another --method); diffusers' --train_text_encoder. Costs 16 bytes per
    /// text encoder parameter (about 2 GB for SD1.5's), counted by the memory estimate.
    #[arg(long, alias = "train_text_encoder")]
    pub train_text_encoder: bool,
    /// Recompute the UNet blocks' activations in the backward pass instead of keeping them
    /// (diffusers' --gradient_checkpointing): less memory for about one more UNet forward
    /// per step; the same gradients to rounding. The probed attention level is not
    /// recomputed. For methods whose trained weights lie outside the blocks (disendiff,
    /// custom-diffusion, textual-inversion: the cross-attention K/V are computed outside);
    /// refused with dreambooth and the train-q ablation.
    #[arg(long, alias = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    /// Turn off Custom Diffusion's scale/crop augmentation (dreambooth has none).
    #[arg(long, alias = "noaug")]
    pub no_augment: bool,
    /// The dtype AdamW keeps its m and v in: f32 (PyTorch's) or bf16, half the optimiser's
    /// memory (6.9 -> 3.4 GB for a DreamBooth of SD1.5's UNet); the updates are still computed
    /// in f32.
    #[arg(long, value_enum, default_value = "f32", alias = "adam_state_dtype")]
    pub adam_state_dtype: AdamStateDtype,
    /// Regularisation images: a folder of images with captions (name.png + name.txt).
    #[arg(long, value_name = "DIR", conflicts_with = "num_class_images", alias = "reg_dir")]
    pub reg_dir: Option<PathBuf>,
    /// Generate this many regularisation images with the base model from --class-prompt
    /// (cached in --class-data-dir).
    #[arg(long, alias = "num_class_images")]
    pub num_class_images: Option<usize>,
    /// Prompt of generated regularisation images (default: "a cat and a dog" from the class words).
    #[arg(long, alias = "class_prompt")]
    pub class_prompt: Option<String>,
    /// Cache folder of generated class images (default OUT/class_images).
    #[arg(long, value_name = "DIR", alias = "class_data_dir")]
    pub class_data_dir: Option<PathBuf>,
    /// Write a checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 50, alias = "checkpointing_steps")]
    pub checkpointing_steps: usize,
    /// Keep only the newest N checkpoints (diffusers' --checkpoints_total_limit; default: all).
    #[arg(long, alias = "checkpoints_total_limit", value_name = "N")]
    pub checkpoints_total_limit: Option<usize>,
    /// Continue from the newest readable checkpoint in OUT/checkpoints (= --resume-from-checkpoint latest).
    #[arg(long, conflicts_with = "resume_from_checkpoint")]
    pub resume: bool,
    /// Continue from `latest` (the newest checkpoint of OUT/checkpoints that can be read, older
    /// ones standing in for damaged ones) or from exactly the checkpoint file PATH (a path, or a
    /// file name in OUT/checkpoints).
    #[arg(long, alias = "resume_from_checkpoint", value_name = "latest|PATH")]
    pub resume_from_checkpoint: Option<String>,
    /// Prompt of validation images written every --validation-steps steps.
    #[arg(long, alias = "validation_prompt")]
    pub validation_prompt: Option<String>,
    /// Steps between validation images.
    #[arg(long, default_value_t = 50, alias = "validation_steps")]
    pub validation_steps: usize,
}

/// The model to train: the base with the `--lora` files merged into it (a fixed part of the
/// base), the trainable weights loaded as variables and the concepts' tokens added.
fn load_base(
    root: &std::path::Path,
    opts: &crate::model::sd::LoadOptions,
    loras: &LoraArgs,
    concepts: &[crate::training::concepts::Concept],
    trainable: crate::training::method::UNetTrainable,
) -> Result<Personalized> {
    if loras.lora.is_empty() {
        return Personalized::load(root, opts, concepts, trainable);
    }
    let (m, warnings) =
        crate::patch::PatchedModel::load_with_loras_trainable(root, opts, &loras.lora, loras.lora_allow_unmatched, move |n| trainable.matches(n))?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    for label in m.patches.labels() {
        eprintln!("lora (merged into the base for training): {label}");
    }
    Personalized::from_model(m.sd, concepts)
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
    let mut preset = a.method.preset(&a.ablation)?;
    preset.set_train_text_encoder(a.train_text_encoder)?;
    preset.set_gradient_checkpointing(a.gradient_checkpointing)?;
    if !a.template.contains("{}") {
        bail!("--template must contain {{}} where the caption goes, got {:?}", a.template);
    }
    let initializers = match &a.initializer_tokens {
        Some(i) => split_plus(i),
        None => {
            let n = modifiers.len().max(1);
            let classes = parse_concepts(&a.caption, &modifiers, &vec![String::new(); modifiers.len()])?;
            classes.iter().enumerate().map(|(k, c)| preset.initializers.token(k, n, &c.class_word)).collect::<Result<_>>()?
        }
    };
    let concepts = parse_concepts(&a.caption, &modifiers, &initializers)?;
    let reg = match &a.reg_dir {
        Some(d) => data::read_reg_folder(d)?,
        None => Vec::new(),
    };
    let resume = match &a.resume_from_checkpoint {
        Some(s) => Some(ResumeFrom::parse(s)),
        None => a.resume.then_some(ResumeFrom::Latest),
    };
    if a.checkpoints_total_limit == Some(0) {
        bail!("--checkpoints-total-limit must be at least 1");
    }
    let result = result_path(&a.out, &preset);
    if result.exists() && resume.is_none() {
        bail!("{} already exists: choose another --out, or --resume to continue that run", result.display());
    }
    if preset.writes_model() {
        // The result is a diffusers folder built from the base's own files.
        if !a.model.model.join("model_index.json").is_file() {
            bail!(
                "--method {} writes a complete diffusers folder (OUT/model) from the base's files, so --model must be a \
                 diffusers folder (convert a single-file checkpoint first)",
                preset.name()
            );
        }
        if opts.dtype != candle_core::DType::F32 {
            bail!(
                "--method {} trains every UNet weight in f32 and computes in f32: --dtype {:?} is not supported for it \
                 (no mixed-precision training here)",
                preset.name(),
                opts.dtype
            );
        }
        if !a.loras.lora.is_empty() {
            bail!("--method {} with --lora: the written model folder would lack the LoRA's text-encoder changes; merge the LoRA into a base folder first", preset.name());
        }
    }
    if resume.is_none() && !checkpoint::list(&a.out)?.is_empty() {
        bail!("{} holds checkpoints of an earlier run: --resume to continue it, or choose another --out", checkpoint::folder(&a.out).display());
    }

    preset.set_loss_weights(a.attn_weight, a.bind_weight, a.ss_weight)?;
    {
        use super::validate::{at_least, positive};
        let d = preset.defaults;
        at_least("--max-train-steps", a.max_train_steps.unwrap_or(d.max_train_steps), 1)?;
        at_least("--train-batch-size", a.train_batch_size.unwrap_or(d.train_batch_size), 1)?;
        at_least("--gradient-accumulation-steps", a.gradient_accumulation_steps.unwrap_or(d.gradient_accumulation_steps), 1)?;
        positive("--learning-rate", a.learning_rate.unwrap_or(d.learning_rate))?;
    }
    let with_reg = a.reg_dir.is_some() || a.num_class_images.is_some_and(|n| n > 0);
    if with_reg && a.train_batch_size.unwrap_or(preset.defaults.train_batch_size) < 2 {
        bail!("regularisation images take half of each micro-batch: use --train-batch-size 2 or more with --reg-dir or --num-class-images");
    }
    eprintln!("loading {}", a.model.model.display());
    let mut model = load_base(&a.model.model, &opts, &a.loras, &concepts, preset.unet_trainable)?;
    if preset.train_text_encoder {
        model.train_text_encoder()?;
    }
    for c in &concepts {
        let pieces = class_word_pieces(&model.sd.tokenizer, &c.class_word);
        if pieces > 1 {
            eprintln!("note: class word {:?} is {pieces} tokens; its last token stands for it in the attention losses", c.class_word);
        }
    }

    let resolution = a.resolution.unwrap_or(model.sd.default_size());
    preset.loss.attn_resolution = match a.attn_resolution {
        Some(r) => r,
        None => {
            let latent = resolution / model.sd.vae_scale_factor();
            let r = model.sd.unet_config.calibration_resolution(latent).ok_or_else(|| {
                anyhow::anyhow!("the UNet has no down block with cross-attention; give --attn-resolution")
            })?;
            eprintln!("attention maps of the calibration losses: {r}x{r} (latent {latent}x{latent}; --attn-resolution to change)");
            r
        }
    };
    let defaults = preset.defaults;
    let batch_size = a.train_batch_size.unwrap_or(defaults.train_batch_size);
    let grad_accum = a.gradient_accumulation_steps.unwrap_or(defaults.gradient_accumulation_steps);
    let trainable_params = model.trainable_parameters(preset.train_embeddings);
    let state_dtype = a.adam_state_dtype.dtype();
    let state_bytes = 2 * state_dtype.size_in_bytes() as u64;
    let checkpointed = preset.loss.gradient_checkpointing;
    let t = Training { resolution, batch: batch_size, attn_resolution: preset.loss.attn_resolution, trainable_params, grad_accum, state_bytes, checkpointed };
    eprintln!(
        "trainable: {trainable_params} parameters; their gradients and AdamW state take about {}",
        crate::model::memory::human(t.optimizer_state_bytes() + t.gradient_bytes())
    );
    super::memory::check_training(&a.model, &model.sd, &t)?;
    let mut lr = a.learning_rate.unwrap_or(defaults.learning_rate);
    if a.scale_lr {
        lr *= (batch_size * grad_accum) as f64;
    }
    let augment = preset.augment && !a.no_augment;
    let config = TrainConfig {
        caption: a.caption.clone(),
        template: a.template.clone(),
        steps: a.max_train_steps.unwrap_or(defaults.max_train_steps),
        batch_size,
        grad_accum,
        adamw: AdamWConfig { lr, state_dtype, ..Default::default() },
        resolution,
        preset,
        augment,
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

    // The base model is recorded by its absolute path, so the concept file can find it again
    // when applied to a related model.
    let base_path = a.model.model.canonicalize().unwrap_or_else(|_| a.model.model.clone());
    let mut trainer = Trainer::new(model, config, &a.image, reg, &a.out, &base_path.display().to_string())?;
    trainer.checkpoints_total_limit = a.checkpoints_total_limit;
    trainer.stop = Some(super::interrupt::install("stopping after the current step (press Ctrl-C again to stop at once)"));
    let start = match &resume {
        Some(from) => trainer.resume(from)?,
        None => 0,
    };
    if resume.is_some() {
        eprintln!("resuming at step {start}");
    }
    let total = trainer.config.steps;
    eprintln!(
        "training {} concept(s) ({}) with {}: {total} steps x {} micro-batches of {}, lr {:.1e}",
        concepts.len(),
        concepts.iter().map(|c| format!("{} {}", c.modifier, c.class_word)).collect::<Vec<_>>().join(", "),
        trainer.config.preset.name(),
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

/// `--adam-state-dtype`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdamStateDtype {
    F32,
    Bf16,
}

impl AdamStateDtype {
    fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}
