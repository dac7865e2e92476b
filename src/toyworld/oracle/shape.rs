//! Shape classification: a silhouette, normalised by its centroid and area, against soft
//! silhouettes of every class drawn with the world's own [`inside`], at rotations covering each
//! class's symmetry, by soft IoU.

use super::super::render::inside;
use super::super::vocab::Class;
use std::sync::OnceLock;

/// Cells per side of the normalised grid.
const GRID: usize = 44;
/// The grid spans [-HALF, HALF] in units of sqrt(area) (every class fits within ~0.9).
const HALF: f32 = 1.1;
/// Rotation step of the templates, degrees.
const STEP_DEG: f32 = 3.0;

/// The rotations (degrees) a class is tried at: its symmetry period (or a range wider than the
/// world's for the heart, which has none).
fn rotations(class: Class) -> Vec<f32> {
    let (lo, hi) = match class {
        Class::Ball | Class::Ring => return vec![0.0],
        Class::Box | Class::Cross => (0.0, 90.0),
        Class::Star => (0.0, 72.0),
        Class::Triangle => (0.0, 120.0),
        Class::Heart => (-45.0, 45.0 + 1e-3),
    };
    let mut v = Vec::new();
    let mut a = lo;
    while a < hi - 1e-3 {
        v.push(a);
        a += STEP_DEG;
    }
    v
}

/// Area (in units of the bounding radius squared) and centroid of a class's shape, unrotated.
pub(super) fn class_geometry(class: Class) -> (f32, [f32; 2]) {
    static GEOM: OnceLock<Vec<(f32, [f32; 2])>> = OnceLock::new();
    let all = GEOM.get_or_init(|| {
        Class::ALL
            .iter()
            .map(|&c| {
                let n = 600;
                let (mut a, mut sx, mut sy) = (0f64, 0f64, 0f64);
                for j in 0..n {
                    for i in 0..n {
                        let u = -1.0 + (i as f32 + 0.5) * 2.0 / n as f32;
                        let v = -1.0 + (j as f32 + 0.5) * 2.0 / n as f32;
                        if u * u + v * v <= 1.0 && inside(c, u, v) {
                            a += 1.0;
                            sx += u as f64;
                            sy += v as f64;
                        }
                    }
                }
                let cell = (2.0 / n as f64).powi(2);
                ((a * cell) as f32, [(sx / a) as f32, (sy / a) as f32])
            })
            .collect()
    });
    all[Class::ALL.iter().position(|&c| c == class).unwrap()]
}

struct Template {
    class: Class,
    rotation: f32,
    cells: Vec<f32>,
}

fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = Vec::new();
        let step = 2.0 * HALF / GRID as f32;
        let sub = 4;
        for &class in Class::ALL {
            let (area, m) = class_geometry(class);
            let k = area.sqrt();
            for rot in rotations(class) {
                let (s, c) = rot.to_radians().sin_cos();
                let mut cells = vec![0f32; GRID * GRID];
                for j in 0..GRID {
                    for i in 0..GRID {
                        let mut hit = 0;
                        for sj in 0..sub {
                            for si in 0..sub {
                                let gx = -HALF + (i as f32 + (si as f32 + 0.5) / sub as f32) * step;
                                let gy = -HALF + (j as f32 + (sj as f32 + 0.5) / sub as f32) * step;
                                let (dx, dy) = (gx * k, gy * k);
                                // Into the object's frame (as the renderer), then shift by the
                                // shape's centroid (the blob is centred on its centroid).
                                let u = dx * c + dy * s + m[0];
                                let v = -dx * s + dy * c + m[1];
                                if u * u + v * v <= 1.0 && inside(class, u, v) {
                                    hit += 1;
                                }
                            }
                        }
                        cells[j * GRID + i] = hit as f32 / (sub * sub) as f32;
                    }
                }
                out.push(Template { class, rotation: rot, cells });
            }
        }
        out
    })
}

/// A silhouette resampled on the normalised grid: centred on its centroid, scaled by the
/// square root of its area (bilinear samples of the binary mask).
pub(super) fn normalise(mask: &[bool], w: usize, h: usize, pixels: &[usize]) -> Vec<f32> {
    let n = pixels.len().max(1) as f32;
    let (mut cx, mut cy) = (0f32, 0f32);
    for &p in pixels {
        cx += (p % w) as f32 + 0.5;
        cy += (p / w) as f32 + 0.5;
    }
    cx /= n;
    cy /= n;
    let s = n.sqrt();
    let step = 2.0 * HALF / GRID as f32;
    let at = |x: i64, y: i64| -> f32 {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            0.0
        } else if mask[y as usize * w + x as usize] {
            1.0
        } else {
            0.0
        }
    };
    let mut cells = vec![0f32; GRID * GRID];
    for j in 0..GRID {
        for i in 0..GRID {
            let gx = -HALF + (i as f32 + 0.5) * step;
            let gy = -HALF + (j as f32 + 0.5) * step;
            let (px, py) = (cx + gx * s - 0.5, cy + gy * s - 0.5);
            let (x0, y0) = (px.floor(), py.floor());
            let (fx, fy) = (px - x0, py - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            cells[j * GRID + i] = at(x0, y0) * (1.0 - fx) * (1.0 - fy)
                + at(x0 + 1, y0) * fx * (1.0 - fy)
                + at(x0, y0 + 1) * (1.0 - fx) * fy
                + at(x0 + 1, y0 + 1) * fx * fy;
        }
    }
    cells
}

