//! Ctrl-C (SIGINT) and SIGTERM during long work: the first asks the work to stop at its next
//! safe point (training: after the current step, with a checkpoint), the second stops the
//! process at once.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // Second signal: stop now (only async-signal-safe calls here).
        unsafe { libc::_exit(130) };
    }
    let msg = b"\nstopping after the current step (press Ctrl-C again to stop at once)\n";
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Installs the handler for SIGINT and SIGTERM; the returned flag is set by the first signal.
pub fn install() -> &'static AtomicBool {
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &REQUESTED
}
