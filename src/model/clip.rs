//! The CLIP text encoder of Stable Diffusion (transformers' `CLIPTextModel`).
//!
//! Pre-LayerNorm transformer with a causal mask; the output is the last hidden state after
//! `final_layer_norm`, which the UNet reads as its cross-attention context. SD1.x uses
//! `quick_gelu` (ViT-L/14), SD2.x `gelu` (OpenCLIP ViT-H in CLIP layout); both come from
//! `text_encoder/config.json`.
//!
//! For personalization the token table can be extended with new rows ([`ClipTextModel::
//! set_extra_embeddings`]): frozen vocabulary rows stay plain tensors, the new modifier rows can
//! be trainable variables, and [`ClipTextModel::embed`] / [`ClipTextModel::encode_embeddings`]
//! split the forward pass so a trainer can mask gradients between them.
//!
//! [`ClipTextModel::make_trainable`] turns every weight (the vocabulary table included) into a
//! trainable variable, for fine-tuning the whole text encoder (DreamBooth's
//! `--train-text-encoder`).

use super::nn::{LayerNorm, Linear};
use super::ops;
use super::weights::Vb;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_max_pos() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses and validates a config from JSON text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{origin} is not valid JSON"))?;
        // Some configs nest the text part (full CLIPModel configs): accept both.
        let v = if v.get("text_config").is_some() && v.get("hidden_size").is_none() { v["text_config"].clone() } else { v };
        let cfg: Self = serde_json::from_value(v).with_context(|| format!("{origin}: not a CLIP text config"))?;
        if !matches!(cfg.hidden_act.as_str(), "quick_gelu" | "gelu") {
            bail!("{origin}: hidden_act {:?} is not supported (quick_gelu or gelu)", cfg.hidden_act);
        }
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!("{origin}: hidden_size {} is not divisible by num_attention_heads {}", cfg.hidden_size, cfg.num_attention_heads);
        }
        Ok(cfg)
    }

    /// Parameters of a text model of this config, counted from its shapes the way transformers
    /// builds `CLIPTextModel` (token and position tables, per layer q/k/v/out projections with
    /// biases, two layer norms and the MLP, the final layer norm; SD1.5's gives 123,060,480):
    /// what `--train-text-encoder` trains.
    pub fn parameters(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let layer = 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h);
        (self.vocab_size as u64 + self.max_position_embeddings as u64) * h + self.num_hidden_layers as u64 * layer + 2 * h
    }
}

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

/// The shape of one pre-LayerNorm transformer layer: the text and vision towers share it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub quick_gelu: bool,
    pub layer_norm_eps: f64,
}

impl From<&ClipTextConfig> for LayerShape {
    fn from(cfg: &ClipTextConfig) -> Self {
        Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            quick_gelu: cfg.hidden_act == "quick_gelu",
            layer_norm_eps: cfg.layer_norm_eps,
        }
    }
}

impl ClipAttention {
    fn new(vb: Vb, shape: &LayerShape) -> Result<Self> {
        let d = shape.hidden_size;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), d, d, true)?,
            heads: shape.heads,
        })
    }

    /// Self-attention; `causal_mask` (added to the scores) for the text tower, none for vision.
    fn forward(&self, x: &Tensor, causal_mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |y: Tensor| y.reshape((b, t, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split((self.q_proj.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match causal_mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&y)
    }
}

/// One encoder layer (`encoder.layers.N`), shared with the vision tower.
pub(crate) struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    quick_gelu: bool,
}

impl ClipEncoderLayer {
    pub(crate) fn new(vb: Vb, shape: &LayerShape) -> Result<Self> {
        let (d, m) = (shape.hidden_size, shape.intermediate_size);
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), shape)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d, shape.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp").pp("fc1"), d, m, true)?,
            fc2: Linear::new(vb.pp("mlp").pp("fc2"), m, d, true)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d, shape.layer_norm_eps)?,
            quick_gelu: shape.quick_gelu,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, causal_mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(x)?, causal_mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick_gelu { ops::quick_gelu(&h)? } else { h.gelu_erf()? };
        x + self.fc2.forward(&h)?
    }
}

