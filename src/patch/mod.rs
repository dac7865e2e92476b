//! The patch layer: changes applied to a loaded model in a fixed order, each undone exactly.
//!
//! A loaded [`StableDiffusion`] is the base. On top of it go, in this order, LoRA files (texture
//! and style, the paper's Fig. 8) and then concept files ([`ConceptPatch`]: fine-tuned
//! cross-attention K/V and new token embeddings). A [`PatchStack`] keeps the applied patches
//! with the values each replaced, so that:
//! - removing a patch restores what was there before it bit for bit (swap concepts without
//!   reloading the model);
//! - adding a patch of a lower layer (a LoRA while concepts are applied) takes the higher ones
//!   off, applies it, and puts them back, so the result never depends on the order of calls;
//! - every patch can ask for the *base* value of a weight (before any patch), which is what a
//!   concept file's fingerprint and its difference are taken against.
//!
//! The weights a patch may change are the model's patchable variables
//! (`StableDiffusion::weight_var`: the UNet's attn2 Q/K/V, and what the LoRA files to apply
//! name, chosen when the model is loaded): held in a `Var` that is set in place, while the
//! modules read an untracked view of it. Nothing here knows about training.

mod concepts;
pub mod lora;

pub use concepts::{ConceptPatch, TrainedBase};
pub use lora::{LoraPatch, LoraSpec};

use crate::model::sd::{LoadOptions, StableDiffusion};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::Path;

/// A loaded model with the patches applied to it: what generation loads.
pub struct PatchedModel {
    pub sd: StableDiffusion,
    pub patches: PatchStack,
}

impl PatchedModel {
    /// Loads a base model with nothing applied.
    pub fn load(root: &Path, opts: &LoadOptions) -> Result<Self> {
        Ok(Self { sd: StableDiffusion::load(root, opts)?, patches: PatchStack::new() })
    }

    /// Loads a base model with LoRA files merged into it (in the order given), loading their
    /// target weights patchable; returns the warnings of the files.
    pub fn load_with_loras(root: &Path, opts: &LoadOptions, loras: &[LoraSpec], allow_unmatched: bool) -> Result<(Self, Vec<String>)> {
        if loras.is_empty() {
            return Ok((Self::load(root, opts)?, Vec::new()));
        }
        Self::load_with_loras_trainable(root, opts, loras, allow_unmatched, |_| false)
    }

    /// [`load_with_loras`](Self::load_with_loras) with the UNet weights `unet_trainable`
    /// names loaded as trainable variables (as `StableDiffusion::load_with`): the base of a
    /// training run with LoRAs merged into it.
    pub fn load_with_loras_trainable(
        root: &Path,
        opts: &LoadOptions,
        loras: &[LoraSpec],
        allow_unmatched: bool,
        unet_trainable: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Result<(Self, Vec<String>)> {
        let targets = lora::target_names(root, opts)?;
        let mut patches = Vec::new();
        let mut warnings = Vec::new();
        for spec in loras {
            let (patch, w) = LoraPatch::read(spec, &targets, allow_unmatched)?;
            warnings.extend(w);
            patches.push(patch);
        }
        let mut extra = crate::model::sd::ExtraPatchable::default();
        for p in &patches {
            p.add_targets(&mut extra);
        }
        let mut m = Self { sd: StableDiffusion::load_full(root, opts, unet_trainable, extra)?, patches: PatchStack::new() };
        for p in patches {
            warnings.extend(m.patches.push(&mut m.sd, Box::new(p))?);
        }
        Ok((m, warnings))
    }

    /// Takes every LoRA off again (concept files stay, re-applied on the base).
    pub fn remove_loras(&mut self) -> Result<Vec<String>> {
        self.patches.remove_layer(&mut self.sd, Layer::Lora)
    }

    /// Applies a concept file on top (after any LoRA); returns its concepts ("<new1> cat,
    /// <new2> dog") and warnings for the user.
    pub fn add_concepts(&mut self, file: &Path, trained_base: TrainedBase) -> Result<(String, Vec<String>)> {
        self.add_concepts_with(file, trained_base, None)
    }

    /// [`Self::add_concepts`] that also reads an official `delta.ckpt` (for this model's UNet
    /// layout), whose embedding rows `modifier_tokens` names (default `<new1>`..`<newN>`, with
    /// a note among the warnings).
    pub fn add_concepts_with(&mut self, file: &Path, trained_base: TrainedBase, modifier_tokens: Option<&[String]>) -> Result<(String, Vec<String>)> {
        let c = &self.sd.unet_config;
        let layers = c.layers_per_block.expand(c.block_out_channels.len(), "layers_per_block")?;
        let (patch, note) = ConceptPatch::load_for(file, trained_base, &layers, modifier_tokens)?;
        let described = patch.describe();
        let mut warnings: Vec<String> = note.into_iter().collect();
        warnings.extend(self.patches.push(&mut self.sd, Box::new(patch))?);
        Ok((described, warnings))
    }

    /// Takes every concept file off again.
    pub fn remove_concepts(&mut self) -> Result<Vec<String>> {
        self.patches.remove_layer(&mut self.sd, Layer::Concepts)
    }
}

/// Where a patch sits in the stack; lower layers are applied first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layer {
    Lora,
    Concepts,
}

