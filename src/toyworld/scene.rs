//! Scenes and their sampling: the training world ([`random_scene`]) and the personalization
//! scenes of two ([`personalization_scene`]) or up to three concepts ([`personalization_scene_n`]).

use super::vocab::{random_unnamed_look, unnamed_appearances, Appearance, Class, NamedColor, Pattern};
use anyhow::{bail, Result};
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Width and height of the world in pixels; object coordinates are in these units.
pub const IMAGE_SIZE: u32 = 64;

/// One object. Coordinates are pixels of the 64x64 world (x right, y down).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub class: Class,
    pub appearance: Appearance,
    /// Centre.
    pub cx: f32,
    pub cy: f32,
    /// Radius of the circle that holds the shape.
    pub size: f32,
    /// Degrees, clockwise as seen in the image; the pattern turns with the shape.
    pub rotation: f32,
}

/// Objects are drawn in order: a later object hides an earlier one where they overlap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: NamedColor,
    pub objects: Vec<Object>,
}

/// What the training world samples from.
#[derive(Clone, Debug)]
pub struct WorldSpec {
    pub classes: Vec<Class>,
    /// Object colours.
    pub colors: Vec<NamedColor>,
    pub patterns: Vec<Pattern>,
    pub backgrounds: Vec<NamedColor>,
    /// Objects per scene, drawn uniformly from `min_objects..=max_objects` (1 to 3).
    pub min_objects: usize,
    pub max_objects: usize,
    /// Share of objects drawn with an unnamed two-colour look (captioned by class alone, as
    /// web captions say "a cat" whatever the cat looks like), so that the base model can draw
    /// such looks and personalization has something to bind. The personalization looks
    /// themselves never occur. 0 gives the all-named world.
    pub unnamed_share: f32,
}

impl Default for WorldSpec {
    fn default() -> Self {
        WorldSpec {
            classes: Class::ALL.to_vec(),
            colors: NamedColor::OBJECT.to_vec(),
            patterns: Pattern::ALL.to_vec(),
            backgrounds: NamedColor::BACKGROUND.to_vec(),
            min_objects: 1,
            max_objects: 3,
            unnamed_share: 0.0,
        }
    }
}

impl WorldSpec {
    /// Checks that scenes can be drawn from this spec.
    pub fn validate(&self) -> Result<()> {
        if self.classes.is_empty() || self.colors.is_empty() || self.patterns.is_empty() {
            bail!("the world needs at least one class, one colour and one pattern");
        }
        if !(1..=3).contains(&self.min_objects) || !(self.min_objects..=3).contains(&self.max_objects) {
            bail!("objects per scene must satisfy 1 <= min ({}) <= max ({}) <= 3", self.min_objects, self.max_objects);
        }
        if !(0.0..=1.0).contains(&self.unnamed_share) {
            bail!("the unnamed share must be between 0 and 1 (got {})", self.unnamed_share);
        }
        if !self.backgrounds.iter().any(|&bg| !self.combos(bg).is_empty()) {
            bail!("no object colour contrasts with any of the backgrounds");
        }
        Ok(())
    }

    /// The (colour, pattern) pairs whose tones all contrast with `bg`.
    fn combos(&self, bg: NamedColor) -> Vec<(NamedColor, Pattern)> {
        let mut v = Vec::new();
        for &p in &self.patterns {
            for &c in &self.colors {
                if Appearance::named(c, p).contrasts_with(bg) {
                    v.push((c, p));
                }
            }
        }
        v
    }
}

/// The seed of scene `index` of a run seeded `seed` (SplitMix64 of both), so that scene i is
/// the same whatever the number of scenes written.
pub fn scene_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Object radius range (pixels) for a scene of `n` objects.
fn size_range(n: usize) -> (f32, f32) {
    match n {
        1 => (14.0, 22.0),
        2 => (11.0, 17.0),
        _ => (10.0, 14.0),
    }
}

/// Largest rotation, degrees either way, per class (the disc-like ones stay upright so their
/// patterns keep one orientation).
fn max_rotation(class: Class) -> f32 {
    match class {
        Class::Ball | Class::Ring => 0.0,
        Class::Box => 25.0,
        Class::Star => 36.0,
        Class::Cross => 20.0,
        Class::Heart | Class::Triangle => 15.0,
    }
}

/// Rounds to `1 / per_unit` (exactly the f32 nearest to the decimal, for tidy JSON).
fn round_to(x: f32, per_unit: f32) -> f32 {
    (x * per_unit).round() / per_unit
}

/// Places `n` circles with radii drawn from `sizes`, fully inside the image, each pair of
/// centres at least `overlap * (r1 + r2) + gap` apart. Shrinks the radii if it cannot.
fn layout<R: Rng + ?Sized>(rng: &mut R, n: usize, sizes: (f32, f32), overlap: f32, gap: f32) -> Vec<(f32, f32, f32)> {
    let w = IMAGE_SIZE as f32;
    let mut scale = 1.0f32;
    for attempt in 0.. {
        if attempt > 0 && attempt % 20 == 0 {
            scale *= 0.93;
        }
        let mut placed: Vec<(f32, f32, f32)> = Vec::with_capacity(n);
        for _ in 0..n {
            let r = round_to(rng.random_range(sizes.0..=sizes.1) * scale, 100.0);
            for _ in 0..100 {
                let cx = round_to(rng.random_range(r + 1.0..=w - r - 1.0), 100.0);
                let cy = round_to(rng.random_range(r + 1.0..=w - r - 1.0), 100.0);
                let apart = placed
                    .iter()
                    .all(|&(x, y, s)| ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() >= overlap * (r + s) + gap);
                if apart {
                    placed.push((cx, cy, r));
                    break;
                }
            }
        }
        if placed.len() == n {
            return placed;
        }
    }
    unreachable!()
}

