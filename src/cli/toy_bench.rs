//! `disendiff toy bench`: the paper's comparison on the toy world, scored by the oracle.
//!
//! For each personalization scene (two concepts, or three with `--concepts-per-scene 3`), each
//! method is trained on the scene, generates images for the prompt sets (combined, then each
//! concept alone; each with edits), and the images are scored (`toyworld::score`): identity
//! fidelity per set, leakage (over every pair of concepts), prompt fidelity. Writes
//! `OUT/report.json` and `OUT/report.md` (Fig. 6 form, with image grids). A rerun into the same
//! OUT resumes: runs that finished (`run.json`) are scored from their kept images.

use crate::pipelines::attention_maps::grid;
use crate::toyworld::experiment::{self, default_toy_model, enlarge, ToyTrainOptions};
use crate::training::method::{Ablation, Method, Preset, UNetTrainable};
use crate::toyworld::score::{MethodScores, Scorer, Tally};
use crate::toyworld::task::Task;
use crate::util;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Number of personalization scenes.
    #[arg(long, default_value_t = 3)]
    pub scenes: usize,
    /// First scene (personalization scenes first-scene, first-scene+1, ...).
    #[arg(long, default_value_t = 1, alias = "seed")]
    pub first_scene: u64,
    /// Concepts (objects) per personalization scene: 2 (the paper's setting) or 3 (three
    /// objects, `<new1>`..`<new3>`, with L_s&s the mean over all pairs of class maps and
    /// leakage counted towards any other concept).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub concepts_per_scene: usize,
    /// Training steps of every method.
    #[arg(long, default_value_t = 150, alias = "steps", alias = "max_train_steps")]
    pub max_train_steps: usize,
    /// Learning rate of the methods that train K/V (default 1e-3 on the toy model).
    /// Textual Inversion (5e-3) and DreamBooth (5e-5, the whole UNet) keep their own.
    #[arg(long, alias = "learning_rate")]
    pub learning_rate: Option<f64>,
    /// Weight of DisenDiff's attention losses, both L_bind and L_s&s (default 0.01, as the paper).
    #[arg(long, alias = "attn_weight")]
    pub attn_weight: Option<f64>,
    /// Methods to run, comma-separated (default: disendiff, custom-diffusion,
    /// textual-inversion, dreambooth). `base` is the untrained model with the new tokens at their
    /// initialisers (a reference for the leakage and composition columns). Ablations are
    /// written method/ablation, e.g. `disendiff/no-bind`, `disendiff/no-ss+no-gaussian`
    /// (see `disendiff train --help` for the list).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Also run the six single ablations of DisenDiff's losses.
    #[arg(long)]
    pub ablations: bool,
    /// Images per prompt.
    #[arg(long, default_value_t = 4, alias = "num_images")]
    pub num_images: usize,
    /// DDIM steps of the generated images.
    #[arg(long, default_value_t = 30, alias = "sample-steps", alias = "num_inference_steps")]
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale of the generated images.
    #[arg(long, default_value_t = 5.0, alias = "guidance_scale")]
    pub guidance_scale: f64,
    /// The toy base model (default: the bundled assets/toy-model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Output folder: report.md, report.json, scene-K/METHOD/ runs and images. Running the same
    /// command again resumes: finished runs (run.json) are scored from their kept images.
    #[arg(long, value_name = "DIR", visible_alias = "output-dir", alias = "output_dir")]
    pub out: PathBuf,
}

/// The ablations `--ablations` adds: those of DisenDiff's losses, one at a time (all-scales and
/// train-q change what is captured or trained, and are run by naming them).
fn loss_ablations() -> Vec<Ablation> {
    Ablation::ALL.into_iter().filter(|a| !matches!(a, Ablation::AllScales | Ablation::TrainQ)).collect()
}

