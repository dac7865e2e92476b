//! CLIP metrics as the DisenDiff authors evaluate (the paper's Fig. 6): CLIPScore (Hessel et al.
//! 2021) = 2.5 · max(cos(image, text), 0), with the text "A photo depicts " + the prompt after
//! removing its modifier tokens (`<new1>`, ...) and squeezing spaces; image alignment = mean
//! cosine similarity of an image's CLIP embedding with every reference image's. Embeddings are
//! the projected features of [`ClipModel`], L2-normalised. Text longer than 77 tokens is
//! truncated (transformers' `truncation=True`).

use super::Scorer;
use crate::model::clip_model::ClipModel;
use anyhow::Result;
use image::RgbImage;

/// The CLIPScore weight `w` of Hessel et al.
pub const CLIPSCORE_WEIGHT: f64 = 2.5;
/// The prefix the authors put before each prompt.
pub const TEXT_PREFIX: &str = "A photo depicts ";

/// The text scored for a prompt: modifier tokens (`<...>`) removed, whitespace squeezed, prefixed.
pub fn clip_text(prompt: &str) -> String {
    let mut kept = String::new();
    let mut rest = prompt;
    // Removes every `<...>` without whitespace or angle brackets inside, as the regex `<[^<>\s]+>`.
    while let Some(start) = rest.find('<') {
        kept.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after.find(|c: char| c == '<' || c == '>' || c.is_whitespace());
        match end {
            Some(e) if e > 0 && after[e..].starts_with('>') => {
                kept.push(' ');
                rest = &after[e + 1..];
            }
            _ => {
                kept.push('<');
                rest = after;
            }
        }
    }
    kept.push_str(rest);
    format!("{TEXT_PREFIX}{}", kept.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// CLIPScore of a cosine similarity.
pub fn clipscore(cos: f64) -> f64 {
    CLIPSCORE_WEIGHT * cos.max(0.0)
}

fn normalised(v: Vec<f32>) -> Vec<f64> {
    let n = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt().max(1e-12);
    v.into_iter().map(|x| x as f64 / n).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The CLIP scorer: [`ClipModel`] embeddings, CLIPScore, cosine image similarity.
pub struct ClipScorer {
    pub model: ClipModel,
}

impl ClipScorer {
    /// Prompts whose CLIPScore text is cut at 77 tokens (to warn about).
    pub fn truncated(&self, prompts: &[&str]) -> Vec<String> {
        prompts.iter().map(|p| clip_text(p)).filter(|t| !self.model.tokenizer.encode(t).truncated.is_empty()).collect()
    }
}

impl Scorer for ClipScorer {
    type Embedding = Vec<f64>;

    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f64>>> {
        let f = self.model.image_features(images)?;
        Ok(f.to_vec2::<f32>()?.into_iter().map(normalised).collect())
    }

    fn text_alignment(&self, images: &[Vec<f64>], prompts: &[&str]) -> Result<Vec<f64>> {
        let texts: Vec<String> = prompts.iter().map(|p| clip_text(p)).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let t = self.model.text_features(&refs)?.to_vec2::<f32>()?;
        Ok(images.iter().zip(t).map(|(i, t)| clipscore(dot(i, &normalised(t)))).collect())
    }

    fn image_similarity(&self, a: &Vec<f64>, b: &Vec<f64>) -> f64 {
        dot(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modifier_tokens_are_removed_and_spaces_squeezed() {
        assert_eq!(clip_text("a <new1> dog and a <new2>  cat"), "A photo depicts a dog and a cat");
        assert_eq!(clip_text("  <new1>   sleeping "), "A photo depicts sleeping");
        assert_eq!(clip_text("<new1>'s toy"), "A photo depicts 's toy");
        // Not a modifier token: kept.
        assert_eq!(clip_text("a < b and c <> d <x y>"), "A photo depicts a < b and c <> d <x y>");
    }

    #[test]
    fn clipscore_clamps_negative_cosines() {
        assert_eq!(clipscore(-0.3), 0.0);
        assert!((clipscore(0.4) - 1.0).abs() < 1e-12);
    }
}
