//! Files users exchange: disendiff's own concept file and LoRA files (kohya, PEFT) read as
//! weight changes, single-file (CompVis) base checkpoints and the safe pickle reader for their
//! `.ckpt` form (import/export to diffusers, A1111 and ComfyUI formats comes next).

pub mod concept_file;
pub mod lora;
pub mod pickle;
pub mod single_file;
