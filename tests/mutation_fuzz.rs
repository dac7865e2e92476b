//! Seeded mutation fuzzing of the loaders that read untrusted files (issue 12): safetensors
//! weights (`WeightStore`), torch `.ckpt` pickles, PNG/JPEG images, JSON model/scheduler
//! configs, concept files and LoRA files.
//!
//! Nightly `cargo-fuzz` is not assumed, so this is an ordinary test. A small mutator (bit flips,
//! bytes set to 0x00/0xff/random, truncation, duplicated or removed ranges, and edits of the
//! safetensors header JSON and of the pickle inside a `.ckpt` zip) derives mutants from fixture
//! seed files and feeds each to the library's own loader under `catch_unwind`. Any panic fails
//! the test naming the seed file, the iteration, the mutation and the path the mutant was kept at.
//!
//! Unbounded allocation from a header: the cases run in a child process (this test binary
//! re-run on its ignored `fuzz_child` test) under `RLIMIT_AS` = 2 GiB, so a loader that
//! allocates what a header claims aborts the child, and the parent fails with the last case the
//! child announced. `DISENDIFF_FUZZ_ITERS` sets the number of mutants (default 3000),
//! `DISENDIFF_FUZZ_SEED` the mutator's seed (default 12).

use anyhow::Result;
use candle_core::{DType, Device};
use disendiff::formats::{concept_file, lora};
use disendiff::model::clip::ClipTextConfig;
use disendiff::model::single_file::pickle::read_checkpoint;
use disendiff::model::unet::UNetConfig;
use disendiff::model::vae::VaeConfig;
use disendiff::model::weights::WeightStore;
use disendiff::scheduler::SchedulerConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

const CHILD_ENV: &str = "DISENDIFF_FUZZ_CHILD";
const MEMORY_CAP: u64 = 2 << 30;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Weights,
    Lora,
    Concept,
    Ckpt,
    Image,
    UnetConfig,
    VaeConfig,
    ClipConfig,
    SchedulerConfig,
}

impl Kind {
    fn is_safetensors(self) -> bool {
        matches!(self, Kind::Weights | Kind::Lora | Kind::Concept)
    }
}

struct Seed {
    kind: Kind,
    name: String,
    bytes: Vec<u8>,
}

fn seeds() -> Vec<Seed> {
    let mut out: Vec<Seed> = [
        (Kind::Weights, "golden/single-sd2.safetensors"),
        (Kind::Weights, "sd1-tiny/vae/diffusion_pytorch_model.safetensors"),
        (Kind::Weights, "unet-inpaint-tiny/diffusion_pytorch_model.fp16.safetensors"),
        (Kind::Lora, "golden/lora-kohya.safetensors"),
        (Kind::Lora, "golden/lora-peft.safetensors"),
        (Kind::Concept, "golden/export-concepts.safetensors"),
        (Kind::Ckpt, "golden/single-evil.ckpt"),
        (Kind::Ckpt, "golden/single-sd2-ema.ckpt"),
        (Kind::Image, "golden/inpaint-mask.png"),
        (Kind::Image, "golden/clip-img-2.png"),
        (Kind::UnetConfig, "sd1-tiny/unet/config.json"),
        (Kind::UnetConfig, "unet-inpaint-tiny/config.json"),
        (Kind::VaeConfig, "sd1-tiny/vae/config.json"),
        (Kind::ClipConfig, "sd1-tiny/text_encoder/config.json"),
        (Kind::SchedulerConfig, "sd1-tiny/scheduler/scheduler_config.json"),
    ]
    .into_iter()
    .map(|(kind, rel)| Seed {
        kind,
        name: rel.to_string(),
        bytes: std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("seed file {rel}: {e}")),
    })
    .collect();
    // A JPEG seed, encoded here from a PNG fixture (the fixtures hold no JPEG).
    let img = image::open(fixture("golden/clip-img-2.png")).expect("decoding the PNG seed").to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80).encode_image(&img).expect("encoding the JPEG seed");
    out.push(Seed { kind: Kind::Image, name: "clip-img-2.png as JPEG".into(), bytes: jpeg });
    out
}

