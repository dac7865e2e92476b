//! CompVis (LDM) VAE names -> diffusers `AutoencoderKL` names, one key at a time.
//!
//! CompVis numbers the decoder's `up.N` from the lowest resolution up, diffusers' `up_blocks`
//! the other way; mid-block attention is a set of 1x1 convolutions (`q`, `k`, `v`, `proj_out`,
//! shape `[c, c, 1, 1]`) where diffusers has linear layers (`to_q` ... `to_out.0`, `[c, c]`),
//! so those weights are reshaped (see [`VaeKey::squeeze`]). Facts source: diffusers'
//! `convert_ldm_vae_checkpoint`. [`reverse`] is the inverse (diffusers'
//! scripts/convert_diffusers_to_original_stable_diffusion.py), used to write a diffusers VAE
//! as a single file.

/// The diffusers name of a CompVis VAE key, and whether its 1x1 convolution weight becomes a
/// linear weight.
pub struct VaeKey {
    pub name: String,
    pub squeeze: bool,
}

/// Maps CompVis VAE key `key` (without `first_stage_model.`) for a VAE with `num_blocks`
/// resolution levels; `None` when it has no diffusers counterpart.
pub fn map(key: &str, num_blocks: usize) -> Option<VaeKey> {
    let plain = |name: String| Some(VaeKey { name, squeeze: false });
    for top in ["quant_conv.", "post_quant_conv."] {
        if let Some(r) = key.strip_prefix(top) {
            return leaf(r).then(|| VaeKey { name: key.to_string(), squeeze: false });
        }
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    for (from, to) in [("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("norm_out.", "conv_norm_out.")] {
        if let Some(r) = rest.strip_prefix(from) {
            return if leaf(r) { plain(format!("{side}.{to}{r}")) } else { None };
        }
    }
    if let Some(r) = rest.strip_prefix("mid.") {
        for (from, to) in [("block_1.", "resnets.0."), ("block_2.", "resnets.1.")] {
            if let Some(r) = r.strip_prefix(from) {
                return resnet(r).map(|r| VaeKey { name: format!("{side}.mid_block.{to}{r}"), squeeze: false });
            }
        }
        let r = r.strip_prefix("attn_1.")?;
        let (module, param) = r.split_once('.')?;
        let to = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return leaf(param).then(|| VaeKey { name: format!("{side}.mid_block.attentions.0.{to}.{param}"), squeeze: module != "norm" && param == "weight" });
    }
    let (level_kind, to_kind, sampler, to_sampler) =
        if side == "encoder" { ("down.", "down_blocks", "downsample.", "downsamplers") } else { ("up.", "up_blocks", "upsample.", "upsamplers") };
    let r = rest.strip_prefix(level_kind)?;
    let (n, r) = r.split_once('.')?;
    let n: usize = n.parse().ok()?;
    if n >= num_blocks {
        return None;
    }
    let b = if side == "encoder" { n } else { num_blocks - 1 - n };
    if let Some(r) = r.strip_prefix("block.") {
        let (j, r) = r.split_once('.')?;
        let j: usize = j.parse().ok()?;
        return resnet(r).map(|r| VaeKey { name: format!("{side}.{to_kind}.{b}.resnets.{j}.{r}"), squeeze: false });
    }
    let r = r.strip_prefix(sampler)?.strip_prefix("conv.")?;
    if leaf(r) {
        plain(format!("{side}.{to_kind}.{b}.{to_sampler}.0.conv.{r}"))
    } else {
        None
    }
}

/// The CompVis key (without `first_stage_model.`) of diffusers VAE name `name` for a VAE with
/// `num_blocks` resolution levels, the exact inverse of [`map`]; `squeeze` here means the
/// linear attention weight `[c, c]` is written as the 1x1 convolution `[c, c, 1, 1]`.
pub fn reverse(name: &str, num_blocks: usize) -> Option<VaeKey> {
    let plain = |name: String| Some(VaeKey { name, squeeze: false });
    for top in ["quant_conv.", "post_quant_conv."] {
        if let Some(r) = name.strip_prefix(top) {
            return leaf(r).then(|| VaeKey { name: name.to_string(), squeeze: false });
        }
    }
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    for (from, to) in [("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("conv_norm_out.", "norm_out.")] {
        if let Some(r) = rest.strip_prefix(from) {
            return if leaf(r) { plain(format!("{side}.{to}{r}")) } else { None };
        }
    }
    if let Some(r) = rest.strip_prefix("mid_block.") {
        for (from, to) in [("resnets.0.", "block_1."), ("resnets.1.", "block_2.")] {
            if let Some(r) = r.strip_prefix(from) {
                return resnet_reverse(r).map(|r| VaeKey { name: format!("{side}.mid.{to}{r}"), squeeze: false });
            }
        }
        let r = r.strip_prefix("attentions.0.")?;
        let (module, param) = r.rsplit_once('.')?;
        let to = match module {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => return None,
        };
        return leaf(param).then(|| VaeKey { name: format!("{side}.mid.attn_1.{to}.{param}"), squeeze: to != "norm" && param == "weight" });
    }
    let (kind, level_kind, sampler, to_sampler) =
        if side == "encoder" { ("down_blocks.", "down", "downsamplers.0.conv.", "downsample") } else { ("up_blocks.", "up", "upsamplers.0.conv.", "upsample") };
    let r = rest.strip_prefix(kind)?;
    let (b, r) = r.split_once('.')?;
    let b: usize = b.parse().ok()?;
    if b >= num_blocks {
        return None;
    }
    let n = if side == "encoder" { b } else { num_blocks - 1 - b };
    if let Some(r) = r.strip_prefix("resnets.") {
        let (j, r) = r.split_once('.')?;
        let j: usize = j.parse().ok()?;
        return resnet_reverse(r).map(|r| VaeKey { name: format!("{side}.{level_kind}.{n}.block.{j}.{r}"), squeeze: false });
    }
    let p = r.strip_prefix(sampler)?;
    if leaf(p) {
        plain(format!("{side}.{level_kind}.{n}.{to_sampler}.conv.{p}"))
    } else {
        None
    }
}

/// A diffusers VAE ResNet parameter -> its CompVis name (the inverse of [`resnet`]).
fn resnet_reverse(rest: &str) -> Option<String> {
    let (module, param) = rest.split_once('.')?;
    let to = match module {
        "norm1" | "conv1" | "norm2" | "conv2" => module,
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    };
    leaf(param).then(|| format!("{to}.{param}"))
}

fn leaf(rest: &str) -> bool {
    matches!(rest, "weight" | "bias")
}

/// A CompVis VAE ResNet parameter -> its diffusers name (only the shortcut is renamed).
fn resnet(rest: &str) -> Option<String> {
    let (module, param) = rest.split_once('.')?;
    let to = match module {
        "norm1" | "conv1" | "norm2" | "conv2" => module,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    leaf(param).then(|| format!("{to}.{param}"))
}