/// The runs in order: `base` (untrained) or a method variant, with the toy settings.
fn variants(a: &BenchArgs) -> Result<Vec<ToyTrainOptions>> {
    let mut names: Vec<String> = if a.methods.is_empty() {
        Method::ALL.map(|m| m.name().to_string()).to_vec()
    } else {
        a.methods.clone()
    };
    if a.ablations {
        let extra = loss_ablations().into_iter().map(|ab| format!("disendiff/{}", ab.name()));
        names.extend(extra.filter(|n| !a.methods.contains(n)).collect::<Vec<_>>());
    }
    names
        .iter()
        .map(|name| {
            let preset = match name.as_str() {
                "base" => None,
                v => Some(Preset::parse(v).map_err(|e| anyhow::anyhow!("--methods {v}: {e}"))?),
            };
            let mut o = ToyTrainOptions::new(preset);
            o.steps = a.max_train_steps;
            if let Some(p) = &mut o.preset {
                let trains_kv = matches!(p.unet_trainable, UNetTrainable::CrossAttnKV | UNetTrainable::CrossAttnQKV);
                if let (Some(lr), true) = (a.learning_rate, trains_kv) {
                    o.learning_rate = lr;
                }
                if p.method == Method::Disendiff {
                    p.set_loss_weights(a.attn_weight, None, None)?;
                }
            }
            Ok(o)
        })
        .collect()
}

/// Everything a run's images depend on; a finished run is reused only under the same settings.
fn run_settings(a: &BenchArgs, opts: &ToyTrainOptions, model_dir: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "method": opts.name(), "max_train_steps": opts.steps, "learning_rate": opts.learning_rate,
        "attn_weight": opts.preset.as_ref().map(|p| (p.loss.bind_weight, p.loss.ss_weight)),
        "batch_size": opts.batch_size, "grad_accum": opts.grad_accum, "seed": opts.seed, "reg_images": opts.reg_images,
        "concepts_per_scene": a.concepts_per_scene, "num_images": a.num_images,
        "num_inference_steps": a.num_inference_steps, "guidance_scale": a.guidance_scale,
        "model": model_dir.display().to_string(),
    })
}

/// `scene-K/METHOD/run.json`, written once a run's images are all kept: what makes a rerun of
/// the bench into the same OUT resume (a killed bench loses at most the run it was in).
#[derive(serde::Serialize, serde::Deserialize)]
struct RunRecord {
    settings: serde_json::Value,
    train_seconds: f64,
    diagnostics: experiment::AttentionDiagnostics,
}

