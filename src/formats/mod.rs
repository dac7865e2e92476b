//! Files users exchange: disendiff's own concept file and LoRA files (kohya, PEFT) read as
//! weight changes (import/export to diffusers, A1111 and ComfyUI formats comes next).

pub mod concept_file;
pub mod lora;
