//! Appearance: an object's tones (CIE Lab), its pattern signature, and its nearest named colour
//! and pattern; the descriptor and similarity that the benchmark's identity scores compare.

use super::blob::Blob;
use super::lab::{dist3, srgb_to_lab};
use super::shape::class_geometry;
use crate::toyworld::vocab::{Class, NamedColor, Pattern};
use serde::{Deserialize, Serialize};

/// Projection parameter of `p` on the segment a -> b (unclamped) and distance to the segment.
fn project(p: [f32; 3], a: [f32; 3], b: [f32; 3]) -> (f32, f32) {
    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
    if len2 < 1e-6 {
        return (0.0, dist3(p, a));
    }
    let t = ((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]) / len2;
    let tc = t.clamp(0.0, 1.0);
    let q = [a[0] + tc * ab[0], a[1] + tc * ab[1], a[2] + tc * ab[2]];
    (t, dist3(p, q))
}

fn median_of(v: &mut [f32]) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn median3(points: &[[f32; 3]]) -> [f32; 3] {
    [0, 1, 2].map(|c| median_of(&mut points.iter().map(|p| p[c]).collect::<Vec<_>>()))
}

/// Two-means in Lab: (centre a, centre b, label per point: false = a).
fn two_means(points: &[[f32; 3]]) -> ([f32; 3], [f32; 3], Vec<bool>) {
    let n = points.len().max(1) as f32;
    let mean = [0, 1, 2].map(|c| points.iter().map(|p| p[c]).sum::<f32>() / n);
    let far = |from: [f32; 3]| *points.iter().max_by(|x, y| dist3(**x, from).total_cmp(&dist3(**y, from))).unwrap_or(&from);
    let mut a = far(mean);
    let mut b = far(a);
    let mut labels = vec![false; points.len()];
    for _ in 0..12 {
        for (l, p) in labels.iter_mut().zip(points) {
            *l = dist3(*p, b) < dist3(*p, a);
        }
        let mut sums = [[0f32; 3]; 2];
        let mut counts = [0f32; 2];
        for (l, p) in labels.iter().zip(points) {
            let k = *l as usize;
            counts[k] += 1.0;
            for c in 0..3 {
                sums[k][c] += p[c];
            }
        }
        if counts[0] == 0.0 || counts[1] == 0.0 {
            break;
        }
        a = sums[0].map(|s| s / counts[0]);
        b = sums[1].map(|s| s / counts[1]);
    }
    (a, b, labels)
}

/// A compact, class- and size-independent description of an object's look.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppearanceDescriptor {
    /// The two tones in sRGB 0-255, the more frequent first (equal for a one-tone object):
    /// the core pixels are split by 2-means (Lab) and each tone is the median of the purest
    /// pixels of its side (the 15% most extreme along the axis between the two clusters), so a
    /// blurred pattern, whose pixels mix the tones, still gives tones near the true ones.
    pub tones: [[f32; 3]; 2],
    /// The same tones in CIE Lab.
    pub tones_lab: [[f32; 3]; 2],
    /// Fraction of core pixels nearer the second tone (0 for one tone).
    pub minor_fraction: f32,
    /// Coherence of the structure tensor of the tone map, 0-1: near 1 for stripes and a split,
    /// near 0 for checks and dots (and for a single tone).
    pub coherence: f32,
    /// Tone changes between 4-neighbours per neighbour pair, times the object's radius
    /// (about 2 for stripes/checks/dots, well below 1 for a split, 0 for one tone).
    pub edge_density: f32,
}

/// Tones closer than this (Lab ΔE) count as one.
const ONE_TONE_DE: f32 = 14.0;

/// The appearance descriptor of a blob of `img` (the blob carries its own colours; `img` is
/// accepted for symmetry with the other calls and is not read).
pub fn appearance_descriptor(_img: &image::RgbImage, blob: &Blob) -> AppearanceDescriptor {
    descriptor_of(blob)
}

