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

pub const CASES: [&str; 4] = ["unet-fwd", "unet-train-kv", "train-step-toy", "sample-toy"];

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

/// A prepared case: `run()` does the timed work once.
pub type Case = Box<dyn FnMut() -> Result<()>>;

fn bench_unet(trainable: bool) -> Result<(UNet2DConditionModel, Arc<WeightStore>)> {
    let cfg = bench_unet_config()?;
    let mut store = WeightStore::random(0, DType::F32, &Device::Cpu);
    if trainable {
        store = store.with_trainable(|n| n.ends_with("attn2.to_k.weight") || n.ends_with("attn2.to_v.weight"));
    }
    let store = Arc::new(store);
    let unet = UNet2DConditionModel::new(store.root(), &cfg)?;
    Ok((unet, store))
}

fn inputs(batch: usize) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let mut rng = util::seeded_rng(1);
    let dev = Device::Cpu;
    let x = util::randn(&mut rng, &[batch, 4, 16, 16], &dev)?;
    let noise = util::randn(&mut rng, &[batch, 4, 16, 16], &dev)?;
    let ctx = util::randn(&mut rng, &[batch, 77, 128], &dev)?;
    let t: Vec<u32> = (0..batch as u32).map(|i| (i * 31) % 1000).collect();
    Ok((x, noise, Tensor::new(t, &dev)?, ctx))
}

/// Builds the named case (loading models and inputs, untimed).
pub fn prepare(name: &str) -> Result<Case> {
    match name {
        "unet-fwd" => {
            let (unet, _) = bench_unet(false)?;
            let (x, _, t, ctx) = inputs(32)?;
            Ok(Box::new(move || {
                unet.forward(&x, &t, &ctx)?;
                Ok(())
            }))
        }
        "unet-train-kv" => {
            let (unet, store) = bench_unet(true)?;
            let (x0, noise, t, ctx) = inputs(32)?;
            let schedule = NoiseSchedule::new(SchedulerConfig::sd15());
            let mut opt = AdamW::new(store.vars(), AdamWConfig::default())?;
            let cal = LossConfig::default();
            let concepts = vec![ConceptPositions { modifier: 4, class: 5 }, ConceptPositions { modifier: 7, class: 8 }];
            Ok(Box::new(move || {
                let noisy = schedule.add_noise(&x0, &noise, &t)?;
                let opts = ForwardOptions { probe: Some(AttentionProbe { resolutions: vec![16] }), detach_start_token_kv: true };
                let out = unet.forward_with(&noisy, &t, &ctx, &opts)?;
                let diffusion = (out.sample - &noise)?.sqr()?.mean_all()?;
                let layers: Vec<_> = out.attention.iter().map(|a| (a.probs.clone(), a.height, a.width)).collect();
                let maps = crate::calibration::average_maps(&layers, 16)?;
                let samples: Vec<_> = maps.into_iter().map(|m| (m, concepts.clone())).collect();
                let l = cal.calibration.losses(&samples)?;
                let loss = ((diffusion + (&l.l_bind * cal.bind_weight)?)? + (&l.l_ss * cal.ss_weight)?)?;
                let grads = loss.backward()?;
                let g: Vec<Tensor> = opt.params().iter().map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone()).collect();
                opt.step(&g)
            }))
        }
        "train-step-toy" => {
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
            let cfg = LossConfig { attn_resolution: side / f, ..Default::default() };
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
            let sd = crate::model::sd::StableDiffusion::load(&toy_model()?, &LoadOptions::default())?;
            Ok(Box::new(move || {
                let mut p = Text2ImageParams::new(&sd, "a red ball and a blue box on a white background");
                p.num_images = 4;
                p.steps = 50;
                text2img::generate(&sd, &p, |_, _| {})?;
                Ok(())
            }))
        }
        other => bail!("unknown benchmark case {other:?}; cases: {}", CASES.join(", ")),
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

/// Runs a case: `warmup` untimed runs, then `runs` timed; returns (median seconds, peak MB).
pub fn measure(name: &str, warmup: usize, runs: usize) -> Result<(f64, f64)> {
    let mut case = prepare(name)?;
    for _ in 0..warmup {
        case()?;
    }
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        case()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((times[times.len() / 2], peak_rss_mb()))
}
