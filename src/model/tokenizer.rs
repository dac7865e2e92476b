//! The CLIP BPE tokenizer, read from a diffusers `tokenizer/` folder.
//!
//! SD folders ship `vocab.json` + `merges.txt` (sometimes also or only `tokenizer.json`), with
//! the pad token in `special_tokens_map.json` / `tokenizer_config.json` (`<|endoftext|>` for
//! SD1.x, `!` for SD2.x). The pipeline is the one transformers' `CLIPTokenizer` runs:
//! NFC, whitespace collapsed to one space, lower-case; added tokens (`<new1>`, ...) split out
//! whole; the CLIP word regex; byte-level characters; BPE with `</w>` marking a word's end;
//! `<|startoftext|>` ... `<|endoftext|>` around, truncated and padded to 77 ids.

use anyhow::{bail, Context, Result};
use regex::Regex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use unicode_normalization::UnicodeNormalization;

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// What [`ClipTokenizer::encode`] returns.
#[derive(Debug, Clone)]
pub struct Encoding {
    /// Exactly `max_length` ids: start, tokens, end, padding.
    pub ids: Vec<u32>,
    /// The words dropped by truncation (empty when the prompt fit).
    pub truncated: Vec<String>,
}

pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    bpe_ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    word_pattern: Regex,
    /// Added whole-word tokens, longest first, with their ids.
    added: Vec<(String, u32)>,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
    cache: Mutex<HashMap<String, Vec<String>>>,
}

/// GPT-2/CLIP's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if printable.contains(&b) {
            map[b as usize] = char::from_u32(b).unwrap();
        } else {
            map[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        }
    }
    map
}

fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