/// An integer that often sits on a boundary.
fn nasty_number(rng: &mut StdRng) -> serde_json::Value {
    use serde_json::json;
    match rng.random_range(0..12) {
        0 => json!(-1),
        1 => json!(0),
        2 => json!(u64::MAX),
        3 => json!(i64::MIN),
        4 => json!(1u64 << 40),
        5 => json!(u32::MAX),
        6 => json!(1.5),
        7 => json!(1e300),
        8 => json!("12"),
        9 => json!(null),
        10 => json!(usize::MAX / 2 + 1),
        _ => json!(rng.random_range(0..1_000_000u64)),
    }
}

/// Raw byte mutations; returns a description.
fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>) -> String {
    if b.is_empty() {
        b.push(rng.random());
        return "append a byte".into();
    }
    let n = b.len();
    match rng.random_range(0..6) {
        0 => {
            let k = rng.random_range(1..=8);
            for _ in 0..k {
                let i = rng.random_range(0..n);
                b[i] ^= 1 << rng.random_range(0..8);
            }
            format!("flip {k} bits")
        }
        1 | 2 => {
            // Bias the position towards the start, where headers live.
            let i = if rng.random_bool(0.5) { rng.random_range(0..n.min(512)) } else { rng.random_range(0..n) };
            let len = rng.random_range(1..=8).min(n - i);
            let v: u8 = match rng.random_range(0..3) {
                0 => 0x00,
                1 => 0xff,
                _ => rng.random(),
            };
            b[i..i + len].fill(v);
            format!("set {len} bytes at {i} to {v:#04x}")
        }
        3 => {
            let at = rng.random_range(0..n);
            b.truncate(at);
            format!("truncate at {at}")
        }
        4 => {
            let i = rng.random_range(0..n);
            let len = rng.random_range(1..=64).min(n - i);
            let chunk = b[i..i + len].to_vec();
            let at = rng.random_range(0..=n);
            b.splice(at..at, chunk);
            format!("duplicate {len} bytes from {i} at {at}")
        }
        _ => {
            let i = rng.random_range(0..n);
            let len = rng.random_range(1..=64).min(n - i);
            b.drain(i..i + len);
            format!("remove {len} bytes at {i}")
        }
    }
}

