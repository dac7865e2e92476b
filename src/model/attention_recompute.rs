//! Attention that keeps no probabilities for its backward pass, on candle's generic path (the
//! GPU, f16/bf16 weights, `DISENDIFF_KERNELS=off`).
//!
//! Differentiated through candle's graph, `softmax(scale q k^T) v` keeps every layer's
//! [B, heads, N, M] probabilities until the backward pass (for SD1.5 at 512 px, 5.9 GB of the
//! 9.3 GB of activations of one DisenDiff micro-batch, most of it the 64x64 self-attention:
//! `docs`/BENCHMARKS.md, "Memory plan"). The fused CPU kernel avoids that
//! ([`super::kernels::FusedAttention`]); this op does the same with device-generic tensor ops,
//! as flash attention's backward does: the forward attends a block of query rows at a time on
//! detached inputs (so no block's probabilities outlive it) and hands the result to
//! [`Recomputed`], a custom op of (q, k, v) whose backward recomputes each block's
//! probabilities P from q and k and returns, per head,
//!
//! - dV = sum over blocks of P^T dO,
//! - dS = P * (dO V^T - rowsum(P * dO V^T)) (the softmax's backward), scaled by `scale`,
//! - dQ = dS K (block by block), dK = sum over blocks of dS^T Q.
//!
//! Only q, k, v and the output stay alive between the passes. The probabilities are the ones the
//! plain path computes ([`probabilities`]: scores in the inputs' dtype, softmax in f32), so the
//! two paths give the same numbers to the products' rounding (`tests` below: values and the
//! gradients of q, k and v against candle's own graph). The attention probe's layers keep their
//! probabilities explicitly, because DisenDiff's losses differentiate them.

use super::attention_chunks::{by_query_blocks, rows_per_block};
use super::ops;
use super::precomputed::Precomputed;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Softmax probabilities of `scale q k^T` for [B, H, N, d] / [B, H, M, d] tensors, [B, H, N, M]
/// in f32 for f16/bf16 inputs and in the inputs' dtype otherwise (diffusers:
/// `baddbmm(q, k^T, alpha=scale)`, softmax in f32).
pub fn probabilities(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    match scores.dtype() {
        DType::F16 | DType::BF16 => ops::softmax_last_dim(&(scores * scale)?.to_dtype(DType::F32)?),
        _ => ops::softmax_last_dim_scaled(&scores, scale),
    }
}

/// `softmax(scale q k^T) v` for [B, H, N, d] / [B, H, M, d] / [B, H, M, dv] tensors, [B, H, N, dv]
/// in v's dtype, a block of query rows at a time. Inside an autograd graph the probabilities
/// are recomputed in the backward pass instead of kept (module comment).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (bh, n, m) = (q.dim(0)? * q.dim(1)?, q.dim(2)?, k.dim(2)?);
    let rows = rows_per_block(bh, n, m);
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
        by_query_blocks(q, 2, rows, |qb| probabilities(qb, k, scale)?.to_dtype(v.dtype())?.matmul(v))
    };
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return attend(q, k, v);
    }
    let out = attend(&q.detach(), &k.detach(), &v.detach())?.contiguous()?;
    // The backward holds about four blocks of scores at once (P, dP, dS and a product), so it
    // takes a quarter of the forward's rows per block.
    let op = Recomputed { scale, rows: (rows / 4).max(1), out: Precomputed::new("attention-recompute", out) };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The attention output (computed on detached inputs) attached to (q, k, v): the forward
/// returns it, the backward recomputes the probabilities block by block (module comment).
struct Recomputed {
    scale: f64,
    /// Query rows per block in the backward pass.
    rows: usize,
    out: Precomputed,
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        "attention-recompute"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let grad = grad.detach().contiguous()?;
        let n = q.dim(2)?;
        let mut dq = Vec::with_capacity(n.div_ceil(self.rows));
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        for start in (0..n).step_by(self.rows) {
            let len = self.rows.min(n - start);
            let qb = q.narrow(2, start, len)?;
            let gb = grad.narrow(2, start, len)?;
            let p = probabilities(&qb, &k, self.scale)?;
            let dv_b = p.to_dtype(v.dtype())?.t()?.matmul(&gb)?;
            // dP = dO V^T; the softmax's backward dS = P * (dP - rowsum(P * dP)); then the scale
            let dp = gb.matmul(&v.t()?)?.to_dtype(p.dtype())?;
            let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
            let ds = (ds * self.scale)?.to_dtype(q.dtype())?;
            dq.push(ds.matmul(&k)?);
            let dk_b = ds.t()?.matmul(&qb)?;
            dk = Some(match dk {
                None => dk_b,
                Some(acc) => (acc + dk_b)?,
            });
            dv = Some(match dv {
                None => dv_b,
                Some(acc) => (acc + dv_b)?,
            });
        }
        Ok((Some(Tensor::cat(&dq, 2)?), dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same attention through candle's graph (every probability kept).
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        probabilities(q, k, scale)?.to_dtype(v.dtype())?.matmul(v)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    /// Values and the gradients of q, k and v equal those of candle's graph, with the backward
    /// split into several blocks (uneven last block) and in one, in f64 (to rounding) and f32.
    #[test]
    fn matches_the_plain_graph() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            // None: `attention` itself (one backward block at these sizes); Some: 3-row blocks
            for rows in [None, Some(3)] {
                let q = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 10, 8), &dev)?.to_dtype(dtype)?)?;
                let k = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 7, 8), &dev)?.to_dtype(dtype)?)?;
                let v = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 7, 5), &dev)?.to_dtype(dtype)?)?;
                let w = Tensor::randn(0f64, 1.0, (2, 3, 10, 5), &dev)?.to_dtype(dtype)?;
                let scale = 0.35;
                let reference = plain(&q, &k, &v, scale)?;
                let out = attention(&q, &k, &v, scale)?;
                let out = match rows {
                    None => out,
                    Some(rows) => q.apply_op3(&k, &v, Recomputed { scale, rows, out: Precomputed::new("attention-recompute", out.detach()) })?,
                };
                assert!(max_diff(&out, &reference) < tol, "{dtype:?} {rows:?}: values");
                let g_ref = (reference * &w)?.sum_all()?.backward()?;
                let g = (out * &w)?.sum_all()?.backward()?;
                for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                    let (a, b) = (g.get(var).expect(name), g_ref.get(var).expect(name));
                    let d = max_diff(a, b);
                    assert!(d < tol, "{dtype:?} {rows:?}: d{name} differs by {d}");
                    assert!(max_diff(a, &a.zeros_like()?) > 1e-3, "d{name} is zero");
                }
            }
        }
        Ok(())
    }

    /// Outside a graph the result is the plain blocked attention.
    #[test]
    fn without_a_graph_is_the_plain_path() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 9, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 6, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 6, 3), &dev)?;
        assert!(max_diff(&attention(&q, &k, &v, 0.5)?, &plain(&q, &k, &v, 0.5)?) < 1e-6);
        Ok(())
    }
}
