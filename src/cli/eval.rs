//! `disendiff eval`: the paper's evaluation protocol (Fig. 6) for one learned concept pair,
//! writing the images, `report.md` and `report.json` under `--out`.

use super::{ConceptArgs, ModelArgs};
use crate::eval::clip_score::ClipScorer;
use crate::eval::pairs::reference_images;
use crate::eval::prompts::{EvalPrompts, DATASETS};
use crate::eval::protocol::{self, ProtocolSettings, References};
use crate::model::clip_model::ClipModel;
use crate::model::memory::Generation;
use crate::util;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(long_about = "For each prompt of the dataset's three sets (combined, concept1, concept2): N images \
(DDIM, eta 1, guidance 6 by default, image j with seed SEED+j), CLIPScore of each image with its prompt, and \
image alignment with the set's references (--references DIR/combined: the whole training image; DIR/concept1, \
DIR/concept2: each concept's crop). Writes OUT/images/<set>/<prompt>/<image>.png (existing images are reused, \
so an interrupted run resumes), OUT/report.md (the Fig. 6 table) and OUT/report.json.")]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub concepts: ConceptArgs,
    /// A built-in dataset's prompts (baby_toy, cat_dog, chair_lamp, chair_vase, cow_bird, dog_pig,
    /// horse_dog, man_woman, mother_child, woman_dog) or a prompts file in the same format
    /// ([combined], [concept1], [concept2] headers, one prompt per line).
    #[arg(long, value_name = "NAME|FILE")]
    pub dataset: String,
    /// Folder with combined/, concept1/ and concept2/ reference images.
    #[arg(long, value_name = "DIR")]
    pub references: PathBuf,
    /// A transformers CLIP folder (e.g. openai/clip-vit-base-patch32, the paper's ViT-B/32).
    #[arg(long, value_name = "DIR")]
    pub clip_model: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Images per prompt.
    #[arg(long, default_value_t = 16)]
    pub num_images: usize,
    /// DDIM steps.
    #[arg(long, default_value_t = 50, visible_alias = "steps")]
    pub num_inference_steps: usize,
    /// DDIM eta (the paper's evaluation: 1).
    #[arg(long, default_value_t = 1.0)]
    pub eta: f64,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 6.0)]
    pub guidance_scale: f64,
    /// Seed of image 0 of every prompt (image j: seed + j).
    #[arg(long, default_value_t = super::DEFAULT_SEED)]
    pub seed: u64,
    /// Only the first K prompts of each set (a quick check).
    #[arg(long, value_name = "K")]
    pub max_prompts: Option<usize>,
}

fn load_dir(dir: &Path) -> Result<Vec<image::RgbImage>> {
    reference_images(dir)?.iter().map(|p| util::load_rgb(p)).collect()
}

pub fn run(a: Args) -> Result<()> {
    super::validate::sampling(a.num_inference_steps, a.guidance_scale, Some(a.eta), Some(a.num_images))?;
    if let Some(k) = a.max_prompts {
        super::validate::at_least("--max-prompts", k, 1)?;
    }
    let prompts = if DATASETS.contains(&a.dataset.as_str()) {
        EvalPrompts::builtin(&a.dataset)?
    } else if Path::new(&a.dataset).is_file() {
        EvalPrompts::from_file(Path::new(&a.dataset))?
    } else {
        anyhow::bail!("--dataset {:?} is neither a built-in dataset ({}) nor a prompts file", a.dataset, DATASETS.join(", "));
    };
    let references = References {
        combined: load_dir(&a.references.join("combined"))?,
        concept1: load_dir(&a.references.join("concept1"))?,
        concept2: load_dir(&a.references.join("concept2"))?,
    };
    let scorer = ClipScorer { model: ClipModel::load(&a.clip_model, &candle_core::Device::Cpu)? };
    let model = super::load_model(&a.model, &a.concepts)?;
    let side = model.sd.default_size();
    let g = Generation { height: side, width: side, guidance: a.guidance_scale > 1.0, encodes_image: false, vae_tiling: false };
    super::memory::check_generation(&a.model, &model.sd, &g, "evaluating at")?;
    let all: Vec<&str> = prompts.combined.iter().chain(&prompts.concept1).chain(&prompts.concept2).map(String::as_str).collect();
    super::check_prompt_tokens(&model.sd, &all, true)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let settings = ProtocolSettings {
        num_images: a.num_images,
        steps: a.num_inference_steps,
        eta: a.eta,
        guidance_scale: a.guidance_scale,
        seed: a.seed,
        max_prompts: a.max_prompts,
    };
    let report = protocol::run(&model.sd, &prompts, &references, &scorer, &a.out, &settings, |set, i, p| {
        eprintln!("{set} {i:02}: {p}")
    })?;
    let title = format!("Evaluation of {} on {}", a.concepts.concepts.as_ref().map_or("the base model".into(), |c| c.display().to_string()), a.dataset);
    util::write_atomic(&a.out.join("report.md"), protocol::markdown(&report, &title).as_bytes())?;
    util::write_atomic(&a.out.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    print!("{}", protocol::markdown(&report, &title));
    Ok(())
}
