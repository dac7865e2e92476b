//! A complete fine-tuned diffusers folder (the result of `train --method dreambooth`): what
//! `StableDiffusionPipeline.from_pretrained(DIR)` and `disendiff generate --model DIR` load.
//!
//! Written from the base diffusers folder and the trained tensors:
//! - `model_index.json`, `scheduler/`, `vae/` copied as given;
//! - `unet/`: the base config and `diffusion_pytorch_model.safetensors` with every trained
//!   tensor (f32, as trained) and any base tensor the model did not load copied unchanged;
//! - `text_encoder/`: the base weights, or the fine-tuned ones where the text encoder trained
//!   (`--train-text-encoder`, f32 as trained), with the token table ([`TOKEN_TABLE`]) extended
//!   by the new tokens' rows (in the table's dtype) and `vocab_size` raised to match in
//!   `config.json`;
//! - `tokenizer/`: the base files with the new tokens added as transformers writes them:
//!   `added_tokens_decoder` of `tokenizer_config.json` (and `added_tokens` of `tokenizer.json`
//!   where the base has one), so `<new1>` tokenizes to its new id.
//!
//! The folder is built under a temporary name next to `out` and renamed into place at the end,
//! so a failed write leaves no half folder at `out`.

use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The text encoder's token table, by transformers' `CLIPTextModel` keys (transformers 5 saves
/// it without the `text_model.` prefix).
pub const TOKEN_TABLE: [&str; 2] = ["text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"];

/// What goes into the folder besides the copied parts.
pub struct FineTuned<'a> {
    /// Every trained UNet tensor by its diffusers name.
    pub unet: &'a [(String, Tensor)],
    /// Every trained text encoder tensor by its transformers name without `text_model.`
    /// (empty when the text encoder stayed frozen).
    pub text_encoder: &'a [(String, Tensor)],
    /// The new tokens with their ids (consecutive, from the base vocabulary size on).
    pub tokens: &'a [(String, u32)],
    /// Their embedding rows [n, hidden].
    pub rows: &'a Tensor,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n").with_context(|| format!("writing {}", path.display()))
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to).with_context(|| format!("copying {} to {}", entry.path().display(), to.display()))?;
        }
    }
    Ok(())
}

/// The one `.safetensors` weights file of a component folder (`unet/`, `text_encoder/`),
/// preferring the full-precision name.
fn weights_file(dir: &Path, names: &[&str]) -> Result<std::path::PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).with_context(|| {
        format!("{} has none of {} (a diffusers folder with safetensors weights is needed)", dir.display(), names.join(", "))
    })
}

fn save(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?))).collect::<Result<_>>()?;
    let bytes = safetensors::serialize(cpu.iter().map(|(k, t)| (k.as_str(), t)), None)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn write_unet(base: &Path, dir: &Path, trained: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(base.join("config.json"), dir.join("config.json")).with_context(|| format!("copying {}/config.json", base.display()))?;
    let file = weights_file(base, &["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"])?;
    // SAFETY: the base weights are only read while this function runs.
    let st = unsafe { MmapedSafetensors::new(&file) }.with_context(|| format!("reading {}", file.display()))?;
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let base_names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    for (name, t) in trained {
        if !base_names.contains(name) {
            bail!("trained UNet tensor {name} is not in {}", file.display());
        }
        out.insert(name.clone(), t.to_dtype(DType::F32)?);
    }
    for name in base_names {
        if !out.contains_key(&name) {
            let t = st.load(&name, &Device::Cpu)?;
            out.insert(name, t);
        }
    }
    save(&dir.join("diffusion_pytorch_model.safetensors"), &out)
}

