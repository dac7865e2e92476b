//! The `disendiff` command line; see `disendiff --help`.

/// Keeps freed memory in the process instead of returning every large tensor's pages to the
/// kernel: with glibc's defaults each large allocation is a fresh mmap whose pages the kernel
/// zeroes on first touch, which cost ~18% of a training step (perf) on the CPU.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Lets a write past the file-size limit (`ulimit -f`) fail with EFBIG, which training reports
/// naming the file and the checkpoint to resume from, instead of SIGXFSZ killing the process
/// with nothing said (and, like a full disk, it is tested that way).
fn ignore_sigxfsz() {
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() {
    tune_allocator();
    ignore_sigxfsz();
    if let Err(e) = disendiff::cli::run() {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
