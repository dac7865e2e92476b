//! Attention in blocks of query rows, for candle's generic path (the GPU, f16/bf16 weights, or
//! `DISENDIFF_KERNELS=off`): there the scores `q k^T` are an explicit [B, heads, N, M] tensor,
//! which for self-attention over every latent pixel grows with the fourth power of the image
//! side (a 2048 px image has 65,536 latent pixels: 17 GB of f32 scores for the VAE's one head).
//! Each query row's softmax and output depend on that row alone, so computing them a block of
//! rows at a time and concatenating gives the same numbers (to the products' rounding) with at most
//! [`SCORE_BUDGET_BYTES`] of scores alive, as diffusers' sliced / chunked attention does. The
//! fused CPU kernels ([`super::kernels::attention`]) already work in 64-row blocks.

use candle_core::{Result, Tensor};

/// Scores one block may take (f32): small enough to be cheap next to a model, large enough
/// that blocks are few.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// Query rows per block so that `batch_heads x rows x keys` f32 scores stay within
/// [`SCORE_BUDGET_BYTES`] (all `queries` when they fit; at least one row).
pub fn rows_per_block(batch_heads: usize, queries: usize, keys: usize) -> usize {
    let per_row = batch_heads.max(1).saturating_mul(keys.max(1)).saturating_mul(4);
    (SCORE_BUDGET_BYTES / per_row).clamp(1, queries.max(1))
}

/// `attend(q_block)` over blocks of `rows` query rows of `q` along `dim`, concatenated along
/// `dim` (one call when `rows` covers them all). Differentiable: the blocks are narrowed
/// views and the concatenation has a backward.
pub fn by_query_blocks(q: &Tensor, dim: usize, rows: usize, attend: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n = q.dim(dim)?;
    if rows >= n {
        return attend(q);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(rows));
    for start in (0..n).step_by(rows.max(1)) {
        parts.push(attend(&q.narrow(dim, start, rows.min(n - start))?)?);
    }
    Tensor::cat(&parts, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * 0.3)?;
        crate::model::ops::softmax_last_dim(&scores)?.matmul(v)
    }

    /// Blocks of 7 rows (uneven last block) give the one-piece result (to rounding), and gradients
    /// flow through the blocks as through the whole.
    #[test]
    fn blocks_equal_the_whole() -> Result<()> {
        let dev = Device::Cpu;
        let q = candle_core::Var::randn(0f32, 1.0, (2, 3, 30, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 11, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 11, 5), &dev)?;
        let whole = attend(q.as_tensor(), &k, &v)?;
        let blocks = by_query_blocks(q.as_tensor(), 2, 7, |qb| attend(qb, &k, &v))?;
        assert_eq!(blocks.dims(), whole.dims());
        // the same sums; only the matrix products' blocking of fewer rows may round differently
        let diff = (&blocks - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let g_whole = whole.sum_all()?.backward()?.get(&q).unwrap().clone();
        let g_blocks = blocks.sum_all()?.backward()?.get(&q).unwrap().clone();
        let diff = (g_blocks - g_whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn rows_per_block_keeps_the_budget() {
        assert_eq!(rows_per_block(16, 4096, 77), 4096);
        let rows = rows_per_block(1, 65536, 65536);
        assert!(rows * 65536 * 4 <= SCORE_BUDGET_BYTES && rows >= 1);
        assert_eq!(rows_per_block(usize::MAX, 10, usize::MAX), 1);
    }
}
