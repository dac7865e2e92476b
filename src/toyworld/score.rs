//! Scores of generated images against a personalization task, with the oracle:
//!
//! - identity fidelity of concept k in an image = the best appearance similarity (oracle,
//!   0..1) between any detected object and the reference object k of the training scene;
//! - leakage, on a single-concept prompt for concept k: the image shows another concept j
//!   (with three concepts, any of the other two: every pair (k, j) is checked), in either of
//!   the two ways the paper's Fig. 2 failure takes:
//!   - *other object*: an object of j's class is there (the other concept dragged along;
//!     judged by shape, which the oracle names at 99-100% on clean and degraded renders);
//!   - *look swap*: the object asked for wears j's look (its appearance is nearer j's than
//!     k's; among the asked class's objects, or all objects when the class is missing). This
//!     compares distances, so it works on soft renders far from both looks, where similarity
//!     thresholds never fire (the oracle's "nearest reference" is 99-100% right even on harsh
//!     degradations);
//!   - or, as before, some object has j's look outright (similarity >= [`SAME_APPEARANCE`]
//!     and above its similarity to k);
//! - leak similarity, on the same prompts: the highest similarity of any detected object to
//!   any other concept j (continuous, for reference);
//! - composition, on combined prompts: every concept's class is there;
//! - prompt fidelity, on edited prompts: the asked background is the image's background, and
//!   an added named object is present (a detected object of that class and colour).

use super::oracle::{analyze, appearance_distance, appearance_similarity, background_color_among, reference_objects, ReferenceObject, SceneAnalysis};
use super::experiment::AttentionDiagnostics;
use super::task::{PromptSpec, Task};
use super::NamedColor;
use image::RgbImage;
use serde::Serialize;

/// Appearance similarity from which two objects count as the same look: the oracle's
/// validated decision threshold.
pub const SAME_APPEARANCE: f32 = super::oracle::SAME_APPEARANCE_THRESHOLD;

/// The scores of one generated image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageScore {
    /// Fidelity per requested concept (same order as the prompt's concepts).
    pub fidelity: Vec<f32>,
    /// For single-concept prompts: another concept shows up (other object, look swap, or
    /// an object with its look).
    pub leaked: Option<bool>,
    /// For single-concept prompts: an object of another concept's class is there.
    pub other_object: Option<bool>,
    /// For single-concept prompts: the asked object looks more like another concept than
    /// like its own (`None` when nothing was detected).
    pub look_swap: Option<bool>,
    /// For single-concept prompts: the highest similarity of an object to another concept.
    pub leak_similarity: Option<f32>,
    /// For combined prompts: objects of every concept's class are there.
    pub both_present: Option<bool>,
    /// For edited prompts: the edit is there.
    pub edit_ok: Option<bool>,
    pub objects: usize,
}

pub struct Scorer {
    refs: Vec<ReferenceObject>,
}

impl Scorer {
    pub fn new(task: &Task) -> Self {
        Self { refs: reference_objects(&task.scene) }
    }

    fn similarity(&self, a: &SceneAnalysis, k: usize) -> Vec<f32> {
        a.objects.iter().map(|o| appearance_similarity(&o.appearance, &self.refs[k].appearance)).collect()
    }

    /// Whether the object asked for as concept `k` looks nearer concept `j`: the smallest
    /// appearance distance to j beats the smallest to k, over the objects of k's class (all
    /// objects when none has it). `None` when nothing was detected.
    fn look_swap(&self, a: &SceneAnalysis, k: usize, j: usize) -> Option<bool> {
        let of_class: Vec<_> = a.objects.iter().filter(|o| o.class == self.refs[k].class).collect();
        let candidates = if of_class.is_empty() { a.objects.iter().collect() } else { of_class };
        let nearest = |r: usize| {
            candidates.iter().map(|o| appearance_distance(&o.appearance, &self.refs[r].appearance)).fold(f32::INFINITY, f32::min)
        };
        (!candidates.is_empty()).then(|| nearest(j) < nearest(k))
    }

