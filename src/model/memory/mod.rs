//! The peak memory of a run, estimated from the shapes before any of it is allocated, so that
//! a size that cannot fit is refused with a message instead of the allocator aborting the
//! process (a 100000 x 100000 request asks for tens of gigabytes in one tensor).
//!
//! The estimate walks the model's configs level by level and takes, for each stage of the run
//! (UNet step, VAE decode, VAE encode, training step), the largest set of activations alive at
//! once; the peak is the model's own memory (measured: the process's resident size once it is
//! loaded) plus the largest stage. The terms, per level of P pixels and C channels, e the bytes
//! of an activation (f32 4, f16/bf16 2) and b the UNet batch (2 with classifier-free guidance):
//! - a 3x3 convolution: its input, the patch matrix (im2col: 9 x C_in x P) the CPU product
//!   reads, its output and the residual: (9 C_in + C_in + 2 C_out) P e;
//! - a transformer block: the GEGLU feed-forward's 8C-wide projection, its gelu half and the
//!   q/k/v/out projections: 17 C P e; with the fused CPU kernels the attention scores exist
//!   64 query rows at a time, on the generic path in blocks of at most
//!   [`attention_chunks::SCORE_BUDGET_BYTES`] (twice: scores and probabilities);
//! - the UNet's skip connections, alive through the up path: (layers + 1) C P per level;
//! - training keeps the activations of the whole forward for the backward: the sum over
//!   levels instead of the largest, three tensors per layer (norm, activation, output), with
//!   the attention probabilities of the probed level kept in full; with gradient
//!   checkpointing only each block's input (a resnet's, and a transformer's with its output)
//!   outside the probed level;
//! - training also holds, per trainable parameter (f32; the weights themselves are loaded, so
//!   part of the model's measured memory), AdamW's m and v through every stage (8 bytes) and
//!   the gradient during the backward (4 bytes, 8 with gradient accumulation's running sum):
//!   nothing next to the activations for K/V, but 12 bytes x 860M = 10.3 GB for a full SD1.5
//!   UNet (DreamBooth), on top of its 3.4 GB of f32 weights.
//!
//! It is an estimate, not a bound: `tests/memory_limits.rs` compares it with the measured peak
//! (the kernel's maximum resident size) of real runs at two sizes and states the factor.

use super::attention_chunks::SCORE_BUDGET_BYTES;
use super::sd::StableDiffusion;
use super::unet::UNetConfig;
use super::vae::VaeConfig;
use super::vae_tiling::Tiling;
use anyhow::{bail, Result};
use candle_core::DType;

mod gpu_plan;
pub use gpu_plan::{sd15_gpu_training_plan, unet_parameters, GpuPlan, GpuPlanRow, GpuSavings};

/// One stage of a run and the bytes it needs at its peak, beyond the loaded model.
#[derive(Clone, Debug)]
pub struct Stage {
    pub name: &'static str,
    pub bytes: u64,
}

/// The stages of a run; its peak is the model plus the largest stage.
#[derive(Clone, Debug)]
pub struct Estimate {
    pub stages: Vec<Stage>,
}

impl Estimate {
    /// The largest stage.
    pub fn peak_stage(&self) -> &Stage {
        self.stages.iter().max_by_key(|s| s.bytes).expect("an estimate has stages")
    }

    /// Bytes beyond the loaded model at the run's peak.
    pub fn activations(&self) -> u64 {
        self.peak_stage().bytes
    }
}

/// What a generation run (text-to-image, image-to-image, inpainting) computes, one image at a
/// time as the CLI runs it.
#[derive(Clone, Copy, Debug)]
pub struct Generation {
    pub height: usize,
    pub width: usize,
    /// Classifier-free guidance doubles the UNet batch.
    pub guidance: bool,
    /// Image-to-image and inpainting encode a picture with the VAE encoder.
    pub encodes_image: bool,
    pub vae_tiling: bool,
}

