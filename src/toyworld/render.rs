//! Drawing scenes: 4x4 supersampling per pixel, so edges are anti-aliased, and the object masks
//! of the visible pixels.
//!
//! Each sub-sample takes the colour of the topmost object that covers it (or the background).
//! A pixel's colour is the mean of its 16 sub-samples; it belongs to an object's mask when the
//! background covers less than half of it, and then to the object covering most of it (the
//! later-drawn one on a tie).

use super::scene::{Object, Scene, IMAGE_SIZE};
use super::vocab::{Appearance, Class, Pattern, Rgb, UnnamedLayout};
use image::{GrayImage, Luma, Rgb as Px, RgbImage};

/// Sub-samples per pixel along each axis.
pub const SUPERSAMPLE: u32 = 4;

/// Pattern geometry in object units (the object's radius is 1).
const STRIPE_PERIOD: f32 = 0.55;
const DOT_SPACING: f32 = 0.55;
const DOT_RADIUS: f32 = 0.17;
const CHECK_CELL: f32 = 0.42;

pub struct Rendered {
    pub image: RgbImage,
    /// One per object, in scene order: 255 where the object is visible, 0 elsewhere.
    pub masks: Vec<GrayImage>,
    /// 0 for background, k for object k (1-based, scene order).
    pub index: GrayImage,
}

/// Draws `scene` at 64x64.
pub fn render(scene: &Scene) -> Rendered {
    render_sized(scene, IMAGE_SIZE)
}

/// Draws `scene` at `size` x `size` (the world scaled by `size / 64`).
pub fn render_sized(scene: &Scene, size: u32) -> Rendered {
    assert!(size > 0 && scene.objects.len() < 255, "bad size or too many objects");
    let n = scene.objects.len();
    let scale = IMAGE_SIZE as f32 / size as f32;
    let bg = scene.background.rgb();
    let mut image = RgbImage::new(size, size);
    let mut index = GrayImage::new(size, size);
    let prepared: Vec<Prepared> = scene.objects.iter().map(Prepared::new).collect();
    let mut counts = vec![0u32; n + 1];
    for py in 0..size {
        for px in 0..size {
            counts.iter_mut().for_each(|c| *c = 0);
            let mut sum = [0f32; 3];
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    let x = (px as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32) * scale;
                    let y = (py as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32) * scale;
                    let hit = prepared.iter().enumerate().rev().find_map(|(k, p)| p.color_at(x, y).map(|c| (k + 1, c)));
                    let (label, color) = hit.unwrap_or((0, bg));
                    counts[label] += 1;
                    for i in 0..3 {
                        sum[i] += color[i] as f32;
                    }
                }
            }
            let total = (SUPERSAMPLE * SUPERSAMPLE) as f32;
            image.put_pixel(px, py, Px(sum.map(|s| (s / total).round() as u8)));
            let label = if (counts[0] as f32) < total / 2.0 {
                // The object covering most of the pixel; `>=` gives ties to the later one.
                (1..=n).fold(1, |best, k| if counts[k] >= counts[best] { k } else { best })
            } else {
                0
            };
            index.put_pixel(px, py, Luma([label as u8]));
        }
    }
    let masks = (1..=n)
        .map(|k| {
            GrayImage::from_fn(size, size, |x, y| Luma([if index.get_pixel(x, y)[0] as usize == k { 255 } else { 0 }]))
        })
        .collect();
    Rendered { image, masks, index }
}

/// An object with its rotation precomputed.
struct Prepared<'a> {
    o: &'a Object,
    cos: f32,
    sin: f32,
}

impl<'a> Prepared<'a> {
    fn new(o: &'a Object) -> Self {
        let r = o.rotation.to_radians();
        Prepared { o, cos: r.cos(), sin: r.sin() }
    }

