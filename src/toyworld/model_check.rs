//! Does a toy base model follow prompts and localise words? (The premise of the method.)
//!
//! - Single-object prompts "a {colour} {pattern} {class} on a {bg} background" (the training
//!   set covers nearly all of them; the unseen count is reported): the largest object the
//!   oracle finds must have the class and the colour.
//! - Two-object prompts that are not training captions: both objects present (class and
//!   colour each).
//! - Attention: on unseen rendered scenes, noised at t = 300, the class token's cross-attention
//!   map (mean over heads and the layers of one resolution, min-max normalised) against the
//!   object's true mask (down-sampled), soft IoU, as toyworld-notes.md measured it; a uniform
//!   map is the baseline. On the two-object scenes, each class map is also compared with the
//!   other object's mask: whether a class word looks at its own object rather than the other.
//!   Every cross-attention resolution is measured (`per_resolution`); the top-level keys are
//!   those of the resolution the trainer reads by default
//!   ([`crate::model::unet::UNetConfig::calibration_resolution`]: 8x8 on the toy model, the
//!   analogue of SD's 16x16 at 512 px).

use super::oracle::analyze;
use super::{caption, random_scene, render, scene_seed, Appearance, Class, NamedColor, Object, Pattern, Scene, WorldSpec};
use crate::calibration::{average_maps, min_max_normalize, soft_iou};
use crate::model::sd::StableDiffusion;
use crate::model::unet::{AttentionProbe, ForwardOptions};
use crate::pipelines::text2img::{self, Text2ImageParams};
use crate::scheduler::NoiseSchedule;
use crate::util;
use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::seq::IndexedRandom;
use serde::Serialize;
use std::collections::HashSet;

#[derive(Clone, Debug, Default, Serialize)]
pub struct ModelCheck {
    pub single_prompts: usize,
    /// How many of the single-object prompts are not training captions.
    pub single_unseen: usize,
    /// Share of single-object images whose largest object has the prompted class and colour.
    pub single_class_and_color: f64,
    pub single_class: f64,
    pub single_color: f64,
    pub double_prompts: usize,
    /// Share of two-object images showing both prompted objects.
    pub double_both: f64,
    pub attention_scenes: usize,
    /// Mean soft IoU of class-token maps with the true masks, and of a uniform map.
    pub attention_iou: f64,
    pub attention_iou_uniform: f64,
    /// The two-object scenes among them: mean soft IoU of each class-token map with its own
    /// object's mask and with the other object's (DisenDiff's premise, the paper's Fig. 3:
    /// own clearly above other).
    pub two_object_scenes: usize,
    pub two_object_iou_own: f64,
    pub two_object_iou_other: f64,
    /// The same on personalization scenes (two objects of unnamed looks), captioned by class
    /// alone ("a star and a heart on a gray background").
    pub personalization_scenes: usize,
    pub personalization_iou_own: f64,
    pub personalization_iou_other: f64,
    /// The query-grid side the attention keys above are for (the trainer's default).
    pub attention_resolution: usize,
    /// The attention measures at every cross-attention resolution, finest first.
    pub per_resolution: Vec<ResolutionCheck>,
}

/// The attention measures of [`ModelCheck`] at one query-grid side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResolutionCheck {
    pub side: usize,
    pub attention_iou: f64,
    pub attention_iou_uniform: f64,
    pub two_object_iou_own: f64,
    pub two_object_iou_other: f64,
    pub personalization_iou_own: f64,
    pub personalization_iou_other: f64,
}

/// Running sums of one resolution's IoUs.
#[derive(Default)]
struct Sums {
    iou: f64,
    uniform: f64,
    count: usize,
    two_own: f64,
    two_other: f64,
    two_count: usize,
    pers_own: f64,
    pers_other: f64,
    pers_count: usize,
}

impl Sums {
    fn result(&self, side: usize) -> ResolutionCheck {
        let d = |n: usize| n.max(1) as f64;
        ResolutionCheck {
            side,
            attention_iou: self.iou / d(self.count),
            attention_iou_uniform: self.uniform / d(self.count),
            two_object_iou_own: self.two_own / d(self.two_count),
            two_object_iou_other: self.two_other / d(self.two_count),
            personalization_iou_own: self.pers_own / d(self.pers_count),
            personalization_iou_other: self.pers_other / d(self.pers_count),
        }
    }
}

