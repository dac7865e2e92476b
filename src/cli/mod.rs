//! The `disendiff` command line: one subcommand per file.

mod attention;
mod bench;
mod clip_score;
mod demo;
mod export;
mod eval;
mod generate;
mod images;
mod inpaint;
mod interrupt;
mod memory;
mod toy;
mod toy_bench;
mod train;
mod validate;

use crate::patch::{LoraSpec, PatchedModel, TrainedBase};
use anyhow::{bail, Result};
use candle_core::DType;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The seed every subcommand defaults to.
pub const DEFAULT_SEED: u64 = 42;

#[derive(Parser)]
#[command(
    name = "disendiff",
    version,
    about = "DisenDiff: learn several concepts from one image and generate new images of them",
    long_about = "DisenDiff (CVPR 2024) fine-tunes Stable Diffusion's cross-attention keys/values and new \
token embeddings under attention-calibration losses, so that several concepts learned from a single \
image can be generated together or alone. Models are diffusers folders (model_index.json, tokenizer/, \
text_encoder/, unet/, vae/, scheduler/) or single-file SD 1.x / 2.x checkpoints (.safetensors, .ckpt) \
with --config DIR."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole method on the bundled toy model: train on a toy scene, generate, report.
    Demo(demo::Args),
    /// Generate images from a text prompt (DDIM with classifier-free guidance).
    Generate(generate::Args),
    /// Repaint the white part of a mask in an image from a text prompt (9- or 4-channel UNets).
    Inpaint(inpaint::Args),
    /// Learn the concepts of one image (DisenDiff, Custom Diffusion or Textual Inversion).
    Train(Box<train::Args>),
    /// Heatmaps of each prompt token's cross-attention (the paper's Fig. 4 view).
    Attention(attention::Args),
    /// CLIPScore and image alignment of images with a transformers CLIP model (the paper's metrics).
    ClipScore(clip_score::Args),
    /// The paper's evaluation protocol: images for a dataset's prompts, CLIP metrics, report.
    Eval(eval::Args),
    /// Time and memory of fixed cases (compare with tools/reference/bench_torch.py).
    Bench(bench::Args),
    /// The synthetic toy world: scenes, the toy base model, the benchmark.
    Toy(toy::Args),
    /// Write a concept file for diffusers, AUTOMATIC1111, ComfyUI, InvokeAI and kohya's tools.
    Export(export::Args),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    // A misspelt DISENDIFF_KERNELS is an error here rather than a warning deep in a run.
    crate::model::kernels::setting()?;
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Inpaint(args) => inpaint::run(args),
        Command::Toy(args) => toy::run(args),
        Command::Train(args) => train::run(*args),
        Command::Attention(args) => attention::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Export(args) => export::run(args),
        Command::ClipScore(args) => clip_score::run(args),
        Command::Eval(args) => eval::run(args),
    }
}

/// Weight precision.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    #[value(alias = "fp32", alias = "float32", alias = "no")]
    F32,
    #[value(alias = "fp16", alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

/// `--prediction-type` values (diffusers' names).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionArg {
    Epsilon,
    #[value(name = "v_prediction", alias = "v-prediction", alias = "v")]
    VPrediction,
    Sample,
}

