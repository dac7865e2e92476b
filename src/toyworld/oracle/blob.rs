//! A found object: its pixels with their colours and depths (distance to the blob's edge), its
//! box and centroid. The rest of the oracle (shape fits, named colours, appearance descriptors)
//! reads objects only through this type, whether they came from [`segment`](fn@super::segment) or
//! from a ground-truth mask.

use super::distance::edt;
use super::shape::{fit_pixels_blurred, ShapeFit};
use image::{GrayImage, RgbImage};

/// One detected object region.
#[derive(Clone, Debug)]
pub struct Blob {
    /// Size of the image the blob was found in.
    pub width: u32,
    pub height: u32,
    /// Row-major pixel indices (`y * width + x`), ascending.
    pub pixels: Vec<usize>,
    /// The image's RGB colour at each pixel of `pixels`, 0-255.
    pub colors: Vec<[f32; 3]>,
    /// Each pixel's Euclidean distance (px) to the nearest pixel outside the blob: 1 on its
    /// edge, larger inside.
    pub depth: Vec<f32>,
    /// `[x0, y0, x1, y1]`, x1 and y1 exclusive.
    pub bbox: [u32; 4],
    /// Centroid in image coordinates (pixel centres at `x + 0.5`).
    pub centroid: [f32; 2],
}

