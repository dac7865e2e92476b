//! Evaluation: the paper's metrics behind one small trait.
//!
//! A [`Scorer`] embeds images once and scores them against prompts (text alignment) and against
//! reference images (image alignment). [`clip_score`] is the real-model scorer (CLIPScore and
//! CLIP image alignment, the DisenDiff paper's Fig. 6 metrics); the toy world's oracle can sit
//! behind the same trait. [`score_pairs`] runs any scorer over (image, prompt) pairs;
//! [`protocol`] is the paper's evaluation runner over the datasets' prompt sets ([`prompts`]).

pub mod clip_score;
pub mod pairs;
pub mod prompts;
pub mod protocol;

use anyhow::{bail, Result};
use image::RgbImage;

/// A metric pair: how well an image matches its prompt, and how similar it is to references.
pub trait Scorer {
    /// What the scorer computes per image (e.g. a normalised CLIP embedding).
    type Embedding;
    /// One embedding per image.
    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Self::Embedding>>;
    /// Text alignment of each image with its prompt (`prompts[i]` for `images[i]`).
    fn text_alignment(&self, images: &[Self::Embedding], prompts: &[&str]) -> Result<Vec<f64>>;
    /// Similarity of two images.
    fn image_similarity(&self, a: &Self::Embedding, b: &Self::Embedding) -> f64;
}

/// The scores of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    pub text_alignment: f64,
    /// Mean similarity with every reference; `None` without references.
    pub image_alignment: Option<f64>,
}

/// Scores `images[i]` against `prompts[i]`, and against every reference when some are given.
pub fn score_pairs<S: Scorer>(scorer: &S, images: &[RgbImage], prompts: &[&str], references: Option<&[RgbImage]>) -> Result<Vec<ImageScores>> {
    if images.len() != prompts.len() {
        bail!("{} images but {} prompts", images.len(), prompts.len());
    }
    if images.is_empty() {
        bail!("no images to score");
    }
    let emb = scorer.embed_images(images)?;
    let text = scorer.text_alignment(&emb, prompts)?;
    let refs = match references {
        Some([]) => bail!("the reference set is empty"),
        Some(r) => Some(scorer.embed_images(r)?),
        None => None,
    };
    Ok(emb
        .iter()
        .zip(text)
        .map(|(e, text_alignment)| ImageScores {
            text_alignment,
            image_alignment: refs.as_ref().map(|r| r.iter().map(|x| scorer.image_similarity(e, x)).sum::<f64>() / r.len() as f64),
        })
        .collect())
}

/// Mean of a non-empty list.
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
