//! Guards against careless and hostile inputs around run directories: bounded reads of
//! regular files only ([`read_regular`], [`open_regular`]), paths confined to a directory
//! ([`confined`]), the exclusive lock of a run directory ([`RunLock`]) and the machine's
//! available memory ([`available_memory`], [`check_memory`]).
//!
//! Every error names the path and what is allowed, on one line.
use crate::{RecordsError, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

fn invalid(path: &Path, msg: impl Into<String>) -> RecordsError {
    RecordsError::Invalid {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RecordsError + '_ {
    move |source| RecordsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A human size: "1.5 GiB", "12 MiB", "300 B".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Opens `path` for reading if it is a regular file (symbolic links are followed) of at
/// most `max_bytes`; returns the file and its length. Devices, FIFOs, sockets and
/// directories are refused before they are opened, so a FIFO cannot block and `/dev/zero`
/// cannot fill memory.
///
/// # Errors
/// [`RecordsError::Invalid`] naming the path and the limit; I/O errors.
pub fn open_regular(path: &Path, max_bytes: u64) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, FIFO or socket)"
        };
        return Err(invalid(
            path,
            format!("is {what}: only regular files are read"),
        ));
    }
    if meta.len() > max_bytes {
        return Err(invalid(
            path,
            format!(
                "is {} ({} bytes), more than the {} this file may hold",
                human_bytes(meta.len()),
                meta.len(),
                human_bytes(max_bytes)
            ),
        ));
    }
    let file = File::open(path).map_err(io_err(path))?;
    // The file may have been swapped between the check and the open: check what was opened.
    let opened = file.metadata().map_err(io_err(path))?;
    if !opened.is_file() || opened.len() > max_bytes {
        return Err(invalid(path, "changed while it was opened: not read"));
    }
    Ok((file, opened.len()))
}

/// Reads a regular file of at most `max_bytes` ([`open_regular`]); reading stops at the
/// limit even if the file grows meanwhile.
///
/// # Errors
/// As [`open_regular`].
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, max_bytes)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > max_bytes {
        return Err(invalid(path, "grew while it was read: not read"));
    }
    Ok(bytes)
}