pub(super) fn descriptor_of(blob: &Blob) -> AppearanceDescriptor {
    let core = blob.core();
    let deep = blob.deep_core();
    let rgb: Vec<[f32; 3]> = deep.iter().map(|&i| blob.colors[i]).collect();
    let lab: Vec<[f32; 3]> = rgb.iter().map(|&c| srgb_to_lab(c)).collect();
    let (ca, cb, labels) = two_means(&lab);
    let n = labels.len().max(1);
    let nb = labels.iter().filter(|&&l| l).count();
    let minor = nb.min(labels.len() - nb) as f32 / n as f32;
    let one_tone = dist3(ca, cb) < ONE_TONE_DE || minor < 0.04;
    let (ta, tb) = if one_tone {
        let t = median3(&rgb);
        (t, t)
    } else {
        // The purest pixels of each side: the extremes along the axis between the clusters
        // (a blurred pattern mixes its tones; its extremes stay nearest the true ones).
        let mean_of = |want: bool| {
            let v: Vec<[f32; 3]> = rgb.iter().zip(&labels).filter(|(_, &l)| l == want).map(|(p, _)| *p).collect();
            let k = v.len().max(1) as f32;
            [0, 1, 2].map(|c| v.iter().map(|p| p[c]).sum::<f32>() / k)
        };
        let (ma, mb) = (mean_of(false), mean_of(true));
        let mut ts: Vec<(f32, [f32; 3])> = rgb.iter().map(|&p| (project(p, ma, mb).0, p)).collect();
        ts.sort_by(|x, y| x.0.total_cmp(&y.0));
        let fa = (n - nb) as f32 / n as f32;
        let fb = nb as f32 / n as f32;
        let ka = ((fa * 0.5).min(0.15) * n as f32).ceil().max(1.0) as usize;
        let kb = ((fb * 0.5).min(0.15) * n as f32).ceil().max(1.0) as usize;
        let lo: Vec<[f32; 3]> = ts[..ka.min(ts.len())].iter().map(|x| x.1).collect();
        let hi: Vec<[f32; 3]> = ts[ts.len().saturating_sub(kb)..].iter().map(|x| x.1).collect();
        let (a, b) = (median3(&lo), median3(&hi));
        if nb * 2 > labels.len() {
            (b, a)
        } else {
            (a, b)
        }
    };
    let class = blob.shape_fit().best().0;
    let radius = (blob.area() as f32 / class_geometry(class).0).sqrt();
    let (minor_fraction, coherence, edge_density) = if one_tone {
        (0.0, 0.0, 0.0)
    } else {
        let values: Vec<[f32; 3]> = core.iter().map(|&i| blob.colors[i]).collect();
        pattern_signature(blob, &core, &values, ta, tb, radius)
    };
    AppearanceDescriptor {
        tones: [ta, tb],
        tones_lab: [srgb_to_lab(ta), srgb_to_lab(tb)],
        minor_fraction,
        coherence,
        edge_density,
    }
}

