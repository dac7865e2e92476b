//! The guided DDIM image-to-image pipeline against diffusers' StableDiffusionImg2ImgPipeline:
//! same picture, same added noise, prompt, steps, strength, guidance and eta = 0, the VAE
//! posterior read at its mean in both (goldens `img2img.*` in golden/img2img-<name>.*, made by
//! tools/reference/make_img2img_fixtures.py).

mod common;

use disendiff::model::sd::{LoadOptions, StableDiffusion};
use disendiff::pipelines::img2img::{self, Img2ImgParams};
use disendiff::pipelines::latents::encode_image;

fn check(name: &str) {
    let sd = StableDiffusion::load(&common::fixture(&format!("{name}-tiny")), &LoadOptions::default()).unwrap();
    let g = common::load_golden(&format!("img2img-{name}"));
    let v = common::settings::golden_json(&format!("img2img-{name}"));
    let s = &v["img2img"];

    let init = encode_image(&sd, &g["img2img.image"]).unwrap();
    let err = common::rel_err(&init, &g["img2img.init_latents"]);
    println!("{name}: image latents rel err {err:.3e}");
    assert!(err <= 1e-4, "{name}: image latents rel err {err}");

    let p = Img2ImgParams {
        sampling: common::settings::sampling_params(s),
        image: g["img2img.image"].clone(),
        noise: Some(g["img2img.noise"].clone()),
    };

    let mut visited = 0;
    let latents = img2img::sample_latents(&sd, &p, |i, total| {
        assert_eq!(i, visited + 1);
        visited = i;
        assert_eq!(total, g["img2img.timesteps"].dim(0).unwrap());
    })
    .unwrap();
    assert_eq!(visited, g["img2img.timesteps"].dim(0).unwrap(), "{name}: steps run");
    let label = format!("{name} ({visited} steps, strength {})", p.sampling.strength);
    common::images::assert_latents_and_image(&sd, &label, &latents, &g["img2img.out_latents"], &g["img2img.out_image"]);
}

#[test]
fn sd1_img2img_matches_diffusers() {
    check("sd1");
}

#[test]
fn sd2_img2img_matches_diffusers() {
    check("sd2");
}

#[test]
fn img2img_rejects_bad_settings() {
    let sd = StableDiffusion::load(&common::fixture("sd1-tiny"), &LoadOptions::default()).unwrap();
    let g = common::load_golden("img2img-sd1");
    let mut p = Img2ImgParams::new("a cat", g["img2img.image"].clone());
    p.sampling.steps = 4;
    p.sampling.strength = 0.2; // int(4 * 0.2) = 0 steps
    let e = img2img::sample_latents(&sd, &p, |_, _| {}).unwrap_err();
    assert!(format!("{e:#}").contains("strength"), "{e:#}");
    p.sampling.strength = 1.5;
    assert!(format!("{:#}", img2img::sample_latents(&sd, &p, |_, _| {}).unwrap_err()).contains("strength"));
    p.sampling.strength = 0.5;
    p.sampling.num_images = 3;
    p.image = g["img2img.image"].repeat((2, 1, 1, 1)).unwrap();
    let e = img2img::sample_latents(&sd, &p, |_, _| {}).unwrap_err();
    assert!(format!("{e:#}").contains("2 start images for 3"), "{e:#}");
    p.image = g["img2img.image"].narrow(3, 0, 60).unwrap();
    p.sampling.num_images = 1;
    let e = img2img::sample_latents(&sd, &p, |_, _| {}).unwrap_err();
    assert!(format!("{e:#}").contains("multiples of 8"), "{e:#}");
}

/// `disendiff generate --image --strength` with the golden picture (a PNG holds it exactly: the
/// reference made it from 8-bit pixels) and the golden noise as `--latents`: the PNGs are within
/// 1/255 of diffusers' images on average.
#[test]
fn generate_with_image_matches_diffusers_through_the_cli() {
    let g = common::load_golden("img2img-sd1");
    let v = common::settings::golden_json("img2img-sd1");
    let s = &v["img2img"];
    let tmp = tempfile::tempdir().unwrap();
    let pixels = ((&g["img2img.image"].squeeze(0).unwrap() + 1.0).unwrap() * 127.5).unwrap().round().unwrap();
    let (_, h, w) = pixels.dims3().unwrap();
    let data: Vec<u8> = pixels.permute((1, 2, 0)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| *x as u8).collect();
    let picture = tmp.path().join("picture.png");
    image::RgbImage::from_raw(w as u32, h as u32, data).unwrap().save(&picture).unwrap();
    let noise = tmp.path().join("noise.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents".to_string(), g["img2img.noise"].clone())]), &noise)
        .unwrap();
    let out = tmp.path().join("out");
    let n = s["num_images_per_prompt"].to_string();
    let (steps, strength, guidance) = (s["steps"].to_string(), s["strength"].to_string(), s["guidance_scale"].to_string());
    let (ok, err) = common::disendiff(&[
        "generate", "--model", common::fixture("sd1-tiny").to_str().unwrap(),
        "--prompt", s["prompt"].as_str().unwrap(), "--negative-prompt", s["negative_prompt"].as_str().unwrap(),
        "--image", picture.to_str().unwrap(), "--strength", &strength, "--num-inference-steps", &steps,
        "--guidance-scale", &guidance, "--eta", "0", "--num-images", &n, "--latents", noise.to_str().unwrap(),
        "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let want = g["img2img.out_image"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let per = h * w * 3;
    for i in 0..s["num_images_per_prompt"].as_u64().unwrap() as usize {
        let ours = image::open(out.join(format!("{i:05}.png"))).unwrap().to_rgb8();
        let theirs = &want[i * per..(i + 1) * per];
        let mad: f64 = ours.as_raw().iter().zip(theirs).map(|(a, b)| (*a as f64 - (*b as f64 * 255.0).round()).abs()).sum::<f64>() / per as f64;
        println!("img2img image {i}: mean abs diff {mad:.4}/255");
        assert!(mad <= 1.0, "image {i}: mean abs diff {mad}/255");
    }
    // A strength outside [0, 1] is refused before anything is written.
    let bad = tmp.path().join("bad");
    let (ok, err) = common::disendiff(&[
        "generate", "--model", common::fixture("sd1-tiny").to_str().unwrap(), "--prompt", "a ball",
        "--image", picture.to_str().unwrap(), "--strength", "1.5", "--out", bad.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--strength"), "{err}");
    assert!(!bad.exists());
}
