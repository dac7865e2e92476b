//! Convolution as im2col + one matrix product per image (for tensors outside the graph).

use super::buffers::{contiguous_f32, output_buffer, with_f32};
use super::products::{gemm_rows, Accumulator};
use super::simd::{SendPtr, PARALLEL_MIN};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

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
        // every element is written below (data or padding zero), so no zeroing pass first
        let mut dst = output_buffer(b * c * k * k * plane);
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
                    if stride == 1 && (oh, ow) == (h, w) {
                        shifted_plane(x, row, h, w, i as isize - pad, j as isize - pad);
                        continue;
                    }
                    for oy in 0..oh {
                        let iy = (oy * stride) as isize + i as isize - pad;
                        let dst_row = &mut row[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= h as isize {
                            dst_row.fill(0.0);
                            continue;
                        }
                        let src_row = &x[iy as usize * w..(iy as usize + 1) * w];
                        if stride == 1 {
                            // ix = ox + j - pad: one contiguous run, zeros either side
                            let lo = ((pad - j as isize).max(0) as usize).min(ow);
                            let hi = ((w as isize + pad - j as isize).min(ow as isize)).max(lo as isize) as usize;
                            let from = (lo as isize + j as isize - pad) as usize;
                            dst_row[..lo].fill(0.0);
                            dst_row[lo..hi].copy_from_slice(&src_row[from..from + hi - lo]);
                            dst_row[hi..].fill(0.0);
                        } else {
                            for (ox, d) in dst_row.iter_mut().enumerate() {
                                let ix = (ox * stride) as isize + j as isize - pad;
                                *d = if ix >= 0 && ix < w as isize { src_row[ix as usize] } else { 0.0 };
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

/// One im2col row of a "same" convolution (stride 1, output size = input size): `dst[y, x] =
/// src[y + dy, x + dx]`, zero where that falls outside. In the flattened planes this is one
/// contiguous copy shifted by `dy * w + dx`, then the rows and columns that fell outside are
/// zeroed (the copy put the neighbouring row's pixels in those columns): one `memcpy` of the
/// plane instead of one per image row (a 16-pixel row is too short for `memcpy` to pay off).
fn shifted_plane(src: &[f32], dst: &mut [f32], h: usize, w: usize, dy: isize, dx: isize) {
    let plane = (h * w) as isize;
    let shift = dy * w as isize + dx;
    let (lo, hi) = ((-shift).clamp(0, plane), (plane - shift).clamp(0, plane));
    if lo < hi {
        dst[lo as usize..hi as usize].copy_from_slice(&src[(lo + shift) as usize..(hi + shift) as usize]);
    }
    // rows whose source row is outside the image (this also covers what the copy left out)
    let (y0, y1) = ((-dy).clamp(0, h as isize) as usize, (h as isize - dy).clamp(0, h as isize) as usize);
    dst[..y0 * w].fill(0.0);
    dst[y1.max(y0) * w..].fill(0.0);
    // columns whose source column is outside the image
    let (x0, x1) = ((-dx).clamp(0, w as isize) as usize, (w as isize - dx).clamp(0, w as isize) as usize);
    if x0 > 0 || x1 < w {
        for row in dst.chunks_exact_mut(w) {
            row[..x0].fill(0.0);
            row[x1.max(x0)..].fill(0.0);
        }
    }
}

/// 2-D convolution (square kernel, dilation 1, one group) of a tensor *outside* the autograd
/// graph, as im2col + one matrix product per image: candle's tiled convolution gathered
/// patches element by element. `x` [B, C, H, W] f32 on the CPU, `w` [O, C, k, k], optional
/// bias [O] (written first and accumulated into).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let (out, shape) = conv2d_vec(x, w, Accumulator { bias: b, residual: None }, padding, stride)?;
    Tensor::from_vec(out, shape, x.device())
}

/// [`conv2d`] with its output starting from `acc` (bias [O] or [B, O], residual
/// [B, O, OH, OW]), as a plain buffer and its shape.
pub fn conv2d_vec(x: &Tensor, w: &Tensor, acc: Accumulator, padding: usize, stride: usize) -> Result<(Vec<f32>, Shape)> {
    let (bs, cx, h, wd) = x.dims4()?;
    let (o, c, k, k2) = w.dims4()?;
    if k != k2 {
        candle_core::bail!("conv2d kernel: square kernels only, got {k}x{k2}");
    }
    if cx != c || h + 2 * padding < k || wd + 2 * padding < k || stride == 0 {
        candle_core::bail!("conv2d kernel: input {:?} does not fit weight {:?} (padding {padding}, stride {stride})", x.dims(), w.dims());
    }
    let op = Im2Col { k, padding, stride };
    let (oh, ow) = (op.out_size(h), op.out_size(wd));
    // a 1x1 convolution without padding or stride is already a product with the image itself
    let cols = if k == 1 && padding == 0 && stride == 1 { x.contiguous()? } else { x.contiguous()?.apply_op1_no_bwd(&op)? };
    let (kk, plane) = (c * k * k, oh * ow);
    let w = w.contiguous()?;
    let mut out = output_buffer(bs * o * plane);
    let accumulate = acc.write(&mut out, bs, o, plane)?;
    with_f32(&cols, |cs| {
        with_f32(&w, |ws| {
            for i in 0..bs {
                // SAFETY: w is [o, kk], image i's columns [kk, plane], its output [o, plane].
                unsafe {
                    gemm_rows(
                        o, plane, kk, out.as_mut_ptr().add(i * o * plane), accumulate,
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

    /// The im2col convolution against candle's, for the shapes the models use (3x3 with
    /// padding 1, stride 1 and 2, odd sizes; 1x1), a 5x5 without padding, padding wider than
    /// the kernel's reach and a padded, strided 1x1; "same" 5x5 convolutions (shifted-plane
    /// path) on wide, one-row, one-column and images smaller than the kernel.
    #[test]
    fn im2col_conv_matches_candle() -> Result<()> {
        use candle_core::Device;
        let dev = Device::Cpu;
        for (b, c, h, w, o, k, pad, stride) in
            [(2, 3, 8, 8, 4, 3, 1, 1), (2, 5, 9, 7, 6, 3, 1, 2), (1, 4, 16, 16, 8, 3, 1, 2), (3, 2, 11, 6, 5, 5, 0, 1), (8, 64, 16, 16, 32, 3, 1, 1), (4, 32, 15, 15, 24, 3, 1, 1),
             (2, 6, 5, 7, 3, 1, 0, 1), (2, 4, 6, 6, 3, 3, 2, 1), (2, 4, 7, 7, 3, 1, 1, 2),
             (2, 3, 7, 9, 4, 5, 2, 1), (1, 3, 1, 5, 2, 3, 1, 1), (1, 2, 3, 1, 2, 5, 2, 1), (2, 3, 2, 2, 2, 5, 2, 1)]
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
            // started from a per-image bias and a residual
            let image_bias = Tensor::randn(0f32, 1.0, (b, o), &dev)?;
            let residual = Tensor::randn(0f32, 1.0, want.dims(), &dev)?;
            let acc = Accumulator { bias: Some(&image_bias), residual: Some(&residual) };
            let (v, shape) = conv2d_vec(&x, &wt, acc, pad, stride)?;
            let got = Tensor::from_vec(v, shape, &dev)?;
            let want = (x.conv2d(&wt, pad, stride, 1, 1)?.broadcast_add(&image_bias.reshape((b, o, 1, 1))?)? + &residual)?;
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-5 * scale.max(1.0), "{:?} with accumulator: max error {err}", (b, c, h, w, o, k, pad, stride));
        }
        Ok(())
    }
}
