//! Tiled VAE decoding, as diffusers' `AutoencoderKL.enable_tiling()` / `tiled_decode`: the
//! latents are cut into overlapping square tiles, each decoded alone, and neighbouring tiles are
//! cross-faded over their overlap. The decoder's activations (largest at the full image size:
//! channels x H x W, and its 3x3 convolutions' patch matrices nine times that) then exist for
//! one tile at a time, so a 2048 px image needs about as much memory as a 512 px one. Pixels
//! near the seams differ slightly from decoding in one piece (the decoder's receptive field is
//! cut), exactly as in diffusers; `tests/vae_parity.rs` checks the result against diffusers'.

use candle_core::{Result, Tensor};

/// diffusers' tiling sizes: `tile_sample_min_size` = the VAE config's `sample_size`,
/// `tile_latent_min_size` = that over the VAE factor, `tile_overlap_factor` = 0.25.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tiling {
    /// Tile side in latent pixels (64 for SD).
    pub latent_tile: usize,
    /// Tile side in image pixels (512 for SD).
    pub sample_tile: usize,
    /// Fraction of a tile shared with its neighbour (0.25).
    pub overlap: f64,
}

impl Tiling {
    /// The sizes diffusers derives from a VAE of `sample_size` and `levels` resolution levels.
    pub fn new(sample_size: usize, levels: usize) -> Self {
        Self { latent_tile: sample_size >> levels.saturating_sub(1), sample_tile: sample_size, overlap: 0.25 }
    }

    /// Whether latents of this size are decoded in tiles (diffusers: either side over a tile).
    pub fn applies(&self, latent_h: usize, latent_w: usize) -> bool {
        latent_h > self.latent_tile || latent_w > self.latent_tile
    }

    /// Latent tiles start every `stride` latent pixels.
    fn stride(&self) -> usize {
        ((self.latent_tile as f64 * (1.0 - self.overlap)) as usize).max(1)
    }

    /// Image pixels cross-faded between neighbouring tiles.
    fn blend_extent(&self) -> usize {
        (self.sample_tile as f64 * self.overlap) as usize
    }
}

/// Decodes latents `z` [B, C, h, w] tile by tile with `decode_tile` (post-quant conv and
/// decoder on one tile) and joins the tiles as diffusers' `tiled_decode` does: each tile is
/// faded in from the (already faded) tile above and the one to its left, then cropped to
/// `sample_tile - blend_extent` pixels a side.
pub fn tiled_decode(z: &Tensor, tiling: &Tiling, decode_tile: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (_, _, h, w) = z.dims4()?;
    let (stride, t) = (tiling.stride(), tiling.latent_tile);
    let blend = tiling.blend_extent();
    let keep = tiling.sample_tile - blend;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let tile = z.narrow(2, i, t.min(h - i))?.narrow(3, j, t.min(w - j))?;
            row.push(decode_tile(&tile)?);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut cropped = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = fade_in(&rows[i - 1][j], &tile, blend, 2)?;
            }
            if j > 0 {
                tile = fade_in(&rows[i][j - 1], &tile, blend, 3)?;
            }
            // later tiles blend with this one as faded here (diffusers blends in place)
            rows[i][j] = tile.clone();
            let (th, tw) = (tile.dim(2)?, tile.dim(3)?);
            cropped.push(tile.narrow(2, 0, keep.min(th))?.narrow(3, 0, keep.min(tw))?);
        }
        out_rows.push(Tensor::cat(&cropped, 3)?);
    }
    Tensor::cat(&out_rows, 2)
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `extent` lines of `b` along
/// `dim` become `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)`.
fn fade_in(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let (la, lb) = (a.dim(dim)?, b.dim(dim)?);
    let mut shape = vec![1usize; 4];
    shape[dim] = extent;
    let ramp: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let ramp = Tensor::from_vec(ramp, shape, b.device())?.to_dtype(b.dtype())?;
    let from_a = a.narrow(dim, la - extent, extent)?.broadcast_mul(&(1.0 - &ramp)?)?;
    let from_b = b.narrow(dim, 0, extent)?.broadcast_mul(&ramp)?;
    let head = (from_a + from_b)?;
    if extent == lb {
        return Ok(head);
    }
    Tensor::cat(&[head, b.narrow(dim, extent, lb - extent)?], dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// SD's sizes: 64-latent tiles every 48, blended over 128 pixels, 384 kept a side.
    #[test]
    fn sd_tile_sizes() {
        let t = Tiling::new(512, 4);
        assert_eq!((t.latent_tile, t.sample_tile, t.stride(), t.blend_extent()), (64, 512, 48, 128));
        assert!(!t.applies(64, 64) && t.applies(64, 65));
    }

    /// With an identity "decoder" (factor 1) on a constant image, tiling reproduces it exactly:
    /// each fade mixes equal values with weights summing to one, and the crops cover the image.
    #[test]
    fn identity_decoder_constant_image_is_reproduced() -> Result<()> {
        let t = Tiling { latent_tile: 8, sample_tile: 8, overlap: 0.25 };
        let z = Tensor::full(0.75f32, (1, 2, 19, 13), &Device::Cpu)?;
        let out = tiled_decode(&z, &t, |x| Ok(x.clone()))?;
        assert_eq!(out.dims(), z.dims());
        let err = (out - &z)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        Ok(())
    }
}
