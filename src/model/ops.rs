//! Differentiable building-block ops.
//!
//! candle's fused softmax and layer norm record no backward (docs/candle.md §1, "Silent gradient
//! traps"): a model built on them trains, but W_K and new token embeddings silently get no
//! gradient. Here each op takes the fast fused path when its input is not part of an autograd
//! graph, and otherwise computes the fused result on a detached copy and re-attaches it to the
//! input through [`Attach`], a custom op whose backward is the exact analytic gradient.
//!
//! On the CPU in f32 the ops dispatch to the fused kernels of [`super::kernels`] (where
//! [`kernels_apply`] or [`fast_cpu`] says so); with the kernels switched off
//! (`DISENDIFF_KERNELS=off`) they take the generic candle path that f16, bf16 and CUDA take.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

type BwdFn = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// `Attach(x, y)` returns `y` in the forward pass; its backward gives `x` the gradient
/// `bwd(x, y, grad_y)` and `y` none.
struct Attach {
    name: &'static str,
    bwd: Box<BwdFn>,
}

pub(crate) fn copy_storage(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    macro_rules! slice {
        ($v:expr, $variant:ident) => {{
            match l.contiguous_offsets() {
                Some((a, b)) => CpuStorage::$variant($v[a..b].to_vec()),
                None => candle_core::bail!("attach: non-contiguous input"),
            }
        }};
    }
    Ok(match s {
        CpuStorage::F32(v) => slice!(v, F32),
        CpuStorage::F64(v) => slice!(v, F64),
        CpuStorage::F16(v) => slice!(v, F16),
        CpuStorage::BF16(v) => slice!(v, BF16),
        _ => candle_core::bail!("attach: unsupported dtype"),
    })
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((copy_storage(s2, l2)?, l2.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if !l2.is_contiguous() || l2.start_offset() != 0 {
            candle_core::bail!("attach: non-contiguous input")
        }
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.bwd)(x, y, g)?), None))
    }
}

fn attach(x: &Tensor, y: Tensor, name: &'static str, bwd: Box<BwdFn>) -> Result<Tensor> {
    x.apply_op2(&y.contiguous()?, Attach { name, bwd })
}

/// [`Attach`] for a result that is still a plain buffer: the forward moves the buffer into
/// the output instead of copying a tensor (one pass over every activation saved).
struct AttachVec {
    name: &'static str,
    data: std::sync::Mutex<Option<(Vec<f32>, Shape)>>,
    bwd: Box<BwdFn>,
}

impl CustomOp1 for AttachVec {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.data.lock().map_err(|_| candle_core::Error::Msg("attach: poisoned".into()))?.take() {
            Some((v, shape)) => Ok((CpuStorage::F32(v), shape)),
            None => candle_core::bail!("attach: forward ran twice"),
        }
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(x, y, g)?))
    }
}

fn attach_vec(x: &Tensor, (data, shape): (Vec<f32>, Shape), name: &'static str, bwd: Box<BwdFn>) -> Result<Tensor> {
    x.apply_op1(AttachVec { name, data: std::sync::Mutex::new(Some((data, shape))), bwd })
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(&x);
    }
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    attach(
        &x,
        y,
        "softmax-attach",
        Box::new(|_x, y, g| {
            // dL/dx = y * (g - sum(g * y))
            let s = (g * y)?.sum_keepdim(D::Minus1)?;
            y * g.broadcast_sub(&s)?
        }),
    )
}

/// `softmax(scale * x)` over the last dimension, differentiable; the fused f32 CPU kernel of
/// [`super::kernels`] where it applies.
pub fn softmax_last_dim_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    if kernels_apply(&[x]) {
        return x.contiguous()?.apply_op1(super::kernels::ScaledSoftmax { scale: scale as f32 });
    }
    softmax_last_dim(&(x * scale)?)
}

/// `x * sigmoid(x)`, differentiable; the fused f32 CPU kernel of [`super::kernels`] where it
/// applies.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if kernels_apply(&[x]) {
        return x.contiguous()?.apply_op1(super::kernels::Silu);
    }
    x.silu()
}

