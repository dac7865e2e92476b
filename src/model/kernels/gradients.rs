//! The backward passes of the element-wise kernels (`elementwise`) as single passes: each
//! was 4-11 candle ops (a pass and an allocation each; GEGLU's with scalar libm `erf`/`exp`),
//! together about a tenth of a training step (layer norm's, the rest of it, is in
//! `layer_norm`). Each takes the forward's input (or output) and the incoming gradient, row by
//! row, and writes the input gradient.

use super::buffers::{contiguous_f32, output_buffer};
use super::simd::{erfc, exp, madd, row_kernels2, run_rows2};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};

/// Softmax: rows of the output `y` and the gradient `g` -> `scale * y * (g - sum(g * y))`.
#[inline(always)]
fn softmax_grad_rows<const FMA: bool>(y: &[f32], g: &[f32], d: &mut [f32], cols: usize, scale: f32) {
    for ((yr, gr), dr) in y.chunks_exact(cols).zip(g.chunks_exact(cols)).zip(d.chunks_exact_mut(cols)) {
        let mut acc = [0f32; 8];
        let n8 = cols / 8 * 8;
        for (yc, gc) in yr[..n8].chunks_exact(8).zip(gr[..n8].chunks_exact(8)) {
            for i in 0..8 {
                acc[i] = madd::<FMA>(yc[i], gc[i], acc[i]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for i in n8..cols {
            s = madd::<FMA>(yr[i], gr[i], s);
        }
        for i in 0..cols {
            dr[i] = scale * yr[i] * (gr[i] - s);
        }
    }
}
row_kernels2!(softmax_grad_rows => softmax_grad_rows_plain, softmax_grad_rows_fma);

/// The softmax gradient `scale * y * (g - sum(g * y))` over rows of `cols` (for the attention
/// probe's op), on candle's pool when large.
pub(super) fn softmax_grad_rows_dispatch(y: &[f32], g: &[f32], dst: &mut [f32], cols: usize, scale: f32) {
    run_rows2(y, g, dst, cols, scale, softmax_grad_rows_fma, softmax_grad_rows_plain)
}

/// SiLU: `g * s * (1 + x * (1 - s))` with `s = sigmoid(x)`.
#[inline(always)]
fn silu_grad_rows<const FMA: bool>(x: &[f32], g: &[f32], d: &mut [f32], _cols: usize, _: f32) {
    for ((x, g), d) in x.iter().zip(g).zip(d.iter_mut()) {
        let s = 1.0 / (1.0 + exp::<FMA>(-*x));
        *d = *g * s * madd::<FMA>(*x, 1.0 - s, 1.0);
    }
}
row_kernels2!(silu_grad_rows => silu_grad_rows_plain, silu_grad_rows_fma);

/// GEGLU, `y = h * gelu(g)`: rows `[h, g]` of `cols` and gradient rows of `cols / 2` ->
/// `[dy * gelu(g), dy * h * (Phi(g) + g * phi(g))]`.
#[inline(always)]
fn geglu_grad_rows<const FMA: bool>(x: &[f32], dy: &[f32], d: &mut [f32], cols: usize, _: f32) {
    let half = cols / 2;
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f32::consts::PI).sqrt();
    for ((xr, gr), dr) in x.chunks_exact(cols).zip(dy.chunks_exact(half)).zip(d.chunks_exact_mut(cols)) {
        let (h, g) = xr.split_at(half);
        let (dh, dg) = dr.split_at_mut(half);
        for i in 0..half {
            let cdf = 0.5 * erfc::<FMA>(-g[i] * std::f32::consts::FRAC_1_SQRT_2);
            let pdf = inv_sqrt_2pi * exp::<FMA>(-0.5 * g[i] * g[i]);
            dh[i] = gr[i] * g[i] * cdf;
            dg[i] = gr[i] * h[i] * madd::<FMA>(g[i], pdf, cdf);
        }
    }
}
row_kernels2!(geglu_grad_rows => geglu_grad_rows_plain, geglu_grad_rows_fma);

/// Which backward pass a [`Gradient`] computes.
#[derive(Clone, Copy)]
pub enum GradOf {
    /// First operand: softmax's output; parameter: the scale.
    ScaledSoftmax(f32),
    /// First operand: SiLU's input.
    Silu,
    /// First operand: GEGLU's input `[h, g]`.
    Geglu,
}

/// The input gradient of an element-wise kernel: `first.apply_op2_no_bwd(grad, &Gradient(..))`.
pub struct Gradient(pub GradOf);

impl CustomOp2 for Gradient {
    fn name(&self) -> &'static str {
        "elementwise-gradient"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, "gradient")?;
        let g = contiguous_f32(s2, l2, "gradient")?;
        let dims = l1.shape().dims();
        let cols = dims.last().copied().unwrap_or(1).max(1);
        let grad_cols = if matches!(self.0, GradOf::Geglu) { cols / 2 } else { cols };
        let want: Vec<usize> = dims[..dims.len().saturating_sub(1)].iter().copied().chain([grad_cols]).collect();
        if l2.shape().dims() != want.as_slice() || (matches!(self.0, GradOf::Geglu) && cols % 2 != 0) {
            candle_core::bail!("gradient kernel: input {dims:?} and gradient {:?} do not match", l2.shape().dims());
        }
        let mut dst = output_buffer(a.len());
        if a.is_empty() {
            return Ok((CpuStorage::F32(dst), l1.shape().clone()));
        }
        match &self.0 {
            GradOf::ScaledSoftmax(scale) => {
                run_rows2(a, g, &mut dst, cols, *scale, softmax_grad_rows_fma, softmax_grad_rows_plain)
            }
            GradOf::Silu => run_rows2(a, g, &mut dst, cols, 0.0, silu_grad_rows_fma, silu_grad_rows_plain),
            GradOf::Geglu => run_rows2(a, g, &mut dst, cols, 0.0, geglu_grad_rows_fma, geglu_grad_rows_plain),
        }
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}
