//! A LoRA file as a patch (the stack's lowest layer): its weight changes are added to the
//! current weights (as diffusers' `fuse_lora`), before any concept file applies, and undone
//! exactly when the patch comes off.
//!
//! The file is read (`crate::formats::lora`) against the model's weight names before the model
//! loads, so that exactly the weights it targets are loaded patchable.

use super::{set_weight, BaseValues, Layer, Patch, Undo};
use crate::formats::lora::{self, Component, LoraDelta, TargetNames};
use crate::model::sd::{open_component, ExtraPatchable, LoadOptions, StableDiffusion, TEXT_ENCODER_PREFIX};
use anyhow::{bail, Result};
use candle_core::DType;
use std::path::PathBuf;
use std::str::FromStr;

/// `FILE[:SCALE]`: a LoRA file and its strength (1 when not given).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl FromStr for LoraSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (path, scale) = lora::parse_spec(s)?;
        Ok(Self { path, scale })
    }
}

/// The weight names (and shapes) of a model folder's UNet and text encoder, read from the
/// files' headers.
pub fn target_names(root: &std::path::Path, opts: &LoadOptions) -> Result<TargetNames> {
    let shapes = |component: &str| -> Result<_> {
        let store = open_component(root, component, opts)?;
        Ok(store.tensor_shapes().map(|(n, s)| (n.to_string(), s.to_vec())).collect())
    };
    Ok(TargetNames { unet: shapes("unet")?, text_encoder: shapes("text_encoder")? })
}

pub struct LoraPatch {
    pub spec: LoraSpec,
    pub deltas: Vec<LoraDelta>,
}

/// The patch layer's name of a delta's weight.
fn weight_name(d: &LoraDelta) -> String {
    match d.component {
        Component::Unet => d.name.clone(),
        Component::TextEncoder => format!("{TEXT_ENCODER_PREFIX}{}", d.name),
    }
}

impl LoraPatch {
    /// Reads `spec`'s file against the model's weight names; returns the patch and warnings.
    pub fn read(spec: &LoraSpec, targets: &TargetNames, allow_unmatched: bool) -> Result<(Self, Vec<String>)> {
        let (deltas, warnings) = lora::read(&spec.path, spec.scale, targets, allow_unmatched)?;
        Ok((Self { spec: spec.clone(), deltas }, warnings))
    }

    /// Adds the weights this patch changes to the set to load patchable.
    pub fn add_targets(&self, extra: &mut ExtraPatchable) {
        for d in &self.deltas {
            match d.component {
                Component::Unet => extra.unet.insert(d.name.clone()),
                Component::TextEncoder => extra.text_encoder.insert(d.name.clone()),
            };
        }
    }

    /// How many UNet and text-encoder weights the file changes.
    pub fn counts(&self) -> (usize, usize) {
        let unet = self.deltas.iter().filter(|d| d.component == Component::Unet).count();
        (unet, self.deltas.len() - unet)
    }
}

impl Patch for LoraPatch {
    fn layer(&self) -> Layer {
        Layer::Lora
    }

    fn label(&self) -> String {
        format!("{}:{}", self.spec.path.display(), self.spec.scale)
    }

    fn apply(&self, sd: &mut StableDiffusion, _base: &BaseValues) -> Result<(Undo, Vec<String>)> {
        // Everything is checked before anything changes.
        for d in &self.deltas {
            let name = weight_name(d);
            let Some(var) = sd.weight_var(&name) else {
                bail!(
                    "{}: {name} is not loaded as a patchable weight (load the model with its LoRA files: PatchedModel::load_with_loras)",
                    self.spec.path.display()
                );
            };
            if var.dims() != d.delta.dims() {
                bail!("{}: {name} has shape {:?} in the model but the LoRA changes {:?}", self.spec.path.display(), var.dims(), d.delta.dims());
            }
        }
        let mut undo = Undo::default();
        let result = (|| -> Result<()> {
            for d in &self.deltas {
                let name = weight_name(d);
                let var = sd.weight_var(&name).expect("checked");
                let value = (var.as_tensor().to_dtype(DType::F32)? + d.delta.to_device(var.device())?)?;
                set_weight(sd, &name, &value, &mut undo)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            super::revert(sd, &undo)?;
            return Err(e);
        }
        Ok((undo, Vec::new()))
    }
}