fn rotation<R: Rng + ?Sized>(rng: &mut R, class: Class) -> f32 {
    let m = max_rotation(class);
    if m == 0.0 {
        0.0
    } else {
        round_to(rng.random_range(-m..=m), 10.0)
    }
}

/// A scene of the training world: 1 to 3 objects, each contrasting with the background, with
/// named appearances (and unnamed ones at `spec.unnamed_share`); classes may repeat, but no two
/// named objects share class, colour and pattern.
/// Panics if `spec` does not pass [`WorldSpec::validate`].
pub fn random_scene<R: Rng + ?Sized>(rng: &mut R, spec: &WorldSpec) -> Scene {
    spec.validate().expect("invalid WorldSpec");
    let backgrounds: Vec<NamedColor> =
        spec.backgrounds.iter().copied().filter(|&bg| !spec.combos(bg).is_empty()).collect();
    let background = *backgrounds.choose(rng).unwrap();
    let combos = spec.combos(background);
    let mut patterns: Vec<Pattern> = combos.iter().map(|c| c.1).collect();
    patterns.dedup();
    let n = rng.random_range(spec.min_objects..=spec.max_objects);
    let mut looks: Vec<(Class, Appearance)> = Vec::with_capacity(n);
    while looks.len() < n {
        // The share is only drawn when non-zero, so the all-named world keeps its scenes.
        if spec.unnamed_share > 0.0 && rng.random::<f32>() < spec.unnamed_share {
            let class = *spec.classes.choose(rng).unwrap();
            let look = Appearance::Unnamed(random_unnamed_look(rng));
            if look.contrasts_with(background) {
                looks.push((class, look));
            }
            continue;
        }
        let class = *spec.classes.choose(rng).unwrap();
        let pattern = *patterns.choose(rng).unwrap();
        let colors: Vec<NamedColor> = combos.iter().filter(|c| c.1 == pattern).map(|c| c.0).collect();
        let look = (class, Appearance::named(*colors.choose(rng).unwrap(), pattern));
        // Identical twins would make captions like "a red ball and a red ball"; avoid them
        // unless the spec leaves no other choice.
        if !looks.contains(&look) || spec.classes.len() * combos.len() < n {
            looks.push(look);
        }
    }
    let places = layout(rng, n, size_range(n), 0.92, 0.0);
    let objects = looks
        .into_iter()
        .zip(places)
        .map(|((class, appearance), (cx, cy, size))| Object {
            class,
            appearance,
            cx,
            cy,
            size,
            rotation: rotation(rng, class),
        })
        .collect();
    Scene { background, objects }
}

/// A personalization scene: two objects of different classes, each with its own unnamed
/// appearance (no colour shared between them), large (radius 13-16 px) and clearly apart, on a
/// background that contrasts with both. Deterministic in `seed`.
pub fn personalization_scene(seed: u64) -> Scene {
    personalization_scene_n(seed, 2).expect("two concepts are always drawable")
}

/// Most concepts a personalization scene holds (the world draws at most three objects).
pub const MAX_CONCEPTS: usize = 3;

/// A personalization scene of `n` concepts (1 to [`MAX_CONCEPTS`]): `n` objects of different
/// classes, each with its own unnamed appearance (no colour shared between any two), clearly
/// apart (at least 3 px between bounding circles), on a background that contrasts with all.
/// Radii are 13-16 px for one or two objects, 11-13 px for three (three circles of radius 16
/// do not fit 3 px apart in 64x64). `n = 2` is [`personalization_scene`]. Deterministic in
/// `(seed, n)`.
pub fn personalization_scene_n(seed: u64, n: usize) -> Result<Scene> {
    if !(1..=MAX_CONCEPTS).contains(&n) {
        bail!("a personalization scene holds 1 to {MAX_CONCEPTS} concepts (got {n})");
    }
    let mut rng = crate::util::seeded_rng(scene_seed(seed, u64::MAX));
    let unnamed = unnamed_appearances();
    let sizes = if n <= 2 { (13.0, 16.0) } else { (11.0, 13.0) };
    loop {
        let classes: Vec<Class> = Class::ALL.choose_multiple(&mut rng, n).copied().collect();
        let looks: Vec<_> = unnamed.choose_multiple(&mut rng, n).cloned().collect();
        let shared = (0..n).any(|i| (i + 1..n).any(|j| looks[i].colors.iter().any(|c| looks[j].colors.contains(c))));
        if shared {
            continue;
        }
        let appearances: Vec<Appearance> = looks.into_iter().map(Appearance::Unnamed).collect();
        let backgrounds: Vec<NamedColor> = NamedColor::BACKGROUND
            .iter()
            .copied()
            .filter(|&bg| appearances.iter().all(|a| a.contrasts_with(bg)))
            .collect();
        let Some(&background) = backgrounds.choose(&mut rng) else { continue };
        let places = layout(&mut rng, n, sizes, 1.0, 3.0);
        let objects = classes
            .into_iter()
            .zip(appearances)
            .zip(places)
            .map(|((class, appearance), (cx, cy, size))| Object {
                class,
                appearance,
                cx,
                cy,
                size,
                rotation: rotation(&mut rng, class),
            })
            .collect();
        return Ok(Scene { background, objects });
    }
}
