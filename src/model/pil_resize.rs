//! PIL's bicubic resize of 8-bit RGB images (`Image.resize(size, Image.BICUBIC)`), bit-exact.
//!
//! CLIP's image preprocessing (transformers' `CLIPImageProcessor`) resizes with PIL, and the
//! CLIP metrics are only comparable to the authors' if the pixels are the same. PIL's filter is
//! not the `image` crate's CatmullRom: it is the cubic convolution kernel with a = -0.5 whose
//! support is widened by the downscale factor (an antialiasing filter), evaluated separably,
//! horizontal pass first, each pass rounded to 8 bits with 22-bit fixed-point coefficients
//! (Pillow's `libImaging/Resample.c`: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc`, `ImagingResampleVertical_8bpc`).

use image::RgbImage;

/// Fixed-point precision of the 8-bit passes (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output pixel: the first input pixel, and the fixed-point weights of the input
/// pixels from there on (`precompute_coeffs` + `normalize_coeffs_8bpc`, box = whole image).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let v = k * (1u32 << PRECISION_BITS) as f64;
                    if k < 0.0 { (v - 0.5) as i32 } else { (v + 0.5) as i32 }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// `clip8`: the rounded fixed-point sum back to a byte.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS) << 8 {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// One separable pass over interleaved RGB rows: `along_x` resamples each row, otherwise each
/// column. `(w, h)` is the input's size; returns the output buffer.
fn pass(src: &[u8], w: usize, h: usize, out_len: usize, along_x: bool) -> Vec<u8> {
    let coeffs = coefficients(if along_x { w } else { h }, out_len);
    let (ow, oh) = if along_x { (out_len, h) } else { (w, out_len) };
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = if along_x { &coeffs[x] } else { &coeffs[y] };
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    let (sx, sy) = if along_x { (start + i, y) } else { (x, start + i) };
                    acc += src[(sy * w + sx) * 3 + c] as i64 * kv as i64;
                }
                out[(y * ow + x) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// Resizes to `width` x `height` exactly as PIL's `Image.resize((width, height), BICUBIC)` does
/// for an RGB image (a same-size resize is a copy; an axis whose size is kept is not filtered).
/// Zero sizes give an empty image.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    if ow == 0 || oh == 0 || w == 0 || h == 0 {
        return RgbImage::new(width, height);
    }
    let mut buf = img.as_raw().clone();
    if ow != w {
        buf = pass(&buf, w, h, ow, true);
    }
    if oh != h {
        buf = pass(&buf, ow, h, oh, false);
    }
    RgbImage::from_raw(width, height, buf).expect("buffer of width * height * 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The weights of every output pixel sum to one (before fixed-point rounding), so a
    /// constant image stays constant under any resize.
    #[test]
    fn constant_images_stay_constant() {
        let img = RgbImage::from_pixel(13, 7, image::Rgb([200, 3, 77]));
        for (w, h) in [(5, 3), (40, 9), (13, 20), (1, 1)] {
            let r = resize_bicubic(&img, w, h);
            assert!(r.pixels().all(|p| p.0 == [200, 3, 77]), "{w}x{h}");
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_fn(6, 4, |x, y| image::Rgb([(x * 40) as u8, (y * 60) as u8, (x * y) as u8]));
        assert_eq!(resize_bicubic(&img, 6, 4), img);
    }
}
