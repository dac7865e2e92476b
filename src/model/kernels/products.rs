//! Matrix products as row blocks on candle's thread pool, and attention fused per query block.

use super::*;
use candle_core::Shape;

/// `dst[m, n] (+)= lhs[m, k] . rhs[k, n]` (dst row-major and contiguous; lhs and rhs given by
/// row and column strides), its rows split over candle's thread pool: a product must not go
/// through gemm's own rayon parallelism, whose threads would compete for the cores with the
/// pool that runs every other kernel (measured: 2 threads gave only 1.2x over 1).
///
/// # Safety
/// The pointers must cover the matrices their strides describe.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_rows(
    m: usize, n: usize, k: usize, dst: *mut f32, accumulate: bool,
    lhs: *const f32, lhs_rs: isize, lhs_cs: isize, rhs: *const f32, rhs_rs: isize, rhs_cs: isize,
) {
    if k == 0 {
        if !accumulate {
            std::ptr::write_bytes(dst, 0, m * n); // an empty sum (callers' buffers are uninitialised)
        }
        return;
    }
    let (dst, lhs, rhs) = (SendPtr(dst), SendPtr(lhs as *mut f32), SendPtr(rhs as *mut f32));
    let block = |r0: usize, rows: usize| {
        let (dst, lhs, rhs) = (dst, lhs, rhs);
        gemm::gemm(
            rows, n, k, dst.0.add(r0 * n), 1, n as isize, accumulate,
            lhs.0.offset(r0 as isize * lhs_rs), lhs_cs, lhs_rs, rhs.0, rhs_cs, rhs_rs,
            if accumulate { 1.0 } else { 0.0 }, 1.0, false, false, false, gemm::Parallelism::None,
        )
    };
    let threads = candle_core::utils::get_num_threads();
    if threads < 2 || m * n * k < (1 << 18) || m < 16 {
        block(0, m);
        return;
    }
    let rows = m.div_ceil(threads * 4).max(16);
    let blocks = m.div_ceil(rows);
    candle_core::utils::barrier_pool().execute_chunked(blocks, |r| {
        for b in r {
            let r0 = b * rows;
            block(r0, rows.min(m - r0));
        }
    });
}

/// `x w^T + b` for x [N, in] and w [out, in] outside the autograd graph (f32, CPU), the
/// bias written first and accumulated into.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out, shape) = linear_vec(x, w, b)?;
    Tensor::from_vec(out, shape, x.device())
}