/// Multi-head `softmax(scale q k^T) v` for [B, N, H*d] / [B, M, H*d] / [B, M, H*dv] tensors
/// (heads interleaved in the channels, as the projections write them), returning [B, N, H*dv],
/// through the fused kernels of [`super::kernels`] for f32 on the CPU: a plain kernel call
/// outside the autograd graph, the differentiable [`FusedAttention`](super::kernels::FusedAttention)
/// op inside it (exact gradients for q, k and v, probabilities recomputed block by block).
/// `None` when it does not apply and the caller must take the explicit path.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    if fast_cpu(&[q, k, v]) {
        return Ok(Some(super::kernels::attention(q, k, v, heads, scale)?));
    }
    if attention_kernels_apply(&[q, k, v]) {
        let op = super::kernels::FusedAttention { heads, scale: scale as f32 };
        return Ok(Some(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?));
    }
    Ok(None)
}

/// Whether the attention kernels apply: see [`kernels_apply`].
pub fn attention_kernels_apply(ts: &[&Tensor]) -> bool {
    kernels_apply(ts)
}

/// The attention probabilities of every head, [B, H, N, M], from q [B, N, H*d] and k
/// [B, M, H*d] (heads interleaved), one differentiable op; with [`attention_apply`], the
/// attention probe's path (needs [`attention_kernels_apply`]).
pub fn attention_probs(q: &Tensor, k: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let op = super::kernels::AttentionProbs { heads, scale: scale as f32 };
    q.contiguous()?.apply_op2(&k.contiguous()?, op)
}

/// `P_h v_h` per head, heads merged: P [B, H, N, M] and v [B, M, H*dv] give [B, N, H*dv], one
/// differentiable op (needs [`attention_kernels_apply`]).
pub fn attention_apply(p: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    p.contiguous()?.apply_op2(&v.contiguous()?, super::kernels::AttentionApply { heads })
}

/// GEGLU: the last dimension split as `[h, g]` -> `h * gelu_erf(g)`, differentiable; the
/// fused f32 CPU kernel of [`super::kernels`] where it applies.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if kernels_apply(&[x]) {
        return x.contiguous()?.apply_op1(super::kernels::Geglu);
    }
    let half = x.dim(D::Minus1)? / 2;
    x.narrow(D::Minus1, 0, half)? * x.narrow(D::Minus1, half, half)?.gelu_erf()?
}

/// Normalises the last dimension to zero mean and unit variance (no affine), differentiable.
pub fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    if kernels_apply(&[&x]) {
        return x.apply_op1(super::kernels::LayerNorm { affine: None, eps: eps as f32 });
    }
    let dim = x.dim(D::Minus1)?;
    let internal = match x.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let fused = |x: &Tensor| -> Result<Tensor> {
        if x.dtype() == DType::F64 {
            // candle's fused kernel has no f64 version; compute it plainly.
            let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            return xc.broadcast_div(&(var + eps)?.sqrt()?);
        }
        let ones = Tensor::ones(dim, internal, x.device())?;
        let zeros = Tensor::zeros(dim, internal, x.device())?;
        candle_nn::ops::layer_norm(&x.to_dtype(internal)?, &ones, &zeros, eps as f32)?.to_dtype(x.dtype())
    };
    if !x.track_op() {
        return fused(&x);
    }
    let y = fused(&x.detach())?;
    attach(
        &x,
        y,
        "layer-norm-attach",
        Box::new(move |x, y, g| {
            // y = (x - mu) / sigma;  dL/dx = (g - mean(g) - y * mean(g * y)) / sigma
            let mu = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mu)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let inv_sigma = (var + eps)?.sqrt()?.recip()?;
            let gm = g.mean_keepdim(D::Minus1)?;
            let gym = (g * y)?.mean_keepdim(D::Minus1)?;
            let inner = g.broadcast_sub(&gm)?.sub(&y.broadcast_mul(&gym)?)?;
            inner.broadcast_mul(&inv_sigma)
        }),
    )
}

