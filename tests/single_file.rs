//! Single-file (CompVis) base models against diffusers: the tiny pipelines as single files (the
//! sd1 ones written here from the folders by the name list golden/single-names.json, the sd2
//! `.ckpt` committed; both made and checked with diffusers' `from_single_file(config=...)` by
//! tools/reference/make_single_file_fixtures.py) generate what the folders and diffusers generate;
//! the built-in base-model configs and the bundled tokenizer match diffusers / transformers; `.ckpt`
//! pickles that ask for code are refused without running it; malformed files give errors;
//! architecture detection on synthetic key/shape lists of real SD sizes.

mod common;

use candle_core::Tensor;
use disendiff::model::single_file::{detect, Family};
use disendiff::model::sd::{LoadOptions, SingleFileOptions, StableDiffusion};
use disendiff::pipelines::text2img;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

fn single_opts(config: &str, ema: bool) -> LoadOptions {
    let single_file = SingleFileOptions { config: Some(common::fixture(config)), prediction_type: None, ema };
    LoadOptions { single_file, ..LoadOptions::default() }
}

/// The CompVis tensors of `entry` of golden/single-names.json: each listed folder tensor (in its
/// dtype) reshaped to its CompVis shape under its CompVis name, as the reference script wrote and
/// checked with diffusers' from_single_file; for SD1 also the int64 `position_ids` buffer.
fn compvis_tensors(entry: &str) -> HashMap<String, Tensor> {
    let dev = candle_core::Device::Cpu;
    let v = common::settings::golden_json("single-names");
    let e = &v[entry];
    let files: HashMap<String, HashMap<String, Tensor>> = e["files"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(c, f)| (c.clone(), candle_core::safetensors::load(common::fixture(f.as_str().unwrap()), &dev).unwrap()))
        .collect();
    let mut out = HashMap::new();
    for p in e["pairs"].as_array().unwrap() {
        let (name, comp, key) = (p[0].as_str().unwrap(), p[1].as_str().unwrap(), p[2].as_str().unwrap());
        let shape: Vec<usize> = p[3].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let t = files[comp].get(key).unwrap_or_else(|| panic!("{entry}: no {key} in the {comp} folder file"));
        assert!(out.insert(name.to_string(), t.reshape(shape).unwrap()).is_none(), "{entry}: {name} twice");
    }
    let used = e["pairs"].as_array().unwrap().len();
    let present: usize = files.values().map(|f| f.keys().filter(|k| !k.ends_with("position_ids")).count()).sum();
    assert_eq!(used, present, "{entry}: the name list does not cover the folder files");
    if let Some(pos) = e["position_ids"].as_str() {
        out.insert(pos.to_string(), Tensor::arange(0i64, 77, &dev).unwrap().reshape((1, 77)).unwrap());
    }
    out
}

/// sd1-tiny as a CompVis single `.safetensors` in `dir` (see [`compvis_tensors`]).
fn sd1_single_file(dir: &Path) -> PathBuf {
    let path = dir.join("single-sd1.safetensors");
    candle_core::safetensors::save(&compvis_tensors("sd1"), &path).unwrap();
    path
}

/// Runs the pipeline; checks the final latents against `want` and the PNGs against
/// `golden/<png>-0000K.png` (mean abs difference <= 1/255). Returns the final latents.
fn check_run(sd: &StableDiffusion, name: &str, start: &Tensor, want: &Tensor, png: &str) -> Tensor {
    let latents = text2img::sample_latents(sd, &common::settings::text2img_params(sd, name, start), |_, _| {}).unwrap();
    let err = common::rel_err(&latents, want);
    println!("{png}: final latents rel err {err:.3e}");
    assert!(err <= 1e-3, "{png}: final latents rel err {err}");
    common::images::assert_pngs_close(&text2img::decode_latents(sd, &latents).unwrap(), png);
    latents
}