/// Device/dtype flags shared by the subcommands that load a model.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Stable Diffusion model: a folder in diffusers layout, or a single-file SD 1.x / 2.x
    /// checkpoint in CompVis layout (FILE.safetensors, or FILE.ckpt read without running any of
    /// its pickle) together with --config.
    #[arg(long, value_name = "DIR|FILE", alias = "pretrained_model_name_or_path", alias = "pretrained-model-name-or-path")]
    pub model: PathBuf,
    /// For a single-file --model: a diffusers folder of the model's config files (unet/, vae/,
    /// text_encoder/, scheduler/, tokenizer/; its weights are not read), as diffusers'
    /// from_single_file(config=DIR).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// For a single-file --model: what the UNet predicts, overriding the config's scheduler
    /// (the file itself does not say: SD 2.x 768 models predict v, SD 1.x and SD 2.x 512 epsilon).
    #[arg(long, value_enum, value_name = "TYPE")]
    pub prediction_type: Option<PredictionArg>,
    /// For a single-file --model: use its EMA weights (model_ema.*) for the UNet.
    #[arg(long)]
    pub ema: bool,
    /// Weight precision of the frozen weights (trainable ones are always f32): on train this is
    /// diffusers' mixed precision, also spelled `--mixed-precision bf16|fp16|no`.
    #[arg(long, value_enum, default_value = "f32", alias = "mixed-precision", alias = "mixed_precision")]
    pub dtype: Precision,
    /// Weight file variant to load, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// Compute device: cpu, or cuda / cuda:N when built with --features cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Memory the whole run may use (e.g. 8GB, 512M, 1.5GiB). Before any work the peak is
    /// estimated from the shapes and a run that would exceed this (default: the memory the
    /// machine has available) is refused, saying what would fit.
    #[arg(long, value_name = "SIZE", value_parser = memory::parse_size)]
    pub max_memory: Option<u64>,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<crate::model::sd::LoadOptions> {
        let dtype = match self.dtype {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        };
        let device = crate::util::parse_device(&self.device)?;
        if !self.model.is_file() && (self.config.is_some() || self.prediction_type.is_some() || self.ema) {
            bail!("--config, --prediction-type and --ema apply to a single-file --model (FILE.safetensors / FILE.ckpt), not to the folder {}", self.model.display());
        }
        use crate::scheduler::PredictionType;
        let prediction_type = self.prediction_type.map(|p| match p {
            PredictionArg::Epsilon => PredictionType::Epsilon,
            PredictionArg::VPrediction => PredictionType::VPrediction,
            PredictionArg::Sample => PredictionType::Sample,
        });
        let single_file = crate::model::sd::SingleFileOptions { config: self.config.clone(), prediction_type, ema: self.ema };
        Ok(crate::model::sd::LoadOptions { dtype, device, variant: self.variant.clone(), single_file })
    }
}

/// The sampling flags of the subcommands that generate images (diffusers' names).
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// The prompt; modifier tokens of loaded concepts (e.g. <new1>) may be used.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (classifier-free guidance's unconditional prompt).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Number of DDIM steps (of the full schedule when --strength < 1 runs only its end).
    #[arg(long, default_value_t = 50, visible_alias = "steps", alias = "num_inference_steps")]
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale (1 or less disables guidance).
    #[arg(long, default_value_t = 7.5, alias = "guidance_scale")]
    pub guidance_scale: f64,
    /// DDIM eta: 0 is deterministic, 1 is DDPM-like (the paper's evaluation used 1).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Seed of the initial noise (and of the eta noise).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Images to generate, one at a time (each written when done; a first Ctrl-C stops after
    /// the current one). Image i starts from row i of the seed's noise, as in one batch.
    #[arg(long, default_value_t = 1, alias = "num_images", alias = "num-images-per-prompt", alias = "num_images_per_prompt")]
    pub num_images: usize,
    /// Decode the latents in overlapping tiles, as diffusers' `enable_vae_tiling()`: far less
    /// memory for large images (2048 px needs about what 512 px does), slightly different
    /// pixels near the tile seams.
    #[arg(long, alias = "enable-vae-tiling", alias = "enable_vae_tiling")]
    pub vae_tiling: bool,
}

impl SamplingArgs {
    /// Checks the numbers before any work (validate.rs).
    pub fn validate(&self) -> Result<()> {
        validate::sampling(self.num_inference_steps, self.guidance_scale, Some(self.eta), Some(self.num_images))
    }
}

/// Concept-file flags of the subcommands that generate.
#[derive(clap::Args, Clone, Debug)]
pub struct ConceptArgs {
    /// A concept file from `disendiff train`, a diffusers Custom Diffusion folder or an official
    /// DisenDiff / Custom Diffusion delta.ckpt (its modifier tokens can then be used in the prompt).
    #[arg(long, value_name = "FILE")]
    pub concepts: Option<PathBuf>,
    /// The model the concept file was trained on, to apply it to a different --model with the
    /// same layers (e.g. an inpainting or fine-tuned model) as the difference from that base
    /// (without it, a model other than the one trained on is refused).
    #[arg(long, value_name = "DIR|FILE", requires = "concepts")]
    pub concepts_base: Option<PathBuf>,
    /// With a single-file --concepts-base: a diffusers folder of its config files (default: the
    /// built-in configs of the detected base model).
    #[arg(long, value_name = "DIR", requires = "concepts_base")]
    pub concepts_base_config: Option<PathBuf>,
    /// With a single-file --concepts-base: the file was trained on its EMA weights.
    #[arg(long, requires = "concepts_base")]
    pub concepts_base_ema: bool,
    /// The modifier tokens of an official DisenDiff / Custom Diffusion `delta.ckpt` given as
    /// --concepts, joined by '+' (e.g. "<new1>+<new2>"), one per row of its `embed`
    /// (default: <new1>..<newN>).
    #[arg(long, value_name = "TOKENS", requires = "concepts")]
    pub modifier_tokens: Option<String>,
    /// Refuse prompt words written like modifier tokens (`<new3>`) that no loaded concept file
    /// holds, instead of warning.
    #[arg(long)]
    pub strict_tokens: bool,
    #[command(flatten)]
    pub loras: LoraArgs,
}