/// One training set of a toy base model: the scenes `toy scenes --seed S --n N --unnamed-share F
/// --min-objects A --max-objects B` wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingSet {
    pub seed: u64,
    pub unnamed_share: f32,
    pub min_objects: usize,
    pub max_objects: usize,
}

impl std::str::FromStr for TrainingSet {
    type Err = String;

    /// `SEED:SHARE` or `SEED:SHARE:MIN-MAX`, e.g. `1:0.25` or `4:0.3:2-2`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("training set {s:?}: expected SEED:UNNAMED_SHARE or SEED:UNNAMED_SHARE:MIN-MAX (e.g. 1:0.25, 4:0.3:2-2)");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(bad());
        }
        let seed = parts[0].trim().parse().map_err(|_| bad())?;
        let unnamed_share = parts[1].trim().parse().map_err(|_| bad())?;
        let (min_objects, max_objects) = match parts.get(2) {
            None => (WorldSpec::default().min_objects, WorldSpec::default().max_objects),
            Some(r) => {
                let (a, b) = r.split_once('-').ok_or_else(bad)?;
                (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?)
            }
        };
        Ok(TrainingSet { seed, unnamed_share, min_objects, max_objects })
    }
}

/// The captions of the training sets (`n` scenes each), to keep test prompts unseen.
pub fn training_captions(sets: &[TrainingSet], n: usize) -> anyhow::Result<HashSet<String>> {
    let mut seen = HashSet::new();
    for set in sets {
        let spec = WorldSpec { unnamed_share: set.unnamed_share, min_objects: set.min_objects, max_objects: set.max_objects, ..WorldSpec::default() };
        spec.validate()?;
        seen.extend((0..n as u64).map(|i| caption(&random_scene(&mut util::seeded_rng(scene_seed(set.seed, i)), &spec))));
    }
    Ok(seen)
}

fn object(class: Class, color: NamedColor, pattern: Pattern) -> Object {
    Object { class, appearance: Appearance::named(color, pattern), cx: 32.0, cy: 32.0, size: 16.0, rotation: 0.0 }
}

/// One- or two-object scenes (only their captions matter for prompts), unseen in training when
/// `seen` is given.
fn test_scenes(seen: Option<&HashSet<String>>, n: usize, objects: usize, seed: u64) -> Vec<Scene> {
    let mut rng = util::seeded_rng(seed);
    let mut out = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < 100_000 {
        tries += 1;
        let bg = *NamedColor::BACKGROUND.choose(&mut rng).unwrap();
        let mut objs = Vec::new();
        for _ in 0..objects {
            let class = *Class::ALL.choose(&mut rng).unwrap();
            let color = *NamedColor::OBJECT.choose(&mut rng).unwrap();
            let pattern = *Pattern::ALL.choose(&mut rng).unwrap();
            objs.push(object(class, color, pattern));
        }
        let distinct = objs.windows(2).all(|w| w[0].class != w[1].class);
        if !distinct || !objs.iter().all(|o| o.appearance.contrasts_with(bg)) {
            continue;
        }
        let scene = Scene { background: bg, objects: objs };
        if seen.is_none_or(|s| !s.contains(&caption(&scene))) {
            out.push(scene);
        }
    }
    out
}

fn named(o: &Object) -> (NamedColor, Class) {
    match &o.appearance {
        Appearance::Named { color, .. } => (*color, o.class),
        Appearance::Unnamed(_) => unreachable!("test scenes are named"),
    }
}

