//! Softmax(scale·x), SiLU and GEGLU as single passes over rows, with exact backward passes;
//! group norm (+ SiLU) in one pass for tensors outside the graph.

use super::buffers::{contiguous_f32, output_buffer, with_f32};
use super::gradients::{GradOf, Gradient};
use super::simd::{erfc, exp, has_avx2_fma, madd, row_kernels, run_rows, softmax_rows_fma, softmax_rows_plain, SendPtr, PARALLEL_MIN};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[inline(always)]
fn silu_slice<const FMA: bool>(src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        *d = *s / (1.0 + exp::<FMA>(-*s));
    }
}

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
        // dL/dx = scale * y * (g - sum(g * y)), one pass
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &Gradient(GradOf::ScaledSoftmax(self.scale)))?))
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
        // d/dx x s(x) = s (1 + x (1 - s)), one pass
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &Gradient(GradOf::Silu))?))
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
        // y = h * gelu(g):  dh = grad * gelu(g),  dg = grad * h * (Phi(g) + g * phi(g)), one pass
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &Gradient(GradOf::Geglu))?))
    }
}

/// Group normalisation of [B, C, ...] (statistics over each group's C/G channels x spatial
/// positions, two passes for the variance) with the affine part `w`, `b` [C] and optionally
/// SiLU, written in one pass, for a tensor outside the autograd graph. Each (image, group) is
/// one work item on candle's pool.
pub fn group_norm(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (bs, c) = match dims[..] {
        [bs, c, ..] => (bs, c),
        _ => candle_core::bail!("group norm kernel: x {dims:?} has no channel dimension"),
    };
    if groups == 0 || c % groups != 0 || w.dims() != [c] || b.dims() != [c] {
        candle_core::bail!("group norm kernel: x {dims:?}, {groups} groups, weight {:?}, bias {:?}", w.dims(), b.dims());
    }
    let spatial: usize = dims[2..].iter().product();
    let cg = c / groups;
    let n = cg * spatial;
    let x = x.contiguous()?;
    let mut out = output_buffer(x.elem_count());
    let dst = SendPtr(out.as_mut_ptr());
    let fma = has_avx2_fma();
    with_f32(&x, |xs| {
        with_f32(&w.contiguous()?, |ws| {
            with_f32(&b.contiguous()?, |bsl| {
                let item = |it: usize| {
                    let dst = dst;
                    let g = it % groups;
                    let src = &xs[it * n..(it + 1) * n];
                    // SAFETY: item `it` writes only its own `n` elements.
                    let d = unsafe { std::slice::from_raw_parts_mut(dst.0.add(it * n), n) };
                    let mean = (lane_sum(src, |v| v) / n as f64) as f32;
                    let var = lane_sum(src, |v| (v - mean) * (v - mean)) / n as f64;
                    let rstd = (1.0 / (var + eps).sqrt()) as f32;
                    for k in 0..cg {
                        let ch = g * cg + k;
                        // (x - mean) * scale + b: no cancellation when the variance is tiny
                        let (scale, shift) = (rstd * ws[ch], bsl[ch]);
                        let (s, o) = (&src[k * spatial..(k + 1) * spatial], &mut d[k * spatial..(k + 1) * spatial]);
                        // SAFETY: the AVX2 build only runs where the CPU has AVX2 and FMA.
                        unsafe {
                            if fma {
                                affine_act_fma(s, o, mean, scale, shift, silu)
                            } else {
                                affine_act_plain(s, o, mean, scale, shift, silu)
                            }
                        }
                    }
                };
                let items = bs * groups;
                if x.elem_count() < PARALLEL_MIN {
                    (0..items).for_each(item);
                } else {
                    candle_core::utils::barrier_pool().execute_chunked(items, |r| r.for_each(item));
                }
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, dims, x.device())
}

/// `sum(f(v))` with 8 f32 lanes (vectorisable) added up in f64 at the end.
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x) as f64).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

#[inline(always)]
fn affine_act<const FMA: bool>(s: &[f32], d: &mut [f32], mean: f32, scale: f32, shift: f32, silu: bool) {
    if silu {
        for (x, y) in s.iter().zip(d.iter_mut()) {
            let z = madd::<FMA>(*x - mean, scale, shift);
            *y = z / (1.0 + exp::<FMA>(-z));
        }
    } else {
        for (x, y) in s.iter().zip(d.iter_mut()) {
            *y = madd::<FMA>(*x - mean, scale, shift);
        }
    }
}

unsafe fn affine_act_plain(s: &[f32], d: &mut [f32], mean: f32, scale: f32, shift: f32, silu: bool) {
    affine_act::<false>(s, d, mean, scale, shift, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn affine_act_fma(s: &[f32], d: &mut [f32], mean: f32, scale: f32, shift: f32, silu: bool) {
    affine_act::<true>(s, d, mean, scale, shift, silu)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn affine_act_fma(s: &[f32], d: &mut [f32], mean: f32, scale: f32, shift: f32, silu: bool) {
    affine_act::<false>(s, d, mean, scale, shift, silu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The fused group norm (+ SiLU) against the same computation in f64 through candle's ops.
    #[test]
    fn group_norm_matches_f64_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, groups) in [(vec![2usize, 6, 5, 3], 3), (vec![4, 64, 16, 16], 32), (vec![3, 8, 77], 2), (vec![1, 4], 4)] {
            let c = shape[1];
            let x = ((Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)? * 3.0)? + 1.5)?;
            let w = Tensor::randn(0f32, 1.0, c, &dev)?;
            let b = Tensor::randn(0f32, 1.0, c, &dev)?;
            let (x64, w64, b64) = (x.to_dtype(candle_core::DType::F64)?, w.to_dtype(candle_core::DType::F64)?, b.to_dtype(candle_core::DType::F64)?);
            let xg = x64.reshape((shape[0] * groups, ()))?;
            let xc = xg.broadcast_sub(&xg.mean_keepdim(D::Minus1)?)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let xn = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?.reshape(shape.as_slice())?;
            let mut bshape = vec![1, c];
            bshape.extend(std::iter::repeat_n(1, shape.len() - 2));
            let want = xn.broadcast_mul(&w64.reshape(bshape.as_slice())?)?.broadcast_add(&b64.reshape(bshape.as_slice())?)?;
            for silu in [false, true] {
                let want = if silu { (&want * candle_nn::ops::sigmoid(&want)?)? } else { want.clone() };
                let got = group_norm(&x, groups, &w, &b, 1e-5, silu)?.to_dtype(candle_core::DType::F64)?;
                let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-5, "{shape:?} groups {groups} silu {silu}: max error {err}");
            }
        }
        Ok(())
    }
}
