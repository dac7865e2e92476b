//! Concepts of a training caption: modifier tokens (`<new1>`, `<new2>`, ...), the class word
//! that follows each (docs/method.md §3), their initialiser tokens, and where they sit in a prompt.

use crate::calibration::ConceptPositions;
use crate::model::tokenizer::ClipTokenizer;
use anyhow::{bail, Result};

/// Initialiser tokens of the official code, in order (docs/method.md §3): `pll`, `ktn`; the third
/// concept of a three-concept run takes `ucd</w>`.
pub const OFFICIAL_INITIALIZERS: [&str; 2] = ["pll", "ktn"];
pub const THIRD_INITIALIZER: &str = "ucd</w>";

pub use crate::formats::concept_file::Concept;

/// Finds the modifier tokens of a caption: words written `<...>`, in order of appearance.
pub fn modifier_tokens_in(caption: &str) -> Vec<String> {
    let re = regex::Regex::new(r"<[^<>\s]+>").unwrap();
    let mut out: Vec<String> = Vec::new();
    for m in re.find_iter(caption) {
        let t = m.as_str().to_lowercase();
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// The default initialisers for `n` concepts (official code), or an error past three.
pub fn default_initializers(n: usize) -> Result<Vec<String>> {
    match n {
        1 | 2 => Ok(OFFICIAL_INITIALIZERS[..n].iter().map(|s| s.to_string()).collect()),
        3 => Ok(vec![THIRD_INITIALIZER.into(), OFFICIAL_INITIALIZERS[0].into(), OFFICIAL_INITIALIZERS[1].into()]),
        _ => bail!("{n} concepts need --initializer-tokens (one rare vocabulary token per concept, '+'-separated)"),
    }
}

/// Parses the concepts of `caption`: each modifier must be followed by a class word.
pub fn parse_concepts(caption: &str, modifiers: &[String], initializers: &[String]) -> Result<Vec<Concept>> {
    if modifiers.is_empty() {
        bail!("the caption {caption:?} has no modifier tokens: write them as <new1>, <new2>, ... before their class words, e.g. \"<new1> cat and <new2> dog\"");
    }
    if initializers.len() < modifiers.len() {
        bail!(
            "{} concepts ({}) but only {} initialiser token(s) ({}): give one per concept",
            modifiers.len(),
            modifiers.join(", "),
            initializers.len(),
            initializers.join(", ")
        );
    }
    let words: Vec<String> = caption.split_whitespace().map(|w| w.to_lowercase()).collect();
    let mut concepts = Vec::new();
    for (m, init) in modifiers.iter().zip(initializers) {
        let Some(i) = words.iter().position(|w| w.starts_with(m.as_str())) else {
            bail!("modifier token {m} does not appear in the caption {caption:?}");
        };
        let rest = &words[i][m.len()..];
        let next = if !rest.is_empty() { Some(rest) } else { words.get(i + 1).map(|s| s.as_str()) };
        let class = next.map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()));
        match class {
            Some(c) if !c.is_empty() && !c.starts_with('<') && c.chars().all(|ch| ch.is_alphabetic()) => {
                concepts.push(Concept { modifier: m.clone(), class_word: c.to_string(), initializer: init.clone() })
            }
            _ => bail!("modifier token {m} in {caption:?} must be followed by its class word (e.g. \"{m} dog\")"),
        }
    }
    Ok(concepts)
}

/// Positions (in the 77 ids, start token = 0) of each concept's modifier and class token in
/// `prompt`. A class word that the BPE splits is represented by its last sub-token (the head of
/// an English compound, e.g. "hedge|hog"); `None` for a concept absent from the prompt.
pub fn concept_positions(tok: &ClipTokenizer, prompt: &str, concepts: &[Concept]) -> Result<Vec<Option<ConceptPositions>>> {
    let words = tok.tokenize_words(prompt);
    let mut out = Vec::new();
    for c in concepts {
        let Some(mod_id) = tok.token_id(&c.modifier) else {
            bail!("modifier token {} is not in the tokenizer (was it added?)", c.modifier);
        };
        let mut pos = 1usize; // after <|startoftext|>
        let mut found = None;
        for (w, (_, ids)) in words.iter().enumerate() {
            if ids.len() == 1 && ids[0] == mod_id {
                if let Some((_, next_ids)) = words.get(w + 1) {
                    found = Some(ConceptPositions { modifier: pos, class: pos + next_ids.len() });
                }
                break;
            }
            pos += ids.len();
        }
        if let Some(p) = found {
            if p.class >= tok.max_length - 1 {
                bail!("the prompt {prompt:?} is too long: {}'s class word falls past the {}-token limit", c.modifier, tok.max_length);
            }
        }
        out.push(found);
    }
    Ok(out)
}

/// The number of BPE tokens of a class word; more than one deserves a note to the user.
pub fn class_word_pieces(tok: &ClipTokenizer, word: &str) -> usize {
    tok.tokenize_words(word).first().map_or(0, |(_, ids)| ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_modifiers_and_classes() {
        let mods = modifier_tokens_in("<new1> cat and <new2> dog");
        assert_eq!(mods, vec!["<new1>", "<new2>"]);
        let c = parse_concepts("<new1> cat and <new2> dog", &mods, &default_initializers(2).unwrap()).unwrap();
        assert_eq!(c[0].class_word, "cat");
        assert_eq!(c[1].class_word, "dog");
        assert_eq!(c[1].initializer, "ktn");
    }

    #[test]
    fn rejects_bad_captions() {
        assert!(parse_concepts("a cat and a dog", &[], &[]).is_err());
        let mods = modifier_tokens_in("a cat and <new1>");
        assert!(parse_concepts("a cat and <new1>", &mods, &default_initializers(1).unwrap()).is_err());
        let mods = modifier_tokens_in("<new1> <new2> dog");
        assert!(parse_concepts("<new1> <new2> dog", &mods, &default_initializers(2).unwrap()).is_err());
        let mods = modifier_tokens_in("<new1> cat, <new2> dog, <new3> cow");
        assert!(parse_concepts("<new1> cat, <new2> dog, <new3> cow", &mods, &["pll".into(), "ktn".into()]).is_err());
        assert_eq!(default_initializers(3).unwrap()[0], THIRD_INITIALIZER);
    }
}
