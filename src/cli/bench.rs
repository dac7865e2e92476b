//! `disendiff bench`: the benchmark cases of `crate::bench`, each in its own process so that
//! its peak resident memory is its own. One JSON object per line with `--json`.
//! `--memory-plan` prints the shape-based GPU memory plan of an SD1.5 DisenDiff micro-batch
//! (`model::memory::sd15_gpu_training_plan`) instead of running anything.

use crate::bench;
use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Cases to run (default: unet-fwd, unet-train-kv, train-step-toy, sample-toy);
    /// sd15-train-kv (full-size SD1.5 UNet, for a GPU) runs only when named.
    #[arg(long = "case")]
    pub cases: Vec<String>,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with --features cuda). The toy cases
    /// run on the CPU only.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the frozen weights: f32, f16 or bf16 (trainable ones stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The training cases (unet-train-kv, sd15-train-kv) recompute the UNet blocks'
    /// activations in the backward pass instead of keeping them (as `train --gradient-checkpointing`).
    #[arg(long, alias = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    /// Print the SD1.5 GPU memory plan (estimated from the shapes) and exit.
    #[arg(long)]
    pub memory_plan: bool,
    /// Timed runs per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Print one JSON object per line: {"name", "median_s", "peak_rss_mb", "times_s", "setup_s",
    /// "device", "dtype"}.
    #[arg(long)]
    pub json: bool,
    /// Run exactly one case in this process (used internally).
    #[arg(long, hide = true)]
    pub child: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.memory_plan {
        print!("{}", crate::model::memory::sd15_gpu_training_plan()?.table());
        return Ok(());
    }
    let dtype = bench::parse_dtype(&a.dtype)?;
    if a.child {
        let [name] = a.cases.as_slice() else { bail!("--child takes exactly one --case") };
        let target = bench::Target { device: crate::util::parse_device(&a.device)?, dtype, gradient_checkpointing: a.gradient_checkpointing };
        let m = bench::measure_on(name, &target, a.warmup, a.runs)?;
        println!(
            "{}",
            serde_json::json!({"name": name, "median_s": m.median_s, "peak_rss_mb": m.peak_rss_mb,
                "times_s": m.times_s, "setup_s": m.setup_s, "device": a.device, "dtype": a.dtype})
        );
        return Ok(());
    }
    let cases: Vec<String> = if a.cases.is_empty() { bench::CASES.iter().map(|s| s.to_string()).collect() } else { a.cases.clone() };
    for c in &cases {
        if !bench::is_case(c) {
            bail!("unknown case {c:?}; cases: {}, {}", bench::CASES.join(", "), bench::GPU_CASES.join(", "));
        }
    }
    let exe = std::env::current_exe()?;
    if !a.json {
        println!("{:<16} {:>10} {:>12}", "case", "median s", "peak RSS MB");
    }
    for c in &cases {
        let out = std::process::Command::new(&exe)
            .args(["bench", "--child", "--case", c, "--runs", &a.runs.to_string(), "--warmup", &a.warmup.to_string()])
            .args(["--device", &a.device, "--dtype", &a.dtype])
            .args(a.gradient_checkpointing.then_some("--gradient-checkpointing"))
            .output()
            .with_context(|| format!("running case {c}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!("case {c} failed: {}", err.trim());
            continue;
        }
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if a.json {
            println!("{line}");
        } else {
            let v: serde_json::Value = serde_json::from_str(&line)?;
            println!("{:<16} {:>10.4} {:>12.1}", c, v["median_s"].as_f64().unwrap_or(f64::NAN), v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN));
        }
    }
    Ok(())
}
