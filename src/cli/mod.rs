//! The `disendiff` command line: one subcommand per file.

mod attention;
mod bench;
mod demo;
mod generate;
mod toy;
mod toy_bench;
mod train;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "disendiff",
    version,
    about = "DisenDiff: learn several concepts from one image and generate new images of them",
    long_about = "DisenDiff (CVPR 2024) fine-tunes Stable Diffusion's cross-attention keys/values and new \
token embeddings under attention-calibration losses, so that several concepts learned from a single \
image can be generated together or alone. Models are diffusers folders (model_index.json, tokenizer/, \
text_encoder/, unet/, vae/, scheduler/)."
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
    /// Learn the concepts of one image (DisenDiff, Custom Diffusion or Textual Inversion).
    Train(train::Args),
    /// Heatmaps of each prompt token's cross-attention (the paper's Fig. 4 view).
    Attention(attention::Args),
    /// Time and memory of fixed cases (compare with tools/reference/bench_torch.py).
    Bench(bench::Args),
    /// The synthetic toy world: scenes, the toy base model, the benchmark.
    Toy(toy::Args),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Toy(args) => toy::run(args),
        Command::Train(args) => train::run(args),
        Command::Attention(args) => attention::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Device/dtype flags shared by the subcommands that load a model.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Stable Diffusion model folder in diffusers layout.
    #[arg(long, value_name = "DIR")]
    pub model: std::path::PathBuf,
    /// Weight precision: f32 (default), f16 or bf16.
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: String,
    /// Weight file variant to load, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// Compute device: cpu, or cuda / cuda:N when built with --features cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<crate::model::sd::LoadOptions> {
        let dtype = match self.dtype.as_str() {
            "f32" | "fp32" | "float32" => DType::F32,
            "f16" | "fp16" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            other => bail!("unknown --dtype {other:?} (f32, f16 or bf16)"),
        };
        let device = match self.device.as_str() {
            "cpu" => Device::Cpu,
            d if d.starts_with("cuda") => {
                let n = d.strip_prefix("cuda:").map(|n| n.parse::<usize>()).transpose()?.unwrap_or(0);
                Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cannot use {d}: {e} (was disendiff built with --features cuda?)"))?
            }
            other => bail!("unknown --device {other:?} (cpu, cuda, cuda:N)"),
        };
        Ok(crate::model::sd::LoadOptions { dtype, device, variant: self.variant.clone() })
    }
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
