//! A concept file as a patch: its fine-tuned cross-attention weights and its new tokens with
//! their learned embedding rows, applied to a loaded model and undone exactly.
//!
//! The file holds full fine-tuned weights W_trained and the fingerprint of the base values
//! W_base they were trained from (docs/formats.md). On the model it was trained on (same
//! fingerprint) the weights are set to W_trained; if a lower patch (a LoRA) changed one of them,
//! the difference W_trained - W_base is added instead. On another model with the same layers and
//! shapes (an inpainting UNet, a fine-tuned or LoRA-merged base: the paper's Fig. 7 and 8) the
//! difference is taken against the weights of the model the file was trained on (a folder the
//! user names, checked against the fingerprint) and added to this model's weights, with a
//! warning naming both; without that folder such a model is refused. A file trained with LoRAs
//! merged into its base (`train --lora`) carries the fingerprint of the weights with those
//! LoRAs: on a model whose LoRA patches leave exactly those weights, W_trained is set. A model
//! without the file's layers or shapes is always refused.

use super::{set_weight, BaseValues, Layer, Patch, Undo};
use crate::formats::concept_file::{self, ConceptFile};
use crate::formats::delta_ckpt;
use crate::model::sd::{open_base_unet_f32, SingleFileOptions, StableDiffusion};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

/// Whether, and from where, a concept file may be applied to a model other than the one it
/// was trained on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrainedBase {
    /// Only to the model it was trained on (the default): anything else is refused.
    Refuse,
    /// Also to a model with the same layers, as the difference from this folder, which must
    /// hold the model it was trained on (diffusers layout; only its UNet weights are read).
    Folder(PathBuf),
    /// As `Folder`, the model it was trained on being a single-file checkpoint, read with the
    /// configs of `config` (else the built-in ones) and its EMA UNet if `ema` (only its UNet
    /// weights are read).
    File { path: PathBuf, config: Option<PathBuf>, ema: bool },
}

pub struct ConceptPatch {
    pub path: PathBuf,
    pub file: ConceptFile,
    pub trained_base: TrainedBase,
}

impl ConceptPatch {
    /// Reads a concept file, or a diffusers Custom Diffusion folder.
    pub fn load(path: &Path, trained_base: TrainedBase) -> Result<Self> {
        if delta_ckpt::is_delta_ckpt(path) {
            bail!("{}: a delta.ckpt is read for a loaded model (its layout names its layers): use PatchedModel::add_concepts", path.display());
        }
        Ok(Self { path: path.to_path_buf(), file: crate::formats::custom_diffusion::load_any(path)?, trained_base })
    }

    /// Reads a concept file, a diffusers Custom Diffusion folder or an official DisenDiff /
    /// Custom Diffusion `delta.ckpt` (its CompVis names mapped for a UNet with
    /// `layers_per_block`; `modifier_tokens` names its embedding rows and is refused for
    /// anything else). Returns a note for the user when the tokens were assumed.
    pub fn load_for(
        path: &Path,
        trained_base: TrainedBase,
        layers_per_block: &[usize],
        modifier_tokens: Option<&[String]>,
    ) -> Result<(Self, Option<String>)> {
        if !delta_ckpt::is_delta_ckpt(path) {
            if modifier_tokens.is_some() {
                bail!("--modifier-tokens belongs to a delta.ckpt; {} names its own tokens", path.display());
            }
            return Ok((Self::load(path, trained_base)?, None));
        }
        let (file, note) = delta_ckpt::load(path, layers_per_block, modifier_tokens)?;
        Ok((Self { path: path.to_path_buf(), file, trained_base }, note))
    }

    /// "<new1> cat, <new2> dog".
    pub fn describe(&self) -> String {
        self.file.meta.concept.iter().map(|c| format!("{} {}", c.modifier, c.class_word)).collect::<Vec<_>>().join(", ")
    }

    /// The base weights of the file's UNet weights read from the model it was trained on,
    /// checked against the file's fingerprint; `None` when no such folder is available.
    fn trained_base_weights(&self) -> Result<Option<(PathBuf, Vec<(String, Tensor)>)>> {
        let recorded = &self.file.meta.base_model;
        let (folder, single) = match &self.trained_base {
            TrainedBase::Refuse => return Ok(None),
            TrainedBase::Folder(p) => (p.clone(), SingleFileOptions::default()),
            TrainedBase::File { path, config, ema } => {
                (path.clone(), SingleFileOptions { config: config.clone(), prediction_type: None, ema: *ema })
            }
        };
        let names: Vec<&String> = self.file.unet_weights.keys().collect();
        let base = open_base_unet_f32(&folder, &single)?;
        let store = &base.store;
        let mut weights = Vec::new();
        for name in names {
            let Some(shape) = store.shape_of(name) else {
                bail!("{} has no UNet weight {name}, so it is not the model {} was trained on", folder.display(), self.path.display());
            };
            let shape = candle_core::Shape::from(shape.to_vec());
            weights.push((name.clone(), store.get(name, &shape)?));
        }
        let fp = concept_file::fingerprint(&weights, base.token_table)?;
        if fp != recorded.fingerprint {
            bail!(
                "{} (fingerprint {fp}) is not the model {} was trained on ({}, fingerprint {})",
                folder.display(),
                self.path.display(),
                recorded.path,
                recorded.fingerprint
            );
        }
        Ok(Some((folder, weights)))
    }
}


impl Patch for ConceptPatch {
    fn layer(&self) -> Layer {
        Layer::Concepts
    }

    fn label(&self) -> String {
        self.path.display().to_string()
    }

