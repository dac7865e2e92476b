//! Scores of generated images against a personalization task, with the oracle:
//!
//! - identity fidelity of concept k in an image = the best appearance similarity (oracle,
//!   0..1) between any detected object and the reference object k of the training scene;
//! - leakage, on a single-concept prompt for concept k: some detected object looks like the
//!   *other* concept j (similarity to j at least [`SAME_APPEARANCE`] and above its similarity
//!   to k);
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
        ImageScore { fidelity, leaked, edit_ok, objects: a.objects.len() }
    }
}

/// Aggregates of one method over all tasks, in the shape of the paper's Fig. 6 table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MethodScores {
    pub fidelity: FidelityTable,
    pub leakage: f64,
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
