//! Single-file Stable Diffusion checkpoints (A1111 / CompVis layout, `.safetensors` or `.ckpt`)
//! read as the diffusers-named tensors of each component, in memory.
//!
//! A single file holds the whole model under CompVis names: `model.diffusion_model.*` (UNet),
//! `first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder), optionally
//! `model_ema.*` (EMA copies of the UNet weights, dots removed from their names). Each
//! component is offered as a map from diffusers name to (CompVis name, how to derive the
//! tensor), so the model's strict loader asks for diffusers names as it does from a folder and
//! nothing is converted on disk. Which SD it is comes from [`detect`]; the key maps are in
//! unet_keys.rs, vae_keys.rs, text_encoder_keys.rs; `.ckpt` pickles are read by
//! `pickle.rs`, which builds tensors and containers only. Without `--config DIR` the
//! configs of the five base models come from configs.rs and the tokenizer from
//! bundled_tokenizer.rs. to_compvis.rs writes diffusers-named components back under their
//! CompVis names (the inverse maps).

pub mod pickle;
pub mod bundled_tokenizer;
pub mod configs;
pub mod detect;
mod text_encoder_keys;
pub mod to_compvis;
mod unet_keys;
mod vae_keys;

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use text_encoder_keys::{TextKey, Third};

pub use configs::{base_configs, BaseConfigs};
pub use detect::{detect, Detected, Family};

/// Top-level keys of LDM checkpoints that no diffusers component loads (the training
/// schedule's buffers, EMA bookkeeping).
const IGNORED: &[&str] = &[
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    "model_ema.decay", "model_ema.num_updates", "v_pred",
];

/// The prefixes of the components' keys.
pub const UNET: &str = "model.diffusion_model.";
pub const VAE: &str = "first_stage_model.";
pub const CLIP: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP: &str = "cond_stage_model.model.";
pub const EMA: &str = "model_ema.";

enum Raw {
    Safetensors(MmapedSafetensors),
    Tensors(HashMap<String, Tensor>),
}

/// An opened single-file checkpoint.
pub struct SingleFile {
    pub path: PathBuf,
    raw: Raw,
    shapes: BTreeMap<String, Vec<usize>>,
    /// The training step stored next to a `.ckpt`'s state dict (used by [`detect`]).
    pub global_step: Option<i64>,
}

/// Whether `path` names a single-file checkpoint (by its extension).
pub fn is_single_file(path: &Path) -> bool {
    matches!(extension(path).as_deref(), Some("safetensors" | "ckpt" | "pt" | "pth"))
}

fn extension(path: &Path) -> Option<String> {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase())
}

impl SingleFile {
    /// Opens a `.safetensors` (memory-mapped) or `.ckpt` / `.pt` / `.pth` (read by the safe
    /// pickle reader) file and checks every key belongs to a known component.
    pub fn open(path: &Path) -> Result<Self> {
        let (raw, global_step) = match extension(path).as_deref() {
            Some("safetensors") => {
                let st = unsafe { MmapedSafetensors::new(path) }
                    .with_context(|| format!("{} is not a readable safetensors file (truncated or corrupt?)", path.display()))?;
                (Raw::Safetensors(st), None)
            }
            Some("ckpt" | "pt" | "pth") => {
                let ckpt = crate::model::single_file::pickle::read_checkpoint(path)?;
                (Raw::Tensors(ckpt.tensors), ckpt.global_step)
            }
            _ => bail!("{}: a single-file model must end in .safetensors or .ckpt", path.display()),
        };
        let shapes = match &raw {
            Raw::Safetensors(st) => st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect(),
            Raw::Tensors(t) => t.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect(),
        };
        let file = Self { path: path.to_path_buf(), raw, shapes, global_step };
        let unknown: Vec<&str> = file
            .shapes
            .keys()
            .filter(|k| ![UNET, VAE, CLIP, OPEN_CLIP, EMA].iter().any(|p| k.starts_with(p)) && !IGNORED.contains(&k.as_str()))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            bail!(
                "{} holds {} tensor(s) of no SD 1.x/2.x component, e.g. {}: not a CompVis Stable Diffusion checkpoint",
                path.display(),
                unknown.len(),
                unknown.iter().take(6).copied().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(file)
    }

    /// Every tensor's CompVis name and shape.
    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    /// Detects the architecture ([`detect`]).
    pub fn detect(&self) -> Result<Detected> {
        detect(&self.shapes, self.global_step).with_context(|| format!("detecting the model in {}", self.path.display()))
    }

    /// The tensor stored under CompVis name `name`, as it is in the file (its dtype, on the CPU).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.load_raw(name, &Device::Cpu).with_context(|| format!("reading {name} from {}", self.path.display()))
    }

    fn load_raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = match &self.raw {
            Raw::Safetensors(st) => st.load(name, device)?,
            Raw::Tensors(t) => t.get(name).with_context(|| format!("no tensor {name}"))?.to_device(device)?,
        };
        Ok(t)
    }
}

/// A component of the checkpoint, with what its diffusers config says about its layout.
pub enum Part {
    /// The UNet, with its layers per down block; `ema`: read the `model_ema.*` copies.
    Unet { layers_per_block: Vec<usize>, ema: bool },
    /// The VAE, with its number of resolution levels.
    Vae { num_blocks: usize },
    /// The text encoder, with the number of layers the diffusers model has.
    TextEncoder { num_layers: usize },
}

/// How a diffusers tensor is derived from a CompVis one.
#[derive(Clone, Copy, Debug)]
enum Op {
    Same,
    /// A 1x1 convolution `[o, i, 1, 1]` read as a linear weight `[o, i]`.
    Squeeze,
    /// A third of a fused q/k/v in-projection along dim 0.
    Third(Third),
}