/// `x W^T (+ b)` for x [N, in] and a weight [out, in]. When the weight is frozen (not part of
/// the autograd graph) only `x` gets a gradient: candle's matmul backward would also compute a
/// weight-sized gradient (2x the forward FLOPs) for every frozen weight.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let plain = |x: &Tensor| -> Result<Tensor> {
        if fast_cpu(&[x, w]) && b.is_none_or(|b| fast_cpu(&[b])) {
            return super::kernels::linear(x, w, b);
        }
        let y = x.matmul(&w.t()?)?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    };
    if !x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op()) {
        return plain(x);
    }
    let xd = x.detach();
    let bwd: Box<BwdFn> = {
        let w = w.clone();
        Box::new(move |_x, _y, g| if fast_cpu(&[g, &w]) { super::kernels::matmul(g, &w) } else { g.matmul(&w) })
    };
    if fast_cpu(&[&xd, w]) && b.is_none_or(|b| fast_cpu(&[b])) {
        return attach_vec(x, super::kernels::linear_vec(&xd, w, super::kernels::Accumulator { bias: b, residual: None })?, "linear-frozen-weight", bwd);
    }
    attach(x, plain(&xd)?, "linear-frozen-weight", bwd)
}

/// 2-D convolution; with a frozen weight only the input gets a gradient (see [`linear`]). The
/// input gradient is a convolution with the flipped, transposed kernel for stride 1 (about
/// 2.7x faster than candle's transposed convolution on the CPU), a transposed convolution
/// otherwise.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Tensor> {
    let plain = |x: &Tensor| -> Result<Tensor> {
        if let Some(y) = conv_untracked(x, w, b, padding, stride)? {
            return Ok(y);
        }
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    };
    if !x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op()) {
        return plain(x);
    }
    let xd = x.detach();
    let bwd: Box<BwdFn> = {
        let w = w.clone();
        Box::new(move |x, _y, g| {
            let (_, _, h, wd) = x.dims4()?;
            let k = w.dim(2)?;
            if stride == 1 && k > padding {
                let rev: Vec<u32> = (0..k as u32).rev().collect();
                let rev = Tensor::new(rev, w.device())?;
                let wf = w.index_select(&rev, 2)?.index_select(&rev, 3)?.transpose(0, 1)?.contiguous()?;
                match conv_untracked(g, &wf, None, k - 1 - padding, 1)? {
                    Some(gx) => Ok(gx),
                    None => g.conv2d(&wf, k - 1 - padding, 1, 1, 1),
                }
            } else {
                let (gh, gw) = (g.dim(2)?, g.dim(3)?);
                let op_h = h as isize - (((gh - 1) * stride + k) as isize - 2 * padding as isize);
                let op_w = wd as isize - (((gw - 1) * stride + k) as isize - 2 * padding as isize);
                if op_h != op_w || op_h < 0 {
                    candle_core::bail!("conv2d backward: unsupported output padding {op_h}x{op_w}");
                }
                g.conv_transpose2d(&w, padding, op_h as usize, stride, 1)
            }
        })
    };
    if im2col_applies(&xd, w, b)? {
        return attach_vec(x, super::kernels::conv2d_vec(&xd, w, super::kernels::Accumulator { bias: b, residual: None }, padding, stride)?, "conv2d-frozen-weight", bwd);
    }
    attach(x, plain(&xd)?, "conv2d-frozen-weight", bwd)
}

/// `x W^T + b + residual` for x [N, in] outside the autograd graph, the residual (and bias)
/// written as the product's starting value; `None` when the kernels do not apply.
pub fn linear_residual_untracked(x: &Tensor, w: &Tensor, b: Option<&Tensor>, residual: &Tensor) -> Result<Option<Tensor>> {
    if !fast_cpu(&[x, w, residual]) || !b.is_none_or(|b| fast_cpu(&[b])) {
        return Ok(None);
    }
    let (v, shape) = super::kernels::linear_vec(x, w, super::kernels::Accumulator { bias: b, residual: Some(residual) })?;
    Ok(Some(Tensor::from_vec(v, shape, x.device())?))
}

