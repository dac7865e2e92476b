//! Prior-preservation images (Custom Diffusion's and DreamBooth's class images): `n` images the
//! base model generates from the class prompt ("a cat and a dog"), one seed each, cached in a
//! folder as `00000.png` with the prompt beside it in `00000.txt`, so a rerun with the same
//! prompt reuses them and a changed prompt regenerates them.

use super::text2img::{self, Text2ImageParams};
use crate::model::sd::StableDiffusion;
use crate::training::data::RegImage;
use crate::util;
use anyhow::{Context, Result};
use std::path::Path;

/// Generates (or reuses) `n` class images of `prompt` in `dir`, image `i` with seed
/// `seed + i` and diffusers' text-to-image defaults. `on_image(done, n)` is called after each.
pub fn class_images(
    sd: &StableDiffusion,
    prompt: &str,
    n: usize,
    dir: &Path,
    seed: u64,
    mut on_image: impl FnMut(usize, usize),
) -> Result<Vec<RegImage>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let path = dir.join(format!("{i:05}.png"));
        let txt = path.with_extension("txt");
        let cached = path.is_file() && std::fs::read_to_string(&txt).is_ok_and(|t| t.trim() == prompt);
        if !cached {
            let mut p = Text2ImageParams::new(sd, prompt);
            p.seed = seed.wrapping_add(i as u64);
            let img = text2img::generate(sd, &p, |_, _| {})?;
            util::save_png(&util::to_rgb8(&img)?[0], &path)?;
            util::write_atomic(&txt, prompt.as_bytes())?;
        }
        out.push(RegImage { path, caption: prompt.to_string() });
        on_image(i + 1, n);
    }
    Ok(out)
}
