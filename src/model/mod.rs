//! Stable Diffusion model code, and the CLIP model (both towers) of the CLIP metrics. Module
//! paths mirror diffusers/transformers weight names, so the safetensors files load without
//! renaming.

pub mod attention_chunks;
pub mod attention_recompute;
pub mod checkpoint;
pub mod clip;
pub mod clip_model;
pub mod clip_preprocess;
pub mod clip_vision;
pub mod nn;
pub mod kernels;
pub mod memory;
pub mod ops;
pub mod pil_resize;
mod precomputed;
pub mod sd;
pub mod single_file;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_tiling;
pub mod weights;
