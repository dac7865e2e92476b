//! The paper's evaluation protocol (section 4.1, Fig. 6): for each of a dataset's three prompt
//! sets (combined, concept1, concept2), N images per prompt with DDIM (50 steps, eta 1,
//! guidance 6, empty negative prompt), then CLIPScore of every image with its prompt and image
//! alignment with the set's references (the whole training image for combined prompts, the
//! concept's crop for a concept's prompts); the report is the mean of each set and the mean of
//! the three.
//!
//! Resumable: images are written as `OUT/images/<set>/<prompt index>/<image index>.png` and
//! one that exists is not generated again; image j of every prompt uses seed `seed + j`.

use super::prompts::EvalPrompts;
use super::{mean, score_pairs, Scorer};
use crate::model::sd::StableDiffusion;
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::util;
use anyhow::{Context, Result};
use image::RgbImage;
use serde::Serialize;
use std::path::Path;

/// The sets, in report order.
pub const SETS: [&str; 3] = ["combined", "concept1", "concept2"];

/// Sampling settings of the protocol (the paper's by default).
#[derive(Debug, Clone)]
pub struct ProtocolSettings {
    pub num_images: usize,
    pub steps: usize,
    pub eta: f64,
    pub guidance_scale: f64,
    pub seed: u64,
    /// Only the first K prompts of each set (all when `None`).
    pub max_prompts: Option<usize>,
}

impl Default for ProtocolSettings {
    fn default() -> Self {
        Self { num_images: 16, steps: 50, eta: 1.0, guidance_scale: 6.0, seed: 42, max_prompts: None }
    }
}

/// The reference images of each set.
pub struct References {
    pub combined: Vec<RgbImage>,
    pub concept1: Vec<RgbImage>,
    pub concept2: Vec<RgbImage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptScores {
    pub prompt: String,
    pub clipscore: f64,
    pub image_alignment: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetScores {
    pub set: String,
    pub clipscore: f64,
    pub image_alignment: f64,
    pub prompts: Vec<PromptScores>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub sets: Vec<SetScores>,
    pub mean_clipscore: f64,
    pub mean_image_alignment: f64,
    pub num_images: usize,
    pub steps: usize,
    pub eta: f64,
    pub guidance_scale: f64,
    pub seed: u64,
}

/// The N images of one prompt: read where they exist, generated (and written) where not.
fn images_of(sd: &StableDiffusion, prompt: &str, dir: &Path, s: &ProtocolSettings) -> Result<Vec<RgbImage>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    (0..s.num_images)
        .map(|j| {
            let path = dir.join(format!("{j:05}.png"));
            if path.is_file() {
                return util::load_rgb(&path);
            }
            let mut p = Text2ImageParams::new(sd, prompt);
            p.steps = s.steps;
            p.eta = s.eta;
            p.guidance_scale = s.guidance_scale;
            p.seed = s.seed + j as u64;
            let img = util::to_rgb8(&text2img::generate(sd, &p, |_, _| {})?)?.remove(0);
            util::save_png(&img, &path)?;
            Ok(img)
        })
        .collect()
}

/// Runs the protocol, writing the images under `out/images/` (`on_prompt(set, index, prompt)`
/// is called before each prompt).
pub fn run<S: Scorer>(
    sd: &StableDiffusion,
    prompts: &EvalPrompts,
    references: &References,
    scorer: &S,
    out: &Path,
    s: &ProtocolSettings,
    mut on_prompt: impl FnMut(&str, usize, &str),
) -> Result<Report> {
    let mut sets = Vec::new();
    for (set, list, refs) in [
        ("combined", &prompts.combined, &references.combined),
        ("concept1", &prompts.concept1, &references.concept1),
        ("concept2", &prompts.concept2, &references.concept2),
    ] {
        let n = s.max_prompts.unwrap_or(list.len()).min(list.len());
        let mut per = Vec::new();
        for (i, prompt) in list.iter().take(n).enumerate() {
            on_prompt(set, i, prompt);
            let imgs = images_of(sd, prompt, &out.join("images").join(set).join(format!("{i:02}")), s)?;
            let ps: Vec<&str> = vec![prompt.as_str(); imgs.len()];
            let scores = score_pairs(scorer, &imgs, &ps, Some(refs))?;
            let clip: Vec<f64> = scores.iter().map(|x| x.text_alignment).collect();
            let align: Vec<f64> = scores.iter().filter_map(|x| x.image_alignment).collect();
            per.push(PromptScores { prompt: prompt.clone(), clipscore: mean(&clip), image_alignment: mean(&align) });
        }
        let clipscore = mean(&per.iter().map(|p| p.clipscore).collect::<Vec<_>>());
        let image_alignment = mean(&per.iter().map(|p| p.image_alignment).collect::<Vec<_>>());
        sets.push(SetScores { set: set.to_string(), clipscore, image_alignment, prompts: per });
    }
    Ok(Report {
        mean_clipscore: mean(&sets.iter().map(|x| x.clipscore).collect::<Vec<_>>()),
        mean_image_alignment: mean(&sets.iter().map(|x| x.image_alignment).collect::<Vec<_>>()),
        sets,
        num_images: s.num_images,
        steps: s.steps,
        eta: s.eta,
        guidance_scale: s.guidance_scale,
        seed: s.seed,
    })
}

/// The Fig. 6 table as markdown.
pub fn markdown(r: &Report, title: &str) -> String {
    let mut s = format!(
        "# {title}\n\n{} images per prompt, DDIM {} steps, eta {}, guidance {}, seed {}.\n\n\
         | metric | Combined | Concept1 | Concept2 | Mean |\n| --- | --- | --- | --- | --- |\n",
        r.num_images, r.steps, r.eta, r.guidance_scale, r.seed
    );
    let row = |name: &str, f: &dyn Fn(&SetScores) -> f64, m: f64| {
        let v: Vec<String> = r.sets.iter().map(|x| format!("{:.4}", f(x))).collect();
        format!("| {name} | {} | {m:.4} |\n", v.join(" | "))
    };
    s += &row("image alignment", &|x| x.image_alignment, r.mean_image_alignment);
    s += &row("CLIPScore (text alignment)", &|x| x.clipscore, r.mean_clipscore);
    s
}