/// `conv2d(x) + b + image_bias[:, :, None, None] + residual` outside the autograd graph, the
/// sums written as the product's starting value (`image_bias` [B, O], e.g. a resnet's time
/// embedding; `residual` the output's shape); `None` when the kernels do not apply.
pub fn conv2d_accumulate_untracked(
    x: &Tensor, w: &Tensor, b: Option<&Tensor>, image_bias: Option<&Tensor>, residual: Option<&Tensor>, padding: usize,
    stride: usize,
) -> Result<Option<Tensor>> {
    let extra: Vec<&Tensor> = image_bias.into_iter().chain(residual).collect();
    if !im2col_applies(x, w, b)? || !fast_cpu(&extra) {
        return Ok(None);
    }
    let bias = match (b, image_bias) {
        (Some(b), Some(t)) => Some(t.broadcast_add(b)?),
        (None, Some(t)) => Some(t.clone()),
        (b, None) => b.cloned(),
    };
    let acc = super::kernels::Accumulator { bias: bias.as_ref(), residual };
    let (v, shape) = super::kernels::conv2d_vec(x, w, acc, padding, stride)?;
    Ok(Some(Tensor::from_vec(v, shape, x.device())?))
}

/// Whether the differentiable fused kernels of [`super::kernels`] apply: the kernels are on
/// ([`super::kernels::enabled`], `DISENDIFF_KERNELS`) and every tensor is f32 on the CPU
/// (inside the autograd graph or not). Every kernel dispatch of the model goes through this
/// or [`fast_cpu`].
pub(crate) fn kernels_apply(ts: &[&Tensor]) -> bool {
    super::kernels::enabled() && ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// Whether the kernels of [`super::kernels`] for tensors outside the autograd graph apply:
/// [`kernels_apply`], and no tensor tracked.
pub(crate) fn fast_cpu(ts: &[&Tensor]) -> bool {
    kernels_apply(ts) && ts.iter().all(|t| !t.track_op())
}

/// Whether the im2col convolution kernel applies: [`fast_cpu`] operands and a square kernel
/// (1x1 included: candle's 1x1 path gathers its input element by element).
fn im2col_applies(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<bool> {
    let square = w.rank() == 4 && w.dim(2)? == w.dim(3)?;
    Ok(square && fast_cpu(&[x, w]) && b.is_none_or(|b| fast_cpu(&[b])))
}

/// `x.conv2d(w) + b` through the im2col kernel of [`super::kernels`] when it applies, `None`
/// otherwise.
fn conv_untracked(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize, stride: usize) -> Result<Option<Tensor>> {
    if im2col_applies(x, w, b)? {
        return Ok(Some(super::kernels::conv2d(x, w, b, padding, stride)?));
    }
    Ok(None)
}

/// Layer norm of the last dimension with the affine part `w`, `b` [D], differentiable in `x`
/// (and in `w`, `b` when they are trainable): the one-pass kernel of [`super::kernels`] for
/// f32 CPU tensors with a frozen affine part, [`normalize_last_dim`] + [`affine`] otherwise.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels_apply(&[x]) && fast_cpu(&[w, b]) {
        let op = super::kernels::LayerNorm { affine: Some((w.contiguous()?, b.contiguous()?)), eps: eps as f32 };
        return x.contiguous()?.apply_op1(op);
    }
    let dtype = x.dtype();
    let xn = normalize_last_dim(&x.to_dtype(DType::F32)?, eps)?.to_dtype(dtype)?;
    affine(&xn, w, b, &[w.dim(0)?])
}

/// `xn * w + b` with w, b broadcast from `shape` (a norm's affine part). With frozen w and b
/// only `xn` gets a gradient.
pub fn affine(xn: &Tensor, w: &Tensor, b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let (w, b) = (w.reshape(shape)?, b.reshape(shape)?);
    let plain = |x: &Tensor| x.broadcast_mul(&w)?.broadcast_add(&b);
    if !xn.track_op() || w.track_op() || b.track_op() {
        return plain(xn);
    }
    let y = plain(&xn.detach())?;
    attach(xn, y, "affine-frozen", Box::new(move |_x, _y, g| g.broadcast_mul(&w)))
}

