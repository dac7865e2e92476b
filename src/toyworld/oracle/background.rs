//! The background of a toy-world image, estimated from the image itself (never from the prompt):
//! its colour (the median of the border band), a plane per channel fitted robustly to the band
//! (so gradients and slow drifts of generated backgrounds are absorbed), the noise level, and
//! from these the adaptive foreground threshold. Segmentation calls a pixel foreground when it
//! lies farther than that threshold from the background model.

use super::lab::dist3;
use image::RgbImage;

/// The width of the border band whose pixels estimate the background.
const BORDER: u32 = 2;

fn border_pixels(img: &RgbImage) -> Vec<[u8; 3]> {
    let (w, h) = img.dimensions();
    let b = BORDER.min(w / 2).min(h / 2).max(1);
    let mut v = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if x < b || y < b || x >= w - b || y >= h - b {
                v.push(img.get_pixel(x, y).0);
            }
        }
    }
    v
}

fn median(v: &mut [f32]) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The image's own background colour: the per-channel median of its border pixels (the
/// outer 2-pixel band), RGB 0-255. Robust to objects touching the border on less than half
/// of it.
pub fn estimate_background(img: &RgbImage) -> [f32; 3] {
    let px = border_pixels(img);
    [0, 1, 2].map(|c| median(&mut px.iter().map(|p| p[c] as f32).collect::<Vec<_>>()))
}


/// The background as one plane per channel, `a + b u + c v` (u, v in [-0.5, 0.5] across the
/// image), fitted by least squares to the border band with outliers (objects touching the
/// border) dropped twice; absorbs gradients and slow drifts of generated backgrounds.
#[derive(Clone, Debug, PartialEq)]
pub struct BackgroundModel {
    /// Per channel `[a, b, c]`.
    pub coef: [[f32; 3]; 3],
    /// Noise estimate (per-channel sigma, 0-255 units) from the inliers' residuals.
    pub noise: f32,
    width: usize,
    height: usize,
}

impl BackgroundModel {
    /// Fits the model to `img`'s border band (see the type's documentation).
    pub fn fit(img: &RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let b = (BORDER as usize).min(w / 2).min(h / 2).max(1);
        let mut pts: Vec<(f32, f32, [f32; 3])> = Vec::new();
        for y in 0..h {
            for x in 0..w {
                if x < b || y < b || x >= w - b || y >= h - b {
                    let (u, v) = (Self::uv(x, w), Self::uv(y, h));
                    pts.push((u, v, img.get_pixel(x as u32, y as u32).0.map(|c| c as f32)));
                }
            }
        }
        let med = estimate_background(img);
        let mut model = BackgroundModel { coef: med.map(|m| [m, 0.0, 0.0]), noise: 0.0, width: w, height: h };
        let mut keep: Vec<bool> = vec![true; pts.len()];
        for round in 0..3 {
            if round > 0 {
                let r: Vec<f32> = pts.iter().map(|&(u, v, c)| dist3(c, model.eval(u, v))).collect();
                let mut sorted: Vec<f32> = r.iter().copied().filter(|v| v.is_finite()).collect();
                let m = median(&mut sorted);
                let cut = (3.0 * m).max(15.0);
                keep = r.iter().map(|&d| d <= cut).collect();
            }
            if let Some(coef) = plane_fit(&pts, &keep) {
                model.coef = coef;
            }
        }
        let mut r: Vec<f32> =
            pts.iter().zip(&keep).filter(|(_, &k)| k).map(|(&(u, v, c), _)| dist3(c, model.eval(u, v))).collect();
        // The median of |N(0, s^2 I_3)| is about 1.54 s.
        model.noise = median(&mut r) / 1.54;
        model
    }

    fn uv(i: usize, n: usize) -> f32 {
        (i as f32 + 0.5) / n as f32 - 0.5
    }

    fn eval(&self, u: f32, v: f32) -> [f32; 3] {
        self.coef.map(|[a, b, c]| a + b * u + c * v)
    }

    /// The background colour at pixel (x, y).
    pub fn at(&self, x: usize, y: usize) -> [f32; 3] {
        self.eval(Self::uv(x, self.width), Self::uv(y, self.height))
    }
}