impl Blob {
    /// A blob from a set of pixels of `img` (duplicates and order do not matter). `None` when
    /// the set is empty.
    pub fn from_pixels(img: &RgbImage, pixels: &[usize]) -> Option<Blob> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut mask = vec![false; w * h];
        for &p in pixels {
            mask[p] = true;
        }
        let pixels: Vec<usize> = (0..w * h).filter(|&p| mask[p]).collect();
        if pixels.is_empty() {
            return None;
        }
        let dist = edt(&mask, w, h);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let (mut cx, mut cy) = (0f32, 0f32);
        let raw = img.as_raw();
        let mut colors = Vec::with_capacity(pixels.len());
        for &p in &pixels {
            let (x, y) = (p % w, p / w);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
            cx += x as f32 + 0.5;
            cy += y as f32 + 0.5;
            colors.push([raw[3 * p] as f32, raw[3 * p + 1] as f32, raw[3 * p + 2] as f32]);
        }
        let n = pixels.len() as f32;
        Some(Blob {
            width: w as u32,
            height: h as u32,
            depth: pixels.iter().map(|&p| dist[p]).collect(),
            colors,
            pixels,
            bbox: [x0 as u32, y0 as u32, x1 as u32, y1 as u32],
            centroid: [cx / n, cy / n],
        })
    }

    /// A blob from a mask image (nonzero = inside), e.g. a ground-truth mask of
    /// [`render`](crate::toyworld::render).
    pub fn from_mask(img: &RgbImage, mask: &GrayImage) -> Option<Blob> {
        assert_eq!(img.dimensions(), mask.dimensions(), "image and mask sizes differ");
        let pixels: Vec<usize> = mask.as_raw().iter().enumerate().filter(|(_, &m)| m > 0).map(|(i, _)| i).collect();
        Blob::from_pixels(img, &pixels)
    }

    pub fn area(&self) -> usize {
        self.pixels.len()
    }

    /// The blob as a full-image boolean mask.
    pub fn mask(&self) -> Vec<bool> {
        let mut m = vec![false; (self.width * self.height) as usize];
        for &p in &self.pixels {
            m[p] = true;
        }
        m
    }

    /// The blob as a mask image (255 inside).
    pub fn mask_image(&self) -> GrayImage {
        let mut g = GrayImage::new(self.width, self.height);
        for &p in &self.pixels {
            g.as_mut()[p] = 255;
        }
        g
    }

    /// Indices of the pixels at least 2.5 px inside (free of blur's mixing with the
    /// background), or [`Blob::core`] when fewer than 30.
    pub fn deep_core(&self) -> Vec<usize> {
        let deep: Vec<usize> = (0..self.pixels.len()).filter(|&i| self.depth[i] > 2.5).collect();
        if deep.len() >= 30 {
            deep
        } else {
            self.core()
        }
    }

    /// Shape fit against every class.
    pub fn shape_fit(&self) -> ShapeFit {
        let blur: f32 = std::env::var("ORACLE_BLUR").ok().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let (w, h) = (self.width as usize, self.height as usize);
        fit_pixels_blurred(&self.mask(), w, h, &self.pixels, blur)
    }

    /// Indices (into `pixels`) of the blob's core: pixels off its anti-aliased edge
    /// (depth > 1.5), or all pixels when the core would hold fewer than 12.
    pub fn core(&self) -> Vec<usize> {
        let core: Vec<usize> = (0..self.pixels.len()).filter(|&i| self.depth[i] > 1.5).collect();
        if core.len() >= 12 {
            core
        } else {
            (0..self.pixels.len()).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toyworld::Class;
    use image::{Luma, Rgb};

    /// A `side` x `side` square at (1, 1) of a `(side + 2)`-pixel image, colour by position.
    fn square(side: usize) -> (RgbImage, Vec<usize>) {
        let n = side + 2;
        let img = RgbImage::from_fn(n as u32, n as u32, |x, y| Rgb([x as u8 * 10, y as u8 * 10, 7]));
        let px = (0..n * n).filter(|p| (1..=side).contains(&(p % n)) && (1..=side).contains(&(p / n))).collect();
        (img, px)
    }

    #[test]
    fn from_pixels_measures_box_centroid_colours_and_depth() {
        let img = RgbImage::from_fn(8, 5, |x, y| Rgb([x as u8, y as u8, 200]));
        let w = 8;
        // A 3x2 rectangle at x 2..5, y 1..3, given out of order and with a duplicate.
        let given = [2 * w + 4, w + 2, w + 3, w + 4, 2 * w + 2, 2 * w + 3, w + 3];
        let b = Blob::from_pixels(&img, &given).unwrap();
        assert_eq!(b.pixels, vec![w + 2, w + 3, w + 4, 2 * w + 2, 2 * w + 3, 2 * w + 4]);
        assert_eq!((b.width, b.height, b.area()), (8, 5, 6));
        assert_eq!(b.bbox, [2, 1, 5, 3]);
        assert_eq!(b.centroid, [3.5, 2.0]);
        assert_eq!(b.colors[0], [2.0, 1.0, 200.0]);
        assert_eq!(b.colors[5], [4.0, 2.0, 200.0]);
        assert!(b.depth.iter().all(|&d| d == 1.0), "a 2-px-tall rectangle is all edge");
        assert!(Blob::from_pixels(&img, &[]).is_none());
    }

    #[test]
    fn from_mask_equals_from_pixels_and_round_trips() {
        let (img, px) = square(6);
        let mut mask = GrayImage::new(8, 8);
        for &p in &px {
            mask.put_pixel((p % 8) as u32, (p / 8) as u32, Luma([1 + (p % 3) as u8]));
        }
        let a = Blob::from_mask(&img, &mask).unwrap();
        let b = Blob::from_pixels(&img, &px).unwrap();
        assert_eq!((a.pixels.clone(), a.colors.clone(), a.depth.clone()), (b.pixels.clone(), b.colors.clone(), b.depth.clone()));
        let m = a.mask_image();
        assert!(m.as_raw().iter().zip(mask.as_raw()).all(|(&x, &y)| (x == 255) == (y > 0) && (x == 0 || x == 255)));
        assert_eq!(a.mask().iter().filter(|&&v| v).count(), 36);
        assert!(Blob::from_mask(&img, &GrayImage::new(8, 8)).is_none());
    }

    #[test]
    fn core_is_off_the_edge_with_fallbacks() {
        // 9x9 square: depth > 1.5 leaves the inner 7x7 (49 >= 12); depth > 2.5 the inner 5x5,
        // under 30, so the deep core falls back to the core.
        let (img, px) = square(9);
        let b = Blob::from_pixels(&img, &px).unwrap();
        let core = b.core();
        assert_eq!(core.len(), 49);
        assert!(core.iter().all(|&i| {
            let (x, y) = (b.pixels[i] % 11, b.pixels[i] / 11);
            (2..=8).contains(&x) && (2..=8).contains(&y)
        }));
        assert_eq!(b.deep_core(), core);
        // 11x11: the deep core is the inner 7x7.
        let (img, px) = square(11);
        let b = Blob::from_pixels(&img, &px).unwrap();
        assert_eq!(b.core().len(), 81);
        assert_eq!(b.deep_core().len(), 49);
        // 3x3: one core pixel, under 12, so every pixel.
        let (img, px) = square(3);
        let b = Blob::from_pixels(&img, &px).unwrap();
        assert_eq!(b.core(), (0..9).collect::<Vec<_>>());
        assert_eq!(b.deep_core(), (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn a_disc_fits_the_ball_class() {
        let img = RgbImage::new(40, 40);
        let px: Vec<usize> =
            (0..1600).filter(|p| ((p % 40) as f32 - 19.5).powi(2) + ((p / 40) as f32 - 19.5).powi(2) <= 144.0).collect();
        let b = Blob::from_pixels(&img, &px).unwrap();
        let (class, iou, _) = b.shape_fit().best();
        assert_eq!(class, Class::Ball);
        assert!(iou > 0.9, "iou {iou}");
    }
}
