//! LoRA files in kohya's and diffusers/PEFT's formats, read into (target weight, delta) pairs.
//!
//! Kohya (`lora_unet_<module path, '.' -> '_'>` / `lora_te_text_model_<...>`): `.lora_down.weight`
//! [r, in(, kh, kw)], `.lora_up.weight` [out, r(, 1, 1)] and `.alpha`, giving
//! `delta = up.flatten(1) @ down.flatten(1) * alpha / r * SCALE` reshaped to the weight (a
//! convolution entry, LoCon, the same way); or `.diff` (`delta = diff * SCALE`) and `.diff_b`
//! for a bias. diffusers/PEFT (`unet.<path>.lora_A.weight` / `lora_B.weight`,
//! `text_encoder.<path>...`): the same product with scale lora_alpha / r x SCALE when the file's
//! metadata holds diffusers' adapter config (`lora_adapter_metadata`), else SCALE.
//! Kohya names are matched against the model's own weight names (dots replaced by
//! underscores); a name two weights share is an error. Kohya UNet names in the original LDM
//! (CompVis) layout (`lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k`,
//! `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_3_1_...`, also the resnets'
//! `in_layers_2` etc.) are translated to diffusers' first ([`ldm_map`], the map of ComfyUI's
//! `unet_to_diffusers` and A1111's `convert_diffusers_name_to_compvis`, computed from the
//! model's own blocks rather than SD1's numbers). Keys that match nothing are an error
//! listing the first few unless the caller allows them (then they are reported as a warning):
//! a silent skip is what users of other tools complain about (docs/formats.md).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The model component a LoRA entry changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
}

/// The weights a LoRA may target, per component: the names the component's weight store uses
/// with their shapes.
#[derive(Default, Clone, Debug)]
pub struct TargetNames {
    pub unet: BTreeMap<String, Vec<usize>>,
    pub text_encoder: BTreeMap<String, Vec<usize>>,
}

/// One weight's change: `weight += delta` (f32, on the CPU, the weight's shape).
#[derive(Clone, Debug)]
pub struct LoraDelta {
    pub component: Component,
    /// The weight's name in its component's store.
    pub name: String,
    pub delta: Tensor,
}