    fn apply(&self, sd: &mut StableDiffusion, base: &BaseValues) -> Result<(Undo, Vec<String>)> {
        let file = &self.file;
        let made_for = match file.meta.base_model.path.as_str() {
            "" => "a model it does not record",
            p => p,
        };
        // Everything is checked before anything changes.
        for (name, w) in &file.unet_weights {
            let Some(var) = sd.unet_weight_var(name) else {
                bail!(
                    "{} holds {name}, which the UNet of {} does not have: the file was made for {made_for}",
                    self.path.display(),
                    sd.root.display()
                );
            };
            if var.dims() != w.dims() {
                bail!(
                    "{}: {name} has shape {:?}, the UNet of {} {:?}: the file was made for {made_for}",
                    self.path.display(),
                    w.dims(),
                    sd.root.display(),
                    var.dims()
                );
            }
        }
        let hidden = sd.text_encoder.hidden_size();
        let (n_rows, width) = file.embeddings.dims2()?;
        if width != hidden || n_rows != file.meta.concept.len() {
            bail!(
                "{}: {n_rows} embedding rows of width {width} for {} concepts, but the text encoder of {} has width {hidden}",
                self.path.display(),
                file.meta.concept.len(),
                sd.root.display()
            );
        }
        for c in &file.meta.concept {
            if let Some(id) = sd.tokenizer.token_id(&c.modifier) {
                bail!(
                    "{}: the token {} is already in the vocabulary (id {id}), e.g. from another concept file",
                    self.path.display(),
                    c.modifier
                );
            }
        }
        let names: Vec<&String> = file.unet_weights.keys().collect();
        let mut base_now = Vec::new();
        for name in &names {
            base_now.push(((*name).clone(), base.get(sd, name)?));
        }
        let table = sd.text_encoder.token_embedding().dims2()?;
        // A diffusers Custom Diffusion folder records no base (empty fingerprint): its weights
        // are set as diffusers sets them.
        let unknown_base = file.meta.base_model.fingerprint.is_empty();
        let same_base = unknown_base || concept_file::fingerprint(&base_now, table)? == file.meta.base_model.fingerprint;
        // Trained with LoRAs merged into its base (`disendiff train --lora`): the fingerprint is
        // that of the weights as the LoRAs below left them, and the trained weights are set.
        let on_loras = !same_base && names.iter().any(|n| base.is_patched(n)) && {
            let mut now = Vec::new();
            for name in &names {
                let var = sd.unet_weight_var(name).expect("checked");
                now.push(((*name).clone(), var.as_tensor().clone()));
            }
            concept_file::fingerprint(&now, table)? == file.meta.base_model.fingerprint
        };

        let mut warnings = Vec::new();
        if unknown_base {
            warnings.push(format!(
                "{} does not record the model it was trained on: its weights are set on {} as diffusers does, unchecked",
                self.path.display(),
                sd.root.display()
            ));
        }
        // The difference to add to the current weights, or `None` to set the trained weights.
        let mut deltas: Vec<Option<Tensor>> = Vec::new();
        if on_loras {
            deltas = vec![None; names.len()];
        } else if same_base {
            for (name, b) in &base_now {
                let trained = file.unet_weights[name].to_dtype(DType::F32)?;
                deltas.push(if base.is_patched(name) { Some((trained - b.to_dtype(DType::F32)?)?) } else { None });
            }
        } else {
            let Some((folder, trained_from)) = self.trained_base_weights()? else {
                bail!(
                    "{} was trained on the base model {made_for} (fingerprint {}), but {} is a different model. \
                     To apply it as the difference from the model it was trained on, pass that model with --concepts-base DIR|FILE",
                    self.path.display(),
                    file.meta.base_model.fingerprint,
                    sd.root.display()
                );
            };
            for (name, b) in &trained_from {
                deltas.push(Some((file.unet_weights[name].to_dtype(DType::F32)? - b)?));
            }
            warnings.push(format!(
                "{} was trained on {} and {} is a different model with the same layers: applying it as the \
                 difference of its weights from {}'s, added to {}'s weights (quality may differ from the base it was trained on)",
                self.path.display(),
                folder.display(),
                sd.root.display(),
                folder.display(),
                sd.root.display()
            ));
        }

        let mut undo = Undo::default();
        let result = (|| -> Result<()> {
            for (name, delta) in names.iter().zip(&deltas) {
                let value = match delta {
                    None => file.unet_weights[*name].clone(),
                    Some(d) => {
                        let current = sd.unet_weight_var(name).expect("checked").as_tensor().to_dtype(DType::F32)?;
                        (current + d.to_device(&sd.device)?)?
                    }
                };
                set_weight(sd, name, &value, &mut undo)?;
            }
            let before = sd.text_encoder.extra_embeddings().cloned();
            let rows = file.embeddings.to_dtype(DType::F32)?.to_device(&sd.device)?;
            let rows = match &before {
                Some(prev) => Tensor::cat(&[&prev.to_dtype(DType::F32)?, &rows], 0)?,
                None => rows,
            };
            let first_id = (table.0 + before.as_ref().map_or(Ok(0), |p| p.dim(0))?) as u32;
            undo.extra_embeddings = Some(before);
            sd.text_encoder.set_extra_embeddings(Some(rows))?;
            for (k, c) in file.meta.concept.iter().enumerate() {
                let id = sd.tokenizer.add_token(&c.modifier)?;
                undo.tokens.push(c.modifier.clone());
                if id != first_id + k as u32 {
                    bail!("the tokenizer gave {} the id {id}, but its embedding row is {}", c.modifier, first_id + k as u32);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            super::revert(sd, &undo).context("undoing a partly applied concept file")?;
            return Err(e);
        }
        Ok((undo, warnings))
    }
}
