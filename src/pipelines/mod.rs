//! Generation pipelines built on the model and the schedulers.

pub mod text2img;
