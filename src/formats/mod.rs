//! Files users exchange: disendiff's own concept file, LoRA files (kohya, PEFT) read as weight
//! changes, diffusers' Custom Diffusion folders and the official DisenDiff / Custom Diffusion
//! `delta.ckpt` read as concept files, and the exports for
//! diffusers, AUTOMATIC1111, ComfyUI and InvokeAI. (Single-file CompVis base checkpoints and
//! their safe pickle reader are read where the model is loaded: `model/single_file/`.)

pub mod concept_file;
pub mod custom_diffusion;
pub mod delta_ckpt;
pub mod diffusers_model;
pub mod export;
pub mod lora;
