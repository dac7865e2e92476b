//! Background estimation and object segmentation.

use super::appearance::srgb_to_lab;
use super::shape::{fit_set, ShapeFit};
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
        super::shape::fit_pixels_blurred(&self.mask(), w, h, &self.pixels, blur)
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

/// Segmentation settings; [`Default`] is what [`segment`] uses.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    /// RGB distance from the background model above which a pixel is foreground; `None`:
    /// adaptive, [`foreground_threshold`].
    pub threshold: Option<f32>,
    /// Smallest blob kept, as a fraction of the image area (default 0.004: 16 px at 64x64).
    pub min_area_fraction: f32,
    /// Split touching objects at narrow necks of the distance transform.
    pub split: bool,
    /// Merge nearby fragments when the union fits a shape better.
    pub merge: bool,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions { threshold: None, min_area_fraction: 0.004, split: true, merge: true }
    }
}

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

fn dist3(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
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
fn working_colors(img: &RgbImage, noise: f32) -> Vec<[f32; 3]> {
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

fn threshold_for(img: &RgbImage, model: &BackgroundModel, colors: &[[f32; 3]]) -> f32 {
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

/// Exact Euclidean distance transform: for each `true` pixel, the distance to the nearest
/// `false` pixel, the outside of the image counting as `false` (so edge pixels get 1).
pub(super) fn edt(mask: &[bool], w: usize, h: usize) -> Vec<f32> {
    let (pw, ph) = (w + 2, h + 2);
    const INF: f64 = 1e12;
    let mut f = vec![0f64; pw * ph];
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] {
                f[(y + 1) * pw + x + 1] = INF;
            }
        }
    }
    let mut col = vec![0f64; pw.max(ph)];
    let mut out = vec![0f64; pw.max(ph)];
    for x in 0..pw {
        for y in 0..ph {
            col[y] = f[y * pw + x];
        }
        dt1d(&col[..ph], &mut out[..ph]);
        for y in 0..ph {
            f[y * pw + x] = out[y];
        }
    }
    for y in 0..ph {
        col[..pw].copy_from_slice(&f[y * pw..(y + 1) * pw]);
        dt1d(&col[..pw], &mut out[..pw]);
        f[y * pw..(y + 1) * pw].copy_from_slice(&out[..pw]);
    }
    let mut d = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            d[y * w + x] = f[(y + 1) * pw + x + 1].sqrt() as f32;
        }
    }
    d
}

/// Felzenszwalb-Huttenlocher 1-D squared distance transform.
fn dt1d(f: &[f64], d: &mut [f64]) {
    let n = f.len();
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0usize;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        loop {
            let p = v[k];
            let s = ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * q as f64 - 2.0 * p as f64);
            if s <= z[k] && k > 0 {
                k -= 1;
                continue;
            }
            if s <= z[k] {
                // k == 0: replace the first parabola.
                v[0] = q;
                z[1] = f64::INFINITY;
                break;
            }
            k += 1;
            v[k] = q;
            z[k] = s;
            z[k + 1] = f64::INFINITY;
            break;
        }
    }
    k = 0;
    for q in 0..n {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        d[q] = ((q as f64 - p as f64).powi(2)) + f[p];
    }
}

