//! The memory check before a run: the estimate of [`crate::model::memory`] against what the
//! machine has left (or `--max-memory`), refusing a run that cannot fit with what would.

use super::ModelArgs;
use crate::model::memory::{self, human, Estimate, Generation, Training};
use crate::model::sd::StableDiffusion;
use anyhow::{bail, Result};

/// Parses a memory size: bytes, or a number with K/M/G/T (powers of 1000) or KiB/MiB/GiB/TiB
/// (powers of 1024), an optional trailing B: `512M`, `8GB`, `1.5GiB`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a memory size (e.g. 512M, 8GB, 1.5GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().trim_end_matches('b') {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024f64.powi(2),
        "gi" => 1024f64.powi(3),
        "ti" => 1024f64.powi(4),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (K, M, G, T, KiB, MiB, GiB, TiB)")),
    };
    let bytes = v * mult;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("{s:?} is not a positive memory size"));
    }
    Ok(bytes as u64)
}

/// Refuses the run `what` when its estimated peak does not fit: the model's resident size plus
/// the largest stage against `--max-memory`, else the activations against the memory the
/// machine has available. `suggest` says what would fit (e.g. a smaller size). Prints the
/// estimate either way.
pub fn check(model: &ModelArgs, what: &str, est: &Estimate, suggest: impl FnOnce(u64) -> Option<String>) -> Result<()> {
    let stage = est.peak_stage();
    let resident = memory::resident().unwrap_or(0);
    let peak = resident.saturating_add(stage.bytes);
    let (room, budget) = match model.max_memory {
        Some(max) => (max.saturating_sub(resident), format!("--max-memory is {}", human(max))),
        None => match memory::available() {
            Some(a) => (a, format!("{} is available", human(resident.saturating_add(a)))),
            None => {
                eprintln!("memory: about {} estimated ({} for the {}); the available memory cannot be read", human(peak), human(stage.bytes), stage.name);
                return Ok(());
            }
        },
    };
    eprintln!("memory: about {} estimated at the peak ({} for the {}), {budget}", human(peak), human(stage.bytes), stage.name);
    if stage.bytes > room {
        let hint = suggest(room).map(|s| format!("; {s}")).unwrap_or_default();
        bail!(
            "{what} needs about {} of memory ({} for the {} on top of the {} the model takes), but {budget}{hint}",
            human(peak),
            human(stage.bytes),
            stage.name,
            human(resident)
        );
    }
    Ok(())
}

/// Checks a generation of `g` (one image at a time) on `sd`, suggesting the largest square
/// size that fits, and `--vae-tiling` when it would make this size fit.
pub fn check_generation(model: &ModelArgs, sd: &StableDiffusion, g: &Generation, what: &str) -> Result<()> {
    let shapes = memory::Shapes::of(sd)?;
    let est = memory::generation(&shapes, g)?;
    check(model, &format!("{what} {}x{}", g.width, g.height), &est, |room| {
        let fits = |g: &Generation| memory::generation(&shapes, g).map_or(false, |e| e.activations() <= room);
        let mut hints = Vec::new();
        if !g.vae_tiling && fits(&Generation { vae_tiling: true, ..*g }) {
            hints.push("--vae-tiling makes this size fit".to_string());
        }
        let step = 8 * sd.vae_scale_factor();
        let largest = (1..=g.height.max(g.width) / step)
            .map(|k| k * step)
            .take_while(|&side| fits(&Generation { height: side, width: side, ..*g }))
            .last();
        match largest {
            Some(side) => hints.push(format!("{side}x{side} fits{}", if g.vae_tiling { "" } else { " without tiling" })),
            None => hints.push("not even the smallest size fits".to_string()),
        }
        Some(hints.join("; "))
    })
}

/// Checks one training micro-batch of `t` on `sd`, suggesting the largest micro-batch or
/// resolution that fits.
pub fn check_training(model: &ModelArgs, sd: &StableDiffusion, t: &Training) -> Result<()> {
    let shapes = memory::Shapes::of(sd)?;
    let est = memory::training(&shapes, t)?;
    let what = format!("training at {0}x{0} with micro-batches of {1}", t.resolution, t.batch);
    check(model, &what, &est, |room| {
        let fits = |t: &Training| memory::training(&shapes, t).map_or(false, |e| e.activations() <= room);
        let batch = (1..t.batch).rev().find(|&b| fits(&Training { batch: b, ..*t }));
        let step = sd.vae_scale_factor() * 8;
        let side = (1..=t.resolution / step).map(|k| k * step).take_while(|&r| fits(&Training { resolution: r, ..*t })).last();
        Some(match (batch, side) {
            (Some(b), _) => format!("--train-batch-size {b} fits (use --gradient-accumulation-steps for the same effective batch)"),
            (None, Some(r)) => format!("--resolution {r} fits"),
            (None, None) => "not even the smallest size fits".to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512_000_000));
        assert_eq!(parse_size("8GB"), Ok(8_000_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(1_610_612_736));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("nanG").is_err());
    }
}