pub struct ClipTextModel {
    token_embedding: Tensor,
    /// Rows appended after the vocabulary (new modifier tokens), possibly trainable.
    extra_embeddings: Option<Tensor>,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads the weights of a transformers `CLIPTextModel` file: `text_model.*` keys (as SD
    /// folders ship them) or the same keys without that prefix (as transformers 5 saves them).
    pub fn new(vb: Vb, cfg: &ClipTextConfig) -> Result<Self> {
        let vb = if vb.contains("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let emb = vb.pp("embeddings");
        let token_embedding = emb.pp("token_embedding").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let position_embedding =
            emb.pp("position_embedding").get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        // Files written by older transformers versions carry the position-id buffer: accept it.
        if emb.contains("position_ids") {
            emb.get((1, cfg.max_position_embeddings), "position_ids")?;
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), &LayerShape::from(cfg)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(vb.pp("final_layer_norm"), cfg.hidden_size, cfg.layer_norm_eps)?;
        Ok(Self { token_embedding, extra_embeddings: None, position_embedding, layers, final_layer_norm, config: cfg.clone() })
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The vocabulary's embedding row of a token id (e.g. to initialise a new token).
    pub fn token_embedding_row(&self, id: u32) -> candle_core::Result<Tensor> {
        self.token_embedding.get(id as usize)
    }

    /// The frozen vocabulary table [vocab, hidden].
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// Rows for ids `vocab_size..vocab_size+n` (new tokens), [n, hidden].
    pub fn set_extra_embeddings(&mut self, rows: Option<Tensor>) -> Result<()> {
        if let Some(r) = &rows {
            let (_, d) = r.dims2()?;
            if d != self.config.hidden_size {
                bail!("new token embeddings have width {d}, the text encoder {}", self.config.hidden_size);
            }
        }
        self.extra_embeddings = rows;
        Ok(())
    }

    pub fn extra_embeddings(&self) -> Option<&Tensor> {
        self.extra_embeddings.as_ref()
    }

    /// Every weight by its transformers name without the `text_model.` prefix
    /// (`embeddings.token_embedding.weight`, `encoder.layers.0.self_attn.q_proj.weight`, ...).
    fn weights_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v: Vec<(String, &mut Tensor)> = vec![
            ("embeddings.token_embedding.weight".into(), &mut self.token_embedding),
            ("embeddings.position_embedding.weight".into(), &mut self.position_embedding),
        ];
        fn linear<'a>(v: &mut Vec<(String, &'a mut Tensor)>, name: String, l: &'a mut Linear) {
            v.push((format!("{name}.weight"), &mut l.weight));
            if let Some(b) = l.bias.as_mut() {
                v.push((format!("{name}.bias"), b));
            }
        }
        fn norm<'a>(v: &mut Vec<(String, &'a mut Tensor)>, name: String, n: &'a mut LayerNorm) {
            v.push((format!("{name}.weight"), &mut n.weight));
            v.push((format!("{name}.bias"), &mut n.bias));
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layers.{i}");
            let a = &mut layer.self_attn;
            linear(&mut v, format!("{p}.self_attn.q_proj"), &mut a.q_proj);
            linear(&mut v, format!("{p}.self_attn.k_proj"), &mut a.k_proj);
            linear(&mut v, format!("{p}.self_attn.v_proj"), &mut a.v_proj);
            linear(&mut v, format!("{p}.self_attn.out_proj"), &mut a.out_proj);
            norm(&mut v, format!("{p}.layer_norm1"), &mut layer.layer_norm1);
            linear(&mut v, format!("{p}.mlp.fc1"), &mut layer.fc1);
            linear(&mut v, format!("{p}.mlp.fc2"), &mut layer.fc2);
            norm(&mut v, format!("{p}.layer_norm2"), &mut layer.layer_norm2);
        }
        norm(&mut v, "final_layer_norm".into(), &mut self.final_layer_norm);
        v
    }

    /// Makes every weight a trainable f32 variable (the vocabulary table included; the extra
    /// new-token rows are the caller's own variable) and returns them by their transformers
    /// name without the `text_model.` prefix, sorted by name.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        for (name, t) in self.weights_mut() {
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?).with_context(|| format!("text encoder weight {name}"))?;
            *t = var.as_tensor().clone();
            vars.push((name, var));
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }

    /// Token + position embeddings of `ids` [B, T] -> [B, T, hidden].
    ///
    /// Ids past the vocabulary read the extra (new-token) rows. The two tables are indexed
    /// separately rather than concatenated: a concatenation would make autograd build a
    /// table-sized gradient for the frozen vocabulary (150 MB a step for SD1.5).
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.config.hidden_size;
        let vocab = self.token_embedding.dim(0)?;
        let n_extra = self.extra_embeddings.as_ref().map_or(Ok(0), |e| e.dim(0))?;
        let flat: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if let Some(&bad) = flat.iter().find(|&&id| id as usize >= vocab + n_extra) {
            candle_core::bail!("token id {bad} is outside the text encoder's table of {} rows", vocab + n_extra);
        }
        let dev = ids.device();
        let base_ids: Vec<u32> = flat.iter().map(|&id| if (id as usize) < vocab { id } else { 0 }).collect();
        let mut tok = self.token_embedding.index_select(&Tensor::new(base_ids, dev)?, 0)?;
        if let Some(extra) = &self.extra_embeddings {
            let is_new: Vec<f32> = flat.iter().map(|&id| if (id as usize) >= vocab { 1.0 } else { 0.0 }).collect();
            if is_new.iter().any(|&v| v > 0.0) {
                let new_ids: Vec<u32> = flat.iter().map(|&id| (id as usize).saturating_sub(vocab) as u32).collect();
                let new = extra.to_dtype(tok.dtype())?.index_select(&Tensor::new(new_ids, dev)?, 0)?;
                let m = Tensor::from_vec(is_new, (flat.len(), 1), dev)?.to_dtype(tok.dtype())?;
                tok = (tok.broadcast_mul(&(1.0 - &m)?)? + new.broadcast_mul(&m)?)?;
            }
        }
        let tok = tok.reshape((b, t, d))?;
        let pos = self.position_embedding.narrow(0, 0, t)?.unsqueeze(0)?;
        tok.broadcast_add(&pos)
    }

    /// The transformer on top of [`embed`](Self::embed): last hidden state after the final norm.
    pub fn encode_embeddings(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let mask = causal_mask(t, x.dtype(), x.device())?;
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// `last_hidden_state` for token ids [B, T].
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.encode_embeddings(&self.embed(ids)?)
    }
}

fn causal_mask(t: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?.unsqueeze(0)?.unsqueeze(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_is_transformers() {
        // openai/clip-vit-large-patch14's text config (SD1.x):
        // sum(p.numel() for p in CLIPTextModel.parameters()) = 123,060,480
        let sd15 = ClipTextConfig::from_json(
            r#"{"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "max_position_embeddings": 77}"#,
            "sd15",
        )
        .unwrap();
        assert_eq!(sd15.parameters(), 123_060_480);
        // sd1-tiny: the elements of its file's weights (1,600,672, as torch counts them).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1-tiny/text_encoder");
        let cfg = ClipTextConfig::from_file(&root.join("config.json")).unwrap();
        let file = candle_core::safetensors::load(root.join("model.safetensors"), &Device::Cpu).unwrap();
        let n: usize = file.iter().filter(|(k, _)| !k.ends_with("position_ids")).map(|(_, t)| t.elem_count()).sum();
        assert_eq!((cfg.parameters(), n), (1_600_672, 1_600_672));
    }
}
