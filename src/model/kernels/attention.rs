//! Multi-head attention on the heads-interleaved layout the projections write ([B, N, H*d]),
//! with matrix products that read each head's columns in place (no head split/merge copies):
//! - [`attention`] / [`FusedAttention`]: scores, softmax and output one block of 64 queries at
//!   a time, so the [B*H, N, M] probabilities never exist; the backward recomputes them block by
//!   block (as flash attention does);
//! - [`AttentionProbs`] and [`AttentionApply`]: the attention probe's path, where the
//!   probabilities are an output (the calibration losses read them), as two graph nodes
//!   instead of the explicit path's eight.

use super::buffers::{contiguous_f32, output_buffer, with_f32};
use super::gradients::softmax_grad_rows_dispatch;
use super::simd::{exp_row_in_place, has_avx2_fma, SendPtr, PARALLEL_MIN};
use super::small_heads::{self, HeadBlock};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Query rows per work item of [`attention`].
const ATTN_BLOCK: usize = 64;

/// Multi-head `softmax(scale * q_h k_h^T) v_h` for tensors *outside* the autograd graph, the
/// heads interleaved in the channels as the projections write them: `q` [B, N, H*d], `k`
/// [B, M, H*d], `v` [B, M, H*dv] (f32, CPU) give [B, N, H*dv], ready for the output
/// projection. Each work item (one image, one head, 64 query rows) computes its scores block
/// with one matrix product reading the head's columns in place, exponentiates it in place
/// (max-shifted, unnormalised), multiplies by the head's values into its output columns, and
/// divides each output row by its sum (dv numbers a row instead of M). So neither the
/// [B*H, N, M] probabilities nor the [B, H, N, d] head split and merge copies exist. Batched
/// through candle, the same work was many tiny products (d is 8-64), three copies and a
/// probabilities tensor far larger than the cache.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let dims = AttnDims::of(q.shape(), k.shape(), v.shape(), heads)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = with_f32(&q, |qd| with_f32(&k, |kd| with_f32(&v, |vd| Ok(attention_blocks(qd, kd, vd, dims, scale as f32)))))?;
    Tensor::from_vec(out, dims.out_shape(), q.device())
}

/// [`attention`] as a differentiable op, for q, k, v inside the autograd graph: the same
/// forward, and a backward that recomputes each block's probabilities instead of keeping the
/// [B*H, N, M] tensor from the forward (as flash attention does), so neither pass holds more
/// than a 64-row block of them per thread.
pub struct FusedAttention {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = AttnDims::of(l1.shape(), l2.shape(), l3.shape(), self.heads)?;
        let (q, k, v) = (contiguous_f32(s1, l1, "attention")?, contiguous_f32(s2, l2, "attention")?, contiguous_f32(s3, l3, "attention")?);
        Ok((CpuStorage::F32(attention_blocks(q, k, v, dims, self.scale)), dims.out_shape()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = AttnDims::of(q.shape(), k.shape(), v.shape(), self.heads)?;
        let need = [q.track_op(), k.track_op(), v.track_op()];
        let (q, k, v, out, grad) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, out.contiguous()?, grad.contiguous()?);
        let [dq, dk, dv] = with_f32(&q, |qd| {
            with_f32(&k, |kd| {
                with_f32(&v, |vd| {
                    with_f32(&out, |od| with_f32(&grad, |gd| Ok(attention_backward([qd, kd, vd, od, gd], dims, self.scale, need))))
                })
            })
        })?;
        Ok((grad_tensor(dq, &q)?, grad_tensor(dk, &k)?, grad_tensor(dv, &v)?))
    }
}

/// Sizes of an [`attention`] call: images, heads, queries, keys, head dims of keys and values.
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    heads: usize,
    n: usize,
    m: usize,
    d: usize,
    dv: usize,
}

