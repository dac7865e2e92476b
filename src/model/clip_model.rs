//! A whole transformers `CLIPModel` folder (both towers and their projections), for the CLIP
//! metrics: `config.json` (`text_config`, `vision_config`, `projection_dim`),
//! `model.safetensors` (`text_model.*`, `vision_model.*`, `text_projection.weight`,
//! `visual_projection.weight`, `logit_scale`: the layout of `openai/clip-vit-base-patch32` and of
//! transformers 5's `CLIPModel.save_pretrained`), the tokenizer files (`vocab.json` +
//! `merges.txt` or `tokenizer.json`) and `preprocessor_config.json`.
//!
//! Features are transformers' `get_text_features` / `get_image_features`: the projection of the
//! text tower's hidden state at the end-of-text token, and of the vision tower's pooled class
//! token. Text longer than the tokenizer's 77 tokens is truncated as transformers does with
//! `truncation=True` (start, the first 75 tokens, end).

use super::clip::{ClipTextConfig, ClipTextModel};
use super::clip_preprocess::ClipImageProcessor;
use super::clip_vision::{ClipVisionConfig, ClipVisionModel};
use super::nn::Linear;
use super::tokenizer::ClipTokenizer;
use super::weights::{component_weight_files, WeightStore};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use image::RgbImage;
use std::path::Path;
use std::sync::Arc;

/// Which position of the text the pooled output is read at (transformers' rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPooling {
    /// The first position holding this id (`text_config.eos_token_id`).
    FirstId(u32),
    /// The position of the largest id: configs from before transformers PR #24773 say
    /// `eos_token_id: 2`, and the end token is then found as the highest id.
    ArgMax,
}

impl TextPooling {
    /// The pooled position of each row of ids (the first one wins ties, as torch's argmax).
    pub fn positions(&self, ids: &[Vec<u32>]) -> Result<Vec<usize>> {
        ids.iter()
            .enumerate()
            .map(|(row, r)| match *self {
                TextPooling::FirstId(eos) => r
                    .iter()
                    .position(|&i| i == eos)
                    .with_context(|| format!("text {row} has no end-of-text token (id {eos})")),
                TextPooling::ArgMax => {
                    let max = r.iter().copied().max().with_context(|| format!("text {row} is empty"))?;
                    Ok(r.iter().position(|&i| i == max).unwrap_or(0))
                }
            })
            .collect()
    }
}

pub struct ClipModel {
    pub text: ClipTextModel,
    pub vision: ClipVisionModel,
    text_projection: Linear,
    visual_projection: Linear,
    pub tokenizer: ClipTokenizer,
    pub processor: ClipImageProcessor,
    pub pooling: TextPooling,
    /// `projection_dim`: the width of the joint embedding space.
    pub projection_dim: usize,
    device: Device,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

impl ClipModel {
    /// Loads a transformers CLIP folder (float32 on `device`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("CLIP model folder {} does not exist", dir.display());
        }
        let cfg_path = dir.join("config.json");
        let cfg = read_json(&cfg_path)?;
        let what = cfg_path.display().to_string();
        let text_cfg_json = cfg.get("text_config").with_context(|| format!("{what}: no \"text_config\" (not a CLIPModel config)"))?;
        let vision_json = cfg.get("vision_config").with_context(|| format!("{what}: no \"vision_config\" (not a CLIPModel config)"))?;
        let projection_dim = cfg
            .get("projection_dim")
            .and_then(|v| v.as_u64())
            .with_context(|| format!("{what}: no numeric \"projection_dim\""))? as usize;
        let text_cfg = ClipTextConfig::from_file(&cfg_path)?;
        let vision_cfg = ClipVisionConfig::from_value(vision_json, &format!("{what} vision_config"))?;
        // transformers' CLIPTextConfig default end-of-text id is 49407.
        let eos = text_cfg_json.get("eos_token_id").map_or(Some(49407), |v| v.as_u64());
        let pooling = match eos {
            Some(2) => TextPooling::ArgMax,
            Some(id) => TextPooling::FirstId(id as u32),
            None => bail!("{what}: text_config.eos_token_id must be a number"),
        };

