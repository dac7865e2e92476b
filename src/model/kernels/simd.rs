//! The shared arithmetic of the fused kernels: an `exp` and an `erfc` that the compiler
//! vectorises (candle's softmax spent most of its time in scalar libm `expf`), row maxima and
//! softmax rows in 8 lanes, row kernels compiled twice (plain, and for AVX2+FMA, picked at run
//! time), and the split of rows over candle's thread pool.

/// Rows of at least this many elements in all are worth splitting across threads.
pub(super) const PARALLEL_MIN: usize = 1 << 14;

#[inline(always)]
pub(super) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// ln 2 split in two for an exact range reduction x - n ln 2 (Cephes): the high part has few
/// mantissa bits, so n * EXP_LN2_HI is exact for the n that occur.
pub(super) const EXP_LN2_HI: f32 = 0.693_359_4;
pub(super) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for (exp(r) - 1 - r) / r^2 on |r| <= ln 2 / 2, highest power first.
pub(super) const EXP_POLY: [f32; 6] = [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

/// `exp(x)` for f32 without branches (vectorisable). Inputs are clamped to [-87.3, 88.3]:
/// results below 1.2e-38 come out as that value instead of a denormal or 0, which changes
/// sums of at least one (softmax) or products with a bounded factor (SiLU) by < 1e-37.
#[inline(always)]
pub(super) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.3, 88.3);
    let t = madd::<FMA>(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = madd::<FMA>(n, -EXP_LN2_LO, madd::<FMA>(n, -EXP_LN2_HI, x));
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = madd::<FMA>(p, r, c);
    }
    let e = madd::<FMA>(p, r * r, r) + 1.0;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