/// Pattern statistics of the tone map t (projection of each core pixel on tone a -> tone b):
/// (fraction with t > 0.5, structure-tensor coherence of t, tone-change density * radius).
fn pattern_signature(
    blob: &Blob,
    core: &[usize],
    values: &[[f32; 3]],
    a: [f32; 3],
    b: [f32; 3],
    radius: f32,
) -> (f32, f32, f32) {
    let w = blob.width as usize;
    let [x0, y0, x1, y1] = blob.bbox.map(|v| v as usize);
    let (bw, bh) = (x1 - x0, y1 - y0);
    let mut t = vec![f32::NAN; bw * bh];
    for (k, &i) in core.iter().enumerate() {
        let p = blob.pixels[i];
        let (x, y) = (p % w - x0, p / w - y0);
        t[y * bw + x] = project(values[k], a, b).0.clamp(0.0, 1.0);
    }
    let at = |x: usize, y: usize| t[y * bw + x];
    let (mut jxx, mut jyy, mut jxy) = (0f32, 0f32, 0f32);
    let (mut pairs, mut changes) = (0usize, 0usize);
    let mut second = 0usize;
    for y in 0..bh {
        for x in 0..bw {
            let v = at(x, y);
            if v.is_nan() {
                continue;
            }
            if v > 0.5 {
                second += 1;
            }
            if x + 1 < bw && !at(x + 1, y).is_nan() {
                pairs += 1;
                changes += ((at(x + 1, y) > 0.5) != (v > 0.5)) as usize;
            }
            if y + 1 < bh && !at(x, y + 1).is_nan() {
                pairs += 1;
                changes += ((at(x, y + 1) > 0.5) != (v > 0.5)) as usize;
            }
            if x >= 1 && y >= 1 && x + 1 < bw && y + 1 < bh {
                let (l, r, u, d) = (at(x - 1, y), at(x + 1, y), at(x, y - 1), at(x, y + 1));
                if [l, r, u, d].iter().all(|q| !q.is_nan()) {
                    let gx = 0.5 * (r - l);
                    let gy = 0.5 * (d - u);
                    jxx += gx * gx;
                    jyy += gy * gy;
                    jxy += gx * gy;
                }
            }
        }
    }
    let tr = jxx + jyy;
    let coherence = if tr > 1e-6 { ((jxx - jyy).powi(2) + 4.0 * jxy * jxy).sqrt() / tr } else { 0.0 };
    let density = if pairs > 0 { changes as f32 / pairs as f32 * radius } else { 0.0 };
    let frac = second as f32 / core.len().max(1) as f32;
    (frac.min(1.0 - frac), coherence, density)
}

/// Distance from `x` to the line through `a` and `b` (to `a` when they nearly coincide).
fn line_distance(x: [f32; 3], a: [f32; 3], b: [f32; 3]) -> f32 {
    let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
    if len2 < 400.0 {
        return dist3(x, [0.5 * (a[0] + b[0]), 0.5 * (a[1] + b[1]), 0.5 * (a[2] + b[2])]);
    }
    let t = ((x[0] - a[0]) * ab[0] + (x[1] - a[1]) * ab[1] + (x[2] - a[2]) * ab[2]) / len2;
    dist3(x, [a[0] + t * ab[0], a[1] + t * ab[1], a[2] + t * ab[2]])
}

/// Colour distance between two appearances (RGB units): how far each one's tones lie from the
/// line through the other's (mixing two tones, as blur and washed-out generations do, moves
/// colours along that line), plus 35% of the remaining distance between the matched tones.
pub fn tone_distance(a: &AppearanceDescriptor, b: &AppearanceDescriptor) -> f32 {
    let [a1, a2] = a.tones;
    let [b1, b2] = b.tones;
    let straight = 0.5 * (dist3(a1, b1) + dist3(a2, b2));
    let crossed = 0.5 * (dist3(a1, b2) + dist3(a2, b1));
    let ends = straight.min(crossed);
    let line = 0.25 * (line_distance(a1, b1, b2) + line_distance(a2, b1, b2) + line_distance(b1, a1, a2) + line_distance(b2, a1, a2));
    line + 0.35 * (ends - line).max(0.0)
}

/// Similarity of two appearances in [0, 1], 1 for identical looks, symmetric: a colour term
/// `exp(-(d / 30)^2 / 2)` with `d` the [`tone_distance`], times `0.75 + 0.25 * pattern`, where
/// the pattern term compares minor fraction, coherence and edge density.
pub fn appearance_similarity(a: &AppearanceDescriptor, b: &AppearanceDescriptor) -> f32 {
    (-appearance_distance(a, b)).exp()
}

/// `-ln` of [`appearance_similarity`], computed without its underflow: two looks far from
/// both references (as a small generator's soft renders often are) still compare by distance
/// where both similarities would round to 0.
pub fn appearance_distance(a: &AppearanceDescriptor, b: &AppearanceDescriptor) -> f32 {
    let color = 0.5 * (tone_distance(a, b) / 30.0).powi(2);
    let dp = ((a.minor_fraction - b.minor_fraction) / 0.15).powi(2)
        + ((a.coherence - b.coherence) / 0.5).powi(2)
        + ((a.edge_density - b.edge_density) / 1.5).powi(2);
    let pattern = (-0.5 * dp).exp();
    color - (0.75 + 0.25 * pattern).ln()
}

