//! Layer normalisation over the last dimension with its (frozen) affine part, forward and
//! backward each in one pass over rows. candle's own path was a fused normalisation, then a
//! multiply and an add for the affine part, and a backward of about a dozen ops, each a pass
//! and an allocation; the backward is also the one of `ops::normalize_last_dim` (group norm
//! on the training path), with no affine part.

use super::buffers::{contiguous_f32, output_buffer, with_f32};
use super::simd::{for_dst_rows, has_avx2_fma, madd};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Mean and 1/sigma of a row (two passes: the variance of the centred values), 8 lanes.
#[inline(always)]
fn row_stats<const FMA: bool>(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let n8 = x.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for c in x[..n8].chunks_exact(8) {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mu = (acc.iter().sum::<f32>() + x[n8..].iter().sum::<f32>()) / n;
    let mut acc = [0f32; 8];
    for c in x[..n8].chunks_exact(8) {
        for i in 0..8 {
            acc[i] = madd::<FMA>(c[i] - mu, c[i] - mu, acc[i]);
        }
    }
    let var = (acc.iter().sum::<f32>() + x[n8..].iter().map(|&v| (v - mu) * (v - mu)).sum::<f32>()) / n;
    (mu, 1.0 / (var + eps).sqrt())
}

/// Parameters of the row kernels: the affine weight and bias (`None`: 1 and 0) and eps.
#[derive(Clone, Copy)]
struct Params<'a> {
    w: Option<&'a [f32]>,
    b: Option<&'a [f32]>,
    eps: f32,
}

/// `y = (x - mu) / sigma * w + b`, row by row.
#[inline(always)]
fn forward_rows<const FMA: bool>(x: &[f32], y: &mut [f32], cols: usize, p: Params) {
    for (xr, yr) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
        let (mu, inv) = row_stats::<FMA>(xr, p.eps);
        match (p.w, p.b) {
            (Some(w), Some(b)) => {
                for i in 0..cols {
                    yr[i] = madd::<FMA>((xr[i] - mu) * inv, w[i], b[i]);
                }
            }
            _ => {
                for i in 0..cols {
                    yr[i] = (xr[i] - mu) * inv;
                }
            }
        }
    }
}