/// What applying a patch replaced, to put it back.
#[derive(Default)]
pub struct Undo {
    /// Weights by the patch layer's name (UNet: diffusers name; text encoder:
    /// `text_encoder.<name>`), with their values before the patch (deep copies).
    pub weights: Vec<(String, Tensor)>,
    /// Tokens the patch added to the tokenizer, in the order added.
    pub tokens: Vec<String>,
    /// The text encoder's new-token rows before the patch, when the patch changed them.
    pub extra_embeddings: Option<Option<Tensor>>,
}

/// One change to a model that can be applied on top of the patches below it.
pub trait Patch {
    fn layer(&self) -> Layer;
    /// A short description for messages (e.g. the file name).
    fn label(&self) -> String;
    /// Applies the patch; `base` gives the value a weight had before any patch. Returns what
    /// must be restored to undo it, and warnings for the user.
    fn apply(&self, sd: &mut StableDiffusion, base: &BaseValues) -> Result<(Undo, Vec<String>)>;
}

/// The base (unpatched) values of the weights that patches below have changed.
pub struct BaseValues {
    saved: Vec<(String, Tensor)>,
}

impl BaseValues {
    /// The value of weight `name` (see `StableDiffusion::weight_var`) before any patch: the oldest saved value, else the
    /// model's current one (no patch below changed it). The returned tensor is a copy.
    pub fn get(&self, sd: &StableDiffusion, name: &str) -> Result<Tensor> {
        if let Some((_, t)) = self.saved.iter().find(|(n, _)| n == name) {
            return Ok(t.clone());
        }
        let var = sd.weight_var(name).with_context(|| format!("the model has no patchable weight {name}"))?;
        Ok(var.as_tensor().copy()?)
    }

    /// Whether a patch below has changed `name`.
    pub fn is_patched(&self, name: &str) -> bool {
        self.saved.iter().any(|(n, _)| n == name)
    }
}

struct Applied {
    patch: Box<dyn Patch>,
    undo: Undo,
}

/// The patches applied to one model, in layer order.
#[derive(Default)]
pub struct PatchStack {
    applied: Vec<Applied>,
}

impl PatchStack {
    pub fn new() -> Self {
        Self::default()
    }