/// `erfc(x)` by Numerical Recipes' Chebyshev fit `erfcc` (relative error 1.2e-7 in exact
/// arithmetic; in f32 below 1e-5 up to x = 9, from rounding the exponent -x^2), so
/// `gelu(x) = x/2 * erfc(-x/sqrt 2)` stays accurate in relative terms in its tiny negative
/// tail too; vectorisable.
#[inline(always)]
pub(super) fn erfc<const FMA: bool>(x: f32) -> f32 {
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
pub(super) fn row_max(row: &[f32]) -> f32 {
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

/// `row[i] = exp(scale * (row[i] - max))` (scale > 0), returning the sum: [`softmax_row`]
/// in place and without its division.
#[inline(always)]
pub(super) fn exp_row_in_place<const FMA: bool>(row: &mut [f32], scale: f32) -> f32 {
    let m = row_max(row) * scale;
    let mut acc = [0f32; 8];
    let n8 = row.len() / 8 * 8;
    for d in row[..n8].chunks_exact_mut(8) {
        for i in 0..8 {
            d[i] = exp::<FMA>(madd::<FMA>(d[i], scale, -m));
            acc[i] += d[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for d in &mut row[n8..] {
        *d = exp::<FMA>(madd::<FMA>(*d, scale, -m));
        sum += *d;
    }
    sum
}

/// Runs `f(first_row, rows)` over row ranges, on candle's thread pool when the work is large.
pub(super) fn for_row_ranges(rows: usize, cols: usize, f: impl Fn(usize, usize) + Sync) {
    if rows * cols < PARALLEL_MIN || rows < 2 {
        f(0, rows);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(rows, |r| f(r.start, r.len()));
}

/// A `*mut f32` that may cross threads: each range writes disjoint rows.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

pub(super) fn has_avx2_fma() -> bool {
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
pub(super) type RowKernel = unsafe fn(&[f32], &mut [f32], usize, f32);

/// Calls `f(first_row, n, dst_rows)` over ranges of the `rows` rows of `dst` (each
/// `dst.len() / rows` long), on candle's pool when the work (`rows * cols`) is large.
pub(super) fn for_dst_rows(rows: usize, cols: usize, dst: &mut [f32], f: impl Fn(usize, usize, &mut [f32]) + Sync) {
    let dcols = dst.len() / rows.max(1);
    let out = SendPtr(dst.as_mut_ptr());
    for_row_ranges(rows, cols, move |r0, n| {
        let out = out;
        // SAFETY: the ranges are disjoint and inside `dst`.
        let d = unsafe { std::slice::from_raw_parts_mut(out.0.add(r0 * dcols), n * dcols) };
        f(r0, n, d)
    });
}

/// Applies `kernel` (the AVX2+FMA build when the CPU has it, else `plain`) to the rows of
/// `src` (`cols` each), writing the matching rows of `dst` (`dst.len() / rows` each), split
/// over threads when large.
pub(super) fn run_rows(src: &[f32], dst: &mut [f32], cols: usize, param: f32, fma: RowKernel, plain: RowKernel) {
    let kernel = if has_avx2_fma() { fma } else { plain };
    for_dst_rows(src.len() / cols, cols, dst, |r0, n, d| {
        // SAFETY: the AVX2 kernel is only chosen when the CPU has AVX2 and FMA.
        unsafe { kernel(&src[r0 * cols..(r0 + n) * cols], d, cols, param) }
    });
}

/// Defines `$plain` and `$fma` row kernels from the generic `$generic::<FMA>` (the latter compiled for AVX2+FMA).
macro_rules! row_kernels {
    ($vis:vis $generic:ident => $plain:ident, $fma:ident) => {
        $vis unsafe fn $plain(s: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<false>(s, d, cols, p)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        $vis unsafe fn $fma(s: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<true>(s, d, cols, p)
        }
        #[cfg(not(target_arch = "x86_64"))]
        $vis unsafe fn $fma(s: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<false>(s, d, cols, p)
        }
    };
}
pub(super) use row_kernels;

/// A kernel over rows of two inputs: (`a`, `b`, `dst`, row length of `a`, parameter); `b` and
/// `dst` rows are as many as `a`'s, each `b.len() / rows` and `dst.len() / rows` long.
pub(super) type RowKernel2 = unsafe fn(&[f32], &[f32], &mut [f32], usize, f32);

/// As [`run_rows`] for kernels of two inputs.
pub(super) fn run_rows2(a: &[f32], b: &[f32], dst: &mut [f32], cols: usize, param: f32, fma: RowKernel2, plain: RowKernel2) {
    let rows = a.len() / cols.max(1);
    let bcols = b.len() / rows.max(1);
    let kernel = if has_avx2_fma() { fma } else { plain };
    for_dst_rows(rows, cols, dst, |r0, n, d| {
        // SAFETY: the AVX2 kernel is only chosen when the CPU has AVX2 and FMA.
        unsafe { kernel(&a[r0 * cols..(r0 + n) * cols], &b[r0 * bcols..(r0 + n) * bcols], d, cols, param) }
    });
}

/// As [`row_kernels`] for kernels of two inputs ([`RowKernel2`]).
macro_rules! row_kernels2 {
    ($generic:ident => $plain:ident, $fma:ident) => {
        unsafe fn $plain(a: &[f32], b: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<false>(a, b, d, cols, p)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $fma(a: &[f32], b: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<true>(a, b, d, cols, p)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unsafe fn $fma(a: &[f32], b: &[f32], d: &mut [f32], cols: usize, p: f32) {
            $generic::<false>(a, b, d, cols, p)
        }
    };
}
pub(super) use row_kernels2;

/// `softmax(scale * row)` for each row of `cols` of `s`, into `d`.
#[inline(always)]
fn softmax_rows<const FMA: bool>(s: &[f32], d: &mut [f32], cols: usize, scale: f32) {
    for (sr, dr) in s.chunks_exact(cols).zip(d.chunks_exact_mut(cols)) {
        softmax_row::<FMA>(sr, dr, scale)
    }
}
row_kernels!(pub(super) softmax_rows => softmax_rows_plain, softmax_rows_fma);

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
}