fn soft_iou(a: &[f32], b: &[f32]) -> f32 {
    let (mut inter, mut uni) = (0f32, 0f32);
    for (&x, &y) in a.iter().zip(b) {
        inter += x.min(y);
        uni += x.max(y);
    }
    if uni > 0.0 {
        inter / uni
    } else {
        0.0
    }
}

/// How well a silhouette fits each class: the best soft IoU over the class's rotations, and
/// that rotation (degrees, clockwise, modulo the class's symmetry).
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeFit {
    /// (class, best IoU, rotation at the best), in [`Class::ALL`] order.
    pub scores: Vec<(Class, f32, f32)>,
}

impl ShapeFit {
    /// The best class, its IoU and rotation.
    pub fn best(&self) -> (Class, f32, f32) {
        *self.scores.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap()
    }

    /// The IoU of the runner-up class.
    pub fn second(&self) -> f32 {
        let best = self.best().0;
        self.scores.iter().filter(|s| s.0 != best).map(|s| s.1).fold(0.0, f32::max)
    }

    /// Softmax of the IoUs (temperature 0.02): a probability-like confidence per class.
    pub fn confidence(&self) -> f32 {
        let best = self.best().1;
        let z: f32 = self.scores.iter().map(|s| ((s.1 - best) / 0.02).exp()).sum();
        1.0 / z
    }
}

/// Fits all classes to the silhouette given by `pixels` (indices into a `w` x `h` mask).
pub(super) fn fit_pixels(mask: &[bool], w: usize, h: usize, pixels: &[usize]) -> ShapeFit {
    fit_pixels_blurred(mask, w, h, pixels, 0.0)
}

/// Gaussian blur (sigma in cells, separable, zero outside) of a grid.
fn blur_grid(cells: &[f32], sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-r..=r).map(|i| (-0.5 * (i as f32 / sigma).powi(2)).exp()).collect();
    let norm: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / norm).collect();
    // separable: rows, then columns (zero outside the grid)
    let pass = |src: &[f32], step: i64| -> Vec<f32> {
        let g = GRID as i64;
        let mut out = vec![0f32; GRID * GRID];
        for y in 0..g {
            for x in 0..g {
                let mut s = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    let (xx, yy) = if step == 1 { (x + j as i64 - r, y) } else { (x, y + j as i64 - r) };
                    if (0..g).contains(&xx) && (0..g).contains(&yy) {
                        s += kv * src[(yy * g + xx) as usize];
                    }
                }
                out[(y * g + x) as usize] = s;
            }
        }
        out
    };
    pass(&pass(cells, 1), GRID as i64)
}

/// As [`fit_pixels`] for an image blurred by a Gaussian of `blur_px` pixels: each template is
/// blurred by the same amount (in grid units) and cut at half coverage, as the silhouette was.
pub(super) fn fit_pixels_blurred(mask: &[bool], w: usize, h: usize, pixels: &[usize], blur_px: f32) -> ShapeFit {
    let cells = normalise(mask, w, h, pixels);
    let step = 2.0 * HALF / GRID as f32;
    let sigma_cells = blur_px / (pixels.len().max(1) as f32).sqrt() / step;
    let mut scores: Vec<(Class, f32, f32)> = Class::ALL.iter().map(|&c| (c, -1.0, 0.0)).collect();
    for t in templates() {
        let iou = if sigma_cells > 0.3 {
            let b: Vec<f32> = blur_grid(&t.cells, sigma_cells).iter().map(|&v| ((v - 0.5) * 4.0 + 0.5).clamp(0.0, 1.0)).collect();
            soft_iou(&cells, &b)
        } else {
            soft_iou(&cells, &t.cells)
        };
        let k = Class::ALL.iter().position(|&c| c == t.class).unwrap();
        if iou > scores[k].1 {
            scores[k] = (t.class, iou, t.rotation);
        }
    }
    ShapeFit { scores }
}

/// Fits a silhouette given as a set of pixel indices (its own mask is built).
pub(super) fn fit_set(w: usize, h: usize, pixels: &[usize]) -> ShapeFit {
    let mut mask = vec![false; w * h];
    for &p in pixels {
        mask[p] = true;
    }
    fit_pixels(&mask, w, h, pixels)
}

/// Area-weighted best IoU of a set of parts (how well they fit shapes, each on its own).
pub(super) fn parts_fit(w: usize, h: usize, parts: &[&[usize]]) -> f32 {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    parts.iter().map(|p| fit_set(w, h, p).best().1 * p.len() as f32).sum::<f32>() / total.max(1) as f32
}