    /// The object's colour at world point (x, y), or `None` outside its shape.
    fn color_at(&self, x: f32, y: f32) -> Option<Rgb> {
        let (dx, dy) = ((x - self.o.cx) / self.o.size, (y - self.o.cy) / self.o.size);
        if dx * dx + dy * dy > 1.0 {
            return None;
        }
        // Into the object's frame: undo the clockwise rotation.
        let u = dx * self.cos + dy * self.sin;
        let v = -dx * self.sin + dy * self.cos;
        inside(self.o.class, u, v).then(|| paint(&self.o.appearance, u, v))
    }
}

/// Whether (u, v) in object units (y down, shape within the unit circle) is inside the shape.
pub fn inside(class: Class, u: f32, v: f32) -> bool {
    let r2 = u * u + v * v;
    match class {
        Class::Ball => r2 <= 1.0,
        Class::Ring => (0.52 * 0.52..=1.0).contains(&r2),
        Class::Box => u.abs().max(v.abs()) <= 0.70,
        Class::Cross => {
            let (a, b) = (u.abs(), v.abs());
            (a <= 0.30 && b <= 0.95) || (b <= 0.30 && a <= 0.95)
        }
        Class::Heart => {
            // (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up, scaled and shifted into the unit circle.
            let x = u * 1.2;
            let y = -v * 1.2 + 0.12;
            (x * x + y * y - 1.0).powi(3) - x * x * y.powi(3) <= 0.0
        }
        Class::Triangle => in_polygon(&TRIANGLE, u, v),
        Class::Star => in_polygon(&star_vertices(), u, v),
    }
}

/// Equilateral, pointing up, inscribed in the unit circle.
const TRIANGLE: [(f32, f32); 3] = [(0.0, -1.0), (0.866_025_4, 0.5), (-0.866_025_4, 0.5)];

/// Five points of radius 1, inner radius 0.45, one point up.
fn star_vertices() -> [(f32, f32); 10] {
    std::array::from_fn(|i| {
        let r = if i % 2 == 0 { 1.0 } else { 0.45 };
        let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
        (r * a.cos(), r * a.sin())
    })
}

/// Even-odd ray casting.
fn in_polygon(poly: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[derive(Clone, Copy)]
enum Layout {
    Plain,
    Striped,
    Dotted,
    Checked,
    Split,
}

/// The colour of an appearance at (u, v) in object units.
pub fn paint(appearance: &Appearance, u: f32, v: f32) -> Rgb {
    let (a, b, layout) = match appearance {
        Appearance::Named { color, pattern } => {
            let layout = match pattern {
                Pattern::Plain => Layout::Plain,
                Pattern::Striped => Layout::Striped,
                Pattern::Dotted => Layout::Dotted,
                Pattern::Checked => Layout::Checked,
            };
            (color.rgb(), color.shade(), layout)
        }
        Appearance::Unnamed(un) => {
            let layout = match un.layout {
                UnnamedLayout::Striped => Layout::Striped,
                UnnamedLayout::Dotted => Layout::Dotted,
                UnnamedLayout::Checked => Layout::Checked,
                UnnamedLayout::Split => Layout::Split,
            };
            (un.colors[0], un.colors[1], layout)
        }
    };
    let second = match layout {
        Layout::Plain => false,
        Layout::Striped => ((u + v) * std::f32::consts::FRAC_1_SQRT_2 / STRIPE_PERIOD).floor().rem_euclid(2.0) == 1.0,
        Layout::Dotted => {
            let gu = u / DOT_SPACING - (u / DOT_SPACING).round();
            let gv = v / DOT_SPACING - (v / DOT_SPACING).round();
            (gu * gu + gv * gv) * DOT_SPACING * DOT_SPACING <= DOT_RADIUS * DOT_RADIUS
        }
        Layout::Checked => ((u / CHECK_CELL).floor() + (v / CHECK_CELL).floor()).rem_euclid(2.0) == 1.0,
        Layout::Split => u >= 0.0,
    };
    if second {
        b
    } else {
        a
    }
}
