//! One DreamBooth training step (`--method dreambooth`: every UNet tensor and the two new token
//! rows train, no gradient mask, no attention loss) against the PyTorch/diffusers reference
//! (tools/reference/make_dreambooth_fixtures.py, contract in tools/reference/TRAIN_FIXTURES.md):
//! the loss, the gradient of every UNet tensor (by its sum, its sum of squares and 8 projections
//! onto pseudo-random vectors regenerated here bit for bit), the new rows' gradients, no
//! gradient for any frozen tensor, and one AdamW update. A second case trains the whole text
//! encoder as well (`--train-text-encoder`, golden `dreambooth-te-step`): every text encoder
//! tensor's gradient and update too, the VAE the only frozen part.

mod common;

use candle_core::{DType, Tensor};
use common::grad_check::{self as check, golden_batch};
use disendiff::model::sd::LoadOptions;
use disendiff::scheduler::NoiseSchedule;
use disendiff::training::adamw::AdamWConfig;
use disendiff::training::method::Method;
use disendiff::training::model::Personalized;
use disendiff::training::step::forward_losses;

const K: usize = 8;
const GOLDEN: u64 = 0x9E3779B97F4A7C15;

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF29CE484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001B3))
}

/// The reference's `probe_vector`: element i of projection k for the tensor `name`.
fn probe(h: u64, k: usize, i: usize) -> f64 {
    let mut z = h.wrapping_add((((k as u64) << 32) + i as u64).wrapping_mul(GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^= z >> 31;
    (z >> 40) as f64 / (1u64 << 23) as f64 - 1.0
}

/// `[sum, sum of squares, p_1..p_K]` of a tensor, in f64.
fn summary(name: &str, t: &Tensor) -> Vec<f64> {
    let x: Vec<f32> = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let h = fnv1a64(name);
    let mut out = vec![x.iter().map(|&v| v as f64).sum(), x.iter().map(|&v| (v as f64) * (v as f64)).sum()];
    for k in 0..K {
        out.push(x.iter().enumerate().map(|(i, &v)| v as f64 * probe(h, k, i)).sum());
    }
    out
}

/// Relative errors of a summary against the reference's: (norm, projections, sum scaled by
/// `sqrt(n) * norm`, the bound a relative error of the whole tensor puts on it).
fn summary_errors(ours: &[f64], want: &[f32], n: usize) -> (f64, f64, f64) {
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let norm = want[1].sqrt();
    let e_norm = (ours[1].sqrt() - norm).abs() / norm;
    let num: f64 = (0..K).map(|k| (ours[2 + k] - want[2 + k]).powi(2)).sum::<f64>().sqrt();
    let den: f64 = (0..K).map(|k| want[2 + k].powi(2)).sum::<f64>().sqrt();
    let e_sum = (ours[0] - want[0]).abs() / ((n as f64).sqrt() * norm);
    (e_norm, num / den, e_sum)
}

#[test]
fn probe_vectors_are_the_references() {
    assert_eq!(fnv1a64(""), 0xCBF29CE484222325);
    assert_eq!(fnv1a64("a"), 0xAF63DC4C8601EC8C);
    // A projection detects a wrong tensor: zero, sign flip, one changed element.
    let t = Tensor::arange(0f32, 64., &candle_core::Device::Cpu).unwrap();
    let s = summary("x", &t);
    let want: Vec<f32> = s.iter().map(|&v| v as f32).collect();
    assert!(summary_errors(&s, &want, 64).1 < 1e-6);
    let mut v: Vec<f32> = t.to_vec1().unwrap();
    v[40] += 10.0;
    let changed = summary("x", &Tensor::new(v, &candle_core::Device::Cpu).unwrap());
    assert!(summary_errors(&changed, &want, 64).1 > 1e-3);
    assert!(summary_errors(&summary("x", &t.neg().unwrap()), &want, 64).1 > 1.0);
}

/// A text encoder key bias's gradient is exactly zero, whatever the weights: softmax is invariant
/// to adding a constant to all the logits of one query, and the key bias `b_k` adds the same
/// `q . b_k` to every logit of query `q` (CLIP's causal mask only removes logits, it does not
/// change which constant is added). So `self_attn.k_proj.bias` of text encoder layer `L` is
/// compared as zero, by name; every other tensor by its relative error. Returns
/// `encoder.layers.L` for those tensors.
fn key_bias_layer(name: &str) -> Option<&str> {
    name.strip_prefix("text_encoder.")?.strip_suffix(".self_attn.k_proj.bias").filter(|l| l.starts_with("encoder.layers."))
}

/// Bound on a zero gradient's norm (float noise) relative to the same layer's query bias
/// gradient norm (the generator checks the reference against it too). Measured on sd1-tiny,
/// layers 0 / 1: reference 1.1e-7 / 2.7e-7, ours 1.0e-7 / 1.6e-7 (kernels off 9.7e-8 / 2.2e-7).
const KEY_BIAS_BOUND: f64 = 1e-5;

/// The gradient norm the reference's summary of `name` records.
fn golden_norm(g: &std::collections::HashMap<String, Tensor>, name: &str) -> f64 {
    (g[&format!("grad.{name}")].to_vec1::<f32>().unwrap()[1] as f64).sqrt()
}

#[test]
fn key_biases_are_named_exactly() {
    assert_eq!(key_bias_layer("text_encoder.encoder.layers.3.self_attn.k_proj.bias"), Some("encoder.layers.3"));
    for n in [
        "text_encoder.encoder.layers.3.self_attn.q_proj.bias",
        "text_encoder.encoder.layers.3.self_attn.k_proj.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.bias",
        "encoder.layers.3.self_attn.k_proj.bias",
    ] {
        assert_eq!(key_bias_layer(n), None, "{n}");
    }
}

#[test]
fn one_dreambooth_step_matches_pytorch() {
    check_step("dreambooth-step", false);
}

#[test]
fn one_dreambooth_step_with_text_encoder_matches_pytorch() {
    check_step("dreambooth-te-step", true);
}

fn check_step(stem: &str, train_te: bool) {
    let g = common::load_golden(stem);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture(&format!("golden/{stem}.json"))).unwrap()).unwrap();
    assert_eq!(meta["train_text_encoder"].as_bool(), Some(train_te));
    assert_eq!(meta["key_bias_bound"].as_f64(), Some(KEY_BIAS_BOUND));
    let mut preset = Method::Dreambooth.preset(&[]).unwrap();
    preset.set_train_text_encoder(train_te).unwrap();
    let concepts = check::concepts();
    let mut model =
        Personalized::load(&common::fixture("sd1-tiny"), &LoadOptions::default(), &concepts, preset.unet_trainable).unwrap();
    if preset.train_text_encoder {
        model.train_text_encoder().unwrap();
    }
    assert_eq!(model.modifier_ids, vec![49408, 49409]);
    // The text encoder's trainable tensors, by the reference's names (all of them, or none).
    let te_names: Vec<String> = model.text_encoder_vars.iter().map(|(n, _)| format!("text_encoder.{n}")).collect();
    let want_te: Vec<String> = meta["text_encoder_params"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(te_names, want_te);
    assert_eq!(te_names.len(), if train_te { 2 + 2 * 16 + 2 } else { 0 });

    // Every UNet tensor trains, by the reference's (diffusers') names.
    let names: Vec<&str> = model.unet_vars.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = meta["unet_params"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, want_names);
    assert_eq!(names.len(), 494);

    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let captions = meta["captions"].as_array().unwrap();
    for (i, c) in captions.iter().enumerate() {
        assert_eq!(model.sd.tokenizer.encode(c.as_str().unwrap()).ids, ids.get(i).unwrap().to_vec1::<u32>().unwrap());
    }
    let schedule = NoiseSchedule::new(model.sd.scheduler_config.clone());
    // DreamBooth has no attention loss: no sample needs concept positions.
    let batch = golden_batch(&g, ids, vec![None; 3]);
    let losses = forward_losses(&model, &schedule, &batch, &preset.loss).unwrap();
    let ours = losses.total.to_scalar::<f32>().unwrap() as f64;
    let want = g["loss.total"].to_vec1::<f32>().unwrap()[0] as f64;
    let rel = (ours - want).abs() / want;
    println!("loss: {ours:.7} vs {want:.7} (rel {rel:.2e})");
    assert!(rel <= 1e-4, "loss rel err {rel}");

    let grads = losses.total.backward().unwrap();
    let trainable = model.trainable(preset.train_embeddings);
    assert_eq!(trainable.len(), 494 + te_names.len() + 1);
    let mut worst = (0.0f64, 0.0f64, 0.0f64, String::new());
    let mut worst_te = (0.0f64, 0.0f64, 0.0f64, String::new());
    let mut key_biases = 0;
    let grad_list = check::each_gradient(&trainable, &grads, |part, grad| {
        let name = part.name;
        if part.row.is_some() {
            let err = common::rel_err(grad, &g[&format!("grad.{}", part.key)]);
            println!("grad.{}: rel err {err:.2e}", part.key);
            assert!(err <= 1e-3, "grad of {}: rel err {err}", part.label);
        } else if let Some(layer) = key_bias_layer(name) {
            // Exactly zero (see key_bias_layer): both sides hold float noise, so both norms
            // must be tiny against the same layer's query bias gradient, which is not zero.
            let q_ref = golden_norm(&g, &format!("text_encoder.{layer}.self_attn.q_proj.bias"));
            let (ours_n, ref_n) = (summary(name, grad)[1].sqrt(), golden_norm(&g, name));
            println!("grad of {name}: norm {ours_n:.2e} (ours), {ref_n:.2e} (reference); {layer} q_proj.bias {q_ref:.2e}");
            assert!(q_ref > 1e-6, "{layer}: the query bias gradient norm {q_ref:.2e} is no yardstick");
            assert!(
                ours_n <= KEY_BIAS_BOUND * q_ref && ref_n <= KEY_BIAS_BOUND * q_ref,
                "grad of {name} should be 0: norm {ours_n:.2e} (ours), {ref_n:.2e} (reference) > {KEY_BIAS_BOUND:e} x {q_ref:.2e}"
            );
            key_biases += 1;
        } else {
            let s = summary(name, grad);
            let (en, ep, es) = summary_errors(&s, &g[&format!("grad.{name}")].to_vec1::<f32>().unwrap(), grad.elem_count());
            assert!(en <= 1e-3 && ep <= 1e-3 && es <= 1e-3, "grad of {name}: rel err norm {en:.2e}, projections {ep:.2e}, sum {es:.2e}");
            let w = if name.starts_with("text_encoder.") { &mut worst_te } else { &mut worst };
            if ep > w.1 {
                w.3 = name.to_string();
            }
            *w = (w.0.max(en), w.1.max(ep), w.2.max(es), w.3.clone());
        }
    });
    // Every layer's key bias, and nothing else, took the zero-gradient branch.
    let layers = te_names.iter().filter(|n| n.ends_with(".self_attn.q_proj.bias")).count();
    assert_eq!((key_biases, layers), (if train_te { 2 } else { 0 }, if train_te { 2 } else { 0 }));
    println!("UNet gradients, worst rel err: norm {:.2e}, projections {:.2e} ({}), sum {:.2e}", worst.0, worst.1, worst.3, worst.2);
    if train_te {
        println!(
            "text encoder gradients, worst rel err: norm {:.2e}, projections {:.2e} ({}), sum {:.2e}",
            worst_te.0, worst_te.1, worst_te.3, worst_te.2
        );
    }

    // Frozen: the VAE and, unless it trains, the text encoder (its table included); the UNet
    // has no frozen tensor. A trained text encoder's store still lists its file tensors, which
    // the model no longer uses: they must get no gradient either.
    check::assert_frozen_without_gradient(&model.sd, &grads, |component, name| {
        assert!(component != "unet", "UNet weight {name} is frozen");
        component == "vae" || !train_te
    });
    let table_grad = grads.get(model.sd.text_encoder.token_embedding());
    assert_eq!(table_grad.is_some(), train_te, "the vocabulary table's gradient");

    // One AdamW step (lr 1e-3 and eps 1e-4 as the reference: with eps 1e-8 the first step
    // g / (|g| + eps) is ill-conditioned at the ~1e-8 gradient elements a whole UNet has).
    assert_eq!(meta["adamw"]["eps"].as_f64(), Some(1e-4));
    let config = AdamWConfig { lr: 1e-3, eps: meta["adamw"]["eps"].as_f64().unwrap(), ..Default::default() };
    let before = check::adamw_step(&trainable, &grad_list, config);
    // Worst rel err (norm or projections) and its tensor, per group: UNet, text encoder (its key
    // biases apart: their update is the weight decay alone, rounded), new rows (the worst row).
    let mut worst_update: [(f64, String); 4] = Default::default();
    check::each_update(&trainable, &before, |part, ours| {
        let (name, i) = (part.name, part.index);
        let (group, err) = if part.row.is_some() {
            let err = common::rel_err(ours, &g[&format!("update.{}", part.key)]);
            assert!(err <= 1e-3, "update of {}: rel err {err}", part.label);
            (3, err)
        } else {
            let s = summary(name, ours);
            let (en, ep, es) = summary_errors(&s, &g[&format!("update.{name}")].to_vec1::<f32>().unwrap(), ours.elem_count());
            assert!(en <= 1e-3 && ep <= 1e-3 && es <= 1e-3, "update of {name}: rel err norm {en:.2e}, projections {ep:.2e}, sum {es:.2e}");
            if key_bias_layer(name).is_some() {
                // A zero gradient leaves the weight decay: each element within lr |g| / eps
                // (the Adam term's size) and an f32 ulp of the weight of -lr wd w.
                let (lr, wd, eps) = (1e-3, AdamWConfig::default().weight_decay, meta["adamw"]["eps"].as_f64().unwrap());
                let vals = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (u, w, gr) = (vals(ours), vals(&before[i]), vals(&grad_list[i]));
                let worst = (0..u.len())
                    .map(|j| {
                        let bound = lr * (gr[j] as f64).abs() / eps + (w[j] as f64).abs() * f32::EPSILON as f64;
                        (u[j] as f64 + lr * wd * w[j] as f64).abs() / bound
                    })
                    .fold(0.0f64, f64::max);
                println!("update of {name}: -lr wd w within {worst:.2} of the bound");
                assert!(worst <= 1.0, "update of {name} is not the weight decay alone ({worst:.2} x the bound)");
            }
            (if key_bias_layer(name).is_some() { 2 } else { usize::from(name.starts_with("text_encoder.")) }, en.max(ep))
        };
        if err > worst_update[group].0 {
            worst_update[group] = (err, name.to_string());
        }
    });
    for (label, (err, name)) in ["UNet", "text encoder", "text encoder key biases", "new rows"].iter().zip(&worst_update) {
        if name.is_empty() {
            continue;
        }
        println!("AdamW updates, {label}: worst rel err {err:.2e} ({name})");
    }
}

/// [`one_dreambooth_step_matches_pytorch`] on the generic candle path (fused CPU kernels off, in
/// a child process that asserts the library took the switch).
#[test]
fn one_dreambooth_step_matches_pytorch_with_kernels_off() {
    if common::kernels_switched_off() {
        common::assert_kernel_switch_honoured();
        return;
    }
    common::run_with_kernels_off(&[
        "one_dreambooth_step_matches_pytorch",
        "one_dreambooth_step_with_text_encoder_matches_pytorch",
        "one_dreambooth_step_matches_pytorch_with_kernels_off",
    ]);
}
