//! DisenDiff training: the methods and ablations as presets, concepts and prompts, data
//! augmentation, the loss of one micro-batch, AdamW, and the training loop with checkpoints.

pub mod adamw;
pub mod checkpoint;
pub mod concepts;
pub mod data;
pub mod method;
pub mod model;
pub mod step;
pub mod trainer;