/// The named object colour of a blob and a confidence (softmax over the colours' costs):
/// each colour's cost is the mean RGB distance of the core pixels to the segment between the
/// colour and its [`NamedColor::shade`] (a blurred pattern mixes the two), plus a penalty when
/// fewer than 20% of the pixels are nearer the colour than its shade.
pub fn named_color_of(blob: &Blob) -> (NamedColor, f32) {
    named_color_among(blob, NamedColor::OBJECT)
}

/// As [`named_color_of`] among `candidates`.
pub fn named_color_among(blob: &Blob, candidates: &[NamedColor]) -> (NamedColor, f32) {
    let core = blob.core();
    let costs: Vec<(NamedColor, f32)> = candidates
        .iter()
        .map(|&c| {
            let (a, b) = (c.rgb().map(|v| v as f32), c.shade().map(|v| v as f32));
            let mut sum = 0f32;
            let mut near_a = 0usize;
            for &i in &core {
                let (t, d) = project(blob.colors[i], a, b);
                sum += d.min(150.0);
                near_a += (t < 0.5) as usize;
            }
            let n = core.len().max(1) as f32;
            let frac_a = near_a as f32 / n;
            (c, sum / n + 150.0 * (0.2 - frac_a).max(0.0))
        })
        .collect();
    let best = costs.iter().min_by(|x, y| x.1.total_cmp(&y.1)).copied().unwrap();
    let z: f32 = costs.iter().map(|c| (-(c.1 - best.1) / 8.0).exp()).sum();
    (best.0, 1.0 / z)
}

/// The named pattern of a blob of the training world and a rough confidence: the tone map
/// between its named colour and that colour's shade, then: one tone -> plain; a coherent
/// (oriented) tone map -> striped; otherwise the second tone's share decides dotted (small
/// share) or checked (about half).
pub fn named_pattern_of(blob: &Blob) -> (Pattern, f32) {
    let (color, _) = named_color_of(blob);
    pattern_given_color(blob, color)
}

pub(super) fn pattern_given_color(blob: &Blob, color: NamedColor) -> (Pattern, f32) {
    let sig = named_signature(blob, color);
    classify_pattern(sig)
}

/// (share of the shade, coherence, edge density) of a blob painted in `color` and its shade.
pub(super) fn named_signature(blob: &Blob, color: NamedColor) -> (f32, f32, f32) {
    let core = blob.core();
    let (a, b) = (color.rgb().map(|v| v as f32), color.shade().map(|v| v as f32));
    let values: Vec<[f32; 3]> = core.iter().map(|&i| blob.colors[i]).collect();
    let fit = blob.shape_fit();
    let radius = (blob.area() as f32 / class_geometry(fit.best().0).0).sqrt();
    // Raw share of the shade (not folded to the minor side: the colour is the base tone).
    let share = values.iter().filter(|&&v| project(v, a, b).0 > 0.5).count() as f32 / values.len().max(1) as f32;
    let (_, coherence, density) = pattern_signature(blob, &core, &values, a, b, radius);
    (share, coherence, density)
}

fn classify_pattern((share, coherence, density): (f32, f32, f32)) -> (Pattern, f32) {
    if share < 0.06 || density < 0.25 {
        let conf = ((0.06 - share) / 0.06).clamp(0.0, 1.0).max(((0.25 - density) / 0.25).clamp(0.0, 1.0));
        return (Pattern::Plain, 0.5 + 0.5 * conf);
    }
    if coherence > 0.5 {
        return (Pattern::Striped, (0.5 + (coherence - 0.5)).min(1.0));
    }
    if share < 0.38 {
        (Pattern::Dotted, 0.5 + ((0.38 - share) / 0.3).min(0.5))
    } else {
        (Pattern::Checked, 0.5 + ((share - 0.38) / 0.3).min(0.5))
    }
}

/// Which shape class a blob has and a confidence: see [`ShapeFit`](super::ShapeFit).
pub fn classify(blob: &Blob) -> (Class, f32) {
    let fit = blob.shape_fit();
    (fit.best().0, fit.confidence())
}
