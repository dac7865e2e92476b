//! The CLIP vision tower (transformers' `CLIPVisionTransformer`), for the CLIP metrics.
//!
//! ViT (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
//! Supervision"): a stride-`patch_size` convolution without bias cuts the image into patch
//! embeddings, a learnt class token is put in front, position embeddings are added, then
//! `pre_layrnorm` (transformers' spelling), the pre-LayerNorm encoder layers of the text tower
//! (without a mask; `quick_gelu` or `gelu` per config), and `post_layernorm` of the class
//! token: the pooled output that `visual_projection` maps into the joint space.

use super::clip::{ClipEncoderLayer, LayerShape};
use super::nn::{Conv2d, LayerNorm};
use super::weights::Vb;
use anyhow::{bail, Context, Result};
use candle_core::{Module, Tensor};
use serde::Deserialize;

/// `vision_config` of a CLIP `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    pub hidden_size: usize,
    /// Width of each layer's MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    /// Side of a square patch (the convolution's kernel and stride).
    pub patch_size: usize,
    /// Input channels (3).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_channels() -> usize {
    3
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipVisionConfig {
    /// From the `vision_config` object of a CLIP `config.json` (`what` names it in errors).
    pub fn from_value(v: &serde_json::Value, what: &str) -> Result<Self> {
        let cfg: Self =
            serde_json::from_value(v.clone()).with_context(|| format!("{what}: not a CLIP vision config"))?;
        if !matches!(cfg.hidden_act.as_str(), "quick_gelu" | "gelu") {
            bail!("{what}: hidden_act {:?} is not supported (quick_gelu or gelu)", cfg.hidden_act);
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!("{what}: hidden_size {} is not divisible by num_attention_heads {}", cfg.hidden_size, cfg.num_attention_heads);
        }
        if cfg.patch_size == 0 || cfg.image_size < cfg.patch_size {
            bail!("{what}: patch_size {} does not fit image_size {}", cfg.patch_size, cfg.image_size);
        }
        Ok(cfg)
    }

    /// Class token + one token per patch.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    fn layer_shape(&self) -> LayerShape {
        LayerShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.num_attention_heads,
            quick_gelu: self.hidden_act == "quick_gelu",
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

pub struct ClipVisionModel {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    pub config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Loads `vision_model.*` weights (`vb` at the `vision_model` prefix).
    pub fn new(vb: Vb, cfg: &ClipVisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let weight = emb.pp("patch_embedding").get((d, cfg.num_channels, cfg.patch_size, cfg.patch_size), "weight")?;
        let patch_embedding = Conv2d { weight, bias: None, stride: cfg.patch_size, padding: 0 };
        let class_embedding = emb.get(d, "class_embedding")?;
        let position_embedding = emb.pp("position_embedding").get((cfg.num_positions(), d), "weight")?;
        // Files written by older transformers versions carry the position-id buffer: accept it.
        if emb.contains("position_ids") {
            emb.get((1, cfg.num_positions()), "position_ids")?;
        }
        let shape = cfg.layer_shape();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), &shape))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    /// `pooler_output`: the class token after `post_layernorm`, [B, hidden], for
    /// `pixel_values` [B, C, image_size, image_size].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let s = self.config.image_size;
        if (c, h, w) != (self.config.num_channels, s, s) {
            bail!("pixel values of shape {:?}: the vision tower takes [B, {}, {s}, {s}]", pixel_values.dims(), self.config.num_channels);
        }
        let dtype = self.patch_embedding.weight.dtype();
        let x = self.patch_embedding.forward(&pixel_values.to_dtype(dtype)?)?; // [B, D, g, g]
        let d = self.config.hidden_size;
        let patches = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // [B, g*g, D]
        let class = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?.to_dtype(patches.dtype())?;
        let x = Tensor::cat(&[&class, &patches], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.post_layernorm.forward(&cls)?)
    }
}