/// What one training micro-batch computes.
#[derive(Clone, Copy, Debug)]
pub struct Training {
    pub resolution: usize,
    pub batch: usize,
    /// The side of the attention maps the calibration losses read (their probabilities are
    /// kept in full).
    pub attn_resolution: usize,
    /// Trainable parameters (UNet weights and embedding rows): their gradients and AdamW state.
    pub trainable_params: u64,
    /// Micro-batches per optimiser step (more than one keeps a running gradient sum).
    pub grad_accum: usize,
    /// Bytes of AdamW state per trainable parameter: 8 (m and v in f32) or 4 (in bf16).
    pub state_bytes: u64,
    /// Gradient checkpointing: the unprobed levels keep only their blocks' inputs.
    pub checkpointed: bool,
}

impl Training {
    /// AdamW's m and v, alive through every stage.
    pub fn optimizer_state_bytes(&self) -> u64 {
        self.trainable_params.saturating_mul(self.state_bytes)
    }

    /// The gradients of one backward (f32), and the running sum under accumulation.
    pub fn gradient_bytes(&self) -> u64 {
        let copies = if self.grad_accum > 1 { 2 } else { 1 };
        self.trainable_params.saturating_mul(4 * copies)
    }
}

/// Sizes of the model that the estimate reads.
pub struct Shapes {
    unet_channels: Vec<u64>,
    unet_layers: Vec<u64>,
    unet_attention: Vec<bool>,
    unet_heads: Vec<u64>,
    context_len: u64,
    vae_channels: Vec<u64>,
    vae_factor: u64,
    tiling: Tiling,
    /// Bytes of one activation (the frozen weights' precision).
    e: u64,
    /// The fused CPU kernels (blocked attention) apply.
    fused: bool,
}

impl Shapes {
    /// The shapes of a loaded model (and whether the fused CPU kernels serve it).
    pub fn of(sd: &StableDiffusion) -> Result<Self> {
        let fused = sd.dtype == candle_core::DType::F32 && sd.device.is_cpu() && super::kernels::enabled();
        Self::from_configs(&sd.unet_config, &sd.vae_config, sd.tokenizer.max_length, sd.dtype, fused)
    }

    /// The shapes of a model of these configs, with activations of `dtype`, a prompt of
    /// `context_len` tokens, and `fused` CPU kernels or candle's generic path.
    pub fn from_configs(unet: &UNetConfig, vae: &VaeConfig, context_len: usize, dtype: DType, fused: bool) -> Result<Self> {
        let r = unet.resolved()?;
        Ok(Self {
            unet_channels: unet.block_out_channels.iter().map(|&c| c as u64).collect(),
            unet_layers: r.layers.iter().map(|&l| l as u64).collect(),
            unet_attention: unet.down_block_types.iter().map(|t| t.contains("CrossAttn")).collect(),
            unet_heads: r.heads.iter().map(|&h| h as u64).collect(),
            context_len: context_len as u64,
            vae_channels: vae.block_out_channels.iter().map(|&c| c as u64).collect(),
            vae_factor: 1 << (vae.block_out_channels.len() - 1),
            tiling: Tiling::new(vae.sample_size, vae.block_out_channels.len()),
            e: dtype.size_in_bytes() as u64,
            fused,
        })
    }

    /// Scores of one attention over `queries` x `keys` for `batch_heads` (f32, both the scores
    /// and the probabilities on the generic path).
    fn scores(&self, batch_heads: u64, queries: u64, keys: u64) -> u64 {
        if self.fused {
            // 64-row blocks per thread: negligible next to the activations
            return 0;
        }
        let full = batch_heads.saturating_mul(queries).saturating_mul(keys).saturating_mul(4);
        2 * full.min(SCORE_BUDGET_BYTES as u64)
    }

