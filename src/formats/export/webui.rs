//! `export --format webui`: a concept file as one kohya-named network file (AUTOMATIC1111's
//! Lora extension, ComfyUI's LoRA loader, InvokeAI, kohya's scripts) plus one embedding file
//! per modifier token.
//!
//! - `DIR/<name>.safetensors`: per trained K/V weight, the difference D = W_trained - W_base
//!   under `lora_unet_<diffusers module path, '.' -> '_'>`:
//!   - `full` (default): `.lora_up.weight` = D [out, R], `.lora_down.weight` = I [R, in], `.alpha` = R
//!     with R the largest input size of the file's weights (the text encoder's width for attn2
//!     K/V: one R for all), zero-padded where a weight's input is smaller; so up @ down x alpha / R
//!     = D exactly: lossless, and the form all those tools and diffusers' `load_lora_weights`
//!     apply (docs/formats.md). One rank and one alpha for the whole file because diffusers
//!     (0.42) applies only the most common alpha of a kohya file (its per-module `alpha_pattern`
//!     matches no module), so a factorisation of rank min(out, in) per weight (alpha = its rank)
//!     would be scaled wrongly there;
//!   - `diff`: `.diff` = D (A1111, ComfyUI and InvokeAI read it; diffusers does not);
//!   - `lowrank` N: the top N singular triplets (`svd`), up = U S, down = Vᵀ, alpha = N, with
//!     the relative Frobenius error ‖D - up @ down‖ / ‖D‖ it introduces reported;
//!   - only K/V entries (ComfyUI warns about embeddings bundled into a LoRA file), and kohya's
//!     `ss_*` metadata.
//! - `DIR/embeddings/<trigger>.safetensors`: `emb_params` [1, dim]; the trigger word is the file
//!   name (the token without `<>` unless renamed).

use super::svd::svd;
use super::{split_kv, token_stem, write_safetensors, Base};
use crate::formats::concept_file::ConceptFile;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How the K/V differences are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraForm {
    Full,
    Diff,
    LowRank(usize),
}

/// kohya's name of a UNet module given by its diffusers path.
pub fn kohya_module(module: &str) -> String {
    format!("lora_unet_{}", module.replace('.', "_"))
}

/// The network file's tensors and, for `lowrank`, the relative error of each weight (by name).
pub struct Network {
    pub tensors: Vec<(String, Tensor)>,
    pub errors: Vec<(String, f64)>,
    /// The largest rank written (for `ss_network_dim`); 0 for `diff`.
    pub rank: usize,
}

fn eye(n: usize) -> Result<Tensor> {
    Ok(Tensor::eye(n, DType::F32, &Device::Cpu)?)
}

/// ‖a - b‖_F / ‖b‖_F in f64.
fn rel_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let n = b.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok(if n > 0.0 { (d / n).sqrt() } else { d.sqrt() })
}

/// The top `rank` factors (up = U S [out, r], down = Vᵀ [r, in]) of `d` [out, in].
fn low_rank(d: &Tensor, rank: usize) -> Result<(Tensor, Tensor)> {
    let (out, inp) = d.dims2()?;
    let vals = d.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let s = svd(&vals, out, inp);
    let (k, r) = (s.k(), rank.min(s.k()));
    let mut up = vec![0f32; out * r];
    for i in 0..out {
        for t in 0..r {
            up[i * r + t] = (s.u[i * k + t] * s.s[t]) as f32;
        }
    }
    let mut down = vec![0f32; r * inp];
    for t in 0..r {
        for j in 0..inp {
            down[t * inp + j] = s.v[j * k + t] as f32;
        }
    }
    Ok((Tensor::from_vec(up, (out, r), &Device::Cpu)?, Tensor::from_vec(down, (r, inp), &Device::Cpu)?))
}

