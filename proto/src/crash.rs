//! Crash points: named steps of the control operations where the fault
//! matrix has a process kill itself, so a test can crash it at exactly
//! that step instead of racing a `kill -9` against the operation.
//!
//! # Invariants
//!
//! * A process dies at a crash point only when the environment variable
//!   [`ENV`] named that point when the process started; otherwise
//!   [`point`] does nothing (one comparison against a value read once).
//! * Dying is `SIGKILL` sent to itself: no destructor, flush or reply runs,
//!   exactly as when the node loses the process.
//! * Point names are `<process>.<operation>.<step>` (e.g.
//!   `engine.snapshot.partial`), so a child that inherits the variable
//!   never matches a point of its parent.

use std::sync::OnceLock;

/// The variable naming the crash point, e.g.
/// `ZEBU_CRASH_AT=engine.snapshot.partial`.
pub const ENV: &str = "ZEBU_CRASH_AT";

/// Kills this process (SIGKILL) if [`ENV`] names `name`.
pub fn point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT.get_or_init(|| std::env::var(ENV).ok()).as_deref() == Some(name) {
        eprintln!(
            "{ENV}={name}: killing this process (pid {})",
            std::process::id()
        );
        // SAFETY: raise(3) only sends a signal to this process; SIGKILL
        // cannot be caught, so nothing runs after it.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}
