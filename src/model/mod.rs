//! Stable Diffusion model code. Module paths mirror diffusers weight names, so the safetensors
//! files of a diffusers folder load without renaming.

pub mod attention_chunks;
pub mod clip;
pub mod nn;
pub mod kernels;
pub mod memory;
pub mod ops;
pub mod sd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_tiling;
pub mod weights;
