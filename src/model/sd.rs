//! A Stable Diffusion model loaded from a diffusers folder or a single-file checkpoint.
//!
//! The folder layout is diffusers' (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`,
//! `vae/`, `scheduler/`). A single `.safetensors` / `.ckpt` file in CompVis layout is read
//! through the in-memory name map of `model/single_file/`, with the configs of `--config DIR`
//! or, without it, the built-in configs and tokenizer of the detected base model
//! (`model/single_file/configs.rs`, `bundled_tokenizer.rs`; see [`SingleFileOptions`]). Every component is loaded through the strict [`WeightStore`], so a
//! missing or unexpected tensor, or a shape that disagrees with the config, is an error that
//! names the file and key. The same code path serves real SD 1.x / 2.x folders, the test
//! fixtures and the toy model.

use super::clip::{ClipTextConfig, ClipTextModel};
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, VaeConfig};
use super::weights::{component_weight_files, WeightStore};
use crate::model::single_file::{self, BaseConfigs, Detected, Part, SingleFile};
use crate::scheduler::{PredictionType, SchedulerConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to load a model folder.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Compute dtype of the frozen weights (f32 default; f16/bf16 optional).
    pub dtype: DType,
    pub device: Device,
    /// Weight file variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
    pub variant: Option<String>,
    /// How to read a single-file checkpoint (ignored for folders).
    pub single_file: SingleFileOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, variant: None, single_file: SingleFileOptions::default() }
    }
}

/// How to read a single-file checkpoint (`--model FILE`).
#[derive(Clone, Debug, Default)]
pub struct SingleFileOptions {
    /// A diffusers folder of config files (its weights are not read), as diffusers'
    /// `from_single_file(config=DIR)`: `unet/config.json`, `vae/config.json`,
    /// `text_encoder/config.json`, `scheduler/scheduler_config.json`, `tokenizer/`.
    pub config: Option<PathBuf>,
    /// Overrides the prediction type of the config or of the detection.
    pub prediction_type: Option<PredictionType>,
    /// Read the UNet from the file's EMA weights (`model_ema.*`).
    pub ema: bool,
}

/// Where a model's parts come from.
enum Source {
    Folder(PathBuf),
    /// `config`: the `--config` folder; `None`: the built-in configs of a base model.
    Single { file: Arc<SingleFile>, config: Option<PathBuf>, builtin: Option<BaseConfigs>, detected: Detected },
}

impl Source {
    fn single(path: &Path, opts: &SingleFileOptions) -> Result<Self> {
        let file = SingleFile::open(path)?;
        let detected = file.detect()?;
        eprintln!(
            "{}: {:?}, {} UNet input channels{}{}; detected prediction: {} ({})",
            path.display(),
            detected.family,
            detected.in_channels,
            if detected.inpainting { " (inpainting)" } else { "" },
            if detected.has_ema { ", with EMA weights" } else { "" },
            if detected.v_prediction { "v_prediction" } else { "epsilon" },
            detected.prediction_reason
        );
        if opts.ema && !detected.has_ema {
            bail!("--ema: {} holds no EMA weights (model_ema.*)", path.display());
        }
        let (config, builtin) = match opts.config.clone() {
            Some(config) if !config.is_dir() => bail!("--config {} is not a folder", config.display()),
            Some(config) => (Some(config), None),
            None => {
                let base = single_file::base_configs(&detected).with_context(|| {
                    format!(
                        "{}: no built-in configs fit; pass --config DIR, a diffusers folder with the model's config files \
                         (unet/, vae/, text_encoder/, scheduler/, tokenizer/; no weights are read from it)",
                        path.display()
                    )
                })?;
                eprintln!("{}: built-in {} configs and the bundled CLIP tokenizer (no --config)", path.display(), base.kind);
                (None, Some(base))
            }
        };
        Ok(Source::Single { file: Arc::new(file), config, builtin, detected })
    }

    fn tokenizer(&self) -> Result<ClipTokenizer> {
        match self {
            Source::Folder(root) => ClipTokenizer::from_dir(&root.join("tokenizer")),
            Source::Single { config: Some(config), .. } => ClipTokenizer::from_dir(&config.join("tokenizer")),
            Source::Single { detected, .. } => ClipTokenizer::bundled(detected.family),
        }
    }

    /// The config file of `component`, or `Err` where the configs are built in (see [`builtin`](Self::builtin)).
    fn config(&self, component: &str, file: &str) -> Result<PathBuf> {
        match self {
            Source::Folder(root) => config_path(root, component, file),
            Source::Single { config: Some(config), .. } => config_path(config, component, file),
            Source::Single { .. } => bail!("no config file for {component}: the configs are built in"),
        }
    }

