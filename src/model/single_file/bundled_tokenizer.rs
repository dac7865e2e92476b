//! The CLIP BPE tokenizer for single files, which ship none: built in memory from the bundled
//! merges (assets/clip-bpe-merges.txt.zlib, MIT, OpenAI CLIP's bpe_simple_vocab_16e6.txt cut to
//! the 48894 merges CLIP uses; see LICENSES/CLIP-BPE.txt).
//!
//! CLIP's vocabulary is determined by its merges: the 256 byte characters (GPT-2's printable
//! map, in code-point order), the same with `</w>`, each merge joined, then `<|startoftext|>`
//! and `<|endoftext|>` (49408 in all). SD1 (OpenAI CLIP) pads with `<|endoftext|>`, SD2
//! (OpenCLIP) with "!" (id 0), as the SD repos' tokenizer configs say. The tokenizer itself is
//! `ClipTokenizer::bundled` (model/tokenizer.rs), built from what this file gives.

use super::detect::Family;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// zlib-compressed merges, one `a b` pair a line.
const MERGES_ZLIB: &[u8] = include_bytes!("../../../assets/clip-bpe-merges.txt.zlib");
const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's number of merges: 49408 tokens - 2 specials - 2 x 256 byte tokens.
pub const NUM_MERGES: usize = 48894;

/// GPT-2/CLIP's printable characters for the 256 bytes, in code-point order (the printable
/// bytes map to themselves, the others to 256 + n in byte order).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut chars: Vec<char> = (0..256u32).filter(|b| printable(*b)).filter_map(char::from_u32).collect();
    let others = (0..256u32).filter(|b| !printable(*b)).count() as u32;
    chars.extend((0..others).filter_map(|n| char::from_u32(256 + n)));
    chars
}

/// The bundled merges, in rank order.
pub fn merges() -> Result<Vec<(String, String)>> {
    let bytes = miniz_oxide::inflate::decompress_to_vec_zlib(MERGES_ZLIB)
        .map_err(|e| anyhow::anyhow!("the bundled CLIP merges do not decompress: {e:?}"))?;
    let text = String::from_utf8(bytes).context("the bundled CLIP merges are not UTF-8")?;
    let merges: Vec<(String, String)> = text
        .lines()
        .map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).with_context(|| format!("bundled merge {l:?}")))
        .collect::<Result<_>>()?;
    if merges.len() != NUM_MERGES {
        bail!("the bundled CLIP merges hold {} merges, not {NUM_MERGES}", merges.len());
    }
    Ok(merges)
}

/// The vocabulary the merges determine (token -> id).
pub fn vocab(merges: &[(String, String)]) -> HashMap<String, u32> {
    let bytes = byte_chars();
    let tokens = bytes
        .iter()
        .map(|c| c.to_string())
        .chain(bytes.iter().map(|c| format!("{c}</w>")))
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain([START_OF_TEXT.to_string(), END_OF_TEXT.to_string()]);
    tokens.enumerate().map(|(i, t)| (t, i as u32)).collect()
}

/// The pad token of `family`'s tokenizer.
pub fn pad_token(family: Family) -> &'static str {
    match family {
        Family::Sd1 => END_OF_TEXT,
        Family::Sd2 => "!",
    }
}
