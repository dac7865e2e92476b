//! Every training method and ablation, each a complete preset of the one trainer: what
//! trains, which gradient masks apply, the losses and their weights, and the defaults of steps,
//! batch, learning rate and initialiser tokens (docs/method.md §2, §5, §7, §8).
//!
//! This is the only list of methods and ablations in the crate: `disendiff train`, `demo`,
//! `toy bench` and the toy experiments all start from [`Method::preset`]. A method variant is
//! written `method[/ablation[+ablation]]`, e.g. `disendiff/no-ss` or `disendiff/no-bind+train-q`
//! ([`Preset::parse`], [`Preset::name`]).
//!
//! | method | trains | losses | lr | batch x accum | steps | initialisers |
//! |---|---|---|---|---|---|---|
//! | DisenDiff | attn2 K/V + modifier rows | diffusion + 0.01 L_bind + 0.01 L_s&s | 8e-5 | 2 x 4 | 250 | `pll`, `ktn` (`ucd</w>` first for 3) |
//! | Custom Diffusion | attn2 K/V + modifier rows | diffusion | 8e-5 | 2 x 4 | 250 | same |
//! | Textual Inversion | modifier rows | diffusion | 5e-4 | 4 x 4 | 5000 | the class words |
//! | DreamBooth | every UNet tensor + modifier rows | diffusion (+ class images, weight 1) | 5e-6 | 2 x 1 | 250 | `pll`, `ktn` |
//!
//! DreamBooth has no gradient mask (no start-token K/V detach; the embedding table's only
//! trainable part is the new rows either way), no attention loss and no scale augmentation
//! (diffusers' `train_dreambooth.py` resizes and centre-crops); its prior preservation is the
//! trainer's class-image path (half of each micro-batch, `--num-class-images`), which weights
//! the class half as the instance half (prior loss weight 1). Its output is a complete
//! diffusers folder `OUT/model/` ([`Preset::writes_model`]). With `--train-text-encoder`
//! ([`Preset::set_train_text_encoder`], DreamBooth only) every text encoder tensor trains too,
//! at the same learning rate (diffusers' `train_dreambooth.py --train_text_encoder`).

use super::step::{GradientMasks, LossConfig};
use crate::calibration::{CalibrationConfig, SeparationKind};
use anyhow::{bail, Result};

/// A training method of the paper's comparison.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// K/V + modifier embeddings with the attention calibration (L_bind + L_s&s).
    Disendiff,
    /// The same trainer without the attention losses (Kumari et al. 2023).
    CustomDiffusion,
    /// Only the modifier embeddings (lr 5e-4, batch 4, 5000 steps by default).
    TextualInversion,
    /// Every UNet weight and the modifier embeddings (lr 5e-6, batch 2, 250 steps by default).
    Dreambooth,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::Disendiff, Method::CustomDiffusion, Method::TextualInversion, Method::Dreambooth];

    /// The name used on the command line, in concept files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Disendiff => "disendiff",
            Self::CustomDiffusion => "custom-diffusion",
            Self::TextualInversion => "textual-inversion",
            Self::Dreambooth => "dreambooth",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
            anyhow::anyhow!("unknown method {name:?} (known: {})", Self::ALL.map(Self::name).join(", "))
        })
    }

    /// The complete preset of this method with `ablations` applied.
    pub fn preset(self, ablations: &[Ablation]) -> Result<Preset> {
        let official = TrainDefaults { max_train_steps: 250, train_batch_size: 2, gradient_accumulation_steps: 4, learning_rate: 8e-5 };
        let (unet_trainable, weights, initializers, defaults) = match self {
            Self::Disendiff => (UNetTrainable::CrossAttnKV, (0.01, 0.01), Initializers::Official, official),
            Self::CustomDiffusion => (UNetTrainable::CrossAttnKV, (0.0, 0.0), Initializers::Official, official),
            Self::TextualInversion => (
                UNetTrainable::Nothing,
                (0.0, 0.0),
                Initializers::ClassWords,
                TrainDefaults { max_train_steps: 5000, train_batch_size: 4, gradient_accumulation_steps: 4, learning_rate: 5e-4 },
            ),
            Self::Dreambooth => (
                UNetTrainable::All,
                (0.0, 0.0),
                Initializers::Official,
                TrainDefaults { max_train_steps: 250, train_batch_size: 2, gradient_accumulation_steps: 1, learning_rate: 5e-6 },
            ),
        };
        let mut loss = LossConfig { bind_weight: weights.0, ss_weight: weights.1, ..Default::default() };
        if self == Self::Dreambooth {
            loss.masks = GradientMasks { modifier_rows_only: false, detach_start_token_kv: false };
        }
        let mut preset = Preset {
            method: self,
            ablations: Vec::new(),
            unet_trainable,
            train_embeddings: true,
            train_text_encoder: false,
            loss,
            initializers,
            defaults,
            augment: self != Self::Dreambooth,
        };
        for &ab in ablations {
            preset.ablate(ab)?;
        }
        Ok(preset)
    }
}

