//! The diffusers configs of a real-size SD single file, built in memory from what [`detect`]
//! found, so `--model FILE` needs no `--config DIR` for the five base models.
//!
//! The values are those diffusers' single-file loader uses for each kind (its
//! `create_unet_diffusers_config_from_ldm` / `create_vae_diffusers_config_from_ldm` on the original
//! LDM inference configs, its legacy scheduler config, and the Hub configs of
//! stable-diffusion-v1-5, -inpainting, stabilityai/stable-diffusion-2-1-base, -2-1 and
//! -2-inpainting for the image size, `upcast_attention` and the text encoders).
//! tests/single_file.rs compares each kind field by field with golden/single-base-configs.json,
//! written by tools/reference/make_single_file_fixtures.py from diffusers itself.
//!
//! [`detect`]: super::detect

use super::detect::{Detected, Family};
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// The in-memory config files of one base model.
#[derive(Clone, Debug)]
pub struct BaseConfigs {
    /// `sd1`, `sd1-inpainting`, `sd2-512`, `sd2-768` or `sd2-inpainting`.
    pub kind: &'static str,
    /// `unet/config.json`.
    pub unet: Value,
    /// `vae/config.json`.
    pub vae: Value,
    /// `text_encoder/config.json`.
    pub text_encoder: Value,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: Value,
}

impl BaseConfigs {
    /// The config of `component` (`unet`, `vae`, `text_encoder`, `scheduler`).
    pub fn get(&self, component: &str) -> Result<&Value> {
        Ok(match component {
            "unet" => &self.unet,
            "vae" => &self.vae,
            "text_encoder" => &self.text_encoder,
            "scheduler" => &self.scheduler,
            _ => bail!("no built-in config for component {component:?}"),
        })
    }
}

/// The configs of the base model `d` describes; a text-embedding width other than the
/// family's (768 for SD1, 1024 for SD2) is not a base model, so --config is asked for.
pub fn base_configs(d: &Detected) -> Result<BaseConfigs> {
    let sd2 = d.family == Family::Sd2;
    let context = if sd2 { 1024 } else { 768 };
    if d.context_dim.is_some_and(|c| c != context) {
        bail!(
            "the UNet attends to {}-wide text embeddings, not the {context} of a base {:?} model: pass --config DIR",
            d.context_dim.unwrap_or_default(),
            d.family
        );
    }
    let kind = match (sd2, d.inpainting, d.v_prediction) {
        (false, false, _) => "sd1",
        (false, true, _) => "sd1-inpainting",
        (true, true, _) => "sd2-inpainting",
        (true, false, false) => "sd2-512",
        (true, false, true) => "sd2-768",
    };
    // The 768 model is trained at 768x768 (latents 96); the others at 512 (latents 64).
    let image_size = if kind == "sd2-768" { 768 } else { 512 };
    let mut unet = json!({
        "sample_size": image_size / 8,
        "in_channels": d.in_channels,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": context,
        "transformer_layers_per_block": 1,
    });
    if sd2 {
        // 64-channel heads: 320/64 .. 1280/64 heads per level, linear in/out projections.
        unet["attention_head_dim"] = json!([5, 10, 20, 20]);
        unet["use_linear_projection"] = json!(true);
    } else {
        unet["attention_head_dim"] = json!(8);
        unet["use_linear_projection"] = json!(false);
    }
    if kind == "sd2-768" {
        unet["upcast_attention"] = json!(true);
    }
    let vae = json!({
        "sample_size": image_size,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "block_out_channels": [128, 256, 512, 512],
        "latent_channels": 4,
        "layers_per_block": 2,
        "scaling_factor": 0.18215,
    });
    let text_encoder = if sd2 {
        // OpenCLIP ViT-H/14's text tower; SD2 reads the penultimate layer, so 23 of its 24.
        json!({"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
               "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5})
    } else {
        // OpenAI CLIP ViT-L/14's text tower.
        json!({"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5})
    };
    let scheduler = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": if d.v_prediction { "v_prediction" } else { "epsilon" },
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "clip_sample": false,
        "clip_sample_range": 1.0,
        "rescale_betas_zero_snr": false,
    });
    Ok(BaseConfigs { kind, unet, vae, text_encoder, scheduler })
}
