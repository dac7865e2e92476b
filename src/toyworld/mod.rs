//! The synthetic toy world: seeded scenes of flat shapes with captions and exact object masks,
//! the ground truth for a measurable DisenDiff benchmark.
//!
//! **Images.** 64x64 RGB (any size via [`render_sized`]), 1 to 3 objects on a plain background,
//! drawn with 4x4 supersampling so edges are anti-aliased. Later objects hide earlier ones;
//! layouts are rejection-sampled so objects overlap slightly at most (bounding circles may
//! overlap by 8% of the sum of radii). Radii (bounding circle) are 14-22 px for one object,
//! 11-17 px for two, 10-14 px for three; every object lies fully inside the image.
//!
//! **Vocabulary** (every word a single CLIP token, `word</w>`):
//! - classes: ball (disc), box (square), star (5 points), ring (annulus), heart, cross (plus
//!   sign), triangle. Boxes, stars, crosses, hearts and triangles are turned a little.
//! - object colours: red, green, blue, yellow, purple, orange, white, black.
//! - patterns: plain, striped (diagonal), dotted, checked ("checkered" is two tokens). A
//!   pattern's second tone is the colour's [`NamedColor::shade`], so one colour word names both.
//!   Pattern sizes scale with the object (stripe period 0.55 radius, checks 0.42 radius).
//! - backgrounds: white, gray, black. Every tone of an object is at least
//!   [`MIN_CONTRAST`] (RGB distance 80) from the background, so e.g. white objects never
//!   appear on white, and patterned white/black objects never on gray.
//!
//! **Captions** ([`caption`]): "a red striped ball, an orange box and a blue ball on a white
//! background" (pattern omitted when plain; objects in drawing order, which is also the order
//! of the masks). [`class_caption`] gives "a ball and a box", [`object_phrase`] "red striped
//! ball", and [`parse_caption`] reads the grammar back.
//!
//! **Personalization** ([`personalization_scene`]): two objects of different classes, radius
//! 13-16 px (three of 11-13 px with [`personalization_scene_n`], for three-concept runs:
//! captions `<new1> star, <new2> heart and <new3> ring`), at least 3 px apart, each with an
//! [`UnnamedAppearance`]: two colours (teal, maroon, navy, cyan, magenta, chartreuse, gold,
//! pink) that are all at least 70 in RGB from every named colour and every named shade, laid out as stripes, dots, checks or a split
//! two-tone — so no caption of the training world describes them. Their captions
//! ([`personalization_caption`]) are `<new1> ball and <new2> box`; [`caption`] names them by
//! class only ("a ball and a box on a gray background").
//!
//! **Unnamed looks in the training world** ([`WorldSpec::unnamed_share`]): a share of the
//! training objects gets a random two-colour look from the same palette and layouts, captioned
//! by its class alone, as web captions say "a cat" whatever the cat looks like. The base model
//! thus learns to draw (and its VAE to encode) such colours without any word for them, which
//! is Stable Diffusion's situation with a user's cat; the eight personalization looks
//! themselves never occur ([`is_personalization_look`]). A VAE trained without them maps them
//! to the nearest named colours (held-out PSNR 15-20 dB on personalization scenes against
//! 23-26 dB on training scenes), so no method could reproduce them.
//!
//! **Masks** ([`render`]): one per object, 255 on its visible pixels: a pixel is an object's
//! when the background covers less than half of it and that object covers most of the rest.
//!
//! **Determinism**: scene `i` of a run with seed `S` comes from [`scene_seed`]`(S, i)`, so it
//! does not depend on how many scenes are written; rendering is pure.
//!
//! **Files** ([`write_scenes`], `disendiff toy scenes`): `NNNNN.png`, `NNNNN.txt` (caption, or
//! the personalization caption), `NNNNN.mask.png` (8-bit index map: 0 background, k object k),
//! and `scenes.jsonl` ([`SceneRecord`] per line).
//!
//! **Oracle** ([`oracle`]): finds, classifies and describes the objects of any image of this world
//! (generated ones included), for the benchmark's fidelity and leakage scores.

mod caption;
mod files;
mod render;
mod scene;
mod vocab;
pub mod experiment;
pub mod model_check;
pub mod score;
pub mod task;
pub mod oracle;

pub use caption::{
    caption, class_caption, object_phrase, parse_caption, personalization_caption, personalization_token,
    ParsedCaption, ParsedObject,
};
pub use files::{read_records, write_scenes, ObjectRecord, SceneRecord, WriteOptions};
pub use render::{inside, paint, render, render_sized, Rendered, SUPERSAMPLE};
pub use scene::{personalization_scene, personalization_scene_n, random_scene, MAX_CONCEPTS, scene_seed, Object, Scene, WorldSpec, IMAGE_SIZE};
pub use vocab::{
    color_distance, is_personalization_look, random_unnamed_look, unnamed_appearance, unnamed_appearances, Appearance,
    Class, NamedColor, Pattern, Rgb, UnnamedAppearance, UnnamedLayout, MIN_CONTRAST, UNNAMED_PALETTE,
};
