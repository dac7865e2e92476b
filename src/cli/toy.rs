//! `disendiff toy ...`: the synthetic world.

use crate::toyworld::{write_scenes, WorldSpec, WriteOptions};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ToyCommand,
}

#[derive(clap::Subcommand)]
pub enum ToyCommand {
    /// Write synthetic scenes: NNNNN.png, NNNNN.txt (caption), NNNNN.mask.png (object index
    /// map: 0 background, k object k) and scenes.jsonl (one structured description per line).
    Scenes(ScenesArgs),
    /// Train DisenDiff, Custom Diffusion, Textual Inversion and DreamBooth (and, with --ablations, the
    /// paper's ablations) on personalization scenes; score identity, leakage and prompt
    /// fidelity with the oracle; write report.md and report.json.
    Bench(super::toy_bench::BenchArgs),
    /// Score again the images a `toy bench` run kept (OUT/scene-K/METHOD/images) with the
    /// current oracle, scene by scene: prints a table and writes OUT/per-scene.md.
    Rescore(super::toy_bench::RescoreArgs),
    /// Check a toy base model: prompt following on unseen prompts (oracle-scored) and how well
    /// class tokens' cross-attention maps cover their objects.
    CheckModel(CheckArgs),
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The toy base model (default: the bundled assets/toy-model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Prompts of each kind and attention scenes.
    #[arg(long, default_value_t = 50)]
    pub n: usize,
    /// The training sets whose captions count as seen, each `SEED:UNNAMED_SHARE` or
    /// `SEED:UNNAMED_SHARE:MIN-MAX` (objects per scene), as `toy scenes --seed S --unnamed-share F
    /// --min-objects MIN --max-objects MAX` wrote them. The default is the shipped model's four
    /// runs (tools/toyworld/README.md).
    #[arg(long, value_delimiter = ',', default_value = "1:0,1:0.25,3:0.3,4:0.3:2-2", value_name = "SET,..")]
    pub train_sets: Vec<crate::toyworld::model_check::TrainingSet>,
    /// Scenes in each of those training sets (`toy scenes --n`); a set generated with fewer (the
    /// fourth run's 10,000 two-object scenes) is covered by its first scenes.
    #[arg(long, default_value_t = 20000)]
    pub train_n: usize,
    /// DDIM steps of each generated image.
    #[arg(long, default_value_t = 30, visible_alias = "steps", alias = "num_inference_steps")]
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0, alias = "guidance_scale")]
    pub guidance_scale: f64,
    /// Seed of the prompts, scenes and noise (the numbers in tools/toyworld/README.md were
    /// measured with --seed 7).
    #[arg(long, default_value_t = super::DEFAULT_SEED)]
    pub seed: u64,
}

fn check_model(a: CheckArgs) -> Result<()> {
    let dir = a.model.clone().unwrap_or_else(crate::toyworld::experiment::default_toy_model);
    crate::toyworld::experiment::check_toy_model(&dir)?;
    let sd = crate::model::sd::StableDiffusion::load(&dir, &Default::default())?;
    let seen = crate::toyworld::model_check::training_captions(&a.train_sets, a.train_n)?;
    eprintln!("{} distinct training captions", seen.len());
    let r = crate::toyworld::model_check::check(&sd, &seen, a.n, a.num_inference_steps, a.guidance_scale, a.seed)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

#[derive(clap::Args)]
pub struct ScenesArgs {
    /// Number of scenes.
    #[arg(long, value_name = "N")]
    pub n: usize,
    /// Seed; scene i depends only on (seed, i).
    #[arg(long, default_value_t = super::DEFAULT_SEED)]
    pub seed: u64,
    /// Output folder (created if needed; existing scene files are overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Personalization scenes: two objects with unnamed appearances; the .txt files hold
    /// "<new1> ball and <new2> box" captions.
    #[arg(long)]
    pub personalization: bool,
    /// Objects (concepts) per personalization scene: 2, or 3 for "<new1> ball, <new2> box and
    /// <new3> star" scenes (with --personalization).
    #[arg(long, default_value_t = 2, value_name = "N", requires = "personalization")]
    pub concepts: usize,
    /// Image side in pixels (the 64x64 world rescaled).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Fewest objects per training scene (1-3).
    #[arg(long, default_value_t = 1)]
    pub min_objects: usize,
    /// Most objects per training scene (1-3).
    #[arg(long, default_value_t = 3)]
    pub max_objects: usize,
    /// Share of training objects drawn with an unnamed two-colour look and captioned by class
    /// alone ("a ball"); the shipped toy model's third run used 0.25, its fourth 0.3. The looks of the
    /// personalization scenes never occur.
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    pub unnamed_share: f32,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        ToyCommand::Scenes(s) => scenes(s),
        ToyCommand::Bench(b) => super::toy_bench::run(b),
        ToyCommand::Rescore(r) => super::toy_bench::rescore(r),
        ToyCommand::CheckModel(c) => check_model(c),
    }
}

fn scenes(a: ScenesArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if !(8..=1024).contains(&a.size) {
        bail!("--size must be between 8 and 1024 (got {})", a.size);
    }
    if !(1..=3).contains(&a.min_objects) || !(a.min_objects..=3).contains(&a.max_objects) {
        bail!("need 1 <= --min-objects ({}) <= --max-objects ({}) <= 3", a.min_objects, a.max_objects);
    }
    if !(0.0..=1.0).contains(&a.unnamed_share) {
        bail!("--unnamed-share must be between 0 and 1 (got {})", a.unnamed_share);
    }
    let spec = WorldSpec {
        min_objects: a.min_objects,
        max_objects: a.max_objects,
        unnamed_share: a.unnamed_share,
        ..WorldSpec::default()
    };
    if !(1..=crate::toyworld::MAX_CONCEPTS).contains(&a.concepts) {
        bail!("--concepts must be between 1 and {} (got {})", crate::toyworld::MAX_CONCEPTS, a.concepts);
    }
    let opts = WriteOptions { n: a.n, seed: a.seed, personalization: a.personalization, concepts: a.concepts, image_size: a.size, spec };
    let pb = (a.n >= 100).then(|| super::progress_bar(a.n as u64, "scenes"));
    write_scenes(&a.out, &opts, |done| {
        if let Some(pb) = &pb {
            pb.set_position(done as u64);
        }
    })?;
    if let Some(pb) = pb {
        pb.finish();
    }
    eprintln!("wrote {} scenes to {}", a.n, a.out.display());
    Ok(())
}