/// Least squares `a + b u + c v` per channel over the kept points; `None` if degenerate.
fn plane_fit(pts: &[(f32, f32, [f32; 3])], keep: &[bool]) -> Option<[[f32; 3]; 3]> {
    let mut m = [[0f64; 3]; 3];
    let mut rhs = [[0f64; 3]; 3];
    for (&(u, v, c), _) in pts.iter().zip(keep).filter(|(_, &k)| k) {
        let f = [1.0, u as f64, v as f64];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += f[i] * f[j];
            }
            for ch in 0..3 {
                rhs[ch][i] += f[i] * c[ch] as f64;
            }
        }
    }
    let det = |a: &[[f64; 3]; 3]| {
        a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
    };
    let d = det(&m);
    if d.abs() < 1e-9 {
        return None;
    }
    let mut out = [[0f32; 3]; 3];
    for ch in 0..3 {
        for k in 0..3 {
            let mut a = m;
            for i in 0..3 {
                a[i][k] = rhs[ch][i];
            }
            out[ch][k] = (det(&a) / d) as f32;
        }
    }
    Some(out)
}

/// The colours segmentation works on: the image itself, or its 3x3 mean when the background
/// is noisy (noise sigma above 4), which divides the noise by 3 for the foreground decision.
pub(super) fn working_colors(img: &RgbImage, noise: f32) -> Vec<[f32; 3]> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let px = |p: usize| [raw[3 * p] as f32, raw[3 * p + 1] as f32, raw[3 * p + 2] as f32];
    if noise <= 4.0 {
        return (0..w * h).map(px).collect();
    }
    (0..w * h)
        .map(|p| {
            let (x, y) = ((p % w) as i64, (p / w) as i64);
            let mut s = [0f32; 3];
            let mut n = 0f32;
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (xx, yy) = (x + dx, y + dy);
                    if xx >= 0 && yy >= 0 && xx < w as i64 && yy < h as i64 {
                        let c = px(yy as usize * w + xx as usize);
                        for i in 0..3 {
                            s[i] += c[i];
                        }
                        n += 1.0;
                    }
                }
            }
            s.map(|v| v / n)
        })
        .collect()
}

/// The adaptive foreground threshold (see [`SegmentOptions::threshold`]): twice the 90th
/// percentile of the border pixels' distance to the [`BackgroundModel`] (on the 3x3 mean when
/// the image is noisy), within [40, 70].
pub fn foreground_threshold(img: &RgbImage) -> f32 {
    let model = BackgroundModel::fit(img);
    threshold_for(img, &model, &working_colors(img, model.noise))
}