    /// The built-in config of `component` as JSON text with a name for errors (`None`: read
    /// it from [`config`](Self::config)).
    fn builtin(&self, component: &str) -> Result<Option<(String, String)>> {
        match self {
            Source::Single { builtin: Some(b), .. } => Ok(Some((format!("the built-in {} {component} config", b.kind), b.get(component)?.to_string()))),
            _ => Ok(None),
        }
    }

    /// The weights of `component`; `part` describes its layout to the single-file name map.
    fn store(&self, component: &str, part: Part, opts: &LoadOptions) -> Result<WeightStore> {
        match self {
            Source::Folder(root) => open_component(root, component, opts),
            Source::Single { file, .. } => {
                let mapped = single_file::component(file, &part)?;
                let shapes = mapped.shapes();
                Ok(WeightStore::from_source(&file.path, shapes, Box::new(move |n, d| mapped.load(n, d)), opts.dtype, &opts.device))
            }
        }
    }

    fn place(&self, component: &str) -> String {
        match self {
            Source::Folder(root) => root.join(component).display().to_string(),
            Source::Single { file, .. } => format!("{} ({component})", file.path.display()),
        }
    }
}

pub struct StableDiffusion {
    pub root: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNetConfig,
    /// UNet weights loaded as trainable variables.
    pub unet_vars: Vec<(String, Var)>,
    /// Frozen UNet weights that the patch layer may change and restore in place (see
    /// [`is_patchable`] and [`ExtraPatchable::unet`]), by diffusers name.
    pub unet_patchable: Vec<(String, Var)>,
    /// Text-encoder weights the patch layer may change (those of
    /// [`ExtraPatchable::text_encoder`], e.g. a LoRA's targets), by the store's name.
    pub text_encoder_patchable: Vec<(String, Var)>,
    pub vae: AutoencoderKL,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    /// The weight stores of text_encoder, unet and vae (their frozen tensors can be listed).
    pub weight_stores: Vec<(String, Arc<WeightStore>)>,
    pub dtype: DType,
    pub device: Device,
}

