//! CompVis (LDM) UNet names -> diffusers `UNet2DConditionModel` names, one key at a time.
//!
//! A CompVis UNet numbers its blocks as one flat list (`input_blocks.N`, `middle_block.N`,
//! `output_blocks.N`), diffusers nests them (`down_blocks.B.resnets.L`). The flat index is
//! turned into (block, layer) from the layers per block of the UNet config; the names inside a
//! transformer (`transformer_blocks.0.attn1.to_q`) are the same in both layouts, those inside a
//! ResNet block are renamed (`in_layers.0` -> `norm1`). Facts source: diffusers'
//! `convert_ldm_unet_checkpoint` (loaders/single_file_utils.py). [`UnetLayout::reverse`] is the
//! inverse (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py), used to
//! write a diffusers UNet as a single file.

/// The position of each flat CompVis block in diffusers' nesting, built from the layers per
/// down block (`layers_per_block` expanded to one entry per block).
pub struct UnetLayout {
    /// `input_blocks.N` (N >= 1) -> (down block, layer, is the downsampler).
    input: Vec<(usize, usize, bool)>,
    /// `output_blocks.N` -> (up block, layer).
    output: Vec<(usize, usize)>,
}

impl UnetLayout {
    pub fn new(layers_per_block: &[usize]) -> Self {
        let n = layers_per_block.len();
        let mut input = Vec::new();
        for (b, &l) in layers_per_block.iter().enumerate() {
            for j in 0..l {
                input.push((b, j, false));
            }
            if b + 1 < n {
                input.push((b, 0, true));
            }
        }
        let mut output = Vec::new();
        for (b, &l) in layers_per_block.iter().rev().enumerate() {
            for j in 0..=l {
                output.push((b, j));
            }
        }
        Self { input, output }
    }

