//! The CLIP text encoder against transformers (golden `text.*`), SD1 (quick_gelu) and SD2 (gelu).

mod common;

use candle_core::{DType, Device};
use disendiff::model::clip::{ClipTextConfig, ClipTextModel};
use disendiff::model::sd::{open_component, LoadOptions};
use std::sync::Arc;

fn check(name: &str) {
    let root = common::fixture(&format!("{name}-tiny"));
    let cfg = ClipTextConfig::from_file(&root.join("text_encoder/config.json")).unwrap();
    let store = Arc::new(open_component(&root, "text_encoder", &LoadOptions::default()).unwrap());
    let te = ClipTextModel::new(store.root(), &cfg).unwrap();
    store.finish().unwrap();
    let g = common::load_golden(name);
    let ids = g["text.input_ids"].to_dtype(DType::U32).unwrap();
    let out = te.forward(&ids).unwrap();
    let err = common::rel_err(&out, &g["text.hidden"]);
    println!("{name} text encoder rel err {err:.3e}");
    assert!(err <= 1e-4, "{name}: text encoder rel err {err}");
}

#[test]
fn sd1_text_encoder_matches_transformers() {
    check("sd1");
}

#[test]
fn sd2_text_encoder_matches_transformers() {
    check("sd2");
}

#[test]
fn new_token_rows_extend_the_table() {
    let root = common::fixture("sd1-tiny");
    let cfg = ClipTextConfig::from_file(&root.join("text_encoder/config.json")).unwrap();
    let store = Arc::new(open_component(&root, "text_encoder", &LoadOptions::default()).unwrap());
    let mut te = ClipTextModel::new(store.root(), &cfg).unwrap();
    // A new row that copies "cat" (2368) embeds exactly like "cat".
    let row = te.token_embedding_row(2368).unwrap().unsqueeze(0).unwrap();
    te.set_extra_embeddings(Some(row)).unwrap();
    let ids = |id: u32| candle_core::Tensor::new(&[[49406u32, id, 49407]], &Device::Cpu).unwrap();
    let a = te.forward(&ids(2368)).unwrap();
    let b = te.forward(&ids(49408)).unwrap();
    assert!(common::rel_err(&b, &a) < 1e-7);
    // An id past the table is an error, not a panic.
    assert!(te.forward(&ids(49409)).is_err());
}