impl ClipTokenizer {
    /// Reads a diffusers `tokenizer/` folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let tok_json = dir.join("tokenizer.json");
        let (encoder, merges, mut added_from_json) = if vocab_path.is_file() && merges_path.is_file() {
            let vocab: HashMap<String, u32> = serde_json::from_value(read_json(&vocab_path)?)
                .with_context(|| format!("{} is not a token -> id map", vocab_path.display()))?;
            let text = std::fs::read_to_string(&merges_path)
                .with_context(|| format!("reading {}", merges_path.display()))?;
            let mut merges = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                    continue;
                }
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                    _ => bail!("{} line {}: a merge must be two symbols, got {line:?}", merges_path.display(), n + 1),
                }
            }
            (vocab, merges, Vec::new())
        } else if tok_json.is_file() {
            Self::read_tokenizer_json(&tok_json)?
        } else {
            bail!("{} has neither vocab.json + merges.txt nor tokenizer.json", dir.display());
        };

        // Pad token and max length from the configs (SD1: <|endoftext|>, SD2: "!").
        let mut pad_token = END_OF_TEXT.to_string();
        let mut max_length = 77usize;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if p.is_file() {
                let v = read_json(&p)?;
                if let Some(t) = v.get("pad_token").and_then(token_content) {
                    pad_token = t;
                }
                if let Some(n) = v.get("model_max_length").and_then(|n| n.as_f64()) {
                    if n > 0.0 && n < 1e6 {
                        max_length = n as usize;
                    }
                }
                if let Some(map) = v.get("added_tokens_decoder").and_then(|m| m.as_object()) {
                    for (id, tok) in map {
                        if let (Ok(id), Some(content)) = (id.parse::<u32>(), token_content(tok)) {
                            added_from_json.push((content, id));
                        }
                    }
                }
            }
        }
        let mut tok = Self::from_vocab_merges(encoder, merges, &pad_token, max_length)?;
        for (content, id) in added_from_json {
            if !tok.encoder.contains_key(&content) {
                tok.insert_added(&content, id);
            }
        }
        Ok(tok)
    }

    #[allow(clippy::type_complexity)]
    fn read_tokenizer_json(path: &Path) -> Result<(HashMap<String, u32>, Vec<(String, String)>, Vec<(String, u32)>)> {
        let v = read_json(path)?;
        let model = &v["model"];
        let vocab: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone())
            .with_context(|| format!("{}: model.vocab is not a token -> id map", path.display()))?;
        let mut merges = Vec::new();
        for m in model["merges"].as_array().with_context(|| format!("{}: no model.merges", path.display()))? {
            let pair = match m {
                serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(a) if a.len() == 2 => {
                    Some((a[0].as_str().unwrap_or_default().to_string(), a[1].as_str().unwrap_or_default().to_string()))
                }
                _ => None,
            };
            merges.push(pair.with_context(|| format!("{}: malformed merge {m}", path.display()))?);
        }
        let mut added = Vec::new();
        if let Some(list) = v["added_tokens"].as_array() {
            for t in list {
                if let (Some(c), Some(id)) = (t["content"].as_str(), t["id"].as_u64()) {
                    added.push((c.to_string(), id as u32));
                }
            }
        }
        Ok((vocab, merges, added))
    }

    /// The tokenizer of a single file's text encoder (`family`), which ships none: CLIP's
    /// vocabulary and merges from the bundled merges (`model::single_file::bundled_tokenizer`),
    /// 77 ids long, padded as that family's SD repos pad.
    pub fn bundled(family: crate::model::single_file::Family) -> Result<Self> {
        use crate::model::single_file::bundled_tokenizer as b;
        let merges = b::merges()?;
        let vocab = b::vocab(&merges);
        Self::from_vocab_merges(vocab, merges, b::pad_token(family), 77)
    }

    /// Builds a tokenizer from an in-memory vocabulary and BPE merges as a `tokenizer/` folder
    /// with pad token `pad_token` does: a pad token other than `<|startoftext|>` /
    /// `<|endoftext|>` is a special token split out of the text, as transformers does (with
    /// SD2's pad token "!", every "!" in a prompt becomes the pad id 0, not "!</w>" 256).
    pub fn from_vocab_merges(encoder: HashMap<String, u32>, merges: Vec<(String, String)>, pad_token: &str, max_length: usize) -> Result<Self> {
        let mut tok = Self::new(encoder, merges, pad_token, max_length)?;
        if pad_token != START_OF_TEXT && pad_token != END_OF_TEXT {
            let id = tok.pad_id;
            tok.added.push((pad_token.to_string(), id));
            tok.added.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        }
        Ok(tok)
    }

    /// Builds a tokenizer from a vocabulary and BPE merges.
    pub fn new(encoder: HashMap<String, u32>, merges: Vec<(String, String)>, pad_token: &str, max_length: usize) -> Result<Self> {
        let id = |t: &str| -> Result<u32> {
            encoder.get(t).copied().with_context(|| format!("the tokenizer vocabulary has no {t:?} token"))
        };
        let bos_id = id(START_OF_TEXT)?;
        let eos_id = id(END_OF_TEXT)?;
        let pad_id = id(pad_token)?;
        if max_length < 2 {
            bail!("tokenizer model_max_length {max_length} is too small");
        }
        let decoder = encoder.iter().map(|(k, v)| (*v, k.clone())).collect();
        let bpe_ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        let word_pattern = Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )?;
        Ok(Self {
            encoder,
            decoder,
            bpe_ranks,
            byte_encoder: bytes_to_unicode(),
            word_pattern,
            added: Vec::new(),
            bos_id,
            eos_id,
            pad_id,
            max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn insert_added(&mut self, token: &str, id: u32) {
        self.encoder.insert(token.to_string(), id);
        self.decoder.insert(id, token.to_string());
        self.added.push((token.to_string(), id));
        self.added.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
    }

    /// Adds a whole-word token (e.g. `<new1>`) with the next free id and returns that id.
    /// A token that the vocabulary already holds is an error: it would not be new.
    pub fn add_token(&mut self, token: &str) -> Result<u32> {
        if token.is_empty() || token.chars().any(char::is_whitespace) {
            bail!("token {token:?} must be non-empty and contain no whitespace");
        }
        if token.to_lowercase() != token {
            bail!("token {token:?} must be lower-case (the CLIP tokenizer lower-cases prompts)");
        }
        if let Some(id) = self.encoder.get(token) {
            bail!("token {token:?} is already in the vocabulary (id {id}); choose another modifier token");
        }
        let id = self.vocab_size() as u32;
        self.insert_added(token, id);
        Ok(id)
    }

    /// Removes an added token again. Only the newest one can go, so the ids of the others stay
    /// contiguous (the patch layer reverts in reverse order of application).
    pub fn remove_added_token(&mut self, token: &str) -> Result<()> {
        let Some(&id) = self.encoder.get(token) else { bail!("token {token:?} is not in the vocabulary") };
        if !self.added.iter().any(|(t, _)| t == token) {
            bail!("token {token:?} belongs to the base vocabulary and cannot be removed");
        }
        if id as usize + 1 != self.vocab_size() {
            bail!("token {token:?} (id {id}) is not the newest added token; remove newer ones first");
        }
        self.encoder.remove(token);
        self.decoder.remove(&id);
        self.added.retain(|(t, _)| t != token);
        Ok(())
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.decoder.keys().max().map_or(0, |m| *m as usize + 1)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.decoder.get(&id).map(|s| s.as_str())
    }

    /// Text normalisation of transformers' CLIP tokenizer.
    fn normalize(text: &str) -> String {
        let nfc: String = text.nfc().collect();
        let mut out = String::with_capacity(nfc.len());
        let mut in_space = false;
        for c in nfc.chars() {
            if c.is_whitespace() {
                if !in_space {
                    out.push(' ');
                }
                in_space = true;
            } else {
                out.push(c);
                in_space = false;
            }
        }
        out.to_lowercase()
    }

    fn bpe(&self, word: &str) -> Vec<String> {
        if let Some(hit) = self.cache.lock().unwrap().get(word) {
            return hit.clone();
        }
        let chars: Vec<char> = word.chars().collect();
        let mut parts: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let mut best: Option<(usize, usize)> = None;
            for i in 0..parts.len().saturating_sub(1) {
                if let Some(&rank) = self.bpe_ranks.get(&(parts[i].clone(), parts[i + 1].clone())) {
                    if best.is_none_or(|(r, _)| rank < r) {
                        best = Some((rank, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let (a, b) = (parts[i].clone(), parts[i + 1].clone());
            let mut merged = Vec::with_capacity(parts.len());
            let mut j = 0;
            while j < parts.len() {
                if j + 1 < parts.len() && parts[j] == a && parts[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(parts[j].clone());
                    j += 1;
                }
            }
            parts = merged;
        }
        self.cache.lock().unwrap().insert(word.to_string(), parts.clone());
        parts
    }

    /// Splits normalised text into added tokens and plain text runs.
    fn split_added<'a>(&self, text: &'a str) -> Vec<(&'a str, Option<u32>)> {
        let mut out = Vec::new();
        let mut rest_start = 0;
        let mut i = 0;
        'scan: while i < text.len() {
            for (tok, id) in &self.added {
                if text[i..].starts_with(tok.as_str()) {
                    if rest_start < i {
                        out.push((&text[rest_start..i], None));
                    }
                    out.push((&text[i..i + tok.len()], Some(*id)));
                    i += tok.len();
                    rest_start = i;
                    continue 'scan;
                }
            }
            i += text[i..].chars().next().map_or(1, |c| c.len_utf8());
        }
        if rest_start < text.len() {
            out.push((&text[rest_start..], None));
        }
        out
    }

    /// Words of `text` written like modifier tokens (`<new3>`, `<cat>`) that are not in the
    /// vocabulary, in order of appearance: the BPE would split them into ordinary text, which is
    /// what a typo in a modifier token gives.
    pub fn unknown_angle_tokens(&self, text: &str) -> Vec<String> {
        let re = Regex::new(r"<[^<>\s]+>").expect("valid regex");
        let mut out: Vec<String> = Vec::new();
        for m in re.find_iter(&Self::normalize(text)) {
            let t = m.as_str().to_string();
            if self.token_id(&t).is_none() && !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Token ids of the text (no start/end tokens), grouped by the word they came from: an added
    /// token is a word of its own; a word the BPE splits gives several ids.
    pub fn tokenize_words(&self, text: &str) -> Vec<(String, Vec<u32>)> {
        let text = Self::normalize(text);
        let mut words = Vec::new();
        for (piece, added) in self.split_added(&text) {
            if let Some(id) = added {
                words.push((piece.to_string(), vec![id]));
                continue;
            }
            for m in self.word_pattern.find_iter(piece) {
                let word = m.as_str();
                if let Some(&id) = self.encoder.get(word).filter(|_| word == START_OF_TEXT || word == END_OF_TEXT) {
                    words.push((word.to_string(), vec![id]));
                    continue;
                }
                let encoded: String = word.bytes().map(|b| self.byte_encoder[b as usize]).collect();
                let ids = self.bpe(&encoded).iter().map(|sub| self.encoder.get(sub).copied().unwrap_or(self.eos_id)).collect();
                words.push((word.to_string(), ids));
            }
        }
        words
    }

    /// Token ids of the text, without start/end tokens, with the word each came from.
    pub fn tokenize(&self, text: &str) -> Vec<(u32, String)> {
        self.tokenize_words(text).into_iter().flat_map(|(w, ids)| ids.into_iter().map(move |id| (id, w.clone()))).collect()
    }

    /// `<|startoftext|>` + tokens + `<|endoftext|>`, truncated and padded to `max_length`.
    pub fn encode(&self, text: &str) -> Encoding {
        let tokens = self.tokenize(text);
        let room = self.max_length - 2;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(tokens.iter().take(room).map(|(id, _)| *id));
        ids.push(self.eos_id);
        let mut truncated: Vec<String> = Vec::new();
        for (_, word) in tokens.iter().skip(room) {
            if truncated.last() != Some(word) {
                truncated.push(word.clone());
            }
        }
        ids.resize(self.max_length, self.pad_id);
        Encoding { ids, truncated }
    }

    /// Like [`encode`](Self::encode), printing diffusers' warning when the prompt was cut.
    pub fn encode_warn(&self, text: &str) -> Vec<u32> {
        let e = self.encode(text);
        if !e.truncated.is_empty() {
            eprintln!(
                "warning: the prompt is longer than {} tokens; this part was cut off: {:?}",
                self.max_length,
                e.truncated.join(" ")
            );
        }
        e.ids
    }
}
