//! The switch that turns the fused CPU kernels off: with `DISENDIFF_KERNELS=off` (or `0`,
//! `false`) every op of `model::ops` and `model::nn` takes candle's generic path on the CPU in
//! f32 too, the path that f16, bf16 and CUDA always take; the golden tests run both ways with
//! it. Read once per process.

use std::sync::OnceLock;

/// The environment variable of the switch.
pub const ENV: &str = "DISENDIFF_KERNELS";

/// What a value of [`ENV`] asks for: `Ok(true)` kernels on (unset, empty, `on`, `1`, `true`),
/// `Ok(false)` off (`off`, `0`, `false`), case and surrounding spaces ignored; any other value
/// is an error that names it.
pub fn parse(value: Option<&str>) -> anyhow::Result<bool> {
    let Some(v) = value else { return Ok(true) };
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "on" | "1" | "true" => Ok(true),
        "off" | "0" | "false" => Ok(false),
        _ => anyhow::bail!("{ENV}={v:?} is not one of off, 0, false (kernels off) or on, 1, true (kernels on)"),
    }
}

/// The switch's setting in this process, from [`ENV`]: `Err` for a value [`parse`] refuses
/// (a caller such as the command line can report it before any work starts).
pub fn setting() -> anyhow::Result<bool> {
    static SETTING: OnceLock<Result<bool, String>> = OnceLock::new();
    let read = || match std::env::var(ENV) {
        Ok(v) => parse(Some(&v)).map_err(|e| e.to_string()),
        Err(std::env::VarError::NotPresent) => Ok(true),
        Err(std::env::VarError::NotUnicode(v)) => Err(format!("{ENV}={v:?} is not valid unicode")),
    };
    SETTING.get_or_init(read).clone().map_err(anyhow::Error::msg)
}

/// Whether the fused CPU kernels may be used. A value of [`ENV`] that [`parse`] refuses leaves
/// them on, with one warning on stderr that names the value.
pub fn enabled() -> bool {
    static WARNED: OnceLock<()> = OnceLock::new();
    match setting() {
        Ok(on) => on,
        Err(e) => {
            WARNED.get_or_init(|| eprintln!("warning: {e}; the fused CPU kernels stay on"));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_of_the_switch() {
        for v in [None, Some(""), Some("on"), Some("1"), Some("true"), Some(" ON ")] {
            assert!(parse(v).unwrap(), "{v:?}");
        }
        for v in ["off", "0", "false", "OFF", " Off\n", "False"] {
            assert!(!parse(Some(v)).unwrap(), "{v:?}");
        }
        for v in ["of", "no", "disabled", "2"] {
            let err = parse(Some(v)).unwrap_err().to_string();
            assert!(err.contains(ENV) && err.contains(v), "{v:?}: {err}");
        }
    }

    /// The process's own setting is the parse of its environment (the golden tests' re-runs
    /// set `off` in a child process and check [`enabled`] there).
    #[test]
    fn enabled_follows_the_environment() {
        let want = parse(std::env::var(ENV).ok().as_deref()).ok();
        assert_eq!(setting().ok(), want);
        assert_eq!(enabled(), want.unwrap_or(true));
    }
}