        let files = component_weight_files(dir, "model", None)?;
        let store = Arc::new(WeightStore::open(&files, DType::F32, device)?);
        let root = store.root();
        for prefix in ["text_model", "vision_model"] {
            if !store.tensor_shapes().any(|(k, _)| k.starts_with(&format!("{prefix}."))) {
                bail!("{} has no {prefix}.* weights: not a transformers CLIPModel file", store.file_names());
            }
        }
        let text = ClipTextModel::new(root.pp("text_model"), &text_cfg)?;
        let vision = ClipVisionModel::new(root.pp("vision_model"), &vision_cfg)?;
        let text_projection = Linear::new(root.pp("text_projection"), text_cfg.hidden_size, projection_dim, false)?;
        let visual_projection = Linear::new(root.pp("visual_projection"), vision_cfg.hidden_size, projection_dim, false)?;
        if store.contains("logit_scale") {
            // The contrastive temperature: not part of the metrics, but part of the file.
            let shape = store.shape_of("logit_scale").unwrap_or(&[]).to_vec();
            root.get(shape, "logit_scale")?;
        }
        store.finish()?;

        let tokenizer = ClipTokenizer::from_dir(dir)?;
        if tokenizer.vocab_size() > text_cfg.vocab_size {
            bail!(
                "{}: the tokenizer has {} tokens but the text tower {} embeddings: they do not match",
                dir.display(),
                tokenizer.vocab_size(),
                text_cfg.vocab_size
            );
        }
        let processor = ClipImageProcessor::from_file(&dir.join("preprocessor_config.json"))?;
        if let Some((h, w)) = processor.crop {
            if (h, w) != (vision_cfg.image_size, vision_cfg.image_size) {
                bail!(
                    "{}: preprocessor crop_size {w}x{h} does not match the vision tower's image_size {}",
                    dir.display(),
                    vision_cfg.image_size
                );
            }
        }
        Ok(Self { text, vision, text_projection, visual_projection, tokenizer, processor, pooling, projection_dim, device: device.clone() })
    }

    /// The 77 token ids of each text (truncated as transformers' `truncation=True`).
    pub fn encode_texts(&self, texts: &[&str]) -> Vec<Vec<u32>> {
        texts.iter().map(|t| self.tokenizer.encode(t).ids).collect()
    }

    /// `get_text_features` for token ids: [B, projection_dim] (not normalised).
    pub fn text_features_ids(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        if ids.is_empty() {
            bail!("no texts to embed");
        }
        let t = ids[0].len();
        if ids.iter().any(|r| r.len() != t) {
            bail!("token id rows of different lengths");
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let hidden = self.text.forward(&Tensor::from_vec(flat, (ids.len(), t), &self.device)?)?;
        let pos = self.pooling.positions(ids)?;
        let pooled = pos
            .iter()
            .enumerate()
            .map(|(b, &p)| hidden.get(b)?.get(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(self.text_projection.forward(&Tensor::stack(&pooled, 0)?)?)
    }

    /// `get_text_features` of texts: [B, projection_dim].
    pub fn text_features(&self, texts: &[&str]) -> Result<Tensor> {
        self.text_features_ids(&self.encode_texts(texts))
    }

    /// `get_image_features` of preprocessed `pixel_values` [B, 3, S, S]: [B, projection_dim].
    pub fn image_features_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.visual_projection.forward(&self.vision.forward(pixel_values)?)?)
    }

    /// `get_image_features` of RGB images, preprocessed as the folder says, in batches of 16.
    pub fn image_features(&self, images: &[RgbImage]) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in images.chunks(16) {
            let pix = self.processor.preprocess_batch(chunk, &self.device)?;
            out.push(self.image_features_pixels(&pix)?);
        }
        if out.is_empty() {
            bail!("no images to embed");
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_reads_the_first_end_token_or_the_largest_id() {
        let ids = vec![vec![5, 9, 7, 7, 7], vec![5, 7, 9, 7, 7]];
        assert_eq!(TextPooling::FirstId(7).positions(&ids).unwrap(), vec![2, 1]);
        assert_eq!(TextPooling::ArgMax.positions(&ids).unwrap(), vec![1, 2]);
        assert!(TextPooling::FirstId(8).positions(&ids).is_err());
    }
}
