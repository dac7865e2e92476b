//! The DDIM sampler and DDPM training noise against diffusers (goldens `ddim.*`, `ddpm.*`), built
//! from the scheduler configs of the tiny SD1 (epsilon) and SD2 (v-prediction) folders.

mod common;

use candle_core::{DType, Tensor};
use disendiff::scheduler::{DdimScheduler, Ddpm, PredictionType, SchedulerConfig};

fn config(name: &str) -> SchedulerConfig {
    SchedulerConfig::from_file(common::fixture(&format!("{name}-tiny/scheduler/scheduler_config.json"))).unwrap()
}

fn check(name: &str, prediction: PredictionType) {
    let cfg = config(name);
    assert_eq!(cfg.prediction_type, prediction);
    let g = common::load_golden(name);

    let ddim = DdimScheduler::new(&cfg, 50).unwrap();
    let want: Vec<i64> = g["ddim.timesteps"].to_vec1().unwrap();
    let got: Vec<i64> = ddim.timesteps().iter().map(|&t| t as i64).collect();
    assert_eq!(got, want, "{name}: DDIM timesteps");

    for key in ["ddim.step", "ddim.step_last"] {
        let t = g[&format!("{key}.t")].to_vec1::<i64>().unwrap()[0] as usize;
        let mo = &g[&format!("{key}.model_output")];
        let sample = &g[&format!("{key}.sample")];
        let noise = &g[&format!("{key}.noise")];
        let prev = ddim.step(mo, t, sample, 0.0, None).unwrap();
        let err = common::rel_err(&prev, &g[&format!("{key}.prev_sample")]);
        println!("{name}: {key} t={t} eta 0   rel err {err:.3e}");
        assert!(err <= 1e-5, "{name}: {key} eta 0 rel err {err}");
        let prev = ddim.step(mo, t, sample, 0.7, Some(noise)).unwrap();
        let err = common::rel_err(&prev, &g[&format!("{key}.prev_sample_eta")]);
        println!("{name}: {key} t={t} eta 0.7 rel err {err:.3e}");
        assert!(err <= 1e-5, "{name}: {key} eta 0.7 rel err {err}");
    }

    let ddpm = Ddpm::new(cfg);
    let ac = Tensor::new(ddpm.alphas_cumprod(), &candle_core::Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let err = common::rel_err(&ac, &g["ddpm.alphas_cumprod"]);
    println!("{name}: alphas_cumprod rel err {err:.3e}");
    assert!(err <= 1e-6, "{name}: alphas_cumprod rel err {err}");
    let (x0, noise, t) = (&g["ddpm.x0"], &g["ddpm.noise"], &g["ddpm.t"]);
    let noisy = ddpm.add_noise(x0, noise, t).unwrap();
    let err = common::rel_err(&noisy, &g["ddpm.noisy"]);
    println!("{name}: add_noise rel err {err:.3e}");
    assert!(err <= 1e-5, "{name}: add_noise rel err {err}");
    let v = ddpm.get_velocity(x0, noise, t).unwrap();
    let err = common::rel_err(&v, &g["ddpm.velocity"]);
    println!("{name}: get_velocity rel err {err:.3e}");
    assert!(err <= 1e-5, "{name}: get_velocity rel err {err}");

    let target = ddpm.training_target(x0, noise, t).unwrap();
    let want = match prediction {
        PredictionType::Epsilon => noise,
        PredictionType::VPrediction => &g["ddpm.velocity"],
        PredictionType::Sample => x0,
    };
    assert!(common::rel_err(&target, want) <= 1e-5, "{name}: training target");
}

#[test]
fn sd1_epsilon_matches_diffusers() {
    check("sd1", PredictionType::Epsilon);
}

#[test]
fn sd2_v_prediction_matches_diffusers() {
    check("sd2", PredictionType::VPrediction);
}

#[test]
fn sd15_config_gives_leading_timesteps_981_to_1() {
    // runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as shipped.
    let json = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
        "clip_sample": false}"#;
    let cfg = SchedulerConfig::from_json(json).unwrap();
    let ddim = DdimScheduler::new(&cfg, 50).unwrap();
    let want: Vec<usize> = (0..50).rev().map(|i| 20 * i + 1).collect();
    assert_eq!(ddim.timesteps(), want.as_slice());
    assert_eq!((ddim.timesteps()[0], ddim.timesteps()[1], ddim.timesteps()[49]), (981, 961, 1));
    assert_eq!(ddim.init_noise_sigma(), 1.0);
}

#[test]
fn unsupported_options_are_errors() {
    for (json, word) in [
        (r#"{"beta_schedule": "sigmoid"}"#, "sigmoid"),
        (r#"{"prediction_type": "flow"}"#, "flow"),
        (r#"{"timestep_spacing": "karras"}"#, "karras"),
        (r#"{"thresholding": true}"#, "thresholding"),
    ] {
        let err = format!("{:#}", SchedulerConfig::from_json(json).unwrap_err());
        assert!(err.contains(word), "{err}");
    }
}
