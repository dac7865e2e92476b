//! The full guided DDIM text-to-image pipeline against diffusers' StableDiffusionPipeline:
//! same latents, prompt, steps, guidance and eta = 0 (goldens `pipe.*`, settings in
//! golden/<name>.json).

mod common;

use disendiff::model::sd::{LoadOptions, StableDiffusion};
use disendiff::pipelines::text2img::{self, Text2ImageParams};

fn params(sd: &StableDiffusion, name: &str) -> Text2ImageParams {
    let text = std::fs::read_to_string(common::fixture(&format!("golden/{name}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pipe = &v["pipe"];
    let g = common::load_golden(name);
    let mut p = Text2ImageParams::new(sd, pipe["prompt"].as_str().unwrap());
    p.negative_prompt = pipe["negative_prompt"].as_str().unwrap_or("").to_string();
    p.steps = pipe["steps"].as_u64().unwrap() as usize;
    p.guidance_scale = pipe["guidance_scale"].as_f64().unwrap();
    p.eta = pipe["eta"].as_f64().unwrap();
    p.height = pipe["height"].as_u64().unwrap() as usize;
    p.width = pipe["width"].as_u64().unwrap() as usize;
    p.latents = Some(g["pipe.latents"].clone());
    p.num_images = g["pipe.latents"].dim(0).unwrap();
    p
}

fn check(name: &str) {
    common::assert_kernel_switch_honoured();
    let sd = StableDiffusion::load(&common::fixture(&format!("{name}-tiny")), &LoadOptions::default()).unwrap();
    let g = common::load_golden(name);
    let p = params(&sd, name);
    let latents = text2img::sample_latents(&sd, &p, |_, _| {}).unwrap();
    let err = common::rel_err(&latents, &g["pipe.out_latents"]);
    println!("{name}: final latents rel err {err:.3e}");
    assert!(err <= 1e-3, "{name}: final latents rel err {err}");

    let images = text2img::decode_latents(&sd, &latents).unwrap();
    let want = g["pipe.image"].permute((0, 3, 1, 2)).unwrap();
    let err = common::rel_err(&images, &want);
    println!("{name}: decoded image rel err {err:.3e}");
    assert!(err <= 1e-3, "{name}: image rel err {err}");

    // PNGs within 1/255 mean absolute difference of diffusers' own PNGs.
    for (i, img) in disendiff::util::to_rgb8(&images).unwrap().iter().enumerate() {
        let path = common::fixture(&format!("golden/{name}-pipe-{i:05}.png"));
        let reference = image::open(&path).unwrap().to_rgb8();
        assert_eq!(reference.dimensions(), img.dimensions());
        let mad: f64 = img.as_raw().iter().zip(reference.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>()
            / img.as_raw().len() as f64;
        println!("{name}: image {i} mean abs diff {mad:.4} (of 255)");
        assert!(mad <= 1.0, "{name}: PNG {i} differs by {mad}/255 on average");
    }
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