/// Connected components (8-connectivity) of `mask`, each a sorted list of pixel indices.
pub(super) fn components(mask: &[bool], w: usize, h: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    for start in 0..w * h {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut comp = Vec::new();
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(p) = stack.pop() {
            comp.push(p);
            let (x, y) = ((p % w) as i64, (p / w) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let q = ny as usize * w + nx as usize;
                    if mask[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        comp.sort_unstable();
        out.push(comp);
    }
    out
}

/// Cuts rings out of a part: a round hole (the only class with one) of radius `r_h` gives a
/// ring centred on it with outer radius `r_h / 0.52`; when the part's pixels beyond that radius
/// (plus 1.5 px) form a piece of at least `min_area` and a quarter of the ring, they are
/// another object touching the ring. Repeats for every round hole.
fn split_rings(part: &[usize], w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    let mut inside = vec![false; w * h];
    for &p in part {
        inside[p] = true;
    }
    let mut holes: Vec<Vec<usize>> = enclosed_regions(&inside, w, h).into_iter().filter(|r| r.len() >= 12).collect();
    holes.sort_by_key(|r| std::cmp::Reverse(r.len()));
    let mut rest: Vec<usize> = part.to_vec();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for hole in holes {
        let n = hole.len() as f32;
        let (mut cx, mut cy) = (0f32, 0f32);
        for &p in &hole {
            cx += (p % w) as f32 + 0.5;
            cy += (p / w) as f32 + 0.5;
        }
        cx /= n;
        cy /= n;
        let rh = (n / std::f32::consts::PI).sqrt();
        let far = hole
            .iter()
            .map(|&p| (((p % w) as f32 + 0.5 - cx).powi(2) + ((p / w) as f32 + 0.5 - cy).powi(2)).sqrt())
            .fold(0f32, f32::max);
        if far > 1.6 * rh + 1.0 {
            continue; // not round: background enclosed between objects
        }
        let r = rh / 0.52 + 1.5;
        let dist = |p: usize| (((p % w) as f32 + 0.5 - cx).powi(2) + ((p / w) as f32 + 0.5 - cy).powi(2)).sqrt();
        let (ring, beyond): (Vec<usize>, Vec<usize>) = rest.iter().partition(|&&p| dist(p) <= r);
        let mut mask = vec![false; w * h];
        for &p in &beyond {
            mask[p] = true;
        }
        let pieces = components(&mask, w, h);
        let big: Vec<&Vec<usize>> =
            pieces.iter().filter(|c| c.len() >= min_area && c.len() * 4 >= ring.len()).collect();
        if big.is_empty() {
            continue;
        }
        // Small pieces beyond the radius stay with the ring.
        let mut ring = ring;
        let mut others: Vec<usize> = Vec::new();
        for c in &pieces {
            if big.iter().any(|b| std::ptr::eq(*b, c)) {
                others.extend(c);
            } else {
                ring.extend(c);
            }
        }
        ring.sort_unstable();
        others.sort_unstable();
        out.push(ring);
        rest = others;
    }
    if !rest.is_empty() {
        let mut mask = vec![false; w * h];
        for &p in &rest {
            mask[p] = true;
        }
        if out.is_empty() {
            out.push(rest);
        } else {
            out.extend(components(&mask, w, h));
        }
    }
    out
}

/// The 4-connected neighbours of pixel `p` in a `w` x `h` image.
fn neighbours4(p: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (p % w, p / w);
    [(x > 0).then(|| p - 1), (x + 1 < w).then(|| p + 1), (y > 0).then(|| p - w), (y + 1 < h).then(|| p + w)].into_iter().flatten()
}

/// The background regions (4-connected) enclosed by `inside`: not touching the image border.
fn enclosed_regions(inside: &[bool], w: usize, h: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    for start in 0..w * h {
        if inside[start] || seen[start] {
            continue;
        }
        let mut region = Vec::new();
        let mut touches_border = false;
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(p) = stack.pop() {
            region.push(p);
            let (x, y) = (p % w, p / w);
            if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                touches_border = true;
            }
            for q in neighbours4(p, w, h) {
                if !inside[q] && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            }
        }
        if !touches_border {
            out.push(region);
        }
    }
    out
}

/// Fills background holes of a component that are smaller than `max_hole` pixels (noise);
/// large holes (a ring's) stay. Returns the filled pixel set.
fn fill_small_holes(comp: &[usize], w: usize, h: usize, max_hole: usize) -> Vec<usize> {
    let mut inside = vec![false; w * h];
    for &p in comp {
        inside[p] = true;
    }
    let mut filled = comp.to_vec();
    for hole in enclosed_regions(&inside, w, h) {
        if hole.len() < max_hole {
            filled.extend(hole);
        }
    }
    filled.sort_unstable();
    filled
}

/// A region of the over-segmentation of a component.
struct Region {
    pixels: Vec<usize>,
    peak: f32,
}

/// Over-segments a component into the basins of the maxima of its distance transform that
/// are separated by a saddle lower than `ratio` times the lower peak (peaks of at least
/// `min_peak` px); returns the regions and, for each adjacent pair, the saddle height.
fn basins(comp: &[usize], w: usize, h: usize, ratio: f32, min_peak: f32) -> (Vec<Region>, Vec<(usize, usize, f32)>) {
    let mut mask = vec![false; w * h];
    for &p in comp {
        mask[p] = true;
    }
    let d = edt(&mask, w, h);
    let mut order: Vec<usize> = comp.to_vec();
    order.sort_by(|&a, &b| d[b].total_cmp(&d[a]).then(a.cmp(&b)));
    // Union-find over pixel labels.
    let mut parent: Vec<usize> = (0..w * h).collect();
    let mut peak = vec![0f32; w * h];
    let mut done = vec![false; w * h];
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    // Pairs of roots kept apart, with their saddle (the highest pixel where they met).
    let mut apart: Vec<(usize, usize, f32)> = Vec::new();
    for &p in &order {
        let level = d[p];
        let (x, y) = ((p % w) as i64, (p / w) as i64);
        let mut roots: Vec<usize> = Vec::new();
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (nx, ny) = (x + dx, y + dy);
                if (dx, dy) == (0, 0) || nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                    continue;
                }
                let q = ny as usize * w + nx as usize;
                if done[q] {
                    let r = find(&mut parent, q);
                    if !roots.contains(&r) {
                        roots.push(r);
                    }
                }
            }
        }
        done[p] = true;
        if roots.is_empty() {
            peak[p] = level;
            continue;
        }
        // Highest peak first; merge the others into it when their separation is shallow.
        roots.sort_by(|&a, &b| peak[b].total_cmp(&peak[a]));
        let main = roots[0];
        parent[p] = main;
        for &r in &roots[1..] {
            let low = peak[r].min(peak[main]);
            let shallow = low < min_peak || level >= ratio * low;
            let (ra, rb) = (find(&mut parent, main), find(&mut parent, r));
            if ra == rb {
                continue;
            }
            if shallow {
                parent[rb] = ra;
                peak[ra] = peak[ra].max(peak[rb]);
            } else {
                apart.push((ra, rb, level));
            }
        }
    }
    // Collect regions.
    let mut index = std::collections::HashMap::new();
    let mut regions: Vec<Region> = Vec::new();
    for &p in comp {
        let r = find(&mut parent, p);
        let k = *index.entry(r).or_insert_with(|| {
            regions.push(Region { pixels: Vec::new(), peak: peak[r] });
            regions.len() - 1
        });
        regions[k].pixels.push(p);
    }
    let mut pairs: Vec<(usize, usize, f32)> = Vec::new();
    for (a, b, level) in apart {
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra == rb {
            continue;
        }
        let (ia, ib) = (index[&ra], index[&rb]);
        let key = (ia.min(ib), ia.max(ib));
        match pairs.iter_mut().find(|q| (q.0, q.1) == key) {
            Some(q) => q.2 = q.2.max(level),
            None => pairs.push((key.0, key.1, level)),
        }
    }
    (regions, pairs)
}

