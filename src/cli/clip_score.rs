//! `disendiff clip-score`: CLIPScore and image alignment of generated images (the DisenDiff
//! authors' evaluation) with a transformers CLIP folder.

use crate::eval::clip_score::ClipScorer;
use crate::eval::{mean, pairs, score_pairs};
use crate::model::clip_model::ClipModel;
use crate::util;
use anyhow::Result;
use candle_core::Device;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(long_about = "For each (image, prompt) pair: CLIPScore = 2.5 * max(cos(image, text), 0) with the text \
\"A photo depicts \" + the prompt after removing its modifier tokens (<new1>, ...) and squeezing spaces; text \
longer than CLIP's 77 tokens is truncated as transformers does (truncation=True), with a warning. With \
--references, image alignment = the mean cosine similarity of the image's CLIP embedding with every reference \
image's (all embeddings L2-normalised); without it, image alignment is not computed (null in --json).")]
pub struct Args {
    /// A transformers CLIP folder (config.json, model.safetensors, tokenizer files,
    /// preprocessor_config.json), e.g. a local copy of openai/clip-vit-base-patch32.
    #[arg(long, value_name = "DIR")]
    pub clip_model: PathBuf,
    /// JSON list of {"image": path relative to the JSON file, "prompt": text}.
    #[arg(long, value_name = "FILE.json")]
    pub pairs: PathBuf,
    /// Folder of reference images (PNG/JPEG) for image alignment; without it, image alignment
    /// is absent (null in --json).
    #[arg(long, value_name = "DIR")]
    pub references: Option<PathBuf>,
    /// Print {"per_image": [...], "mean_clipscore", "mean_image_alignment"} as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let list = pairs::read_pairs(&a.pairs)?;
    let images = list.iter().map(|p| util::load_rgb(&p.path(&a.pairs))).collect::<Result<Vec<_>>>()?;
    let references = match &a.references {
        Some(dir) => Some(pairs::reference_images(dir)?.iter().map(|p| util::load_rgb(p)).collect::<Result<Vec<_>>>()?),
        None => None,
    };
    let scorer = ClipScorer { model: ClipModel::load(&a.clip_model, &Device::Cpu)? };
    let prompts: Vec<&str> = list.iter().map(|p| p.prompt.as_str()).collect();
    for t in scorer.truncated(&prompts) {
        eprintln!("warning: the CLIP text {t:?} is longer than 77 tokens and was truncated");
    }
    let scores = score_pairs(&scorer, &images, &prompts, references.as_deref())?;
    let clip: Vec<f64> = scores.iter().map(|s| s.text_alignment).collect();
    let align: Option<Vec<f64>> = scores.iter().map(|s| s.image_alignment).collect();
    if a.json {
        let per: Vec<_> = list
            .iter()
            .zip(&scores)
            .map(|(p, s)| json!({"image": p.image, "prompt": p.prompt, "clipscore": s.text_alignment, "image_alignment": s.image_alignment}))
            .collect();
        let out = json!({"per_image": per, "mean_clipscore": mean(&clip), "mean_image_alignment": align.as_deref().map(mean)});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:>10} {:>16}  image / prompt", "clipscore", "image_alignment");
    for (p, s) in list.iter().zip(&scores) {
        let ia = s.image_alignment.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!("{:>10.4} {ia:>16}  {} / {}", s.text_alignment, p.image, p.prompt);
    }
    let ia = align.as_deref().map_or("-".to_string(), |v| format!("{:.4}", mean(v)));
    println!("{:>10.4} {ia:>16}  mean of {} images", mean(&clip), scores.len());
    Ok(())
}
