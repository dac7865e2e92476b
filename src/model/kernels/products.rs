//! Matrix products as row blocks on candle's thread pool, and attention fused per query block.

use super::conv::Accumulator;
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
    let (out, shape) = linear_vec(x, w, Accumulator { bias: b, residual: None })?;
    Tensor::from_vec(out, shape, x.device())
}

/// `x w^T` accumulated into `acc` (bias [out], residual [N, out]), as a plain buffer and its
/// shape.
pub fn linear_vec(x: &Tensor, w: &Tensor, acc: Accumulator) -> Result<(Vec<f32>, Shape)> {
    let (n, k) = x.dims2()?;
    let (o, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear kernel: x {:?} and weight {:?} do not fit", x.dims(), w.dims());
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let mut out = output_buffer(n * o);
    let accumulate = acc.write(&mut out, n, o, 1)?;
    with_f32(&x, |xs| {
        with_f32(&w, |ws| {
            // SAFETY: x is [n, k] and w [o, k] contiguous; w^T is read with strides (1, k).
            unsafe { gemm_rows(n, o, k, out.as_mut_ptr(), accumulate, xs.as_ptr(), k as isize, 1, ws.as_ptr(), 1, k as isize) };
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
    let (b, n, qc) = q.dims3()?;
    let (bk, m, kc) = k.dims3()?;
    let (bv, mv, vc) = v.dims3()?;
    if heads == 0 || bk != b || bv != b || kc != qc || mv != m || qc % heads != 0 || vc % heads != 0 {
        candle_core::bail!("attention kernel: q {:?}, k {:?}, v {:?} do not fit {heads} heads", q.dims(), k.dims(), v.dims());
    }
    if qc == 0 || m == 0 {
        candle_core::bail!("attention kernel: empty keys or head dimension ({:?}, {:?})", q.dims(), k.dims());
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let dims = AttnDims { b, heads, n, m, d: qc / heads, dv: vc / heads };
    let out = with_f32(&q, |qd| with_f32(&k, |kd| with_f32(&v, |vd| Ok(attention_blocks(qd, kd, vd, dims, scale as f32)))))?;
    Tensor::from_vec(out, (b, n, vc), q.device())
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

/// [`attention`] on the raw data.
fn attention_blocks(qd: &[f32], kd: &[f32], vd: &[f32], a: AttnDims, scale: f32) -> Vec<f32> {
    let AttnDims { b, heads, n, m, d, dv } = a;
    let (qc, vc) = (heads * d, heads * dv);
    let mut out = output_buffer(b * n * vc);
    let dst = SendPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(ATTN_BLOCK);
    let fma = has_avx2_fma();
    let item = move |it: usize| {
        let dst = dst;
        let (bh, r0) = (it / blocks, (it % blocks) * ATTN_BLOCK);
        let (bi, h) = (bh / heads, bh % heads);
        let rows = ATTN_BLOCK.min(n - r0);
        let mut probs = output_buffer(rows * m);
        let mut inv_sums = [0f32; ATTN_BLOCK];
        let qp = &qd[(bi * n + r0) * qc + h * d..];
        let kp = &kd[bi * m * qc + h * d..];
        let vp = &vd[bi * m * vc + h * dv..];
        // SAFETY: the pointers cover the stated matrices (head h's columns of image bi, rows
        // `qc`/`vc` apart); each item writes its own rows x dv block of the output; the AVX2
        // kernel only runs on AVX2+FMA.
        unsafe {
            // scores [rows, m] = q_blk [rows, d] . k^T [d, m]
            gemm::gemm(
                rows, m, d, probs.as_mut_ptr(), 1, m as isize, false,
                qp.as_ptr(), 1, qc as isize, kp.as_ptr(), qc as isize, 1,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            );
            if fma {
                exp_rows_fma(&mut probs, m, scale, &mut inv_sums);
            } else {
                exp_rows_plain(&mut probs, m, scale, &mut inv_sums);
            }
            // out [rows, dv] = exp [rows, m] . v [m, dv], then each row / its sum
            let o = dst.0.add((bi * n + r0) * vc + h * dv);
            gemm::gemm(
                rows, dv, m, o, 1, vc as isize, false,
                probs.as_ptr(), 1, m as isize, vp.as_ptr(), 1, vc as isize,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            );
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
fn exp_rows<const FMA: bool>(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    for (row, inv) in s.chunks_exact_mut(cols).zip(inv_sums.iter_mut()) {
        *inv = 1.0 / exp_row_in_place::<FMA>(row, scale);
    }
}

unsafe fn exp_rows_plain(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    exp_rows::<false>(s, cols, scale, inv_sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_rows_fma(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    exp_rows::<true>(s, cols, scale, inv_sums)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn exp_rows_fma(s: &mut [f32], cols: usize, scale: f32, inv_sums: &mut [f32]) {
    exp_rows::<false>(s, cols, scale, inv_sums)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let r = Tensor::randn(0f32, 1.0, (n, o), &dev)?;
            let (v, shape) = linear_vec(&x, &w, Accumulator { bias: Some(&b), residual: Some(&r) })?;
            assert!(rel(Tensor::from_vec(v, shape, &dev)?, (want.broadcast_add(&b)? + &r)?)? < 1e-6, "linear + residual");
            let g = Tensor::randn(0f32, 1.0, (n, o), &dev)?;
            assert!(rel(matmul(&g, &w)?, g.matmul(&w)?)? < 1e-6, "matmul {:?}", (n, k, o));
        }
        Ok(())
    }
}