#[test]
fn sd1_safetensors_generates_what_the_folder_generates() {
    let g = common::load_golden("sd1");
    let tmp = tempfile::tempdir().unwrap();
    let single = StableDiffusion::load(&sd1_single_file(tmp.path()), &single_opts("sd1-tiny", false)).unwrap();
    let from_file = check_run(&single, "sd1", &g["pipe.latents"], &g["pipe.out_latents"], "sd1-pipe");
    let folder = StableDiffusion::load(&common::fixture("sd1-tiny"), &LoadOptions::default()).unwrap();
    let from_folder = text2img::sample_latents(&folder, &common::settings::text2img_params(&folder, "sd1", &g["pipe.latents"]), |_, _| {}).unwrap();
    let diff = (&from_file - &from_folder).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    println!("single file vs folder: final latents max |diff| {diff:e}");
    assert_eq!(diff, 0.0, "the same weights must give the same latents");
}

#[test]
fn sd2_ckpt_with_ema_matches_diffusers() {
    let g = common::load_golden("single-sd2");
    let path = common::fixture("golden/single-sd2-ema.ckpt");
    let ema = StableDiffusion::load(&path, &single_opts("sd2-tiny", true)).unwrap();
    check_run(&ema, "sd2", &g["latents"], &g["ema.out_latents"], "single-sd2-ema");
    let plain = StableDiffusion::load(&path, &single_opts("sd2-tiny", false)).unwrap();
    check_run(&plain, "sd2", &g["latents"], &g["plain.out_latents"], "single-sd2-plain");
    // The two weight sets differ, so the check above tells them apart.
    assert!(common::rel_err(&g["ema.out_latents"], &g["plain.out_latents"]) > 0.05);
}