/// The parts of one LoRA module entry, as found in the file.
#[derive(Default)]
struct Entry {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
    diff: Option<(String, Tensor)>,
    diff_b: Option<(String, Tensor)>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Form {
    Kohya,
    Peft,
}

/// Splits a key into (form, component, module, part), or `None` for a key of no known form.
fn split_key(key: &str) -> Option<(Form, Component, &str, &'static str)> {
    const KOHYA: [&str; 5] = [".lora_down.weight", ".lora_up.weight", ".alpha", ".diff_b", ".diff"];
    const PEFT: [&str; 2] = [".lora_A.weight", ".lora_B.weight"];
    let (form, component, rest, parts): (_, _, _, &[&'static str]) = if let Some(r) = key.strip_prefix("lora_unet_") {
        (Form::Kohya, Component::Unet, r, &KOHYA)
    } else if let Some(r) = key.strip_prefix("lora_te_") {
        (Form::Kohya, Component::TextEncoder, r, &KOHYA)
    } else if let Some(r) = key.strip_prefix("unet.") {
        (Form::Peft, Component::Unet, r, &PEFT)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Form::Peft, Component::TextEncoder, r, &PEFT)
    } else {
        return None;
    };
    parts.iter().find_map(|p| rest.strip_suffix(p).map(|m| (form, component, m, *p)))
}

/// A module's canonical dotted path: the text encoder's with the `text_model.` prefix
/// (transformers >= 5.6 stores it without).
fn canonical(component: Component, module: &str) -> String {
    match component {
        Component::TextEncoder if !module.starts_with("text_model.") => format!("text_model.{module}"),
        _ => module.to_string(),
    }
}

/// The LDM (CompVis) UNet module prefixes, dots as underscores and with a trailing `_`
/// (`input_blocks_1_1_`), each with its diffusers prefix (`down_blocks_0_attentions_0_`) and
/// whether it is a resnet (whose inner names differ too). Computed from the diffusers weight
/// names of the model: the number of down/up blocks, each block's resnet count (layers per
/// block; up blocks one more) and which blocks have attentions and down/up samplers. LDM
/// numbers its input blocks 0 (conv_in), then per down block one per resnet (`.0` the resnet,
/// `.1` its attention) and one for the downsampler (`.0.op`); the middle block is resnet,
/// attention, resnet; output blocks are numbered per up block and resnet, the upsampler
/// (`.conv`) after the last resnet's attention (`.2`) or after the resnet (`.1`).
pub fn ldm_map(unet_names: &BTreeMap<String, Vec<usize>>) -> Vec<(String, String, bool)> {
    let has = |prefix: &str| unet_names.range(prefix.to_string()..).next().is_some_and(|(n, _)| n.starts_with(prefix));
    let count = |prefix: &str| (0..).take_while(|i| has(&format!("{prefix}{i}."))).count();
    let mut map: Vec<(String, String, bool)> = vec![
        ("input_blocks_0_0_".into(), "conv_in_".into(), false),
        ("time_embed_0_".into(), "time_embedding_linear_1_".into(), false),
        ("time_embed_2_".into(), "time_embedding_linear_2_".into(), false),
        ("out_0_".into(), "conv_norm_out_".into(), false),
        ("out_2_".into(), "conv_out_".into(), false),
        ("middle_block_0_".into(), "mid_block_resnets_0_".into(), true),
        ("middle_block_1_".into(), "mid_block_attentions_0_".into(), false),
        ("middle_block_2_".into(), "mid_block_resnets_1_".into(), true),
    ];
    let mut n = 1;
    for x in 0..count("down_blocks.") {
        let attn = has(&format!("down_blocks.{x}.attentions."));
        for i in 0..count(&format!("down_blocks.{x}.resnets.")) {
            map.push((format!("input_blocks_{n}_0_"), format!("down_blocks_{x}_resnets_{i}_"), true));
            if attn {
                map.push((format!("input_blocks_{n}_1_"), format!("down_blocks_{x}_attentions_{i}_"), false));
            }
            n += 1;
        }
        if has(&format!("down_blocks.{x}.downsamplers.")) {
            map.push((format!("input_blocks_{n}_0_op_"), format!("down_blocks_{x}_downsamplers_0_conv_"), false));
            n += 1;
        }
    }
    let mut n = 0;
    for x in 0..count("up_blocks.") {
        let attn = has(&format!("up_blocks.{x}.attentions."));
        let resnets = count(&format!("up_blocks.{x}.resnets."));
        for i in 0..resnets {
            map.push((format!("output_blocks_{n}_0_"), format!("up_blocks_{x}_resnets_{i}_"), true));
            if attn {
                map.push((format!("output_blocks_{n}_1_"), format!("up_blocks_{x}_attentions_{i}_"), false));
            }
            if i + 1 == resnets && has(&format!("up_blocks.{x}.upsamplers.")) {
                let k = if attn { 2 } else { 1 };
                map.push((format!("output_blocks_{n}_{k}_conv_"), format!("up_blocks_{x}_upsamplers_0_conv_"), false));
            }
            n += 1;
        }
    }
    map
}

/// The resnet parts' LDM names (underscored) and diffusers'.
const LDM_RESNET: [(&str, &str); 6] = [
    ("in_layers_0", "norm1"),
    ("in_layers_2", "conv1"),
    ("emb_layers_1", "time_emb_proj"),
    ("out_layers_0", "norm2"),
    ("out_layers_3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// The diffusers name (underscored) of a kohya LDM-named UNet module, `None` when `module` is
/// not an LDM name of this model. A whole-module name (`out_0`, `input_blocks_3_0_op`) counts
/// as its prefix with nothing after it.
fn ldm_to_diffusers(map: &[(String, String, bool)], module: &str) -> Option<String> {
    let with_sep = format!("{module}_");
    map.iter().find_map(|(ldm, diffusers, resnet)| {
        let rest = with_sep.strip_prefix(ldm.as_str())?;
        let rest = rest.strip_suffix('_').unwrap_or(rest);
        let head = diffusers.strip_suffix('_').unwrap_or(diffusers);
        if rest.is_empty() {
            return Some(head.to_string());
        }
        let rest = if *resnet { LDM_RESNET.iter().find(|(l, _)| *l == rest).map(|(_, d)| d.to_string())? } else { rest.to_string() };
        Some(format!("{head}_{rest}"))
    })
}

/// Finds the store name of `module` + `suffix` (`weight` / `bias`) in `names`.
fn resolve(names: &BTreeMap<String, Vec<usize>>, component: Component, form: Form, module: &str, suffix: &str) -> Result<Option<(String, Vec<usize>)>> {
    let want = match form {
        Form::Kohya => module.to_string(),
        Form::Peft => canonical(component, module),
    };
    let mut found: Vec<(&String, &Vec<usize>)> = Vec::new();
    for (name, shape) in names {
        let Some(m) = name.strip_suffix(suffix).and_then(|m| m.strip_suffix('.')) else { continue };
        let c = canonical(component, m);
        let key = match form {
            Form::Kohya => c.strip_prefix("text_model.").map_or(c.replace('.', "_"), |r| format!("text_model_{}", r.replace('.', "_"))),
            Form::Peft => c,
        };
        if key == want {
            found.push((name, shape));
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [(n, s)] => Ok(Some(((*n).clone(), (*s).clone()))),
        many => bail!(
            "the LoRA module {module} matches several weights of the model ({}): its name is ambiguous",
            many.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn f32_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// `up.flatten(1) @ down.flatten(1) * scale`, reshaped to `shape`, after checking the shapes.
fn low_rank(file: &str, down: &(String, Tensor), up: &(String, Tensor), shape: &[usize], scale: f64) -> Result<Tensor> {
    let (dk, d) = down;
    let (uk, u) = up;
    let (dd, ud) = (d.dims(), u.dims());
    let bad = |why: &str| -> Result<Tensor> {
        bail!("{file}: {dk} has shape {dd:?} and {uk} {ud:?}, which do not make a change of a weight of shape {shape:?}: {why}")
    };
    if dd.len() < 2 || ud.len() < 2 || shape.len() < 2 {
        return bad("both must have at least 2 dimensions");
    }
    let rank = dd[0];
    if ud[1] != rank || ud[2..].iter().any(|&k| k != 1) {
        return bad("lora_up must be [out, rank(, 1, 1)] with the rank of lora_down");
    }
    if ud[0] != shape[0] {
        return bad("lora_up's first dimension is not the weight's output size");
    }
    let d_in: usize = dd[1..].iter().product();
    if d_in != shape[1..].iter().product::<usize>() || (dd.len() > 2 && dd[1..] != shape[1..]) {
        return bad("lora_down's other dimensions are not the weight's input (and kernel) size");
    }
    let prod = f32_cpu(u)?.reshape((ud[0], rank))?.matmul(&f32_cpu(d)?.reshape((rank, d_in))?)?;
    Ok(prod.affine(scale, 0.0)?.reshape(shape)?)
}

/// The scale a PEFT entry of `component` gets beyond SCALE: lora_alpha / r from the adapter
/// config diffusers (>= 0.35) writes into the file's metadata (`lora_adapter_metadata`), 1
/// without it. Config features that change the formula are refused rather than ignored.
fn peft_scales(path: &Path) -> Result<HashMap<Component, f64>> {
    let file = path.display();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {file}"))?;
    let mut len = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut len).with_context(|| format!("{file} is not a safetensors file"))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        bail!("{file} is not a safetensors file (header of {n} bytes)");
    }
    let mut header = vec![0u8; n as usize];
    std::io::Read::read_exact(&mut f, &mut header).with_context(|| format!("{file} is truncated"))?;
    let header: serde_json::Value = serde_json::from_slice(&header).with_context(|| format!("{file}: the header is not JSON"))?;
    let mut scales = HashMap::new();
    let Some(text) = header.get("__metadata__").and_then(|m| m.get("lora_adapter_metadata")).and_then(|m| m.as_str()) else {
        return Ok(scales);
    };
    let config: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{file}: lora_adapter_metadata is not JSON"))?;
    for (component, prefix) in [(Component::Unet, "unet"), (Component::TextEncoder, "text_encoder")] {
        let get = |k: &str| config.get(format!("{prefix}.{k}"));
        let (Some(r), Some(alpha)) = (get("r").and_then(|v| v.as_f64()), get("lora_alpha").and_then(|v| v.as_f64())) else {
            continue;
        };
        for k in ["alpha_pattern", "rank_pattern"] {
            if get(k).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
                bail!("{file}: the adapter config has a {prefix}.{k} (per-module scales), which disendiff does not read yet");
            }
        }
        for k in ["use_rslora", "use_dora"] {
            if get(k).and_then(|v| v.as_bool()) == Some(true) {
                bail!("{file}: the adapter config sets {prefix}.{k}, which disendiff does not implement");
            }
        }
        if r <= 0.0 {
            bail!("{file}: the adapter config has {prefix}.r = {r}");
        }
        scales.insert(component, alpha / r);
    }
    Ok(scales)
}

/// Reads one LoRA file into the weight changes it makes at strength `scale`, with warnings.
/// `targets` are the model's weight names. Fails on a key that matches no weight unless
/// `allow_unmatched`, and on entries that are incomplete, ambiguous or of the wrong shape.
pub fn read(path: &Path, scale: f64, targets: &TargetNames, allow_unmatched: bool) -> Result<(Vec<LoraDelta>, Vec<String>)> {
    if !path.is_file() {
        bail!("LoRA file {} does not exist", path.display());
    }
    let file = path.display().to_string();
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{file} is not a readable safetensors file (truncated or corrupt?)"))?;
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let mut unmatched: Vec<String> = Vec::new();
    let mut entries: BTreeMap<(Form, Component, String), Entry> = BTreeMap::new();
    for key in keys {
        let Some((form, component, module, part)) = split_key(key) else {
            unmatched.push(key.clone());
            continue;
        };
        let e = entries.entry((form, component, module.to_string())).or_default();
        let slot = match part {
            ".lora_down.weight" | ".lora_A.weight" => &mut e.down,
            ".lora_up.weight" | ".lora_B.weight" => &mut e.up,
            ".alpha" => &mut e.alpha,
            ".diff" => &mut e.diff,
            _ => &mut e.diff_b,
        };
        *slot = Some((key.clone(), tensors[key].clone()));
    }

    let peft_scale = peft_scales(path)?;
    let ldm = ldm_map(&targets.unet);
    let mut deltas: Vec<LoraDelta> = Vec::new();
    let mut seen: HashMap<(Component, String), String> = HashMap::new();
    for ((form, component, module), e) in &entries {
        let names = match component {
            Component::Unet => &targets.unet,
            Component::TextEncoder => &targets.text_encoder,
        };
        let first_key = [&e.down, &e.up, &e.alpha, &e.diff, &e.diff_b].into_iter().flatten().next().map(|(k, _)| k.clone()).expect("an entry has a key");
        let mut changes: Vec<(String, Tensor)> = Vec::new();
        // A kohya UNet module in LDM names is looked up by its diffusers name.
        let translated = match (form, component) {
            (Form::Kohya, Component::Unet) => ldm_to_diffusers(&ldm, module),
            _ => None,
        };
        let module: &str = translated.as_deref().unwrap_or(module);
        let weight = resolve(names, *component, *form, module, "weight")?;
        match (&e.down, &e.up, &e.diff) {
            (Some(_), Some(_), Some((k, _))) => bail!("{file}: {k} and a lora_down/lora_up pair change the same weight"),
            (Some(down), Some(up), None) => {
                let Some((name, shape)) = &weight else {
                    unmatched.push(first_key);
                    continue;
                };
                let rank = down.1.dim(0)?;
                let alpha = match &e.alpha {
                    None if *form == Form::Peft => peft_scale.get(component).copied().unwrap_or(1.0) * rank as f64,
                    Some((k, a)) => {
                        let v = f32_cpu(a)?.flatten_all()?.to_vec1::<f32>()?;
                        let [v] = v.as_slice() else { bail!("{file}: {k} has {} values, expected one", v.len()) };
                        *v as f64
                    }
                    None => rank as f64,
                };
                changes.push((name.clone(), low_rank(&file, down, up, shape, alpha / rank as f64 * scale)?));
            }
            (None, None, Some((k, diff))) => {
                let Some((name, shape)) = &weight else {
                    unmatched.push(first_key);
                    continue;
                };
                if diff.dims() != shape.as_slice() {
                    bail!("{file}: {k} has shape {:?}, the weight {name} {shape:?}", diff.dims());
                }
                changes.push((name.clone(), f32_cpu(diff)?.affine(scale, 0.0)?));
            }
            (None, None, None) if e.alpha.is_none() => {}
            (down, up, _) => {
                let what = match (down, up) {
                    (Some(_), None) => "a lora_down (lora_A) but no lora_up (lora_B)",
                    (None, Some(_)) => "a lora_up (lora_B) but no lora_down (lora_A)",
                    _ => "an alpha but no lora_down/lora_up or .diff",
                };
                bail!("{file}: {first_key}: the module {module} has {what}");
            }
        }
        if let Some((k, diff)) = &e.diff_b {
            match resolve(names, *component, *form, module, "bias")? {
                Some((name, shape)) if diff.dims() == shape.as_slice() => changes.push((name, f32_cpu(diff)?.affine(scale, 0.0)?)),
                Some((name, shape)) => bail!("{file}: {k} has shape {:?}, the bias {name} {shape:?}", diff.dims()),
                None => unmatched.push(k.clone()),
            }
        }
        for (name, delta) in changes {
            if let Some(other) = seen.insert((*component, name.clone()), first_key.clone()) {
                bail!("{file}: {other} and {first_key} both change {name}");
            }
            deltas.push(LoraDelta { component: *component, name, delta });
        }
    }

    let mut warnings = Vec::new();
    if !unmatched.is_empty() {
        let shown = unmatched.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        let msg = format!("{} of the {} keys of {file} match no weight of the model, e.g. {shown}", unmatched.len(), tensors.len());
        if !allow_unmatched {
            bail!("{msg} (kohya `lora_unet_*`/`lora_te_*` and diffusers `unet.*`/`text_encoder.*` names of this model are read; pass --lora-allow-unmatched to apply the rest)");
        }
        warnings.push(format!("{msg}: ignored (--lora-allow-unmatched)"));
    }
    if deltas.is_empty() {
        bail!("{file} changes no weight of the model");
    }
    Ok((deltas, warnings))
}

/// `FILE[:SCALE]` as given to `--lora`: the strength defaults to 1.
pub fn parse_spec(s: &str) -> Result<(std::path::PathBuf, f64)> {
    if let Some((file, scale)) = s.rsplit_once(':') {
        if let Ok(v) = scale.parse::<f64>() {
            if !v.is_finite() {
                bail!("--lora {s}: the strength {scale} is not a finite number");
            }
            if file.is_empty() {
                bail!("--lora {s}: no file before the strength");
            }
            return Ok((file.into(), v));
        }
    }
    if s.is_empty() {
        bail!("--lora needs a file name");
    }
    Ok((s.into(), 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_takes_an_optional_strength() {
        assert_eq!(parse_spec("a/b.safetensors:0.7").unwrap(), ("a/b.safetensors".into(), 0.7));
        assert_eq!(parse_spec("b.safetensors").unwrap(), ("b.safetensors".into(), 1.0));
        assert_eq!(parse_spec("C:\\x\\b.safetensors").unwrap(), ("C:\\x\\b.safetensors".into(), 1.0));
        assert!(parse_spec(":0.5").is_err());
        assert!(parse_spec("x:inf").is_err());
    }

    #[test]
    fn kohya_names_match_underscored_module_paths() {
        let mut t = TargetNames::default();
        t.unet.insert("down_blocks.0.attentions.0.proj_in.weight".into(), vec![4, 4, 1, 1]);
        t.text_encoder.insert("encoder.layers.1.mlp.fc1.weight".into(), vec![8, 4]);
        let r = resolve(&t.unet, Component::Unet, Form::Kohya, "down_blocks_0_attentions_0_proj_in", "weight").unwrap();
        assert_eq!(r.unwrap().0, "down_blocks.0.attentions.0.proj_in.weight");
        let r = resolve(&t.text_encoder, Component::TextEncoder, Form::Kohya, "text_model_encoder_layers_1_mlp_fc1", "weight").unwrap();
        assert_eq!(r.unwrap().0, "encoder.layers.1.mlp.fc1.weight");
        let r = resolve(&t.text_encoder, Component::TextEncoder, Form::Peft, "text_model.encoder.layers.1.mlp.fc1", "weight").unwrap();
        assert_eq!(r.unwrap().0, "encoder.layers.1.mlp.fc1.weight");
        assert!(resolve(&t.unet, Component::Unet, Form::Kohya, "down_blocks_0_attentions_0_proj_out", "weight").unwrap().is_none());
        // two weights with one underscored name
        t.unet.insert("down_blocks.0.attentions_0.proj_in.weight".into(), vec![4, 4, 1, 1]);
        let e = resolve(&t.unet, Component::Unet, Form::Kohya, "down_blocks_0_attentions_0_proj_in", "weight").unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");
    }

    #[test]
    fn locon_delta_is_up_times_down_reshaped() {
        let down = Tensor::arange(0f32, 2.0 * 3.0 * 9.0, &Device::Cpu).unwrap().reshape((2, 3, 3, 3)).unwrap();
        let up = Tensor::new(&[[1f32, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, -1.0]], &Device::Cpu).unwrap().reshape((4, 2, 1, 1)).unwrap();
        let d = low_rank("f", &("d".into(), down.clone()), &("u".into(), up), &[4, 3, 3, 3], 0.5).unwrap();
        assert_eq!(d.dims(), &[4, 3, 3, 3]);
        let d0 = down.get(0).unwrap();
        let d1 = down.get(1).unwrap();
        // row 3 = 0.5 * (0.5 * down[0] - down[1])
        let want = ((d0.affine(0.5, 0.0).unwrap() - d1).unwrap()).affine(0.5, 0.0).unwrap();
        let got = d.get(3).unwrap();
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // a 3x3 lora_up is not a LoRA this reader knows
        let up3 = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(low_rank("f", &("d".into(), down), &("u".into(), up3), &[4, 3, 3, 3], 1.0).is_err());
    }

    /// SD1.5's UNet names (4 down blocks of 2 resnets, attentions in the first 3; 4 up blocks
    /// of 3 resnets, attentions in the last 3).
    fn sd15_names() -> BTreeMap<String, Vec<usize>> {
        let mut t = BTreeMap::new();
        let mut add = |n: String| {
            t.insert(format!("{n}.weight"), vec![1]);
        };
        for x in 0..4 {
            for i in 0..2 {
                add(format!("down_blocks.{x}.resnets.{i}.conv1"));
                if x < 3 {
                    add(format!("down_blocks.{x}.attentions.{i}.transformer_blocks.0.attn2.to_k"));
                }
            }
            if x < 3 {
                add(format!("down_blocks.{x}.downsamplers.0.conv"));
            }
            for i in 0..3 {
                add(format!("up_blocks.{x}.resnets.{i}.conv1"));
                if x > 0 {
                    add(format!("up_blocks.{x}.attentions.{i}.transformer_blocks.0.attn2.to_k"));
                }
            }
            if x < 3 {
                add(format!("up_blocks.{x}.upsamplers.0.conv"));
            }
        }
        add("mid_block.attentions.0.proj_in".into());
        t
    }

    /// On SD1.5's layout the map is A1111's `convert_diffusers_name_to_compvis` (networks.py):
    /// down attention (x, i) -> input_blocks_{1 + 3x + i}_1, up attention (x, i) ->
    /// output_blocks_{3x + i}_1, resnets likewise with _0 and LDM's part names, downsampler x ->
    /// input_blocks_{3 + 3x}_0_op, upsampler x -> output_blocks_{2 + 3x}_{2 if x > 0 else 1}_conv.
    #[test]
    fn ldm_names_are_a1111s_on_sd15() {
        let map = ldm_map(&sd15_names());
        let t = |m: &str| ldm_to_diffusers(&map, m);
        for x in 0..4 {
            for i in 0..2 {
                assert_eq!(t(&format!("input_blocks_{}_0_in_layers_2", 1 + 3 * x + i)).unwrap(), format!("down_blocks_{x}_resnets_{i}_conv1"));
                assert_eq!(t(&format!("input_blocks_{}_0_skip_connection", 1 + 3 * x + i)).unwrap(), format!("down_blocks_{x}_resnets_{i}_conv_shortcut"));
                let a = t(&format!("input_blocks_{}_1_transformer_blocks_0_attn2_to_k", 1 + 3 * x + i));
                assert_eq!(a, (x < 3).then(|| format!("down_blocks_{x}_attentions_{i}_transformer_blocks_0_attn2_to_k")));
            }
            for i in 0..3 {
                assert_eq!(t(&format!("output_blocks_{}_0_out_layers_3", 3 * x + i)).unwrap(), format!("up_blocks_{x}_resnets_{i}_conv2"));
                let a = t(&format!("output_blocks_{}_1_transformer_blocks_0_attn2_to_k", 3 * x + i));
                assert_eq!(a, (x > 0).then(|| format!("up_blocks_{x}_attentions_{i}_transformer_blocks_0_attn2_to_k")), "up {x} {i}");
            }
            if x < 3 {
                assert_eq!(t(&format!("input_blocks_{}_0_op", 3 + 3 * x)).unwrap(), format!("down_blocks_{x}_downsamplers_0_conv"));
                let k = if x > 0 { 2 } else { 1 };
                assert_eq!(t(&format!("output_blocks_{}_{k}_conv", 2 + 3 * x)).unwrap(), format!("up_blocks_{x}_upsamplers_0_conv"));
            }
        }
        assert_eq!(t("middle_block_1_proj_in").unwrap(), "mid_block_attentions_0_proj_in");
        assert_eq!(t("middle_block_2_emb_layers_1").unwrap(), "mid_block_resnets_1_time_emb_proj");
        assert_eq!(t("input_blocks_0_0").unwrap(), "conv_in");
        assert_eq!(t("time_embed_2").unwrap(), "time_embedding_linear_2");
        // not LDM names, or not of this model
        assert_eq!(t("down_blocks_0_attentions_0_proj_in"), None);
        assert_eq!(t("input_blocks_12_1_proj_in"), None);
        assert_eq!(t("input_blocks_1_0_no_such_part"), None);
        // input_blocks_1_1 is not a prefix of input_blocks_11_1
        assert_eq!(t("input_blocks_11_0_in_layers_0").unwrap(), "down_blocks_3_resnets_1_norm1");
    }
}