    /// The diffusers name of CompVis UNet key `key` (without `model.diffusion_model.`), or
    /// `None` when it has no place in this layout.
    pub fn map(&self, key: &str) -> Option<String> {
        let fixed = [
            ("time_embed.0.", "time_embedding.linear_1."),
            ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."),
            ("out.0.", "conv_norm_out."),
            ("out.2.", "conv_out."),
        ];
        for (from, to) in fixed {
            if let Some(rest) = key.strip_prefix(from) {
                return leaf(rest).then(|| format!("{to}{rest}"));
            }
        }
        let (head, rest) = split_index(key)?;
        let (index, rest) = split_index_num(rest)?;
        if head == "middle_block" {
            return match index {
                0 => resnet(rest).map(|r| format!("mid_block.resnets.0.{r}")),
                1 => transformer(rest).then(|| format!("mid_block.attentions.0.{rest}")),
                2 => resnet(rest).map(|r| format!("mid_block.resnets.1.{r}")),
                _ => None,
            };
        }
        let (module, rest) = split_index_num(rest)?;
        match head {
            "input_blocks" => {
                let &(b, l, down) = self.input.get(index.checked_sub(1)?)?;
                match (down, module) {
                    (true, 0) => rest.strip_prefix("op.").filter(|r| leaf(r)).map(|r| format!("down_blocks.{b}.downsamplers.0.conv.{r}")),
                    (false, 0) => resnet(rest).map(|r| format!("down_blocks.{b}.resnets.{l}.{r}")),
                    (false, 1) => transformer(rest).then(|| format!("down_blocks.{b}.attentions.{l}.{rest}")),
                    _ => None,
                }
            }
            "output_blocks" => {
                let &(b, l) = self.output.get(index)?;
                let last_of_block = self.output.get(index + 1).is_none_or(|&(nb, _)| nb != b);
                let is_upsampler = rest.strip_prefix("conv.").is_some_and(leaf);
                match module {
                    0 => resnet(rest).map(|r| format!("up_blocks.{b}.resnets.{l}.{r}")),
                    1 | 2 if is_upsampler && last_of_block && b + 1 < self.num_up_blocks() => {
                        Some(format!("up_blocks.{b}.upsamplers.0.{rest}"))
                    }
                    1 if transformer(rest) => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The CompVis key (without `model.diffusion_model.`) of diffusers UNet name `name`, the
    /// exact inverse of [`map`](Self::map); `up_attention(b)`: whether up block `b` has
    /// attentions (its upsampler is then module 2 of the last output block, else module 1).
    /// `None` when the name has no place in this layout.
    pub fn reverse(&self, name: &str, up_attention: impl Fn(usize) -> bool) -> Option<String> {
        let fixed = [
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_in.", "input_blocks.0.0."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2."),
        ];
        for (from, to) in fixed {
            if let Some(rest) = name.strip_prefix(from) {
                return leaf(rest).then(|| format!("{to}{rest}"));
            }
        }
        if let Some(rest) = name.strip_prefix("mid_block.") {
            let (kind, rest) = rest.split_once('.')?;
            let (i, rest) = split_index_num(rest)?;
            return match (kind, i) {
                ("resnets", 0) => resnet_reverse(rest).map(|r| format!("middle_block.0.{r}")),
                ("attentions", 0) => transformer(rest).then(|| format!("middle_block.1.{rest}")),
                ("resnets", 1) => resnet_reverse(rest).map(|r| format!("middle_block.2.{r}")),
                _ => None,
            };
        }
        let (head, rest) = split_index(name)?;
        let (b, rest) = split_index_num(rest)?;
        let (kind, rest) = split_index(rest)?;
        let (l, rest) = split_index_num(rest)?;
        match head {
            "down_blocks" => {
                let flat = |down: bool| self.input.iter().position(|&e| e == (b, l, down)).map(|p| p + 1);
                match kind {
                    "resnets" => Some(format!("input_blocks.{}.0.{}", flat(false)?, resnet_reverse(rest)?)),
                    "attentions" => transformer(rest).then(|| Some(format!("input_blocks.{}.1.{rest}", flat(false)?))).flatten(),
                    "downsamplers" if l == 0 => {
                        let p = rest.strip_prefix("conv.").filter(|r| leaf(r))?;
                        Some(format!("input_blocks.{}.0.op.{p}", flat(true)?))
                    }
                    _ => None,
                }
            }
            "up_blocks" => {
                let flat = |l: usize| self.output.iter().position(|&e| e == (b, l));
                match kind {
                    "resnets" => Some(format!("output_blocks.{}.0.{}", flat(l)?, resnet_reverse(rest)?)),
                    "attentions" => transformer(rest).then(|| Some(format!("output_blocks.{}.1.{rest}", flat(l)?))).flatten(),
                    "upsamplers" if l == 0 && b + 1 < self.num_up_blocks() => {
                        let p = rest.strip_prefix("conv.").filter(|r| leaf(r))?;
                        let last = self.output.iter().rposition(|&(nb, _)| nb == b)?;
                        Some(format!("output_blocks.{last}.{}.conv.{p}", if up_attention(b) { 2 } else { 1 }))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn num_up_blocks(&self) -> usize {
        self.output.last().map_or(0, |&(b, _)| b + 1)
    }
}

/// A parameter name (`weight`, `bias`).
fn leaf(rest: &str) -> bool {
    matches!(rest, "weight" | "bias")
}

fn split_index(key: &str) -> Option<(&str, &str)> {
    key.split_once('.')
}

fn split_index_num(key: &str) -> Option<(usize, &str)> {
    let (n, rest) = key.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// A CompVis ResNet block's parameter -> its diffusers name.
fn resnet(rest: &str) -> Option<String> {
    let map = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    map.iter().find_map(|(from, to)| rest.strip_prefix(from).filter(|r| leaf(r)).map(|r| format!("{to}{r}")))
}

/// A diffusers ResNet parameter -> its CompVis name (the inverse of [`resnet`]).
fn resnet_reverse(rest: &str) -> Option<String> {
    let map = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ];
    map.iter().find_map(|(from, to)| rest.strip_prefix(from).filter(|r| leaf(r)).map(|r| format!("{to}{r}")))
}

/// A parameter of a spatial transformer (same names in both layouts).
fn transformer(rest: &str) -> bool {
    ["norm.", "proj_in.", "proj_out.", "transformer_blocks."].iter().any(|p| rest.starts_with(p))
}
