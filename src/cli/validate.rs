//! Checks of numeric flags before any work: finite, in range, with the flag's name in the
//! message (`--guidance-scale nan` or `--eta=-3` would otherwise run and write images).

use anyhow::{bail, Result};

/// A finite number.
pub fn finite(flag: &str, v: f64) -> Result<()> {
    if !v.is_finite() {
        bail!("{flag} must be a finite number, got {v}");
    }
    Ok(())
}

/// A finite number in `[lo, hi]`.
pub fn in_range(flag: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !(v.is_finite() && (lo..=hi).contains(&v)) {
        bail!("{flag} must be in [{lo}, {hi}], got {v}");
    }
    Ok(())
}

/// A finite number above 0.
pub fn positive(flag: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{flag} must be a finite number above 0, got {v}");
    }
    Ok(())
}

/// A count of at least `min`.
pub fn at_least(flag: &str, v: usize, min: usize) -> Result<()> {
    if v < min {
        bail!("{flag} must be at least {min}, got {v}");
    }
    Ok(())
}

/// The sampling flags every generating subcommand has.
pub fn sampling(num_inference_steps: usize, guidance_scale: f64, eta: Option<f64>, num_images: Option<usize>) -> Result<()> {
    at_least("--num-inference-steps", num_inference_steps, 1)?;
    finite("--guidance-scale", guidance_scale)?;
    if let Some(eta) = eta {
        in_range("--eta", eta, 0.0, 1.0)?;
    }
    if let Some(n) = num_images {
        at_least("--num-images", n, 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_flag() {
        let e = sampling(10, f64::NAN, Some(0.0), Some(1)).unwrap_err().to_string();
        assert!(e.contains("--guidance-scale") && e.contains("NaN"), "{e}");
        let e = sampling(10, 7.5, Some(-3.0), Some(1)).unwrap_err().to_string();
        assert!(e.contains("--eta"), "{e}");
        assert!(sampling(0, 7.5, None, None).unwrap_err().to_string().contains("--num-inference-steps"));
        assert!(sampling(10, 7.5, Some(1.0), Some(0)).unwrap_err().to_string().contains("--num-images"));
        assert!(sampling(10, 1.0, Some(1.0), Some(2)).is_ok());
        assert!(positive("--learning-rate", 0.0).is_err() && positive("--learning-rate", f64::INFINITY).is_err());
    }
}
