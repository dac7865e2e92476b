//! Gradient checkpointing: a block's activations are recomputed in the backward pass instead
//! of kept from the forward (torch.utils.checkpoint, diffusers' `--gradient_checkpointing`).
//!
//! [`checkpoint`] runs a block `f` on detached inputs, outside the autograd graph, so none of
//! its intermediate tensors outlive it, and attaches the result to the inputs through
//! [`Checkpointed`], a custom op whose backward runs `f` again on the inputs with the graph
//! on and differentiates that: `d inputs = d/d inputs sum(f(inputs) * d out)`. Between the
//! passes only the block's inputs and output stay alive.
//!
//! The op returns gradients to its inputs only, so every tensor inside `f` that needs a
//! gradient must come in as an input: the callers pass frozen blocks (the trainable
//! cross-attention keys and values are computed outside and passed in, see `unet::attention`),
//! and a block whose result is in a graph even on detached inputs (a trainable weight inside)
//! is refused with an error rather than trained without that weight's gradient. `f` must be deterministic; the UNet's blocks are (no dropout).

use super::precomputed::Precomputed;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, Var};
use std::sync::atomic::{AtomicUsize, Ordering};

static CHECKPOINTED: AtomicUsize = AtomicUsize::new(0);

/// How many blocks this process has checkpointed (attached for recomputation) so far: what a
/// test reads to know that checkpointing took effect, since the results are the same.
pub fn checkpointed_blocks() -> usize {
    CHECKPOINTED.load(Ordering::Relaxed)
}

/// A block's forward function on its inputs.
pub type BlockFn = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// `f(inputs)` (one or two inputs), checkpointed when any input is in an autograd graph and
/// computed plainly otherwise.
pub fn checkpoint(inputs: &[&Tensor], f: Box<BlockFn>) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    if !inputs.iter().any(|t| t.track_op()) {
        return f(&detached);
    }
    let out = f(&detached)?;
    if out.track_op() {
        // On detached inputs the result is in a graph only through a trainable tensor inside
        // the block, whose gradient the op could not return.
        candle_core::bail!("gradient checkpointing: the block holds trainable weights (only frozen blocks can be checkpointed)");
    }
    CHECKPOINTED.fetch_add(1, Ordering::Relaxed);
    let op = Checkpointed { out: Precomputed::new("checkpoint", out), f };
    match inputs {
        [x] => x.apply_op1(op),
        [x, y] => x.apply_op2(y, op),
        _ => candle_core::bail!("checkpoint: {} inputs (one or two are supported)", inputs.len()),
    }
}

struct Checkpointed {
    out: Precomputed,
    f: Box<BlockFn>,
}

impl Checkpointed {
    /// Recomputes the block on fresh leaves for the inputs in a graph and returns their
    /// gradients (`None` for inputs outside the graph).
    fn gradients(&self, inputs: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let leaves: Vec<Option<Var>> =
            inputs.iter().map(|t| if t.track_op() { Var::from_tensor(&t.detach()).map(Some) } else { Ok(None) }).collect::<Result<_>>()?;
        let xs: Vec<Tensor> =
            inputs.iter().zip(&leaves).map(|(t, v)| v.as_ref().map(|v| v.as_tensor().clone()).unwrap_or_else(|| t.detach())).collect();
        let y = (self.f)(&xs)?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        Ok(leaves.iter().map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned())).collect())
    }
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.gradients(&[x], grad)?.pop().flatten())
    }
}

impl CustomOp2 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(&self, x: &Tensor, y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.gradients(&[x, y], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// A small nonlinear block with a frozen weight: tanh(x W) * y + x.
    fn block(w: Tensor) -> Box<BlockFn> {
        Box::new(move |xs: &[Tensor]| xs[0].matmul(&w)?.tanh()?.broadcast_mul(&xs[1])? + &xs[0])
    }

    /// Values and both inputs' gradients equal those of the plain graph (f64, to rounding),
    /// through a chain of two checkpointed blocks and an input shared by both.
    #[test]
    fn matches_the_plain_graph() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 4), &dev)?)?;
        let y = Var::from_tensor(&Tensor::randn(0f64, 1.0, (1, 4), &dev)?)?;
        let w = Tensor::randn(0f64, 0.5, (4, 4), &dev)?;
        let probe = Tensor::randn(0f64, 1.0, (5, 4), &dev)?;
        let plain = {
            let f = block(w.clone());
            let h = f(&[x.as_tensor().clone(), y.as_tensor().clone()])?;
            f(&[h, y.as_tensor().clone()])?
        };
        let h = checkpoint(&[&x, &y], block(w.clone()))?;
        let out = checkpoint(&[&h, &y], block(w))?;
        assert!(max_diff(&out, &plain) < 1e-12);
        let g_ref = (plain * &probe)?.sum_all()?.backward()?;
        let g = (out * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("y", &y)] {
            let (a, b) = (g.get(v).expect(name), g_ref.get(v).expect(name));
            assert!(max_diff(a, b) < 1e-12, "d{name} differs by {}", max_diff(a, b));
            assert!(max_diff(a, &a.zeros_like()?) > 1e-3, "d{name} is zero");
        }
        Ok(())
    }

    /// An input outside the graph gets no gradient and costs no recomputation for it; with no
    /// input in a graph the block runs plainly.
    #[test]
    fn inputs_outside_the_graph() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (3, 4), &dev)?;
        let y = Var::from_tensor(&Tensor::randn(0f64, 1.0, (1, 4), &dev)?)?;
        let w = Tensor::randn(0f64, 0.5, (4, 4), &dev)?;
        let out = checkpoint(&[&x, &y], block(w.clone()))?;
        let g = out.sum_all()?.backward()?;
        assert!(g.get(&x).is_none());
        let reference = block(w.clone())(&[x.clone(), y.as_tensor().clone()])?.sum_all()?.backward()?;
        assert!(max_diff(g.get(&y).unwrap(), reference.get(&y).unwrap()) < 1e-12);
        let plain = checkpoint(&[&x, &y.as_tensor().detach()], block(w.clone()))?;
        assert!(!plain.track_op());
        // a trainable weight inside the block is refused, not silently left without gradient
        let trainable = Var::from_tensor(&w)?;
        assert!(checkpoint(&[&x, &y], block(trainable.as_tensor().clone())).is_err());
        Ok(())
    }
}