    /// The UNet's largest working set for one forward at latent `pixels`, batch `b`.
    fn unet_step(&self, pixels: u64, b: u64) -> u64 {
        let n = self.unet_channels.len();
        let mut skips = 0u64;
        let mut worst = 0u64;
        for l in 0..n {
            let p = pixels >> (2 * l);
            let c = self.unet_channels[l];
            let c_next = self.unet_channels[(l + 1).min(n - 1)];
            skips = skips.saturating_add((self.unet_layers[l] + 1).saturating_mul(c).saturating_mul(p));
            // the up path's first resnet reads the upsampled deeper level and the skip
            let conv = conv_bytes(c + c_next, c, p);
            let attn = if self.unet_attention[l] {
                17u64.saturating_mul(c).saturating_mul(p).saturating_mul(self.e).saturating_mul(b)
                    + self.scores(b * self.unet_heads[l], p, p.max(self.context_len))
            } else {
                0
            };
            worst = worst.max(conv.saturating_mul(self.e).saturating_mul(b)).max(attn);
        }
        skips.saturating_mul(self.e).saturating_mul(b).saturating_add(worst)
    }

    /// The VAE decoder's largest working set for latents of `pixels` (one image).
    fn vae_decode(&self, pixels: u64) -> u64 {
        let chans: Vec<u64> = self.vae_channels.iter().rev().copied().collect();
        let mut worst = self.vae_mid(pixels, chans[0]);
        for (j, &c) in chans.iter().enumerate() {
            let p = pixels << (2 * j);
            let c_in = chans[j.saturating_sub(1)];
            worst = worst.max(conv_bytes(c_in, c, p));
            if j + 1 < chans.len() {
                // nearest upsampling, then a 3x3 convolution at the new size
                worst = worst.max(c.saturating_mul(p) + conv_bytes(c, c, p << 2));
            }
        }
        // the decoded image and its [0, 1] copies (f32)
        worst.saturating_mul(self.e) + 3 * 4 * 4 * (pixels << (2 * (chans.len() as u32 - 1)))
    }

    /// The VAE encoder's largest working set for an image of `pixels` (one image).
    fn vae_encode(&self, pixels: u64) -> u64 {
        let mut worst = conv_bytes(3, self.vae_channels[0], pixels);
        let n = self.vae_channels.len();
        for (j, &c) in self.vae_channels.iter().enumerate() {
            let p = pixels >> (2 * j);
            worst = worst.max(conv_bytes(c, c, p));
        }
        let deepest = pixels >> (2 * (n as u32 - 1));
        worst = worst.max(self.vae_mid(deepest, self.vae_channels[n - 1]));
        worst.saturating_mul(self.e) + 3 * 4 * 3 * pixels
    }

    /// The VAE mid block's attention over every pixel of the deepest level (one head).
    fn vae_mid(&self, pixels: u64, c: u64) -> u64 {
        5u64.saturating_mul(c).saturating_mul(pixels) + self.scores(1, pixels, pixels) / self.e.max(1)
    }
}

/// A 3x3 convolution's input, patch matrix, output and residual, in activations.
fn conv_bytes(c_in: u64, c_out: u64, pixels: u64) -> u64 {
    (10u64.saturating_mul(c_in) + 2u64.saturating_mul(c_out)).saturating_mul(pixels)
}

/// The stages of generating one image of `g`'s size on a model of shapes `s`.
pub fn generation(s: &Shapes, g: &Generation) -> Result<Estimate> {
    let f = s.vae_factor;
    let (h, w) = (g.height as u64, g.width as u64);
    if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
        bail!("height and width must be positive multiples of {f} (the VAE factor), got {h}x{w}");
    }
    let latent = (h / f).saturating_mul(w / f);
    let b = if g.guidance { 2 } else { 1 };
    let mut stages = vec![Stage { name: "UNet step", bytes: s.unet_step(latent, b) }];
    let decode = if g.vae_tiling && s.tiling.applies((h / f) as usize, (w / f) as usize) {
        let tile = (s.tiling.latent_tile as u64).pow(2);
        // every decoded tile is kept until they are joined: the image plus the overlaps, twice
        s.vae_decode(tile) + 2 * 3 * 4 * 2 * h.saturating_mul(w)
    } else {
        s.vae_decode(latent)
    };
    stages.push(Stage { name: "VAE decoder", bytes: decode });
    if g.encodes_image {
        stages.push(Stage { name: "VAE encoder", bytes: s.vae_encode(h.saturating_mul(w)) });
    }
    Ok(Estimate { stages })
}

