//! Ctrl-C (SIGINT) and SIGTERM during long work: the first asks the work to stop at its next
//! safe point (training: after the current step, with a checkpoint), the second stops the
//! process at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// What the first signal prints (set once, before the handler is installed).
static MESSAGE: OnceLock<&'static str> = OnceLock::new();

extern "C" fn on_signal(_sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // Second signal: stop now (only async-signal-safe calls here).
        unsafe { libc::_exit(130) };
    }
    let msg = MESSAGE.get().copied().unwrap_or("stopping at the next safe point (press Ctrl-C again to stop at once)");
    unsafe {
        libc::write(2, b"\n".as_ptr().cast(), 1);
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
}

/// Installs the handler for SIGINT and SIGTERM; the returned flag is set by the first signal,
/// which prints `message` (what the work will do).
pub fn install(message: &'static str) -> &'static AtomicBool {
    let _ = MESSAGE.set(message);
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &REQUESTED
}
