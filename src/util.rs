//! Small utilities: the device by name, seeded noise, image files, atomic writes.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// `cpu`, `cuda` or `cuda:N`; a GPU needs a build with `--features cuda` and, at run time, the
/// NVIDIA driver's `libcuda.so.1` (tools/cuda/README.md).
pub fn parse_device(name: &str) -> Result<Device> {
    let n = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown device {d:?} (cpu, cuda, cuda:N)"),
        },
    };
    let hint = if cfg!(feature = "cuda") {
        "is an NVIDIA driver for CUDA >= 13.0 installed, and GPU N present?"
    } else {
        "this build has no GPU support: build it with --features cuda (tools/cuda/build.sh)"
    };
    Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cannot use {name}: {e} ({hint})"))
}

/// Standard normal noise from a seeded generator (deterministic on every device).
pub fn randn(rng: &mut rand::rngs::StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

pub fn seeded_rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same folder, synced
/// to the disk, renamed over `path`, then the folder synced (best effort: not every file
/// system can sync a folder), so a reader, a crash or a power cut never leaves a half-written
/// file under `path`. On any error the temporary file is removed and the error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // The temporary file may not exist (creating it failed); nothing else can be done here.
        let _ = std::fs::remove_file(&tmp);
        bail!("writing {} failed: {e}", path.display());
    }
    // Makes the rename itself durable; a folder that cannot be opened or synced (some network
    // and Windows file systems) still holds the complete file.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Images [N, 3, H, W] with values in [0, 1] -> 8-bit RGB buffers, rounded as diffusers'
/// `numpy_to_pil` does (`(x * 255).round()`).
pub fn to_rgb8(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        bail!("expected 3-channel images, got {c}");
    }
    let data = images.to_dtype(DType::F32)?.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let data = data.flatten_all()?.to_vec1::<f32>()?;
    let per = h * w * 3;
    (0..n)
        .map(|i| {
            let px: Vec<u8> = data[i * per..(i + 1) * per].iter().map(|v| (v * 255.0).round() as u8).collect();
            image::RgbImage::from_raw(w as u32, h as u32, px).context("image buffer size")
        })
        .collect()
}

/// Encodes a PNG and writes it atomically.
pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)?;
    write_atomic(path, &buf.into_inner())
}

/// Checks that `path` is a file that can be opened, saying what is wrong otherwise: missing, a
/// folder, not a regular file, or not readable (permissions). `what` names it ("image").
pub fn require_file(path: &Path, what: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{what} {} does not exist", path.display()),
        Err(e) => bail!("cannot read {what} {}: {e}", path.display()),
        Ok(m) if m.is_dir() => bail!("{what} {} is a folder, not a file", path.display()),
        Ok(m) if !m.is_file() => bail!("{what} {} is not a regular file", path.display()),
        Ok(_) => {
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot read {what} {}: {e}", path.display()))?;
            Ok(())
        }
    }
}

/// Reads an image file as RGB, with a clear error for unreadable or non-image files.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    require_file(path, "image")?;
    let img = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .with_context(|| format!("{} is not a readable image (PNG or JPEG)", path.display()))?;
    Ok(img.to_rgb8())
}

/// RGB image -> tensor [1, 3, H, W] in [-1, 1].
pub fn rgb_to_tensor(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let v: Vec<f32> = img.as_raw().iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(v, (h as usize, w as usize, 3), device)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}