/// With `xn = (x - mu) / sigma` and `gw = g * w`:
/// `dx = (gw - mean(gw) - xn * mean(gw * xn)) / sigma`, row by row.
#[inline(always)]
fn backward_rows<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [f32], cols: usize, p: Params) {
    let n = cols as f32;
    for ((xr, gr), dr) in x.chunks_exact(cols).zip(g.chunks_exact(cols)).zip(dx.chunks_exact_mut(cols)) {
        let (mu, inv) = row_stats::<FMA>(xr, p.eps);
        // dr holds gw first
        match p.w {
            Some(w) => {
                for i in 0..cols {
                    dr[i] = gr[i] * w[i];
                }
            }
            None => dr.copy_from_slice(gr),
        }
        let (mut s_g, mut s_gx) = ([0f32; 8], [0f32; 8]);
        let n8 = cols / 8 * 8;
        for (dc, xc) in dr[..n8].chunks_exact(8).zip(xr[..n8].chunks_exact(8)) {
            for i in 0..8 {
                s_g[i] += dc[i];
                s_gx[i] = madd::<FMA>(dc[i], (xc[i] - mu) * inv, s_gx[i]);
            }
        }
        let (mut sg, mut sgx): (f32, f32) = (s_g.iter().sum(), s_gx.iter().sum());
        for i in n8..cols {
            sg += dr[i];
            sgx = madd::<FMA>(dr[i], (xr[i] - mu) * inv, sgx);
        }
        let (mg, mgx) = (sg / n, sgx / n);
        for i in 0..cols {
            let xn = (xr[i] - mu) * inv;
            dr[i] = (dr[i] - mg - xn * mgx) * inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_rows_fma(x: &[f32], y: &mut [f32], cols: usize, p: Params) {
    forward_rows::<true>(x, y, cols, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_rows_fma(x: &[f32], g: &[f32], dx: &mut [f32], cols: usize, p: Params) {
    backward_rows::<true>(x, g, dx, cols, p)
}

fn forward(x: &[f32], cols: usize, p: Params) -> Vec<f32> {
    let mut y = output_buffer(x.len());
    let fma = has_avx2_fma();
    for_dst_rows(x.len() / cols, cols, &mut y, |r0, n, ys| {
        let xs = &x[r0 * cols..(r0 + n) * cols];
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: only where the CPU has AVX2 and FMA.
            return unsafe { forward_rows_fma(xs, ys, cols, p) };
        }
        let _ = fma;
        forward_rows::<false>(xs, ys, cols, p)
    });
    y
}

/// Writes into `dx` the input gradient of layer norm with the frozen weight `w` (`None`:
/// plain normalisation), for rows of `cols` of the input `x` and the output gradient `g`.
fn input_grad(x: &[f32], g: &[f32], dx: &mut [f32], cols: usize, w: Option<&[f32]>, eps: f32) {
    let p = Params { w, b: None, eps };
    let fma = has_avx2_fma();
    for_dst_rows(x.len() / cols, cols, dx, |r0, n, ds| {
        let (xs, gs) = (&x[r0 * cols..(r0 + n) * cols], &g[r0 * cols..(r0 + n) * cols]);
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: as in `forward`.
            return unsafe { backward_rows_fma(xs, gs, ds, cols, p) };
        }
        let _ = fma;
        backward_rows::<false>(xs, gs, ds, cols, p)
    });
}

/// Layer norm over the last dimension with a frozen affine part `w`, `b` [D] (`None`: plain
/// normalisation). The backward gives the input its gradient; `w` and `b` get none.
pub struct LayerNorm {
    pub affine: Option<(Tensor, Tensor)>,
    pub eps: f32,
}

impl LayerNorm {
    fn with_params<R>(&self, f: impl FnOnce(Params) -> Result<R>) -> Result<R> {
        match &self.affine {
            None => f(Params { w: None, b: None, eps: self.eps }),
            Some((w, b)) => with_f32(w, |w| with_f32(b, |b| f(Params { w: Some(w), b: Some(b), eps: self.eps }))),
        }
    }

    fn cols(&self, l: &Layout) -> Result<usize> {
        let cols = l.shape().dims().last().copied().unwrap_or(0);
        if cols == 0 {
            candle_core::bail!("layer norm kernel: empty last dimension in {:?}", l.shape());
        }
        if let Some((w, b)) = &self.affine {
            if w.dims() != [cols] || b.dims() != [cols] {
                candle_core::bail!("layer norm kernel: weight {:?} / bias {:?} for rows of {cols}", w.dims(), b.dims());
            }
        }
        Ok(cols)
    }
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "layer norm")?;
        let cols = self.cols(l)?;
        let y = self.with_params(|p| Ok(forward(x, cols, p)))?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = InputGrad { weight: self.affine.as_ref().map(|(w, _)| w.clone()), eps: self.eps };
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// The input gradient of [`LayerNorm`]: `x.apply_op2_no_bwd(grad, &InputGrad { .. })` with
/// the forward's input `x` and the output gradient, in one pass over rows.
struct InputGrad {
    /// The frozen weight [D] (`None`: plain normalisation).
    weight: Option<Tensor>,
    eps: f32,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "layer-norm-gradient"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm gradient")?;
        let g = contiguous_f32(s2, l2, "layer norm gradient")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("layer norm gradient: input {:?} and gradient {:?} do not match", l1.shape(), l2.shape());
        }
        let cols = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dx = output_buffer(x.len());
        if x.is_empty() {
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        match &self.weight {
            None => input_grad(x, g, &mut dx, cols, None, self.eps),
            Some(w) => {
                if w.dims() != [cols] {
                    candle_core::bail!("layer norm gradient: weight {:?} for rows of {cols}", w.dims());
                }
                with_f32(w, |w| Ok(input_grad(x, g, &mut dx, cols, Some(w), self.eps)))?
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
