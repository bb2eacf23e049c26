//! Signal dispositions the `outpost` binary sets before anything else runs,
//! kept here so the unsafe call stays in the one crate allowed it.

use nix::sys::signal::{SigHandler, Signal, signal};

/// Ignores `sig` (e.g. a SIGHUP that arrives while a daemon still starts,
/// before its reload handler exists). Call it before other threads start.
pub fn ignore(sig: Signal) -> nix::Result<()> {
    // SAFETY: SIG_IGN is no handler function, so nothing runs in signal
    // context; changing a disposition is process-wide and the callers do
    // it while single-threaded.
    unsafe { signal(sig, SigHandler::SigIgn) }.map(drop)
}
