//! Scores of generated images against a personalization task, with the oracle:
//!
//! - identity fidelity of concept k in an image = the best appearance similarity (oracle,
//!   0..1) between any detected object and the reference object k of the training scene;
//! - leakage, on a single-concept prompt for concept k: some detected object looks like the
//!   *other* concept j (similarity to j at least [`SAME_APPEARANCE`] and above its similarity
//!   to k);
//! - leak similarity, on the same prompts: the highest similarity of any detected object to
//!   the other concept j, the continuous counterpart of leakage (the 0.5 threshold was
//!   validated on clean renders, and generated objects rarely come that close to either
//!   concept; this also catches one object wearing the other concept's look);
//! - prompt fidelity, on edited prompts: the asked background is the image's background, and
//!   an added named object is present (a detected object of that class and colour).

use super::oracle::{analyze, appearance_similarity, background_color_among, reference_objects, ReferenceObject, SceneAnalysis};
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
    /// For single-concept prompts: the other concept shows up.
    pub leaked: Option<bool>,
    /// For single-concept prompts: the highest similarity of an object to the other concept.
    pub leak_similarity: Option<f32>,
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

    pub fn score(&self, img: &RgbImage, spec: &PromptSpec) -> ImageScore {
        let a = analyze(img);
        let fidelity: Vec<f32> = spec.concepts.iter().map(|&k| self.similarity(&a, k).into_iter().fold(0.0, f32::max)).collect();
        let leak_similarity =
            (spec.concepts.len() == 1).then(|| self.similarity(&a, 1 - spec.concepts[0]).into_iter().fold(0.0, f32::max));
        let leaked = (spec.concepts.len() == 1).then(|| {
            let k = spec.concepts[0];
            let j = 1 - k;
            let sim_k = self.similarity(&a, k);
            let sim_j = self.similarity(&a, j);
            sim_j.iter().zip(&sim_k).any(|(sj, sk)| *sj >= SAME_APPEARANCE && sj > sk)
        });
        let edit_ok = (!spec.base).then(|| {
            let bg_ok = background_color_among(img, NamedColor::BACKGROUND) == spec.background;
            let added_ok = match spec.added {
                None => true,
                Some((color, class)) => a.objects.iter().any(|o| o.class == class && o.color == color),
            };
            bg_ok && added_ok
        });
        ImageScore { fidelity, leaked, leak_similarity, edit_ok, objects: a.objects.len() }
    }
}

/// Aggregates of one method over all tasks, in the shape of the paper's Fig. 6 table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MethodScores {
    pub fidelity: FidelityTable,
    pub leakage: f64,
    /// Mean over single-concept images of the highest similarity to the other concept.
    pub leak_similarity: f64,
    pub prompt_fidelity: f64,
    pub train_seconds: f64,
    /// The trained model's attention on its training image (mean over scenes).
    pub attention: AttentionDiagnostics,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FidelityTable {
    pub combined: f64,
    pub concept1: f64,
    pub concept2: f64,
    pub mean: f64,
}

/// Running sums for [`MethodScores`].
#[derive(Default)]
pub struct Tally {
    combined: (f64, usize),
    concept1: (f64, usize),
    concept2: (f64, usize),
    leaks: (usize, usize),
    leak_similarity: (f64, usize),
    edits: (usize, usize),
    pub train_seconds: f64,
    pub attention: Vec<AttentionDiagnostics>,
}

impl Tally {
    /// Adds an image scored for a prompt of the given set ("combined", "concept1", "concept2").
    pub fn add(&mut self, set: &str, s: &ImageScore) {
        let f = s.fidelity.iter().map(|&v| v as f64).sum::<f64>() / s.fidelity.len().max(1) as f64;
        let slot = match set {
            "combined" => &mut self.combined,
            "concept1" => &mut self.concept1,
            _ => &mut self.concept2,
        };
        slot.0 += f;
        slot.1 += 1;
        if let Some(l) = s.leaked {
            self.leaks.0 += l as usize;
            self.leaks.1 += 1;
        }
        if let Some(v) = s.leak_similarity {
            self.leak_similarity.0 += v as f64;
            self.leak_similarity.1 += 1;
        }
        if let Some(e) = s.edit_ok {
            self.edits.0 += e as usize;
            self.edits.1 += 1;
        }
    }

    pub fn finish(&self) -> MethodScores {
        let avg = |(s, n): (f64, usize)| if n == 0 { 0.0 } else { s / n as f64 };
        let frac = |(k, n): (usize, usize)| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        let (c, c1, c2) = (avg(self.combined), avg(self.concept1), avg(self.concept2));
        MethodScores {
            fidelity: FidelityTable { combined: c, concept1: c1, concept2: c2, mean: (c + c1 + c2) / 3.0 },
            leakage: frac(self.leaks),
            leak_similarity: avg(self.leak_similarity),
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
        let spec = task.prompt_sets().concept1[0].clone(); // asks for concept 0 alone
        let alone = |k: usize| render(&Scene { background: task.scene.background, objects: vec![task.scene.objects[k].clone()] }).image;
        let own = scorer.score(&alone(0), &spec);
        assert_eq!(own.leaked, Some(false));
        assert!(own.leak_similarity.unwrap() < 0.3, "own look: leak similarity {:?}", own.leak_similarity);
        assert!(own.fidelity[0] > 0.5, "own look: fidelity {:?}", own.fidelity);
        let other = scorer.score(&alone(1), &spec);
        assert_eq!(other.leaked, Some(true));
        assert!(other.leak_similarity.unwrap() > 0.5, "other look: leak similarity {:?}", other.leak_similarity);
        let combined = scorer.score(&task.image, &task.prompt_sets().combined[0]);
        assert_eq!((combined.leaked, combined.leak_similarity), (None, None));
    }
}
