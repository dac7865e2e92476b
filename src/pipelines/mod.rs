//! Generation pipelines built on the model and the schedulers: one denoising loop
//! ([`denoise`]) under text-to-image ([`text2img`]), image-to-image ([`img2img`]), inpainting
//! ([`inpaint`]) and the attention-map view ([`attention_maps`]); prior-preservation class images ([`class_images`])
//! over text-to-image; VAE encoding and decoding around them ([`latents`]); the settings
//! image-to-image and inpainting share ([`sampling`]).

pub mod attention_maps;
pub mod class_images;
pub mod denoise;
pub mod img2img;
pub mod inpaint;
pub mod latents;
pub mod sampling;
pub mod text2img;
