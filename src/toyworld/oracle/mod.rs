//! The oracle scorer (draft doc; final numbers below).

mod appearance;
mod segment;
mod shape;

pub use appearance::{
    appearance_descriptor, appearance_similarity, classify, named_color_among, named_color_of, named_pattern_of,
    srgb_to_lab, AppearanceDescriptor,
};
pub use segment::{estimate_background, foreground_threshold, segment, segment_with, Blob, SegmentOptions};
pub use shape::ShapeFit;

use super::render::render;
use super::scene::Scene;
use super::vocab::{color_distance, Class, NamedColor, Pattern};
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// The named colour nearest (RGB) to the image's estimated background, among `candidates`.
pub fn background_color_among(img: &RgbImage, candidates: &[NamedColor]) -> NamedColor {
    let bg = estimate_background(img).map(|v| v.round().clamp(0.0, 255.0) as u8);
    *candidates
        .iter()
        .min_by(|a, b| color_distance(a.rgb(), bg).total_cmp(&color_distance(b.rgb(), bg)))
        .expect("no candidate colours")
}

/// The named colour (any of the nine) nearest to the image's estimated background.
pub fn background_color_name(img: &RgbImage) -> NamedColor {
    background_color_among(img, NamedColor::ALL)
}

/// One object found by [`analyze`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DetectedObject {
    pub bbox: [u32; 4],
    pub centroid: [f32; 2],
    pub area: usize,
    pub class: Class,
    /// Softmax confidence of the class ([`ShapeFit::confidence`]).
    pub class_confidence: f32,
    /// Soft IoU of the best class template (how shape-like the blob is, 0-1).
    pub shape_iou: f32,
    /// Nearest named object colour / pattern (meaningful for objects of the training world).
    pub color: NamedColor,
    pub color_confidence: f32,
    pub pattern: Pattern,
    pub appearance: AppearanceDescriptor,
}

/// Everything the oracle sees in one image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SceneAnalysis {
    /// Estimated background colour, RGB 0-255.
    pub background: [f32; 3],
    /// Nearest named colour to it (any of the nine).
    pub background_name: NamedColor,
    pub objects: Vec<DetectedObject>,
}

/// Describes a blob.
pub fn describe(blob: &Blob) -> DetectedObject {
    let fit = blob.shape_fit();
    let (class, iou, _) = fit.best();
    let (color, color_confidence) = named_color_of(blob);
    let (pattern, _) = appearance::pattern_given_color(blob, color);
    DetectedObject {
        bbox: blob.bbox,
        centroid: blob.centroid,
        area: blob.area(),
        class,
        class_confidence: fit.confidence(),
        shape_iou: iou,
        color,
        color_confidence,
        pattern,
        appearance: appearance::descriptor_of(blob),
    }
}

/// Segments an image and describes every object.
pub fn analyze(img: &RgbImage) -> SceneAnalysis {
    let background = estimate_background(img);
    let objects = segment(img).iter().map(describe).collect();
    SceneAnalysis { background, background_name: background_color_name(img), objects }
}

/// A reference object: the class and appearance of an object of a known scene.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReferenceObject {
    pub class: Class,
    pub appearance: AppearanceDescriptor,
}

/// The reference objects of a scene (e.g. a personalization scene), in scene order, measured
/// on its clean render through the ground-truth masks.
pub fn reference_objects(scene: &Scene) -> Vec<ReferenceObject> {
    let r = render(scene);
    scene
        .objects
        .iter()
        .zip(&r.masks)
        .map(|(o, m)| {
            let blob = Blob::from_mask(&r.image, m).expect("object has no visible pixels");
            ReferenceObject { class: o.class, appearance: appearance::descriptor_of(&blob) }
        })
        .collect()
}
