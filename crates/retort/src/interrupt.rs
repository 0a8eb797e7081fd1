//! Graceful stops. The binary turns the first Ctrl-C or SIGTERM into a stop request (it sets
//! [`stop_flag`] to the signal's number from its signal handler, or calls [`request`]); long
//! stages poll [`requested`] between units of work (a batch of requests, a training step), finish
//! or drop what is in flight, flush their journal and return with what they did, so the command
//! can write its manifest with status `interrupted` and say how to resume. A second signal exits
//! at once (the binary's business); journals stay as consistent as after `kill -9`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// `SIGINT`'s number.
pub const SIGINT: i32 = 2;
/// `SIGTERM`'s number.
pub const SIGTERM: i32 = 15;

/// The signal number that asked for a stop (0: none). Setting it is async-signal-safe.
pub fn stop_flag() -> Arc<AtomicUsize> {
    static FLAG: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    Arc::clone(FLAG.get_or_init(|| Arc::new(AtomicUsize::new(0))))
}

/// Asks every running stage to stop at its next checkpoint; `signal` is the signal number (or
/// any positive value).
pub fn request(signal: i32) {
    let value = usize::try_from(signal.max(1)).unwrap_or(1);
    let _ = stop_flag().compare_exchange(0, value, Ordering::SeqCst, Ordering::SeqCst);
}

/// The signal number of a pending stop request, if any.
pub fn requested() -> Option<i32> {
    match stop_flag().load(Ordering::SeqCst) {
        0 => None,
        signal => Some(i32::try_from(signal).unwrap_or(SIGINT)),
    }
}

/// The exit code of a command stopped by `signal`: 128 + its number (130 for SIGINT, 143 for
/// SIGTERM).
pub fn exit_code(signal: i32) -> u8 {
    u8::try_from(128 + signal.clamp(1, 127)).unwrap_or(130)
}

/// Clears a stop request (tests run stages one after another in one process).
pub fn reset() {
    stop_flag().store(0, Ordering::SeqCst);
}
