//! Matrix products as row blocks on candle's thread pool, and what their outputs start from
//! (a bias, a residual), written before the product accumulates into them.

use super::buffers::{output_buffer, with_f32};
use super::simd::SendPtr;
use candle_core::{Result, Shape, Tensor};

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

/// What a product's output starts from before the product is accumulated into it: a bias per
/// output channel ([O]) or per image and channel ([B, O], e.g. the bias plus a resnet's time
/// embedding), and a residual of the output's shape. Adding them this way costs no pass of
/// its own (the output is written once before the product anyway).
#[derive(Clone, Copy, Default)]
pub struct Accumulator<'a> {
    pub bias: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
}

impl Accumulator<'_> {
    /// Writes the start values into `out`, `images` blocks (images, or rows of a linear
    /// layer) of `channels` runs of `run` elements (one run per bias value); false when there
    /// is nothing to start from (the product then overwrites `out`).
    pub(super) fn write(&self, out: &mut [f32], images: usize, channels: usize, run: usize) -> Result<bool> {
        if out.len() != images * channels * run {
            candle_core::bail!("kernel: output of {} elements for {images} x {channels} x {run}", out.len());
        }
        if let Some(r) = self.residual {
            if r.elem_count() != out.len() {
                candle_core::bail!("kernel: residual {:?} for an output of {} elements", r.dims(), out.len());
            }
        }
        let per_image = match self.bias {
            Some(b) if b.dims() == [channels] => false,
            Some(b) if b.dims() == [images, channels] => true,
            Some(b) => candle_core::bail!("kernel: bias {:?} for {images} x {channels} outputs", b.dims()),
            None => false,
        };
        let fill = |bias: Option<&[f32]>, res: Option<&[f32]>, out: &mut [f32]| {
            let block = channels * run;
            for (i, ob) in out.chunks_exact_mut(block).enumerate() {
                let b = bias.map(|b| if per_image { &b[i * channels..(i + 1) * channels] } else { b });
                let r = res.map(|r| &r[i * block..(i + 1) * block]);
                match (b, r, run) {
                    (Some(b), None, 1) => ob.copy_from_slice(b),
                    (None, Some(r), _) => ob.copy_from_slice(r),
                    (Some(b), Some(r), 1) => ob.iter_mut().zip(r).zip(b).for_each(|((o, r), b)| *o = r + b),
                    (Some(b), r, _) => {
                        for (c, o) in ob.chunks_exact_mut(run).enumerate() {
                            match r {
                                Some(r) => o.iter_mut().zip(&r[c * run..(c + 1) * run]).for_each(|(o, r)| *o = r + b[c]),
                                None => o.fill(b[c]),
                            }
                        }
                    }
                    (None, None, _) => {}
                }
            }
        };
        match (self.bias, self.residual) {
            (None, None) => return Ok(false),
            (Some(b), None) => with_f32(&b.contiguous()?, |b| Ok(fill(Some(b), None, out)))?,
            (None, Some(r)) => with_f32(&r.contiguous()?, |r| Ok(fill(None, Some(r), out)))?,
            (Some(b), Some(r)) => {
                with_f32(&b.contiguous()?, |b| with_f32(&r.contiguous()?, |r| Ok(fill(Some(b), Some(r), out))))?
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row-parallel products (linear with and without bias, matmul) against candle's.
    #[test]
    fn linear_and_matmul_match_candle() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        for (n, k, o) in [(3, 5, 7), (2048, 64, 320), (77, 128, 16), (1, 1, 1), (16, 300, 1000)] {
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