/// The network tensors of `file` against `base` (which holds the base value of every weight).
pub fn network(file: &ConceptFile, base: &Base, form: LoraForm) -> Result<Network> {
    if let LoraForm::LowRank(0) = form {
        bail!("--rank must be at least 1");
    }
    let mut tensors = Vec::new();
    let mut errors = Vec::new();
    let mut max_rank = 0;
    // `full`: one rank for all, the largest input size
    let mut full_rank = 0;
    for t in file.unet_weights.values() {
        full_rank = full_rank.max(t.dims().get(1).copied().unwrap_or(0));
    }
    for (name, trained) in &file.unet_weights {
        split_kv(name)?;
        let b = base.weights.get(name).with_context(|| format!("the base model has no {name}"))?;
        let d = (trained.to_dtype(DType::F32)? - b)?;
        let (out, inp) = d.dims2().with_context(|| format!("{name} is not a matrix"))?;
        let key = kohya_module(name.strip_suffix(".weight").unwrap_or(name));
        let (up, down, r) = match form {
            LoraForm::Diff => {
                tensors.push((format!("{key}.diff"), d));
                continue;
            }
            LoraForm::Full => {
                let r = full_rank;
                let (up, down) = if inp == r {
                    (d, eye(r)?)
                } else {
                    (Tensor::cat(&[&d, &Tensor::zeros((out, r - inp), DType::F32, &Device::Cpu)?], 1)?, Tensor::cat(&[&eye(inp)?, &Tensor::zeros((r - inp, inp), DType::F32, &Device::Cpu)?], 0)?)
                };
                (up, down, r)
            }
            LoraForm::LowRank(n) => {
                let (up, down) = low_rank(&d, n)?;
                errors.push((name.clone(), rel_error(&up.matmul(&down)?, &d)?));
                let r = up.dim(1)?;
                (up, down, r)
            }
        };
        max_rank = max_rank.max(r);
        tensors.push((format!("{key}.lora_up.weight"), up));
        tensors.push((format!("{key}.lora_down.weight"), down));
        tensors.push((format!("{key}.alpha"), Tensor::new(r as f32, &Device::Cpu)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Network { tensors, errors, rank: max_rank })
}

/// kohya's `ss_*` metadata of the network file.
fn metadata(file: &ConceptFile, name: &str, form: LoraForm, rank: usize) -> HashMap<String, String> {
    let width = file.embeddings.dims().get(1).copied().unwrap_or(0);
    let (version, v2) = match width {
        1024 => ("sd_v2", "True"),
        _ => ("sd_v1", "False"),
    };
    let concepts: Vec<String> = file.meta.concept.iter().map(|c| format!("{} {}", c.modifier, c.class_word)).collect();
    HashMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), rank.to_string()),
        ("ss_network_alpha".to_string(), rank.to_string()),
        ("ss_output_name".to_string(), name.to_string()),
        ("ss_base_model_version".to_string(), version.to_string()),
        ("ss_v2".to_string(), v2.to_string()),
        ("ss_sd_model_name".to_string(), file.meta.base_model.path.clone()),
        (
            "ss_training_comment".to_string(),
            format!(
                "disendiff {} concepts ({}), cross-attention K/V as {}",
                file.meta.method,
                concepts.join(", "),
                match form {
                    LoraForm::Full => "full-rank lora_up/lora_down".to_string(),
                    LoraForm::Diff => "diff".to_string(),
                    LoraForm::LowRank(n) => format!("rank-{n} SVD"),
                }
            ),
        ),
    ])
}

/// What `write` wrote.
pub struct Written {
    pub files: Vec<PathBuf>,
    /// `lowrank`: the relative error of each weight.
    pub errors: Vec<(String, f64)>,
}

/// The trigger word of each concept: the token stem, or what `names` maps it (its stem or the
/// token itself) to. A name of `names` that is no modifier is an error.
pub fn trigger_words(file: &ConceptFile, names: &HashMap<String, String>) -> Result<Vec<String>> {
    let mut words = Vec::new();
    for c in &file.meta.concept {
        let stem = token_stem(&c.modifier)?;
        let word = names.get(&stem).or_else(|| names.get(&c.modifier)).cloned().unwrap_or(stem);
        words.push(token_stem(&word)?);
    }
    for k in names.keys() {
        if !file.meta.concept.iter().any(|c| &c.modifier == k || token_stem(&c.modifier).ok().as_ref() == Some(k)) {
            let have: Vec<&str> = file.meta.concept.iter().map(|c| c.modifier.as_str()).collect();
            bail!("--names {k}=...: the concept file has no token {k} (it has {})", have.join(", "));
        }
    }
    for (i, w) in words.iter().enumerate() {
        if words[..i].contains(w) {
            bail!("two concepts would get the trigger word {w}");
        }
    }
    Ok(words)
}

/// Writes `out/<name>.safetensors` and `out/embeddings/<trigger>.safetensors`.
pub fn write(file: &ConceptFile, base: &Base, form: LoraForm, out: &Path, name: &str, names: &HashMap<String, String>) -> Result<Written> {
    let stem = token_stem(name).with_context(|| format!("--name {name}"))?;
    let words = trigger_words(file, names)?;
    let net = network(file, base, form)?;
    let mut files = Vec::new();
    let path = out.join(format!("{stem}.safetensors"));
    write_safetensors(&path, &net.tensors, metadata(file, &stem, form, net.rank))?;
    files.push(path);
    files.extend(write_embeddings(file, out, &words)?);
    Ok(Written { files, errors: net.errors })
}

/// Writes `out/embeddings/<word>.safetensors` (`emb_params` [1, dim]) for each concept, the
/// trigger words as [`trigger_words`] gives them.
pub fn write_embeddings(file: &ConceptFile, out: &Path, words: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let path = out.join("embeddings").join(format!("{w}.safetensors"));
        let row = file.embeddings.get(i)?.to_dtype(DType::F32)?.unsqueeze(0)?;
        write_safetensors(&path, &[("emb_params".to_string(), row)], HashMap::new())?;
        files.push(path);
    }
    Ok(files)
}
