//! Generation pipelines built on the model and the schedulers.

pub mod attention_maps;
pub mod text2img;