/// Edits of a safetensors file's header JSON (or of its length prefix).
fn mutate_safetensors_header(rng: &mut StdRng, b: &mut Vec<u8>) -> Option<String> {
    let hlen = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(b.get(8..8 + hlen)?).ok()?;
    let data = b[8 + hlen..].to_vec();
    let names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if rng.random_range(0..8) == 0 {
        let v: u64 = match rng.random_range(0..3) {
            0 => u64::MAX,
            1 => (b.len() as u64).saturating_sub(1),
            _ => 1 << 40,
        };
        b[..8].copy_from_slice(&v.to_le_bytes());
        return Some(format!("header length prefix set to {v}"));
    }
    let what;
    if names.is_empty() || (header.contains_key("__metadata__") && rng.random_range(0..5) == 0) {
        let meta = header.entry("__metadata__").or_insert_with(|| serde_json::json!({}));
        let obj = meta.as_object_mut()?;
        let keys: Vec<String> = obj.keys().cloned().collect();
        if keys.is_empty() {
            return None;
        }
        let k = &keys[rng.random_range(0..keys.len())];
        let mut s = obj[k].as_str().unwrap_or("").as_bytes().to_vec();
        let m = mutate_bytes(rng, &mut s);
        obj[k] = serde_json::Value::String(String::from_utf8_lossy(&s).into_owned());
        what = format!("metadata {k}: {m}");
    } else {
        let name = &names[rng.random_range(0..names.len())];
        let entry = header.get_mut(name)?.as_object_mut()?;
        what = match rng.random_range(0..7) {
            0 => {
                let dt = ["F64", "I64", "U8", "BOOL", "F8_E4M3", "BF16", "Q4", "", "f32"][rng.random_range(0..9)];
                entry.insert("dtype".into(), dt.into());
                format!("{name}: dtype {dt}")
            }
            1 => {
                let shape: Vec<serde_json::Value> = (0..rng.random_range(0..5)).map(|_| nasty_number(rng)).collect();
                let s = serde_json::Value::Array(shape);
                let w = format!("{name}: shape {s}");
                entry.insert("shape".into(), s);
                w
            }
            2 => {
                let big = serde_json::json!([1u64 << 32, 1u64 << 32, 1u64 << 20]);
                entry.insert("shape".into(), big);
                format!("{name}: huge shape")
            }
            3 => {
                let offs = serde_json::json!([nasty_number(rng), nasty_number(rng)]);
                let w = format!("{name}: data_offsets {offs}");
                entry.insert("data_offsets".into(), offs);
                w
            }
            4 => {
                let end = data.len() as u64 + rng.random_range(1..1000u64);
                let offs = serde_json::json!([0, end]);
                entry.insert("data_offsets".into(), offs);
                format!("{name}: data_offsets past the end ({end})")
            }
            5 => {
                let k = ["dtype", "shape", "data_offsets"][rng.random_range(0..3)];
                entry.remove(k);
                format!("{name}: no {k}")
            }
            _ => {
                let v = nasty_number(rng);
                let w = format!("{name}: shape entry set to {v}");
                let shape = entry.get_mut("shape")?.as_array_mut()?;
                if shape.is_empty() {
                    shape.push(v);
                } else {
                    let i = rng.random_range(0..shape.len());
                    shape[i] = v;
                }
                w
            }
        };
    }
    let text = serde_json::to_vec(&header).ok()?;
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    *b = out;
    Some(what)
}

/// Rewrites a `.ckpt` zip with its `data.pkl` mutated (the zip's CRC stays right, so the mutant
/// reaches the unpickler instead of failing the checksum).
fn mutate_ckpt_pickle(rng: &mut StdRng, b: &mut Vec<u8>) -> Option<String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(b.clone())).ok()?;
    let mut entries = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).ok()?;
        let name = f.name().ok()?.to_string();
        let mut data = Vec::new();
        f.read_to_end(&mut data).ok()?;
        entries.push((name, data));
    }
    let (name, pkl) = entries.iter_mut().find(|(n, _)| n.ends_with("/data.pkl"))?;
    let what = format!("{name}: {}", mutate_bytes(rng, pkl));
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in &entries {
        w.start_file(name.as_str(), opts).ok()?;
        w.write_all(data).ok()?;
    }
    *b = w.finish().ok()?.into_inner();
    Some(what)
}

/// Edits of a JSON config: a value replaced by a boundary number, a wrong type, or removed.
fn mutate_json(rng: &mut StdRng, b: &mut Vec<u8>) -> Option<String> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(b).ok()?;
    let keys: Vec<String> = v.keys().cloned().collect();
    let k = keys.get(rng.random_range(0..keys.len().max(1)))?.clone();
    let what = match rng.random_range(0..4) {
        0 => {
            v.remove(&k);
            format!("remove {k}")
        }
        1 => {
            let arr: Vec<serde_json::Value> = (0..rng.random_range(0..6)).map(|_| nasty_number(rng)).collect();
            let a = serde_json::Value::Array(arr);
            let w = format!("{k} = {a}");
            v.insert(k, a);
            w
        }
        2 if v[&k].is_array() => {
            let a = v[&k].as_array_mut()?;
            if a.is_empty() {
                return None;
            }
            let i = rng.random_range(0..a.len());
            a[i] = nasty_number(rng);
            format!("{k}[{i}] = {}", a[i])
        }
        _ => {
            let n = nasty_number(rng);
            let w = format!("{k} = {n}");
            v.insert(k, n);
            w
        }
    };
    *b = serde_json::to_vec_pretty(&v).ok()?;
    Some(what)
}

