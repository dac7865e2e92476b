//! Images to UNet latents and back, as the pipelines around the denoising loop need them:
//! diffusers' `vae.encode(image).latent_dist` then `* scaling_factor`, and
//! `vae.decode(latents / scaling_factor (+ shift))` then `(x / 2 + 0.5).clamp(0, 1)`.

use crate::model::sd::StableDiffusion;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Decodes scaled latents to images [N, 3, H, W] in [0, 1].
pub fn decode_latents(sd: &StableDiffusion, latents: &Tensor) -> Result<Tensor> {
    let z = ((latents / sd.vae.scaling_factor())? + sd.vae.shift_factor())?;
    let img = sd.vae.decode(&z.to_dtype(sd.dtype)?)?.to_dtype(DType::F32)?;
    Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}

/// Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/f, W/f] (float32): the posterior
/// mean (diffusers' `retrieve_latents(..., sample_mode="argmax")`), shifted and scaled.
pub fn encode_image(sd: &StableDiffusion, image: &Tensor) -> Result<Tensor> {
    let (_, c, h, w) = image.dims4()?;
    let f = sd.vae_scale_factor();
    if c != 3 || h == 0 || w == 0 || h % f != 0 || w % f != 0 {
        bail!("the image must be [B, 3, H, W] with H and W positive multiples of {f} (the VAE factor), got {:?}", image.dims());
    }
    let mean = sd.vae.encode(&image.to_device(&sd.device)?.to_dtype(sd.dtype)?)?.mean.to_dtype(DType::F32)?;
    Ok(((mean - sd.vae.shift_factor())? * sd.vae.scaling_factor())?)
}
