//! A base model prepared for personalization: new modifier tokens with trainable embedding
//! rows, and the trainable UNet weights (docs/method.md §2) as variables; everything else frozen,
//! unless the whole text encoder trains as well ([`Personalized::train_text_encoder`]).

use super::concepts::Concept;
use super::method::UNetTrainable;
use crate::model::sd::{LoadOptions, StableDiffusion, TEXT_ENCODER_PREFIX};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::path::Path;

pub struct Personalized {
    pub sd: StableDiffusion,
    pub concepts: Vec<Concept>,
    /// Token ids of the modifiers, in concept order.
    pub modifier_ids: Vec<u32>,
    /// The modifier rows [n, hidden], trainable.
    pub embeddings: Var,
    /// Trainable UNet weights with their diffusers names (sorted by name).
    pub unet_vars: Vec<(String, Var)>,
    /// Trainable text encoder weights (DreamBooth's `--train-text-encoder`; empty otherwise), by
    /// their transformers names without `text_model.` (sorted). With the vocabulary table
    /// `embeddings.token_embedding.weight` trainable and the new rows in [`embeddings`](Self::embeddings),
    /// the extended table `[vocab + n, hidden]` trains as a whole, as diffusers'
    /// `train_dreambooth.py --train_text_encoder` trains the resized table (AdamW is elementwise,
    /// so two variables update exactly as one).
    pub text_encoder_vars: Vec<(String, Var)>,
}

/// Looks up an initialiser token: the exact vocabulary entry (`pll`, `ucd</w>`) or, failing
/// that, the whole word (`pll</w>`).
pub fn initializer_id(sd: &StableDiffusion, token: &str) -> Result<u32> {
    let tok = &sd.tokenizer;
    if let Some(id) = tok.token_id(token).or_else(|| tok.token_id(&format!("{token}</w>"))) {
        return Ok(id);
    }
    let ids = tok.tokenize(token);
    match ids.as_slice() {
        [(id, _)] => Ok(*id),
        _ => bail!("initialiser token {token:?} is not a single vocabulary token (it splits into {} pieces)", ids.len()),
    }
}

impl Personalized {
    /// Loads the base model, adds the modifier tokens and marks the trainable weights.
    pub fn load(root: &Path, opts: &LoadOptions, concepts: &[Concept], unet_trainable: UNetTrainable) -> Result<Self> {
        let sd = StableDiffusion::load_with(root, opts, move |n| unet_trainable.matches(n))?;
        Self::from_model(sd, concepts)
    }

    /// Adds the concepts' tokens to a loaded model, their rows copied from the initialisers'.
    pub fn from_model(mut sd: StableDiffusion, concepts: &[Concept]) -> Result<Self> {
        let mut modifier_ids = Vec::new();
        let mut init_rows = Vec::new();
        for c in concepts {
            let init = initializer_id(&sd, &c.initializer)?;
            init_rows.push(sd.text_encoder.token_embedding_row(init)?);
        }
        for c in concepts {
            let id = sd.tokenizer.add_token(&c.modifier)?;
            modifier_ids.push(id);
        }
        let base = sd.text_encoder.config.vocab_size as u32;
        if modifier_ids.first().is_some_and(|&id| id != base) {
            bail!("the tokenizer's new ids start at {}, but the text encoder table has {base} rows", modifier_ids[0]);
        }
        let rows = Tensor::stack(&init_rows, 0)?;
        let embeddings = Var::from_tensor(&rows.to_dtype(DType::F32)?.to_device(&sd.device)?)?;
        sd.text_encoder.set_extra_embeddings(Some(embeddings.as_tensor().clone()))?;
        let mut unet_vars = sd.unet_vars.clone();
        unet_vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { sd, concepts: concepts.to_vec(), modifier_ids, embeddings, unet_vars, text_encoder_vars: Vec::new() })
    }

    /// Makes every text encoder weight trainable (idempotent).
    pub fn train_text_encoder(&mut self) -> Result<()> {
        if self.text_encoder_vars.is_empty() {
            self.text_encoder_vars = self.sd.text_encoder.make_trainable()?;
        }
        Ok(())
    }

    /// How many parameters train: what the memory estimate counts gradients and AdamW state
    /// for (the text encoder's too under `--train-text-encoder`).
    pub fn trainable_parameters(&self, train_embeddings: bool) -> u64 {
        self.trainable(train_embeddings).iter().map(|(_, v)| v.elem_count() as u64).sum()
    }

    /// All trainable variables: the UNet's (by diffusers name), the text encoder's (as
    /// `text_encoder.<name>`, when it trains), then the new tokens' rows as one
    /// `token_embeddings` variable.
    pub fn trainable(&self, train_embeddings: bool) -> Vec<(String, Var)> {
        let mut v = self.unet_vars.clone();
        v.extend(self.text_encoder_vars.iter().map(|(n, var)| (format!("{TEXT_ENCODER_PREFIX}{n}"), var.clone())));
        if train_embeddings {
            v.push(("token_embeddings".to_string(), self.embeddings.clone()));
        }
        v
    }

    /// The embedding row of concept `i`.
    pub fn embedding_row(&self, i: usize) -> Result<Tensor> {
        self.embeddings.as_tensor().get(i).context("embedding row")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::concepts::{modifier_tokens_in, parse_concepts};

    /// The counts torch reports for the reference's DreamBooth step (golden json).
    fn reference_count(stem: &str, key: &str) -> u64 {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/golden/{stem}.json"));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v[key].as_u64().unwrap()
    }

    #[test]
    fn trainable_parameters_count_the_text_encoder_when_it_trains() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1-tiny");
        let caption = "<new1> cat and <new2> dog";
        let concepts = parse_concepts(caption, &modifier_tokens_in(caption), &["pll".into(), "ktn".into()]).unwrap();
        let mut m = Personalized::load(&root, &LoadOptions::default(), &concepts, UNetTrainable::All).unwrap();
        let unet = reference_count("dreambooth-step", "unet_param_count");
        let rows = 2 * m.sd.text_encoder.hidden_size() as u64;
        assert_eq!(m.trainable_parameters(true), unet + rows);
        assert_eq!(m.trainable_parameters(false), unet);
        m.train_text_encoder().unwrap();
        let te = reference_count("dreambooth-te-step", "text_encoder_param_count");
        assert_eq!(te, 1_600_672);
        assert_eq!(m.trainable_parameters(true), unet + te + rows);
        // the estimate's optimiser state and gradients grow by the text encoder's share
        let t = |n| crate::model::memory::Training { resolution: 64, batch: 2, attn_resolution: 8, trainable_params: n, grad_accum: 1, state_bytes: 8, checkpointed: false };
        let (with, without) = (t(m.trainable_parameters(true)), t(unet + rows));
        assert_eq!(with.optimizer_state_bytes() + with.gradient_bytes() - without.optimizer_state_bytes() - without.gradient_bytes(), 12 * te);
        m.train_text_encoder().unwrap();
        assert_eq!(m.trainable_parameters(true), unet + te + rows, "train_text_encoder is idempotent");
    }
}
