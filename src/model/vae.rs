//! The Stable Diffusion autoencoder (AutoencoderKL, Rombach et al. 2022, "High-Resolution Image
//! Synthesis with Latent Diffusion Models"), with diffusers' module and weight names.
//!
//! `encode` maps an image in [-1, 1] to the diagonal Gaussian posterior over latents; training
//! latents are a *sample* of it times [`AutoencoderKL::scaling_factor`] (docs/method.md §1).
//! `decode` takes unscaled latents back to an image in about [-1, 1].

use super::nn::{Conv2d, GroupNorm, Linear};
use super::attention_chunks;
use super::ops::{self, softmax_last_dim};
use super::vae_tiling::{tiled_decode, Tiling};
use super::weights::Vb;
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Module, Result, Tensor};
use serde::Deserialize;
use std::path::Path;

/// `vae/config.json` of a diffusers folder (defaults are diffusers' `AutoencoderKL` ones).
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels of each resolution level; the image shrinks by 2^(levels - 1).
    #[serde(default = "default_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Latents fed to the UNet are `(z - shift_factor) * scaling_factor` (SD1/2: 0.18215, no shift).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Image size the VAE was trained at (a number or `[h, w]`, the first used): the tile
    /// size of tiled decoding.
    #[serde(default = "default_sample_size", deserialize_with = "number_or_first")]
    pub sample_size: usize,
}

fn default_sample_size() -> usize {
    32
}

/// `sample_size` is a number in SD's configs and `[h, w]` in some others.
fn number_or_first<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Many(Vec<usize>),
    }
    match Size::deserialize(d)? {
        Size::One(n) => Ok(n),
        Size::Many(v) => v.first().copied().ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn default_blocks() -> Vec<usize> {
    vec![64]
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_act() -> String {
    "silu".into()
}

impl Default for VaeConfig {
    /// The SD1.x/2.x autoencoder.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            act_fn: "silu".into(),
            sample_size: 512,
        }
    }
}

impl VaeConfig {
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in VAE config {}", path.display()))
    }

    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = serde_json::from_str(text).context("not a valid AutoencoderKL config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects what this implementation does not build, naming the offending value.
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = self.block_out_channels.len();
        ensure!(n > 0, "block_out_channels is empty");
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                bail!("down_block_types: \"{t}\" is not supported (only DownEncoderBlock2D)");
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                bail!("up_block_types: \"{t}\" is not supported (only UpDecoderBlock2D)");
            }
        }
        ensure!(
            self.down_block_types.len() == n && self.up_block_types.len() == n,
            "{} down and {} up block types for {n} block_out_channels",
            self.down_block_types.len(),
            self.up_block_types.len()
        );
        ensure!(self.act_fn == "silu", "act_fn \"{}\" is not supported (only silu)", self.act_fn);
        Ok(())
    }
}

const EPS: f64 = 1e-6;