/// Area-weighted best IoU of a set of parts.
fn parts_fit(w: usize, h: usize, parts: &[&[usize]]) -> f32 {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    parts.iter().map(|p| fit_set(w, h, p).best().1 * p.len() as f32).sum::<f32>() / total.max(1) as f32
}

/// Splits a component into objects: basins separated by a deep saddle (below 0.5 of the lower
/// peak) are separate; shallower ones (below 0.85) only when both parts fit a shape well
/// (IoU >= 0.75) and better than their union (by 0.05).
fn split_geometric(comp: &[usize], w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    let (regions, mut pairs) = basins(comp, w, h, 0.85, 2.5);
    if regions.len() == 1 {
        return vec![comp.to_vec()];
    }
    let mut groups: Vec<Option<Vec<usize>>> = regions.iter().map(|r| Some(r.pixels.clone())).collect();
    let mut peaks: Vec<f32> = regions.iter().map(|r| r.peak).collect();
    // Shallowest separations first.
    let mut kept_apart: Vec<(usize, usize)> = Vec::new();
    loop {
        let best = pairs
            .iter()
            .enumerate()
            .filter(|(_, &(a, b, _))| a != b && !kept_apart.contains(&(a.min(b), a.max(b))))
            .map(|(k, &(a, b, s))| (k, s / peaks[a].min(peaks[b])))
            .max_by(|x, y| x.1.total_cmp(&y.1));
        let Some((k, ratio)) = best else { break };
        let (a, b, _) = pairs[k];
        let (ga, gb) = (groups[a].as_ref().unwrap(), groups[b].as_ref().unwrap());
        let mut union: Vec<usize> = ga.iter().chain(gb.iter()).copied().collect();
        union.sort_unstable();
        let big_enough = ga.len() >= min_area && gb.len() >= min_area;
        let separate = big_enough
            && (ratio < 0.5 || {
                let whole = fit_set(w, h, &union).best().1;
                let (fa, fb) = (fit_set(w, h, ga).best().1, fit_set(w, h, gb).best().1);
                let parts = (fa * ga.len() as f32 + fb * gb.len() as f32) / union.len() as f32;
                fa >= 0.75 && fb >= 0.75 && parts >= whole + 0.05
            });
        if separate {
            kept_apart.push((a.min(b), a.max(b)));
            continue;
        }
        groups[a] = Some(union);
        groups[b] = None;
        peaks[a] = peaks[a].max(peaks[b]);
        for q in pairs.iter_mut() {
            if q.0 == b {
                q.0 = a;
            }
            if q.1 == b {
                q.1 = a;
            }
        }
        // Keep the highest saddle per pair.
        let mut merged: Vec<(usize, usize, f32)> = Vec::new();
        for &(x, y, s) in pairs.iter().filter(|q| q.0 != q.1) {
            let key = (x.min(y), x.max(y));
            match merged.iter_mut().find(|m| (m.0, m.1) == key) {
                Some(m) => m.2 = m.2.max(s),
                None => merged.push((key.0, key.1, s)),
            }
        }
        pairs = merged;
        kept_apart.retain(|&(x, y)| x != b && y != b);
    }
    groups.into_iter().flatten().collect()
}