impl AttnDims {
    fn of(q: &Shape, k: &Shape, v: &Shape, heads: usize) -> Result<Self> {
        let (b, n, qc) = q.dims3()?;
        let (bk, m, kc) = k.dims3()?;
        let (bv, mv, vc) = v.dims3()?;
        if heads == 0 || bk != b || bv != b || kc != qc || mv != m || qc % heads != 0 || vc % heads != 0 {
            candle_core::bail!("attention kernel: q {q:?}, k {k:?}, v {v:?} do not fit {heads} heads");
        }
        if qc == 0 || m == 0 {
            candle_core::bail!("attention kernel: empty keys or head dimension ({q:?}, {k:?})");
        }
        Ok(Self { b, heads, n, m, d: qc / heads, dv: vc / heads })
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.b, self.n, self.heads * self.dv))
    }
}

/// `dst (+)= lhs . rhs` on this thread, for one head's block: `dst` [m, n] with rows `dst_rs`
/// apart (columns adjacent), `lhs` and `rhs` given by (column, row) strides; `accumulate`
/// adds to what `dst` holds instead of overwriting it.
///
/// # Safety
/// The pointers must cover the matrices their strides describe.
#[allow(clippy::too_many_arguments)]
unsafe fn head_gemm(
    m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, accumulate: bool,
    lhs: *const f32, lhs_cs: usize, lhs_rs: usize, rhs: *const f32, rhs_cs: usize, rhs_rs: usize,
) {
    gemm::gemm(
        m, n, k, dst, 1, dst_rs as isize, accumulate, lhs, lhs_cs as isize, lhs_rs as isize, rhs, rhs_cs as isize, rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 }, 1.0, false, false, false, gemm::Parallelism::None,
    )
}

/// A gradient buffer as a tensor shaped like `like` (`None` stays `None`).
fn grad_tensor(g: Option<Vec<f32>>, like: &Tensor) -> Result<Option<Tensor>> {
    g.map(|g| Tensor::from_vec(g, like.shape(), like.device())).transpose()
}

/// How [`attention_blocks_on`] computes the attention.
#[derive(Clone, Copy, PartialEq, Debug)]
enum BlockPath {
    /// Scores and values products through gemm, the exponentials as a pass between them.
    Gemm,
    /// [`small_heads`] (d, dv <= 16, AVX-512).
    SmallHeads,
}

/// [`attention`] on the raw data: small heads in registers where the CPU has AVX-512, else
/// through gemm.
fn attention_blocks(qd: &[f32], kd: &[f32], vd: &[f32], a: AttnDims, scale: f32) -> Vec<f32> {
    let small = a.d <= small_heads::MAX_HEAD && a.dv <= small_heads::MAX_HEAD && small_heads::available();
    attention_blocks_on(qd, kd, vd, a, scale, if small { BlockPath::SmallHeads } else { BlockPath::Gemm })
}

