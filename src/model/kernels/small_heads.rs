//! Attention for small heads (head dims of at most 16, as the toy model's 8) with the scores,
//! their softmax and the values product in AVX-512 registers, one query row at a time.
//!
//! With d = 8 the generic block path ([`super::attention`]) spends its time around the
//! arithmetic, not in it: the scores product has an inner dimension of 8, so gemm loads and
//! stores every score of the 64 x M block for 8 multiply-adds; the values product has 8 output
//! columns, which gemm runs at half width (`x1x6`); and the exponentials pass reads and writes
//! the block once more. Here each work item (one image, one head, up to [`BLOCK`] queries)
//! packs the head's keys and values transposed, k^T [D, M'] and v^T [DV, M'] (M' = M rounded
//! up to 16, zero past M and past d / dv), and for each query row: 16 scores at a time as D
//! multiply-adds of a broadcast (scaled) query element with a row of k^T, kept in an M'-long
//! row with their running maximum; then per 16 keys their exponentials (keys past M masked to
//! 0), the sum, and DV multiply-adds into 16-lane accumulators, each summed across its lanes
//! at the end and divided by the sum.
//!
//! Written with `std::arch` intrinsics: the same loops left to the autovectoriser came out
//! partly scalar and made the toy UNet forward 2x slower than the gemm path.

/// Query rows per work item: the packed keys and values are reused across them.
pub(super) const BLOCK: usize = 256;

/// The largest head dimension (of keys and of values) this path takes.
pub(super) const MAX_HEAD: usize = 16;

/// One (image, head, query block) of attention: `rows` query rows of `d` values from `q`
/// (rows `q_rs` apart), the head's `m` keys (`d` values, rows `k_rs` apart) and values (`dv`,
/// rows `v_rs` apart); writes `rows` output rows of `dv` values to `out` (rows `out_rs` apart).
#[derive(Clone, Copy)]
pub(super) struct HeadBlock {
    pub q: *const f32,
    pub q_rs: usize,
    pub k: *const f32,
    pub k_rs: usize,
    pub v: *const f32,
    pub v_rs: usize,
    pub out: *mut f32,
    pub out_rs: usize,
    pub rows: usize,
    pub m: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f32,
}

/// Whether this CPU runs [`run`] (AVX-512F).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Computes `blk` (d and dv at most [`MAX_HEAD`], m > 0).
///
/// # Safety
/// The pointers of `blk` must cover the matrices it describes, and [`available`] must hold.
pub(super) unsafe fn run(blk: &HeadBlock) {
    assert!(blk.d <= MAX_HEAD && blk.dv <= MAX_HEAD && blk.m > 0, "small-head attention: d {} dv {} m {}", blk.d, blk.dv, blk.m);
    #[cfg(target_arch = "x86_64")]
    match (blk.d <= 8, blk.dv <= 8) {
        (true, true) => avx512::rows::<8, 8>(blk),
        (true, false) => avx512::rows::<8, 16>(blk),
        (false, true) => avx512::rows::<16, 8>(blk),
        (false, false) => avx512::rows::<16, 16>(blk),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("small-head attention needs AVX-512 (available() is false here)")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::simd::{EXP_LN2_HI, EXP_LN2_LO, EXP_POLY};
    use super::HeadBlock;
    use std::arch::x86_64::*;

    /// Lanes of one vector of scores.
    const LANES: usize = 16;

    /// [`super::run`] with the key and value head dims padded to `D` and `DV`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows<const D: usize, const DV: usize>(blk: &HeadBlock) {
        let HeadBlock { q, q_rs, k, k_rs, v, v_rs, out, out_rs, rows, m, d, dv, scale } = *blk;
        let chunks = m.div_ceil(LANES);
        let mp = chunks * LANES;
        // k^T, v^T and one row of scores; one allocation per block of up to BLOCK queries
        let mut scratch = vec![0f32; (D + DV + 1) * mp];
        let base = scratch.as_mut_ptr();
        let (kt, vt, sc) = (base, base.add(D * mp), base.add((D + DV) * mp));
        // k^T and v^T, zero past d / dv and past m
        for j in 0..m {
            for t in 0..d {
                *kt.add(t * mp + j) = *k.add(j * k_rs + t);
            }
            for t in 0..dv {
                *vt.add(t * mp + j) = *v.add(j * v_rs + t);
            }
        }
        // the keys of the last chunk that exist
        let tail: __mmask16 = if m % LANES == 0 { 0xffff } else { (1u16 << (m % LANES)) - 1 };
        let last = chunks - 1;
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        for r in 0..rows {
            let qr = q.add(r * q_rs);
            // the scaled query row, broadcast from memory inside the loop (as registers, with
            // the DV accumulators, 16 + 16 of them would not fit in 32)
            let mut qs = [0f32; D];
            for (t, x) in qs.iter_mut().enumerate().take(d) {
                *x = *qr.add(t) * scale;
            }
            // scores and their running maximum
            let mut mx = neg_inf;
            for c in 0..chunks {
                let mut s = _mm512_setzero_ps();
                for (t, &qt) in qs.iter().enumerate() {
                    s = _mm512_fmadd_ps(_mm512_set1_ps(qt), _mm512_loadu_ps(kt.add(t * mp + c * LANES)), s);
                }
                if c == last {
                    s = _mm512_mask_mov_ps(neg_inf, tail, s);
                }
                _mm512_storeu_ps(sc.add(c * LANES), s);
                mx = _mm512_max_ps(mx, s);
            }
            let shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            // exponentials, their sum, and the values product
            let mut sum = _mm512_setzero_ps();
            let mut acc = [_mm512_setzero_ps(); DV];
            for c in 0..chunks {
                let mut p = exp(_mm512_sub_ps(_mm512_loadu_ps(sc.add(c * LANES)), shift));
                if c == last {
                    p = _mm512_maskz_mov_ps(tail, p);
                }
                sum = _mm512_add_ps(sum, p);
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt.add(t * mp + c * LANES)), *a);
                }
            }
            let inv = 1.0 / _mm512_reduce_add_ps(sum);
            let o = out.add(r * out_rs);
            for (t, a) in acc.iter().enumerate().take(dv) {
                *o.add(t) = _mm512_reduce_add_ps(*a) * inv;
            }
        }
    }

    /// `exp(x)` on 16 lanes for x <= 0 (scores minus their maximum): the range reduction and
    /// polynomial of [`super::super::simd::exp`] (Cephes, the same constants), with the power of two applied by
    /// `vscalefps`, which needs no clamping (below -103 it gives 0). A lane of -inf gives NaN;
    /// the caller masks those lanes (keys past M).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_LN2_LO), _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_LN2_HI), x));
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(e, n)
    }
}
