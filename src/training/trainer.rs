//! The training loop: micro-batches drawn deterministically per (step, micro-batch), gradient
//! accumulation, AdamW, a JSON-lines log, atomic checkpoints and resumption, and a stop on
//! request (Ctrl-C) after a step with a checkpoint ([`Interrupted`]).
//!
//! Every random draw of step k comes from a generator seeded by (seed, k, micro-batch), so a
//! run resumed from a checkpoint after step k continues exactly as the uninterrupted run.
//!
//! The result is the concept file `OUT/concepts.safetensors`, or for a method that fine-tunes
//! the whole UNet (DreamBooth) the diffusers folder `OUT/model/`.

use super::adamw::{AdamW, AdamWConfig};
use super::checkpoint::{self, ResumeFrom};
use super::concepts::{concept_positions, Concept};
use super::data::{self, RegImage};
use super::method::Preset;
use super::model::Personalized;
use super::step::{forward_losses, MicroBatch};
use crate::formats::concept_file::{self, BaseModelId, ConceptMeta};
use crate::formats::diffusers_model;
use crate::scheduler::NoiseSchedule;
use crate::util;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use image::RgbImage;
use rand::Rng;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Everything a run needs besides the model.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The method and its ablations: what trains, masks, losses ([`Preset::loss`], with the
    /// attention resolution set for the model).
    pub preset: Preset,
    /// The user's caption, e.g. `<new1> cat and <new2> dog`.
    pub caption: String,
    /// Template around it, `{}` marking the caption (official: `photo of a {}`).
    pub template: String,
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub adamw: AdamWConfig,
    /// Image side used for training (the model's native size by default).
    pub resolution: usize,
    /// Custom Diffusion's scale/crop augmentation of the target image.
    pub augment: bool,
    pub seed: u64,
    pub checkpoint_every: usize,
}

impl TrainConfig {
    pub fn to_json(&self) -> serde_json::Value {
        let loss = &self.preset.loss;
        let mut json = serde_json::json!({
            "method": self.preset.name(), "caption": self.caption, "template": self.template,
            "steps": self.steps, "batch_size": self.batch_size, "gradient_accumulation_steps": self.grad_accum,
            "learning_rate": self.adamw.lr, "adam_beta1": self.adamw.beta1, "adam_beta2": self.adamw.beta2,
            "adam_epsilon": self.adamw.eps, "adam_weight_decay": self.adamw.weight_decay,
            "bind_weight": loss.bind_weight, "ss_weight": loss.ss_weight, "attn_resolution": loss.attn_resolution,
            "all_scales": loss.all_scales, "bind": loss.calibration.bind,
            "separate": loss.calibration.separate,
            "separation": format!("{:?}", loss.calibration.separation),
            "suppression_power": loss.calibration.suppression_power,
            "gaussian": loss.calibration.gaussian, "masks": loss.masks,
            "unet_trainable": format!("{:?}", self.preset.unet_trainable),
            "train_embeddings": self.preset.train_embeddings,
            "resolution": self.resolution, "augment": self.augment, "seed": self.seed,
        });
        // Only named when not PyTorch's f32, so that earlier runs' settings still match.
        if self.adamw.state_dtype != candle_core::DType::F32 {
            json["adam_state_dtype"] = format!("{:?}", self.adamw.state_dtype).to_lowercase().into();
        }
        // Likewise only named when on (`--train-text-encoder`).
        if self.preset.train_text_encoder {
            json["train_text_encoder"] = true.into();
        }
        json
    }
}

/// Per-step numbers for the progress bar and the log.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    pub diffusion: f64,
    pub l_bind: f64,
    pub l_ss: f64,
    pub seconds: f64,
}

pub struct Trainer {
    pub model: Personalized,
    pub config: TrainConfig,
    pub out: PathBuf,
    target: RgbImage,
    reg: Vec<(RgbImage, String)>,
    schedule: NoiseSchedule,
    opt: AdamW,
    base: BaseModelId,
    /// Keep only the newest N checkpoints (diffusers' `checkpoints_total_limit`; `None`: all).
    pub checkpoints_total_limit: Option<usize>,
    /// Set (e.g. by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub stop: Option<&'static AtomicBool>,
}

/// A run stopped on request after a step, with a checkpoint to resume from.
#[derive(Debug, thiserror::Error)]
#[error("stopped after step {step}: the checkpoint {} holds it; continue with the same command and --resume", checkpoint.display())]
pub struct Interrupted {
    pub step: usize,
    pub checkpoint: PathBuf,
}