fn mutate(rng: &mut StdRng, seed: &Seed) -> (Vec<u8>, String) {
    let mut b = seed.bytes.clone();
    let structured = rng.random_bool(0.5);
    let mut what = Vec::new();
    if structured {
        let done = match seed.kind {
            k if k.is_safetensors() => mutate_safetensors_header(rng, &mut b),
            Kind::Ckpt => mutate_ckpt_pickle(rng, &mut b),
            Kind::UnetConfig | Kind::VaeConfig | Kind::ClipConfig | Kind::SchedulerConfig => mutate_json(rng, &mut b),
            _ => None,
        };
        what.extend(done);
    }
    if what.is_empty() || rng.random_range(0..4) == 0 {
        what.push(mutate_bytes(rng, &mut b));
    }
    (b, what.join("; "))
}

/// Runs the loader of `kind` on `path`; Ok/Err are both fine, only a panic is a failure.
fn load(kind: Kind, path: &Path, targets: &lora::TargetNames) -> Result<()> {
    match kind {
        Kind::Weights => {
            let store = WeightStore::open(&[path.to_path_buf()], DType::F32, &Device::Cpu)?;
            let shapes: Vec<(String, Vec<usize>)> = store.tensor_shapes().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
            for (name, shape) in shapes {
                store.get(&name, &shape.into())?;
            }
        }
        Kind::Lora => {
            lora::read(path, 0.7, targets, true)?;
        }
        Kind::Concept => {
            concept_file::load(path)?;
        }
        Kind::Ckpt => {
            read_checkpoint(path)?;
        }
        Kind::Image => {
            disendiff::util::load_rgb(path)?;
        }
        Kind::UnetConfig => {
            UNetConfig::from_json_str(&std::fs::read_to_string(path)?)?;
        }
        Kind::VaeConfig => {
            VaeConfig::from_json(&std::fs::read_to_string(path)?)?;
        }
        Kind::ClipConfig => {
            ClipTextConfig::from_json(&std::fs::read_to_string(path)?, "mutant")?;
        }
        Kind::SchedulerConfig => {
            let cfg = SchedulerConfig::from_json(&std::fs::read_to_string(path)?)?;
            cfg.alphas_cumprod();
        }
    }
    Ok(())
}

/// The weight names the LoRA seeds were made for (the sd1-tiny model).
fn lora_targets() -> lora::TargetNames {
    let shapes = |rel: &str| {
        let store = WeightStore::open(&[fixture(rel)], DType::F32, &Device::Cpu).expect("opening the sd1-tiny weights");
        store.tensor_shapes().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
    };
    lora::TargetNames {
        unet: shapes("sd1-tiny/unet/diffusion_pytorch_model.safetensors"),
        text_encoder: shapes("sd1-tiny/text_encoder/model.safetensors"),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("{name}={s:?} is not a number")),
        Err(_) => default,
    }
}

/// Mutants that once panicked or allocated without bound, kept under tests/fixtures/fuzz/:
/// (file, loader, a phrase of the error it must now give).
const REGRESSIONS: &[(&str, Kind, &str)] = &[
    ("scheduler-timesteps-4294967295.json", Kind::SchedulerConfig, "num_train_timesteps 4294967295 is more than"),
    ("ckpt-expanded-view.ckpt", Kind::Ckpt, "an expanded view is not read"),
];

/// Each kept mutant loads with its clear error (no panic, no success), and every file under
/// tests/fixtures/fuzz/ is in [`REGRESSIONS`].
#[test]
fn kept_mutants_fail_cleanly() {
    let dir = fixture("fuzz");
    let targets = lora::TargetNames::default();
    for entry in std::fs::read_dir(&dir).expect("tests/fixtures/fuzz") {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(REGRESSIONS.iter().any(|(f, _, _)| *f == name), "tests/fixtures/fuzz/{name} is not listed in REGRESSIONS");
    }
    for &(file, kind, phrase) in REGRESSIONS {
        let path = dir.join(file);
        assert!(path.is_file(), "{} is missing", path.display());
        match catch_unwind(AssertUnwindSafe(|| load(kind, &path, &targets))) {
            Err(_) => panic!("{}: the loader panicked", path.display()),
            Ok(Ok(())) => panic!("{}: a broken file loaded without an error", path.display()),
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                assert!(msg.contains(phrase), "{}: error {msg:?} does not say {phrase:?}", path.display());
            }
        }
    }
}

