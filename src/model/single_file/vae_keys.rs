//! CompVis (LDM) VAE names -> diffusers `AutoencoderKL` names, one key at a time.
//!
//! CompVis numbers the decoder's `up.N` from the lowest resolution up, diffusers' `up_blocks`
//! the other way; mid-block attention is a set of 1x1 convolutions (`q`, `k`, `v`, `proj_out`,
//! shape `[c, c, 1, 1]`) where diffusers has linear layers (`to_q` ... `to_out.0`, `[c, c]`),
//! so those weights are reshaped (see [`VaeKey::squeeze`]). Facts source: diffusers'
//! `convert_ldm_vae_checkpoint`.

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
