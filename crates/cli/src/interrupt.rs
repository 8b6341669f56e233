//! SIGINT, SIGTERM and SIGHUP end a command with one line that says what was running and
//! how to resume it. Every run directory is written crash-safely (whole rows, atomic
//! documents, progress records), so ending at once loses at most the unit of work in
//! flight; the run directory's lock is released by the operating system.
//!
//! While a training run that can resume is in flight ([`checkpoint_on_signal`]: sweep
//! cells, `train --checkpoint-every`), the first signal does not end the process: it asks
//! the run to stop after the step in flight with a checkpoint ([`rankstab_train::stop`]),
//! which is what a cluster's SIGTERM before a preemption or a time limit needs; the command
//! then exits with [`EXIT_STOPPED`]. A second signal ends it at once.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The exit status of a command stopped by a signal after writing a checkpoint
/// (`EX_TEMPFAIL`: run it again to resume; the Slurm task script requeues on it).
pub const EXIT_STOPPED: u8 = 75;

/// What is running: (command as typed, run directory).
static RUNNING: Mutex<Option<(String, String)>> = Mutex::new(None);
/// Whether the first signal asks for a checkpoint instead of ending the process.
static CHECKPOINT: AtomicBool = AtomicBool::new(false);

/// From now on, the first SIGINT/SIGTERM/SIGHUP asks the training run in flight to stop
/// after its step with a checkpoint (true), or ends the process at once (false).
pub fn checkpoint_on_signal(on: bool) {
    CHECKPOINT.store(on, Ordering::SeqCst);
}

/// Installs the handler (once, at start-up).
pub fn install() {
    let result = ctrlc::set_handler(|| {
        let running = RUNNING
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        if CHECKPOINT.load(Ordering::SeqCst) && !rankstab_train::stop::requested() {
            rankstab_train::stop::request();
            let dir = running.map_or_else(String::new, |(_, d)| format!(" in {d}"));
            eprintln!(
                "rankstab: signal received: the run{dir} stops after the step in flight and writes a checkpoint (a second signal ends it at once)"
            );
            return;
        }
        match running {
            Some((cmd, dir)) => eprintln!(
                "rankstab: interrupted: the run in {dir} stopped at its last completed unit of work; run the same {cmd} command again to resume it"
            ),
            None => eprintln!("rankstab: interrupted"),
        }
        // _exit, not exit: exit would run libtorch's static destructors while the main
        // thread is still inside libtorch, which then fails with an internal assertion
        // and a panic trace after this line.
        exit_now(130);
    });
    if let Err(e) = result {
        tracing::warn!("cannot install the interrupt handler: {e}");
    }
}

/// Records that `command` is running into `dir` (for the interrupt message).
pub fn running(dir: &Path, command: &str) {
    if let Ok(mut g) = RUNNING.lock() {
        *g = Some((command.to_string(), dir.display().to_string()));
    }
}

/// Ends the process at once, without running exit handlers (`_exit(2)`).
#[allow(unsafe_code)]
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` takes no pointers, cannot fail and never returns; it is
    // async-signal-safe and sound to call from any thread at any time.
    unsafe { libc::_exit(code) }
}