/// The paper's ablations (Fig. 6b, docs/method.md §7).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ablation {
    /// Drop L_bind.
    NoBind,
    /// Drop L_s&s.
    NoSs,
    /// L_separate: plain intersection of the class maps instead of their IoU (Eq. 4).
    SeparateIntersection,
    /// No squaring of the class maps.
    NoSuppression,
    /// Class maps to the 4th power.
    TwiceSuppression,
    /// No Gaussian filter.
    NoGaussian,
    /// Average the maps of every cross-attention layer, resized to the attention resolution.
    AllScales,
    /// Train attn2.to_q as well as to_k/to_v.
    TrainQ,
}

impl Ablation {
    pub const ALL: [Ablation; 8] = [
        Ablation::NoBind,
        Ablation::NoSs,
        Ablation::SeparateIntersection,
        Ablation::NoSuppression,
        Ablation::TwiceSuppression,
        Ablation::NoGaussian,
        Ablation::AllScales,
        Ablation::TrainQ,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoBind => "no-bind",
            Self::NoSs => "no-ss",
            Self::SeparateIntersection => "separate-intersection",
            Self::NoSuppression => "no-suppression",
            Self::TwiceSuppression => "twice-suppression",
            Self::NoGaussian => "no-gaussian",
            Self::AllScales => "all-scales",
            Self::TrainQ => "train-q",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name).ok_or_else(|| {
            anyhow::anyhow!("unknown ablation {name:?} (known: {})", Self::ALL.map(Self::name).join(", "))
        })
    }

    /// Whether the ablation changes the attention losses (so only matters with them on).
    pub fn is_calibration(self) -> bool {
        self != Self::TrainQ
    }
}

/// Which UNet weights train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UNetTrainable {
    /// None (Textual Inversion).
    Nothing,
    /// `attn2.to_k` and `attn2.to_v` of every cross-attention (Custom Diffusion, DisenDiff).
    CrossAttnKV,
    /// Also `attn2.to_q` (the paper's ablation "training Q as well").
    CrossAttnQKV,
    /// Every UNet tensor (DreamBooth).
    All,
}

impl UNetTrainable {
    pub fn matches(self, name: &str) -> bool {
        let kv = name.ends_with("attn2.to_k.weight") || name.ends_with("attn2.to_v.weight");
        match self {
            Self::Nothing => false,
            Self::CrossAttnKV => kv,
            Self::CrossAttnQKV => kv || name.ends_with("attn2.to_q.weight"),
            Self::All => true,
        }
    }
}

/// Where the modifier tokens' embeddings start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initializers {
    /// The official code's rare tokens: `pll`, `ktn` (three concepts: `ucd</w>`, `pll`, `ktn`).
    Official,
    /// Each concept's class word as a prompt tokenizes it, `cat</w>` (Textual Inversion).
    ClassWords,
}