fn write_text_encoder(base: &Path, dir: &Path, ft: &FineTuned) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut config = read_json(&base.join("config.json"))?;
    let vocab = config["vocab_size"].as_u64().with_context(|| format!("{}/config.json has no vocab_size", base.display()))? as usize;
    let file = weights_file(base, &["model.safetensors", "model.fp16.safetensors"])?;
    // SAFETY: as in `write_unet`.
    let st = unsafe { MmapedSafetensors::new(&file) }.with_context(|| format!("reading {}", file.display()))?;
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, _) in st.tensors() {
        let t = st.load(&name, &Device::Cpu)?;
        out.insert(name, t);
    }
    // The file's keys carry `text_model.` (SD folders) or not (transformers 5).
    let prefixed = out.keys().any(|k| k.starts_with("text_model."));
    for (name, t) in ft.text_encoder {
        let key = if prefixed { format!("text_model.{name}") } else { name.clone() };
        let Some(old) = out.get(&key) else { bail!("trained text encoder tensor {key} is not in {}", file.display()) };
        if old.dims() != t.dims() {
            bail!("trained text encoder tensor {key} has shape {:?}, {} {:?}", t.dims(), file.display(), old.dims());
        }
        out.insert(key, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
    }
    let key = TOKEN_TABLE.into_iter().find(|k| out.contains_key(*k)).with_context(|| format!("{} has no {}", file.display(), TOKEN_TABLE.join(" or ")))?;
    let table = &out[key];
    let (rows, hidden) = table.dims2()?;
    let (n, h) = ft.rows.dims2()?;
    if rows != vocab || h != hidden || n != ft.tokens.len() {
        bail!(
            "{}: token table [{rows}, {hidden}] with vocab_size {vocab} cannot take {} new rows of [{n}, {h}]",
            file.display(),
            ft.tokens.len()
        );
    }
    for (k, (tok, id)) in ft.tokens.iter().enumerate() {
        if *id as usize != vocab + k {
            bail!("new token {tok} has id {id}, but the table's next rows are {vocab}..");
        }
    }
    let extended = Tensor::cat(&[table.clone(), ft.rows.to_device(&Device::Cpu)?.to_dtype(table.dtype())?], 0)?;
    out.insert(key.to_string(), extended);
    save(&dir.join(file.file_name().unwrap()), &out)?;
    config["vocab_size"] = serde_json::json!(vocab + n);
    write_json(&dir.join("config.json"), &config)
}

/// An added token as transformers writes it (`AddedToken`, not special).
fn added_token(content: &str) -> serde_json::Value {
    serde_json::json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false, "special": false})
}

fn write_tokenizer(base: &Path, dir: &Path, tokens: &[(String, u32)]) -> Result<()> {
    copy_dir(base, dir)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg = if cfg_path.is_file() { read_json(&cfg_path)? } else { serde_json::json!({}) };
    let Some(obj) = cfg.as_object_mut() else { bail!("{} is not a JSON object", cfg_path.display()) };
    let decoder = obj.entry("added_tokens_decoder").or_insert_with(|| serde_json::json!({}));
    let Some(decoder) = decoder.as_object_mut() else { bail!("{}: added_tokens_decoder is not an object", cfg_path.display()) };
    for (tok, id) in tokens {
        decoder.insert(id.to_string(), added_token(tok));
    }
    write_json(&cfg_path, &cfg)?;
    let tj = dir.join("tokenizer.json");
    if tj.is_file() {
        let mut v = read_json(&tj)?;
        if !v["added_tokens"].is_array() {
            v["added_tokens"] = serde_json::json!([]);
        }
        let list = v["added_tokens"].as_array_mut().expect("set above");
        for (tok, id) in tokens {
            let mut t = added_token(tok);
            t["id"] = serde_json::json!(id);
            list.push(t);
        }
        write_json(&tj, &v)?;
    }
    Ok(())
}

/// Writes the fine-tuned model as a diffusers folder at `out` from the base diffusers folder
/// `base`. A folder already at `out` (a resumed run's earlier result) is replaced only once the
/// new one is complete.
pub fn write(base: &Path, out: &Path, ft: &FineTuned) -> Result<()> {
    if !base.join("model_index.json").is_file() {
        bail!("{} is not a diffusers folder (no model_index.json): a fine-tuned model folder is written from a diffusers base", base.display());
    }
    if out.exists() && !out.join("model_index.json").is_file() {
        bail!("{} exists and is not a model folder: not replacing it", out.display());
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().context("output folder has no name")?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        std::fs::copy(base.join("model_index.json"), tmp.join("model_index.json"))?;
        copy_dir(&base.join("scheduler"), &tmp.join("scheduler"))?;
        copy_dir(&base.join("vae"), &tmp.join("vae"))?;
        write_tokenizer(&base.join("tokenizer"), &tmp.join("tokenizer"), ft.tokens)?;
        write_text_encoder(&base.join("text_encoder"), &tmp.join("text_encoder"), ft)?;
        write_unet(&base.join("unet"), &tmp.join("unet"), ft.unet)?;
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        if out.exists() {
            std::fs::rename(out, &old).with_context(|| format!("moving the earlier {} aside", out.display()))?;
        }
        std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("writing the model folder {}", out.display()))
}