/// Clusters Lab colours: k-means seeded by farthest points (up to 6 centres at least 20 apart),
/// then centres closer than 12 are merged and clusters with under 3% of the points dissolved.
/// Returns the centres.
fn tone_centres(points: &[[f32; 3]]) -> Vec<[f32; 3]> {
    let d = |a: [f32; 3], b: [f32; 3]| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt();
    let n = points.len();
    let mean = [0, 1, 2].map(|c| points.iter().map(|p| p[c]).sum::<f32>() / n as f32);
    let mut centres: Vec<[f32; 3]> = Vec::new();
    let mut near: Vec<f32> = points.iter().map(|&p| d(p, mean) * 0.5).collect();
    while centres.len() < 6 {
        let (k, &far) = near.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        if far < 20.0 && !centres.is_empty() {
            break;
        }
        let c = points[k];
        centres.push(c);
        for (m, &p) in near.iter_mut().zip(points) {
            *m = m.min(d(p, c));
        }
        if centres.len() == 1 {
            near = points.iter().map(|&p| d(p, c)).collect();
        }
    }
    let min_count = ((0.03 * n as f32) as usize).max(4);
    for round in 0..16 {
        let labels: Vec<usize> = points
            .iter()
            .map(|&p| (0..centres.len()).min_by(|&a, &b| d(p, centres[a]).total_cmp(&d(p, centres[b]))).unwrap())
            .collect();
        let mut sums = vec![[0f32; 3]; centres.len()];
        let mut counts = vec![0usize; centres.len()];
        for (&l, p) in labels.iter().zip(points) {
            counts[l] += 1;
            for c in 0..3 {
                sums[l][c] += p[c];
            }
        }
        let mut next: Vec<[f32; 3]> = Vec::new();
        let mut next_counts: Vec<usize> = Vec::new();
        for k in 0..centres.len() {
            if counts[k] == 0 || (round >= 4 && counts[k] < min_count) {
                continue;
            }
            let c = sums[k].map(|s| s / counts[k] as f32);
            match next.iter().position(|&o| round >= 4 && d(o, c) < 12.0) {
                Some(j) => {
                    let (a, b) = (next_counts[j] as f32, counts[k] as f32);
                    next[j] = [0, 1, 2].map(|i| (next[j][i] * a + c[i] * b) / (a + b));
                    next_counts[j] += counts[k];
                }
                None => {
                    next.push(c);
                    next_counts.push(counts[k]);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        centres = next;
    }
    centres
}

/// Tone groups touching along at least this share of the smaller one's perimeter are one
/// object; from MERGE_RATIO_LOW up, only when their union fits a shape as well as they do apart.
const MERGE_RATIO_HIGH: f32 = 0.5;
const MERGE_RATIO_LOW: f32 = 0.2;

/// Splits a component by colour: its core pixels (off the anti-aliased edge) are clustered
/// into tones; tones that touch along a large share of the smaller one's perimeter (at least
/// 20%: the two tones of one patterned object) form one group; each group's connected pieces
/// are candidate objects (edge pixels join the group of the nearest core pixel). Adjacent
/// candidates whose union fits a shape clearly better (by 0.05) are merged back.
fn split_by_colour(comp: &[usize], lab: &[[f32; 3]], w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    let mut inside = vec![false; w * h];
    for &p in comp {
        inside[p] = true;
    }
    let depth = edt(&inside, w, h);
    let core: Vec<usize> = comp.iter().copied().filter(|&p| depth[p] > 1.5).collect();
    if core.len() < 40 {
        return vec![comp.to_vec()];
    }
    let points: Vec<[f32; 3]> = core.iter().map(|&p| lab[p]).collect();
    let centres = tone_centres(&points);
    if centres.len() < 2 {
        return vec![comp.to_vec()];
    }
    let d = |a: [f32; 3], b: [f32; 3]| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt();
    const NONE: usize = usize::MAX;
    let mut tone = vec![NONE; w * h];
    for &p in &core {
        tone[p] = (0..centres.len()).min_by(|&a, &b| d(lab[p], centres[a]).total_cmp(&d(lab[p], centres[b]))).unwrap();
    }
    let k = centres.len();
    // Thin clusters (most of their pixels next to another cluster: mixtures along contact lines,
    // blurred edges, intermediate shades of a blurred pattern) take the tone of the nearest
    // solid cluster, so they neither bridge two objects nor separate one object's tones.
    let mut count = vec![0usize; k];
    let mut rim = vec![0usize; k];
    for &p in &core {
        let (x, y) = (p % w, p / w);
        let nbrs = [(x > 0).then(|| p - 1), (x + 1 < w).then(|| p + 1), (y > 0).then(|| p - w), (y + 1 < h).then(|| p + w)];
        count[tone[p]] += 1;
        if nbrs.iter().flatten().any(|&q| tone[q] != NONE && tone[q] != tone[p]) {
            rim[tone[p]] += 1;
        }
    }
    let thin: Vec<bool> = (0..k).map(|i| rim[i] as f32 > 0.75 * count[i] as f32).collect();
    if thin.iter().any(|&t| !t) && thin.iter().any(|&t| t) {
        let mut queue = std::collections::VecDeque::new();
        let mut pending = vec![false; w * h];
        for &p in &core {
            if thin[tone[p]] {
                pending[p] = true;
            } else {
                queue.push_back(p);
            }
        }
        while let Some(p) = queue.pop_front() {
            for q in neighbours4(p, w, h) {
                if pending[q] {
                    pending[q] = false;
                    tone[q] = tone[p];
                    queue.push_back(q);
                }
            }
        }
    }
    // Agglomerative: repeatedly merge the two tone groups that touch along the largest share of
    // the smaller one's perimeter, while that share is at least 20% (noise splitting one tone
    // into interleaved clusters is merged first, then the tones of one pattern).
    let mut group: Vec<usize> = (0..k).collect();
    let mut rejected: Vec<(usize, usize)> = Vec::new();
    loop {
        let mut contact = vec![vec![0usize; k]; k];
        let mut perimeter = vec![0usize; k];
        for &p in &core {
            let gp = group[tone[p]];
            let (x, y) = (p % w, p / w);
            let nbrs = [(x > 0).then(|| p - 1), (x + 1 < w).then(|| p + 1), (y > 0).then(|| p - w), (y + 1 < h).then(|| p + w)];
            for q in nbrs {
                let gq = q.map(|q| tone[q]).map(|t| if t == NONE { NONE } else { group[t] }).unwrap_or(NONE);
                if gq != gp {
                    perimeter[gp] += 1;
                    if gq != NONE {
                        contact[gp][gq] += 1;
                    }
                }
            }
        }
        let mut cands: Vec<(usize, usize, f32)> = Vec::new();
        for i in 0..k {
            for j in i + 1..k {
                let c = contact[i][j];
                if c == 0 || rejected.contains(&(i, j)) {
                    continue;
                }
                let ratio = c as f32 / perimeter[i].min(perimeter[j]).max(1) as f32;
                if ratio >= MERGE_RATIO_LOW {
                    cands.push((i, j, ratio));
                }
            }
        }
        cands.sort_by(|x, y| y.2.total_cmp(&x.2));
        let mut merged = None;
        for (i, j, ratio) in cands {
            // Interleaved tones are one object; a shorter contact needs the shape evidence:
            // the union must fit a shape about as well as the two groups apart.
            let ok = ratio >= MERGE_RATIO_HIGH || {
                let gi: Vec<usize> = core.iter().copied().filter(|&p| group[tone[p]] == i).collect();
                let gj: Vec<usize> = core.iter().copied().filter(|&p| group[tone[p]] == j).collect();
                let mut union: Vec<usize> = gi.iter().chain(gj.iter()).copied().collect();
                union.sort_unstable();
                fit_set(w, h, &union).best().1 + 0.02 >= parts_fit(w, h, &[&gi, &gj])
            };
            if ok {
                merged = Some((i, j));
                break;
            }
            rejected.push((i, j));
        }
        let Some((i, j)) = merged else { break };
        for g in group.iter_mut() {
            if *g == j {
                *g = i;
            }
        }
        rejected.retain(|&(x, y)| x != i && y != i && x != j && y != j);
    }
    let groups = group;
    if groups.iter().all(|&g| g == groups[0]) {
        return vec![comp.to_vec()];
    }
    // Group label of every pixel: core by colour, the rest from the nearest core pixel (BFS).
    let mut label = vec![NONE; w * h];
    let mut queue = std::collections::VecDeque::new();
    for &p in &core {
        label[p] = groups[tone[p]];
        queue.push_back(p);
    }
    while let Some(p) = queue.pop_front() {
        for q in neighbours4(p, w, h) {
            if inside[q] && label[q] == NONE {
                label[q] = label[p];
                queue.push_back(q);
            }
        }
    }
    // Pieces: connected components of each group.
    let mut parts: Vec<Vec<usize>> = Vec::new();
    let mut gids: Vec<usize> = groups.clone();
    gids.sort_unstable();
    gids.dedup();
    for g in gids {
        let m: Vec<bool> = (0..w * h).map(|p| inside[p] && label[p] == g).collect();
        parts.extend(components(&m, w, h));
    }
    merge_adjacent(parts, w, h, min_area)
}

/// Merges adjacent parts: a part under `min_area` joins the neighbour it touches most; two
/// parts merge when their union fits a shape better than they do apart by 0.05.
fn merge_adjacent(mut parts: Vec<Vec<usize>>, w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    loop {
        let mut owner = vec![usize::MAX; w * h];
        for (k, part) in parts.iter().enumerate() {
            for &p in part {
                owner[p] = k;
            }
        }
        let n = parts.len();
        let mut touch = vec![vec![0usize; n]; n];
        for (k, part) in parts.iter().enumerate() {
            for &p in part {
                for q in neighbours4(p, w, h) {
                    let o = owner[q];
                    if o != usize::MAX && o != k {
                        touch[k][o] += 1;
                    }
                }
            }
        }
        // Smallest part under min_area first.
        let small = (0..n).filter(|&k| parts[k].len() < min_area).min_by_key(|&k| parts[k].len());
        let pair = if let Some(k) = small {
            (0..n).filter(|&o| touch[k][o] > 0).max_by_key(|&o| touch[k][o]).map(|o| (o, k))
        } else {
            let mut best: Option<(usize, usize, f32)> = None;
            for a in 0..n {
                for b in a + 1..n {
                    if touch[a][b] == 0 {
                        continue;
                    }
                    let mut union: Vec<usize> = parts[a].iter().chain(parts[b].iter()).copied().collect();
                    union.sort_unstable();
                    let gain = fit_set(w, h, &union).best().1 - parts_fit(w, h, &[&parts[a], &parts[b]]);
                    if gain > 0.05 && best.is_none_or(|x| gain > x.2) {
                        best = Some((a, b, gain));
                    }
                }
            }
            best.map(|(a, b, _)| (a, b))
        };
        let Some((a, b)) = pair else { break };
        let (a, b) = (a.min(b), a.max(b));
        let pb = parts.remove(b);
        parts[a].extend(pb);
        parts[a].sort_unstable();
    }
    parts
}

/// Finds the objects of an image with [`SegmentOptions::default`]: see [`segment_with`].
pub fn segment(img: &RgbImage) -> Vec<Blob> {
    segment_with(img, &SegmentOptions::default())
}

/// Finds the objects of an image: pixels farther than a threshold from the image's own
/// background ([`estimate_background`]) are foreground; its 8-connected components, with
/// small holes filled, are split at narrow necks of their distance transform (touching
/// objects), nearby fragments are merged when their union fits a shape better, and blobs
/// smaller than [`SegmentOptions::min_area_fraction`] are dropped. Blobs come in reading order
/// of their centroids (top to bottom, then left to right, by rows of 8 px).
pub fn segment_with(img: &RgbImage, opts: &SegmentOptions) -> Vec<Blob> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let model = BackgroundModel::fit(img);
    let colors = working_colors(img, model.noise);
    let bg: Vec<[f32; 3]> = (0..w * h).map(|p| model.at(p % w, p / w)).collect();
    let t = opts.threshold.unwrap_or_else(|| threshold_for(img, &model, &colors));
    let raw = img.as_raw();
    let fg: Vec<bool> = (0..w * h).map(|p| dist3(colors[p], bg[p]) > t).collect();
    let lab: Vec<[f32; 3]> = (0..w * h)
        .map(|p| srgb_to_lab([raw[3 * p] as f32, raw[3 * p + 1] as f32, raw[3 * p + 2] as f32]))
        .collect();
    let min_area = ((opts.min_area_fraction * (w * h) as f32).round() as usize).max(1);
    let mut parts: Vec<Vec<usize>> = Vec::new();
    for comp in components(&fg, w, h) {
        if comp.len() < min_area / 2 {
            continue;
        }
        // Noise pinholes only: larger holes are a ring's, or background enclosed by objects.
        let filled = fill_small_holes(&comp, w, h, 7);
        let sharp = refine_edges(&filled, &colors, &bg, w, h);
        if opts.split {
            for piece in split_by_colour(&sharp, &lab, w, h, min_area) {
                for piece in split_rings(&piece, w, h, min_area) {
                    parts.extend(split_geometric(&piece, w, h, min_area));
                }
            }
        } else {
            parts.push(sharp);
        }
    }
    if opts.merge {
        parts = merge_fragments(parts, w, h, min_area);
    }
    let mut blobs: Vec<Blob> =
        parts.into_iter().filter(|p| p.len() >= min_area).filter_map(|p| Blob::from_pixels(img, &p)).collect();
    blobs.sort_by(|a, b| {
        let ka = ((a.centroid[1] / 8.0).floor(), a.centroid[0]);
        let kb = ((b.centroid[1] / 8.0).floor(), b.centroid[0]);
        ka.partial_cmp(&kb).unwrap()
    });
    blobs
}

/// Sharpens a part's edge: a pixel within 2.5 px of the edge whose colour is a mixture of the
/// background and `o`, the colour of the nearest pixel deeper inside, stays only if it is at
/// least half object, `alpha = (p - bg).(o - bg) / |o - bg|^2 >= 0.5` (the coverage rule of
/// the renderer's masks); pixels far from that mixing line (another tone of a patterned
/// object) stay. Undoes the growth of a blurred high-contrast object thresholded at a low
/// distance.
fn refine_edges(part: &[usize], colors: &[[f32; 3]], bg: &[[f32; 3]], w: usize, h: usize) -> Vec<usize> {
    let mut inside = vec![false; w * h];
    for &p in part {
        inside[p] = true;
    }
    let depth = edt(&inside, w, h);
    const NONE: usize = usize::MAX;
    let mut source = vec![NONE; w * h];
    let mut queue = std::collections::VecDeque::new();
    for &p in part {
        if depth[p] >= 2.5 {
            source[p] = p;
            queue.push_back(p);
        }
    }
    if queue.len() < 8 {
        return part.to_vec();
    }
    while let Some(p) = queue.pop_front() {
        for q in neighbours4(p, w, h) {
            if inside[q] && source[q] == NONE {
                source[q] = source[p];
                queue.push_back(q);
            }
        }
    }
    let col = |p: usize| [colors[p][0] - bg[p][0], colors[p][1] - bg[p][1], colors[p][2] - bg[p][2]];
    let kept: Vec<usize> = part
        .iter()
        .copied()
        .filter(|&p| {
            if depth[p] >= 2.5 || source[p] == NONE {
                return true;
            }
            let (v, o) = (col(p), col(source[p]));
            let oo = o[0] * o[0] + o[1] * o[1] + o[2] * o[2];
            if oo < 1.0 {
                return true;
            }
            let t = (v[0] * o[0] + v[1] * o[1] + v[2] * o[2]) / oo;
            // Far from the background-to-o line: another tone of the object, not a mixture.
            let perp = [v[0] - t * o[0], v[1] - t * o[1], v[2] - t * o[2]];
            let perp2 = perp[0] * perp[0] + perp[1] * perp[1] + perp[2] * perp[2];
            t >= 0.5 || perp2 > 0.35f32.powi(2) * oo
        })
        .collect();
    if kept.len() * 2 < part.len() {
        part.to_vec()
    } else {
        kept
    }
}

/// Smallest distance (px) between two pixel sets.
fn gap(a: &[usize], b: &[usize], w: usize) -> f32 {
    let mut best = f32::MAX;
    for &p in a {
        let (px, py) = ((p % w) as f32, (p / w) as f32);
        for &q in b {
            let (qx, qy) = ((q % w) as f32, (q / w) as f32);
            best = best.min((px - qx).powi(2) + (py - qy).powi(2));
        }
    }
    best.sqrt()
}

/// Merges fragments: a part smaller than `min_area` joins its nearest neighbour within 3 px;
/// two parts within 3 px of each other merge when their union fits a shape better than they
/// do apart.
fn merge_fragments(mut parts: Vec<Vec<usize>>, w: usize, h: usize, min_area: usize) -> Vec<Vec<usize>> {
    loop {
        let mut best: Option<(usize, usize, f32)> = None;
        for i in 0..parts.len() {
            for j in i + 1..parts.len() {
                let g = gap(&parts[i], &parts[j], w);
                if g > 3.0 {
                    continue;
                }
                let small = parts[i].len().min(parts[j].len()) < min_area;
                let mut union: Vec<usize> = parts[i].iter().chain(parts[j].iter()).copied().collect();
                union.sort_unstable();
                let whole = fit_set(w, h, &union).best().1;
                let apart = parts_fit(w, h, &[&parts[i], &parts[j]]);
                let gain = whole - apart;
                if (small || gain > 0.03) && best.is_none_or(|b| gain > b.2) {
                    best = Some((i, j, gain));
                }
            }
        }
        let Some((i, j, _)) = best else { break };
        let b = parts.remove(j);
        parts[i].extend(b);
        parts[i].sort_unstable();
    }
    parts
}