impl Initializers {
    /// The initialiser token of concept `k` (of `n`) whose class word is `class_word`; the
    /// official rule's tokens past three concepts must be given by the user.
    pub fn token(self, k: usize, n: usize, class_word: &str) -> Result<String> {
        match self {
            // A prompt's word ends in `</w>`: "cat" in a prompt is id 2368 `cat</w>`, while the
            // vocabulary entry `cat` (1481) is the piece that starts longer words.
            Self::ClassWords => Ok(format!("{class_word}</w>")),
            Self::Official => Ok(super::concepts::default_initializers(n)?.swap_remove(k)),
        }
    }
}

/// Defaults of a method for a real Stable Diffusion run; every one can be overridden.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainDefaults {
    pub max_train_steps: usize,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// The learning rate as used (already scaled: 8e-5 = 1e-5 x batch 2 x accumulation 4).
    pub learning_rate: f64,
}

/// A method with its ablations, resolved to everything the trainer needs.
#[derive(Clone, Debug)]
pub struct Preset {
    pub method: Method,
    pub ablations: Vec<Ablation>,
    pub unet_trainable: UNetTrainable,
    pub train_embeddings: bool,
    /// Every text encoder tensor trains as well (DreamBooth's `--train-text-encoder`).
    pub train_text_encoder: bool,
    /// Losses, their weights, the calibration switches and the gradient masks.
    /// `attn_resolution` is the caller's to set from the model.
    pub loss: LossConfig,
    pub initializers: Initializers,
    pub defaults: TrainDefaults,
    /// Custom Diffusion's scale/crop augmentation of the target image by default
    /// (`--no-augment` turns it off; DreamBooth has none).
    pub augment: bool,
}

impl Preset {
    /// Parses `method[/ablation[+ablation]]`, e.g. `disendiff/no-ss`.
    pub fn parse(variant: &str) -> Result<Self> {
        let (method, ablations) = match variant.split_once('/') {
            Some((m, abl)) => (m, abl.split('+').map(Ablation::from_name).collect::<Result<Vec<_>>>()?),
            None => (variant, Vec::new()),
        };
        Method::from_name(method)?.preset(&ablations)
    }

    /// `method[/ablation[+ablation]]`, the inverse of [`Preset::parse`].
    pub fn name(&self) -> String {
        let mut s = self.method.name().to_string();
        if !self.ablations.is_empty() {
            s.push('/');
            s.push_str(&self.ablations.iter().map(|a| a.name()).collect::<Vec<_>>().join("+"));
        }
        s
    }

    /// Whether the run's result is a complete fine-tuned model (`OUT/model/`, a diffusers
    /// folder) rather than a concept file over the base: the method trains every UNet tensor.
    pub fn writes_model(&self) -> bool {
        self.unet_trainable == UNetTrainable::All
    }

    /// Whether the attention calibration is part of the loss.
    pub fn uses_attention(&self) -> bool {
        self.loss.bind_weight != 0.0 || self.loss.ss_weight != 0.0
    }

    fn ablate(&mut self, ab: Ablation) -> Result<()> {
        if ab.is_calibration() && self.method != Method::Disendiff {
            bail!(
                "ablation {} changes the attention losses, which only the disendiff method uses (not {})",
                ab.name(),
                self.method.name()
            );
        }
        if self.ablations.contains(&ab) {
            bail!("ablation {} given twice", ab.name());
        }
        let cal: &mut CalibrationConfig = &mut self.loss.calibration;
        match ab {
            Ablation::NoBind => cal.bind = false,
            Ablation::NoSs => cal.separate = false,
            Ablation::SeparateIntersection => cal.separation = SeparationKind::Intersection,
            Ablation::NoSuppression => cal.suppression_power = 1,
            Ablation::TwiceSuppression => cal.suppression_power = 4,
            Ablation::NoGaussian => cal.gaussian = false,
            Ablation::AllScales => self.loss.all_scales = true,
            Ablation::TrainQ => {
                match self.unet_trainable {
                    UNetTrainable::Nothing => bail!("ablation train-q needs a method that trains the UNet (not {})", self.method.name()),
                    UNetTrainable::All => bail!("ablation train-q: {} already trains every UNet weight", self.method.name()),
                    _ => {}
                }
                self.unet_trainable = UNetTrainable::CrossAttnQKV;
            }
        }
        self.ablations.push(ab);
        Ok(())
    }

