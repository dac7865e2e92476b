//! Personalization runs on the toy model, shared by `disendiff demo` and `disendiff toy bench`:
//! train a method on a [`Task`], then generate images for prompts.

use super::task::Task;
use super::{random_scene, render, scene_seed, Class, WorldSpec};
use crate::calibration::CalibrationConfig;
use crate::model::sd::LoadOptions;
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::training::adamw::AdamWConfig;
use crate::training::concepts::Concept;
use crate::training::data::RegImage;
use crate::training::method::{Initializers, Preset, UNetTrainable};
use crate::training::model::Personalized;
use crate::training::step::LossConfig;
use crate::training::trainer::{StepRecord, TrainConfig, Trainer};
use crate::util;
use anyhow::{bail, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Where the committed toy model lives, relative to the repository.
pub fn default_toy_model() -> PathBuf {
    let here = PathBuf::from("assets/toy-model");
    if here.join("model_index.json").is_file() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/toy-model")
}

pub fn check_toy_model(dir: &Path) -> Result<()> {
    if !dir.join("model_index.json").is_file() {
        bail!(
            "the toy model is not at {} (it ships with the repository under assets/toy-model; \
             pass --model DIR to use another)",
            dir.display()
        );
    }
    Ok(())
}

/// Settings of a toy personalization run. The method is a preset of
/// [`crate::training::method`]; `None` is the untrained base model with the modifier tokens at
/// their initialisers, the reference for how often the base model itself draws both classes
/// or the other one. Steps, learning rate and batch are toy-scale, not the presets' SD ones.
#[derive(Clone, Debug)]
pub struct ToyTrainOptions {
    pub preset: Option<Preset>,
    pub steps: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub augment: bool,
    /// Regularisation scenes of the training world (real images with captions, as the
    /// official run's retrieved LAION images); 0 = none.
    pub reg_images: usize,
}

impl ToyTrainOptions {
    pub fn new(preset: Option<Preset>) -> Self {
        // The toy model takes larger steps than SD: K/V 1e-3 (SD 8e-5), embedding-only
        // training (Textual Inversion) 5e-3 (SD 5e-4), and the whole UNet (DreamBooth) 5e-5,
        // SD's 5e-6 scaled as the K/V rate is: the toy model was trained at lr 5e-4, SD at 1e-4.
        let trainable = preset.as_ref().map(|p| p.unet_trainable);
        let learning_rate = match trainable {
            Some(UNetTrainable::Nothing) => 5e-3,
            Some(UNetTrainable::All) => 5e-5,
            _ => 1e-3,
        };
        Self {
            preset,
            steps: 150,
            learning_rate,
            batch_size: 2,
            grad_accum: 2,
            seed: 0,
            augment: false,
            reg_images: 16,
        }
    }

    /// The preset's name, or `base` for the untrained model.
    pub fn name(&self) -> String {
        self.preset.as_ref().map_or("base".to_string(), Preset::name)
    }
}

/// Writes `n` training-world scenes of the task's classes, as many objects as the task has
/// concepts, with captions.
pub fn write_reg_scenes(task: &Task, n: usize, dir: &Path) -> Result<Vec<RegImage>> {
    std::fs::create_dir_all(dir)?;
    let classes: Vec<Class> = task.concepts.iter().map(|(_, c)| *c).collect();
    let objects = classes.len().clamp(1, 3);
    let spec = WorldSpec { classes: classes.clone(), min_objects: objects, max_objects: objects, ..WorldSpec::default() };
    let mut out = Vec::new();
    for i in 0..n as u64 {
        let mut rng = util::seeded_rng(scene_seed(task.seed ^ 0x5eed, i));
        let scene = random_scene(&mut rng, &spec);
        let path = dir.join(format!("{i:05}.png"));
        util::save_png(&render(&scene).image, &path)?;
        let caption = super::caption(&scene);
        util::write_atomic(&path.with_extension("txt"), caption.as_bytes())?;
        out.push(RegImage { path, caption });
    }
    Ok(out)
}

/// Trains `opts.preset` on `task` (or loads the untrained model); files (scene, reg images, log, concepts) go under `out`.
pub fn train(model_dir: &Path, task: &Task, opts: &ToyTrainOptions, out: &Path, on_step: impl FnMut(&StepRecord)) -> Result<(Personalized, f64)> {
    check_toy_model(model_dir)?;
    std::fs::create_dir_all(out)?;
    let image_path = out.join("scene.png");
    util::save_png(&task.image, &image_path)?;
    let initializers = opts.preset.as_ref().map_or(Initializers::Official, |p| p.initializers);
    let n = task.concepts.len();
    let concepts: Vec<Concept> = task
        .concepts
        .iter()
        .enumerate()
        .map(|(k, (token, class))| {
            let initializer = initializers.token(k, n, class.word())?;
            Ok(Concept { modifier: token.clone(), class_word: class.word().to_string(), initializer })
        })
        .collect::<Result<_>>()?;
    let trainable = opts.preset.as_ref().map_or(UNetTrainable::Nothing, |p| p.unet_trainable);
    let model = Personalized::load(model_dir, &LoadOptions::default(), &concepts, trainable)?;
    let Some(preset) = &opts.preset else {
        return Ok((model, 0.0));
    };
    let resolution = model.sd.default_size();
    let latent = resolution / model.sd.vae_scale_factor();
    let reg = if opts.reg_images > 0 && preset.unet_trainable != UNetTrainable::Nothing {
        write_reg_scenes(task, opts.reg_images, &out.join("reg"))?
    } else {
        Vec::new()
    };
    let mut preset = preset.clone();
    preset.loss.attn_resolution = calibration_side(&model.sd, latent)?;
    let config = TrainConfig {
        preset,
        caption: task.caption(),
        template: "{}".into(),
        steps: opts.steps,
        batch_size: opts.batch_size,
        grad_accum: opts.grad_accum,
        adamw: AdamWConfig { lr: opts.learning_rate, ..Default::default() },
        resolution,
        augment: opts.augment,
        seed: opts.seed,
        checkpoint_every: 0,
    };
    let mut trainer = Trainer::new(model, config, &image_path, reg, out, &model_dir.display().to_string())?;
    let start = std::time::Instant::now();
    let mut on_step = on_step;
    trainer.run(0, |r, _| {
        on_step(r);
        Ok(())
    })?;
    Ok((trainer.model, start.elapsed().as_secs_f64()))
}

/// The side of the attention maps the calibration losses use on the toy model: the trainer's
/// rule for any model (the deepest cross-attention level with at least 8x8 queries,
/// [`UNetConfig::calibration_resolution`](crate::model::unet::UNetConfig::calibration_resolution)),
/// 8x8 on the shipped toy model, whose 16x16 level is its full latent and shallowest one.
pub fn calibration_side(sd: &crate::model::sd::StableDiffusion, latent: usize) -> Result<usize> {
    sd.unet_config
        .calibration_resolution(latent)
        .ok_or_else(|| anyhow::anyhow!("the toy model's UNet has no down block with cross-attention"))
}

/// What a trained model's cross-attention does on its own training image: the calibration
/// losses (the quantities DisenDiff minimises, whatever the method trained) and how well each
/// class token's map covers its object rather than the other one. Averaged over timesteps
/// 100, 300, 500 and 700 with fixed noise; maps at [`calibration_side`], as trained.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AttentionDiagnostics {
    /// Sum over concepts of 1 - soft IoU(modifier map, class map), as trained (Eq. 4; 0 to the
    /// number of concepts; lower = bound).
    pub l_bind: f64,
    /// Soft IoU of the two squared class maps, the mean over all pairs for three concepts
    /// (Eq. 5; lower = separated).
    pub l_ss: f64,
    /// Soft IoU of each min-max normalised class-token map with its own object's mask.
    pub class_iou_own: f64,
    /// ... and with the other objects' masks (mean over them; lower = the word does not look
    /// at the other objects).
    pub class_iou_other: f64,
}