/// Checks `model_index.json` names components this crate implements.
fn check_model_index(root: &Path) -> Result<()> {
    let path = root.join("model_index.json");
    if !path.is_file() {
        bail!(
            "{} is not a diffusers model folder (no model_index.json). Point --model at a folder with \
             model_index.json, tokenizer/, text_encoder/, unet/, vae/ and scheduler/",
            root.display()
        );
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let expect = [
        ("text_encoder", &["CLIPTextModel"][..]),
        ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"][..]),
        ("unet", &["UNet2DConditionModel"][..]),
        ("vae", &["AutoencoderKL"][..]),
    ];
    for (component, classes) in expect {
        let class = v.get(component).and_then(|c| c.as_array()).and_then(|a| a.get(1)).and_then(|c| c.as_str());
        match class {
            Some(c) if classes.contains(&c) => {}
            Some(c) => bail!("{}: component {component} is a {c}; supported: {}", path.display(), classes.join(", ")),
            None => bail!("{}: no {component} component", path.display()),
        }
    }
    Ok(())
}

/// Opens the weights of one component (`unet`, `vae`, `text_encoder`) as a strict store.
pub fn open_component(root: &Path, component: &str, opts: &LoadOptions) -> Result<WeightStore> {
    let stem = if component == "text_encoder" { "model" } else { "diffusion_pytorch_model" };
    let dir = root.join(component);
    let files = component_weight_files(&dir, stem, opts.variant.as_deref())?;
    WeightStore::open(&files, opts.dtype, &opts.device)
}

/// The UNet weights of a diffusers folder in f32 on the CPU (the plain files, else the `fp16`
/// variant), e.g. of the base a concept file was trained on.
pub fn open_unet_f32(folder: &Path) -> Result<WeightStore> {
    let mut opts = LoadOptions::default();
    match open_component(folder, "unet", &opts) {
        Ok(s) => Ok(s),
        Err(e) => {
            opts.variant = Some("fp16".into());
            open_component(folder, "unet", &opts).map_err(|_| e)
        }
    }
    .with_context(|| format!("reading the UNet weights of {}", folder.display()))
}

/// The UNet of a base model (f32 on the CPU, by diffusers name) with the configs a concept
/// file is checked and exported against.
pub struct BaseUnet {
    pub store: WeightStore,
    pub unet_config: UNetConfig,
    /// The text encoder's token table (vocab_size, hidden_size), part of the fingerprint.
    pub token_table: (usize, usize),
    /// The opened single file (`None` for a folder).
    pub single_file: Option<Arc<SingleFile>>,
}

/// The UNet weights of a base model: a diffusers folder ([`open_unet_f32`]), or a single-file
/// checkpoint read with `single` (`--config`, `--ema`; configs built in without `--config`).
pub fn open_base_unet_f32(path: &Path, single: &SingleFileOptions) -> Result<BaseUnet> {
    if !(path.is_file() && single_file::is_single_file(path)) {
        let store = open_unet_f32(path)?;
        let unet_config = UNetConfig::from_file(path.join("unet/config.json"))?;
        let te = ClipTextConfig::from_file(&path.join("text_encoder/config.json"))?;
        return Ok(BaseUnet { store, unet_config, token_table: (te.vocab_size, te.hidden_size), single_file: None });
    }
    let src = Source::single(path, single)?;
    let te = match src.builtin("text_encoder")? {
        Some((origin, text)) => ClipTextConfig::from_json(&text, &origin)?,
        None => ClipTextConfig::from_file(&src.config("text_encoder", "config.json")?)?,
    };
    let unet_config = match src.builtin("unet")? {
        Some((origin, text)) => UNetConfig::from_json_str(&text).with_context(|| origin)?,
        None => UNetConfig::from_file(&src.config("unet", "config.json")?)?,
    };
    let part = Part::Unet {
        layers_per_block: unet_config.layers_per_block.expand(unet_config.block_out_channels.len(), "layers_per_block")?,
        ema: single.ema,
    };
    let opts = LoadOptions::default();
    let store = src.store("unet", part, &opts).with_context(|| format!("reading the UNet weights of {}", path.display()))?;
    let file = match &src {
        Source::Single { file, .. } => file.clone(),
        Source::Folder(_) => bail!("{} was opened as a folder", path.display()),
    };
    Ok(BaseUnet { store, unet_config, token_table: (te.vocab_size, te.hidden_size), single_file: Some(file) })
}

/// The UNet weights every loaded model can have patched in place: the cross-attention
/// projections that concept files replace (`attn2.to_q/to_k/to_v.weight`).
pub fn is_patchable(name: &str) -> bool {
    ["attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight"].iter().any(|s| name.ends_with(s))
}

/// Weights to load patchable beyond [`is_patchable`], chosen at load time (a LoRA's targets),
/// by the name each component's weight file uses.
#[derive(Clone, Debug, Default)]
pub struct ExtraPatchable {
    pub unet: BTreeSet<String>,
    pub text_encoder: BTreeSet<String>,
}

/// The prefix that names a text-encoder weight among the patch layer's weight names (UNet
/// weights go by their bare diffusers name).
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder.";

fn config_path(root: &Path, component: &str, file: &str) -> Result<PathBuf> {
    let p = root.join(component).join(file);
    if !p.is_file() {
        bail!("missing {}", p.display());
    }
    Ok(p)
}

impl StableDiffusion {
    /// Loads every component of a diffusers folder.
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_with(root, opts, |_| false)
    }

    /// Like [`load`](Self::load), with the UNet weights whose diffusers name satisfies
    /// `unet_trainable` loaded as variables (listed in [`unet_vars`](Self::unet_vars)).
    pub fn load_with(root: &Path, opts: &LoadOptions, unet_trainable: impl Fn(&str) -> bool + Send + Sync + 'static) -> Result<Self> {
        Self::load_full(root, opts, unet_trainable, ExtraPatchable::default())
    }

    /// Like [`load_with`](Self::load_with), with the weights named in `extra` also loaded
    /// patchable (see [`weight_var`](Self::weight_var)).
    pub fn load_full(
        root: &Path,
        opts: &LoadOptions,
        unet_trainable: impl Fn(&str) -> bool + Send + Sync + 'static,
        extra: ExtraPatchable,
    ) -> Result<Self> {
        let ExtraPatchable { unet: unet_extra, text_encoder: te_extra } = extra;
        let src = if root.is_file() && single_file::is_single_file(root) {
            Source::single(root, &opts.single_file)?
        } else {
            if root.is_file() {
                bail!(
                    "{} is a file, not a model folder (a diffusers folder with model_index.json, or a single-file \
                     .safetensors / .ckpt checkpoint, is expected)",
                    root.display()
                );
            }
            if !root.is_dir() {
                bail!("model folder {} does not exist", root.display());
            }
            check_model_index(root)?;
            Source::Folder(root.to_path_buf())
        };
        let tokenizer = src.tokenizer()?;

        let te_cfg = match src.builtin("text_encoder")? {
            Some((origin, text)) => ClipTextConfig::from_json(&text, &origin)?,
            None => ClipTextConfig::from_file(&src.config("text_encoder", "config.json")?)?,
        };
        let te_part = Part::TextEncoder { num_layers: te_cfg.num_hidden_layers };
        let te_store = Arc::new(src.store("text_encoder", te_part, opts)?.with_patchable(move |n| te_extra.contains(n)));
        let text_encoder = ClipTextModel::new(te_store.root(), &te_cfg)
            .with_context(|| format!("loading the text encoder from {}", src.place("text_encoder")))?;
        te_store.finish()?;
        let text_encoder_patchable = te_store.patchable_vars();
        if tokenizer.vocab_size() > te_cfg.vocab_size {
            bail!(
                "the tokenizer has {} tokens but the text encoder only {} embeddings: tokenizer and text encoder do not match",
                tokenizer.vocab_size(),
                te_cfg.vocab_size
            );
        }

        let unet_config = match src.builtin("unet")? {
            Some((origin, text)) => UNetConfig::from_json_str(&text).with_context(|| origin)?,
            None => UNetConfig::from_file(&src.config("unet", "config.json")?)?,
        };
        if let Source::Single { detected, file, .. } = &src {
            if detected.in_channels != unet_config.in_channels {
                bail!(
                    "{} has a UNet with {} input channels, but the --config UNet has {}: the config does not describe this file",
                    file.path.display(),
                    detected.in_channels,
                    unet_config.in_channels
                );
            }
        }
        let unet_part = Part::Unet {
            layers_per_block: unet_config.layers_per_block.expand(unet_config.block_out_channels.len(), "layers_per_block")?,
            ema: opts.single_file.ema,
        };
        let unet_store = Arc::new(src.store("unet", unet_part, opts)?.with_trainable(unet_trainable).with_patchable(move |n| is_patchable(n) || unet_extra.contains(n)));
        let unet = UNet2DConditionModel::new(unet_store.root(), &unet_config)
            .with_context(|| format!("loading the UNet from {}", src.place("unet")))?;
        unet_store.finish()?;
        let unet_vars = unet_store.vars();
        let unet_patchable = unet_store.patchable_vars();
        if unet_config.cross_attention_dim != te_cfg.hidden_size {
            bail!(
                "the UNet's cross_attention_dim is {} but the text encoder's hidden_size is {}",
                unet_config.cross_attention_dim,
                te_cfg.hidden_size
            );
        }

        let vae_config = match src.builtin("vae")? {
            Some((origin, text)) => VaeConfig::from_json(&text).with_context(|| origin)?,
            None => VaeConfig::from_file(&src.config("vae", "config.json")?)?,
        };
        let vae_store = Arc::new(src.store("vae", Part::Vae { num_blocks: vae_config.block_out_channels.len() }, opts)?);
        let vae = AutoencoderKL::new(vae_store.root(), &vae_config)
            .with_context(|| format!("loading the VAE from {}", src.place("vae")))?;
        vae_store.finish()?;

        let mut scheduler_config = match src.builtin("scheduler")? {
            Some((origin, text)) => SchedulerConfig::from_json(&text).with_context(|| origin)?,
            None => SchedulerConfig::from_file(&src.config("scheduler", "scheduler_config.json")?)?,
        };
        if let (Source::Single { .. }, Some(p)) = (&src, opts.single_file.prediction_type) {
            scheduler_config.prediction_type = p;
        }
        Ok(Self {
            root: root.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            unet_config,
            unet_vars,
            unet_patchable,
            text_encoder_patchable,
            vae,
            vae_config,
            scheduler_config,
            weight_stores: vec![("text_encoder".into(), te_store), ("unet".into(), unet_store), ("vae".into(), vae_store)],
            dtype: opts.dtype,
            device: opts.device.clone(),
        })
    }

    /// The variable holding UNet weight `name`, trainable or patchable (`None` for a weight
    /// loaded as a plain frozen tensor).
    pub fn unet_weight_var(&self, name: &str) -> Option<&Var> {
        self.unet_vars.iter().chain(&self.unet_patchable).find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The variable of a patchable weight by the patch layer's name: a UNet weight by its
    /// diffusers name (as [`unet_weight_var`](Self::unet_weight_var)), a text-encoder weight as
    /// `text_encoder.<name in its file>`.
    pub fn weight_var(&self, name: &str) -> Option<&Var> {
        match name.strip_prefix(TEXT_ENCODER_PREFIX) {
            Some(te) => self.text_encoder_patchable.iter().find(|(n, _)| n == te).map(|(_, v)| v),
            None => self.unet_weight_var(name),
        }
    }

    /// Pixels per latent pixel (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae_config.block_out_channels.len() - 1)
    }

    /// Default image side: the UNet's sample size times the VAE factor (512 for SD1.5).
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size * self.vae_scale_factor()
    }
}