    /// Trains the whole text encoder too (`--train-text-encoder`): DreamBooth only.
    pub fn set_train_text_encoder(&mut self, on: bool) -> Result<()> {
        if on && self.method != Method::Dreambooth {
            bail!("--train-text-encoder fine-tunes the text encoder with DreamBooth only (use --method dreambooth, not {})", self.method.name());
        }
        self.train_text_encoder = on;
        Ok(())
    }

    /// Recomputes the UNet blocks' activations in the backward pass (`--gradient-checkpointing`).
    /// The checkpointed blocks must be frozen, so methods that train weights inside them
    /// (DreamBooth's whole UNet, the train-q ablation's queries) are refused.
    pub fn set_gradient_checkpointing(&mut self, on: bool) -> Result<()> {
        if on && !matches!(self.unet_trainable, UNetTrainable::Nothing | UNetTrainable::CrossAttnKV) {
            bail!(
                "--gradient-checkpointing recomputes frozen UNet blocks; {} trains weights inside them \
                 (it works with disendiff, custom-diffusion and textual-inversion)",
                self.name()
            );
        }
        self.loss.gradient_checkpointing = on;
        Ok(())
    }

    /// Overrides the attention weights: `attn` sets both (`--attn-weight`), then `bind` and
    /// `ss` each set one (`--bind-weight`, `--ss-weight`).
    pub fn set_loss_weights(&mut self, attn: Option<f64>, bind: Option<f64>, ss: Option<f64>) -> Result<()> {
        for (flag, value) in [("--attn-weight", attn), ("--bind-weight", bind), ("--ss-weight", ss)] {
            let Some(w) = value else { continue };
            if !w.is_finite() || w < 0.0 {
                bail!("{flag} must be a finite number >= 0, got {w}");
            }
            if self.method != Method::Disendiff && w != 0.0 {
                bail!("{flag}: {} has no attention losses to weight (use --method disendiff)", self.method.name());
            }
        }
        if let Some(w) = attn {
            self.loss.bind_weight = w;
            self.loss.ss_weight = w;
        }
        if let Some(w) = bind {
            self.loss.bind_weight = w;
        }
        if let Some(w) = ss {
            self.loss.ss_weight = w;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_presets_are_complete() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()).unwrap(), m);
        }
        for a in Ablation::ALL {
            assert_eq!(Ablation::from_name(a.name()).unwrap(), a);
            let p = Preset::parse(&format!("disendiff/{}", a.name())).unwrap();
            assert_eq!(p.name(), format!("disendiff/{}", a.name()));
        }
        let d = Method::Disendiff.preset(&[]).unwrap();
        assert_eq!((d.loss.bind_weight, d.loss.ss_weight), (0.01, 0.01));
        assert_eq!(d.loss.masks, GradientMasks { modifier_rows_only: true, detach_start_token_kv: true });
        assert_eq!(d.defaults.learning_rate, 8e-5);
        let cd = Method::CustomDiffusion.preset(&[]).unwrap();
        assert!(!cd.uses_attention() && cd.unet_trainable == UNetTrainable::CrossAttnKV);
        let ti = Method::TextualInversion.preset(&[]).unwrap();
        assert_eq!(ti.unet_trainable, UNetTrainable::Nothing);
        assert_eq!((ti.defaults.max_train_steps, ti.defaults.train_batch_size), (5000, 4));
        assert_eq!(ti.initializers, Initializers::ClassWords);
        let db = Method::Dreambooth.preset(&[]).unwrap();
        assert!(!db.uses_attention() && db.writes_model() && !db.augment);
        assert!(db.unet_trainable.matches("conv_in.weight") && db.unet_trainable.matches("up_blocks.1.attentions.0.norm.bias"));
        assert_eq!(db.loss.masks, GradientMasks { modifier_rows_only: false, detach_start_token_kv: false });
        assert_eq!(db.defaults, TrainDefaults { max_train_steps: 250, train_batch_size: 2, gradient_accumulation_steps: 1, learning_rate: 5e-6 });
        assert_eq!(db.initializers, Initializers::Official);
        assert!(!db.train_text_encoder && !d.train_text_encoder);
        let mut db_te = db.clone();
        db_te.set_train_text_encoder(true).unwrap();
        assert!(db_te.train_text_encoder);
        for m in [Method::Disendiff, Method::CustomDiffusion, Method::TextualInversion] {
            let mut p = m.preset(&[]).unwrap();
            let err = p.set_train_text_encoder(true).unwrap_err().to_string();
            assert!(err.contains("--method dreambooth") && !p.train_text_encoder, "{err}");
            p.set_train_text_encoder(false).unwrap();
        }
        assert!(!d.writes_model() && !cd.writes_model() && !ti.writes_model() && d.augment);

        let p = Preset::parse("disendiff/no-ss+train-q").unwrap();
        assert!(!p.loss.calibration.separate && p.unet_trainable == UNetTrainable::CrossAttnQKV);
        assert_eq!(p.name(), "disendiff/no-ss+train-q");
    }

    /// Checkpointing is taken by the methods whose trained weights lie outside the blocks and
    /// refused, with the reason, by those that train weights inside them.
    #[test]
    fn gradient_checkpointing_only_for_frozen_blocks() {
        for name in ["disendiff", "custom-diffusion", "textual-inversion", "disendiff/no-ss"] {
            let mut p = Preset::parse(name).unwrap();
            p.set_gradient_checkpointing(true).unwrap();
            assert!(p.loss.gradient_checkpointing, "{name}");
        }
        for name in ["dreambooth", "disendiff/train-q"] {
            let mut p = Preset::parse(name).unwrap();
            let err = p.set_gradient_checkpointing(true).unwrap_err().to_string();
            assert!(err.contains("--gradient-checkpointing") && err.contains(name) && !p.loss.gradient_checkpointing, "{err}");
            p.set_gradient_checkpointing(false).unwrap();
        }
    }

    #[test]
    fn rejects_ablations_that_do_not_apply() {
        assert!(Preset::parse("custom-diffusion/no-ss").is_err());
        assert!(Preset::parse("textual-inversion/train-q").is_err());
        assert!(Preset::parse("disendiff/no-such").is_err());
        // DreamBooth is a method with no ablation of its own: it trains every UNet weight
        // already and has no attention losses.
        assert_eq!(Preset::parse("dreambooth").unwrap().method, Method::Dreambooth);
        assert!(Preset::parse("dreambooth/train-q").is_err());
        assert!(Preset::parse("dreambooth/no-ss").is_err());
        assert!(Preset::parse("dream-booth").is_err());
        assert!(Preset::parse("disendiff/no-ss+no-ss").is_err());
        assert!(Preset::parse("custom-diffusion/train-q").is_ok());
        let mut cd = Method::CustomDiffusion.preset(&[]).unwrap();
        assert!(cd.set_loss_weights(Some(0.01), None, None).is_err());
        let mut d = Method::Disendiff.preset(&[]).unwrap();
        assert!(d.set_loss_weights(None, Some(f64::NAN), None).is_err());
        d.set_loss_weights(Some(0.02), None, Some(0.001)).unwrap();
        assert_eq!((d.loss.bind_weight, d.loss.ss_weight), (0.02, 0.001));
    }
}