pub fn attention_diagnostics(model: &Personalized, task: &Task) -> Result<AttentionDiagnostics> {
    use crate::calibration::{min_max_normalize, soft_iou};
    use crate::training::concepts::concept_positions;
    use crate::training::step::{forward_losses, MicroBatch};
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let sd = &model.sd;
    let side = sd.default_size();
    let latent = side / sd.vae_scale_factor();
    let s = calibration_side(sd, latent)?;
    let timesteps = [100u32, 300, 500, 700];
    let b = timesteps.len();
    let x = util::rgb_to_tensor(&task.image, &dev)?.to_dtype(sd.dtype)?;
    let x0 = (sd.vae.encode(&x)?.mean * sd.vae.scaling_factor())?.to_dtype(DType::F32)?.repeat((b, 1, 1, 1))?;
    let noise = util::randn(&mut util::seeded_rng(99), x0.dims(), &dev)?;
    let caption = task.caption();
    let positions: Vec<_> = concept_positions(&sd.tokenizer, &caption, &model.concepts)?.into_iter().flatten().collect();
    if positions.len() != task.concepts.len() {
        bail!("the caption {caption:?} does not hold every concept");
    }
    let ids: Vec<u32> = (0..b).flat_map(|_| sd.tokenizer.encode(&caption).ids).collect();
    let batch = MicroBatch {
        ids: Tensor::from_vec(ids, (b, 77), &dev)?,
        x0: x0.clone(),
        noise,
        timesteps: Tensor::new(&timesteps, &dev)?,
        mask: Tensor::ones((b, 1, latent, latent), DType::F32, &dev)?,
        targets: vec![Some(positions.clone()); b],
    };
    let schedule = crate::scheduler::NoiseSchedule::new(sd.scheduler_config.clone());
    let cfg = LossConfig { bind_weight: 1.0, ss_weight: 1.0, calibration: CalibrationConfig::default(), attn_resolution: s, ..Default::default() };
    let l = forward_losses(model, &schedule, &batch, &cfg)?;
    // ground-truth masks, average-pooled to the map grid
    let masks: Vec<Tensor> = render(&task.scene)
        .masks
        .iter()
        .map(|m| {
            let v: Vec<f32> = m.as_raw().iter().map(|&p| p as f32 / 255.0).collect();
            let t = Tensor::from_vec(v, (1, 1, side, side), &dev)?;
            Ok(t.avg_pool2d(side / s)?.reshape((s, s))?)
        })
        .collect::<Result<_>>()?;
    let (mut own, mut other) = (0.0, 0.0);
    let others = (positions.len() - 1).max(1) as f64;
    for maps in &l.maps {
        for (k, p) in positions.iter().enumerate() {
            let class_map = min_max_normalize(&maps.get(p.class)?.unsqueeze(0)?)?.squeeze(0)?;
            own += soft_iou(&class_map, &masks[k])?.to_scalar::<f32>()? as f64;
            for j in (0..positions.len()).filter(|&j| j != k) {
                other += soft_iou(&class_map, &masks[j])?.to_scalar::<f32>()? as f64 / others;
            }
        }
    }
    let n = (l.maps.len() * positions.len()) as f64;
    Ok(AttentionDiagnostics {
        l_bind: l.l_bind.to_scalar::<f32>()? as f64,
        l_ss: l.l_ss.to_scalar::<f32>()? as f64,
        class_iou_own: own / n,
        class_iou_other: other / n,
    })
}

/// `n` images of `prompt` (DDIM, guidance), seeds `seed..seed+n` in one batch.
pub fn generate(model: &Personalized, prompt: &str, n: usize, seed: u64, steps: usize, guidance: f64) -> Result<Vec<RgbImage>> {
    let mut p = Text2ImageParams::new(&model.sd, prompt);
    p.num_images = n;
    p.seed = seed;
    p.steps = steps;
    p.guidance_scale = guidance;
    let images = text2img::generate(&model.sd, &p, |_, _| {})?;
    util::to_rgb8(&images)
}

/// Nearest-neighbour enlargement for viewing 64x64 images.
pub fn enlarge(img: &RgbImage, factor: u32) -> RgbImage {
    image::imageops::resize(img, img.width() * factor, img.height() * factor, image::imageops::FilterType::Nearest)
}
