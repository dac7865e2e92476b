//! CLIP's image preprocessing, as transformers' `CLIPImageProcessor` (PIL backend) runs it from
//! a folder's `preprocessor_config.json`: RGB; resize so the shortest side is `size.shortest_edge`
//! with PIL's bicubic filter ([`super::pil_resize`]; the long side is `int(size * long /
//! short)`); centre crop to `crop_size` (offsets `(H - h) // 2`, `(W - w) // 2`); rescale by
//! `rescale_factor` (1/255) in f64, then to f32; normalise `(x - mean) / std` in f32. The result
//! is channel-first, as the vision tower reads it.

use super::pil_resize::resize_bicubic;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

/// The steps and constants of `preprocessor_config.json`.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    /// Target of the shortest side (`size.shortest_edge`), when `do_resize`.
    pub shortest_edge: Option<usize>,
    /// `(height, width)` of the centre crop, when `do_center_crop`.
    pub crop: Option<(usize, usize)>,
    /// `rescale_factor`, when `do_rescale`.
    pub rescale_factor: Option<f64>,
    /// `(image_mean, image_std)`, when `do_normalize`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(true)
}

fn three(v: &Value, key: &str, path: &Path) -> Result<[f32; 3]> {
    let a = v
        .get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("{}: no {key:?} list (needed by do_normalize)", path.display()))?;
    let vals: Vec<f32> = a.iter().filter_map(Value::as_f64).map(|x| x as f32).collect();
    if vals.len() != 3 || a.len() != 3 {
        bail!("{}: {key:?} must be 3 numbers (RGB), got {}", path.display(), Value::Array(a.clone()));
    }
    Ok([vals[0], vals[1], vals[2]])
}

impl ClipImageProcessor {
    /// Reads `preprocessor_config.json`. The `do_*` flags default to true and `rescale_factor`
    /// to 1/255, as in `CLIPImageProcessor`; the sizes, mean and std of an enabled step must be
    /// present. `size` / `crop_size` may be plain numbers (the older layout).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let shortest_edge = if flag(&v, "do_resize") {
            if let Some(r) = v.get("resample") {
                if r.as_u64() != Some(3) {
                    bail!("{}: resample {r} is not supported (only 3, bicubic, as CLIP uses)", path.display());
                }
            }
            let size = v.get("size").with_context(|| format!("{}: no \"size\" (needed by do_resize)", path.display()))?;
            let n = size.as_u64().or_else(|| size.get("shortest_edge").and_then(Value::as_u64)).with_context(|| {
                format!("{}: \"size\" must be a number or {{\"shortest_edge\": N}}, got {size}", path.display())
            })?;
            Some(n as usize)
        } else {
            None
        };
        let crop = if flag(&v, "do_center_crop") {
            let c = v
                .get("crop_size")
                .with_context(|| format!("{}: no \"crop_size\" (needed by do_center_crop)", path.display()))?;
            let hw = match c.as_u64() {
                Some(n) => Some((n, n)),
                None => c.get("height").and_then(Value::as_u64).zip(c.get("width").and_then(Value::as_u64)),
            };
            let (h, w) = hw.with_context(|| {
                format!("{}: \"crop_size\" must be a number or {{\"height\": H, \"width\": W}}, got {c}", path.display())
            })?;
            Some((h as usize, w as usize))
        } else {
            None
        };
        let rescale_factor = if flag(&v, "do_rescale") {
            // Older files (openai/clip-*, written as CLIPFeatureExtractor) have neither key:
            // transformers then rescales by its default 1/255.
            match v.get("rescale_factor") {
                None => Some(1.0 / 255.0),
                Some(f) => Some(f.as_f64().with_context(|| {
                    format!("{}: \"rescale_factor\" must be a number, got {f}", path.display())
                })?),
            }
        } else {
            None
        };
        let normalize =
            if flag(&v, "do_normalize") { Some((three(&v, "image_mean", path)?, three(&v, "image_std", path)?)) } else { None };
        if shortest_edge == Some(0) || crop.is_some_and(|(h, w)| h == 0 || w == 0) {
            bail!("{}: sizes must be above 0", path.display());
        }
        Ok(Self { shortest_edge, crop, rescale_factor, normalize })
    }

    /// The `(width, height)` the resize step produces for an image of `(w, h)`.
    pub fn resized_size(&self, w: usize, h: usize) -> (usize, usize) {
        let Some(s) = self.shortest_edge else { return (w, h) };
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = (s as f64 * long as f64 / short as f64) as usize;
        if w <= h { (s, new_long) } else { (new_long, s) }
    }

    /// Resize and centre crop: the 8-bit image the model sees.
    pub fn resize_and_crop(&self, img: &RgbImage) -> Result<RgbImage> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            bail!("image of size {w}x{h} is empty");
        }
        let (rw, rh) = self.resized_size(w, h);
        let img = if (rw, rh) != (w, h) { resize_bicubic(img, rw as u32, rh as u32) } else { img.clone() };
        let Some((ch, cw)) = self.crop else { return Ok(img) };
        if ch > rh || cw > rw {
            bail!("the centre crop {cw}x{ch} is larger than the resized image {rw}x{rh}");
        }
        let (top, left) = ((rh - ch) / 2, (rw - cw) / 2);
        Ok(image::imageops::crop_imm(&img, left as u32, top as u32, cw as u32, ch as u32).to_image())
    }

    /// `pixel_values` of one image: [3, H, W] f32.
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let img = self.resize_and_crop(img)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = vec![0f32; 3 * h * w];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                let mut v = p.0[c] as f32;
                if let Some(f) = self.rescale_factor {
                    v = (p.0[c] as f64 * f) as f32;
                }
                if let Some((mean, std)) = &self.normalize {
                    v = (v - mean[c]) / std[c];
                }
                out[c * h * w + i] = v;
            }
        }
        Ok(Tensor::from_vec(out, (3, h, w), device)?)
    }

    /// `pixel_values` of several images of the same processed size: [B, 3, H, W].
    pub fn preprocess_batch(&self, imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
        let ts = imgs.iter().map(|i| self.preprocess(i, device)).collect::<Result<Vec<_>>>()?;
        if ts.is_empty() {
            bail!("no images to preprocess");
        }
        Ok(Tensor::stack(&ts, 0)?)
    }
}
