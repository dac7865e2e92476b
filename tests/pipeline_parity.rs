//! The full guided DDIM text-to-image pipeline against diffusers' StableDiffusionPipeline:
//! same latents, prompt, steps, guidance and eta = 0 (goldens `pipe.*`, settings in
//! golden/<name>.json).

mod common;

use disendiff::model::sd::{LoadOptions, StableDiffusion};
use disendiff::pipelines::text2img;

fn check(name: &str) {
    common::assert_kernel_switch_honoured();
    let sd = StableDiffusion::load(&common::fixture(&format!("{name}-tiny")), &LoadOptions::default()).unwrap();
    let g = common::load_golden(name);
    let p = common::settings::text2img_params(&sd, name, &g["pipe.latents"]);
    let latents = text2img::sample_latents(&sd, &p, |_, _| {}).unwrap();
    let images = common::images::assert_latents_and_image(&sd, name, &latents, &g["pipe.out_latents"], &g["pipe.image"]);
    // PNGs within 1/255 mean absolute difference of diffusers' own PNGs.
    common::images::assert_pngs_close(&images, &format!("{name}-pipe"));
}

#[test]
fn sd1_pipeline_matches_diffusers() {
    check("sd1");
}

#[test]
fn sd2_pipeline_matches_diffusers() {
    check("sd2");
}

/// Both pipelines again on the generic candle path (fused CPU kernels off, in a child
/// process): same tolerances.
#[test]
fn pipelines_match_diffusers_with_kernels_off() {
    common::run_with_kernels_off(&["sd1_pipeline_matches_diffusers", "sd2_pipeline_matches_diffusers"]);
}
