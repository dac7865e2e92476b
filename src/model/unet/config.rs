//! `UNetConfig`: a diffusers `unet/config.json` (UNet2DConditionModel), checked so that every
//! field the Rust UNet cannot honour is a clear error instead of a silently different model.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// An int for every block, or one per block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    List(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// One value per block, or an error naming `field` when a list has the wrong length.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::List(l) if l.len() == n => Ok(l.clone()),
            PerBlock::List(l) => bail!("unet config: {field} has {} entries {:?}, but there are {n} blocks", l.len(), l),
        }
    }
}

fn d_4() -> usize {
    4
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn d_up() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_head_dim() -> Option<PerBlock<usize>> {
    Some(PerBlock::One(8))
}
fn d_cross() -> usize {
    1280
}
fn d_64() -> usize {
    64
}
fn d_only_cross() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_1usize() -> usize {
    1
}
fn d_1f() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}

/// The fields of diffusers' `UNet2DConditionModel` config this implementation reads (defaults as
/// in diffusers); all other fields land in `other` and are checked by [`UNetConfig::validate`].
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    /// `None` (JSON null): no mid block.
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// SD's (mis)name for the number of heads, used when `num_attention_heads` is null.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: Option<PerBlock<usize>>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Width of the text context (one value for all blocks).
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_only_cross")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_1usize")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Latent side the model was trained at (64 for SD1.5 at 512).
    #[serde(default = "d_64")]
    pub sample_size: usize,
    /// Every other field of the JSON file.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Fields that change the architecture unless they hold their default (null unless stated).
const MUST_BE_DEFAULT: &[(&str, &str)] = &[
    ("class_embed_type", "null"),
    ("num_class_embeds", "null"),
    ("addition_embed_type", "null"),
    ("encoder_hid_dim", "null"),
    ("encoder_hid_dim_type", "null"),
    ("time_cond_proj_dim", "null"),
    ("time_embedding_act_fn", "null"),
    ("timestep_post_act", "null"),
    ("cross_attention_norm", "null"),
    ("reverse_transformer_layers_per_block", "null"),
    ("dual_cross_attention", "false"),
    ("class_embeddings_concat", "false"),
    ("resnet_time_scale_shift", "\"default\""),
    ("time_embedding_type", "\"positional\""),
    ("attention_type", "\"default\""),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
];

/// Fields that do not affect `CrossAttn*Block2D` / `*Block2D` UNets (diffusers passes them
/// only to block types or embeddings this implementation rejects anyway).
const HARMLESS: &[&str] = &[
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
    "mid_block_only_cross_attention",
    "addition_embed_type_num_heads",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
];

pub(crate) const CROSS_DOWN: &str = "CrossAttnDownBlock2D";
pub(crate) const PLAIN_DOWN: &str = "DownBlock2D";
pub(crate) const CROSS_UP: &str = "CrossAttnUpBlock2D";
pub(crate) const PLAIN_UP: &str = "UpBlock2D";
pub(crate) const CROSS_MID: &str = "UNetMidBlock2DCrossAttn";