/// The stages of one training micro-batch on a model of shapes `s`: the VAE encoding of the
/// images and the UNet forward whose activations the backward keeps.
pub fn training(s: &Shapes, t: &Training) -> Result<Estimate> {
    let f = s.vae_factor;
    let side = t.resolution as u64;
    if side == 0 || side % f != 0 {
        bail!("the resolution must be a positive multiple of {f} (the VAE factor), got {side}");
    }
    let b = t.batch.max(1) as u64;
    let latent = (side / f).pow(2);
    let mut kept = 0u64;
    for l in 0..s.unet_channels.len() {
        let p = latent >> (2 * l);
        let c = s.unet_channels[l];
        // down and up path: 2 layers + 1 per level each way, three tensors a layer, plus the
        // transformer's 17C per layer where there is one
        let layers = 2 * s.unet_layers[l] + 1;
        let probed = (t.attn_resolution as u64).pow(2);
        // checkpointed, a level's resnets and (unprobed) transformers keep their inputs only;
        // one block's activations at a time are recomputed, within the forward's stage term
        let per_layer = match (t.checkpointed, s.unet_attention[l]) {
            (true, attn) if !(attn && p == probed) => if attn { 2 * c } else { c },
            (_, attn) => 3 * c + if attn { 17 * c } else { 0 },
        };
        kept = kept.saturating_add(layers.saturating_mul(per_layer).saturating_mul(p));
        if s.unet_attention[l] && p == probed {
            // the probe keeps these probabilities (f32) for the losses and the backward
            kept = kept.saturating_add(layers * s.unet_heads[l] * p * s.context_len * 4 / s.e.max(1));
        }
    }
    let forward = kept.saturating_mul(s.e).saturating_mul(b).saturating_add(s.unet_step(latent, b));
    let state = t.optimizer_state_bytes();
    Ok(Estimate {
        stages: vec![
            Stage { name: "VAE encoder", bytes: s.vae_encode(side * side).saturating_mul(b).saturating_add(state) },
            Stage { name: "UNet forward and backward", bytes: forward.saturating_add(state).saturating_add(t.gradient_bytes()) },
        ],
    })
}


/// Memory the run may still use: the kernel's `MemAvailable`, lowered to the cgroup's limit
/// when the process runs under one (containers, `systemd-run -p MemoryMax=`). `None` where
/// neither can be read.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)?;
    let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let current = std::fs::read_to_string("/sys/fs/cgroup/memory.current").ok();
    if let (Some(max), Some(current)) = (max, current) {
        if let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse::<u64>()) {
            avail = avail.min(max.saturating_sub(current));
        }
    }
    Some(avail)
}

