//! `disendiff export` against the real diffusers and exact identities.
//!
//! The concept file golden/export-concepts.safetensors (a short `disendiff train` run on
//! sd1-tiny) was exported with `--format diffusers` and `--format webui` into
//! golden/export-diffusers/ and golden/export-webui/, which tools/reference/make_export_check.py
//! loaded into diffusers with the calls the README shows (and checked that it applied them).
//! - Re-exporting the concept file gives those files tensor for tensor, bit for bit;
//! - `generate --concepts FILE` (and `--concepts DIR`, the Custom Diffusion folder read back, also
//!   without disendiff's metadata as diffusers' own training script writes it) on the same
//!   latents gives diffusers' PNGs within 1/255, while diffusers' image clearly differs from the
//!   plain model's and from the embedding alone (so a skipped K/V load fails);
//! - the webui file (`full` and `diff`) read by the project's own `--lora` loader gives base + D =
//!   the trained K/V within f32 rounding; `lowrank` reports its error, which matches the SVD's;
//! - the webui key names are the ones ComfyUI's and A1111's loaders map for every attn2 to_k/to_v
//!   of the SD1 and SD2 layouts (golden/export-keymaps.json, from their source).

mod common;

use candle_core::{DType, Device, Tensor};
use disendiff::formats::concept_file;
use disendiff::model::sd::LoadOptions;
use disendiff::patch::{LoraSpec, PatchedModel};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn sd1() -> PathBuf {
    common::fixture("sd1-tiny")
}

fn concepts() -> PathBuf {
    common::fixture("golden/export-concepts.safetensors")
}

fn s(p: &Path) -> &'static str {
    p.to_str().unwrap().to_owned().leak()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn header_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    h.metadata().clone().unwrap_or_default()
}

fn export(out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["export", "--concepts", s(&concepts()), "--model", s(&sd1()), "--out", s(out)];
    args.extend_from_slice(extra);
    common::disendiff(&args)
}

