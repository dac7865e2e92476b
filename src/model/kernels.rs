//! Fused CPU kernels (f32) for the element-wise work that dominates small-model time.
//!
//! A profile of the benchmark UNet forward (`disendiff bench --case unet-fwd`, one thread)
//! showed the matrix products taking only about a quarter of the time: candle's softmax (16%,
//! most of it scalar `expf` from libm), SiLU and the element-wise maps around them took more.
//! The kernels here compute the same functions in one pass over contiguous rows with an
//! `exp` that the compiler vectorises (Cephes' `expf` polynomial, relative error below 2e-7 on
//! its whole range), compiled for AVX2+FMA and picked at run time when the CPU has them, and
//! spread over candle's own thread pool.
//!
//! Each kernel is a candle `CustomOp1` whose backward is the exact analytic gradient, so the
//! ops can sit on the training path (`ops::softmax_last_dim_scaled`, `ops::silu`).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

/// Rows of at least this many elements in all are worth splitting across threads.
const PARALLEL_MIN: usize = 1 << 14;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` for f32 without branches (vectorisable). Inputs are clamped to [-87.3, 88.3]:
/// results below 1.2e-38 come out as that value instead of a denormal or 0, which changes
/// sums of at least one (softmax) or products with a bounded factor (SiLU) by < 1e-37.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln 2, split in two for exact range reduction (Cephes)
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.3, 88.3);
    let t = madd::<FMA>(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = madd::<FMA>(n, -C2, madd::<FMA>(n, -C1, x));
    let mut p = 1.987_569_2e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 5.000_000_1e-1);
    let e = madd::<FMA>(p, r * r, r) + 1.0;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

/// `erfc(x)` by Numerical Recipes' Chebyshev fit `erfcc` (relative error 1.2e-7 in exact
/// arithmetic; in f32 below 1e-5 up to x = 9, from rounding the exponent -x^2), so
/// `gelu(x) = x/2 * erfc(-x/sqrt 2)` stays accurate in relative terms in its tiny negative
/// tail too; vectorisable.
#[inline(always)]
fn erfc<const FMA: bool>(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / madd::<FMA>(0.5, z, 1.0);
    let mut p = 0.170_872_77;
    for c in [-0.822_152_23, 1.488_515_9, -1.135_203_98, 0.278_868_07, -0.186_288_06, 0.096_784_18, 0.374_091_96, 1.000_023_7, -1.265_512_2]
    {
        p = madd::<FMA>(p, t, c);
    }
    let r = t * exp::<FMA>(madd::<FMA>(-z, z, p));
    if x < 0.0 {
        2.0 - r
    } else {
        r
    }
}

/// The largest element (8 lanes, so the compiler keeps it in vector registers).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut best = tail.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for v in m {
        best = if v > best { v } else { best };
    }
    best
}

#[inline(always)]
fn softmax_row<const FMA: bool>(src: &[f32], dst: &mut [f32], scale: f32) {
    let m = row_max(src) * scale;
    let mut acc = [0f32; 8];
    let n8 = src.len() / 8 * 8;
    for (s, d) in src[..n8].chunks_exact(8).zip(dst[..n8].chunks_exact_mut(8)) {
        for i in 0..8 {
            d[i] = exp::<FMA>(madd::<FMA>(s[i], scale, -m));
            acc[i] += d[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (s, d) in src[n8..].iter().zip(&mut dst[n8..]) {
        *d = exp::<FMA>(madd::<FMA>(*s, scale, -m));
        sum += *d;
    }
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

#[inline(always)]
fn silu_slice<const FMA: bool>(src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        *d = *s / (1.0 + exp::<FMA>(-*s));
    }
}

/// Runs `f(first_row, rows)` over row ranges, on candle's thread pool when the work is large.
fn for_row_ranges(rows: usize, cols: usize, f: impl Fn(usize, usize) + Sync) {
    if rows * cols < PARALLEL_MIN || rows < 2 {
        f(0, rows);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(rows, |r| f(r.start, r.len()));
}

/// A `*mut f32` that may cross threads: each range writes disjoint rows.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A kernel over whole rows: (`src`, `dst`, row length, parameter).
type RowKernel = unsafe fn(&[f32], &mut [f32], usize, f32);

/// Applies `kernel` (the AVX2+FMA build when the CPU has it, else `plain`) to the rows of
/// `src` (`cols` each), writing the matching rows of `dst` (`dst.len() / rows` each), split
/// over threads when large.
fn run_rows(src: &[f32], dst: &mut [f32], cols: usize, param: f32, fma: RowKernel, plain: RowKernel) {
    let rows = src.len() / cols;
    let dcols = dst.len() / rows.max(1);
    let kernel = if has_avx2_fma() { fma } else { plain };
    let out = SendPtr(dst.as_mut_ptr());
    for_row_ranges(rows, cols, move |r0, n| {
        let out = out;
        // SAFETY: the ranges are disjoint and inside `dst`; the AVX2 kernel is only chosen
        // when the CPU has AVX2 and FMA.
        unsafe {
            let d = std::slice::from_raw_parts_mut(out.0.add(r0 * dcols), n * dcols);
            kernel(&src[r0 * cols..(r0 + n) * cols], d, cols, param)
        }
    });
}

/// Defines `$plain` and `$fma` row kernels from the generic `$generic::<FMA>` (the latter compiled for AVX2+FMA).
macro_rules! row_kernels {
    ($generic:ident => $plain:ident, $fma:ident) => {
        unsafe fn $plain(s: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<false>(s, d, cols, p)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $fma(s: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<true>(s, d, cols, p)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unsafe fn $fma(s: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<false>(s, d, cols, p)
        }
    };
}

#[inline(always)]
fn softmax_rows<const FMA: bool>(s: &[f32], d: &mut [f32], cols: usize, scale: f32) {
    for (sr, dr) in s.chunks_exact(cols).zip(d.chunks_exact_mut(cols)) {
        softmax_row::<FMA>(sr, dr, scale)
    }
}
row_kernels!(softmax_rows => softmax_rows_plain, softmax_rows_fma);

#[inline(always)]
fn silu_rows<const FMA: bool>(s: &[f32], d: &mut [f32], _cols: usize, _: f32) {
    silu_slice::<FMA>(s, d)
}
row_kernels!(silu_rows => silu_rows_plain, silu_rows_fma);

/// Rows `[h, g]` of `cols` -> `h * gelu(g)` of `cols / 2`.
#[inline(always)]
fn geglu_rows<const FMA: bool>(s: &[f32], d: &mut [f32], cols: usize, _: f32) {
    let half = cols / 2;
    for (sr, dr) in s.chunks_exact(cols).zip(d.chunks_exact_mut(half)) {
        let (h, g) = sr.split_at(half);
        for i in 0..half {
            let gelu = 0.5 * g[i] * erfc::<FMA>(-g[i] * std::f32::consts::FRAC_1_SQRT_2);
            dr[i] = h[i] * gelu;
        }
    }
}
row_kernels!(geglu_rows => geglu_rows_plain, geglu_rows_fma);

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{what}: non-contiguous input"),
        _ => candle_core::bail!("{what}: only f32 is supported"),
    }
}

/// `softmax(scale * x)` over the last dimension.
pub struct ScaledSoftmax {
    pub scale: f32,
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l, "scaled-softmax")?;
        let cols = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = output_buffer(src.len());
        run_rows(src, &mut dst, cols, self.scale, softmax_rows_fma, softmax_rows_plain);
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // dL/dx = scale * y * (g - sum(g * y))
        let s = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some(((y * g.broadcast_sub(&s)?)? * self.scale as f64)?))
    }
}

/// `x * sigmoid(x)`.
pub struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l, "silu")?;
        let mut dst = output_buffer(src.len());
        // Treat the tensor as rows of 4096 for the thread split.
        let cols = 4096.min(src.len()).max(1);
        let full = src.len() / cols * cols;
        run_rows(&src[..full], &mut dst[..full], cols, 0.0, silu_rows_fma, silu_rows_plain);
        silu_slice::<false>(&src[full..], &mut dst[full..]);
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // d/dx x s(x) = s (1 + x (1 - s))
        let s = candle_nn::ops::sigmoid(x)?;
        let d = (&s * ((x * (1.0 - &s)?)? + 1.0)?)?;
        Ok(Some((g * d)?))
    }
}

/// GEGLU: `[h, g]` (the last dimension split in halves) -> `h * gelu_erf(g)`.
pub struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l, "geglu")?;
        let mut dims = l.shape().dims().to_vec();
        let cols = dims.last().copied().unwrap_or(0);
        if cols % 2 != 0 || cols == 0 {
            candle_core::bail!("geglu: last dimension {cols} is not even");
        }
        *dims.last_mut().unwrap() = cols / 2;
        let mut dst = output_buffer(src.len() / 2);
        run_rows(src, &mut dst, cols, 0.0, geglu_rows_fma, geglu_rows_plain);
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // y = h * gelu(g):  dh = grad * gelu(g),  dg = grad * h * (Phi(g) + g * phi(g))
        let half = x.dim(D::Minus1)? / 2;
        let h = x.narrow(D::Minus1, 0, half)?;
        let g = x.narrow(D::Minus1, half, half)?;
        let cdf = ((g.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
        let pdf = (g.sqr()?.affine(-0.5, 0.0)?.exp()? * (0.5 / std::f64::consts::PI).sqrt())?;
        let gelu = (&g * &cdf)?;
        let dgelu = (cdf + (&g * pdf)?)?;
        let dh = (grad * gelu)?;
        let dg = ((grad * h)? * dgelu)?;
        Ok(Some(Tensor::cat(&[dh, dg], D::Minus1)?))
    }
}

/// A buffer of `n` floats for a kernel that writes every element before reading any (the
/// zeroing `vec![0; n]` does was 5-10% of a training step, on one thread).
fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: any bit pattern is a valid f32, and every caller overwrites all `n` elements
    // before reading them.
    unsafe { v.set_len(n) };
    v
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(contiguous_f32(s, layout, "kernel")?),
        _ => candle_core::bail!("kernel: CPU tensors only"),
    }
}

/// `dst[m, n] (+)= lhs[m, k] . rhs[k, n]` (dst row-major and contiguous; lhs and rhs given by
/// row and column strides), its rows split over candle's thread pool: a product must not go
/// through gemm's own rayon parallelism, whose threads would compete for the cores with the
/// pool that runs every other kernel (measured: 2 threads gave only 1.2x over 1).
///
/// # Safety
/// The pointers must cover the matrices their strides describe.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
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
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(qs), candle_core::Storage::Cpu(ks), candle_core::Storage::Cpu(vs)) = (&*qs, &*ks, &*vs)
    else {
        candle_core::bail!("attention kernel: CPU tensors only")
    };
    let (qd, kd, vd) = (contiguous_f32(qs, ql, "attention")?, contiguous_f32(ks, kl, "attention")?, contiguous_f32(vs, vl, "attention")?);
    let mut out = output_buffer(g * n * dv);
    let dst = SendPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(ATTN_BLOCK);
    let fma = has_avx2_fma();
    let scale = scale as f32;
    let item = move |it: usize| {
        let dst = dst;
        let (gi, r0) = (it / blocks, (it % blocks) * ATTN_BLOCK);
        let rows = ATTN_BLOCK.min(n - r0);
        let mut scores = output_buffer(rows * m);
        let mut probs = output_buffer(rows * m);
        let qp = &qd[(gi * n + r0) * d..];
        let kp = &kd[gi * m * d..];
        let vp = &vd[gi * m * dv..];
        // SAFETY: the pointers cover the stated matrices (contiguous slices checked above);
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
    Tensor::from_vec(out, (g, n, dv), q.device())
}

/// Unfolds a [B, C, H, W] image into the [B, C*k*k, OH*OW] matrix of its k x k patches
/// (im2col; row `(c, i, j)`, column `(oy, ox)`, zero outside the image). No backward: only for
/// tensors outside the autograd graph (see [`conv2d`]).
struct Im2Col {
    k: usize,
    padding: usize,
    stride: usize,
}

impl Im2Col {
    fn out_size(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.k) / self.stride + 1
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(s, l, "im2col")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (k, pad, stride) = (self.k, self.padding as isize, self.stride);
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let plane = oh * ow;
        let mut dst = vec![0f32; b * c * k * k * plane];
        let out = SendPtr(dst.as_mut_ptr());
        // one work item per (image, channel): its k*k rows of the output
        let fill = move |item: usize| {
            let out = out;
            let x = &src[item * h * w..(item + 1) * h * w];
            // SAFETY: item's k*k rows are disjoint from every other item's.
            let rows = unsafe { std::slice::from_raw_parts_mut(out.0.add(item * k * k * plane), k * k * plane) };
            for i in 0..k {
                for j in 0..k {
                    let row = &mut rows[(i * k + j) * plane..(i * k + j + 1) * plane];
                    for oy in 0..oh {
                        let iy = (oy * stride) as isize + i as isize - pad;
                        if iy < 0 || iy >= h as isize {
                            continue; // stays zero
                        }
                        let src_row = &x[iy as usize * w..(iy as usize + 1) * w];
                        let dst_row = &mut row[oy * ow..(oy + 1) * ow];
                        if stride == 1 {
                            // ix = ox + j - pad: one contiguous run
                            let lo = (pad - j as isize).max(0) as usize;
                            let hi = ((w as isize + pad - j as isize).min(ow as isize)).max(lo as isize) as usize;
                            let from = (lo as isize + j as isize - pad) as usize;
                            dst_row[lo..hi].copy_from_slice(&src_row[from..from + hi - lo]);
                        } else {
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                let ix = (ox * stride) as isize + j as isize - pad;
                                if ix >= 0 && ix < w as isize {
                                    *d = src_row[ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        };
        let items = b * c;
        if items * k * k * plane < PARALLEL_MIN {
            (0..items).for_each(fill);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(items, |r| r.for_each(fill));
        }
        Ok((CpuStorage::F32(dst), Shape::from((b, c * k * k, plane))))
    }
}

/// 2-D convolution (square kernel, dilation 1, one group) of a tensor *outside* the autograd
/// graph, as im2col + one matrix product per image: candle's tiled convolution spent most of
/// its time gathering patches element by element. `x` [B, C, H, W] f32 on the CPU,
/// `w` [O, C, k, k], optional bias [O] (written first and accumulated into).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let (out, shape) = conv2d_vec(x, w, b, padding, stride)?;
    Tensor::from_vec(out, shape, x.device())
}

/// [`conv2d`]'s result as a plain buffer and its shape.
pub fn conv2d_vec(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<(Vec<f32>, Shape)> {
    let (bs, _, h, wd) = x.dims4()?;
    let (o, c, k, k2) = w.dims4()?;
    if k != k2 {
        candle_core::bail!("conv2d kernel: square kernels only, got {k}x{k2}");
    }
    let op = Im2Col { k, padding, stride };
    let (oh, ow) = (op.out_size(h), op.out_size(wd));
    let cols = x.contiguous()?.apply_op1_no_bwd(&op)?;
    let (kk, plane) = (c * k * k, oh * ow);
    let w = w.contiguous()?;
    let mut out = match b {
        Some(b) => with_f32(&b.contiguous()?, |b| Ok(b.iter().flat_map(|&v| std::iter::repeat_n(v, plane)).collect::<Vec<_>>().repeat(bs)))?,
        None => output_buffer(bs * o * plane),
    };
    with_f32(&cols, |cs| {
        with_f32(&w, |ws| {
            for i in 0..bs {
                // SAFETY: w is [o, kk], image i's columns [kk, plane], its output [o, plane].
                unsafe {
                    gemm_rows(
                        o, plane, kk, out.as_mut_ptr().add(i * o * plane), b.is_some(),
                        ws.as_ptr(), kk as isize, 1, cs.as_ptr().add(i * kk * plane), plane as isize, 1,
                    )
                };
            }
            Ok(())
        })
    })?;
    Ok((out, Shape::from((bs, o, oh, ow))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            for v in [exp::<true>(x), exp::<false>(x)] {
                let want = (x as f64).exp();
                worst = worst.max(((v as f64) - want).abs() / want);
            }
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp::<true>(0.0), 1.0);
        assert!(exp::<true>(-1e30) < 1.3e-38 && exp::<true>(f32::NEG_INFINITY) < 1.3e-38);
        assert!(exp::<true>(1e30).is_finite());
    }

    /// erfc's relative error, checked against a double-precision series / continued fraction
    /// (libm's erfc in f64 through `erfc_f64`).
    #[test]
    fn erfc_is_accurate_in_relative_terms() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 9.0 {
            for v in [erfc::<true>(x), erfc::<false>(x)] {
                let want = erfc_f64(x as f64);
                worst = worst.max(((v as f64) - want).abs() / want);
            }
            x += 0.01;
        }
        assert!(worst < 1e-5, "worst relative error {worst}");
    }

    /// erfc in f64: Taylor series of erf below 2.5, Lentz's continued fraction above.
    fn erfc_f64(x: f64) -> f64 {
        if x < 0.0 {
            return 2.0 - erfc_f64(-x);
        }
        if x < 2.5 {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            return 1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum;
        }
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let mut f = x;
        for k in (1..200).rev() {
            f = x + (k as f64 / 2.0) / f;
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / f
    }

    #[test]
    fn row_max_sees_every_element() {
        for n in [1, 7, 8, 9, 77, 256] {
            for at in [0, n / 2, n - 1] {
                let mut v = vec![-5f32; n];
                v[at] = 3.0;
                assert_eq!(row_max(&v), 3.0, "n {n} at {at}");
            }
        }
    }

    /// The im2col convolution against candle's, for the shapes the models use (3x3 with
    /// padding 1, stride 1 and 2, odd sizes) and a 5x5 without padding.
    #[test]
    fn im2col_conv_matches_candle() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        for (b, c, h, w, o, k, pad, stride) in
            [(2, 3, 8, 8, 4, 3, 1, 1), (2, 5, 9, 7, 6, 3, 1, 2), (1, 4, 16, 16, 8, 3, 1, 2), (3, 2, 11, 6, 5, 5, 0, 1), (8, 64, 16, 16, 32, 3, 1, 1)]
        {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
            let want = x.conv2d(&wt, pad, stride, 1, 1)?.broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
            let got = conv2d(&x, &wt, Some(&bias), pad, stride)?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-5 * scale, "{:?}: max error {err}", (b, c, h, w, o, k, pad, stride));
        }
        Ok(())
    }

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
