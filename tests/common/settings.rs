//! Readers of the golden settings files (`golden/<name>.json`, written by tools/reference/*.py)
//! into the library's parameter structs, so that every test of a pipeline runs diffusers' call.

use candle_core::Tensor;
use disendiff::model::sd::StableDiffusion;
use disendiff::pipelines::sampling::SamplingParams;
use disendiff::pipelines::text2img::Text2ImageParams;

/// `tests/fixtures/golden/<name>.json`.
pub fn golden_json(name: &str) -> serde_json::Value {
    let path = super::fixture(&format!("golden/{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

fn number(s: &serde_json::Value, key: &str) -> f64 {
    s[key].as_f64().unwrap_or_else(|| panic!("golden settings: no number {key:?} in {s}"))
}

fn count(s: &serde_json::Value, key: &str) -> usize {
    s[key].as_u64().unwrap_or_else(|| panic!("golden settings: no count {key:?} in {s}")) as usize
}

fn text<'a>(s: &'a serde_json::Value, key: &str) -> &'a str {
    s[key].as_str().unwrap_or_else(|| panic!("golden settings: no string {key:?} in {s}"))
}

/// The text-to-image call of `golden/<name>.json` (its `pipe` object: prompt, negative prompt,
/// steps, guidance, eta, height, width), started from `latents` (one image per row).
pub fn text2img_params(sd: &StableDiffusion, name: &str, latents: &Tensor) -> Text2ImageParams {
    let v = golden_json(name);
    let pipe = &v["pipe"];
    let mut p = Text2ImageParams::new(sd, text(pipe, "prompt"));
    p.negative_prompt = pipe["negative_prompt"].as_str().unwrap_or("").to_string();
    p.steps = count(pipe, "steps");
    p.guidance_scale = number(pipe, "guidance_scale");
    p.eta = number(pipe, "eta");
    p.height = count(pipe, "height");
    p.width = count(pipe, "width");
    p.latents = Some(latents.clone());
    p.num_images = latents.dim(0).unwrap();
    p
}

/// The sampling settings of an image-to-image or inpainting golden call (the `img2img` or
/// `inpaint` object of its json: prompt, negative prompt, steps, strength, guidance, eta and
/// images per prompt).
pub fn sampling_params(s: &serde_json::Value) -> SamplingParams {
    let mut p = SamplingParams::new(text(s, "prompt"), number(s, "strength"));
    p.negative_prompt = text(s, "negative_prompt").to_string();
    p.steps = count(s, "steps");
    p.guidance_scale = number(s, "guidance_scale");
    p.eta = number(s, "eta");
    p.num_images = count(s, "num_images_per_prompt");
    p
}
