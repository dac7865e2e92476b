//! `disendiff bench`: the benchmark cases of `crate::bench`, each in its own process so that
//! its peak resident memory is its own. One JSON object per line with `--json`.

use crate::bench;
use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Cases to run (default: all): unet-fwd, unet-train-kv, train-step-toy, sample-toy.
    #[arg(long = "case")]
    pub cases: Vec<String>,
    /// Timed runs per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Print one JSON object per line: {"name", "median_s", "peak_rss_mb"}.
    #[arg(long)]
    pub json: bool,
    /// Run exactly one case in this process (used internally).
    #[arg(long, hide = true)]
    pub child: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.child {
        let [name] = a.cases.as_slice() else { bail!("--child takes exactly one --case") };
        let (median, peak) = bench::measure(name, a.warmup, a.runs)?;
        println!("{}", serde_json::json!({"name": name, "median_s": median, "peak_rss_mb": peak}));
        return Ok(());
    }
    let cases: Vec<String> = if a.cases.is_empty() { bench::CASES.iter().map(|s| s.to_string()).collect() } else { a.cases.clone() };
    for c in &cases {
        if !bench::CASES.contains(&c.as_str()) {
            bail!("unknown case {c:?}; cases: {}", bench::CASES.join(", "));
        }
    }
    let exe = std::env::current_exe()?;
    if !a.json {
        println!("{:<16} {:>10} {:>12}", "case", "median s", "peak RSS MB");
    }
    for c in &cases {
        let out = std::process::Command::new(&exe)
            .args(["bench", "--child", "--case", c, "--runs", &a.runs.to_string(), "--warmup", &a.warmup.to_string()])
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