/// [`attention_blocks`] by the given path.
fn attention_blocks_on(qd: &[f32], kd: &[f32], vd: &[f32], a: AttnDims, scale: f32, path: BlockPath) -> Vec<f32> {
    let AttnDims { b, heads, n, m, d, dv } = a;
    let (qc, vc) = (heads * d, heads * dv);
    let mut out = output_buffer(b * n * vc);
    let dst = SendPtr(out.as_mut_ptr());
    let block = if path == BlockPath::SmallHeads { small_heads::BLOCK } else { ATTN_BLOCK };
    let blocks = n.div_ceil(block);
    let fma = has_avx2_fma();
    let item = move |it: usize| {
        let dst = dst;
        let (bh, r0) = (it / blocks, (it % blocks) * block);
        let (bi, h) = (bh / heads, bh % heads);
        let rows = block.min(n - r0);
        let qp = &qd[(bi * n + r0) * qc + h * d..];
        let kp = &kd[bi * m * qc + h * d..];
        let vp = &vd[bi * m * vc + h * dv..];
        // SAFETY: item `it` owns this rows x dv block of the output
        let o = unsafe { dst.0.add((bi * n + r0) * vc + h * dv) };
        if path == BlockPath::SmallHeads {
            let blk = HeadBlock {
                q: qp.as_ptr(), q_rs: qc, k: kp.as_ptr(), k_rs: qc, v: vp.as_ptr(), v_rs: vc,
                out: o, out_rs: vc, rows, m, d, dv, scale,
            };
            // SAFETY: as below; this path is only chosen where `small_heads::available`.
            unsafe { small_heads::run(&blk) };
            return;
        }
        let mut probs = output_buffer(rows * m);
        let mut inv_sums = [0f32; ATTN_BLOCK];
        // SAFETY: the pointers cover the stated matrices (head h's columns of image bi, rows
        // `qc`/`vc` apart); each item writes its own rows x dv block of the output; the AVX2
        // kernel only runs on AVX2+FMA.
        unsafe {
            // scores [rows, m] = q_blk [rows, d] . k^T [d, m]
            head_gemm(rows, m, d, probs.as_mut_ptr(), m, false, qp.as_ptr(), 1, qc, kp.as_ptr(), qc, 1);
            exp_rows(&mut probs, m, scale, &mut inv_sums, fma);
            // out [rows, dv] = exp [rows, m] . v [m, dv], then each row / its sum
            head_gemm(rows, dv, m, o, vc, false, probs.as_ptr(), 1, m, vp.as_ptr(), 1, vc);
            for (r, inv) in inv_sums[..rows].iter().enumerate() {
                for x in std::slice::from_raw_parts_mut(o.add(r * vc), dv) {
                    *x *= inv;
                }
            }
        }
    };
    let items = b * heads * blocks;
    if b * heads * n * m < PARALLEL_MIN {
        (0..items).for_each(item);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, |r| r.for_each(item));
    }
    out
}

/// Each row of `s` (`cols` long) becomes `exp(scale * (x - max))` in place, and `inv_sums[r]`
/// the inverse of row r's sum: a softmax whose division is left to the caller.
#[inline(always)]
fn exp_rows_generic<const FMA: bool>(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    for (row, inv) in s.chunks_exact_mut(cols).zip(inv_sums.iter_mut()) {
        *inv = 1.0 / exp_row_in_place::<FMA>(row, scale);
    }
}

/// [`exp_rows_generic`] through its AVX2 build when `fma` (the CPU has AVX2 and FMA).
fn exp_rows(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32], fma: bool) {
    // SAFETY: `fma` is only true when the CPU has AVX2 and FMA (`has_avx2_fma`).
    unsafe {
        if fma {
            exp_rows_fma(s, cols, scale, inv_sums)
        } else {
            exp_rows_plain(s, cols, scale, inv_sums)
        }
    }
}

