//! Which Stable Diffusion a single-file checkpoint is, from its key names and shapes only.
//!
//! The rules are those of diffusers' `infer_diffusers_model_type` (A1111 and ComfyUI look at
//! the same keys):
//! - the text encoder's layout: `cond_stage_model.transformer.*` (OpenAI CLIP) is SD1.x,
//!   `cond_stage_model.model.*` (OpenCLIP ViT-H) is SD2.x; SDXL's `conditioner.*` is refused;
//! - the UNet's first convolution `model.diffusion_model.input_blocks.0.0.weight` has 9 input
//!   channels in the inpainting variants (4 latents + 4 masked-image latents + 1 mask), else 4;
//! - the prediction type cannot be read from shapes (SD2 512 and 768 share them). As diffusers
//!   decides: SD1.x and the SD2 inpainting model predict epsilon; an SD2.x file predicts
//!   v (the 768 model) unless its `global_step` is 875000, the SD 2.0/2.1 512 base checkpoint;
//!   a `v_pred` key (ComfyUI's marker) means v. `--prediction-type` overrides this.

use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// The UNet's first convolution, present in every CompVis SD checkpoint.
pub const CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";
/// The cross-attention key projection whose input width is the text encoder's (768 / 1024).
pub const CROSS_ATTN_K: &str = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H/14 text encoder.
    Sd2,
}

/// What [`detect`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    pub family: Family,
    /// UNet input channels (9: inpainting).
    pub in_channels: usize,
    pub inpainting: bool,
    /// Whether the detected prediction type is v-prediction (else epsilon).
    pub v_prediction: bool,
    /// Why, in words (printed on load).
    pub prediction_reason: String,
    /// Width of the text embeddings the UNet attends to.
    pub context_dim: Option<usize>,
    /// Whether the file holds EMA copies of the UNet weights (`model_ema.*`).
    pub has_ema: bool,
}

/// Detects the architecture of a checkpoint with tensors `shapes` and training step
/// `global_step` (from a `.ckpt`'s top level; `None` in a safetensors file).
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>, global_step: Option<i64>) -> Result<Detected> {
    let any = |p: &str| shapes.keys().any(|k| k.starts_with(p));
    if any("conditioner.embedders.") {
        bail!("an SDXL checkpoint (conditioner.embedders.* keys): only SD 1.x and 2.x single files are supported");
    }
    let Some(conv_in) = shapes.get(CONV_IN) else {
        bail!("not a CompVis Stable Diffusion checkpoint: no {CONV_IN} (a diffusers folder, a LoRA or another model?)");
    };
    if conv_in.len() != 4 {
        bail!("{CONV_IN} has shape {conv_in:?}; a 4-D convolution weight is expected");
    }
    let in_channels = conv_in[1];
    let family = if any("cond_stage_model.model.") {
        Family::Sd2
    } else if any("cond_stage_model.transformer.") {
        Family::Sd1
    } else {
        bail!("no text encoder in the checkpoint (neither cond_stage_model.transformer.* of SD1 nor cond_stage_model.model.* of SD2)");
    };
    let inpainting = in_channels == 9;
    if !matches!(in_channels, 4 | 9) {
        bail!("{CONV_IN} has {in_channels} input channels; 4 (text-to-image) or 9 (inpainting) are supported");
    }
    let context_dim = shapes.get(CROSS_ATTN_K).and_then(|s| s.last().copied());
    let (v_prediction, prediction_reason) = if shapes.contains_key("v_pred") {
        (true, "the file has a v_pred key".to_string())
    } else {
        match family {
            Family::Sd1 => (false, "SD 1.x predicts epsilon".to_string()),
            Family::Sd2 if inpainting => (false, "the SD 2.x inpainting model predicts epsilon".to_string()),
            Family::Sd2 if global_step == Some(875000) => {
                (false, "global_step 875000 is the SD 2.x 512 base checkpoint, which predicts epsilon".to_string())
            }
            Family::Sd2 => (
                true,
                format!(
                    "an SD 2.x checkpoint whose global_step ({}) is not the 512 base's 875000 is taken as the 768 v-prediction model, as diffusers does",
                    global_step.map_or("absent".to_string(), |s| s.to_string())
                ),
            ),
        }
    };
    Ok(Detected { family, in_channels, inpainting, v_prediction, prediction_reason, context_dim, has_ema: any("model_ema.") })
}
