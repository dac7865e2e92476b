//! Benchmark cases, run side by side with their PyTorch twins
//! (`tools/reference/bench_torch.py`, same shapes and threads); results in BENCHMARKS.md.
//!
//! - `unet-fwd`: the 3.19 M-parameter UNet (blocks 64/128, one layer per block, cross-attention
//!   dim 128, 8 heads; CrossAttnDown + Down, mid, Up + CrossAttnUp), batch 32, 16x16 latents,
//!   77 context tokens, forward only.
//! - `unet-train-kv`: the same UNet, forward with the 16x16 attention probe (start-token K/V
//!   detached), masked diffusion loss + DisenDiff losses, backward to every attn2 K/V, AdamW.
//! - `train-step-toy`: one DisenDiff micro-batch (2 samples, VAE encode and text encoder
//!   included) on the toy base model, backward, AdamW.
//! - `sample-toy`: 50 DDIM steps with guidance 7.5, 4 images, toy model.
//! - `sd15-train-kv` (GPU case, not in the default set): one DisenDiff micro-batch at full size:
//!   the SD1.5 UNet config (859.5 M parameters, random weights), batch 2, 64x64 latents (512 px
//!   images), a 77 x 768 context, the 16x16 attention probe, diffusion + DisenDiff losses,
//!   backward to every attn2 K/V, AdamW. Its twin is `tools/gpu/torch_side.py`.
//!
//! Every case runs on the device and with the frozen-weight dtype it is given (`--device cuda`,
//! `--dtype bf16`: trainable weights stay f32, as `train --dtype`); a CUDA run synchronises the
//! device before the clock stops.

use crate::calibration::ConceptPositions;
use crate::model::sd::LoadOptions;
use crate::model::unet::{AttentionProbe, ForwardOptions, UNet2DConditionModel, UNetConfig};
use crate::model::weights::WeightStore;
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::scheduler::{NoiseSchedule, SchedulerConfig};
use crate::training::adamw::{AdamW, AdamWConfig};
use crate::training::step::{forward_losses, LossConfig, MicroBatch};
use crate::util;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The default cases (the CPU table of BENCHMARKS.md).
pub const CASES: [&str; 4] = ["unet-fwd", "unet-train-kv", "train-step-toy", "sample-toy"];

/// Cases run only when named (full size: minutes per run on a CPU, meant for a GPU).
pub const GPU_CASES: [&str; 1] = ["sd15-train-kv"];

/// Whether `name` is a known case.
pub fn is_case(name: &str) -> bool {
    CASES.contains(&name) || GPU_CASES.contains(&name)
}

/// The toy model folder the toy cases use.
pub const TOY_MODEL: &str = "assets/toy-model";

/// diffusers config of the benchmark UNet (3,193,604 parameters).
pub fn bench_unet_config() -> Result<UNetConfig> {
    UNetConfig::from_json_str(
        r#"{"sample_size": 16, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [64, 128], "layers_per_block": 1,
            "cross_attention_dim": 128, "attention_head_dim": 8}"#,
    )
}

/// diffusers config of SD1.5's UNet (`runwayml/stable-diffusion-v1-5`, 859,520,964 parameters).
pub fn sd15_unet_config() -> Result<UNetConfig> {
    UNetConfig::from_json_str(
        r#"{"sample_size": 64, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 8}"#,
    )
}

/// Where and in which precision a case runs.
#[derive(Clone, Debug)]
pub struct Target {
    pub device: Device,
    /// The frozen weights' dtype (trainable ones are f32).
    pub dtype: DType,
    /// The training cases recompute the UNet blocks' activations in the backward pass.
    pub gradient_checkpointing: bool,
}

impl Default for Target {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, gradient_checkpointing: false }
    }
}

/// `f32`, `f16` or `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype {other:?} (f32, f16, bf16)"),
    })
}

/// A prepared case: `run()` does the timed work once.
pub type Case = Box<dyn FnMut() -> Result<()>>;

fn bench_unet(cfg: &UNetConfig, trainable: bool, target: &Target) -> Result<(UNet2DConditionModel, Arc<WeightStore>)> {
    let mut store = WeightStore::random(0, target.dtype, &target.device);
    if trainable {
        store = store.with_trainable(|n| n.ends_with("attn2.to_k.weight") || n.ends_with("attn2.to_v.weight"));
    }
    let store = Arc::new(store);
    let unet = UNet2DConditionModel::new(store.root(), cfg)?;
    Ok((unet, store))
}