/// diffusers' `ResnetBlock2D` without a time embedding.
#[derive(Clone, Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: Vb, c_in: usize, c_out: usize, groups: usize) -> anyhow::Result<Self> {
        let conv_shortcut =
            if c_in != c_out { Some(Conv2d::new(vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, c_in, EPS)?,
            conv1: Conv2d::new(vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, c_out, EPS)?,
            conv2: Conv2d::new(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.conv_shortcut {
            Some(c) => c.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The single-head spatial self-attention of the mid block (residual included).
#[derive(Clone, Debug)]
struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl Attention {
    fn new(vb: Vb, c: usize, groups: usize) -> anyhow::Result<Self> {
        // Old diffusers files name the projections query/key/value/proj_attn.
        let (q, k, v, o) = if vb.contains("query.weight") {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, c, EPS)?,
            to_q: Linear::new(vb.pp(q), c, c, true)?,
            to_k: Linear::new(vb.pp(k), c, c, true)?,
            to_v: Linear::new(vb.pp(v), c, c, true)?,
            to_out: Linear::new(vb.pp(o), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&hs)?;
        let k = self.to_k.forward(&hs)?;
        let v = self.to_v.forward(&hs)?;
        let out = match ops::attention(&q, &k, &v, 1, 1.0 / (c as f64).sqrt())? {
            Some(out) => out,
            None => {
                // upcast_softmax: scores and softmax in f32; blocks of query rows, so the
                // [B, HW, HW] scores never exist at once (attention_chunks.rs)
                let kt = k.to_dtype(DType::F32)?.t()?;
                let rows = attention_chunks::rows_per_block(b, h * w, h * w);
                attention_chunks::by_query_blocks(&q, 1, rows, |q| {
                    let scores = (q.to_dtype(DType::F32)?.matmul(&kt)? / (c as f64).sqrt())?;
                    softmax_last_dim(&scores)?.to_dtype(x.dtype())?.matmul(&v)
                })?
            }
        };
        let out = self.to_out.forward(&out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers' `UNetMidBlock2D` without a time embedding: resnet, [attention], resnet.
#[derive(Clone, Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<Attention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: Vb, c: usize, cfg: &VaeConfig) -> anyhow::Result<Self> {
        let g = cfg.norm_num_groups;
        let attention =
            if cfg.mid_block_add_attention { Some(Attention::new(vb.pp("attentions").pp(0), c, g)?) } else { None };
        Ok(Self {
            resnet0: ResnetBlock::new(vb.pp("resnets").pp(0), c, c, g)?,
            attention,
            resnet1: ResnetBlock::new(vb.pp("resnets").pp(1), c, c, g)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}

/// A resolution level: resnets, then an optional 2x down- or upsampling conv.
#[derive(Clone, Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Level>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: Vb, cfg: &VaeConfig) -> anyhow::Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut down_blocks = Vec::new();
        let mut c_out = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vbb = vb.pp("down_blocks").pp(i);
            let c_in = c_out;
            c_out = c;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock::new(vbb.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, g))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Downsample2D(padding=0): asymmetric zero pad (0, 1, 0, 1) before the stride-2 conv.
            let resample = if i + 1 < ch.len() {
                Some(Conv2d::new(vbb.pp("downsamplers").pp(0).pp("conv"), c_out, c_out, 3, 2, 0)?)
            } else {
                None
            };
            down_blocks.push(Level { resnets, resample });
        }
        let last = *ch.last().unwrap();
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, cfg)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, last, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down_blocks {
            for r in &level.resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                h = conv.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: Vb, cfg: &VaeConfig) -> anyhow::Result<Self> {
        let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, ch[0], 3, 1, 1)?;
        let mid_block = MidBlock::new(vb.pp("mid_block"), ch[0], cfg)?;
        let mut up_blocks = Vec::new();
        let mut c_out = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vbb = vb.pp("up_blocks").pp(i);
            let c_in = c_out;
            c_out = c;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock::new(vbb.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, g))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let resample = if i + 1 < ch.len() {
                Some(Conv2d::new(vbb.pp("upsamplers").pp(0).pp("conv"), c_out, c_out, 3, 1, 1)?)
            } else {
                None
            };
            up_blocks.push(Level { resnets, resample });
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, first, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for level in &self.up_blocks {
            for r in &level.resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The posterior `N(mean, std^2)` over latents of one encoded image batch.
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20], as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `mean + std * noise`, with `noise` standard normal shaped like `mean`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }

    /// The posterior mode (the mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    /// Set by [`AutoencoderKL::enable_tiling`]: large latents are decoded in tiles.
    tiling: Option<Tiling>,
}

impl AutoencoderKL {
    pub fn new(vb: Vb, cfg: &VaeConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        let quant_conv =
            if cfg.use_quant_conv { Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?) } else { None };
        let post_quant_conv =
            if cfg.use_post_quant_conv { Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?) } else { None };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
            tiling: None,
        })
    }

    /// Image `[B, in_channels, H, W]` in [-1, 1] -> posterior over `[B, latent_channels, H/f, W/f]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(x)?;
        if let Some(c) = &self.quant_conv {
            moments = c.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, logvar, std })
    }

    /// Unscaled latents `z` -> image `[B, out_channels, H*f, W*f]` (about [-1, 1]); in tiles
    /// when tiling is on and `z` is larger than a tile.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match &self.tiling {
            Some(t) if t.applies(z.dim(2)?, z.dim(3)?) => tiled_decode(z, t, |tile| self.decode_whole(tile)),
            _ => self.decode_whole(z),
        }
    }

    /// Decodes large latents in overlapping tiles from now on, as diffusers' `enable_tiling()`
    /// (tile size from the config's `sample_size`; see [`super::vae_tiling`]).
    pub fn enable_tiling(&mut self) {
        self.tiling = Some(Tiling::new(self.config.sample_size, self.config.block_out_channels.len()));
    }

    /// The tiling in use, if any.
    pub fn tiling(&self) -> Option<&Tiling> {
        self.tiling.as_ref()
    }

    fn decode_whole(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// UNet latents are `(z - shift_factor) * scaling_factor`.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// 0 when the config has none (SD1.x/2.x).
    pub fn shift_factor(&self) -> f64 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    /// Spatial downsampling factor, `2^(levels - 1)` (8 for SD).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }
}