/// The mutation run itself, in this process: run by [`mutation_fuzz`] in a memory-capped child.
#[test]
#[ignore = "run by mutation_fuzz in a child process under a memory cap"]
fn fuzz_child() {
    assert!(std::env::var(CHILD_ENV).is_ok(), "fuzz_child runs only as mutation_fuzz's child ({CHILD_ENV} set)");
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) }, 0);
    assert_eq!(lim.rlim_cur as u64, MEMORY_CAP, "the fuzz child runs without its memory cap");
    let iters = env_u64("DISENDIFF_FUZZ_ITERS", 3000);
    let seed = env_u64("DISENDIFF_FUZZ_SEED", 12);
    let keep = PathBuf::from(std::env::var("DISENDIFF_FUZZ_DIR").expect("DISENDIFF_FUZZ_DIR"));
    let seeds = seeds();
    let targets = lora_targets();
    let mut rng = StdRng::seed_from_u64(seed);
    // Panics are collected and reported together; the default hook would print each one.
    std::panic::set_hook(Box::new(|_| {}));
    let start = Instant::now();
    let mut failures = Vec::new();
    let (mut ok, mut err) = (0u64, 0u64);
    for i in 0..iters {
        let s = &seeds[rng.random_range(0..seeds.len())];
        let (bytes, what) = mutate(&mut rng, s);
        let ext = if s.kind.is_safetensors() { "safetensors" } else if s.kind == Kind::Ckpt { "ckpt" } else if s.kind == Kind::Image { "img" } else { "json" };
        let path = keep.join(format!("case.{ext}"));
        std::fs::write(&path, &bytes).unwrap();
        // Announced before the call, so an abort (allocation over the cap) names its case.
        eprintln!("CASE {i} seed={} kind={:?} mutation: {what}", s.name, s.kind);
        match catch_unwind(AssertUnwindSafe(|| load(s.kind, &path, &targets))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                let kept = keep.join(format!("panic-{i}.{ext}"));
                std::fs::write(&kept, &bytes).unwrap();
                failures.push(format!("iteration {i}: seed {} ({:?}), mutation {what}: panic {msg:?}; mutant kept at {}", s.name, s.kind, kept.display()));
            }
        }
    }
    let _ = std::panic::take_hook();
    println!(
        "FUZZ-SUMMARY iterations {iters} seed {seed}: {ok} loaded, {err} clean errors, {} panics, {:.1} s",
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{} loader panics:\n{}", failures.len(), failures.join("\n"));
}

/// Runs [`fuzz_child`] in a child process with its address space capped at 2 GiB.
#[test]
fn mutation_fuzz() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.keep();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "fuzz_child", "--ignored", "--nocapture", "--test-threads=1"]).env(CHILD_ENV, "1").env("DISENDIFF_FUZZ_DIR", &keep);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: MEMORY_CAP as libc::rlim_t, rlim_max: MEMORY_CAP as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("starting the fuzz child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last_case = stderr.lines().filter(|l| l.starts_with("CASE ")).last().unwrap_or("(none)");
    let summary = stdout.lines().find(|l| l.contains("FUZZ-SUMMARY")).unwrap_or("(no summary)");
    println!("{summary}");
    assert!(
        out.status.success() && stdout.contains("FUZZ-SUMMARY"),
        "the fuzz child failed ({}); last case announced: {last_case}\nmutants in {}\nstdout tail:\n{}\nstderr tail:\n{}",
        out.status,
        keep.display(),
        tail(&stdout, 4000),
        tail(&stderr, 4000)
    );
    let _ = std::fs::remove_dir_all(&keep);
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
