//! A request to stop training at the end of the step in flight, with a checkpoint.
//!
//! A cluster scheduler warns a task before it kills it (Slurm sends SIGTERM, then SIGKILL
//! after `KillWait`, or `--signal=B:TERM@120` seconds before the time limit); the command
//! line turns that signal into [`request`]. [`crate::trainer::train`] looks at the request
//! after every step: it writes a checkpoint there, whatever `checkpoint_every` says, and
//! returns [`crate::TrainError::Stopped`]. Run again, the run resumes from that checkpoint
//! and ends with the numbers of an uninterrupted run (the checkpoint tests show it).
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks every training loop in this process to stop at the end of its step in flight.
/// Async-signal-safe (one atomic store).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested.
#[must_use]
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Withdraws the request (tests; a process that goes on after a stop).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}
