//! disendiff: DisenDiff (attention calibration for disentangled text-to-image
//! personalization, CVPR 2024) on a Stable Diffusion implemented in Rust with candle.
//!
//! Layout:
//! - [`model`]: Stable Diffusion itself (tokenizer, CLIP text encoder, UNet with an attention
//!   probe, VAE), loaded strictly from diffusers folders.
//! - [`calibration`]: the paper's contribution, attention maps -> L_bind and L_s&s.
//! - [`scheduler`]: DDPM training noise and the DDIM sampler.
//! - [`pipelines`]: one denoising loop under text-to-image, image-to-image, attention maps and
//!   class-image generation.
//! - [`toyworld`]: synthetic scenes with known ground truth, for a measurable benchmark.
//! - [`formats`]: concept files.
//! - [`patch`]: concept files (and next, LoRAs) applied to a loaded model in order, and undone.
//! - [`cli`]: the `disendiff` command line.

pub mod bench;
pub mod calibration;
pub mod cli;
pub mod formats;
pub mod model;
pub mod patch;
pub mod pipelines;
pub mod scheduler;
pub mod toyworld;
pub mod training;
pub mod util;