    pub fn score(&self, img: &RgbImage, spec: &PromptSpec) -> ImageScore {
        let a = analyze(img);
        let fidelity: Vec<f32> = spec.concepts.iter().map(|&k| self.similarity(&a, k).into_iter().fold(0.0, f32::max)).collect();
        // A single-concept prompt for k, and the other concepts j that must not show up.
        let single = (spec.concepts.len() == 1 && self.refs.len() > 1)
            .then(|| (spec.concepts[0], (0..self.refs.len()).filter(|&j| j != spec.concepts[0]).collect::<Vec<_>>()));
        let leak_similarity = single
            .as_ref()
            .map(|(_, others)| others.iter().flat_map(|&j| self.similarity(&a, j)).fold(0.0, f32::max));
        let other_object = single.as_ref().map(|(_, others)| others.iter().any(|&j| a.count_class(self.refs[j].class) > 0));
        // A look swap towards any other concept (each pair judged on its own distances);
        // `None` only when nothing was detected.
        let look_swap = single.as_ref().and_then(|(k, others)| {
            let v: Vec<bool> = others.iter().filter_map(|&j| self.look_swap(&a, *k, j)).collect();
            (!v.is_empty()).then(|| v.contains(&true))
        });
        let leaked = single.as_ref().map(|(k, others)| {
            let sim_k = self.similarity(&a, *k);
            let same_look = others.iter().any(|&j| {
                let sim_j = self.similarity(&a, j);
                sim_j.iter().zip(&sim_k).any(|(sj, sk)| *sj >= SAME_APPEARANCE && sj > sk)
            });
            same_look || other_object == Some(true) || look_swap == Some(true)
        });
        let both_present =
            (spec.concepts.len() > 1).then(|| spec.concepts.iter().all(|&k| a.count_class(self.refs[k].class) > 0));
        let edit_ok = (!spec.base).then(|| {
            let bg_ok = background_color_among(img, NamedColor::BACKGROUND) == spec.background;
            let added_ok = match spec.added {
                None => true,
                Some((color, class)) => a.objects.iter().any(|o| o.class == class && o.color == color),
            };
            bg_ok && added_ok
        });
        ImageScore { fidelity, leaked, other_object, look_swap, leak_similarity, both_present, edit_ok, objects: a.objects.len() }
    }
}

/// Aggregates of one method over all tasks, in the shape of the paper's Fig. 6 table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MethodScores {
    pub fidelity: FidelityTable,
    /// Share of single-concept images showing another concept (any of the ways below).
    pub leakage: f64,
    /// Share of single-concept images with an object of another concept's class.
    pub other_object: f64,
    /// Share of single-concept images whose asked object wears another concept's look.
    pub look_swap: f64,
    /// Mean over single-concept images of the highest similarity to another concept.
    pub leak_similarity: f64,
    /// Share of combined images showing every concept's class.
    pub composition: f64,
    pub prompt_fidelity: f64,
    pub train_seconds: f64,
    /// The trained model's attention on its training image (mean over scenes).
    pub attention: AttentionDiagnostics,
}

/// Identity fidelity per prompt set. Serialized as `{"combined", "concept1", "concept2", ...,
/// "mean"}`, one `conceptK` per concept.
#[derive(Clone, Debug, Default)]
pub struct FidelityTable {
    pub combined: f64,
    /// `single[k]`: the prompts of concept k alone.
    pub single: Vec<f64>,
    /// Mean of the combined and the single sets.
    pub mean: f64,
}

impl Serialize for FidelityTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.single.len() + 2))?;
        m.serialize_entry("combined", &self.combined)?;
        for (k, v) in self.single.iter().enumerate() {
            m.serialize_entry(&format!("concept{}", k + 1), v)?;
        }
        m.serialize_entry("mean", &self.mean)?;
        m.end()
    }
}

/// Running sums for [`MethodScores`].
#[derive(Default)]
pub struct Tally {
    combined: (f64, usize),
    /// Per concept alone, grown as sets are added.
    single: Vec<(f64, usize)>,
    leaks: (usize, usize),
    other_object: (usize, usize),
    look_swap: (usize, usize),
    leak_similarity: (f64, usize),
    composition: (usize, usize),
    edits: (usize, usize),
    pub train_seconds: f64,
    pub attention: Vec<AttentionDiagnostics>,
}

impl Tally {
    /// Adds an image scored for a prompt of the combined set (`None`) or of concept k alone
    /// (`Some(k)`, as [`super::task::PromptSets::named`] gives).
    pub fn add(&mut self, set: Option<usize>, s: &ImageScore) {
        let f = s.fidelity.iter().map(|&v| v as f64).sum::<f64>() / s.fidelity.len().max(1) as f64;
        let slot = match set {
            None => &mut self.combined,
            Some(k) => {
                if self.single.len() <= k {
                    self.single.resize(k + 1, (0.0, 0));
                }
                &mut self.single[k]
            }
        };
        slot.0 += f;
        slot.1 += 1;
        let count = |slot: &mut (usize, usize), v: Option<bool>| {
            if let Some(v) = v {
                slot.0 += v as usize;
                slot.1 += 1;
            }
        };
        count(&mut self.leaks, s.leaked);
        count(&mut self.other_object, s.other_object);
        count(&mut self.look_swap, s.look_swap);
        count(&mut self.composition, s.both_present);
        count(&mut self.edits, s.edit_ok);
        if let Some(v) = s.leak_similarity {
            self.leak_similarity.0 += v as f64;
            self.leak_similarity.1 += 1;
        }
    }