/// [`linear`]'s result as a plain buffer and its shape.
pub fn linear_vec(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(Vec<f32>, Shape)> {
    let (n, k) = x.dims2()?;
    let (o, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear kernel: x {:?} and weight {:?} do not fit", x.dims(), w.dims());
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let mut out = match b {
        Some(b) => with_f32(&b.contiguous()?, |b| Ok(b.repeat(n)))?,
        None => output_buffer(n * o),
    };
    with_f32(&x, |xs| {
        with_f32(&w, |ws| {
            // SAFETY: x is [n, k] and w [o, k] contiguous; w^T is read with strides (1, k).
            unsafe { gemm_rows(n, o, k, out.as_mut_ptr(), b.is_some(), xs.as_ptr(), k as isize, 1, ws.as_ptr(), 1, k as isize) };
            Ok(())
        })
    })?;
    Ok((out, Shape::from((n, o))))
}

/// `a . b` for a [M, K] and b [K, N] outside the autograd graph (f32, CPU).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 {
        candle_core::bail!("matmul kernel: {:?} and {:?} do not fit", a.dims(), b.dims());
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let mut out = output_buffer(m * n);
    with_f32(&a, |asl| {
        with_f32(&b, |bsl| {
            // SAFETY: a [m, k] and b [k, n] contiguous.
            unsafe { gemm_rows(m, n, k, out.as_mut_ptr(), false, asl.as_ptr(), k as isize, 1, bsl.as_ptr(), n as isize, 1) };
            Ok(())
        })
    })?;
    Tensor::from_vec(out, (m, n), a.device())
}

/// Query rows per work item of [`attention`].
const ATTN_BLOCK: usize = 64;

/// `softmax(scale * q k^T) v` for tensors *outside* the autograd graph, without materialising
/// the [G, N, M] probabilities: each work item (one of the G = batch x heads groups, 64 query
/// rows) computes its scores block with one matrix product, its softmax in place, and its
/// output rows with a second product, on candle's thread pool. `q` [G, N, d], `k` [G, M, d],
/// `v` [G, M, dv], f32 on the CPU; returns [G, N, dv]. Batched through candle, the same work
/// was many tiny products (d is 8-64) plus a probabilities tensor far larger than the cache.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (g, n, d) = q.dims3()?;
    let (gk, m, dk) = k.dims3()?;
    let (gv, mv, dv) = v.dims3()?;
    if gk != g || gv != g || dk != d || mv != m {
        candle_core::bail!("attention kernel: q {:?}, k {:?}, v {:?} do not fit", q.dims(), k.dims(), v.dims());
    }
    if d == 0 || m == 0 {
        candle_core::bail!("attention kernel: empty keys or head dimension ({:?}, {:?})", q.dims(), k.dims());
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = with_f32(&q, |qd| with_f32(&k, |kd| with_f32(&v, |vd| Ok(attention_blocks(qd, kd, vd, (g, n, m, d, dv), scale as f32)))))?;
    Tensor::from_vec(out, (g, n, dv), q.device())
}

/// [`attention`] on the raw data: `dims` = (G, N, M, d, dv).
fn attention_blocks(qd: &[f32], kd: &[f32], vd: &[f32], (g, n, m, d, dv): (usize, usize, usize, usize, usize), scale: f32) -> Vec<f32> {
    let mut out = output_buffer(g * n * dv);
    let dst = SendPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(ATTN_BLOCK);
    let fma = has_avx2_fma();
    let item = move |it: usize| {
        let dst = dst;
        let (gi, r0) = (it / blocks, (it % blocks) * ATTN_BLOCK);
        let rows = ATTN_BLOCK.min(n - r0);
        let mut scores = output_buffer(rows * m);
        let mut probs = output_buffer(rows * m);
        let qp = &qd[(gi * n + r0) * d..];
        let kp = &kd[gi * m * d..];
        let vp = &vd[gi * m * dv..];
        // SAFETY: the pointers cover the stated matrices (contiguous slices of these shapes);
        // each item writes its own `rows` output rows; the AVX2 kernel only runs on AVX2+FMA.
        unsafe {
            // scores [rows, m] = q_blk [rows, d] . k^T [d, m]
            gemm::gemm(
                rows, m, d, scores.as_mut_ptr(), 1, m as isize, false,
                qp.as_ptr(), 1, d as isize, kp.as_ptr(), d as isize, 1,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            );
            if fma {
                softmax_rows_fma(&scores, &mut probs, m, scale);
            } else {
                softmax_rows_plain(&scores, &mut probs, m, scale);
            }
            // out [rows, dv] = probs [rows, m] . v [m, dv]
            gemm::gemm(
                rows, dv, m, dst.0.add((gi * n + r0) * dv), 1, dv as isize, false,
                probs.as_ptr(), 1, m as isize, vp.as_ptr(), 1, dv as isize,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            );
        }
    };
    let items = g * blocks;
    if g * n * m < PARALLEL_MIN {
        (0..items).for_each(item);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, |r| r.for_each(item));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused attention against softmax(scale q k^T) v through candle's ops.
    #[test]
    fn fused_attention_matches_candle() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        for (g, n, m, d, dv) in [(3, 5, 7, 4, 4), (16, 256, 77, 16, 16), (2, 130, 130, 8, 8), (1, 1, 1, 1, 3)] {
            let q = Tensor::randn(0f32, 1.0, (g, n, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (g, m, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (g, m, dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let want = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?.matmul(&v)?;
            let got = attention(&q, &k, &v, scale)?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 2e-6, "{:?}: max error {err}", (g, n, m, d, dv));
        }
        Ok(())
    }

    /// The row-parallel products (linear with and without bias, matmul) against candle's.
    #[test]
    fn linear_and_matmul_match_candle() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        for (n, k, o) in [(3, 5, 7), (2048, 64, 320), (77, 128, 16), (1, 1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (o, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, o, &dev)?;
            let rel = |a: Tensor, b: Tensor| -> Result<f32> {
                Ok((a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)
            };
            let want = x.matmul(&w.t()?)?;
            assert!(rel(linear(&x, &w, None)?, want.clone())? < 1e-6);
            assert!(rel(linear(&x, &w, Some(&b))?, want.broadcast_add(&b)?)? < 1e-6);
            let g = Tensor::randn(0f32, 1.0, (n, o), &dev)?;
            assert!(rel(matmul(&g, &w)?, g.matmul(&w)?)? < 1e-6, "matmul {:?}", (n, k, o));
        }
        Ok(())
    }
}