/// `x * sigmoid(1.702 x)`, CLIP's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = (x * -1.702)?.exp()?.affine(1.0, 1.0)?.recip()?;
    x * s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradient of sum(w * op(x)) checked against central finite differences, in f64.
    fn check_grad(op: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1.0, (3, 7), &dev)?;
        let w = Tensor::randn(0f64, 1.0, (3, 7), &dev)?;
        let x = Var::from_tensor(&x0)?;
        let loss = (op(x.as_tensor())? * &w)?.sum_all()?;
        let grads = loss.backward()?;
        let g = grads.get(x.as_tensor()).expect("no gradient").to_vec2::<f64>()?;
        let h = 1e-6;
        let xv = x0.to_vec2::<f64>()?;
        for i in 0..3 {
            for j in 0..7 {
                let mut p = xv.clone();
                p[i][j] += h;
                let mut m = xv.clone();
                m[i][j] -= h;
                let f = |v: Vec<Vec<f64>>| -> Result<f64> {
                    (op(&Tensor::new(v, &dev)?)? * &w)?.sum_all()?.to_scalar::<f64>()
                };
                let fd = (f(p)? - f(m)?) / (2.0 * h);
                assert!((fd - g[i][j]).abs() < 1e-6, "grad mismatch at {i},{j}: fd {fd} vs {}", g[i][j]);
            }
        }
        Ok(())
    }

    #[test]
    fn softmax_backward_matches_finite_differences() -> Result<()> {
        check_grad(softmax_last_dim)
    }

    #[test]
    fn normalize_backward_matches_finite_differences() -> Result<()> {
        check_grad(|x| normalize_last_dim(x, 1e-5))
    }

    /// The frozen-weight ops give the input the same gradient as candle's own ops, and the
    /// weight none.
    #[test]
    fn frozen_weight_ops_match_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        let cases: Vec<(Vec<usize>, Box<dyn Fn(&Tensor, &Tensor, bool) -> Result<Tensor>>)> = vec![
            (vec![2, 3, 8, 8], Box::new(|x, w, frozen| if frozen { conv2d(x, w, None, 1, 1) } else { x.conv2d(w, 1, 1, 1, 1) })),
            (vec![2, 3, 8, 8], Box::new(|x, w, frozen| if frozen { conv2d(x, w, None, 1, 2) } else { x.conv2d(w, 1, 2, 1, 1) })),
            (vec![2, 3, 7, 7], Box::new(|x, w, frozen| if frozen { conv2d(x, w, None, 1, 2) } else { x.conv2d(w, 1, 2, 1, 1) })),
        ];
        for (shape, op) in cases {
            let x0 = Tensor::randn(0f64, 1.0, shape.as_slice(), &dev)?;
            let w = Tensor::randn(0f64, 1.0, (4, 3, 3, 3), &dev)?;
            let x = Var::from_tensor(&x0)?;
            let wv = Var::from_tensor(&w)?;
            let a = op(x.as_tensor(), wv.as_tensor(), false)?;
            let r = Tensor::randn(0f64, 1.0, a.dims(), &dev)?;
            let ga = (a * &r)?.sum_all()?.backward()?;
            let x2 = Var::from_tensor(&x0)?;
            let b = op(x2.as_tensor(), &w, true)?;
            let gb = (b * &r)?.sum_all()?.backward()?;
            assert!(gb.get(&w).is_none(), "frozen weight got a gradient");
            let d = (ga.get(x.as_tensor()).unwrap() - gb.get(x2.as_tensor()).unwrap())?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d < 1e-10, "input gradient differs by {d}");
        }
        let x0 = Tensor::randn(0f64, 1.0, (5, 6), &dev)?;
        let w = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
        let x = Var::from_tensor(&x0)?;
        let r = Tensor::randn(0f64, 1.0, (5, 4), &dev)?;
        let ga = (x.as_tensor().matmul(&w.t()?)? * &r)?.sum_all()?.backward()?;
        let x2 = Var::from_tensor(&x0)?;
        let gb = (linear(x2.as_tensor(), &w, None)? * &r)?.sum_all()?.backward()?;
        assert!(gb.get(&w).is_none());
        let d = (ga.get(x.as_tensor()).unwrap() - gb.get(x2.as_tensor()).unwrap())?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12);
        Ok(())
    }

    #[test]
    fn fused_and_attached_forward_agree() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (4, 9), &Device::Cpu)?;
        let v = Var::from_tensor(&x)?;
        let a = softmax_last_dim(&x)?;
        let b = softmax_last_dim(v.as_tensor())?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-7);
        Ok(())
    }

    fn seeded_randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        use rand::Rng;
        let mut rng = crate::util::seeded_rng(seed);
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// A layer norm's affine part for rows of `n` (not all ones/zeros, so it is exercised).
    fn ln_affine(n: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let i = Tensor::arange(0f64, n as f64, &Device::Cpu)?;
        let w = (&i * 0.37)?.sin()?.affine(0.5, 1.0)?;
        let b = (&i * 0.71)?.cos()?;
        Ok((w.to_dtype(dtype)?, b.to_dtype(dtype)?))
    }

    fn plain_normalize(x: &Tensor) -> Result<Tensor> {
        let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)
    }

    /// The fused f32 kernels (kernels/elementwise.rs, layer_norm.rs) against the same functions in f64
    /// through candle's plain ops: values and input gradients, on shapes that exercise the
    /// 8-lane main loop, its tail and the multi-threaded split.
    #[test]
    fn fused_f32_kernels_match_f64_reference() -> Result<()> {
        type Op = Box<dyn Fn(&Tensor) -> Result<Tensor>>;
        let cases: Vec<(&str, Op, Op)> = vec![
            (
                "scaled softmax",
                Box::new(|x| softmax_last_dim_scaled(x, 0.37)),
                Box::new(|x| {
                    let z = (x * 0.37)?;
                    let e = z.broadcast_sub(&z.max_keepdim(D::Minus1)?)?.exp()?;
                    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
                }),
            ),
            ("silu", Box::new(silu), Box::new(|x| x * candle_nn::ops::sigmoid(x)?)),
            (
                "geglu",
                Box::new(geglu),
                Box::new(|x| {
                    let half = x.dim(D::Minus1)? / 2;
                    let g = x.narrow(D::Minus1, half, half)?;
                    let cdf = ((g.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
                    x.narrow(D::Minus1, 0, half)? * (g * cdf)?
                }),
            ),
            (
                "layer norm (frozen affine)",
                Box::new(|x| {
                    let (w, b) = ln_affine(x.dim(D::Minus1)?, DType::F32)?;
                    layer_norm(x, &w, &b, 1e-5)
                }),
                Box::new(|x| {
                    let (w, b) = ln_affine(x.dim(D::Minus1)?, DType::F64)?;
                    plain_normalize(x)?.broadcast_mul(&w)?.broadcast_add(&b)
                }),
            ),
            ("normalize", Box::new(|x| normalize_last_dim(x, 1e-5)), Box::new(plain_normalize)),
        ];
        for (name, fused, reference) in cases {
            for shape in [vec![3usize, 6], vec![2, 78], vec![64, 8, 256, 78], vec![1, 2]] {
                if name.contains("norm") && shape == [1, 2] {
                    // a normalised pair is (-1, 1) whatever x: its gradient is eps-sized noise
                    continue;
                }
                let x64 = (seeded_randn(shape.as_slice(), 7)? * 6.0)?;
                let xv = Var::from_tensor(&x64.to_dtype(DType::F32)?)?;
                let y = fused(xv.as_tensor())?;
                let r64 = seeded_randn(y.dims(), 8)?;
                let g = (&y * r64.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
                let g = g.get(xv.as_tensor()).expect("no gradient").to_dtype(DType::F64)?;
                let x64v = Var::from_tensor(&x64)?;
                let y_ref = reference(x64v.as_tensor())?;
                let g_ref = (&y_ref * &r64)?.sum_all()?.backward()?;
                let g_ref = g_ref.get(x64v.as_tensor()).unwrap().clone();
                let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
                    Ok((a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?
                        / b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?.max(1e-30))
                };
                let ey = rel(&y.to_dtype(DType::F64)?, &y_ref)?;
                let eg = rel(&g, &g_ref)?;
                assert!(ey < 1e-6 && eg < 1e-4, "{name} {shape:?}: value rel err {ey}, gradient {eg}");
            }
        }
        Ok(())
    }
}
