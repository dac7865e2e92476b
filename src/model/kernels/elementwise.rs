//! Softmax(scale·x), SiLU and GEGLU as single passes over rows, with exact backward passes.

use super::*;
use candle_core::{CustomOp1, Shape, D};

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