/// LoRA flags: of the subcommands that generate (merged under any concept file) and of
/// `train` (merged into the base that is trained on).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LoraArgs {
    /// A LoRA file merged into the weights before any concept file, with an optional strength
    /// (default 1): kohya's format (`lora_unet_*` / `lora_te_*` in diffusers' or the original
    /// LDM's layer names such as `lora_unet_input_blocks_1_1_...`, scale alpha/rank x SCALE,
    /// also convolution and `.diff` entries) or diffusers/PEFT's (`unet.*` / `text_encoder.*`
    /// `lora_A` / `lora_B`). Repeatable. On `train` the LoRAs are part of the base: the concept
    /// file is trained on, and records the fingerprint of, the model with them merged, so
    /// generating with it needs the same --lora flags.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<LoraSpec>,
    /// Apply a LoRA file even when some of its keys match no weight of the model (they are
    /// listed in a warning; without this flag they are an error).
    #[arg(long)]
    pub lora_allow_unmatched: bool,
}

/// Warns about words of the prompts written like modifier tokens that no loaded concept file
/// holds (a typo such as `<new3>` for `<new2>` would be drawn as plain text), or refuses them
/// with `--strict-tokens`.
pub fn check_prompt_tokens(sd: &crate::model::sd::StableDiffusion, prompts: &[&str], strict: bool) -> Result<()> {
    let mut unknown: Vec<String> = Vec::new();
    for p in prompts {
        for t in sd.tokenizer.unknown_angle_tokens(p) {
            if !unknown.contains(&t) {
                unknown.push(t);
            }
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    let loaded: Vec<String> = (sd.text_encoder.config.vocab_size as u32..sd.tokenizer.vocab_size() as u32)
        .filter_map(|id| sd.tokenizer.id_to_token(id).map(str::to_string))
        .collect();
    let have = if loaded.is_empty() { "no concept file is loaded".to_string() } else { format!("the loaded ones are {}", loaded.join(", ")) };
    let msg = format!("{} in the prompt {} no loaded token ({have}): it is read as plain text", unknown.join(", "), if unknown.len() == 1 { "is" } else { "are" });
    if strict {
        bail!("{msg} (--strict-tokens)");
    }
    eprintln!("warning: {msg}");
    Ok(())
}

/// Loads `--model` with `--lora` files merged and `--concepts` applied, printing what was
/// applied and any warning.
pub fn load_model(model: &ModelArgs, concepts: &ConceptArgs) -> Result<PatchedModel> {
    let opts = model.load_options()?;
    eprintln!("loading {}", model.model.display());
    let (mut m, warnings) = PatchedModel::load_with_loras(&model.model, &opts, &concepts.loras.lora, concepts.loras.lora_allow_unmatched)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    for label in m.patches.labels() {
        eprintln!("lora: {label}");
    }
    if let Some(file) = &concepts.concepts {
        let base = match &concepts.concepts_base {
            None => TrainedBase::Refuse,
            Some(p) if p.is_file() => {
                TrainedBase::File { path: p.clone(), config: concepts.concepts_base_config.clone(), ema: concepts.concepts_base_ema }
            }
            Some(_) if concepts.concepts_base_config.is_some() || concepts.concepts_base_ema => {
                bail!("--concepts-base-config and --concepts-base-ema belong to a single-file --concepts-base")
            }
            Some(p) => TrainedBase::Folder(p.clone()),
        };
        let tokens = concepts.modifier_tokens.as_deref().map(crate::formats::delta_ckpt::parse_modifier_tokens).transpose()?;
        let (described, warnings) = m.add_concepts_with(file, base, tokens.as_deref())?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("concepts: {described}");
    }
    Ok(m)
}

/// A progress bar on stderr.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}
