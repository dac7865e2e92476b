//! `disendiff attention`: heatmaps of each prompt token's cross-attention map (the paper's
//! Fig. 4 view), as one PNG per token, an overview grid and an index.html that labels them.

use super::{ConceptArgs, ModelArgs};
use crate::model::memory::Generation;
use crate::pipelines::attention_maps::{grid, overlay, token_maps};
use crate::pipelines::text2img::{latent_shape, Text2ImageParams};
use crate::util;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub concepts: ConceptArgs,
    /// The prompt whose tokens to show (a training caption or any prompt).
    #[arg(long)]
    pub prompt: String,
    /// Number of DDIM steps the maps are averaged over.
    #[arg(long, default_value_t = 50, visible_alias = "steps", alias = "num_inference_steps")]
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5, alias = "guidance_scale")]
    pub guidance_scale: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = super::DEFAULT_SEED)]
    pub seed: u64,
    /// Query-grid side of the maps (default: latent side / 4, 16 for SD at 512x512).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Output folder.
    #[arg(long, value_name = "DIR", visible_alias = "output-dir", alias = "output_dir")]
    pub out: PathBuf,
}

fn file_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

pub fn run(a: Args) -> Result<()> {
    super::validate::sampling(a.num_inference_steps, a.guidance_scale, None, None)?;
    let model = super::load_model(&a.model, &a.concepts)?;
    let sd = &model.sd;
    super::check_prompt_tokens(sd, &[&a.prompt], a.concepts.strict_tokens)?;
    let mut p = Text2ImageParams::new(sd, &a.prompt);
    p.steps = a.num_inference_steps;
    p.guidance_scale = a.guidance_scale;
    p.seed = a.seed;
    let [_, _, lh, _] = latent_shape(sd, &p)?;
    let g = Generation { height: p.height, width: p.width, guidance: p.guidance_scale > 1.0, encodes_image: false, vae_tiling: false };
    super::memory::check_generation(&a.model, sd, &g, "attention maps at")?;
    let side = a.resolution.unwrap_or(lh / 4);
    let maps = token_maps(sd, &p, side)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let image = util::to_rgb8(&maps.images)?.remove(0);
    util::save_png(&image, &a.out.join("image.png"))?;
    let mut tiles = vec![image.clone()];
    let mut html = format!(
        "<html><body><h3>{}</h3><p>cross-attention at {side}x{side}, mean over {} steps, heads and layers</p>\
         <table><tr><td><img src=\"image.png\" width=256><br>image</td>",
        a.prompt, a.num_inference_steps
    );
    for (i, (pos, label)) in maps.tokens.iter().enumerate() {
        let tile = overlay(&maps.maps.get(*pos)?, &image)?;
        let name = format!("{:02}_{}.png", i + 1, file_safe(label));
        util::save_png(&tile, &a.out.join(&name))?;
        html.push_str(&format!("<td><img src=\"{name}\" width=256><br>{}</td>", label.replace('<', "&lt;").replace('>', "&gt;")));
        tiles.push(tile);
    }
    html.push_str("</tr></table></body></html>\n");
    util::write_atomic(&a.out.join("index.html"), html.as_bytes())?;
    let overview = a.out.join("overview.png");
    util::save_png(&grid(&tiles, tiles.len()), &overview)?;
    println!("{}", overview.display());
    Ok(())
}