/// [`read_regular`] as UTF-8 text (a leading byte-order mark is dropped).
///
/// # Errors
/// As [`read_regular`]; text that is not UTF-8 (with the byte offset).
pub fn read_regular_text(path: &Path, max_bytes: u64) -> Result<String> {
    let bytes = read_regular(path, max_bytes)?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        invalid(
            path,
            format!(
                "is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// `dir.join(rel)` if `rel` is a relative path that stays inside `dir` (no `..`, no root,
/// no prefix) and, when it exists, does not resolve (through symbolic links) outside it.
///
/// # Errors
/// [`RecordsError::Invalid`] naming `rel` and `dir`.
pub fn confined(dir: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    let outside = || {
        invalid(
            &dir.join(rel),
            format!(
                "{rel:?} points outside {}: only files inside the model directory are read",
                dir.display()
            ),
        )
    };
    if rel.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(outside());
    }
    let joined = dir.join(p);
    if let (Ok(real), Ok(base)) = (joined.canonicalize(), dir.canonicalize()) {
        if !real.starts_with(&base) {
            return Err(outside());
        }
    }
    Ok(joined)
}

/// Name of the lock file inside a locked directory.
pub const LOCK_FILE: &str = ".rankstab.lock";

/// An exclusive (or shared) advisory lock on a directory, held while this value lives and
/// released by the operating system when the process ends however it ends. The lock file
/// records the holder's pid and host, which the error of a second process names.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

/// The holder's description written into a lock file.
fn holder_line() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".into());
    format!("pid {} on {host}", std::process::id())
}

impl RunLock {
    /// Takes the exclusive lock of `dir` (created if absent) without waiting.
    ///
    /// # Errors
    /// [`RecordsError::Locked`] when another process holds it (naming its pid and host);
    /// I/O errors.
    pub fn exclusive(dir: &Path) -> Result<Self> {
        Self::take(dir, false, false)
    }

    /// Takes a shared lock of `dir` (created if absent) without waiting: any number of
    /// shared holders, no exclusive one.
    ///
    /// # Errors
    /// As [`Self::exclusive`].
    pub fn shared(dir: &Path) -> Result<Self> {
        Self::take(dir, true, false)
    }

    /// Takes the exclusive lock of `dir`, waiting for other holders (for short critical
    /// sections, e.g. writing a sweep's `sweep.json`).
    ///
    /// # Errors
    /// I/O errors.
    pub fn wait_exclusive(dir: &Path) -> Result<Self> {
        Self::take(dir, false, true)
    }

    fn take(dir: &Path, shared: bool, wait: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let got = match (shared, wait) {
            (_, true) => file
                .lock()
                .map(|()| true)
                .map_err(std::fs::TryLockError::Error),
            (true, false) => file.try_lock_shared().map(|()| true),
            (false, false) => file.try_lock().map(|()| true),
        };
        let got = match got {
            Ok(g) => g,
            Err(std::fs::TryLockError::WouldBlock) => false,
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        };
        if !got {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.lines().next().unwrap_or("").trim().to_string();
            return Err(RecordsError::Locked {
                path: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    "another process".into()
                } else {
                    holder
                },
            });
        }
        if !shared {
            // Only an exclusive holder rewrites the holder line (shared holders would race).
            file.set_len(0).map_err(io_err(&path))?;
            file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
            writeln!(file, "{}", holder_line()).map_err(io_err(&path))?;
        } else if file.metadata().map(|m| m.len() == 0).unwrap_or(false) {
            let _ = writeln!(file, "{} (shared)", holder_line());
        }
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// Who holds the exclusive lock of `dir` (the holder line of its lock file: pid and host),
/// or None when nobody does or there is no lock file. Probes with a shared lock, released
/// at once; writes nothing.
pub fn lock_holder(dir: &Path) -> Option<String> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            None
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let line = holder.lines().next().unwrap_or("").trim();
            Some(if line.is_empty() {
                "another process".into()
            } else {
                line.to_string()
            })
        }
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Refuses `dir` while another process holds its exclusive lock, naming the holder: the
/// commands call this before they judge what a directory holds, so that a run that has
/// taken its lock but not yet written its manifest is reported as in use, not as a
/// foreign directory. Writes nothing.
///
/// # Errors
/// [`RecordsError::Locked`] while an exclusive holder lives.
pub fn refuse_if_held(dir: &Path) -> Result<()> {
    match lock_holder(dir) {
        Some(holder) => Err(RecordsError::Locked {
            path: dir.to_path_buf(),
            holder,
        }),
        None => Ok(()),
    }
}

/// Whether a directory holds nothing but (possibly) a lock file.
///
/// # Errors
/// I/O errors reading `dir`.
pub fn is_empty_dir(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(true);
    }
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_name() != LOCK_FILE {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The memory available to a new allocation on this machine, in bytes: `MemAvailable` of
/// `/proc/meminfo` (Linux), else `None`.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses a memory size: a number of bytes with an optional unit `K`, `M`, `G`, `T`
/// (powers of 1024; `KiB`/`KB` spellings accepted), e.g. `16G`, `512MiB`, `1000000`.
///
/// # Errors
/// A message saying what is allowed.
pub fn parse_memory(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a memory size (e.g. 16G, 512M, 1000000)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        u => {
            return Err(format!(
                "{text:?}: unknown unit {u:?} (allowed: K, M, G, T, or none for bytes)"
            ))
        }
    };
    let bytes = value * mult as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < 2f64.powi(62)) {
        return Err(format!(
            "{text:?} is not a memory size between 1 byte and 4 EiB"
        ));
    }
    Ok(bytes as u64)
}