/// Where a run of `preset` in `out` writes its result (see [`Trainer::result_path`]).
pub fn result_path(out: &Path, preset: &Preset) -> PathBuf {
    if preset.writes_model() {
        out.join("model")
    } else {
        out.join("concepts.safetensors")
    }
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // SplitMix64 over the three numbers: independent streams per (step, micro-batch).
    let mut z = seed ^ a.wrapping_mul(0x9E3779B97F4A7C15) ^ b.wrapping_mul(0xC2B2AE3D27D4EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

impl Trainer {
    pub fn new(model: Personalized, config: TrainConfig, target_image: &Path, reg: Vec<RegImage>, out: &Path, base_path: &str) -> Result<Self> {
        if config.steps == 0 || config.batch_size == 0 || config.grad_accum == 0 {
            bail!("steps, batch size and gradient accumulation must all be at least 1");
        }
        let f = model.sd.vae_scale_factor();
        if config.resolution % f != 0 || config.resolution < 2 * f {
            bail!("the training resolution {} must be a multiple of {f}", config.resolution);
        }
        if !reg.is_empty() && config.batch_size < 2 {
            bail!(
                "regularisation images take half of each micro-batch, which a batch of {} leaves no room for: \
                 use --train-batch-size 2 or more, or no regularisation set",
                config.batch_size
            );
        }
        let target = data::load_target(target_image)?;
        let mut reg_images = Vec::new();
        for r in reg {
            let img = data::center_crop_square(&util::load_rgb(&r.path)?);
            reg_images.push((img, r.caption));
        }
        let base_values: Vec<(String, Tensor)> = model.unet_vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let table = model.sd.text_encoder.token_embedding().dims2()?;
        let base = BaseModelId { path: base_path.to_string(), fingerprint: concept_file::fingerprint(&base_values, table)? };
        let schedule = NoiseSchedule::new(model.sd.scheduler_config.clone());
        let opt = AdamW::new(model.trainable(config.preset.train_embeddings), config.adamw)?;
        if opt.params().is_empty() {
            bail!("nothing to train: the method trains neither UNet weights nor embeddings");
        }
        Ok(Self { model, config, out: out.to_path_buf(), target, reg: reg_images, schedule, opt, base, checkpoints_total_limit: None, stop: None })
    }

    /// The training prompt of the target image.
    pub fn target_prompt(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.config.template.replace("{}", &self.config.caption))
    }

    fn concepts(&self) -> &[Concept] {
        &self.model.concepts
    }

    /// Draws micro-batch `micro` of step `step`.
    pub fn micro_batch(&self, step: usize, micro: usize) -> Result<MicroBatch> {
        let mut rng = util::seeded_rng(mix(self.config.seed, step as u64, micro as u64));
        let sd = &self.model.sd;
        let dev = &sd.device;
        let (size, f) = (self.config.resolution, sd.vae_scale_factor());
        let n = self.config.batch_size;
        // Half of every batch from the regularisation set when there is one (docs/method.md §4).
        let n_reg = if self.reg.is_empty() { 0 } else { n / 2 };
        let mut pixels = Vec::new();
        let mut masks = Vec::new();
        let mut prompts = Vec::new();
        let mut targets = Vec::new();
        for i in 0..n {
            if i < n - n_reg {
                let v = data::augment(&self.target, size, f, self.config.augment, &mut rng, dev)?;
                let prompt = self.target_prompt(v.prefix);
                let pos = concept_positions(&sd.tokenizer, &prompt, self.concepts())?;
                if pos.iter().any(|p| p.is_none()) {
                    bail!("the training prompt {prompt:?} lost a concept (too long?)");
                }
                targets.push(Some(pos.into_iter().flatten().collect()));
                pixels.push(v.pixels);
                masks.push(v.mask);
                prompts.push(prompt);
            } else {
                let k = rng.random_range(0..self.reg.len());
                let (img, caption) = &self.reg[k];
                let v = data::reg_view(img, size, f, &mut rng, dev)?;
                targets.push(None);
                pixels.push(v.pixels);
                masks.push(v.mask);
                prompts.push(caption.clone());
            }
        }
        let ids: Vec<u32> = prompts.iter().flat_map(|p| sd.tokenizer.encode_warn(p)).collect();
        let ids = Tensor::from_vec(ids, (n, sd.tokenizer.max_length), dev)?;
        let pixels = Tensor::stack(&pixels, 0)?.to_dtype(sd.dtype)?;
        let posterior = sd.vae.encode(&pixels)?;
        let eps = util::randn(&mut rng, posterior.mean.dims(), dev)?;
        let z = posterior.sample(&eps.to_dtype(posterior.mean.dtype())?)?.to_dtype(DType::F32)?;
        let x0 = ((z - sd.vae.shift_factor())? * sd.vae.scaling_factor())?.detach();
        let noise = util::randn(&mut rng, x0.dims(), dev)?;
        let t_max = self.schedule.num_train_timesteps() as u32;
        let ts: Vec<u32> = (0..n).map(|_| rng.random_range(0..t_max)).collect();
        let timesteps = Tensor::new(ts, dev)?;
        let mask = Tensor::stack(&masks, 0)?;
        Ok(MicroBatch { ids, x0, noise, timesteps, mask, targets })
    }

    /// One optimiser step (all micro-batches); returns the mean losses.
    pub fn train_step(&mut self, step: usize) -> Result<StepRecord> {
        let start = std::time::Instant::now();
        let accum = self.config.grad_accum;
        let params: Vec<_> = self.opt.params().to_vec();
        let mut sums: Vec<Option<Tensor>> = vec![None; params.len()];
        let (mut loss, mut diff, mut bind, mut ss) = (0.0, 0.0, 0.0, 0.0);
        for micro in 0..accum {
            let batch = self.micro_batch(step, micro)?;
            let l = forward_losses(&self.model, &self.schedule, &batch, &self.config.preset.loss)?;
            let grads = (&l.total / accum as f64)?.backward()?;
            for (i, (name, var)) in params.iter().enumerate() {
                let Some(g) = grads.get(var.as_tensor()) else {
                    bail!("{name} received no gradient: it does not influence the loss");
                };
                // candle leaves a variable's gradient attached to the forward graph (its
                // backward detaches only the inner nodes' gradients): kept in the sum or in
                // AdamW's state, it would keep every step's activations alive. DreamBooth's conv
                // weights grew the process by the forward's size each step.
                let g = g.detach();
                sums[i] = Some(match sums[i].take() {
                    None => g,
                    Some(s) => (s + g)?,
                });
            }
            loss += l.total.to_scalar::<f32>()? as f64 / accum as f64;
            diff += l.diffusion.to_scalar::<f32>()? as f64 / accum as f64;
            bind += l.l_bind.to_scalar::<f32>()? as f64 / accum as f64;
            ss += l.l_ss.to_scalar::<f32>()? as f64 / accum as f64;
        }
        let grads: Vec<Tensor> = sums.into_iter().map(|g| g.expect("accumulated")).collect();
        self.opt.step(&grads)?;
        Ok(StepRecord { step: step + 1, loss, diffusion: diff, l_bind: bind, l_ss: ss, seconds: start.elapsed().as_secs_f64() })
    }

    fn meta(&self) -> ConceptMeta {
        ConceptMeta {
            concept: self.model.concepts.clone(),
            method: self.config.preset.name(),
            hyperparameters: self.config.to_json(),
            base_model: self.base.clone(),
        }
    }

    fn unet_weights(&self) -> Vec<(String, Tensor)> {
        self.model.unet_vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }

    /// Writes the concept file of the current weights.
    pub fn save_concepts(&self, path: &Path) -> Result<()> {
        concept_file::save(path, &self.meta(), &self.unet_weights(), self.model.embeddings.as_tensor())
    }

    /// `OUT/checkpoints/step-NNNNNN.safetensors`: weights, embeddings, AdamW state, step
    /// (see [`checkpoint`]), pruned to `checkpoints_total_limit`.
    pub fn save_checkpoint(&self, step: usize) -> Result<PathBuf> {
        let mut tensors = self.opt.state_tensors();
        for (name, var) in self.opt.params() {
            tensors.insert(format!("param.{name}"), var.as_tensor().clone());
        }
        checkpoint::write(&self.out, step, &tensors, &self.config.to_json(), self.checkpoints_total_limit)
    }

    /// Restores a checkpoint (`Latest`: the newest readable one under `OUT/checkpoints`, falling
    /// back past unreadable ones); returns its step (0 if there is none).
    pub fn resume(&mut self, from: &ResumeFrom) -> Result<usize> {
        let expected: Vec<(String, Vec<usize>)> = self
            .opt
            .params()
            .iter()
            .flat_map(|(n, v)| ["param.", "adam.m.", "adam.v."].map(|p| (format!("{p}{n}"), v.dims().to_vec())))
            .collect();
        let device = self.model.sd.device.clone();
        let ckpt = match from {
            ResumeFrom::Latest => match checkpoint::read_latest(&self.out, &expected, &device)? {
                Some(c) => c,
                None => return Ok(0),
            },
            ResumeFrom::Path(p) => checkpoint::read(&checkpoint::resolve(&self.out, p)?, &expected, &device)?,
        };
        let path = &ckpt.path;
        let mut now = self.config.to_json();
        let mut then = ckpt.config.clone();
        // The step count may be raised on resume; everything else must match.
        now["steps"] = serde_json::Value::Null;
        then["steps"] = serde_json::Value::Null;
        if now != then {
            bail!("{} was written by a run with other settings; resume with the same settings or use another --out", path.display());
        }
        if ckpt.step > self.config.steps {
            bail!("{} is at step {}, past --max-train-steps {}", path.display(), ckpt.step, self.config.steps);
        }
        for (name, var) in self.opt.params() {
            let t = ckpt.tensors.get(&format!("param.{name}")).with_context(|| format!("checkpoint has no {name}"))?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        self.opt.load_state(&ckpt.tensors, ckpt.step)?;
        Ok(ckpt.step)
    }

    /// Runs from `start` to the configured number of steps, reporting each step (with the
    /// model as it is after that step, e.g. for validation images).
    pub fn run(&mut self, start: usize, mut on_step: impl FnMut(&StepRecord, &Personalized) -> Result<()>) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.out).with_context(|| format!("creating {}", self.out.display()))?;
        let log_path = self.out.join("train_log.jsonl");
        // Steps after the checkpoint resumed from are trained again: their old lines go.
        checkpoint::trim_log(&log_path, start)?;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
        for step in start..self.config.steps {
            let rec = self.train_step(step)?;
            if !rec.loss.is_finite() {
                bail!("the loss became {} at step {}: lower the learning rate", rec.loss, rec.step);
            }
            writeln!(log, "{}", serde_json::to_string(&rec)?)
                .map_err(|e| anyhow!("writing {} failed: {e}; {}", log_path.display(), checkpoint::resume_hint(&self.out)))?;
            on_step(&rec, &self.model)?;
            if self.config.checkpoint_every > 0 && rec.step % self.config.checkpoint_every == 0 && rec.step < self.config.steps {
                // The log on disk covers every step a checkpoint does.
                log.sync_data().map_err(|e| anyhow!("writing {} failed: {e}; {}", log_path.display(), checkpoint::resume_hint(&self.out)))?;
                self.save_checkpoint(rec.step)?;
            }
            if self.stop.is_some_and(|s| s.load(Ordering::SeqCst)) && rec.step < self.config.steps {
                log.sync_data().map_err(|e| anyhow!("writing {} failed: {e}; {}", log_path.display(), checkpoint::resume_hint(&self.out)))?;
                let checkpoint = self.save_checkpoint(rec.step)?;
                return Err(Interrupted { step: rec.step, checkpoint }.into());
            }
        }
        let path = self.result_path();
        let saved = if self.config.preset.writes_model() { self.save_model(&path) } else { self.save_concepts(&path) };
        saved.map_err(|e| anyhow!("{e:#}; {}", checkpoint::resume_hint(&self.out)))?;
        Ok(path)
    }

    /// Where [`run`](Self::run) writes its result: `OUT/model/` (a diffusers folder) for a
    /// method that fine-tunes the whole UNet, `OUT/concepts.safetensors` otherwise.
    pub fn result_path(&self) -> PathBuf {
        result_path(&self.out, &self.config.preset)
    }

    /// Writes the fine-tuned model as a complete diffusers folder at `dir` (see
    /// [`diffusers_model`]), from the base folder the run started from.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        let tokens: Vec<(String, u32)> =
            self.model.concepts.iter().zip(&self.model.modifier_ids).map(|(c, &id)| (c.modifier.clone(), id)).collect();
        let unet = self.unet_weights();
        let text_encoder: Vec<(String, Tensor)> =
            self.model.text_encoder_vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let ft = diffusers_model::FineTuned { unet: &unet, text_encoder: &text_encoder, tokens: &tokens, rows: self.model.embeddings.as_tensor() };
        diffusers_model::write(Path::new(&self.base.path), dir, &ft)
    }
}
