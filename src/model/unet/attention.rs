//! diffusers' `Transformer2DModel` (continuous input), `BasicTransformerBlock` (layer_norm,
//! self-attention `attn1`, cross-attention `attn2`, GEGLU feed-forward) and `Attention`.
//!
//! Cross-attention probabilities can be captured with gradients (the attention probe), and the
//! key/value rows of the start token can be detached (Custom Diffusion's gradient mask). Each
//! transformer computes its cross-attention keys and values from the context before its blocks
//! run, so that under gradient checkpointing (`model::checkpoint`) the trainable K/V weights and
//! the new embeddings sit outside the recomputed part.

use super::{CapturedAttention, ForwardOptions};
use crate::model::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::model::checkpoint::checkpoint;
use crate::model::{attention_recompute, ops};
use crate::model::weights::Vb;
use candle_core::{DType, Module, Result, Tensor};

/// State threaded through one UNet forward: the options and the captured attention maps.
pub(crate) struct RunCtx<'a> {
    pub opts: &'a ForwardOptions,
    pub captured: Vec<CapturedAttention>,
}

impl RunCtx<'_> {
    /// Whether attention on a `h` x `w` query grid is captured (matched by its longer side).
    fn wants(&self, h: usize, w: usize) -> bool {
        match &self.opts.probe {
            None => false,
            Some(p) => p.resolutions.is_empty() || p.resolutions.contains(&h.max(w)),
        }
    }
}

/// Multi-head attention with `to_q`, `to_k`, `to_v` (no bias) and `to_out.0`.
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub upcast_attention: bool,
    /// Cross-attention (`attn2`): keys and values come from the text context.
    pub is_cross: bool,
    /// Diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    pub name: String,
}

impl Attention {
    pub fn new(
        vb: Vb,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast_attention: bool,
    ) -> anyhow::Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), kv_dim, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), kv_dim, inner, false)?,
            to_out: Linear::new(vb.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast_attention,
            is_cross: context_dim.is_some(),
            name: vb.prefix().to_string(),
        })
    }

    /// [B, N, heads*d] -> [B, heads, N, d]
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
    }

    /// `x`: [B, H*W, C] on an `hw` grid; `context`: [B, T, D] for cross-attention; the
    /// `residual` is added to the output (by the output projection where it can).
    pub(crate) fn forward(
        &self, x: &Tensor, context: Option<&Tensor>, hw: (usize, usize), residual: &Tensor, cx: &mut RunCtx,
    ) -> Result<Tensor> {
        let kv_in = if self.is_cross { context.unwrap_or(x) } else { x };
        let (k, v) = self.key_value(kv_in, cx.opts)?;
        self.attend(x, &k, &v, hw, residual, cx)
    }

    /// The keys and values [B, M, heads*d] of `kv_in` (the context for cross-attention), with
    /// the start token's rows detached in cross-attention when the options say so.
    pub(crate) fn key_value(&self, kv_in: &Tensor, opts: &ForwardOptions) -> Result<(Tensor, Tensor)> {
        let mut k = self.to_k.forward(kv_in)?;
        let mut v = self.to_v.forward(kv_in)?;
        if self.is_cross && opts.detach_start_token_kv {
            k = detach_first_token(&k)?;
            v = detach_first_token(&v)?;
        }
        Ok((k, v))
    }

    /// Attention of `x`'s queries over the keys `k` and values `v`, projected out, plus `residual`.
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor, hw: (usize, usize), residual: &Tensor, cx: &mut RunCtx) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let q = self.to_q.forward(x)?;
        let captured = self.is_cross && cx.wants(hw.0, hw.1);
        if ops::attention_kernels_apply(&[&q, k, v]) {
            // heads split, attended and merged inside the kernels (differentiable in training)
            let out = if captured {
                let probs = ops::attention_probs(&q, k, self.heads, self.scale)?;
                cx.captured.push(CapturedAttention { layer: self.name.clone(), height: hw.0, width: hw.1, probs: probs.clone() });
                ops::attention_apply(&probs, v, self.heads)?
            } else {
                ops::attention(&q, k, v, self.heads, self.scale)?
                    .ok_or_else(|| candle_core::Error::Msg("attention kernels refused f32 CPU tensors".into()))?
            };
            return self.to_out.forward_residual(&out, residual);
        }
        let (mut q, mut k, v) = (self.split_heads(&q)?, self.split_heads(k)?, self.split_heads(v)?);
        if self.upcast_attention {
            q = q.to_dtype(DType::F32)?;
            k = k.to_dtype(DType::F32)?;
        }
        let out = if captured {
            let probs = attention_recompute::probabilities(&q, &k, self.scale)?;
            cx.captured.push(CapturedAttention { layer: self.name.clone(), height: hw.0, width: hw.1, probs: probs.clone() });
            probs.to_dtype(v.dtype())?.matmul(&v)?
        } else {
            // blocks of query rows; in training the probabilities are recomputed, not kept
            attention_recompute::attention(&q, &k, &v, self.scale)?
        };
        let out = out.transpose(1, 2)?.reshape((b, n, self.heads * self.head_dim))?;
        self.to_out.forward_residual(&out, residual)
    }
}

/// Detaches row 0 (the start token) of a [B, T, C] key or value; values are unchanged.
fn detach_first_token(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(1)?;
    let first = x.narrow(1, 0, 1)?.detach();
    if t == 1 {
        return Ok(first);
    }
    Tensor::cat(&[&first, &x.narrow(1, 1, t - 1)?], 1)
}

