//! The kernels' access to tensor memory: the f32 slice behind a CPU tensor or storage (an
//! error for any other dtype, device or a strided layout) and uninitialised output buffers.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// The f32 data of contiguous CPU storage; an error naming `what` for any other dtype or a
/// strided layout.
pub(super) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{what}: non-contiguous input"),
        _ => candle_core::bail!("{what}: only f32 is supported"),
    }
}

/// A buffer of `n` floats for a kernel that writes every element before reading any (the
/// zeroing `vec![0; n]` does was 5-10% of a training step, on one thread).
pub(super) fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: any bit pattern is a valid f32, and every caller overwrites all `n` elements
    // before reading them.
    unsafe { v.set_len(n) };
    v
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(contiguous_f32(s, layout, "kernel")?),
        _ => candle_core::bail!("kernel: CPU tensors only"),
    }
}