/// The process's resident size now (`VmRSS`), in bytes: the loaded model's share of the peak.
pub fn resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// `bytes` for people: "1.5 GB", "640 MB".
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e12 {
        format!("{:.1} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else {
        format!("{:.0} MB", (b / 1e6).max(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(1_500_000_000), "1.5 GB");
        assert_eq!(human(640_000_000), "640 MB");
        assert_eq!(human(3), "1 MB");
        assert_eq!(human(2_300_000_000_000), "2.3 TB");
    }

    #[test]
    fn conv_terms() {
        // SD's VAE decoder at 512 px: the 256-channel upsampler convolution's patch matrix
        // alone is 9 x 256 x 512^2 f32 = 2.4 GB
        assert_eq!(conv_bytes(256, 256, 512 * 512) * 4, (10 * 256 + 512) * 512 * 512 * 4);
    }

    /// Parameters of SD1.5's UNet (`sum(p.numel() for p in unet.parameters())`).
    const SD15_UNET_PARAMS: u64 = 859_520_964;

    /// Parameters of SD1.5's text encoder (`ClipTextConfig::parameters`, transformers' count),
    /// which DreamBooth's `--train-text-encoder` trains as well.
    const SD15_TEXT_ENCODER_PARAMS: u64 = 123_060_480;

    /// SD1.5's configs (diffusers' `runwayml/stable-diffusion-v1-5` UNet and VAE).
    fn sd15(dtype: DType, fused: bool) -> Shapes {
        let unet = UNetConfig::from_json_str(
            r#"{"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "cross_attention_dim": 768, "attention_head_dim": 8}"#,
        )
        .unwrap();
        Shapes::from_configs(&unet, &VaeConfig::default(), 77, dtype, fused).unwrap()
    }

    /// The README's table of SD1.5 sizes (printed with --nocapture), and its shape: tiling
    /// bounds the decoder, the generic path's attention blocks stay within their budget, and
    /// the 1024 px VAE decoder is the patch matrices' 4x of 512 px.
    #[test]
    fn sd15_table() {
        for (what, s) in [("f32 CPU kernels", sd15(DType::F32, true)), ("f16 generic", sd15(DType::F16, false))] {
            for side in [512usize, 768, 1024, 2048] {
                let g = Generation { height: side, width: side, guidance: true, encodes_image: false, vae_tiling: false };
                let whole = generation(&s, &g).unwrap();
                let tiled = generation(&s, &Generation { vae_tiling: true, ..g }).unwrap();
                println!(
                    "{what} {side}px: UNet step {}, VAE decoder {}, with --vae-tiling {}",
                    human(whole.stages[0].bytes), human(whole.stages[1].bytes), human(tiled.activations())
                );
                if side > 512 {
                    assert!(tiled.stages[1].bytes < whole.stages[1].bytes);
                }
            }
            let t = training(&s, &Training { resolution: 512, batch: 2, attn_resolution: 16, trainable_params: 0, grad_accum: 1, state_bytes: 8, checkpointed: false }).unwrap();
            println!("{what} training 512px batch 2: {}", human(t.activations()));
            // DreamBooth: every UNet weight (859.52M in SD1.5) trains.
            let db = Training { resolution: 512, batch: 2, attn_resolution: 16, trainable_params: SD15_UNET_PARAMS, grad_accum: 1, state_bytes: 8, checkpointed: false };
            let e = training(&s, &db).unwrap();
            assert_eq!(e.stages[0].bytes - t.stages[0].bytes, 8 * SD15_UNET_PARAMS);
            assert_eq!(e.stages[1].bytes - t.stages[1].bytes, 12 * SD15_UNET_PARAMS);
            println!(
                "{what} DreamBooth 512px batch 2: {} beyond the weights (gradients + AdamW m/v {}), f32 UNet weights {}",
                human(e.activations()),
                human(12 * SD15_UNET_PARAMS),
                human(4 * SD15_UNET_PARAMS)
            );
            let te = training(&s, &Training { trainable_params: SD15_UNET_PARAMS + SD15_TEXT_ENCODER_PARAMS, ..db }).unwrap();
            assert_eq!(te.stages[1].bytes - e.stages[1].bytes, 12 * SD15_TEXT_ENCODER_PARAMS);
            println!("{what} DreamBooth --train-text-encoder 512px batch 2: {} beyond the weights", human(te.activations()));
        }
        let acc = Training { resolution: 512, batch: 2, attn_resolution: 16, trainable_params: 10, grad_accum: 4, state_bytes: 8, checkpointed: false };
        assert_eq!((acc.optimizer_state_bytes(), acc.gradient_bytes()), (80, 80));
        let s = sd15(DType::F32, true);
        let d = |side: u64| s.vae_decode((side / 8) * (side / 8));
        let ratio = d(1024) as f64 / d(512) as f64;
        assert!((3.9..4.1).contains(&ratio), "{ratio}");
    }

    #[test]
    fn available_memory_is_read_here() {
        let a = available().expect("/proc/meminfo is readable on Linux");
        assert!(a > 1 << 20);
        assert!(resident().unwrap() > 1 << 20);
    }
}