/// Every tensor of every safetensors file under `got` equals the one under `want` bit for bit,
/// and the two trees hold the same files and keys.
fn same_tree(got: &Path, want: &Path) {
    let list = |d: &Path| {
        let mut v: Vec<String> = Vec::new();
        for e in walk(d) {
            v.push(e.strip_prefix(d).unwrap().display().to_string());
        }
        v.sort();
        v
    };
    assert_eq!(list(got), list(want), "the files of {} and {}", got.display(), want.display());
    for rel in list(want) {
        let (g, w) = (load(&got.join(&rel)), load(&want.join(&rel)));
        let mut gk: Vec<&String> = g.keys().collect();
        let mut wk: Vec<&String> = w.keys().collect();
        gk.sort();
        wk.sort();
        assert_eq!(gk, wk, "{rel}: keys");
        for k in wk {
            assert_eq!(g[k].dims(), w[k].dims(), "{rel}: {k}");
            assert_eq!(bits(&g[k]), bits(&w[k]), "{rel}: {k} differs from what diffusers consumed");
        }
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn re_export_gives_the_files_diffusers_consumed() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = export(&tmp.path().join("d"), &["--format", "diffusers"]);
    assert!(ok, "{err}");
    same_tree(&tmp.path().join("d"), &common::fixture("golden/export-diffusers"));
    let (ok, err) = export(&tmp.path().join("w"), &["--format", "webui", "--name", "export"]);
    assert!(ok, "{err}");
    same_tree(&tmp.path().join("w"), &common::fixture("golden/export-webui"));
}

#[test]
fn diffusers_folder_names_every_attention_layer_and_holds_the_trained_kv() {
    let file = concept_file::load(&concepts()).unwrap();
    let cd = load(&common::fixture("golden/export-diffusers/pytorch_custom_diffusion_weights.safetensors"));
    let unet = load(&sd1().join("unet/diffusion_pytorch_model.safetensors"));
    let modules: Vec<&str> = unet.keys().filter_map(|k| k.strip_suffix(".to_q.weight")).collect();
    let mut named = 0;
    for m in &modules {
        match (cd.get(&format!("{m}.processor")), cd.get(&format!("{m}.processor.to_k_custom_diffusion.weight"))) {
            (Some(e), None) => assert_eq!(e.dims(), &[0], "{m}: an empty entry"),
            (None, Some(k)) => {
                let v = &cd[&format!("{m}.processor.to_v_custom_diffusion.weight")];
                assert_eq!(bits(k), bits(&file.unet_weights[&format!("{m}.to_k.weight")]));
                assert_eq!(bits(v), bits(&file.unet_weights[&format!("{m}.to_v.weight")]));
            }
            other => panic!("{m}: {other:?}"),
        }
        named += 1;
    }
    let trained = cd.keys().filter(|k| k.ends_with("to_k_custom_diffusion.weight")).count();
    assert_eq!(trained * 2, file.unet_weights.len());
    assert!(modules.iter().any(|m| m.ends_with("attn1")) && trained > 0);
    assert_eq!(cd.len(), named + trained, "an entry per attention layer and nothing else");
    let emb = load(&common::fixture("golden/export-diffusers/new1.safetensors"));
    assert_eq!(emb.len(), 1);
    assert_eq!(bits(&emb["<new1>"]), bits(&file.embeddings.get(0).unwrap()));
}

fn mean_abs_png(a: &Path, b: &Path) -> f64 {
    let (a, b) = (image::open(a).unwrap().to_rgb8(), image::open(b).unwrap().to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.as_raw().len() as f64
}

/// `disendiff generate` with make_export_check.py's call and `--concepts C`.
fn generate(out: &Path, concepts: &Path) -> String {
    let latents = common::fixture("golden/export-latents.safetensors");
    let (ok, err) = common::disendiff(&[
        "generate", "--model", s(&sd1()), "--prompt", "photo of a <new1> cat", "--steps", "10", "--guidance-scale", "6",
        "--num-images", "2", "--height", "64", "--width", "64", "--latents", s(&latents), "--concepts", s(concepts),
        "--strict-tokens", "--out", s(out),
    ]);
    assert!(ok, "{err}");
    err
}

fn golden_png(name: &str, i: usize) -> PathBuf {
    common::fixture(&format!("golden/export-{name}-{i:05}.png"))
}

/// The images of `out` against diffusers' with the exported files.
fn check_images(out: &Path, what: &str) {
    for i in 0..2 {
        let got = out.join(format!("{i:05}.png"));
        for name in ["cd", "webui"] {
            let mad = mean_abs_png(&got, &golden_png(name, i));
            println!("{what}: image {i} vs diffusers with the {name} export: mean abs diff {mad:.4} (of 255)");
            assert!(mad <= 1.0, "{what}: image {i} differs from diffusers' ({name}) by {mad}/255");
        }
        for (name, min) in [("base", 3.0), ("ti", 1.5)] {
            let off = mean_abs_png(&golden_png("cd", i), &golden_png(name, i));
            println!("diffusers: image {i} with the concepts vs {name}: {off:.4}");
            assert!(off >= min, "diffusers' image {i} hardly differs from the {name} image ({off}/255): the export was not applied");
        }
    }
}

#[test]
fn generate_with_the_concept_file_matches_diffusers_with_the_exports() {
    let tmp = tempfile::tempdir().unwrap();
    generate(&tmp.path().join("out"), &concepts());
    check_images(&tmp.path().join("out"), "--concepts FILE");
}

#[test]
fn generate_with_the_custom_diffusion_folder_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let err = generate(&tmp.path().join("out"), &common::fixture("golden/export-diffusers"));
    assert!(!err.contains("does not record"), "{err}");
    check_images(&tmp.path().join("out"), "--concepts DIR");

    // as diffusers' training script writes it: no metadata, the embedding file named by its token
    let dir = tmp.path().join("plain");
    std::fs::create_dir_all(&dir).unwrap();
    let w = load(&common::fixture("golden/export-diffusers/pytorch_custom_diffusion_weights.safetensors"));
    candle_core::safetensors::save(&w, dir.join("pytorch_custom_diffusion_weights.safetensors")).unwrap();
    std::fs::copy(common::fixture("golden/export-diffusers/new1.safetensors"), dir.join("<new1>.safetensors")).unwrap();
    assert!(header_metadata(&dir.join("pytorch_custom_diffusion_weights.safetensors")).get("format").is_none());
    let err = generate(&tmp.path().join("out2"), &dir);
    assert!(err.contains("does not record the model it was trained on"), "{err}");
    check_images(&tmp.path().join("out2"), "--concepts DIR without metadata");
}

/// K/V of sd1-tiny with a webui file applied by the project's `--lora` loader vs the trained ones.
fn check_lora_reproduces(file: &Path) -> f32 {
    let trained = concept_file::load(&concepts()).unwrap();
    let spec = LoraSpec { path: file.to_path_buf(), scale: 1.0 };
    let (m, warnings) = PatchedModel::load_with_loras(&sd1(), &LoadOptions::default(), &[spec], false).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let base = load(&sd1().join("unet/diffusion_pytorch_model.safetensors"));
    let mut worst = 0f32;
    for (n, t) in &trained.unet_weights {
        let got = m.sd.weight_var(n).unwrap().as_tensor().copy().unwrap();
        let err = max_abs(&got, t);
        // base + (trained - base) in f32: at most a rounding of the sum
        let tol = 2.0 * f32::EPSILON * max_abs(t, &t.zeros_like().unwrap()).max(max_abs(&base[n], &base[n].zeros_like().unwrap()));
        assert!(err <= tol, "{}: {n} is off by {err} (> {tol})", file.display());
        assert!(max_abs(t, &base[n]) > 1e-4, "{n}: the training did not move it");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn webui_full_and_diff_reproduce_the_trained_kv_through_the_lora_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let worst = check_lora_reproduces(&common::fixture("golden/export-webui/export.safetensors"));
    println!("full: worst abs error {worst:.2e}");
    let (ok, err) = export(&tmp.path().join("diff"), &["--format", "webui", "--lora-format", "diff", "--names", "new1=mycat"]);
    assert!(ok, "{err}");
    let f = tmp.path().join("diff/export-concepts.safetensors");
    let t = load(&f);
    assert!(t.keys().all(|k| k.ends_with(".diff") && k.starts_with("lora_unet_")), "{:?}", t.keys());
    let worst = check_lora_reproduces(&f);
    println!("diff: worst abs error {worst:.2e}");
    let emb = load(&tmp.path().join("diff/embeddings/mycat.safetensors"));
    let file = concept_file::load(&concepts()).unwrap();
    assert_eq!(emb.len(), 1);
    assert_eq!(emb["emb_params"].dims(), &[1, file.embeddings.dim(1).unwrap()]);
    assert_eq!(bits(&emb["emb_params"]), bits(&file.embeddings));

    // the full file: only K/V entries, kohya's metadata
    let full = common::fixture("golden/export-webui/export.safetensors");
    let t = load(&full);
    assert_eq!(t.len(), 3 * file.unet_weights.len());
    assert!(t.keys().all(|k| k.starts_with("lora_unet_") && (k.contains("attn2_to_k.") || k.contains("attn2_to_v."))));
    let meta = header_metadata(&full);
    assert_eq!(meta.get("ss_network_module").map(String::as_str), Some("networks.lora"), "{meta:?}");
    assert!(meta.contains_key("ss_network_dim") && meta.contains_key("ss_network_alpha"), "{meta:?}");
}

#[test]
fn webui_lowrank_reports_the_error_of_its_svd() {
    let tmp = tempfile::tempdir().unwrap();
    let file = concept_file::load(&concepts()).unwrap();
    let base = load(&sd1().join("unet/diffusion_pytorch_model.safetensors"));
    let (name, trained) = file.unet_weights.iter().next().unwrap();
    let d = (trained - &base[name]).unwrap();
    let full_rank = d.dims().iter().copied().min().unwrap();
    let mut errors = Vec::new();
    for rank in [1, 2, full_rank] {
        let out = tmp.path().join(format!("r{rank}"));
        let (ok, err) = export(&out, &["--format", "webui", "--lora-format", "lowrank", "--rank", &rank.to_string()]);
        assert!(ok, "{err}");
        let line = err.lines().find(|l| l.trim_start().starts_with(name.as_str())).unwrap_or_else(|| panic!("no error reported for {name}:\n{err}"));
        let reported: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        // the error of the file's own factors
        let t = load(&out.join("export-concepts.safetensors"));
        let m = format!("lora_unet_{}", name.strip_suffix(".weight").unwrap().replace('.', "_"));
        let (up, down) = (&t[&format!("{m}.lora_up.weight")], &t[&format!("{m}.lora_down.weight")]);
        let alpha = t[&format!("{m}.alpha")].to_scalar::<f32>().unwrap() as f64;
        assert_eq!(down.dim(0).unwrap(), rank);
        assert_eq!(alpha, rank as f64);
        let approx = up.matmul(down).unwrap();
        let actual = common::rel_err(&approx, &d);
        println!("rank {rank}: reported {reported:.4}, measured {actual:.6}");
        assert!((reported - actual).abs() <= 1e-4, "rank {rank}: reported {reported}, measured {actual}");
        errors.push(actual);
    }
    assert!(errors[0] > errors[1] && errors[1] > errors[2], "{errors:?}");
    assert!(errors[0] > 1e-3, "rank 1 of a trained difference should lose something: {errors:?}");
    assert!(errors[2] < 1e-5, "full rank must be lossless up to f32: {errors:?}");
}

/// A1111's `convert_diffusers_name_to_compvis` for attention modules (its regexes, as quoted in
/// golden/export-keymaps.json).
fn a1111_compvis(key: &str) -> Option<String> {
    let re = |p: &str| regex::Regex::new(p).unwrap();
    if let Some(c) = re(r"^lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$").captures(key) {
        let (b, i): (usize, usize) = (c[1].parse().unwrap(), c[3].parse().unwrap());
        return Some(format!("diffusion_model_input_blocks_{}_{}_{}", 1 + b * 3 + i, if &c[2] == "attentions" { 1 } else { 0 }, &c[4]));
    }
    if let Some(c) = re(r"^lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)$").captures(key) {
        let i: usize = c[2].parse().unwrap();
        return Some(format!("diffusion_model_middle_block_{}_{}", if &c[1] == "attentions" { 1 } else { i * 2 }, &c[3]));
    }
    if let Some(c) = re(r"^lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$").captures(key) {
        let (b, i): (usize, usize) = (c[1].parse().unwrap(), c[3].parse().unwrap());
        return Some(format!("diffusion_model_output_blocks_{}_{}_{}", b * 3 + i, if &c[2] == "attentions" { 1 } else { 0 }, &c[4]));
    }
    None
}

#[test]
fn webui_key_names_are_what_comfyui_and_a1111_map_for_sd1_and_sd2() {
    let data: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/export-keymaps.json")).unwrap()).unwrap();
    for layout in ["sd1", "sd2"] {
        let l = &data["layouts"][layout];
        let kv: Vec<&str> = l["diffusers_kv"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(kv.len(), 32, "{layout}");
        let comfy = l["comfyui_key_map"].as_object().unwrap();
        let a1111: Vec<&str> = l["a1111_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let mut mine = Vec::new();
        for name in kv {
            let key = disendiff::formats::export::webui::kohya_module(name.strip_suffix(".weight").unwrap());
            let target = comfy.get(&key).unwrap_or_else(|| panic!("{layout}: ComfyUI maps no {key}"));
            let compvis = a1111_compvis(&key).unwrap_or_else(|| panic!("{layout}: A1111 converts no {key}"));
            assert!(a1111.contains(&compvis.as_str()), "{layout}: A1111 finds no module {compvis} for {key}");
            // both tools land on the same CompVis layer
            assert_eq!(format!("diffusion_model.{}", compvis.strip_prefix("diffusion_model_").unwrap()).replace('_', "."),
                target.as_str().unwrap().strip_suffix(".weight").unwrap().replace('_', "."), "{layout}: {key}");
            mine.push(key);
        }
        mine.sort();
        mine.dedup();
        assert_eq!(mine.len(), 32, "{layout}: the names are distinct");
    }
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let (ok, err) = common::disendiff(&["export", "--concepts", s(&concepts()), "--model", s(&common::fixture("sd2-tiny")),
        "--format", "diffusers", "--out", s(&out)]);
    assert!(!ok && (err.contains("not the model") || err.contains("shape")), "{err}");
    let (ok, err) = export(&out, &["--format", "webui", "--rank", "2"]);
    assert!(!ok && err.contains("--rank belongs to --lora-format lowrank"), "{err}");
    let (ok, err) = export(&out, &["--format", "webui", "--lora-format", "lowrank"]);
    assert!(!ok && err.contains("needs --rank"), "{err}");
    let (ok, err) = export(&out, &["--format", "webui", "--names", "new7=x"]);
    assert!(!ok && err.contains("no token new7"), "{err}");
    let (ok, err) = export(&out, &["--format", "diffusers", "--lora-format", "diff"]);
    assert!(!ok && err.contains("belong to --format webui"), "{err}");
    assert!(!out.exists(), "nothing written on an error");
}

#[test]
fn svd_of_the_trained_differences_matches_numpy_and_the_lowrank_error_is_optimal() {
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/export.json")).unwrap()).unwrap();
    let numpy = info["singular_values_of_differences"].as_object().unwrap();
    let file = concept_file::load(&concepts()).unwrap();
    let base = load(&sd1().join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(numpy.len(), file.unet_weights.len());
    let mut worst = 0f64;
    for (name, trained) in &file.unet_weights {
        let d = (trained.to_dtype(DType::F64).unwrap() - base[name].to_dtype(DType::F64).unwrap()).unwrap();
        let (m, n) = d.dims2().unwrap();
        let vals = d.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let svd = disendiff::formats::export::svd::svd(&vals, m, n);
        let want: Vec<f64> = numpy[name].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(svd.s.len(), want.len(), "{name}");
        for (a, b) in svd.s.iter().zip(&want) {
            let err = (a - b).abs() / want[0];
            worst = worst.max(err);
            assert!(err <= 1e-10, "{name}: singular value {a} vs numpy's {b}");
        }
    }
    println!("{} differences: worst singular-value error vs numpy {worst:.2e} (of the largest)", numpy.len());

    // Eckart-Young: rank 1 loses exactly the tail of numpy's singular values
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = export(&tmp.path().join("r1"), &["--format", "webui", "--lora-format", "lowrank", "--rank", "1"]);
    assert!(ok, "{err}");
    for (name, sv) in numpy {
        let sv: Vec<f64> = sv.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let total: f64 = sv.iter().map(|x| x * x).sum();
        let optimum = (sv[1..].iter().map(|x| x * x).sum::<f64>() / total).sqrt();
        let line = err.lines().find(|l| l.trim_start().starts_with(&format!("{name}:"))).unwrap();
        let reported: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((reported - optimum).abs() <= 1e-4, "{name}: reported {reported}, Eckart-Young {optimum}");
    }
}

#[test]
fn custom_diffusion_folders_that_disendiff_cannot_apply_are_refused() {
    use disendiff::formats::custom_diffusion;
    let tmp = tempfile::tempdir().unwrap();
    let src = common::fixture("golden/export-diffusers");
    let setup = |name: &str| {
        let d = tmp.path().join(name);
        common::copy_dir(&src, &d);
        d
    };
    // a trained query/output (train_q_out) is not silently dropped
    let d = setup("q");
    let mut w = load(&d.join("pytorch_custom_diffusion_weights.safetensors"));
    let k = w.keys().find(|k| k.ends_with("to_k_custom_diffusion.weight")).unwrap().clone();
    w.insert(k.replace("to_k_custom", "to_q_custom"), w[&k].clone());
    candle_core::safetensors::save(&w, d.join("pytorch_custom_diffusion_weights.safetensors")).unwrap();
    let err = custom_diffusion::load(&d).err().unwrap().to_string();
    assert!(err.contains("train_q_out"), "{err}");
    // an embedding file with two tensors
    let d = setup("two");
    let e = load(&d.join("new1.safetensors"));
    let mut two = e.clone();
    two.insert("<new9>".into(), e["<new1>"].clone());
    candle_core::safetensors::save(&two, d.join("new1.safetensors")).unwrap();
    let err = custom_diffusion::load(&d).err().unwrap().to_string();
    assert!(err.contains("holds 2"), "{err}");
    // no embedding for a concept of the metadata
    let d = setup("none");
    std::fs::remove_file(d.join("new1.safetensors")).unwrap();
    let err = custom_diffusion::load(&d).err().unwrap().to_string();
    assert!(err.contains("no embedding file for <new1>"), "{err}");
    // a folder without the weights file
    let err = custom_diffusion::load(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("is not a Custom Diffusion folder"), "{err}");
    // read back: the same concepts as the file
    let a = custom_diffusion::load(&src).unwrap();
    let b = concept_file::load(&concepts()).unwrap();
    assert_eq!(a.meta.concept, b.meta.concept);
    assert_eq!(a.meta.base_model, b.meta.base_model);
    assert_eq!(a.unet_weights.keys().collect::<Vec<_>>(), b.unet_weights.keys().collect::<Vec<_>>());
    for (n, t) in &a.unet_weights {
        assert_eq!(bits(t), bits(&b.unet_weights[n]), "{n}");
    }
    assert_eq!(bits(&a.embeddings), bits(&b.embeddings));
}