pub(super) fn threshold_for(img: &RgbImage, model: &BackgroundModel, colors: &[[f32; 3]]) -> f32 {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let b = (BORDER as usize).min(w / 2).min(h / 2).max(1);
    let mut d: Vec<f32> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if x < b || y < b || x >= w - b || y >= h - b {
                d.push(dist3(colors[y * w + x], model.at(x, y)));
            }
        }
    }
    d.sort_by(|a, b| a.total_cmp(b));
    let q90 = d[(d.len() * 9 / 10).min(d.len() - 1)];
    (2.0 * q90).clamp(40.0, 70.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::seeded_rng;
    use image::Rgb;
    use rand_distr::{Distribution, Normal};

    fn uniform(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb(c))
    }

    fn add_noise(img: &mut RgbImage, sigma: f32, seed: u64) {
        let mut rng = seeded_rng(seed);
        let n = Normal::new(0.0f32, sigma).unwrap();
        for p in img.pixels_mut() {
            for c in 0..3 {
                p.0[c] = (p.0[c] as f32 + n.sample(&mut rng)).round().clamp(0.0, 255.0) as u8;
            }
        }
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn background_colour_ignores_an_object_on_the_border() {
        let mut img = uniform(20, 16, [128, 128, 128]);
        // A red object on the left edge and one in the middle: neither is the background.
        for y in 5..11 {
            for x in 0..6 {
                img.put_pixel(x, y, Rgb([220, 30, 30]));
            }
            for x in 9..14 {
                img.put_pixel(x, y, Rgb([20, 20, 200]));
            }
        }
        assert_eq!(estimate_background(&img), [128.0, 128.0, 128.0]);
    }

    /// An image whose channels are exact planes: R = 69 + x, G = 120, B = 50 + y, i.e. on
    /// u, v in [-0.5, 0.5]: R = 100.5 + 64 u, B = 73.5 + 48 v (w = 64, h = 48).
    fn plane_image() -> (RgbImage, [[f32; 3]; 3]) {
        let img = RgbImage::from_fn(64, 48, |x, y| Rgb([69 + x as u8, 120, 50 + y as u8]));
        (img, [[100.5, 64.0, 0.0], [120.0, 0.0, 0.0], [73.5, 0.0, 48.0]])
    }

    fn assert_coef(got: &[[f32; 3]; 3], want: &[[f32; 3]; 3], tol: f32) {
        for ch in 0..3 {
            for k in 0..3 {
                assert!((got[ch][k] - want[ch][k]).abs() < tol, "channel {ch} coefficient {k}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn model_recovers_an_exact_plane() {
        let (img, want) = plane_image();
        let m = BackgroundModel::fit(&img);
        assert_coef(&m.coef, &want, 1e-2);
        assert!(m.noise < 0.01, "noise {}", m.noise);
        for (x, y) in [(0, 0), (63, 0), (30, 20), (63, 47)] {
            let p = img.get_pixel(x as u32, y as u32).0.map(|v| v as f32);
            assert!(dist3(m.at(x, y), p) < 0.02, "({x}, {y}): {:?} vs {p:?}", m.at(x, y));
        }
    }

    #[test]
    fn model_drops_objects_touching_the_border() {
        let (mut img, want) = plane_image();
        for y in 0..12 {
            for x in 0..12 {
                img.put_pixel(x, y, Rgb([0, 0, 0]));
            }
        }
        for y in 30..48 {
            for x in 40..50 {
                img.put_pixel(x, y, Rgb([255, 255, 0]));
            }
        }
        let m = BackgroundModel::fit(&img);
        assert_coef(&m.coef, &want, 1e-2);
    }

    #[test]
    fn model_measures_the_noise_sigma() {
        let mut img = uniform(64, 64, [128, 128, 128]);
        add_noise(&mut img, 6.0, 3);
        let m = BackgroundModel::fit(&img);
        assert!((m.noise - 6.0).abs() < 0.9, "noise {}", m.noise);
        assert!(dist3(m.at(32, 32), [128.0; 3]) < 2.0);
    }

    #[test]
    fn plane_fit_is_none_when_degenerate() {
        let pts = vec![(0.1, 0.2, [1.0, 2.0, 3.0]); 5];
        assert_eq!(plane_fit(&pts, &[true; 5]), None);
        let pts = vec![(0.0, 0.0, [1.0; 3]), (1.0, 0.0, [2.0; 3]), (0.0, 1.0, [3.0; 3])];
        assert_eq!(plane_fit(&pts, &[false; 3]), None);
        let c = plane_fit(&pts, &[true; 3]).unwrap();
        assert_coef(&c, &[[1.0, 1.0, 2.0]; 3], 1e-5);
    }

    #[test]
    fn working_colours_average_only_when_noisy() {
        let mut img = uniform(5, 5, [0, 0, 0]);
        img.put_pixel(2, 2, Rgb([255, 90, 9]));
        img.put_pixel(0, 0, Rgb([255, 255, 255]));
        let raw = working_colors(&img, 4.0);
        assert_eq!(raw[2 * 5 + 2], [255.0, 90.0, 9.0]);
        assert_eq!(raw[1], [0.0; 3]);
        let mean = working_colors(&img, 4.5);
        assert_eq!(mean[2 * 5 + 2], [255.0 / 9.0, 10.0, 1.0]);
        assert_eq!(mean[3 * 5 + 3], [255.0 / 9.0, 10.0, 1.0]);
        assert_eq!(mean[4 * 5 + 4], [0.0; 3]);
        // The corner's window holds 4 pixels and (1, 0)'s 6, the white corner among them;
        // (1, 1)'s holds both bright pixels.
        assert_eq!(mean[0], [255.0 / 4.0; 3]);
        assert_eq!(mean[1], [255.0 / 6.0, 255.0 / 6.0, 255.0 / 6.0]);
        assert_eq!(mean[5 + 1], [510.0 / 9.0, 345.0 / 9.0, 264.0 / 9.0]);
    }

    #[test]
    fn threshold_is_clamped_to_40_and_70() {
        assert_eq!(foreground_threshold(&uniform(32, 32, [200, 10, 10])), 40.0);
        let mut img = uniform(64, 64, [128, 128, 128]);
        add_noise(&mut img, 100.0, 5);
        assert_eq!(foreground_threshold(&img), 70.0);
    }

    #[test]
    fn threshold_between_the_clamps_follows_the_noise() {
        // Noise sigma 36 is averaged over 3x3 to about 12; the 90th percentile of the distance
        // of N(0, 12^2 I_3) from its centre is 2.50 * 12 = 30, doubled: about 60 (a little
        // more from the image edges, whose windows are smaller).
        let mut img = uniform(64, 64, [128, 128, 128]);
        add_noise(&mut img, 36.0, 7);
        let t = foreground_threshold(&img);
        assert!((55.0..68.0).contains(&t), "threshold {t}");
    }
}