/// One component's tensors by diffusers name.
pub struct Mapped {
    file: Arc<SingleFile>,
    map: BTreeMap<String, (String, Op, Vec<usize>)>,
}

impl Mapped {
    /// The diffusers name and shape of every tensor.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.map.iter().map(|(k, (_, _, s))| (k.clone(), s.clone())).collect()
    }

    /// Loads the tensor named `name` (diffusers name).
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (src, op, shape) = self.map.get(name).with_context(|| format!("no tensor maps to {name}"))?;
        let t = self.file.load_raw(src, device).with_context(|| format!("reading {src} from {}", self.file.path.display()))?;
        let t = match op {
            Op::Same => t,
            Op::Squeeze => t.reshape(shape.as_slice())?,
            Op::Third(third) => t.narrow(0, *third as usize * shape[0], shape[0])?.contiguous()?,
        };
        Ok(t)
    }
}

/// The diffusers-named tensors of `part` in `file`; a key of the component that has no place
/// in the layout the config describes is an error naming it.
pub fn component(file: &Arc<SingleFile>, part: &Part) -> Result<Mapped> {
    let map = map_names(&file.shapes, part).with_context(|| file.path.display().to_string())?;
    Ok(Mapped { file: file.clone(), map })
}

/// For checks of the key maps on name/shape lists alone: each diffusers name of `part` with
/// the CompVis name it is read from and its shape.
pub fn diffusers_names(shapes: &BTreeMap<String, Vec<usize>>, part: &Part) -> Result<BTreeMap<String, (String, Vec<usize>)>> {
    Ok(map_names(shapes, part)?.into_iter().map(|(k, (src, _, shape))| (k, (src, shape))).collect())
}

type NameMap = BTreeMap<String, (String, Op, Vec<usize>)>;

fn map_names(shapes: &BTreeMap<String, Vec<usize>>, part: &Part) -> Result<NameMap> {
    let mut map = BTreeMap::new();
    let mut unplaced = Vec::new();
    let mut put = |name: String, src: &str, op: Op, shape: Vec<usize>| -> Result<()> {
        if map.insert(name.clone(), (src.to_string(), op, shape)).is_some() {
            bail!("two tensors map to {name}");
        }
        Ok(())
    };
    match part {
        Part::Unet { layers_per_block, ema } => {
            let layout = unet_keys::UnetLayout::new(layers_per_block);
            for (key, shape) in shapes.range(UNET.to_string()..).take_while(|(k, _)| k.starts_with(UNET)) {
                let rest = &key[UNET.len()..];
                let Some(name) = layout.map(rest) else {
                    unplaced.push(key.clone());
                    continue;
                };
                let src = if *ema { ema_key(key) } else { key.clone() };
                match shapes.get(&src) {
                    Some(s) if s == shape => put(name, &src, Op::Same, shape.clone())?,
                    Some(s) => bail!("EMA tensor {src} has shape {s:?} but {key} has {shape:?}"),
                    None => bail!("--ema asks for the EMA weights, but {src} (the EMA copy of {key}) is missing"),
                }
            }
        }
        Part::Vae { num_blocks } => {
            for (key, shape) in shapes.range(VAE.to_string()..).take_while(|(k, _)| k.starts_with(VAE)) {
                match vae_keys::map(&key[VAE.len()..], *num_blocks) {
                    Some(v) if v.squeeze && shape.len() == 4 && shape[2] == 1 && shape[3] == 1 => {
                        put(v.name, key, Op::Squeeze, shape[..2].to_vec())?
                    }
                    Some(v) => put(v.name, key, Op::Same, shape.clone())?,
                    None => unplaced.push(key.clone()),
                }
            }
        }
        Part::TextEncoder { num_layers } => {
            for (key, shape) in shapes.iter() {
                let mapped = if let Some(r) = key.strip_prefix(CLIP) {
                    text_encoder_keys::map_clip(r)
                } else if let Some(r) = key.strip_prefix(OPEN_CLIP) {
                    text_encoder_keys::map_open_clip(r, *num_layers)
                } else {
                    continue;
                };
                match mapped {
                    Some(TextKey::Plain(name)) => put(name, key, Op::Same, shape.clone())?,
                    Some(TextKey::Fused(parts)) => {
                        if shape.is_empty() || !shape[0].is_multiple_of(3) {
                            bail!("fused in-projection {key} has shape {shape:?}; 3d rows are expected");
                        }
                        for (name, third) in parts {
                            let mut s = shape.clone();
                            s[0] /= 3;
                            put(name, key, Op::Third(third), s)?;
                        }
                    }
                    Some(TextKey::Skip) => {}
                    None => unplaced.push(key.clone()),
                }
            }
        }
    }
    if !unplaced.is_empty() {
        bail!(
            "{} tensor(s) have no place in the configured {} (does --config match the file?), e.g. {}",
            unplaced.len(),
            part_name(part),
            unplaced.iter().take(6).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(map)
}

fn part_name(part: &Part) -> &'static str {
    match part {
        Part::Unet { .. } => "UNet",
        Part::Vae { .. } => "VAE",
        Part::TextEncoder { .. } => "text encoder",
    }
}

/// The EMA copy's name of UNet key `model.diffusion_model.X`: `model_ema.diffusion_modelX`
/// with the dots of everything after `model.` removed (LDM's naming).
pub fn ema_key(key: &str) -> String {
    let after = key.strip_prefix("model.").unwrap_or(key);
    format!("{EMA}{}", after.replace('.', ""))
}
