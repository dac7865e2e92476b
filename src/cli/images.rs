//! Generating `--num-images` pictures one at a time, each written to `OUT/00000.png`, ... as
//! soon as it is done: the memory a run needs is that of one image whatever the count, and a
//! first Ctrl-C stops after the current image, keeping the finished ones.
//!
//! The initial noise of all images is drawn at once from `--seed` (or read from `--latents`)
//! as the library's batched pipelines draw it, and image `i` starts from row `i`, so with
//! eta 0 the pictures are those of one batched run. With eta > 0 the noise DDIM adds at each
//! step comes from a seed derived from `--seed` and `i`.

use crate::util;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::atomic::Ordering;

/// The initial noise [n, c, h, w]: `given` (checked by the caller) or drawn from `seed`.
pub fn initial_noise(given: Option<Tensor>, shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    match given {
        Some(t) => Ok(t),
        None => util::randn(&mut util::seeded_rng(seed), shape, device),
    }
}

/// The seed of image `i`'s per-step noise (eta > 0): distinct from `seed`'s own stream, which
/// drew the initial noise.
pub fn step_seed(seed: u64, i: usize) -> u64 {
    seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)
}

/// Reads the tensor `latents` of a `--latents` safetensors file.
pub fn read_latents(path: &Path, device: &Device) -> Result<Tensor> {
    util::require_file(path, "latents file")?;
    let mut map = candle_core::safetensors::load(path, device)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))?;
    map.remove("latents").with_context(|| format!("{} has no tensor named `latents`", path.display()))
}

/// Runs `one(noise_i, step_seed_i, on_step)` (noise row `i` as [1, c, h, w], the seed of its
/// per-step noise, the progress callback; returns the image [1, 3, H, W] in [0, 1]) for `i`
/// in `0..n` under a progress bar "`what` i/n" of `steps`, writing each image to
/// `out/{i:05}.png` atomically as it finishes and printing its path. After a first Ctrl-C (or
/// SIGTERM) the current image is finished and written, and the run stops with an error
/// saying how many were kept.
pub fn generate_each(
    n: usize,
    noise: &Tensor,
    seed: u64,
    out: &Path,
    what: &str,
    steps: usize,
    mut one: impl FnMut(Tensor, u64, &mut dyn FnMut(usize, usize)) -> Result<Tensor>,
) -> Result<()> {
    let stop = super::interrupt::install("stopping after the current image (press Ctrl-C again to stop at once)");
    for i in 0..n {
        let pb = super::progress_bar(steps as u64, &format!("{what} {}/{n}", i + 1));
        let image = one(noise.narrow(0, i, 1)?, step_seed(seed, i), &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64)
        })?;
        pb.finish_and_clear();
        for img in util::to_rgb8(&image)? {
            let path = out.join(format!("{i:05}.png"));
            util::save_png(&img, &path)?;
            println!("{}", path.display());
        }
        if stop.load(Ordering::SeqCst) && i + 1 < n {
            bail!("interrupted: {} of {n} images written to {} (the rest were not started)", i + 1, out.display());
        }
    }
    Ok(())
}