/// Runs the check with `n` prompts of each kind and `n` attention scenes.
pub fn check(sd: &StableDiffusion, seen: &HashSet<String>, n: usize, steps: usize, guidance: f64, seed: u64) -> Result<ModelCheck> {
    let mut r = ModelCheck::default();
    let (mut both, mut class_ok, mut color_ok) = (0, 0, 0);
    // The training set covers nearly every one-object caption, so single-object prompts are
    // drawn from all captions; how many of them were unseen is reported.
    let singles = test_scenes(None, n, 1, seed);
    r.single_unseen = singles.iter().filter(|s| !seen.contains(&caption(s))).count();
    for (i, s) in singles.iter().enumerate() {
        let mut p = Text2ImageParams::new(sd, &caption(s));
        p.steps = steps;
        p.guidance_scale = guidance;
        p.seed = seed + i as u64;
        let img = util::to_rgb8(&text2img::generate(sd, &p, |_, _| {})?)?.remove(0);
        let a = analyze(&img);
        let (color, class) = named(&s.objects[0]);
        if let Some(o) = a.objects.iter().max_by_key(|o| o.area) {
            class_ok += (o.class == class) as usize;
            color_ok += (o.color == color) as usize;
            both += (o.class == class && o.color == color) as usize;
        }
    }
    r.single_prompts = singles.len();
    let m = singles.len().max(1) as f64;
    (r.single_class_and_color, r.single_class, r.single_color) = (both as f64 / m, class_ok as f64 / m, color_ok as f64 / m);

    let doubles = test_scenes(Some(seen), n, 2, seed + 1);
    let mut ok = 0;
    for (i, s) in doubles.iter().enumerate() {
        let mut p = Text2ImageParams::new(sd, &caption(s));
        p.steps = steps;
        p.guidance_scale = guidance;
        p.seed = seed + 10_000 + i as u64;
        let img = util::to_rgb8(&text2img::generate(sd, &p, |_, _| {})?)?.remove(0);
        let a = analyze(&img);
        let found = s.objects.iter().all(|o| {
            let (color, class) = named(o);
            a.objects.iter().any(|d| d.class == class && d.color == color)
        });
        ok += found as usize;
    }
    r.double_prompts = doubles.len();
    r.double_both = ok as f64 / doubles.len().max(1) as f64;

    // Attention of class tokens on unseen rendered scenes, at every resolution.
    let schedule = NoiseSchedule::new(sd.scheduler_config.clone());
    let spec = WorldSpec { min_objects: 1, max_objects: 2, ..WorldSpec::default() };
    let mut sums: std::collections::BTreeMap<usize, Sums> = Default::default();
    let mut rng = util::seeded_rng(seed + 2);
    let mut k = 0u64;
    while r.attention_scenes < n && k < 100 * n as u64 {
        let scene = random_scene(&mut util::seeded_rng(scene_seed(seed ^ 0xa77e, k)), &spec);
        k += 1;
        let text = caption(&scene);
        if seen.contains(&text) {
            continue;
        }
        r.attention_scenes += 1;
        let per_side = class_map_ious(sd, &schedule, &scene, &text, &mut rng)?;
        let two = scene.objects.len() == 2 && per_side.first().is_some_and(|(_, i)| i.len() == 2);
        r.two_object_scenes += two as usize;
        for (side, ious) in per_side {
            let s = sums.entry(side).or_default();
            for (own, other, uniform) in ious {
                (s.iou, s.uniform, s.count) = (s.iou + own, s.uniform + uniform, s.count + 1);
                if two {
                    (s.two_own, s.two_other, s.two_count) = (s.two_own + own, s.two_other + other, s.two_count + 1);
                }
            }
        }
    }
    // the same on personalization scenes (unnamed looks), captioned by class alone
    for k in 1..=n as u64 {
        let scene = super::personalization_scene(k);
        let classes: Vec<String> = scene.objects.iter().map(|o| format!("a {}", o.class)).collect();
        let text = format!("{} on a {} background", classes.join(" and "), scene.background);
        for (side, ious) in class_map_ious(sd, &schedule, &scene, &text, &mut rng)? {
            let s = sums.entry(side).or_default();
            for (own, other, _) in ious {
                (s.pers_own, s.pers_other, s.pers_count) = (s.pers_own + own, s.pers_other + other, s.pers_count + 1);
            }
        }
    }
    r.personalization_scenes = n;
    r.per_resolution = sums.iter().rev().map(|(&side, s)| s.result(side)).collect();
    let latent = sd.default_size() / sd.vae_scale_factor();
    r.attention_resolution = sd.unet_config.calibration_resolution(latent).unwrap_or(latent);
    let main = r.per_resolution.iter().find(|c| c.side == r.attention_resolution).cloned().unwrap_or_default();
    r.attention_iou = main.attention_iou;
    r.attention_iou_uniform = main.attention_iou_uniform;
    r.two_object_iou_own = main.two_object_iou_own;
    r.two_object_iou_other = main.two_object_iou_other;
    r.personalization_iou_own = main.personalization_iou_own;
    r.personalization_iou_other = main.personalization_iou_other;
    Ok(r)
}