/// Latents, noise, timesteps and context for `batch` images of `side`x`side` latents and a
/// context of width `ctx_dim`; latents and context in `target.dtype` on `target.device`.
fn inputs(batch: usize, side: usize, ctx_dim: usize, target: &Target) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let mut rng = util::seeded_rng(1);
    let dev = &target.device;
    let x = util::randn(&mut rng, &[batch, 4, side, side], dev)?;
    let noise = util::randn(&mut rng, &[batch, 4, side, side], dev)?;
    let ctx = util::randn(&mut rng, &[batch, 77, ctx_dim], dev)?.to_dtype(target.dtype)?;
    let t: Vec<u32> = (0..batch as u32).map(|i| (i * 31) % 1000).collect();
    Ok((x, noise, Tensor::new(t, dev)?, ctx))
}

/// One DisenDiff K/V step on a UNet of `cfg`: the 16x16 probe with start-token K/V detached,
/// diffusion loss (f32) + L_bind/L_s&s, backward to every attn2 K/V, AdamW.
fn train_kv(cfg: &UNetConfig, batch: usize, side: usize, target: &Target) -> Result<Case> {
    let (unet, store) = bench_unet(cfg, true, target)?;
    let (x0, noise, t, ctx) = inputs(batch, side, cfg.cross_attention_dim, target)?;
    let schedule = NoiseSchedule::new(SchedulerConfig::sd15());
    let mut opt = AdamW::new(store.vars(), AdamWConfig::default())?;
    let cal = LossConfig::default();
    let concepts = vec![ConceptPositions { modifier: 4, class: 5 }, ConceptPositions { modifier: 7, class: 8 }];
    let dtype = target.dtype;
    let opts = ForwardOptions {
        probe: Some(AttentionProbe { resolutions: vec![16] }),
        detach_start_token_kv: true,
        gradient_checkpointing: target.gradient_checkpointing,
    };
    Ok(Box::new(move || {
        let noisy = schedule.add_noise(&x0, &noise, &t)?.to_dtype(dtype)?;
        let out = unet.forward_with(&noisy, &t, &ctx, &opts)?;
        let diffusion = (out.sample.to_dtype(DType::F32)? - &noise)?.sqr()?.mean_all()?;
        let layers: Vec<_> = out.attention.iter().map(|a| (a.probs.clone(), a.height, a.width)).collect();
        let maps = crate::calibration::average_maps(&layers, 16)?;
        let samples: Vec<_> = maps.into_iter().map(|m| (m, concepts.clone())).collect();
        let l = cal.calibration.losses(&samples)?;
        let loss = ((diffusion + (&l.l_bind * cal.bind_weight)?)? + (&l.l_ss * cal.ss_weight)?)?;
        let grads = loss.backward()?;
        let mut g = Vec::new();
        for (name, v) in opt.params() {
            match grads.get(v.as_tensor()) {
                Some(t) => g.push(t.clone()),
                None => bail!("trainable {name} got no gradient"),
            }
        }
        opt.step(&g)
    }))
}

/// Builds the named case on the CPU in f32 (loading models and inputs, untimed).
pub fn prepare(name: &str) -> Result<Case> {
    prepare_on(name, &Target::default())
}