    pub fn finish(&self) -> MethodScores {
        let avg = |(s, n): (f64, usize)| if n == 0 { 0.0 } else { s / n as f64 };
        let frac = |(k, n): (usize, usize)| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        let c = avg(self.combined);
        let single: Vec<f64> = self.single.iter().map(|&v| avg(v)).collect();
        let mean = (c + single.iter().sum::<f64>()) / (1 + single.len()) as f64;
        MethodScores {
            fidelity: FidelityTable { combined: c, single, mean },
            leakage: frac(self.leaks),
            other_object: frac(self.other_object),
            look_swap: frac(self.look_swap),
            leak_similarity: avg(self.leak_similarity),
            composition: frac(self.composition),
            prompt_fidelity: frac(self.edits),
            train_seconds: self.train_seconds,
            attention: mean_diagnostics(&self.attention),
        }
    }
}

fn mean_diagnostics(v: &[AttentionDiagnostics]) -> AttentionDiagnostics {
    let n = v.len().max(1) as f64;
    let sum = |f: fn(&AttentionDiagnostics) -> f64| v.iter().map(f).sum::<f64>() / n;
    AttentionDiagnostics {
        l_bind: sum(|d| d.l_bind),
        l_ss: sum(|d| d.l_ss),
        class_iou_own: sum(|d| d.class_iou_own),
        class_iou_other: sum(|d| d.class_iou_other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toyworld::{render, Scene};

    /// A single-concept image showing only the *other* concept leaks (and its leak similarity
    /// is high); one showing only the asked concept does not.
    #[test]
    fn leakage_and_leak_similarity_on_clean_renders() {
        let task = Task::new(3);
        let scorer = Scorer::new(&task);
        let spec = task.prompt_sets().single[0][0].clone(); // asks for concept 0 alone
        let alone = |k: usize| render(&Scene { background: task.scene.background, objects: vec![task.scene.objects[k].clone()] }).image;
        let own = scorer.score(&alone(0), &spec);
        assert_eq!(own.leaked, Some(false));
        assert!(own.leak_similarity.unwrap() < 0.3, "own look: leak similarity {:?}", own.leak_similarity);
        assert!(own.fidelity[0] > 0.5, "own look: fidelity {:?}", own.fidelity);
        let other = scorer.score(&alone(1), &spec);
        assert_eq!(other.leaked, Some(true));
        assert!(other.leak_similarity.unwrap() > 0.5, "other look: leak similarity {:?}", other.leak_similarity);
        assert_eq!((own.other_object, own.look_swap), (Some(false), Some(false)));
        // the other concept alone: its class is there, and it is the nearest look
        assert_eq!((other.other_object, other.look_swap), (Some(true), Some(true)));
        let combined = scorer.score(&task.image, &task.prompt_sets().combined[0]);
        assert_eq!((combined.leaked, combined.leak_similarity, combined.both_present), (None, None, Some(true)));
        assert_eq!(scorer.score(&alone(0), &task.prompt_sets().combined[0]).both_present, Some(false));
    }

    /// A soft, washed-out copy, as the toy model draws: Gaussian blur, then every colour
    /// pulled 35% towards mid-grey.
    fn soften(img: &RgbImage) -> RgbImage {
        let mut out = image::imageops::blur(img, 1.5);
        for p in out.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = (0.65 * *c as f32 + 0.35 * 128.0).round() as u8;
            }
        }
        out
    }

    /// Attribute leakage: the asked object in the other concept's look is a look swap (and a
    /// leak) without any object of the other class, and the asked object in its own look is
    /// neither; the same holds on softened renders (fidelity 0.01-0.72, mean about 0.43), where
    /// the 0.5 similarity threshold would no longer see the looks.
    #[test]
    fn look_swap_on_clean_and_blurred_renders() {
        let mut soft_fidelity = Vec::new();
        for seed in 1..=6 {
            let task = Task::new(seed);
            let scorer = Scorer::new(&task);
            for k in 0..2 {
                let spec = task.prompt_sets().single[k][0].clone();
                let mut swapped = task.scene.objects[k].clone();
                swapped.appearance = task.scene.objects[1 - k].appearance.clone();
                let img = render(&Scene { background: task.scene.background, objects: vec![swapped] }).image;
                let own = render(&Scene { background: task.scene.background, objects: vec![task.scene.objects[k].clone()] }).image;
                for blurred in [false, true] {
                    let prep = |i: &RgbImage| if blurred { soften(i) } else { i.clone() };
                    let s = scorer.score(&prep(&img), &spec);
                    assert_eq!((s.other_object, s.look_swap, s.leaked), (Some(false), Some(true), Some(true)), "scene {seed} concept {k} blurred {blurred}");
                    let s = scorer.score(&prep(&own), &spec);
                    if blurred {
                        soft_fidelity.push(s.fidelity[0]);
                    }
                    assert_eq!((s.other_object, s.look_swap, s.leaked), (Some(false), Some(false), Some(false)), "scene {seed} concept {k} blurred {blurred} (own look)");
                }
            }
        }
        // the softened own looks are as far from their references as generated ones are
        let mean = soft_fidelity.iter().sum::<f32>() / soft_fidelity.len() as f32;
        assert!(mean < 0.5, "softening left the looks too close to the references: mean fidelity {mean}");
    }

    /// Three concepts, every ordered pair (k, j): concept k alone does not leak; k drawn next
    /// to j leaks as another object; k's object wearing j's look is a look swap; the full
    /// training image composes all three, and leaving any one out does not. Clean renders.
    #[test]
    fn leakage_over_all_pairs_of_three_concepts() {
        for seed in 1..=4 {
            let task = Task::with_concepts(seed, 3).unwrap();
            let scorer = Scorer::new(&task);
            let sets = task.prompt_sets();
            let bg = task.scene.background;
            let objs = &task.scene.objects;
            for k in 0..3 {
                let spec = &sets.single[k][0];
                let own = scorer.score(&render(&Scene { background: bg, objects: vec![objs[k].clone()] }).image, spec);
                assert_eq!((own.leaked, own.other_object, own.look_swap), (Some(false), Some(false), Some(false)), "scene {seed} concept {k} alone");
                for j in (0..3).filter(|&j| j != k) {
                    let pair = render(&Scene { background: bg, objects: vec![objs[k].clone(), objs[j].clone()] }).image;
                    let s = scorer.score(&pair, spec);
                    assert_eq!((s.leaked, s.other_object), (Some(true), Some(true)), "scene {seed}: concept {k} with {j}");
                    let mut swapped = objs[k].clone();
                    swapped.appearance = objs[j].appearance.clone();
                    let s = scorer.score(&render(&Scene { background: bg, objects: vec![swapped] }).image, spec);
                    assert_eq!((s.other_object, s.look_swap, s.leaked), (Some(false), Some(true), Some(true)), "scene {seed}: concept {k} in {j}'s look");
                }
                let without: Vec<_> = objs.iter().enumerate().filter(|(i, _)| *i != k).map(|(_, o)| o.clone()).collect();
                let s = scorer.score(&render(&Scene { background: bg, objects: without }).image, &sets.combined[0]);
                assert_eq!(s.both_present, Some(false), "scene {seed} without concept {k}");
            }
            let s = scorer.score(&task.image, &sets.combined[0]);
            assert_eq!((s.both_present, s.leaked), (Some(true), None), "scene {seed} combined");
        }
    }

    /// The fidelity table serializes one `conceptK` per concept, and its mean is over the
    /// combined set and every single set.
    #[test]
    fn fidelity_table_keys_follow_the_concepts() {
        let mut t = Tally::default();
        let score = |f: f32| ImageScore { fidelity: vec![f], leaked: None, other_object: None, look_swap: None, leak_similarity: None, both_present: None, edit_ok: None, objects: 1 };
        t.add(None, &score(0.4));
        t.add(Some(0), &score(0.1));
        t.add(Some(1), &score(0.2));
        t.add(Some(2), &score(0.3));
        let f = t.finish().fidelity;
        assert!((f.mean - 0.25).abs() < 1e-6, "{f:?}");
        let json = serde_json::to_value(&f).unwrap();
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 5, "{json}");
        assert!((json["concept3"].as_f64().unwrap() - 0.3).abs() < 1e-6, "{json}");
    }
}
