//! CompVis text-encoder names -> the `CLIPTextModel` names of a diffusers `text_encoder/`.
//!
//! SD1 files hold transformers' own CLIP under `cond_stage_model.transformer.` (with or
//! without the `text_model.` level, depending on the transformers version that wrote them);
//! SD2 files hold OpenCLIP's under `cond_stage_model.model.`, whose attention keeps q, k and v
//! in one fused `in_proj_weight` `[3d, d]` that is split into thirds here. SD2 uses the
//! penultimate layer's output, so diffusers' SD2 text encoder has one layer fewer than the
//! OpenCLIP one (23 of 24): layers at or beyond the config's `num_hidden_layers` are not
//! loaded. Facts source: diffusers' `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`.
//! [`reverse_clip`] and [`reverse_open_clip`] are the inverses (diffusers'
//! scripts/convert_diffusers_to_original_stable_diffusion.py), used to write a diffusers text
//! encoder as a single file.

/// Which third of a fused in-projection a diffusers weight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Third {
    Q = 0,
    K = 1,
    V = 2,
}

/// What a CompVis text-encoder key becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum TextKey {
    /// One diffusers tensor with the same values.
    Plain(String),
    /// A fused in-projection: three diffusers tensors, each a third along dim 0.
    Fused([(String, Third); 3]),
    /// A tensor diffusers does not load (position ids, projection, logit scale, layers past
    /// the last one used).
    Skip,
}

/// Maps an SD1 key (without `cond_stage_model.transformer.`).
pub fn map_clip(key: &str) -> Option<TextKey> {
    let key = key.strip_prefix("text_model.").unwrap_or(key);
    if key == "embeddings.position_ids" {
        return Some(TextKey::Skip);
    }
    let known = ["embeddings.token_embedding.", "embeddings.position_embedding.", "encoder.layers.", "final_layer_norm."];
    known.iter().any(|p| key.starts_with(p)).then(|| TextKey::Plain(format!("text_model.{key}")))
}

/// Maps an SD2 OpenCLIP key (without `cond_stage_model.model.`) for a text encoder of
/// `num_layers` layers.
pub fn map_open_clip(key: &str, num_layers: usize) -> Option<TextKey> {
    let plain = |s: &str| Some(TextKey::Plain(format!("text_model.{s}")));
    match key {
        "token_embedding.weight" => return plain("embeddings.token_embedding.weight"),
        "positional_embedding" => return plain("embeddings.position_embedding.weight"),
        "ln_final.weight" => return plain("final_layer_norm.weight"),
        "ln_final.bias" => return plain("final_layer_norm.bias"),
        "text_projection" | "logit_scale" | "attn_mask" => return Some(TextKey::Skip),
        _ => {}
    }
    let r = key.strip_prefix("transformer.resblocks.")?;
    let (i, r) = r.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let layer = format!("text_model.encoder.layers.{i}");
    let mapped = match r {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let p = if r.ends_with("weight") { "weight" } else { "bias" };
            let part = |m: &str, t| (format!("{layer}.self_attn.{m}.{p}"), t);
            TextKey::Fused([part("q_proj", Third::Q), part("k_proj", Third::K), part("v_proj", Third::V)])
        }
        _ => {
            let (module, p) = r.rsplit_once('.')?;
            if p != "weight" && p != "bias" {
                return None;
            }
            let to = match module {
                "attn.out_proj" => "self_attn.out_proj",
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "mlp.c_fc" => "mlp.fc1",
                "mlp.c_proj" => "mlp.fc2",
                _ => return None,
            };
            TextKey::Plain(format!("{layer}.{to}.{p}"))
        }
    };
    Some(if i >= num_layers { TextKey::Skip } else { mapped })
}

/// The CompVis key (without `cond_stage_model.transformer.`) of a diffusers CLIP text-encoder
/// name, with or without the `text_model.` level (transformers >= 5.6 writes it without);
/// the inverse of [`map_clip`]. `None`: no place in the SD1 layout.
pub fn reverse_clip(name: &str) -> Option<String> {
    let key = name.strip_prefix("text_model.").unwrap_or(name);
    let known = ["embeddings.token_embedding.", "embeddings.position_embedding.", "encoder.layers.", "final_layer_norm."];
    known.iter().any(|p| key.starts_with(p)).then(|| format!("text_model.{key}"))
}

/// Where a diffusers text-encoder tensor goes in the OpenCLIP layout.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenClipKey {
    /// The same values under this key (without `cond_stage_model.model.`).
    Plain(String),
    /// This third of the fused in-projection under this key.
    Fused(String, Third),
}

/// The OpenCLIP key (without `cond_stage_model.model.`) of a diffusers CLIP text-encoder name
/// (with or without `text_model.`); the inverse of [`map_open_clip`]. `None`: no place in it.
pub fn reverse_open_clip(name: &str) -> Option<OpenClipKey> {
    let key = name.strip_prefix("text_model.").unwrap_or(name);
    let plain = |s: &str| Some(OpenClipKey::Plain(s.to_string()));
    match key {
        "embeddings.token_embedding.weight" => return plain("token_embedding.weight"),
        "embeddings.position_embedding.weight" => return plain("positional_embedding"),
        "final_layer_norm.weight" => return plain("ln_final.weight"),
        "final_layer_norm.bias" => return plain("ln_final.bias"),
        _ => {}
    }
    let r = key.strip_prefix("encoder.layers.")?;
    let (i, r) = r.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (module, p) = r.rsplit_once('.')?;
    if p != "weight" && p != "bias" {
        return None;
    }
    let layer = format!("transformer.resblocks.{i}");
    let third = match module {
        "self_attn.q_proj" => Some(Third::Q),
        "self_attn.k_proj" => Some(Third::K),
        "self_attn.v_proj" => Some(Third::V),
        _ => None,
    };
    if let Some(t) = third {
        return Some(OpenClipKey::Fused(format!("{layer}.attn.in_proj_{p}"), t));
    }
    let to = match module {
        "self_attn.out_proj" => "attn.out_proj",
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    Some(OpenClipKey::Plain(format!("{layer}.{to}.{p}")))
}
