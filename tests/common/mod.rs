//! Shared helpers of the golden tests: fixture paths, golden tensors, relative error, and the
//! re-run of a test binary's golden tests with the fused CPU kernels off; golden settings
//! ([`settings`]), the pipelines' end checks ([`images`]) and the training-step checks
//! ([`grad_check`]) in their own files.
#![allow(dead_code)]

pub mod grad_check;
pub mod images;
pub mod settings;

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// All tensors of `tests/fixtures/golden/<name>.safetensors`.
pub fn load_golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(&format!("golden/{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()))
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    num / den.max(1e-30)
}

/// Runs the `disendiff` binary in the repository root; returns (success, stderr) and fails the
/// test on a panic (bad input must give an error, never a panic).
pub fn disendiff(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_disendiff"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("run disendiff");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "disendiff panicked:\n{stderr}");
    (out.status.success(), stderr)
}

/// Copies a folder tree (e.g. a fixture model that a test will damage).
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// Whether this process runs with the fused CPU kernels switched off (`DISENDIFF_KERNELS=off`,
/// as [`run_with_kernels_off`] starts its child).
pub fn kernels_switched_off() -> bool {
    std::env::var("DISENDIFF_KERNELS").is_ok_and(|v| v == "off")
}

/// For a golden test: when the kernels are switched off, asserts that the library sees it, so
/// the test provably took the generic candle path (the one f16, bf16 and CUDA take).
pub fn assert_kernel_switch_honoured() {
    if kernels_switched_off() {
        assert!(!disendiff::model::kernels::enabled(), "DISENDIFF_KERNELS=off but the kernels are enabled");
    }
}

/// Runs the tests `names` of this test binary again in a child process (the binary itself,
/// `--exact`, one thread) with `DISENDIFF_KERNELS=off`, and fails unless the child succeeded,
/// reported each of them as passed and ran exactly that many (a name that matches no test
/// fails). Returns the child's output (its tests' printed errors).
pub fn run_with_kernels_off(names: &[&str]) -> String {
    let exe = std::env::current_exe().expect("path of the test binary");
    let out = std::process::Command::new(&exe)
        .args(["--exact", "--test-threads=1", "--show-output"])
        .args(names)
        .env("DISENDIFF_KERNELS", "off")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{names:?} with DISENDIFF_KERNELS=off failed:\n{report}");
    for name in names {
        let line = format!("test {name} ... ok");
        assert!(stdout.lines().any(|l| l.trim_end() == line), "the child did not pass {name}:\n{report}");
    }
    let summary = format!("test result: ok. {} passed; 0 failed;", names.len());
    assert!(stdout.contains(&summary), "the child did not run exactly {} tests ({summary:?} missing):\n{report}", names.len());
    println!("{report}");
    report
}