/// Block type names with diffusers' optional `UNetRes` prefix removed.
pub(crate) fn block_type(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

impl UNetConfig {
    /// Reads, parses and validates a `config.json`; unknown non-default fields are listed in a
    /// warning on stderr.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading UNet config {}", path.display()))?;
        let cfg = Self::from_json_str(&text).with_context(|| format!("UNet config {}", path.display()))?;
        if cfg.dropout != 0.0 {
            eprintln!("warning: {}: dropout = {} is ignored (this UNet applies no dropout)", path.display(), cfg.dropout);
        }
        let unknown = cfg.unknown_fields();
        if !unknown.is_empty() {
            eprintln!(
                "warning: {}: fields not known to this UNet implementation were ignored: {}",
                path.display(),
                unknown.join(", ")
            );
        }
        Ok(cfg)
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).context("not a valid UNet2DConditionModel config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Unknown fields holding something other than null/false (`_`-prefixed ones are metadata).
    pub fn unknown_fields(&self) -> Vec<String> {
        self.other
            .iter()
            .filter(|(k, v)| {
                !k.starts_with('_')
                    && !HARMLESS.contains(&k.as_str())
                    && !MUST_BE_DEFAULT.iter().any(|(f, _)| f == k)
                    && !matches!(v, Value::Null | Value::Bool(false))
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    /// Errors on every value this implementation cannot honour, naming the field and value.
    pub fn validate(&self) -> Result<()> {
        for (field, default) in MUST_BE_DEFAULT {
            if let Some(v) = self.other.get(*field) {
                let want: Value = serde_json::from_str(default).unwrap();
                if *v != want && !(want.is_number() && v.as_f64() == want.as_f64()) {
                    bail!("unet config: {field} = {v} is not supported (only {default})");
                }
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("unet config: block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "unet config: {} block_out_channels, {} down_block_types and {} up_block_types must agree",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in &self.down_block_types {
            if ![CROSS_DOWN, PLAIN_DOWN].contains(&block_type(t)) {
                bail!("unet config: down_block_types entry \"{t}\" is not supported (only {CROSS_DOWN}, {PLAIN_DOWN})");
            }
        }
        for t in &self.up_block_types {
            if ![CROSS_UP, PLAIN_UP].contains(&block_type(t)) {
                bail!("unet config: up_block_types entry \"{t}\" is not supported (only {CROSS_UP}, {PLAIN_UP})");
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != CROSS_MID {
                bail!("unet config: mid_block_type \"{m}\" is not supported (only {CROSS_MID} or null)");
            }
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            bail!("unet config: act_fn \"{}\" is not supported (only \"silu\")", self.act_fn);
        }
        if self.norm_num_groups.is_none() {
            bail!("unet config: norm_num_groups = null is not supported");
        }
        if self.only_cross_attention.expand(n, "only_cross_attention")?.iter().any(|b| *b) {
            bail!("unet config: only_cross_attention = {:?} is not supported (only false)", self.only_cross_attention);
        }
        let r = self.resolved()?;
        if r.heads.contains(&0) || r.layers.contains(&0) {
            bail!("unet config: attention heads {:?} and layers_per_block {:?} must be positive", r.heads, r.layers);
        }
        Ok(())
    }

    /// Per-block values, with diffusers' rule for heads: `num_attention_heads` when given,
    /// else `attention_head_dim`.
    pub fn resolved(&self) -> Result<Resolved> {
        let n = self.block_out_channels.len();
        let heads = match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => h.expand(n, "num_attention_heads")?,
            (None, Some(h)) => h.expand(n, "attention_head_dim")?,
            (None, None) => bail!("unet config: attention_head_dim and num_attention_heads are both null"),
        };
        Ok(Resolved {
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            transformer_layers: self.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?,
            heads,
        })
    }

    /// The query-grid side of the cross-attention maps the calibration losses read by default,
    /// for latents of side `latent_side`: the deepest down/up-block level with cross-attention
    /// whose maps are at least 8x8 (the mid block is not counted), else the level with cross-
    /// attention and the most queries. SD at 512 px (latent 64; cross-attention at 64, 32, 16)
    /// gives the paper's 16; the toy model (latent 16; at 16 and 8) gives 8, where its class
    /// words localise their objects and at 16 they barely do (docs/method.md §6). `None` when
    /// no down block has cross-attention.
    pub fn calibration_resolution(&self, latent_side: usize) -> Option<usize> {
        let sides: Vec<usize> = (0..self.down_block_types.len())
            .filter(|&i| self.down_block_types[i].contains("CrossAttn"))
            .map(|i| (0..i).fold(latent_side, |s, _| s.div_ceil(2)))
            .collect();
        sides.iter().copied().filter(|&s| s >= 8).min().or_else(|| sides.iter().copied().max())
    }

    /// Width of the time embedding MLP (`time_embedding_dim` or 4 x block_out_channels[0]).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }
}

/// Per-block (down-block order) settings.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub layers: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub heads: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(down: &[&str]) -> UNetConfig {
        let ups: Vec<String> = down.iter().rev().map(|d| d.replace("Down", "Up")).collect();
        let json = serde_json::json!({
            "block_out_channels": vec![32; down.len()], "down_block_types": down, "up_block_types": ups,
            "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8,
        });
        UNetConfig::from_json_str(&json.to_string()).unwrap()
    }

    /// SD1.5/2.x at 512 (latent 64): 16, the paper's maps; at 768 (latent 96): 24; the toy
    /// model's layout (latent 16): 8; a latent too small for 8x8 maps: the largest there is; no
    /// cross-attention down block: none.
    #[test]
    fn calibration_resolution_rule() {
        let sd = config(&["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]);
        assert_eq!(sd.calibration_resolution(64), Some(16));
        assert_eq!(sd.calibration_resolution(96), Some(24));
        assert_eq!(sd.calibration_resolution(32), Some(8));
        assert_eq!(sd.calibration_resolution(8), Some(8));
        let toy = config(&["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]);
        assert_eq!(toy.calibration_resolution(16), Some(8));
        assert_eq!(toy.calibration_resolution(6), Some(6));
        let none = config(&["DownBlock2D", "DownBlock2D"]);
        assert_eq!(none.calibration_resolution(64), None);
    }
}