/// `net.0` = GEGLU (`proj`: dim -> 2*inner; hidden * gelu_erf(gate)), `net.2` = Linear(inner, dim).
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub geglu_proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn new(vb: Vb, dim: usize) -> anyhow::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            geglu_proj: Linear::new(vb.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::new(vb.pp("net").pp(2), inner, dim, true)?,
        })
    }
}

impl FeedForward {
    /// `forward(x) + residual`, the residual added by the output layer.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_residual(&ops::geglu(&self.geglu_proj.forward(x)?)?, residual)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&ops::geglu(&self.geglu_proj.forward(x)?)?)
    }
}

/// Pre-LayerNorm block: self-attention, cross-attention, feed-forward, each residual.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(vb: Vb, dim: usize, heads: usize, head_dim: usize, context_dim: usize, upcast: bool) -> anyhow::Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, upcast)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim, upcast)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// The block with its cross-attention's keys and values `k`, `v` already computed
    /// ([`Attention::key_value`] of the context).
    fn forward_with_kv(&self, x: &Tensor, k: &Tensor, v: &Tensor, hw: (usize, usize), cx: &mut RunCtx) -> Result<Tensor> {
        let x = self.attn1.forward(&self.norm1.forward(x)?, None, hw, x, cx)?;
        let x = self.attn2.attend(&self.norm2.forward(&x)?, k, v, hw, &x, cx)?;
        self.ff.forward_residual(&self.norm3.forward(&x)?, &x)
    }
}

/// `proj_in` / `proj_out`: 1x1 convs (SD1) or linear layers (`use_linear_projection`, SD2).
#[derive(Clone, Debug)]
pub enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

impl Proj {
    fn new(vb: Vb, c_in: usize, c_out: usize, linear: bool) -> anyhow::Result<Self> {
        Ok(if linear { Proj::Linear(Linear::new(vb, c_in, c_out, true)?) } else { Proj::Conv(Conv2d::new(vb, c_in, c_out, 1, 1, 0)?) })
    }
}

/// Parameters of the transformers of one UNet block.
#[derive(Clone, Copy, Debug)]
pub struct TransformerParams {
    pub heads: usize,
    pub num_layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// GroupNorm (eps 1e-6) -> proj_in -> transformer blocks on [B, H*W, C] -> proj_out, + input.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Proj,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Proj,
}

impl Transformer2DModel {
    pub fn new(vb: Vb, channels: usize, p: TransformerParams) -> anyhow::Result<Self> {
        anyhow::ensure!(p.heads > 0 && channels >= p.heads, "{}: {channels} channels, {} heads", vb.prefix(), p.heads);
        let head_dim = channels / p.heads;
        let inner = p.heads * head_dim;
        let blocks = (0..p.num_layers)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i);
                BasicTransformerBlock::new(vb, inner, p.heads, head_dim, p.context_dim, p.upcast_attention)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), p.groups, channels, 1e-6)?,
            proj_in: Proj::new(vb.pp("proj_in"), channels, inner, p.use_linear_projection)?,
            transformer_blocks: blocks,
            proj_out: Proj::new(vb.pp("proj_out"), inner, channels, p.use_linear_projection)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor, cx: &mut RunCtx) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        // Every block's cross-attention keys and values, computed here, in the graph: they are
        // what the text side (new embeddings, trainable K/V) contributes to this transformer.
        let mut kv = Vec::with_capacity(2 * self.transformer_blocks.len());
        for blk in &self.transformer_blocks {
            let (k, v) = blk.attn2.key_value(context, cx.opts)?;
            kv.extend([k, v]);
        }
        // A probed transformer keeps its attention maps in the graph, so it is never recomputed.
        if !(cx.opts.gradient_checkpointing && !cx.wants(h, w) && (x.track_op() || kv.iter().any(|t| t.track_op()))) {
            return self.forward_with_kv(x, &kv, cx);
        }
        let kv = Tensor::cat(&kv, 2)?;
        let this = self.clone();
        checkpoint(
            &[x, &kv],
            Box::new(move |xs: &[Tensor]| {
                let inner = this.transformer_blocks[0].attn2.heads * this.transformer_blocks[0].attn2.head_dim;
                let kv = (0..2 * this.transformer_blocks.len()).map(|i| xs[1].narrow(2, i * inner, inner)?.contiguous()).collect::<Result<Vec<_>>>()?;
                let opts = ForwardOptions::default();
                this.forward_with_kv(&xs[0], &kv, &mut RunCtx { opts: &opts, captured: Vec::new() })
            }),
        )
    }

    /// The transformer given its blocks' cross-attention keys and values (k0, v0, k1, v1, ...).
    fn forward_with_kv(&self, x: &Tensor, kv: &[Tensor], cx: &mut RunCtx) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let to_seq = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let to_grid = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let hn = self.norm.forward(x)?;
        let mut s = match &self.proj_in {
            Proj::Conv(c) => to_seq(&c.forward(&hn)?)?,
            Proj::Linear(l) => l.forward(&to_seq(&hn)?)?,
        };
        for (i, blk) in self.transformer_blocks.iter().enumerate() {
            s = blk.forward_with_kv(&s, &kv[2 * i], &kv[2 * i + 1], (h, w), cx)?;
        }
        match &self.proj_out {
            Proj::Conv(c) => c.forward_accumulate(&to_grid(&s)?, None, Some(x)),
            Proj::Linear(l) => to_grid(&l.forward(&s)?)? + x,
        }
    }
}