#[test]
fn the_cli_generates_from_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let sd1 = sd1_single_file(tmp.path()).display().to_string();
    let (ok, err) = common::disendiff(&[
        "generate", "--model", sd1.as_str(), "--config", "tests/fixtures/sd1-tiny",
        "--prompt", "a red ball", "--steps", "2", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("Sd1") && err.contains("epsilon"), "the detection is reported: {err}");
    assert!(out.join("00000.png").is_file());
    // train and attention take the single file as well.
    let (train, att) = (tmp.path().join("train"), tmp.path().join("att"));
    let (ok, err) = common::disendiff(&[
        "train", "--model", sd1.as_str(), "--config", "tests/fixtures/sd1-tiny",
        "--image", "tests/fixtures/golden/sd1-pipe-00000.png", "--caption", "<new1> cat", "--out", train.to_str().unwrap(),
        "--resolution", "64", "--attn-resolution", "8", "--train-batch-size", "1", "--max-train-steps", "1",
    ]);
    assert!(ok, "{err}");
    let concepts = train.join("concepts.safetensors");
    let (ok, err) = common::disendiff(&[
        "attention", "--model", sd1.as_str(), "--config", "tests/fixtures/sd1-tiny",
        "--concepts", concepts.to_str().unwrap(), "--prompt", "a <new1> cat", "--steps", "1", "--resolution", "16",
        "--out", att.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(att.join("overview.png").is_file());
    let (ok, err) = common::disendiff(&["generate", "--model", "tests/fixtures/sd1-tiny", "--ema", "--prompt", "x", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("single-file"), "{err}");
    let (ok, err) =
        common::disendiff(&["generate", "--model", sd1.as_str(), "--prompt", "x", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("--config"), "{err}");
    let (ok, err) = common::disendiff(&[
        "generate", "--model", sd1.as_str(), "--config", "tests/fixtures/sd1-tiny", "--ema",
        "--prompt", "x", "--out", out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("no EMA weights"), "{err}");
}

/// A pickle that calls posix.system (os.system) is refused, by name, and its command does not run.
#[test]
fn a_ckpt_that_would_run_a_command_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let evil = common::fixture("golden/single-evil.ckpt");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff"))
        .current_dir(tmp.path())
        .args(["generate", "--model", evil.to_str().unwrap(), "--config", common::fixture("sd1-tiny").to_str().unwrap()])
        .args(["--prompt", "x", "--steps", "1", "--out", "out"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("posix.system") && err.contains("refused"), "{err}");
    assert!(!tmp.path().join("disendiff_pickle_ran.txt").exists(), "the pickle's command ran");
    assert!(!tmp.path().join("out").exists());
}

/// Writes a torch.save-like zip with the given pickle and storages.
fn write_ckpt(path: &Path, pickle: &[u8], storages: &[(&str, &[u8])]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    for (k, b) in storages {
        z.start_file(format!("archive/data/{k}"), opts).unwrap();
        z.write_all(b).unwrap();
    }
    z.finish().unwrap();
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

/// `('storage', torch.FloatStorage, '0', 'cpu', numel)` followed by BINPERSID.
fn storage_pid(numel: u64) -> Vec<u8> {
    let mut p = vec![b'('];
    p.extend(unicode("storage"));
    p.extend(b"ctorch\nFloatStorage\n");
    p.extend(unicode("0"));
    p.extend(unicode("cpu"));
    p.push(0x8a);
    p.push(8);
    p.extend(numel.to_le_bytes());
    p.extend(b"tQ");
    p
}

fn load_err(path: &Path) -> String {
    match StableDiffusion::load(path, &single_opts("sd1-tiny", false)) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn malformed_files_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // A truncated zip.
    let bytes = std::fs::read(common::fixture("golden/single-sd2-ema.ckpt")).unwrap();
    let p = tmp.path().join("truncated.ckpt");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("not a readable PyTorch checkpoint"), "{e}");
    // An opcode torch.save never writes.
    let p = tmp.path().join("opcode.ckpt");
    write_ckpt(&p, &[0x80, 2, b'}', 0xfe], &[]);
    let e = load_err(&p);
    assert!(e.contains("unsupported pickle opcode 0xfe at byte 3"), "{e}");
    // A pickle that ends too early.
    let p = tmp.path().join("short.ckpt");
    write_ckpt(&p, &[0x80, 2, b'X', 200, 0, 0, 0, b'a'], &[]);
    let e = load_err(&p);
    assert!(e.contains("truncated pickle"), "{e}");
    // A storage claiming 2^50 floats: refused before anything is allocated.
    let p = tmp.path().join("huge.ckpt");
    let mut pk = vec![0x80, 2];
    pk.extend(storage_pid(1 << 50));
    pk.push(b'.');
    write_ckpt(&p, &pk, &[("0", &[0u8; 16])]);
    let e = load_err(&p);
    assert!(e.contains("claims 1125899906842624 elements") && e.contains("more than the file's"), "{e}");
    // A tensor reaching past the end of its storage.
    let p = tmp.path().join("overrun.ckpt");
    let mut pk = vec![0x80, 2, b'}', b'('];
    pk.extend(unicode("model.diffusion_model.input_blocks.0.0.weight"));
    pk.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    pk.extend(storage_pid(4));
    pk.extend([b'K', 0, b'M', 0xe8, 0x03, 0x85, b'K', 1, 0x85, 0x89, b'}', b't', b'R', b'u', b'.']);
    write_ckpt(&p, &pk, &[("0", &[0u8; 16])]);
    let e = load_err(&p);
    assert!(e.contains("reaches element 999 of a storage of 4"), "{e}");
    // A safetensors header claiming a huge tensor.
    let p = tmp.path().join("huge.safetensors");
    let header = br#"{"model.diffusion_model.input_blocks.0.0.weight":{"dtype":"F32","shape":[100000000000],"data_offsets":[0,400000000000]}}"#;
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header).unwrap();
    f.write_all(&[0u8; 8]).unwrap();
    drop(f);
    let e = load_err(&p);
    assert!(e.contains("not a readable safetensors file"), "{e}");
    // A diffusers component file is not a CompVis checkpoint.
    let p = tmp.path().join("unet.safetensors");
    std::fs::copy(common::fixture("sd1-tiny/unet/diffusion_pytorch_model.safetensors"), &p).unwrap();
    let e = load_err(&p);
    assert!(e.contains("no SD 1.x/2.x component"), "{e}");
    // The wrong config for the file: a tensor with no place in it is named.
    let e = match StableDiffusion::load(&sd1_single_file(tmp.path()), &single_opts("sd2-tiny", false)) {
        Ok(_) => panic!("loaded with the wrong config"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("shape") || e.contains("no place"), "{e}");
}

/// Shapes of the keys detection reads, at real SD sizes.
fn real(text: (&str, Vec<usize>), conv_in_channels: usize, context: usize) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    m.insert("model.diffusion_model.input_blocks.0.0.weight".to_string(), vec![320, conv_in_channels, 3, 3]);
    m.insert("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight".to_string(), vec![320, context]);
    m.insert(text.0.to_string(), text.1);
    m
}

#[test]
fn detection_of_real_sizes() {
    let clip = ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", vec![77, 768]);
    let open_clip = ("cond_stage_model.model.token_embedding.weight", vec![49408, 1024]);
    let d = detect(&real(clip.clone(), 4, 768), None).unwrap();
    assert_eq!((d.family, d.inpainting, d.v_prediction, d.context_dim), (Family::Sd1, false, false, Some(768)));
    let d = detect(&real(clip.clone(), 9, 768), None).unwrap();
    assert_eq!((d.family, d.inpainting, d.v_prediction, d.in_channels), (Family::Sd1, true, false, 9));
    let d = detect(&real(open_clip.clone(), 4, 1024), None).unwrap();
    assert_eq!((d.family, d.v_prediction, d.context_dim), (Family::Sd2, true, Some(1024)), "SD2 768: v");
    let d = detect(&real(open_clip.clone(), 4, 1024), Some(875000)).unwrap();
    assert!(!d.v_prediction && d.prediction_reason.contains("875000"), "SD2 512 base: epsilon");
    let d = detect(&real(open_clip.clone(), 9, 1024), None).unwrap();
    assert!(d.inpainting && !d.v_prediction, "SD2 inpainting: epsilon");
    let mut m = real(clip.clone(), 4, 768);
    m.insert("v_pred".into(), vec![]);
    assert!(detect(&m, None).unwrap().v_prediction);
    let mut m = real(clip.clone(), 4, 768);
    m.insert("model_ema.diffusion_modelinput_blocks00weight".into(), vec![320, 4, 3, 3]);
    assert!(detect(&m, None).unwrap().has_ema);
    let mut m = real(clip.clone(), 4, 2048);
    m.insert("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight".into(), vec![77, 768]);
    assert!(format!("{:#}", detect(&m, None).unwrap_err()).contains("SDXL"));
    let e = detect(&real(clip, 5, 768), None).unwrap_err();
    assert!(format!("{e:#}").contains("5 input channels"));
    let mut m = BTreeMap::new();
    m.insert("down_blocks.0.resnets.0.conv1.weight".to_string(), vec![320, 320, 3, 3]);
    assert!(format!("{:#}", detect(&m, None).unwrap_err()).contains("not a CompVis"));
}

/// The 9-channel inpainting model as one file (the sd1 entry's VAE and text encoder with the
/// inpaint_unet entry's UNet of golden/single-names.json, by CompVis name) inpaints as diffusers' inpaint9 golden.
#[test]
fn an_inpainting_single_file_inpaints_as_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut all = compvis_tensors("sd1");
    all.retain(|k, _| !k.starts_with("model.diffusion_model."));
    all.extend(compvis_tensors("inpaint_unet"));
    let model = tmp.path().join("sd1-inpaint.safetensors");
    candle_core::safetensors::save(&all, &model).unwrap();
    // The config folder: sd1-tiny's configs with the inpainting UNet's, and no weights at all.
    let config = tmp.path().join("config");
    common::copy_dir(&common::fixture("sd1-tiny"), &config);
    for c in ["unet", "vae", "text_encoder"] {
        for e in std::fs::read_dir(config.join(c)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "safetensors") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    std::fs::copy(common::fixture("unet-inpaint-tiny/config.json"), config.join("unet/config.json")).unwrap();

    let s = common::settings::golden_json("inpaint9");
    let s = &s["inpaint"];
    let out = tmp.path().join("out");
    let num = |k: &str| s[k].to_string();
    let mut args: Vec<String> = vec!["inpaint".into(), "--model".into(), model.display().to_string(), "--config".into(), config.display().to_string()];
    for (flag, v) in [
        ("--image", common::fixture("golden/inpaint-image.png").display().to_string()),
        ("--mask", common::fixture("golden/inpaint-mask.png").display().to_string()),
        ("--prompt", s["prompt"].as_str().unwrap().to_string()),
        ("--negative-prompt", s["negative_prompt"].as_str().unwrap().to_string()),
        ("--latents", common::fixture("golden/inpaint9-latents.safetensors").display().to_string()),
        ("--out", out.display().to_string()),
        ("--steps", num("steps")),
        ("--guidance-scale", num("guidance_scale")),
        ("--eta", num("eta")),
        ("--strength", num("strength")),
        ("--num-images", num("num_images_per_prompt")),
    ] {
        args.extend([flag.to_string(), v]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, err) = common::disendiff(&refs);
    assert!(ok, "{err}");
    assert!(err.contains("9 UNet input channels (inpainting)"), "{err}");
    for i in 0..s["num_images_per_prompt"].as_u64().unwrap() as usize {
        let got = image::open(out.join(format!("{i:05}.png"))).unwrap().to_rgb8();
        let want = image::open(common::fixture(&format!("golden/inpaint9-{i:05}.png"))).unwrap().to_rgb8();
        let mad = common::images::mean_abs_u8(&got, &want);
        println!("inpaint9 from one file: image {i} mean abs diff {mad:.4} (of 255)");
        assert!(mad <= 1.0, "image {i} differs by {mad}/255");
    }
}

/// The key maps at real SD 1.5 / 2.1 sizes: every CompVis tensor of golden/single-real-keys.json
/// (names and shapes of real files, no weights) gets the diffusers name and shape diffusers'
/// converters give it; detection reads the full lists as SD1 (768) and SD2 (1024).
#[test]
fn key_maps_at_real_sizes_match_diffusers() {
    use disendiff::model::single_file::{diffusers_names, Part};
    let v = common::settings::golden_json("single-real-keys");
    let shapes_of = |o: &serde_json::Value| -> BTreeMap<String, Vec<usize>> {
        o.as_object().unwrap().iter().map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())).collect()
    };
    for (fam, family, layers, context) in [("sd1", Family::Sd1, 12, 768), ("sd2", Family::Sd2, 23, 1024)] {
        let mut all = BTreeMap::new();
        for c in ["unet", "vae", "text_encoder"] {
            all.extend(shapes_of(&v[fam][c]["compvis"]));
        }
        let d = detect(&all, None).unwrap();
        assert_eq!((d.family, d.context_dim, d.in_channels), (family, Some(context), 4), "{fam}");
        for (c, part) in [
            ("unet", Part::Unet { layers_per_block: vec![2; 4], ema: false }),
            ("vae", Part::Vae { num_blocks: 4 }),
            ("text_encoder", Part::TextEncoder { num_layers: layers }),
        ] {
            let want = shapes_of(&v[fam][c]["diffusers"]);
            let got = diffusers_names(&all, &part).unwrap();
            let got: BTreeMap<String, Vec<usize>> = got.into_iter().map(|(k, (_, s))| (k, s)).collect();
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
            assert!(missing.is_empty() && extra.is_empty(), "{fam} {c}: missing {missing:?}, extra {extra:?}");
            for (k, s) in &want {
                assert_eq!(&got[k], s, "{fam} {c}: shape of {k}");
            }
            println!("{fam} {c}: {} diffusers tensors, names and shapes as diffusers'", want.len());
        }
    }
}

/// The built-in configs of each base model (no --config) against the configs diffusers builds
/// for it (golden/single-base-configs.json: diffusers' create_*_diffusers_config_from_ldm and
/// legacy scheduler config on fake real-size state dicts), field by field; the kind comes
/// from detection on the same shapes, and each config parses and validates.
#[test]
fn built_in_configs_match_diffusers() {
    use disendiff::model::single_file::base_configs;
    let golden = common::settings::golden_json("single-base-configs");
    let clip = ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", vec![77, 768]);
    let open_clip = ("cond_stage_model.model.token_embedding.weight", vec![49408, 1024]);
    // Fields of diffusers' configs that no component here reads (PNDM / thresholding options).
    let unread = ["interpolation_type", "sample_max_value", "skip_prk_steps", "dynamic_thresholding_ratio", "thresholding"];
    let kinds = [
        ("sd1", real(clip.clone(), 4, 768), None),
        ("sd1-inpainting", real(clip, 9, 768), None),
        ("sd2-512", real(open_clip.clone(), 4, 1024), Some(875000)),
        ("sd2-768", real(open_clip.clone(), 4, 1024), Some(110000)),
        ("sd2-inpainting", real(open_clip, 9, 1024), None),
    ];
    assert_eq!(golden.as_object().unwrap().len(), kinds.len());
    for (kind, shapes, step) in kinds {
        let built = base_configs(&detect(&shapes, step).unwrap()).unwrap();
        assert_eq!(built.kind, kind);
        for component in ["unet", "vae", "text_encoder", "scheduler"] {
            let want = golden[kind][component].as_object().unwrap();
            let got = built.get(component).unwrap().as_object().unwrap();
            for (k, v) in got {
                let w = want.get(k).unwrap_or_else(|| panic!("{kind} {component}: {k} is not in diffusers' config"));
                let same = match (v.as_f64(), w.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs(),
                    _ => v == w,
                };
                assert!(same, "{kind} {component}.{k}: built-in {v}, diffusers {w}");
            }
            for (k, w) in want {
                if !w.is_null() && !unread.contains(&k.as_str()) {
                    assert!(got.contains_key(k), "{kind} {component}: diffusers sets {k} = {w}, the built-in config does not");
                }
            }
            println!("{kind} {component}: {} fields as diffusers'", got.len());
        }
        let origin = format!("built-in {kind}");
        disendiff::model::clip::ClipTextConfig::from_json(&built.text_encoder.to_string(), &origin).unwrap();
        disendiff::model::unet::UNetConfig::from_json_str(&built.unet.to_string()).unwrap();
        disendiff::model::vae::VaeConfig::from_json(&built.vae.to_string()).unwrap();
        let s = disendiff::scheduler::SchedulerConfig::from_json(&built.scheduler.to_string()).unwrap();
        let v = s.prediction_type == disendiff::scheduler::PredictionType::VPrediction;
        assert_eq!(v, kind == "sd2-768", "{kind}: {:?}", s.prediction_type);
    }
    // A UNet attending to a width no base model has is not guessed at.
    let e = base_configs(&detect(&real(("cond_stage_model.model.token_embedding.weight", vec![49408, 1024]), 4, 1280), None).unwrap());
    assert!(format!("{:#}", e.unwrap_err()).contains("1280"));
}

/// The bundled CLIP tokenizer (no tokenizer files) gives transformers' CLIPTokenizer ids
/// (golden/single-tokenizer.json, built from the same merges by the reference script), with
/// SD1's pad token and SD2's "!", and after adding `<new1>`.
#[test]
fn bundled_tokenizer_matches_transformers() {
    let golden = common::settings::golden_json("single-tokenizer");
    for (fam, family) in [("sd1", Family::Sd1), ("sd2", Family::Sd2)] {
        let g = &golden[fam];
        let mut tok = disendiff::model::tokenizer::ClipTokenizer::bundled(family).unwrap();
        assert_eq!(tok.vocab_size() as u64, g["vocab_size"].as_u64().unwrap());
        let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect() };
        for (prompt, want) in g["ids"].as_object().unwrap() {
            assert_eq!(tok.encode(prompt).ids, ids(want), "{fam}: {prompt:?}");
        }
        let added = &g["added"];
        assert_eq!(tok.add_token(added["token"].as_str().unwrap()).unwrap() as u64, added["id"].as_u64().unwrap());
        assert_eq!(tok.encode(added["prompt"].as_str().unwrap()).ids, ids(&added["ids"]), "{fam}: after adding <new1>");
        println!("{fam}: {} prompts and <new1> as transformers'", g["ids"].as_object().unwrap().len());
    }
}
