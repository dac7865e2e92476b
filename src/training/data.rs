//! Training images: the target photo with Custom Diffusion's augmentation and latent loss mask
//! (docs/method.md §4), and the regularisation ("prior preservation") set.
//!
//! Augmentation of a target image of side S (S = 512 for SD1.5), latent factor f:
//! - draw s: with probability 2/3 from U{S/3..S}, else from U{1.2S..1.4S}; make it even;
//! - s < 0.6 S: caption prefix "a far away " / "very small "; resize to s (bicubic), paste
//!   centred at a random point on a zero canvas; mask = 1 inside the pasted square shrunk by one
//!   latent pixel on each side;
//! - s > S: prefix "zoomed in " / "close up "; resize to s, take a random S crop; mask all 1;
//! - otherwise resize to S; mask all 1.
//!
//! Random horizontal flip (p = 0.5) first. Regularisation images are only resized, mask all 1.

use crate::util;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{imageops, RgbImage};
use rand::Rng;
use std::path::{Path, PathBuf};

/// One augmented training view.
pub struct View {
    /// Pixels [3, S, S] in [-1, 1].
    pub pixels: Tensor,
    /// Loss mask at latent resolution [1, S/f, S/f].
    pub mask: Tensor,
    /// Caption prefix chosen by the augmentation ("" when none).
    pub prefix: &'static str,
}

/// Centre-crops to a square (the method's first step).
pub fn center_crop_square(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side).to_image()
}

fn resize(img: &RgbImage, side: usize) -> RgbImage {
    imageops::resize(img, side as u32, side as u32, imageops::FilterType::CatmullRom)
}

/// Loads the target photo, centre-cropped to a square. Errors name the file.
pub fn load_target(path: &Path) -> Result<RgbImage> {
    let img = util::load_rgb(path)?;
    let (w, h) = img.dimensions();
    if w < 8 || h < 8 {
        bail!("{} is only {w}x{h} pixels", path.display());
    }
    Ok(center_crop_square(&img))
}

/// Draws one augmented view of `img` for a model working at `size` pixels, latent factor `f`.
pub fn augment(img: &RgbImage, size: usize, f: usize, augment: bool, rng: &mut impl Rng, device: &Device) -> Result<View> {
    let mut img = img.clone();
    if rng.random_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut img);
    }
    let mut scale = size;
    if augment {
        scale = if rng.random::<f64>() < 0.66 {
            rng.random_range(size / 3..=size)
        } else {
            rng.random_range((1.2 * size as f64) as usize..(1.4 * size as f64) as usize)
        };
    }
    if scale % 2 == 1 {
        scale += 1;
    }
    let latent = size / f;
    let (canvas, mask, prefix): (Vec<f32>, Vec<f32>, &'static str) = if (scale as f64) < 0.6 * size as f64 {
        let prefix = if rng.random_bool(0.5) { "a far away " } else { "very small " };
        let half = scale / 2;
        let cx = rng.random_range(half..=size - half); // row centre
        let cy = rng.random_range(half..=size - half); // column centre
        let small = resize(&img, scale);
        let mut canvas = vec![0f32; size * size * 3];
        for (x, y, p) in small.enumerate_pixels() {
            let (r, c) = (cx - half + y as usize, cy - half + x as usize);
            for ch in 0..3 {
                canvas[(r * size + c) * 3 + ch] = p[ch] as f32 / 127.5 - 1.0;
            }
        }
        let mut mask = vec![0f32; latent * latent];
        let (r0, r1) = ((cx - half) / f + 1, (cx + half) / f - 1);
        let (c0, c1) = ((cy - half) / f + 1, (cy + half) / f - 1);
        for r in r0..r1.min(latent) {
            for c in c0..c1.min(latent) {
                mask[r * latent + c] = 1.0;
            }
        }
        (canvas, mask, prefix)
    } else if scale > size {
        let prefix = if rng.random_bool(0.5) { "zoomed in " } else { "close up " };
        let half = size / 2;
        let cx = rng.random_range(half..=scale - half);
        let cy = rng.random_range(half..=scale - half);
        let big = resize(&img, scale);
        let crop = imageops::crop_imm(&big, (cy - half) as u32, (cx - half) as u32, size as u32, size as u32).to_image();
        (to_unit(&crop), vec![1f32; latent * latent], prefix)
    } else {
        (to_unit(&resize(&img, size)), vec![1f32; latent * latent], "")
    };
    let pixels = Tensor::from_vec(canvas, (size, size, 3), device)?.permute((2, 0, 1))?.contiguous()?;
    let mask = Tensor::from_vec(mask, (1, latent, latent), device)?;
    Ok(View { pixels, mask, prefix })
}

fn to_unit(img: &RgbImage) -> Vec<f32> {
    img.as_raw().iter().map(|&p| p as f32 / 127.5 - 1.0).collect()
}

/// A regularisation image with its caption.
pub struct RegImage {
    pub path: PathBuf,
    pub caption: String,
}

/// Reads a folder of images with captions: `name.png|jpg|jpeg` + `name.txt` beside it.
pub fn read_reg_folder(dir: &Path) -> Result<Vec<RegImage>> {
    if !dir.is_dir() {
        bail!("regularisation folder {} does not exist", dir.display());
    }
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_lowercase());
        if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
            continue;
        }
        let txt = p.with_extension("txt");
        let caption = std::fs::read_to_string(&txt)
            .with_context(|| format!("regularisation image {} has no caption file {}", p.display(), txt.display()))?;
        out.push(RegImage { path: p, caption: caption.trim().to_string() });
    }
    if out.is_empty() {
        bail!("regularisation folder {} holds no .png/.jpg images", dir.display());
    }
    Ok(out)
}

/// A regularisation view: resized to `size`, flipped at random, mask all 1.
pub fn reg_view(img: &RgbImage, size: usize, f: usize, rng: &mut impl Rng, device: &Device) -> Result<View> {
    augment(img, size, f, false, rng, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn small_scale_mask_is_the_pasted_square_shrunk_by_one_latent_pixel() {
        let img = RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]));
        let mut seen_small = false;
        for seed in 0..200 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let v = augment(&img, 64, 8, true, &mut rng, &Device::Cpu).unwrap();
            let mask = v.mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let px = v.pixels.get(0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if v.prefix == "a far away " || v.prefix == "very small " {
                seen_small = true;
                // Every masked latent pixel covers only pasted (white) pixels.
                for (i, &m) in mask.iter().enumerate() {
                    if m == 1.0 {
                        let (r, c) = (i / 8, i % 8);
                        for y in r * 8..r * 8 + 8 {
                            for x in c * 8..c * 8 + 8 {
                                assert!(px[y * 64 + x] > 0.9, "masked latent pixel {r},{c} covers canvas");
                            }
                        }
                    }
                }
                assert!(mask.iter().sum::<f32>() < 64.0);
            } else {
                assert!(mask.iter().all(|&m| m == 1.0));
            }
        }
        assert!(seen_small);
    }
}
