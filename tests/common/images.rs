//! The end checks the pipeline golden tests share: final latents and their decoding against
//! diffusers' tensors, and PNGs against diffusers' PNGs (mean absolute difference of 8-bit values).

use candle_core::Tensor;
use disendiff::model::sd::StableDiffusion;
use disendiff::pipelines::latents::decode_latents;

/// Mean |a - b| over the 8-bit values of two images of one size.
pub fn mean_abs_u8(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let s: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as i64 - y as i64).unsigned_abs()).sum();
    s as f64 / a.as_raw().len() as f64
}

/// Asserts the final latents within 1e-3 (relative) of `want_latents` and their decoding within
/// 1e-3 of `want_image` (diffusers' `np` output, [N, H, W, 3] in [0, 1]); returns the decoded
/// images [N, 3, H, W].
pub fn assert_latents_and_image(sd: &StableDiffusion, label: &str, latents: &Tensor, want_latents: &Tensor, want_image: &Tensor) -> Tensor {
    let err = super::rel_err(latents, want_latents);
    println!("{label}: final latents rel err {err:.3e}");
    assert!(err <= 1e-3, "{label}: final latents rel err {err}");
    let images = decode_latents(sd, latents).unwrap();
    let err = super::rel_err(&images, &want_image.permute((0, 3, 1, 2)).unwrap());
    println!("{label}: decoded image rel err {err:.3e}");
    assert!(err <= 1e-3, "{label}: image rel err {err}");
    images
}

/// Asserts that image i of `images` ([N, 3, H, W] in [0, 1]) as 8 bits is within 1/255 on average
/// of diffusers' `golden/<prefix>-0000i.png`, for every i.
pub fn assert_pngs_close(images: &Tensor, prefix: &str) {
    for (i, img) in disendiff::util::to_rgb8(images).unwrap().iter().enumerate() {
        let path = super::fixture(&format!("golden/{prefix}-{i:05}.png"));
        let reference = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
        let mad = mean_abs_u8(img, &reference);
        println!("{prefix}: image {i} mean abs diff {mad:.4} (of 255)");
        assert!(mad <= 1.0, "{prefix}: PNG {i} differs by {mad}/255 on average");
    }
}
