//! `disendiff export`: a concept file (or a diffusers Custom Diffusion folder, or an official
//! `delta.ckpt`) written for other
//! tools: `--format diffusers` (Custom Diffusion folder + textual-inversion files) or
//! `--format webui` (a kohya-named network file + `embeddings/`, for AUTOMATIC1111, ComfyUI,
//! InvokeAI and kohya's scripts) or `--format checkpoint` (the base with the concepts merged, one
//! CompVis single file + `embeddings/`). The base is a diffusers folder or a single file. The
//! files are described in `formats::export`.

use crate::formats::{custom_diffusion, delta_ckpt};
use crate::formats::export::{self, checkpoint, diffusers, webui};
use crate::model::sd::{open_base_unet_f32, SingleFileOptions};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// diffusers: DIR/pytorch_custom_diffusion_weights.safetensors + DIR/<token>.safetensors.
    Diffusers,
    /// AUTOMATIC1111 / ComfyUI / InvokeAI / kohya: DIR/<name>.safetensors + DIR/embeddings/.
    Webui,
    /// The base with the concepts merged, one CompVis single file DIR/<name>.safetensors
    /// (A1111/ComfyUI models/Stable-diffusion/, diffusers from_single_file) + DIR/embeddings/.
    /// A single-file base keeps every tensor as it is but drops model_ema.* (with --ema its EMA
    /// UNet is written, merged, as the model's).
    Checkpoint,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// Full-rank lora_up / lora_down / alpha: lossless, applied by every tool.
    Full,
    /// `.diff` (the difference itself): lossless, smaller; not read by diffusers.
    Diff,
    /// The top --rank singular values of the difference (lossy; the error is printed).
    Lowrank,
}

#[derive(clap::Args)]
pub struct Args {
    /// A concept file from `disendiff train`, a diffusers Custom Diffusion folder, or an official
    /// DisenDiff / Custom Diffusion delta.ckpt (then --model is needed).
    #[arg(long, value_name = "FILE")]
    pub concepts: PathBuf,
    /// The modifier tokens of a delta.ckpt, joined by '+' (default: <new1>..<newN>).
    #[arg(long, value_name = "TOKENS")]
    pub modifier_tokens: Option<String>,
    /// The base model the concepts were trained on, a diffusers folder or a single
    /// .safetensors/.ckpt file (default: the model the file records), checked against the
    /// file's fingerprint.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: Option<PathBuf>,
    /// With a single-file --model: a diffusers folder of its config files (default: the
    /// built-in configs of the detected base model).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// With a single-file --model: its EMA UNet weights (model_ema.*) are the base.
    #[arg(long)]
    pub ema: bool,
    #[arg(long, value_enum)]
    pub format: Format,
    /// With --format webui: how the K/V differences are stored.
    #[arg(long, value_enum, default_value = "full")]
    pub lora_format: LoraFormat,
    /// With --lora-format lowrank: the rank kept.
    #[arg(long, value_name = "N")]
    pub rank: Option<usize>,
    /// With --format webui or checkpoint: the file's name (DIR/NAME.safetensors; the
    /// <lora:NAME:1> of A1111). Default: the concept file's stem.
    #[arg(long)]
    pub name: Option<String>,
    /// With --format webui or checkpoint: trigger words of the embeddings, e.g. new1=mycat (default: the token
    /// without <>). Comma-separated or repeated.
    #[arg(long, value_name = "TOKEN=WORD", value_delimiter = ',')]
    pub names: Vec<String>,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    if a.format != Format::Webui && (a.lora_format != LoraFormat::Full || a.rank.is_some()) {
        bail!("--lora-format and --rank belong to --format webui");
    }
    if a.format == Format::Diffusers && (a.name.is_some() || !a.names.is_empty()) {
        bail!("--name and --names belong to --format webui and checkpoint");
    }
    let form = match (a.lora_format, a.rank) {
        (LoraFormat::Lowrank, Some(0)) => bail!("--rank must be at least 1"),
        (LoraFormat::Lowrank, Some(r)) => webui::LoraForm::LowRank(r),
        (LoraFormat::Lowrank, None) => bail!("--lora-format lowrank needs --rank N"),
        (_, Some(_)) => bail!("--rank belongs to --lora-format lowrank"),
        (LoraFormat::Full, None) => webui::LoraForm::Full,
        (LoraFormat::Diff, None) => webui::LoraForm::Diff,
    };
    let mut names = HashMap::new();
    for n in &a.names {
        let Some((k, v)) = n.split_once('=') else { bail!("--names {n}: expected TOKEN=WORD, e.g. new1=mycat") };
        if names.insert(k.trim().to_string(), v.trim().to_string()).is_some() {
            bail!("--names names {k} twice");
        }
    }
    let single = SingleFileOptions { config: a.config.clone(), prediction_type: None, ema: a.ema };
    let file = if delta_ckpt::is_delta_ckpt(&a.concepts) {
        let model = a.model.as_ref().with_context(|| format!("{} does not record its base model: pass it with --model", a.concepts.display()))?;
        let cfg = open_base_unet_f32(model, &single)?.unet_config;
        let layers = cfg.layers_per_block.expand(cfg.block_out_channels.len(), "layers_per_block")?;
        let tokens = a.modifier_tokens.as_deref().map(delta_ckpt::parse_modifier_tokens).transpose()?;
        let (file, note) = delta_ckpt::load(&a.concepts, &layers, tokens.as_deref())?;
        if let Some(n) = note {
            eprintln!("note: {n}");
        }
        file
    } else if a.modifier_tokens.is_some() {
        bail!("--modifier-tokens belongs to a delta.ckpt; {} names its own tokens", a.concepts.display());
    } else {
        custom_diffusion::load_any(&a.concepts)?
    };
    let model = match &a.model {
        Some(m) => m.clone(),
        None if !file.meta.base_model.path.is_empty() => PathBuf::from(&file.meta.base_model.path),
        None => bail!("{} does not record its base model: pass it with --model", a.concepts.display()),
    };
    if (a.config.is_some() || a.ema) && !model.is_file() {
        bail!("--config and --ema belong to a single-file --model ({} is not a file)", model.display());
    }
    let base = export::read_base(&model, &file, &a.concepts, &single)?;
    let stem = match &a.name {
        Some(n) => n.clone(),
        None => a.concepts.file_stem().and_then(|s| s.to_str()).context("the concept file has no name")?.to_string(),
    };
    let files = match a.format {
        Format::Diffusers => diffusers::write(&file, &base, &a.out)?,
        Format::Checkpoint => checkpoint::write(&file, &base, &a.concepts, &a.out, &stem, &names)?,
        Format::Webui => {
            let w = webui::write(&file, &base, form, &a.out, &stem, &names)?;
            if !w.errors.is_empty() {
                let worst = w.errors.iter().map(|e| e.1).fold(0.0, f64::max);
                let mean = w.errors.iter().map(|e| e.1).sum::<f64>() / w.errors.len() as f64;
                eprintln!("lowrank: relative error of the K/V differences (Frobenius): mean {mean:.4}, worst {worst:.4}");
                for (n, e) in &w.errors {
                    eprintln!("  {n}: {e:.4}");
                }
            }
            w.files
        }
    };
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
