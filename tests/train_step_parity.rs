//! One DisenDiff training step against the PyTorch/diffusers reference
//! (tools/reference/make_train_fixtures.py, contract in tools/reference/TRAIN_FIXTURES.md):
//! losses, processed attention maps, the gradient of every trainable tensor, no gradient for
//! frozen ones, and one AdamW update.

mod common;

use candle_core::{DType, Tensor};
use common::grad_check::{self as check, golden_batch};
use disendiff::model::sd::LoadOptions;
use disendiff::scheduler::NoiseSchedule;
use disendiff::training::adamw::AdamWConfig;
use disendiff::training::concepts::concept_positions;
use disendiff::training::method::UNetTrainable;
use disendiff::training::model::Personalized;
use disendiff::training::step::{forward_losses, LossConfig};

#[test]
fn one_step_matches_pytorch() {
    one_step(false);
}

/// The same step with gradient checkpointing: every check of [`one_step_matches_pytorch`]
/// holds (losses, maps, gradients and update against PyTorch), blocks were in fact recomputed,
/// and the gradients equal the plain step's to rounding.
#[test]
fn one_step_matches_pytorch_with_gradient_checkpointing() {
    let plain = one_step(false);
    let before = disendiff::model::checkpoint::checkpointed_blocks();
    let checkpointed = one_step(true);
    let blocks = disendiff::model::checkpoint::checkpointed_blocks() - before;
    println!("{blocks} blocks checkpointed");
    // sd1-tiny at 16x16 latents, probed at 16x16: the 8x8 and 4x4 transformers (2 down, 1 mid,
    // 3 up) and the resnets whose input is in the graph (every one after the first
    // cross-attention: 1 + 2 + 2 down, 2 mid, 9 up) are checkpointed, once per step
    assert_eq!(blocks, 6 + 16, "checkpointed blocks");
    for (a, b) in plain.iter().zip(&checkpointed) {
        let err = common::rel_err(b, a);
        assert!(err <= 1e-5, "checkpointed gradient differs from the plain one: rel err {err}");
    }
}

/// Runs the checked step and returns the trainable tensors' gradients.
fn one_step(gradient_checkpointing: bool) -> Vec<Tensor> {
    let g = common::load_golden("train-step");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/train-step.json")).unwrap()).unwrap();
    let captions = check::captions(&meta);

    let concepts = check::concepts();
    let model = Personalized::load(&common::fixture("sd1-tiny"), &LoadOptions::default(), &concepts, UNetTrainable::CrossAttnKV)
        .unwrap();
    assert_eq!(model.modifier_ids, vec![49408, 49409]);

    // Our tokenizer and positions agree with the reference's.
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let want_ids = ids.to_vec2::<u32>().unwrap();
    let mut targets = Vec::new();
    for (i, c) in captions.iter().enumerate() {
        assert_eq!(model.sd.tokenizer.encode(c).ids, want_ids[i], "ids of {c:?}");
        let pos = concept_positions(&model.sd.tokenizer, c, &concepts).unwrap();
        if pos.iter().all(|p| p.is_some()) {
            let pos: Vec<_> = pos.into_iter().map(|p| p.unwrap()).collect();
            let key = i.to_string();
            assert_eq!(pos.iter().map(|p| p.modifier as u64).collect::<Vec<_>>(),
                meta["modifier_positions"][&key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>());
            assert_eq!(pos.iter().map(|p| p.class as u64).collect::<Vec<_>>(),
                meta["class_positions"][&key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect::<Vec<_>>());
            targets.push(Some(pos));
        } else {
            targets.push(None);
        }
    }
    assert_eq!(targets.iter().filter(|t| t.is_some()).count(), 2);

    let schedule = NoiseSchedule::new(model.sd.scheduler_config.clone());
    let batch = golden_batch(&g, ids, targets.clone());
    let cfg = LossConfig { gradient_checkpointing, ..Default::default() };
    let losses = forward_losses(&model, &schedule, &batch, &cfg).unwrap();
    check::assert_losses(&g, &losses, 1e-4, "");

    // Processed maps M_1, C_1, M_2, C_2 of each target sample.
    for (k, maps) in losses.maps.iter().enumerate() {
        let pos = targets.iter().flatten().nth(k).unwrap();
        let processed = cfg.calibration.processed_maps(maps, pos).unwrap();
        let flat: Vec<Tensor> = processed.into_iter().flat_map(|(m, c)| [m, c]).collect();
        let ours = Tensor::cat(&flat, 0).unwrap();
        let err = common::rel_err(&ours, &g[&format!("maps.{k}")]);
        println!("maps.{k}: rel err {err:.2e}");
        assert!(err <= 1e-4);
    }

    // Gradients of every trainable tensor; none for frozen ones.
    let grads = losses.total.backward().unwrap();
    let trainable = model.trainable(true);
    assert_eq!(trainable.len(), 22 + 1);
    let grad_list = check::each_gradient(&trainable, &grads, |part, grad| {
        let err = common::rel_err(grad, &g[&format!("grad.{}", part.key)]);
        println!("grad.{}: rel err {err:.2e}", part.key);
        assert!(err <= 1e-3, "grad of {}: rel err {err}", part.label);
    });
    for (name, var) in &trainable {
        let g = grads.get(var.as_tensor()).unwrap();
        let norm = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
    // Every frozen weight of the text encoder, UNet and VAE: no gradient computed or stored.
    check::assert_frozen_without_gradient(&model.sd, &grads, |_, _| true);
    assert!(grads.get(model.sd.text_encoder.token_embedding()).is_none());

    // One AdamW step (lr 1e-3 as the reference): compare the updates.
    let before = check::adamw_step(&trainable, &grad_list, AdamWConfig { lr: 1e-3, ..Default::default() });
    check::each_update(&trainable, &before, |part, ours| {
        let then = match part.row {
            Some(row) => before[part.index].get(row).unwrap(),
            None => before[part.index].clone(),
        };
        let want = (&g[&format!("updated.{}", part.key)] - then).unwrap();
        let err = common::rel_err(ours, &want);
        assert!(err <= 1e-3, "update of {}: rel err {err}", part.label);
    });
    grad_list
}

/// [`one_step_matches_pytorch`] again on the generic candle path: this test re-runs it and
/// itself in a child process with the fused CPU kernels off (same tolerances); in that child
/// (`DISENDIFF_KERNELS=off`) it asserts that the library took the switch.
#[test]
fn one_step_matches_pytorch_with_kernels_off() {
    if common::kernels_switched_off() {
        common::assert_kernel_switch_honoured();
        return;
    }
    common::run_with_kernels_off(&[
        "one_step_matches_pytorch",
        "one_step_matches_pytorch_with_gradient_checkpointing",
        "one_step_matches_pytorch_with_kernels_off",
    ]);
}