/// Builds the named case on `target` (loading models and inputs, untimed).
pub fn prepare_on(name: &str, target: &Target) -> Result<Case> {
    let toy_only = |what: &str| -> Result<()> {
        if !target.device.is_cpu() || target.dtype != DType::F32 {
            bail!("case {what} runs on the CPU in f32 only (the toy model's loaders); use unet-fwd, unet-train-kv or sd15-train-kv elsewhere");
        }
        Ok(())
    };
    match name {
        "unet-fwd" => {
            let (unet, _) = bench_unet(&bench_unet_config()?, false, target)?;
            let (x, _, t, ctx) = inputs(32, 16, 128, target)?;
            let x = x.to_dtype(target.dtype)?;
            Ok(Box::new(move || {
                unet.forward(&x, &t, &ctx)?;
                Ok(())
            }))
        }
        "unet-train-kv" => train_kv(&bench_unet_config()?, 32, 16, target),
        "sd15-train-kv" => train_kv(&sd15_unet_config()?, 2, 64, target),
        "train-step-toy" => {
            toy_only(name)?;
            let model_dir = toy_model()?;
            let caption = "<new1> ball and <new2> box";
            let concepts = crate::training::concepts::parse_concepts(
                caption,
                &crate::training::concepts::modifier_tokens_in(caption),
                &["pll".into(), "ktn".into()],
            )?;
            let model = crate::training::model::Personalized::load(
                &model_dir,
                &LoadOptions::default(),
                &concepts,
                crate::training::method::UNetTrainable::CrossAttnKV,
            )?;
            let schedule = NoiseSchedule::new(model.sd.scheduler_config.clone());
            let mut opt = AdamW::new(model.trainable(true), AdamWConfig::default())?;
            let side = model.sd.default_size();
            let f = model.sd.vae_scale_factor();
            let prompt = format!("photo of a {caption}");
            let pos: Vec<ConceptPositions> =
                crate::training::concepts::concept_positions(&model.sd.tokenizer, &prompt, &concepts)?.into_iter().flatten().collect();
            let ids: Vec<u32> = [&prompt, &prompt].iter().flat_map(|p| model.sd.tokenizer.encode(p).ids).collect();
            let ids = Tensor::from_vec(ids, (2, 77), &Device::Cpu)?;
            let mut rng = util::seeded_rng(3);
            let pixels = (util::randn(&mut rng, &[2, 3, side, side], &Device::Cpu)? * 0.5)?;
            let cfg = LossConfig { attn_resolution: side / f, gradient_checkpointing: target.gradient_checkpointing, ..Default::default() };
            Ok(Box::new(move || {
                let post = model.sd.vae.encode(&pixels)?;
                let eps = util::randn(&mut rng, post.mean.dims(), &Device::Cpu)?;
                let x0 = (post.sample(&eps)? * model.sd.vae.scaling_factor())?.detach();
                let noise = util::randn(&mut rng, x0.dims(), &Device::Cpu)?;
                let lat = x0.dim(2)?;
                let batch = MicroBatch {
                    ids: ids.clone(),
                    x0,
                    noise,
                    timesteps: Tensor::new(&[500u32, 100], &Device::Cpu)?,
                    mask: Tensor::ones((2, 1, lat, lat), DType::F32, &Device::Cpu)?,
                    targets: vec![Some(pos.clone()), Some(pos.clone())],
                };
                let l = forward_losses(&model, &schedule, &batch, &cfg)?;
                let grads = l.total.backward()?;
                let g: Vec<Tensor> = opt.params().iter().map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone()).collect();
                opt.step(&g)
            }))
        }
        "sample-toy" => {
            toy_only(name)?;
            let sd = crate::model::sd::StableDiffusion::load(&toy_model()?, &LoadOptions::default())?;
            Ok(Box::new(move || {
                let mut p = Text2ImageParams::new(&sd, "a red ball and a blue box on a white background");
                p.num_images = 4;
                p.steps = 50;
                text2img::generate(&sd, &p, |_, _| {})?;
                Ok(())
            }))
        }
        other => bail!("unknown benchmark case {other:?}; cases: {}, {}", CASES.join(", "), GPU_CASES.join(", ")),
    }
}

fn toy_model() -> Result<std::path::PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(TOY_MODEL);
    if !p.join("model_index.json").is_file() {
        bail!("the toy model is not at {}", p.display());
    }
    Ok(p)
}

/// Peak resident memory of this process so far, in MB (Linux `VmHWM`).
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// What [`measure`] reports.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Median seconds of the timed runs.
    pub median_s: f64,
    /// Each timed run, in order.
    pub times_s: Vec<f64>,
    /// Seconds to build the case (weights, inputs) before the first run.
    pub setup_s: f64,
    /// Peak resident memory of the process (host memory), MB.
    pub peak_rss_mb: f64,
}

/// Runs a case on the CPU in f32: `warmup` untimed runs, then `runs` timed; returns (median
/// seconds, peak MB).
pub fn measure(name: &str, warmup: usize, runs: usize) -> Result<(f64, f64)> {
    let m = measure_on(name, &Target::default(), warmup, runs)?;
    Ok((m.median_s, m.peak_rss_mb))
}

/// Runs a case on `target`: `warmup` untimed runs, then `runs` timed, each ended by a device
/// synchronisation (CUDA work is asynchronous).
pub fn measure_on(name: &str, target: &Target, warmup: usize, runs: usize) -> Result<Measured> {
    let start = Instant::now();
    let mut case = prepare_on(name, target)?;
    target.device.synchronize()?;
    let setup_s = start.elapsed().as_secs_f64();
    for _ in 0..warmup {
        case()?;
        target.device.synchronize()?;
    }
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        case()?;
        target.device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(Measured { median_s: sorted[sorted.len() / 2], times_s: times, setup_s, peak_rss_mb: peak_rss_mb() })
}