    /// Labels of the applied patches, bottom first.
    pub fn labels(&self) -> Vec<String> {
        self.applied.iter().map(|a| a.patch.label()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }

    fn base_values(&self) -> BaseValues {
        let mut saved: Vec<(String, Tensor)> = Vec::new();
        for a in &self.applied {
            for (n, t) in &a.undo.weights {
                if !saved.iter().any(|(m, _)| m == n) {
                    saved.push((n.clone(), t.clone()));
                }
            }
        }
        BaseValues { saved }
    }

    /// Applies `patch` at its layer's place: patches of higher layers come off first and go
    /// back on after it. Returns the warnings of every patch applied. On an error the stack
    /// is as it was.
    pub fn push(&mut self, sd: &mut StableDiffusion, patch: Box<dyn Patch>) -> Result<Vec<String>> {
        let at = self.applied.iter().position(|a| a.patch.layer() > patch.layer()).unwrap_or(self.applied.len());
        let above = self.take_from(sd, at)?;
        let base = self.base_values();
        let mut warnings = match patch.apply(sd, &base) {
            Ok((undo, w)) => {
                self.applied.push(Applied { patch, undo });
                w
            }
            Err(e) => {
                self.reapply(sd, above)?;
                return Err(e);
            }
        };
        warnings.extend(self.reapply(sd, above)?);
        Ok(warnings)
    }

    /// Removes the patches of `layer` (all of them), restoring what they replaced.
    pub fn remove_layer(&mut self, sd: &mut StableDiffusion, layer: Layer) -> Result<Vec<String>> {
        let mut kept = self.take_from(sd, 0)?;
        kept.retain(|p| p.layer() != layer);
        self.reapply(sd, kept)
    }

    /// Reverts the patches from position `at` up, returning them bottom first.
    fn take_from(&mut self, sd: &mut StableDiffusion, at: usize) -> Result<Vec<Box<dyn Patch>>> {
        let mut taken = Vec::new();
        while self.applied.len() > at {
            let a = self.applied.pop().expect("non-empty");
            revert(sd, &a.undo)?;
            taken.push(a.patch);
        }
        taken.reverse();
        Ok(taken)
    }

    /// Applies `patches` in order on top of the stack.
    fn reapply(&mut self, sd: &mut StableDiffusion, patches: Vec<Box<dyn Patch>>) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for p in patches {
            let base = self.base_values();
            let (undo, w) = p.apply(sd, &base).with_context(|| format!("re-applying {}", p.label()))?;
            warnings.extend(w);
            self.applied.push(Applied { patch: p, undo });
        }
        Ok(warnings)
    }

    /// Removes every patch: the model is the base again, bit for bit.
    pub fn clear(&mut self, sd: &mut StableDiffusion) -> Result<()> {
        while let Some(a) = self.applied.pop() {
            revert(sd, &a.undo)?;
        }
        Ok(())
    }
}

/// Puts back what one patch replaced.
fn revert(sd: &mut StableDiffusion, undo: &Undo) -> Result<()> {
    for (name, old) in &undo.weights {
        let var = sd.weight_var(name).with_context(|| format!("reverting {name}: the model has no such weight"))?;
        var.set(old)?;
    }
    if let Some(before) = &undo.extra_embeddings {
        sd.text_encoder.set_extra_embeddings(before.clone())?;
    }
    for token in undo.tokens.iter().rev() {
        sd.tokenizer.remove_added_token(token)?;
    }
    Ok(())
}

/// Sets weight `name` (a UNet weight, or `text_encoder.<name>`: see
/// `StableDiffusion::weight_var`) to `value` (converted to the weight's dtype and device),
/// recording its old value in `undo`.
pub(crate) fn set_weight(sd: &StableDiffusion, name: &str, value: &Tensor, undo: &mut Undo) -> Result<()> {
    let Some(var) = sd.weight_var(name) else {
        bail!("the weight {name} cannot be patched (it is not loaded as a patchable weight)");
    };
    if var.dims() != value.dims() {
        bail!("{name} has shape {:?} in the model but {:?} in the patch", var.dims(), value.dims());
    }
    undo.weights.push((name.to_string(), var.as_tensor().copy()?));
    var.set(&value.to_device(var.device())?.to_dtype(var.dtype())?)?;
    Ok(())
}