/// Compares an up-front memory estimate with the cap (`max`, e.g. from `--max-memory`) or,
/// without one, the machine's available memory; `what` says what the estimate covers
/// (e.g. "the theory run (trials x cells)").
///
/// # Errors
/// A one-line message with the estimate, the limit and how to override it.
pub fn check_memory(
    what: &str,
    estimate: u64,
    max: Option<u64>,
) -> std::result::Result<(), String> {
    let (limit, whose) = match max {
        Some(m) => (m, "the --max-memory cap"),
        None => match available_memory() {
            Some(a) => (a, "this machine's available memory"),
            None => return Ok(()),
        },
    };
    if estimate > limit {
        return Err(format!(
            "{what} needs about {} of memory, more than {whose} ({}): choose smaller sizes, or pass --max-memory with a larger value to run it anyway",
            human_bytes(estimate),
            human_bytes(limit)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_holder_is_named_while_held_and_none_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(lock_holder(dir.path()), None, "no lock file");
        let lock = RunLock::exclusive(dir.path()).expect("lock");
        let who = lock_holder(dir.path()).expect("held");
        assert!(
            who.contains(&format!("pid {}", std::process::id())),
            "{who}"
        );
        // A file beside the lock (a run that has not written its manifest yet) does not
        // change the answer: in use.
        std::fs::write(dir.path().join("partial.tmp"), b"x").expect("write");
        let err = refuse_if_held(dir.path()).expect_err("held").to_string();
        assert!(
            err.contains(&format!("in use by pid {}", std::process::id())),
            "{err}"
        );
        drop(lock);
        assert_eq!(lock_holder(dir.path()), None, "released");
        refuse_if_held(dir.path()).expect("released");
        // A shared holder is not an exclusive one (a sweep's tasks share its directory).
        let _shared = RunLock::shared(dir.path()).expect("shared");
        assert_eq!(lock_holder(dir.path()), None);
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "\u{feff}hello").expect("write");
        assert_eq!(read_regular_text(&p, 100).expect("read"), "hello");
        let e = read_regular(&p, 3).expect_err("too big").to_string();
        assert!(
            e.contains("a.txt") && e.contains("more than the 3 B"),
            "{e}"
        );
        let e = read_regular(dir.path(), 100).expect_err("dir").to_string();
        assert!(e.contains("a directory"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 100)
            .expect_err("device")
            .to_string();
        assert!(
            e.contains("/dev/zero") && e.contains("not a regular file"),
            "{e}"
        );
        std::fs::write(&p, [0xff, 0xfe, 0x41]).expect("write");
        let e = read_regular_text(&p, 100)
            .expect_err("not utf8")
            .to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 0"), "{e}");
    }

    #[test]
    fn paths_stay_in_their_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(confined(dir.path(), "model-00001.safetensors").is_ok());
        assert!(confined(dir.path(), "sub/x.bin").is_ok());
        for bad in ["../outside/x", "/etc/passwd", "a/../../b", ""] {
            let e = confined(dir.path(), bad).expect_err(bad).to_string();
            assert!(e.contains("outside"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_second_exclusive_lock_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("run");
        let first = RunLock::exclusive(&run).expect("first");
        assert!(is_empty_dir(&run).expect("empty"));
        let e = RunLock::exclusive(&run).expect_err("held").to_string();
        assert!(
            e.contains("run") && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        assert!(RunLock::shared(&run).is_err());
        drop(first);
        let s1 = RunLock::shared(&run).expect("shared");
        let s2 = RunLock::shared(&run).expect("shared twice");
        assert!(RunLock::exclusive(&run).is_err());
        drop((s1, s2));
        assert!(RunLock::exclusive(&run).is_ok());
    }

    #[test]
    fn memory_sizes_parse_and_estimates_are_compared() {
        assert_eq!(parse_memory("16G"), Ok(16 << 30));
        assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory("1000"), Ok(1000));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("5X")
            .expect_err("unit")
            .contains("unknown unit"));
        assert!(check_memory("x", 10, Some(20)).is_ok());
        let e = check_memory("the run", 30 << 30, Some(1 << 30)).expect_err("over");
        assert!(
            e.contains("30.0 GiB") && e.contains("1.0 GiB") && e.contains("--max-memory"),
            "{e}"
        );
        assert_eq!(human_bytes(300), "300 B");
    }
}
