//! One DisenDiff training step against the PyTorch/diffusers reference
//! (tools/reference/make_train_fixtures.py, contract in tools/reference/TRAIN_FIXTURES.md):
//! losses, processed attention maps, the gradient of every trainable tensor, no gradient for
//! frozen ones, and one AdamW update.

mod common;

use candle_core::{DType, Tensor};
use disendiff::model::sd::LoadOptions;
use disendiff::scheduler::NoiseSchedule;
use disendiff::training::adamw::{AdamW, AdamWConfig};
use disendiff::training::concepts::{concept_positions, modifier_tokens_in, parse_concepts};
use disendiff::training::method::UNetTrainable;
use disendiff::training::model::Personalized;
use disendiff::training::step::{forward_losses, LossConfig, MicroBatch};

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().get(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn one_step_matches_pytorch() {
    let g = common::load_golden("train-step");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("golden/train-step.json")).unwrap()).unwrap();
    let captions: Vec<String> = meta["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();

    let caption = "<new1> cat and <new2> dog";
    let concepts = parse_concepts(caption, &modifier_tokens_in(caption), &["pll".into(), "ktn".into()]).unwrap();
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
    let batch = MicroBatch {
        ids,
        x0: g["x0"].clone(),
        noise: g["noise"].clone(),
        timesteps: g["timesteps"].clone(),
        mask: g["mask"].clone(),
        targets: targets.clone(),
    };
    let cfg = LossConfig::default();
    let losses = forward_losses(&model, &schedule, &batch, &cfg).unwrap();
    for (name, ours) in [("diffusion", &losses.diffusion), ("bind", &losses.l_bind), ("ss", &losses.l_ss), ("total", &losses.total)] {
        let want = scalar(&g[&format!("loss.{name}")]);
        let rel = (scalar(ours) - want).abs() / want.abs();
        println!("loss.{name}: {:.7} vs {want:.7} (rel {rel:.2e})", scalar(ours));
        assert!(rel <= 1e-4, "loss.{name}: rel err {rel}");
    }

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
    let mut grad_list = Vec::new();
    for (name, var) in &trainable {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
        if name == "token_embeddings" {
            for (row, tok) in ["<new1>", "<new2>"].iter().enumerate() {
                let err = common::rel_err(&grad.get(row).unwrap(), &g[&format!("grad.embedding.{tok}")]);
                println!("grad.embedding.{tok}: rel err {err:.2e}");
                assert!(err <= 1e-3, "grad of {tok}: rel err {err}");
            }
        } else {
            let err = common::rel_err(grad, &g[&format!("grad.{name}")]);
            println!("grad.{name}: rel err {err:.2e}");
            assert!(err <= 1e-3, "grad of {name}: rel err {err}");
        }
        grad_list.push(grad.clone());
    }
    for (name, var) in &trainable {
        let g = grads.get(var.as_tensor()).unwrap();
        let norm = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
    // Every frozen weight of the text encoder, UNet and VAE: no gradient computed or stored.
    let mut frozen = 0;
    for (component, store) in &model.sd.weight_stores {
        for (name, t) in store.frozen() {
            assert!(grads.get(&t).is_none(), "frozen {component} weight {name} got a gradient");
            frozen += 1;
        }
    }
    println!("{frozen} frozen tensors checked");
    assert!(frozen > 100, "only {frozen} frozen tensors checked");
    assert!(grads.get(model.sd.text_encoder.token_embedding()).is_none());

    // One AdamW step (lr 1e-3 as the reference): compare the updates.
    let before: Vec<Tensor> = trainable.iter().map(|(_, v)| v.as_tensor().copy().unwrap()).collect();
    let mut opt = AdamW::new(trainable.clone(), AdamWConfig { lr: 1e-3, ..Default::default() }).unwrap();
    opt.step(&grad_list).unwrap();
    for (i, (name, var)) in trainable.iter().enumerate() {
        let ours = (var.as_tensor() - &before[i]).unwrap();
        if name == "token_embeddings" {
            for (row, tok) in ["<new1>", "<new2>"].iter().enumerate() {
                let want = (&g[&format!("updated.embedding.{tok}")] - before[i].get(row).unwrap()).unwrap();
                let err = common::rel_err(&ours.get(row).unwrap(), &want);
                assert!(err <= 1e-3, "update of {tok}: rel err {err}");
            }
        } else {
            let want = (&g[&format!("updated.{name}")] - &before[i]).unwrap();
            let err = common::rel_err(&ours, &want);
            assert!(err <= 1e-3, "update of {name}: rel err {err}");
        }
    }
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
    common::run_with_kernels_off(&["one_step_matches_pytorch", "one_step_matches_pytorch_with_kernels_off"]);
}