/// Per cross-attention resolution (finest first), for each object of `scene` whose class word
/// is in `text` (in scene order): soft IoU of the class token's min-max normalised
/// cross-attention map (mean over heads and that resolution's layers, the scene noised at
/// t = 300) with the object's mask, with the other object's mask (0 for a lone object), and of
/// a uniform map with the object's mask.
#[allow(clippy::type_complexity)]
fn class_map_ious(
    sd: &StableDiffusion, schedule: &NoiseSchedule, scene: &Scene, text: &str, rng: &mut rand::rngs::StdRng,
) -> Result<Vec<(usize, Vec<(f64, f64, f64)>)>> {
    let rendered = render(scene);
    let x = util::rgb_to_tensor(&rendered.image, &sd.device)?;
    let post = sd.vae.encode(&x.to_dtype(sd.dtype)?)?;
    let x0 = ((post.mean.to_dtype(DType::F32)? - sd.vae.shift_factor())? * sd.vae.scaling_factor())?;
    let noise = util::randn(rng, x0.dims(), &sd.device)?;
    let t = Tensor::new(&[300u32], &sd.device)?;
    let noisy = schedule.add_noise(&x0, &noise, &t)?;
    let words = sd.tokenizer.tokenize_words(text);
    let ids = Tensor::new(sd.tokenizer.encode(text).ids, &sd.device)?.unsqueeze(0)?;
    let ctx = sd.text_encoder.forward(&ids)?;
    // every cross-attention layer (an empty resolution list captures them all)
    let opts = ForwardOptions { probe: Some(AttentionProbe { resolutions: vec![] }), ..Default::default() };
    let out = sd.unet.forward_with(&noisy.to_dtype(sd.dtype)?, &t, &ctx, &opts)?;
    let mut sides: Vec<usize> = out.attention.iter().map(|a| a.height.max(a.width)).collect();
    sides.sort_unstable_by(|a, b| b.cmp(a));
    sides.dedup();
    // Token position of each object's class word: the word list is "a ... class and a ... class on ...".
    let mut pos = 1;
    let mut class_pos = Vec::new();
    for (w, ids) in &words {
        if Class::from_word(w).is_some() {
            class_pos.push(pos + ids.len() - 1);
        }
        pos += ids.len();
    }
    let mut per_side = Vec::new();
    for side in sides {
        let layers: Vec<_> =
            out.attention.iter().filter(|a| a.height.max(a.width) == side).map(|a| (a.probs.clone(), a.height, a.width)).collect();
        let maps = average_maps(&layers, side)?.remove(0);
        let masks: Vec<Tensor> = rendered
            .masks
            .iter()
            .map(|m| {
                let m = image::imageops::resize(m, side as u32, side as u32, image::imageops::FilterType::Triangle);
                Tensor::from_vec(m.as_raw().iter().map(|&v| v as f32 / 255.0).collect::<Vec<_>>(), (1, side, side), &sd.device)
            })
            .collect::<candle_core::Result<_>>()?;
        let uniform = Tensor::ones((1, side, side), DType::F32, &sd.device)?;
        let mut ious = Vec::new();
        for (obj_i, &p) in class_pos.iter().enumerate().take(scene.objects.len()) {
            let map = min_max_normalize(&maps.narrow(0, p, 1)?)?;
            let own = soft_iou(&map, &masks[obj_i])?.to_scalar::<f32>()? as f64;
            let other = if masks.len() == 2 { soft_iou(&map, &masks[1 - obj_i])?.to_scalar::<f32>()? as f64 } else { 0.0 };
            let u = soft_iou(&uniform, &masks[obj_i])?.to_scalar::<f32>()? as f64;
            ious.push((own, other, u));
        }
        per_side.push((side, ious));
    }
    Ok(per_side)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_sets_parse_and_name_their_scenes() {
        let two: TrainingSet = "4:0.3:2-2".parse().unwrap();
        assert_eq!(two, TrainingSet { seed: 4, unnamed_share: 0.3, min_objects: 2, max_objects: 2 });
        let d = WorldSpec::default();
        let any: TrainingSet = "1:0.25".parse().unwrap();
        assert_eq!((any.min_objects, any.max_objects), (d.min_objects, d.max_objects));
        for bad in ["1", "x:0.2", "1:0.2:3", "1:0.2:2-x", "1:0.2:1-2:5"] {
            assert!(bad.parse::<TrainingSet>().is_err(), "{bad}");
        }
        // Every caption of a two-object set names two objects (as `toy scenes` writes them).
        let seen = training_captions(&[two], 50).unwrap();
        assert!(!seen.is_empty() && seen.iter().all(|c| c.matches(" and ").count() == 1), "{seen:?}");
        let bad_range: TrainingSet = "1:0:3-1".parse().unwrap();
        assert!(training_captions(&[bad_range], 5).is_err());
    }
}