impl RunRecord {
    fn read(run_dir: &std::path::Path, settings: &serde_json::Value) -> Result<Option<Self>> {
        let path = run_dir.join("run.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let record: Self = serde_json::from_str(&text).with_context(|| format!("{} is not a bench run record", path.display()))?;
        if &record.settings != settings {
            bail!(
                "{} was made with other settings ({}; now {settings}): give another --out, or remove that folder",
                run_dir.display(),
                record.settings
            );
        }
        Ok(Some(record))
    }

    fn write(&self, run_dir: &std::path::Path) -> Result<()> {
        util::write_atomic(&run_dir.join("run.json"), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.scenes == 0 || a.num_images == 0 {
        bail!("--scenes and --num-images must be at least 1");
    }
    super::validate::sampling(a.num_inference_steps, a.guidance_scale, None, Some(a.num_images))?;
    super::validate::at_least("--max-train-steps", a.max_train_steps, 1)?;
    if let Some(lr) = a.learning_rate {
        super::validate::positive("--learning-rate", lr)?;
    }
    if !(2..=crate::toyworld::MAX_CONCEPTS).contains(&a.concepts_per_scene) {
        bail!("--concepts-per-scene must be 2 or {} (got {})", crate::toyworld::MAX_CONCEPTS, a.concepts_per_scene);
    }
    let variants = variants(&a)?;
    let model_dir = a.model.clone().unwrap_or_else(default_toy_model);
    experiment::check_toy_model(&model_dir)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut md_images = String::new();
    let total = (a.scenes * variants.len()) as u64;
    let pb = super::progress_bar(total, "toy bench");
    for s in 0..a.scenes {
        let task = Task::with_concepts(a.first_scene + s as u64, a.concepts_per_scene)?;
        let scorer = Scorer::new(&task);
        let scene_dir = a.out.join(format!("scene-{}", task.seed));
        std::fs::create_dir_all(&scene_dir)?;
        util::save_png(&enlarge(&task.image, 2), &scene_dir.join("scene.png"))?;
        writeln!(md_images, "### scene {} — `{}`\n\n![scene](scene-{}/scene.png)\n", task.seed, task.caption(), task.seed)?;
        let sets = task.prompt_sets();
        for opts in &variants {
            let name = &opts.name();
            pb.set_message(format!("scene {} {name}", task.seed));
            let run_dir = scene_dir.join(name.replace('/', "_"));
            let settings = run_settings(&a, opts, &model_dir);
            // A run finished by an earlier call into the same OUT is scored from its kept
            // images; an unfinished one (no run.json) is trained again from the start.
            let (model, record) = match RunRecord::read(&run_dir, &settings)? {
                Some(record) => (None, record),
                None => {
                    let (model, seconds) = experiment::train(&model_dir, &task, opts, &run_dir, |_| {})?;
                    let diagnostics = experiment::attention_diagnostics(&model, &task)?;
                    (Some(model), RunRecord { settings, train_seconds: seconds, diagnostics })
                }
            };
            std::fs::create_dir_all(run_dir.join("images"))?;
            let tally = tallies.entry(name.clone()).or_default();
            tally.train_seconds += record.train_seconds / a.scenes as f64;
            tally.attention.push(record.diagnostics);
            let mut rows = Vec::new();
            for (set_name, concept, set) in sets.named() {
                for (p, spec) in set.iter().enumerate() {
                    let path = |i: usize| run_dir.join(format!("images/{set_name}-{p}-{i}.png"));
                    let images = match &model {
                        Some(m) => {
                            let images = experiment::generate(m, &spec.prompt, a.num_images, 1000, a.num_inference_steps, a.guidance_scale)?;
                            for (i, img) in images.iter().enumerate() {
                                util::save_png(img, &path(i))?;
                            }
                            images
                        }
                        None => (0..a.num_images).map(|i| util::load_rgb(&path(i))).collect::<Result<Vec<_>>>()?,
                    };
                    for img in &images {
                        tally.add(concept, &scorer.score(img, spec));
                    }
                    if spec.base {
                        rows.push(grid(&images.iter().map(|i| enlarge(i, 2)).collect::<Vec<_>>(), images.len()));
                    }
                }
            }
            if model.is_some() {
                record.write(&run_dir)?;
            }
            let sheet = grid(&rows, 1);
            let file = format!("scene-{}/{}.png", task.seed, name.replace('/', "_"));
            util::save_png(&sheet, &a.out.join(&file))?;
            let rows_named = (1..=a.concepts_per_scene).map(|k| format!("concept {k}")).collect::<Vec<_>>().join(", ");
            writeln!(md_images, "**{name}** (rows: combined, {rows_named}; unedited prompts)\n\n![{name}]({file})\n")?;
            pb.inc(1);
        }
    }
    pb.finish_and_clear();

    let methods: BTreeMap<String, MethodScores> = tallies.iter().map(|(k, t)| (k.clone(), t.finish())).collect();
    let json = serde_json::json!({
        "methods": methods,
        "settings": {"scenes": a.scenes, "first_scene": a.first_scene, "concepts_per_scene": a.concepts_per_scene, "max_train_steps": a.max_train_steps, "num_images": a.num_images,
                      "num_inference_steps": a.num_inference_steps, "guidance_scale": a.guidance_scale,
                      "learning_rate": a.learning_rate, "attn_weight": a.attn_weight,
                      "model": model_dir.display().to_string()},
    });
    util::write_atomic(&a.out.join("report.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    let mut md = String::new();
    writeln!(md, "# Toy-world benchmark\n")?;
    writeln!(
        md,
        "{} scene(s) of {} concepts from seed {}, {} training steps, {} images per prompt ({} DDIM steps, guidance {}). \
         Identity fidelity = oracle appearance similarity to the training object (0-1, higher is better); \
         leakage = share of single-concept images that also show another concept (lower is better): \
         as an object of its class (other object) or as the asked object wearing its look (look swap: \
         the asked object's appearance is nearer that concept's than its own); with three concepts \
         every pair counts; composition = share of combined images showing every concept's class; \
         prompt fidelity = share of edited prompts whose edit is present. \
         Attention columns, measured on the training image after training (timesteps 100-700): \
         L_bind and L_s&s as DisenDiff defines them (lower = modifier bound to its class word / \
         the class maps apart; L_s&s is the mean over all pairs), and the soft IoU of each class \
         word's map with its own object's mask and with the other objects' (mean).\n",
        a.scenes, a.concepts_per_scene, a.first_scene, a.max_train_steps, a.num_images, a.num_inference_steps, a.guidance_scale
    )?;
    let concept_cols: String = (1..=a.concepts_per_scene).map(|k| format!(" Concept{k} |")).collect();
    writeln!(md, "| method | Combined |{concept_cols} Mean | leakage | other object | look swap | composition | prompt fidelity | train s | L_bind | L_s&s | class IoU own | class IoU other |")?;
    writeln!(md, "|---|---|{}---|---|---|---|---|---|---|---|---|---|---|", "---|".repeat(a.concepts_per_scene))?;
    for (name, m) in &methods {
        let singles: String = m.fidelity.single.iter().map(|v| format!(" {v:.3} |")).collect();
        writeln!(
            md,
            "| {name} | {:.3} |{singles} {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} |",
            m.fidelity.combined,
            m.fidelity.mean,
            m.leakage,
            m.other_object,
            m.look_swap,
            m.composition,
            m.prompt_fidelity,
            m.train_seconds,
            m.attention.l_bind,
            m.attention.l_ss,
            m.attention.class_iou_own,
            m.attention.class_iou_other
        )?;
    }
    writeln!(md, "\n## Images\n\n{md_images}")?;
    let path = a.out.join("report.md");
    util::write_atomic(&path, md.as_bytes())?;
    println!("{}", path.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct RescoreArgs {
    /// The output folder of a `disendiff toy bench` run.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// `toy rescore`: the scores of a bench run's kept images, per scene and method.
pub fn rescore(a: RescoreArgs) -> Result<()> {
    let mut scenes: Vec<(u64, PathBuf)> = std::fs::read_dir(&a.dir)
        .with_context(|| format!("reading {}", a.dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.strip_prefix("scene-")?.parse().ok()?, e.path())))
        .filter(|(_, p): &(u64, PathBuf)| p.is_dir())
        .collect();
    scenes.sort();
    if scenes.is_empty() {
        bail!("{} holds no scene-K folders of a `disendiff toy bench` run", a.dir.display());
    }
    let mut md = String::new();
    writeln!(md, "| scene | method | fidelity mean | leakage | other object | look swap | composition | prompt fidelity | images |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    let mut totals: BTreeMap<String, Tally> = BTreeMap::new();
    for (seed, scene_dir) in &scenes {
        let mut methods: Vec<PathBuf> = std::fs::read_dir(scene_dir)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("images").is_dir()).collect();
        methods.sort();
        // The scene's number of concepts is the number of single-concept sets the bench kept.
        let concepts = (1..=crate::toyworld::MAX_CONCEPTS)
            .take_while(|k| methods.iter().any(|m| m.join(format!("images/concept{k}-0-0.png")).is_file()))
            .count();
        if concepts < 2 {
            bail!("{} holds no images/concept1-0-0.png and concept2-0-0.png of a `disendiff toy bench` run", scene_dir.display());
        }
        let task = Task::with_concepts(*seed, concepts)?;
        let scorer = Scorer::new(&task);
        let sets = task.prompt_sets();
        for run in methods {
            let name = run.file_name().and_then(|n| n.to_str()).unwrap_or("?").replacen('_', "/", 1);
            let mut tally = Tally::default();
            let mut images = 0;
            for (set_name, concept, set) in sets.named() {
                for (p, spec) in set.iter().enumerate() {
                    for i in 0.. {
                        let path = run.join(format!("images/{set_name}-{p}-{i}.png"));
                        if !path.is_file() {
                            break;
                        }
                        let s = scorer.score(&util::load_rgb(&path)?, spec);
                        tally.add(concept, &s);
                        totals.entry(name.clone()).or_default().add(concept, &s);
                        images += 1;
                    }
                }
            }
            md += &per_scene_row(&seed.to_string(), &name, &tally.finish(), &images.to_string());
        }
    }
    for (name, t) in &totals {
        md += &per_scene_row("all", name, &t.finish(), "");
    }
    print!("{md}");
    util::write_atomic(&a.dir.join("per-scene.md"), md.as_bytes())?;
    Ok(())
}

fn per_scene_row(scene: &str, method: &str, m: &MethodScores, images: &str) -> String {
    format!(
        "| {scene} | {method} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {images} |\n",
        m.fidelity.mean, m.leakage, m.other_object, m.look_swap, m.composition, m.prompt_fidelity
    )
}
