//! The parts of a training-step golden test that the DisenDiff, DreamBooth and device tests
//! (train_step_parity.rs, dreambooth_parity.rs, gpu_parity.rs) share: the two-concept caption,
//! the golden micro-batch, the loss comparison, the walk over every trainable tensor's gradient
//! or AdamW update (the new token rows one by one, as the goldens store them), and the check that
//! no frozen weight got a gradient. What each test asserts on a tensor stays in its closure.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use disendiff::calibration::ConceptPositions;
use disendiff::model::sd::StableDiffusion;
use disendiff::training::adamw::{AdamW, AdamWConfig};
use disendiff::training::concepts::{concept_positions, modifier_tokens_in, parse_concepts, Concept};
use disendiff::training::step::{MicroBatch, StepLosses};
use std::collections::HashMap;

/// The caption of the training goldens; its two concepts start from `pll` and `ktn`.
pub const CAPTION: &str = "<new1> cat and <new2> dog";

/// The new tokens, in the order of the rows of the `token_embeddings` variable.
pub const NEW_TOKENS: [&str; 2] = ["<new1>", "<new2>"];

/// The concepts of [`CAPTION`] (`<new1>` cat from `pll`, `<new2>` dog from `ktn`).
pub fn concepts() -> Vec<Concept> {
    parse_concepts(CAPTION, &modifier_tokens_in(CAPTION), &["pll".into(), "ktn".into()]).unwrap()
}

/// The `captions` list of a golden json.
pub fn captions(meta: &serde_json::Value) -> Vec<String> {
    meta["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect()
}

/// Per caption, the positions of every concept when the caption holds them all, else `None`
/// (an attention-loss target or not).
pub fn targets(sd: &StableDiffusion, captions: &[String], concepts: &[Concept]) -> Vec<Option<Vec<ConceptPositions>>> {
    captions
        .iter()
        .map(|c| {
            let pos = concept_positions(&sd.tokenizer, c, concepts).unwrap();
            if pos.iter().all(|p| p.is_some()) {
                Some(pos.into_iter().flatten().collect())
            } else {
                None
            }
        })
        .collect()
}

/// The first element of a tensor, as f64.
pub fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().get(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The golden micro-batch: `ids` and `targets` with the golden `x0`, `noise`, `timesteps`, `mask`.
pub fn golden_batch(g: &HashMap<String, Tensor>, ids: Tensor, targets: Vec<Option<Vec<ConceptPositions>>>) -> MicroBatch {
    MicroBatch {
        ids,
        x0: g["x0"].clone(),
        noise: g["noise"].clone(),
        timesteps: g["timesteps"].clone(),
        mask: g["mask"].clone(),
        targets,
    }
}

/// Asserts the diffusion, bind, ss and total losses each within `tol` (relative) of the golden
/// `loss.<name>`; `label` starts each printed line and failure message.
pub fn assert_losses(g: &HashMap<String, Tensor>, losses: &StepLosses, tol: f64, label: &str) {
    for (name, ours) in [("diffusion", &losses.diffusion), ("bind", &losses.l_bind), ("ss", &losses.l_ss), ("total", &losses.total)] {
        let want = scalar(&g[&format!("loss.{name}")]);
        let rel = (scalar(ours) - want).abs() / want.abs();
        println!("{label}loss.{name}: {:.7} vs {want:.7} (rel {rel:.2e})", scalar(ours));
        assert!(rel <= tol, "{label}loss.{name}: rel err {rel}");
    }
}

/// One trainable tensor, or one new row of `token_embeddings`, as the goldens name it.
pub struct Part<'a> {
    /// Index of the tensor in the trainable list.
    pub index: usize,
    /// The trainable tensor's name (`token_embeddings` for a row).
    pub name: &'a str,
    /// The row's token (`<new1>`) for a row, else the tensor's name.
    pub label: &'a str,
    /// The golden key after `grad.` / `update.`: `embedding.<new1>` for a row, else the name.
    pub key: String,
    /// The row of `token_embeddings`, for a row.
    pub row: Option<usize>,
}

/// Calls `f` on each part of `t` (the tensor `index` of the trainable list, named `name`): the
/// rows of the new tokens one by one for `token_embeddings`, else the whole tensor.
fn each_part(index: usize, name: &str, t: &Tensor, f: &mut impl FnMut(&Part, &Tensor)) {
    if name == "token_embeddings" {
        for (row, tok) in NEW_TOKENS.iter().enumerate() {
            let part = Part { index, name, label: tok, key: format!("embedding.{tok}"), row: Some(row) };
            f(&part, &t.get(row).unwrap());
        }
    } else {
        f(&Part { index, name, label: name, key: name.to_string(), row: None }, t);
    }
}

/// Walks `trainable` in order: each tensor's gradient in `grads` (the test fails on a tensor with
/// none) goes to `check` part by part (see [`Part`]). Returns the gradients, for AdamW.
pub fn each_gradient(trainable: &[(String, Var)], grads: &GradStore, mut check: impl FnMut(&Part, &Tensor)) -> Vec<Tensor> {
    let mut grad_list = Vec::new();
    for (i, (name, var)) in trainable.iter().enumerate() {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
        each_part(i, name, grad, &mut check);
        grad_list.push(grad.clone());
    }
    grad_list
}

/// One AdamW step of `trainable` on `grad_list` with `config`; returns copies of the tensors
/// from before the step.
pub fn adamw_step(trainable: &[(String, Var)], grad_list: &[Tensor], config: AdamWConfig) -> Vec<Tensor> {
    let before: Vec<Tensor> = trainable.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let mut opt = AdamW::new(trainable.to_vec(), config).unwrap();
    opt.step(grad_list).unwrap();
    before
}

/// Walks `trainable` in order: each tensor's update since `before` (now minus then) goes to
/// `check` part by part (see [`Part`]).
pub fn each_update(trainable: &[(String, Var)], before: &[Tensor], mut check: impl FnMut(&Part, &Tensor)) {
    for (i, (name, var)) in trainable.iter().enumerate() {
        let update = (var.as_tensor() - &before[i]).unwrap();
        each_part(i, name, &update, &mut check);
    }
}

/// Asserts that no frozen weight of any of `sd`'s components got a gradient; `counted(component,
/// name)` (which may assert on the weight) says whether the weight counts; asserts that over 100
/// did and returns their number.
pub fn assert_frozen_without_gradient(sd: &StableDiffusion, grads: &GradStore, mut counted: impl FnMut(&str, &str) -> bool) -> usize {
    let mut frozen = 0;
    for (component, store) in &sd.weight_stores {
        for (name, t) in store.frozen() {
            let counts = counted(component, &name);
            assert!(grads.get(&t).is_none(), "frozen {component} weight {name} got a gradient");
            if counts {
                frozen += 1;
            }
        }
    }
    println!("{frozen} frozen tensors checked");
    assert!(frozen > 100, "only {frozen} frozen tensors checked");
    frozen
}
