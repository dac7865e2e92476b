//! disendiff: DisenDiff (attention calibration for disentangled text-to-image
//! personalization, CVPR 2024) on a Stable Diffusion implemented in Rust with candle.
//!
//! Layout (each part uses only parts listed before it):
//! - [`model`]: Stable Diffusion itself (tokenizer, CLIP text encoder, UNet with an attention
//!   probe, VAE, memory estimates), loaded strictly from diffusers folders or single-file
//!   CompVis checkpoints (`model/single_file/`, with its safe pickle reader), and the CLIP model
//!   (both towers) of the metrics; [`scheduler`]: DDPM training noise and the DDIM sampler.
//! - [`formats`]: the files users exchange (the concept file, LoRA files, Custom Diffusion
//!   folders, the exports for diffusers and the webui tools).
//! - [`patch`]: LoRAs, then concept files, applied to a loaded model in order, and undone.
//! - [`calibration`]: the paper's contribution, attention maps -> L_bind and L_s&s (Eq. 3-6).
//! - [`training`]: every method and ablation as a preset, data, the loss of a micro-batch,
//!   AdamW, the loop with checkpoints.
//! - [`pipelines`]: one denoising loop under text-to-image, image-to-image, inpainting,
//!   attention maps and class-image generation.
//! - [`eval`]: the paper's metrics behind one `Scorer` trait (CLIPScore and CLIP image
//!   alignment with a transformers CLIP folder), its prompt sets and its protocol runner.
//! - [`toyworld`]: synthetic scenes with known ground truth, for a measurable benchmark.
//! - [`cli`]: the `disendiff` command line.
//!
//! The project's own account of the method, the formats and the candle facts is in `docs/`.

pub mod bench;
pub mod calibration;
pub mod cli;
pub mod eval;
pub mod formats;
pub mod model;
pub mod patch;
pub mod pipelines;
pub mod scheduler;
pub mod toyworld;
pub mod training;
pub mod util;
