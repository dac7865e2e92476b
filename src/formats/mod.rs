//! Files users exchange: disendiff's own concept file (import/export to diffusers, A1111 and
//! ComfyUI formats comes next).

pub mod concept_file;