/// The rows of `s` (at most [`ATTN_BLOCK`] of `cols` each) become `softmax(scale * row)` in place.
fn softmax_block(s: &mut [f32], cols: usize, scale: f32, fma: bool) {
    let mut inv_sums = [0f32; ATTN_BLOCK];
    exp_rows(s, cols, scale, &mut inv_sums, fma);
    for (row, inv) in s.chunks_exact_mut(cols).zip(&inv_sums) {
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

unsafe fn exp_rows_plain(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    exp_rows_generic::<false>(s, cols, scale, inv_sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_rows_fma(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    exp_rows_generic::<true>(s, cols, scale, inv_sums)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn exp_rows_fma(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    exp_rows_generic::<false>(s, cols, scale, inv_sums)
}

/// Input gradients of [`attention`] (`data` = q, k, v, output, output gradient; only those
/// of `need` are computed). One work item per (image, head), so its key and value gradients
/// are summed over the query blocks without sharing. Per block of 64 query rows, with P the
/// block's probabilities recomputed from q and k:
/// dV += P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O)) * scale; dQ = dS K; dK += dS^T Q.
fn attention_backward(data: [&[f32]; 5], a: AttnDims, scale: f32, need: [bool; 3]) -> [Option<Vec<f32>>; 3] {
    let [qd, kd, vd, od, gd] = data;
    let AttnDims { b, heads, n, m, d, dv } = a;
    let (qc, vc) = (heads * d, heads * dv);
    // dK and dV are needed to compute nothing else, but dS (for dQ and dK) needs dP either way
    let mut grads = [need[0].then(|| output_buffer(b * n * qc)), need[1].then(|| output_buffer(b * m * qc)), need[2].then(|| output_buffer(b * m * vc))];
    let ptrs = grads.each_mut().map(|g| g.as_mut().map(|g| SendPtr(g.as_mut_ptr())));
    let fma = has_avx2_fma();
    let item = move |bh: usize| {
        let ptrs = ptrs;
        let (bi, h) = (bh / heads, bh % heads);
        let qp = qd[(bi * n) * qc + h * d..].as_ptr();
        let kp = kd[bi * m * qc + h * d..].as_ptr();
        let vp = vd[bi * m * vc + h * dv..].as_ptr();
        let mut p = output_buffer(ATTN_BLOCK * m);
        let mut ds = output_buffer(ATTN_BLOCK * m);
        for (blk, r0) in (0..n).step_by(ATTN_BLOCK).enumerate() {
            let rows = ATTN_BLOCK.min(n - r0);
            let (p, ds) = (&mut p[..rows * m], &mut ds[..rows * m]);
            // SAFETY: as in `attention_blocks`: the pointers cover the head's columns of image
            // bi (rows `qc`/`vc` apart); this item alone writes those columns of the gradients.
            unsafe {
                let q_blk = qp.add(r0 * qc);
                let go = gd[(bi * n + r0) * vc + h * dv..].as_ptr();
                let o = od[(bi * n + r0) * vc + h * dv..].as_ptr();
                // P = softmax(scale * Q_blk K^T)
                head_gemm(rows, m, d, p.as_mut_ptr(), m, false, q_blk, 1, qc, kp, qc, 1);
                softmax_block(p, m, scale, fma);
                // dV (+)= P^T dO_blk
                if let Some(gv) = ptrs[2] {
                    let dst = gv.0.add(bi * m * vc + h * dv);
                    head_gemm(m, dv, rows, dst, vc, blk > 0, p.as_ptr(), m, 1, go, 1, vc);
                }
                if ptrs[0].is_none() && ptrs[1].is_none() {
                    continue;
                }
                // dP = dO_blk V^T, then dS = P * (dP - rowsum(dO * O)) * scale in place
                head_gemm(rows, m, dv, ds.as_mut_ptr(), m, false, go, 1, vc, vp, vc, 1);
                for r in 0..rows {
                    let (gr, or) = (std::slice::from_raw_parts(go.add(r * vc), dv), std::slice::from_raw_parts(o.add(r * vc), dv));
                    let dot: f32 = gr.iter().zip(or).map(|(g, o)| g * o).sum();
                    for (s, pv) in ds[r * m..(r + 1) * m].iter_mut().zip(&p[r * m..(r + 1) * m]) {
                        *s = pv * (*s - dot) * scale;
                    }
                }
                // dQ_blk = dS K
                if let Some(gq) = ptrs[0] {
                    let dst = gq.0.add((bi * n + r0) * qc + h * d);
                    head_gemm(rows, d, m, dst, qc, false, ds.as_ptr(), 1, m, kp, 1, qc);
                }
                // dK (+)= dS^T Q_blk
                if let Some(gk) = ptrs[1] {
                    let dst = gk.0.add(bi * m * qc + h * d);
                    head_gemm(m, d, rows, dst, qc, blk > 0, ds.as_ptr(), m, 1, q_blk, 1, qc);
                }
            }
        }
    };
    let items = b * heads;
    if b * heads * n * m < PARALLEL_MIN {
        (0..items).for_each(item);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, |r| r.for_each(item));
    }
    grads
}

/// Runs `f(b, h)` for every (image, head), on candle's pool when `work` is large.
fn per_head(b: usize, heads: usize, work: usize, f: impl Fn(usize, usize) + Sync) {
    let item = |bh: usize| f(bh / heads, bh % heads);
    if work < PARALLEL_MIN {
        (0..b * heads).for_each(item);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(b * heads, |r| r.for_each(item));
    }
}

/// The probabilities `softmax(scale q_h k_h^T)` of every head, [B, H, N, M], from `q`
/// [B, N, H*d] and `k` [B, M, H*d] (heads interleaved), differentiable in both: what the
/// attention probe captures, as one graph node instead of the explicit path's head splits,
/// transposed keys, scores and softmax (each a node whose gradient candle accumulates with a
/// pass of its own).
pub struct AttentionProbs {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = AttnDims::of(l1.shape(), l2.shape(), l2.shape(), self.heads)?;
        let (qd, kd) = (contiguous_f32(s1, l1, "attention probs")?, contiguous_f32(s2, l2, "attention probs")?);
        let AttnDims { b, heads, n, m, d, .. } = a;
        let qc = heads * d;
        let mut out = output_buffer(b * heads * n * m);
        let dst = SendPtr(out.as_mut_ptr());
        let fma = has_avx2_fma();
        per_head(b, heads, b * heads * n * m, |bi, h| {
            let dst = dst;
            // SAFETY: head (bi, h)'s [n, m] block of the output is written by this item alone;
            // q and k are read in head h's columns (rows `qc` apart).
            unsafe {
                let p = std::slice::from_raw_parts_mut(dst.0.add((bi * heads + h) * n * m), n * m);
                let (qp, kp) = (qd[bi * n * qc + h * d..].as_ptr(), kd[bi * m * qc + h * d..].as_ptr());
                head_gemm(n, m, d, p.as_mut_ptr(), m, false, qp, 1, qc, kp, qc, 1);
                for rows in p.chunks_mut(ATTN_BLOCK * m) {
                    softmax_block(rows, m, self.scale, fma);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, heads, n, m))))
    }

    /// dS = scale * P * (dP - rowsum(dP * P)); dq = dS k; dk = dS^T q (per head).
    fn bwd(&self, q: &Tensor, k: &Tensor, p: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let a = AttnDims::of(q.shape(), k.shape(), k.shape(), self.heads)?;
        let AttnDims { b, heads, n, m, d, .. } = a;
        let qc = heads * d;
        let (q, k, p, grad) = (q.contiguous()?, k.contiguous()?, p.contiguous()?, grad.contiguous()?);
        let need = [q.track_op(), k.track_op()];
        let mut ds = output_buffer(b * heads * n * m);
        with_f32(&p, |pd| with_f32(&grad, |gd| Ok(softmax_grad_rows_dispatch(pd, gd, &mut ds, m, self.scale))))?;
        let mut grads = [need[0].then(|| output_buffer(b * n * qc)), need[1].then(|| output_buffer(b * m * qc))];
        let ptrs = grads.each_mut().map(|g| g.as_mut().map(|g| SendPtr(g.as_mut_ptr())));
        with_f32(&q, |qd| {
            with_f32(&k, |kd| {
                per_head(b, heads, b * heads * n * m, |bi, h| {
                    let ptrs = ptrs;
                    // SAFETY: head h's columns of image bi in dq and dk are written by this item alone.
                    unsafe {
                        let s = ds[(bi * heads + h) * n * m..].as_ptr();
                        let (qp, kp) = (qd[bi * n * qc + h * d..].as_ptr(), kd[bi * m * qc + h * d..].as_ptr());
                        if let Some(gq) = ptrs[0] {
                            let dst = gq.0.add(bi * n * qc + h * d);
                            head_gemm(n, d, m, dst, qc, false, s, 1, m, kp, 1, qc);
                        }
                        if let Some(gk) = ptrs[1] {
                            let dst = gk.0.add(bi * m * qc + h * d);
                            head_gemm(m, d, n, dst, qc, false, s, m, 1, qp, 1, qc);
                        }
                    }
                });
                Ok(())
            })
        })?;
        let [gq, gk] = grads;
        Ok((grad_tensor(gq, &q)?, grad_tensor(gk, &k)?))
    }
}

/// `P_h v_h` for every head with the heads merged: `p` [B, H, N, M] and `v` [B, M, H*dv] give
/// [B, N, H*dv] (the layout of the output projection's input), differentiable in both.
pub struct AttentionApply {
    pub heads: usize,
}

impl AttentionApply {
    fn dims(&self, p: &Shape, v: &Shape) -> Result<(usize, usize, usize, usize)> {
        let (b, h, n, m) = p.dims4()?;
        let (bv, mv, vc) = v.dims3()?;
        if h != self.heads || bv != b || mv != m || vc % h != 0 {
            candle_core::bail!("attention apply: probabilities {p:?} and values {v:?} do not fit {} heads", self.heads);
        }
        Ok((b, n, m, vc / h))
    }
}

impl CustomOp2 for AttentionApply {
    fn name(&self) -> &'static str {
        "attention-apply"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, m, dv) = self.dims(l1.shape(), l2.shape())?;
        let heads = self.heads;
        let vc = heads * dv;
        let (pd, vd) = (contiguous_f32(s1, l1, "attention apply")?, contiguous_f32(s2, l2, "attention apply")?);
        let mut out = output_buffer(b * n * vc);
        let dst = SendPtr(out.as_mut_ptr());
        per_head(b, heads, b * heads * n * m, |bi, h| {
            let dst = dst;
            // SAFETY: head h's columns of image bi in the output are written by this item alone.
            unsafe {
                let (pp, vp) = (pd[(bi * heads + h) * n * m..].as_ptr(), vd[bi * m * vc + h * dv..].as_ptr());
                let o = dst.0.add(bi * n * vc + h * dv);
                head_gemm(n, dv, m, o, vc, false, pp, 1, m, vp, 1, vc);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, vc))))
    }

    /// dP = dO v^T; dv = P^T dO (per head).
    fn bwd(&self, p: &Tensor, v: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, n, m, dv) = self.dims(p.shape(), v.shape())?;
        let heads = self.heads;
        let vc = heads * dv;
        let (p, v, grad) = (p.contiguous()?, v.contiguous()?, grad.contiguous()?);
        let mut grads = [p.track_op().then(|| output_buffer(b * heads * n * m)), v.track_op().then(|| output_buffer(b * m * vc))];
        let ptrs = grads.each_mut().map(|g| g.as_mut().map(|g| SendPtr(g.as_mut_ptr())));
        with_f32(&p, |pd| {
            with_f32(&v, |vd| {
                with_f32(&grad, |gd| {
                    per_head(b, heads, b * heads * n * m, |bi, h| {
                        let ptrs = ptrs;
                        // SAFETY: head (bi, h)'s block of dP and its columns of dv are written by
                        // this item alone.
                        unsafe {
                            let go = gd[bi * n * vc + h * dv..].as_ptr();
                            if let Some(gp) = ptrs[0] {
                                let dst = gp.0.add((bi * heads + h) * n * m);
                                let vp = vd[bi * m * vc + h * dv..].as_ptr();
                                head_gemm(n, m, dv, dst, m, false, go, 1, vc, vp, vc, 1);
                            }
                            if let Some(gv) = ptrs[1] {
                                let dst = gv.0.add(bi * m * vc + h * dv);
                                let pp = pd[(bi * heads + h) * n * m..].as_ptr();
                                head_gemm(m, dv, n, dst, vc, false, pp, m, 1, go, 1, vc);
                            }
                        }
                    });
                    Ok(())
                })
            })
        })?;
        let [gp, gv] = grads;
        Ok((grad_tensor(gp, &p)?, grad_tensor(gv, &v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The explicit computation the fused ops replace, through candle's differentiable ops:
    /// heads split, scores, softmax from exp/sum, values, heads merged. Returns the
    /// probabilities [B, H, N, M] and the output [B, N, H*dv].
    fn explicit_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, Tensor)> {
        let (b, n, qc) = q.dims3()?;
        let dv = v.dim(2)? / heads;
        let split = |x: &Tensor, e: usize| -> Result<Tensor> {
            let t = x.dim(1)?;
            x.reshape((b, t, heads, e))?.transpose(1, 2)?.contiguous()
        };
        let s = (split(q, qc / heads)?.matmul(&split(k, qc / heads)?.t()?)? * scale)?;
        let e = s.broadcast_sub(&s.max_keepdim(candle_core::D::Minus1)?.detach())?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
        let out = p.matmul(&split(v, dv)?)?.transpose(1, 2)?.reshape((b, n, heads * dv))?;
        Ok((p, out))
    }

    /// Asserts that the gradients of q, k and v in `got` match `want` (2e-5 of their size).
    fn assert_grads_match(got: &candle_core::backprop::GradStore, want: &candle_core::backprop::GradStore, vars: [&candle_core::Var; 3], case: &str) -> Result<()> {
        for (name, x) in ["q", "k", "v"].iter().zip(vars) {
            let (a, w) = (got.get(x.as_tensor()).unwrap(), want.get(x.as_tensor()).unwrap());
            let err = (a - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let mag = w.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 2e-5 * mag.max(1.0), "d{name} {case}: max error {err} (max {mag})");
        }
        Ok(())
    }

    /// The fused multi-head attention against split heads, softmax(scale q k^T) v and merged
    /// heads through candle's ops.
    #[test]
    fn fused_attention_matches_candle() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        for (b, heads, n, m, d, dv) in
            [(3, 1, 5, 7, 4, 4), (2, 8, 256, 77, 16, 16), (2, 3, 130, 130, 8, 8), (1, 1, 1, 1, 1, 3), (2, 2, 65, 9, 5, 3)]
        {
            let q = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, m, heads * dv), &dev)?;
            let split = |x: &Tensor, e: usize| -> Result<Tensor> {
                let t = x.dim(1)?;
                x.reshape((b, t, heads, e))?.transpose(1, 2)?.contiguous()
            };
            let scale = 1.0 / (d as f64).sqrt();
            let scores = (split(&q, d)?.matmul(&split(&k, d)?.t()?)? * scale)?;
            let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&split(&v, dv)?)?;
            let want = want.transpose(1, 2)?.reshape((b, n, heads * dv))?;
            let got = attention(&q, &k, &v, heads, scale)?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 2e-6, "{:?}: max error {err}", (b, heads, n, m, d, dv));
        }
        Ok(())
    }

    /// The small-head path (where the CPU has AVX-512) and the gemm path against candle's
    /// explicit computation, for head dims below, at and between 8 and 16, key counts around
    /// the 16-lane chunks (1, 9, 16, 17, 33, 77, 256) and query counts across both paths'
    /// blocks (64 and 256 rows).
    #[test]
    fn small_head_path_matches_gemm_path() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        if !small_heads::available() {
            eprintln!("small_head_path_matches_gemm_path: no AVX-512 on this CPU, so the path is never taken here; checking the gemm path only");
        }
        let paths: Vec<BlockPath> = small_heads::available().then_some(BlockPath::SmallHeads).into_iter().collect();
        for (b, heads, n, m, d, dv) in [
            (2, 8, 256, 256, 8, 8), (2, 8, 64, 77, 16, 16), (1, 3, 65, 9, 5, 3), (1, 2, 1, 1, 1, 1), (2, 1, 17, 16, 9, 16),
            (1, 4, 130, 17, 16, 8), (1, 2, 7, 33, 12, 15), (1, 2, 300, 77, 8, 8),
        ] {
            let q = Tensor::randn(0f32, 2.0, (b, n, heads * d), &dev)?;
            let k = Tensor::randn(0f32, 2.0, (b, m, heads * d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, m, heads * dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let (_, want) = explicit_attention(&q, &k, &v, heads, scale)?;
            let dims = AttnDims::of(q.shape(), k.shape(), v.shape(), heads)?;
            let run = |path| -> Result<Tensor> {
                let out = with_f32(&q, |qd| with_f32(&k, |kd| with_f32(&v, |vd| Ok(attention_blocks_on(qd, kd, vd, dims, scale as f32, path)))))?;
                Tensor::from_vec(out, want.shape(), &dev)
            };
            let tol = 2e-6 * want.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let gemm_err = (run(BlockPath::Gemm)? - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(gemm_err < tol, "gemm path {:?}: {gemm_err}", (b, heads, n, m, d, dv));
            for &path in &paths {
                let err = (run(path)? - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < tol, "{path:?} {:?}: max error {err} (tolerance {tol})", (b, heads, n, m, d, dv));
            }
        }
        Ok(())
    }

    /// The probe's two ops (probabilities, then values with heads merged) against the explicit
    /// computation, values and gradients of q, k and v through a loss on both outputs (the
    /// probabilities feed the attention losses, the output the diffusion loss).
    #[test]
    fn probe_ops_match_autograd() -> Result<()> {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        for (b, heads, n, m, d, dv) in [(2, 3, 70, 9, 4, 5), (1, 2, 130, 77, 8, 8)] {
            let q = Var::randn(0f32, 1.0, (b, n, heads * d), &dev)?;
            let k = Var::randn(0f32, 1.0, (b, m, heads * d), &dev)?;
            let v = Var::randn(0f32, 1.0, (b, m, heads * dv), &dev)?;
            let rp = Tensor::randn(0f32, 1.0, (b, heads, n, m), &dev)?;
            let ro = Tensor::randn(0f32, 1.0, (b, n, heads * dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let (p_want, o_want) = explicit_attention(&q, &k, &v, heads, scale)?;
            let loss = |p: &Tensor, o: &Tensor| -> Result<Tensor> { (p * &rp)?.sum_all()? + (o * &ro)?.sum_all()? };
            let gw = loss(&p_want, &o_want)?.backward()?;
            let p = q.as_tensor().apply_op2(k.as_tensor(), AttentionProbs { heads, scale: scale as f32 })?;
            let o = p.apply_op2(v.as_tensor(), AttentionApply { heads })?;
            for (what, got, want) in [("probs", &p, &p_want), ("output", &o, &o_want)] {
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 2e-6, "{what} {:?}: {err}", (b, heads, n, m, d, dv));
            }
            let gg = loss(&p, &o)?.backward()?;
            assert_grads_match(&gg, &gw, [&q, &k, &v], &format!("{:?}", (b, heads, n, m, d, dv)))?;
        }
        Ok(())
    }

    /// The fused op's input gradients against candle's autograd of the explicit computation
    /// (split heads, scores, softmax from exp/sum, values, merge), through a random linear loss.
    #[test]
    fn fused_attention_gradients_match_autograd() -> Result<()> {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        for (b, heads, n, m, d, dv) in [(2, 3, 70, 9, 4, 5), (1, 2, 130, 130, 8, 8), (2, 1, 3, 1, 2, 2)] {
            let q = Var::randn(0f32, 1.0, (b, n, heads * d), &dev)?;
            let k = Var::randn(0f32, 1.0, (b, m, heads * d), &dev)?;
            let v = Var::randn(0f32, 1.0, (b, m, heads * dv), &dev)?;
            let r = Tensor::randn(0f32, 1.0, (b, n, heads * dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let (_, want) = explicit_attention(&q, &k, &v, heads, scale)?;
            let gw = (&want * &r)?.sum_all()?.backward()?;
            let got = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), FusedAttention { heads, scale: scale as f32 })?;
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 2e-6, "forward {:?}: {err}", (b, heads, n, m, d, dv));
            let gg = (&got * &r)?.sum_all()?.backward()?;
            assert_grads_match(&gg, &gw, [&q, &k, &v], &format!("{:?}", (b, heads, n, m, d, dv)))?;
        }
        Ok(())
    }
}
