//! Inpainting against diffusers' StableDiffusionInpaintPipeline (goldens golden/inpaint<case>.*,
//! made by tools/reference/make_inpaint_fixtures.py): the same picture and mask PNGs, the same
//! noise, 10 DDIM steps, guidance 6, eta 0, the VAE posterior read at its mean in both.
//! Cases: `inpaint9` (a 9-channel inpainting UNet: sd1-tiny with unet-inpaint-tiny's UNet),
//! `inpaint4` and `inpaint4s` (plain sd1-tiny, latent blending, strength 1 and 0.75).
//! The library run is checked stage by stage; `disendiff inpaint --latents` is checked by its PNGs
//! (mean abs difference <= 1/255 against the pipeline's PNGs); then the CLI's answers to bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use disendiff::model::sd::{LoadOptions, StableDiffusion};
use disendiff::pipelines::inpaint::{self, InpaintParams};
use disendiff::pipelines::latents::encode_image;
use disendiff::util;
use std::path::{Path, PathBuf};

/// The model folder of a case: sd1-tiny, or for `inpaint9` a copy of it in `tmp` whose unet/
/// is unet-inpaint-tiny's (its float16 values stored as the default weight file).
fn model_dir(case: &str, tmp: &Path) -> PathBuf {
    if case != "inpaint9" {
        return common::fixture("sd1-tiny");
    }
    let m = tmp.join("sd1-inpaint-tiny");
    if !m.exists() {
        common::copy_dir(&common::fixture("sd1-tiny"), &m);
        let unet = m.join("unet");
        std::fs::remove_dir_all(&unet).unwrap();
        std::fs::create_dir_all(&unet).unwrap();
        let src = common::fixture("unet-inpaint-tiny");
        std::fs::copy(src.join("config.json"), unet.join("config.json")).unwrap();
        std::fs::copy(src.join("diffusion_pytorch_model.fp16.safetensors"), unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    }
    m
}

fn settings(case: &str) -> serde_json::Value {
    common::settings::golden_json(case)["inpaint"].clone()
}

fn golden_png(case: &str, i: usize) -> image::RgbImage {
    util::load_rgb(&common::fixture(&format!("golden/{case}-{i:05}.png"))).unwrap()
}

fn check(case: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let sd = StableDiffusion::load(&model_dir(case, tmp.path()), &LoadOptions::default()).unwrap();
    let g = common::load_golden(case);
    let s = settings(case);
    assert_eq!(sd.unet_config.in_channels as u64, s["unet_in_channels"].as_u64().unwrap());

    // the PNGs read as the pipeline's processors read them
    let picture = util::load_rgb(&common::fixture("golden/inpaint-image.png")).unwrap();
    let image = util::rgb_to_tensor(&picture, &Device::Cpu).unwrap();
    let err = common::rel_err(&image, &g["inpaint.image"]);
    assert!(err <= 1e-6, "{case}: image rel err {err}");
    let mask_rgb = util::load_rgb(&common::fixture("golden/inpaint-mask.png")).unwrap();
    let mask = inpaint::mask_from_rgb(&mask_rgb, &Device::Cpu).unwrap();
    assert_eq!(common::rel_err(&mask, &g["inpaint.mask"]), 0.0, "{case}: binarised mask");
    let ml = inpaint::mask_latents(&mask, 8, 8).unwrap();
    assert_eq!(common::rel_err(&ml, &g["inpaint.mask_latents"]), 0.0, "{case}: latent-size mask");

    // VAE encodings (posterior mean) of the picture and of picture * (mask < 0.5)
    let err = common::rel_err(&encode_image(&sd, &image).unwrap(), &g["inpaint.image_latents"]);
    assert!(err <= 1e-4, "{case}: image latents rel err {err}");
    let keep = mask.lt(0.5).unwrap().to_dtype(DType::F32).unwrap();
    let masked = image.broadcast_mul(&keep).unwrap();
    let err = common::rel_err(&encode_image(&sd, &masked).unwrap(), &g["inpaint.masked_image_latents"]);
    assert!(err <= 1e-4, "{case}: masked-image latents rel err {err}");

    let p = InpaintParams {
        sampling: common::settings::sampling_params(&s),
        image: image.clone(),
        mask: mask.clone(),
        noise: Some(g["inpaint.noise"].clone()),
    };
    let steps = g["inpaint.timesteps"].dim(0).unwrap();
    assert_eq!(inpaint::steps_run(&sd, &p).unwrap(), steps);

    let mut visited = 0;
    let latents = inpaint::sample_latents(&sd, &p, |i, total| {
        assert_eq!((i, total), (visited + 1, steps));
        visited = i;
    })
    .unwrap();
    assert_eq!(visited, steps, "{case}: steps run");
    let label = format!("{case} ({visited} steps, strength {})", p.sampling.strength);
    let images = common::images::assert_latents_and_image(&sd, &label, &latents, &g["inpaint.out_latents"], &g["inpaint.out_image"]);
    common::images::assert_pngs_close(&images, case);

    // the other kind of start gives another result: the run depends on the mask
    let mut q = p.clone();
    q.mask = (1.0 - &mask).unwrap();
    let other = inpaint::sample_latents(&sd, &q, |_, _| {}).unwrap();
    assert!(common::rel_err(&other, &latents) > 1e-2, "{case}: the mask changes nothing");
}

#[test]
fn inpaint_9_channel_matches_diffusers() {
    check("inpaint9");
}

#[test]
fn inpaint_4_channel_blend_matches_diffusers() {
    check("inpaint4");
}

#[test]
fn inpaint_4_channel_strength_075_matches_diffusers() {
    check("inpaint4s");
}

/// `disendiff inpaint` with the case's settings, `--latents` and `extra` flags, writing to `out`.
fn cli(case: &str, model: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let s = settings(case);
    let (image, mask) = (common::fixture("golden/inpaint-image.png"), common::fixture("golden/inpaint-mask.png"));
    let latents = common::fixture(&format!("golden/{case}-latents.safetensors"));
    let num = |k: &str| s[k].to_string();
    let mut args: Vec<String> = [
        "inpaint", "--model", model.to_str().unwrap(), "--image", image.to_str().unwrap(), "--mask", mask.to_str().unwrap(),
        "--prompt", s["prompt"].as_str().unwrap(), "--negative-prompt", s["negative_prompt"].as_str().unwrap(),
        "--latents", latents.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for (flag, key) in [("--steps", "steps"), ("--guidance-scale", "guidance_scale"), ("--eta", "eta"), ("--strength", "strength"), ("--num-images", "num_images_per_prompt")] {
        args.extend([flag.to_string(), num(key)]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    common::disendiff(&refs)
}

#[test]
fn cli_inpaint_matches_diffusers_pngs() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["inpaint9", "inpaint4", "inpaint4s"] {
        let out = tmp.path().join(case);
        let (ok, err) = cli(case, &model_dir(case, tmp.path()), &out, &[]);
        assert!(ok, "{case}: {err}");
        assert!(!err.contains("note: resizing"), "{case}: {err}");
        let n = settings(case)["num_images_per_prompt"].as_u64().unwrap() as usize;
        for i in 0..n {
            let got = util::load_rgb(&out.join(format!("{i:05}.png"))).unwrap();
            let d = common::images::mean_abs_u8(&got, &golden_png(case, i));
            println!("cli {case}: image {i} mean abs diff {d:.4} / 255");
            assert!(d <= 1.0, "cli {case}: image {i} mean abs diff {d} / 255");
        }
        assert!(!out.join(format!("{n:05}.png")).exists());
    }
}

#[test]
fn cli_paste_original_keeps_the_unmasked_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let case = "inpaint9";
    let model = model_dir(case, tmp.path());
    let (plain, pasted) = (tmp.path().join("plain"), tmp.path().join("pasted"));
    let (ok, err) = cli(case, &model, &plain, &[]);
    assert!(ok, "{err}");
    let (ok, err) = cli(case, &model, &pasted, &["--paste-original"]);
    assert!(ok, "{err}");
    let picture = util::load_rgb(&common::fixture("golden/inpaint-image.png")).unwrap();
    let mask = inpaint::luma(&util::load_rgb(&common::fixture("golden/inpaint-mask.png")).unwrap());
    let (a, b) = (util::load_rgb(&plain.join("00000.png")).unwrap(), util::load_rgb(&pasted.join("00000.png")).unwrap());
    let (mut inside, mut outside_changed) = (0, 0);
    for (x, y, m) in mask.enumerate_pixels() {
        if m[0] >= 128 {
            assert_eq!(a.get_pixel(x, y), b.get_pixel(x, y), "repainted pixel ({x}, {y}) differs");
            inside += 1;
        } else {
            assert_eq!(b.get_pixel(x, y), picture.get_pixel(x, y), "kept pixel ({x}, {y}) is not the original");
            outside_changed += (a.get_pixel(x, y) != picture.get_pixel(x, y)) as usize;
        }
    }
    assert!(inside > 500, "{inside} repainted pixels");
    // without the option the VAE re-renders the kept region too
    assert!(outside_changed > 100, "{outside_changed}");
}

#[test]
fn cli_resizes_a_mask_of_another_size_with_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let mask = util::load_rgb(&common::fixture("golden/inpaint-mask.png")).unwrap();
    let big = image::imageops::resize(&mask, 128, 96, image::imageops::FilterType::Nearest);
    let path = tmp.path().join("mask.png");
    big.save(&path).unwrap();
    let out = tmp.path().join("out");
    let (ok, err) = common::disendiff(&[
        "inpaint", "--model", common::fixture("sd1-tiny").to_str().unwrap(), "--image",
        common::fixture("golden/inpaint-image.png").to_str().unwrap(), "--mask", path.to_str().unwrap(), "--prompt", "a cat",
        "--steps", "2", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("note: resizing the mask") && err.contains("128x96 to 64x64"), "{err}");
    let img = image::open(out.join("00000.png")).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

/// Runs `disendiff inpaint` on sd1-tiny with `mask` and `extra`; asserts it failed, wrote nothing,
/// and returns its stderr.
fn fails(mask: &Path, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut args = vec![
        "inpaint", "--model", common::fixture("sd1-tiny").to_str().unwrap().to_owned().leak(), "--image",
        common::fixture("golden/inpaint-image.png").to_str().unwrap().to_owned().leak(), "--mask", mask.to_str().unwrap(),
        "--prompt", "a cat", "--steps", "2", "--out", out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, err) = common::disendiff(&args);
    assert!(!ok, "should fail:\n{err}");
    assert!(!out.exists(), "output written on error:\n{err}");
    err
}

#[test]
fn cli_rejects_bad_masks_and_settings() {
    let tmp = tempfile::tempdir().unwrap();
    // not an image at all
    let text = tmp.path().join("mask.png");
    std::fs::write(&text, "this is not a picture").unwrap();
    let err = fails(&text, &[]);
    assert!(err.contains("--mask") && err.contains("mask.png") && err.contains("not a readable image"), "{err}");
    // a PNG cut short: the header reads, the pixels do not
    let bytes = std::fs::read(common::fixture("golden/inpaint-mask.png")).unwrap();
    let cut = tmp.path().join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&cut, &[]);
    assert!(err.contains("--mask") && err.contains("cut.png"), "{err}");
    // a missing file
    let err = fails(&tmp.path().join("none.png"), &[]);
    assert!(err.contains("none.png") && err.contains("does not exist"), "{err}");

    let good = common::fixture("golden/inpaint-mask.png");
    // noise of the wrong size for the output
    let lat = common::fixture("golden/inpaint9-latents.safetensors");
    let err = fails(&good, &["--latents", lat.to_str().unwrap()]); // 2 images of noise for 1
    assert!(err.contains("--latents") && err.contains("[2, 4, 8, 8]") && err.contains("[1, 4, 8, 8]"), "{err}");
    // an output size that is not a multiple of 8
    let err = fails(&good, &["--height", "60"]);
    assert!(err.contains("multiples of 8"), "{err}");
    // strength leaving no step
    let err = fails(&good, &["--strength", "0.2"]);
    assert!(err.contains("strength"), "{err}");
}

#[test]
fn library_rejects_mismatched_inputs() {
    let sd = StableDiffusion::load(&common::fixture("sd1-tiny"), &LoadOptions::default()).unwrap();
    let g = common::load_golden("inpaint4");
    let mut p = InpaintParams::new("a cat", g["inpaint.image"].clone(), g["inpaint.mask"].clone());
    p.sampling.steps = 2;
    assert!(inpaint::check(&sd, &p).is_ok());
    p.mask = g["inpaint.mask"].narrow(3, 0, 56).unwrap();
    let e = inpaint::check(&sd, &p).unwrap_err();
    assert!(format!("{e:#}").contains("the mask must be [B, 1, 64, 64]"), "{e:#}");
    p.mask = Tensor::cat(&[&g["inpaint.mask"], &g["inpaint.mask"]], 1).unwrap();
    assert!(format!("{:#}", inpaint::check(&sd, &p).unwrap_err()).contains("the mask must be"));
    p.mask = g["inpaint.mask"].clone();
    p.sampling.num_images = 3;
    p.image = g["inpaint.image"].repeat((2, 1, 1, 1)).unwrap();
    assert!(format!("{:#}", inpaint::check(&sd, &p).unwrap_err()).contains("2 images for 3 outputs"));
}
