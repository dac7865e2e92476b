//! A custom op's output computed before the op runs.
//!
//! The ops that keep little for their backward pass ([`super::attention_recompute`],
//! [`super::checkpoint`]) compute their result on detached inputs, outside the autograd graph,
//! and then attach it to the inputs through a custom op whose forward only hands that result
//! over. [`Precomputed`] holds it until then and gives it up once, so the graph keeps one copy
//! (the op's output), not two.

use super::ops;
use candle_core::{CpuStorage, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

pub(crate) struct Precomputed {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
}

impl Precomputed {
    pub fn new(name: &'static str, out: Tensor) -> Self {
        Self { name, out: Mutex::new(Some(out)) }
    }

    fn take(&self) -> Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }

    /// The result as the CPU storage a custom op's `cpu_fwd` returns.
    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((ops::copy_storage(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: output not on the CPU", self.name),
        }
    }

    /// The result as the CUDA storage a custom op's `cuda_fwd` returns.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = self.take()?.contiguous()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) if layout.is_contiguous() && layout.start_offset() == 0 => {
                Ok((s.try_clone(layout)?, layout.shape().clone()))
            }
            _ => candle_core::bail!("{}: output not a contiguous CUDA tensor", self.name),
        }
    }
}
