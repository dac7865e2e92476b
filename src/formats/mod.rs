//! Files users exchange: disendiff's own concept file, LoRA files (kohya, PEFT) read as weight
//! changes, single-file (CompVis) base checkpoints and the safe pickle reader for their `.ckpt`
//! form, diffusers' Custom Diffusion folders read as concept files, and the exports for
//! diffusers, AUTOMATIC1111, ComfyUI and InvokeAI.

pub mod concept_file;
pub mod custom_diffusion;
pub mod export;
pub mod lora;
pub mod pickle;
pub mod single_file;
