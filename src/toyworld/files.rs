//! Scene folders: `00000.png`, `00000.txt`, `00000.mask.png`, ..., and `scenes.jsonl`.

use super::caption::{caption, class_caption, object_phrase, personalization_caption};
use super::render::render_sized;
use super::scene::{personalization_scene_n, random_scene, scene_seed, Object, Scene, WorldSpec};
use crate::util::{save_png, seeded_rng, write_atomic};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One line of `scenes.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SceneRecord {
    pub index: usize,
    /// File names inside the folder.
    pub image: String,
    pub mask: String,
    /// Side of the written images in pixels (object coordinates stay in 64x64 units).
    pub image_size: u32,
    /// The seed [`random_scene`] / [`personalization_scene_n`] was given for this scene.
    pub seed: u64,
    /// What `NNNNN.txt` holds: [`caption`], or [`personalization_caption`] for personalization.
    pub text: String,
    pub caption: String,
    pub class_caption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personalization_caption: Option<String>,
    pub background: super::vocab::NamedColor,
    pub objects: Vec<ObjectRecord>,
}

/// An object of a [`SceneRecord`]; `mask_index` is its value in the index mask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub mask_index: u8,
    pub phrase: String,
    /// Pixels of the written image where the object is visible.
    pub visible_pixels: u32,
    #[serde(flatten)]
    pub object: Object,
}

impl SceneRecord {
    pub fn scene(&self) -> Scene {
        Scene { background: self.background, objects: self.objects.iter().map(|o| o.object.clone()).collect() }
    }
}

/// Options of [`write_scenes`].
#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub n: usize,
    pub seed: u64,
    pub personalization: bool,
    /// Concepts (objects) per personalization scene, 1 to 3 (see [`personalization_scene_n`]).
    pub concepts: usize,
    pub image_size: u32,
    pub spec: WorldSpec,
}

/// Reads `scenes.jsonl` back.
pub fn read_records(dir: &Path) -> Result<Vec<SceneRecord>> {
    let path = dir.join("scenes.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1)))
        .collect()
}

/// Writes `opts.n` scenes into `out` (created if needed), every file atomically; `progress` is
/// called after each scene with the number done. Returns the records written.
pub fn write_scenes(out: &Path, opts: &WriteOptions, mut progress: impl FnMut(usize)) -> Result<Vec<SceneRecord>> {
    if opts.n == 0 {
        bail!("the number of scenes must be at least 1");
    }
    if opts.n > 100_000 {
        bail!("at most 100000 scenes per folder (got {})", opts.n);
    }
    if !(8..=1024).contains(&opts.image_size) {
        bail!("image size must be between 8 and 1024 pixels (got {})", opts.image_size);
    }
    opts.spec.validate()?;
    if out.exists() && !out.is_dir() {
        bail!("output {} exists and is not a folder", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating output folder {}", out.display()))?;
    let mut records = Vec::with_capacity(opts.n);
    let mut jsonl = String::new();
    for i in 0..opts.n {
        let seed = scene_seed(opts.seed, i as u64);
        let scene = if opts.personalization {
            personalization_scene_n(seed, opts.concepts)?
        } else {
            random_scene(&mut seeded_rng(seed), &opts.spec)
        };
        let r = render_sized(&scene, opts.image_size);
        let stem = format!("{i:05}");
        let full = caption(&scene);
        let pers = opts.personalization.then(|| personalization_caption(&scene));
        let text = pers.clone().unwrap_or_else(|| full.clone());
        save_png(&r.image, &out.join(format!("{stem}.png")))?;
        write_atomic(&out.join(format!("{stem}.txt")), format!("{text}\n").as_bytes())?;
        let mut buf = std::io::Cursor::new(Vec::new());
        r.index.write_to(&mut buf, image::ImageFormat::Png)?;
        write_atomic(&out.join(format!("{stem}.mask.png")), &buf.into_inner())?;
        let objects = scene
            .objects
            .iter()
            .zip(&r.masks)
            .enumerate()
            .map(|(k, (o, m))| ObjectRecord {
                mask_index: (k + 1) as u8,
                phrase: object_phrase(o),
                visible_pixels: m.pixels().filter(|p| p[0] > 0).count() as u32,
                object: o.clone(),
            })
            .collect();
        let record = SceneRecord {
            index: i,
            image: format!("{stem}.png"),
            mask: format!("{stem}.mask.png"),
            image_size: opts.image_size,
            seed,
            text,
            caption: full,
            class_caption: class_caption(&scene),
            personalization_caption: pers,
            background: scene.background,
            objects,
        };
        jsonl.push_str(&serde_json::to_string(&record)?);
        jsonl.push('\n');
        records.push(record);
        progress(i + 1);
    }
    write_atomic(&out.join("scenes.jsonl"), jsonl.as_bytes())?;
    Ok(records)
}
