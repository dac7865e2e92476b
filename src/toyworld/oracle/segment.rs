//! The segmenter: finds the objects of a toy-world image. It runs the stages of the files
//! beside it in order: the background model and threshold ([`background`](super::background)),
//! foreground components with noise pinholes filled ([`grid`](super::grid)), edge sharpening
//! ([`edges`](super::edges)), the colour split ([`split_colour`](super::split_colour)), ring
//! cutting ([`rings`](super::rings)), the split at necks ([`necks`](super::necks)) and fragment
//! merging ([`merge`](super::merge)), and returns the objects as [`Blob`]s.

use super::background::{threshold_for, working_colors, BackgroundModel};
use super::blob::Blob;
use super::edges::refine_edges;
use super::grid::{components, fill_small_holes};
use super::lab::{dist3, srgb_to_lab};
use super::merge::merge_fragments;
use super::necks::split_geometric;
use super::rings::split_rings;
use super::split_colour::split_by_colour;
use image::RgbImage;

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

/// Finds the objects of an image with [`SegmentOptions::default`]: see [`segment_with`].
pub fn segment(img: &RgbImage) -> Vec<Blob> {
    segment_with(img, &SegmentOptions::default())
}

/// Finds the objects of an image: pixels farther than a threshold from the image's own
/// background ([`BackgroundModel`]) are foreground; its 8-connected components, with
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

    fn paint(img: &mut RgbImage, x0: u32, x1: u32, y0: u32, y1: u32, c: [u8; 3]) -> Vec<usize> {
        let mut px = Vec::new();
        for y in y0..y1 {
            for x in x0..x1 {
                img.put_pixel(x, y, Rgb(c));
                px.push((y * img.width() + x) as usize);
            }
        }
        px.sort_unstable();
        px
    }

    #[test]
    fn flat_squares_are_found_exactly_in_reading_order() {
        let mut img = RgbImage::from_pixel(64, 64, WHITE);
        let low_left = paint(&mut img, 6, 20, 36, 50, [200, 30, 30]);
        let up_right = paint(&mut img, 40, 54, 8, 22, [30, 30, 200]);
        let blobs = segment(&img);
        assert_eq!(blobs.len(), 2);
        assert_eq!(blobs[0].pixels, up_right);
        assert_eq!(blobs[1].pixels, low_left);
        assert_eq!(blobs[0].colors[0], [30.0, 30.0, 200.0]);
    }

    #[test]
    fn specks_and_empty_images_give_nothing() {
        let mut img = RgbImage::from_pixel(64, 64, WHITE);
        assert!(segment(&img).is_empty());
        paint(&mut img, 30, 33, 30, 33, [0, 0, 0]); // 9 px, under 0.004 of 4096 = 16
        assert!(segment(&img).is_empty());
    }

    #[test]
    fn touching_objects_of_two_colours_are_two_blobs_unless_splitting_is_off() {
        let mut img = RgbImage::from_pixel(64, 64, WHITE);
        let a = paint(&mut img, 10, 26, 20, 36, [200, 30, 30]);
        let b = paint(&mut img, 26, 42, 20, 36, [30, 160, 30]);
        let blobs = segment(&img);
        assert_eq!(blobs.iter().map(|b| b.pixels.clone()).collect::<Vec<_>>(), vec![a.clone(), b.clone()]);
        let opts = SegmentOptions { split: false, merge: false, ..SegmentOptions::default() };
        let mut both = [a, b].concat();
        both.sort_unstable();
        let one = segment_with(&img, &opts);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].pixels, both);
    }

    #[test]
    fn a_fixed_threshold_replaces_the_adaptive_one() {
        // An object 30 from the background in RGB: under the adaptive threshold's floor of 40.
        let mut img = RgbImage::from_pixel(64, 64, Rgb([128, 128, 128]));
        let faint = paint(&mut img, 20, 36, 20, 36, [128, 128, 158]);
        assert!(segment(&img).is_empty());
        let opts = SegmentOptions { threshold: Some(20.0), ..SegmentOptions::default() };
        let found = segment_with(&img, &opts);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pixels, faint);
    }
}
