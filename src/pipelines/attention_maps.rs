//! Per-token cross-attention maps of a generation (the view of the paper's Fig. 4).
//!
//! The prompt is sampled as in text-to-image; at every step the conditional branch's
//! cross-attention probabilities of the layers with the chosen query grid are captured and
//! averaged over steps, heads, layers and images. Each prompt token's map is then drawn as a
//! heatmap over the generated image.

use super::denoise::Hooks;
use super::text2img::{self, Text2ImageParams};
use crate::model::sd::StableDiffusion;
use crate::model::unet::{AttentionProbe, CapturedAttention};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use image::{imageops, Rgb, RgbImage};

pub struct TokenMaps {
    /// (position in the 77 ids, token text) of each prompt token, start/end tokens excluded.
    pub tokens: Vec<(usize, String)>,
    /// Mean maps [77, side, side].
    pub maps: Tensor,
    /// The generated images [N, 3, H, W] in [0, 1].
    pub images: Tensor,
}

/// Sums the conditional branch's cross-attention maps of the layers with a `side` x `side`
/// query grid over steps, heads, layers and images (the loop's observer).
struct MapSum {
    side: usize,
    sum: Option<Tensor>,
    count: usize,
}

impl Hooks for MapSum {
    fn probe(&self) -> Option<AttentionProbe> {
        Some(AttentionProbe { resolutions: vec![self.side] })
    }

    fn observe(&mut self, captured: &[CapturedAttention]) -> Result<()> {
        let side = self.side;
        for a in captured {
            if a.height != side || a.width != side {
                continue;
            }
            let (n, _, _, t) = a.probs.dims4()?;
            // mean over images and heads -> [HW, T] -> [T, side, side]
            let m = a.probs.to_dtype(DType::F32)?.mean(1)?.sum(0)?.t()?.reshape((t, side, side))?;
            self.sum = Some(match self.sum.take() {
                None => m,
                Some(s) => (s + m)?,
            });
            self.count += n;
        }
        Ok(())
    }
}

/// Samples `p` and averages the cross-attention maps at a `side` x `side` query grid.
pub fn token_maps(sd: &StableDiffusion, p: &Text2ImageParams, side: usize) -> Result<TokenMaps> {
    let mut acc = MapSum { side, sum: None, count: 0 };
    let latents = text2img::sample_latents_with(sd, p, &mut acc, |_, _| {})?;
    let MapSum { sum, count, .. } = acc;
    let Some(sum) = sum else {
        bail!("no cross-attention layer of this UNet has a {side}x{side} query grid at this image size");
    };
    let maps = (sum / count as f64)?;
    let images = text2img::decode_latents(sd, &latents)?;
    let mut tokens = Vec::new();
    let mut pos = 1;
    for (word, ids) in sd.tokenizer.tokenize_words(&p.prompt) {
        for (k, id) in ids.iter().enumerate() {
            if pos >= sd.tokenizer.max_length - 1 {
                break;
            }
            let text = sd.tokenizer.id_to_token(*id).unwrap_or("?").replace("</w>", "");
            let label = if ids.len() > 1 { format!("{word}[{k}]:{text}") } else { word.clone() };
            tokens.push((pos, label));
            pos += 1;
        }
    }
    Ok(TokenMaps { tokens, maps, images })
}

/// A blue-to-red colour scale for v in [0, 1].
fn heat(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [r, g, b]
}

/// The min-max normalised map of one token, coloured and blended over `image`.
pub fn overlay(map: &Tensor, image: &RgbImage) -> Result<RgbImage> {
    let (h, w) = map.dims2()?;
    let v = map.flatten_all()?.to_vec1::<f32>()?;
    let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let small = RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let n = (v[y as usize * w + x as usize] - lo) / (hi - lo + 1e-8);
        let c = heat(n);
        Rgb([(c[0] * 255.0) as u8, (c[1] * 255.0) as u8, (c[2] * 255.0) as u8])
    });
    let (iw, ih) = image.dimensions();
    let big = imageops::resize(&small, iw, ih, imageops::FilterType::Triangle);
    Ok(RgbImage::from_fn(iw, ih, |x, y| {
        let a = image.get_pixel(x, y);
        let b = big.get_pixel(x, y);
        Rgb([0, 1, 2].map(|i| ((a[i] as u16 + b[i] as u16) / 2) as u8))
    }))
}

/// Images side by side in a grid of `cols` columns, with a 2-pixel white gap.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let (w, h) = images.first().map_or((1, 1), |i| i.dimensions());
    let cols = cols.max(1).min(images.len().max(1));
    let rows = images.len().div_ceil(cols);
    let gap = 2;
    let mut out = RgbImage::from_pixel(cols as u32 * (w + gap) - gap, rows as u32 * (h + gap) - gap, Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let (c, r) = ((i % cols) as u32, (i / cols) as u32);
        imageops::overlay(&mut out, img, (c * (w + gap)) as i64, (r * (h + gap)) as i64);
    }
    out
}
