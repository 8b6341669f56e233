//! One hostile input as a table row: the command line, the exit code and message expected,
//! and the paths that must not exist afterwards.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The `rankstab` binary under test.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rankstab"));
    c.env("RUST_LOG", "warn");
    c
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tiny Llama checkpoint directory (config.json, safetensors, tokenizer).
pub fn tiny_llama() -> PathBuf {
    root().join("crates/train/tests/fixtures/tiny-llama")
}

/// One case of a table test.
pub struct Case {
    /// What the case is, for failure messages.
    pub name: String,
    /// Arguments after `rankstab`.
    pub args: Vec<String>,
    /// Expected exit code.
    pub code: i32,
    /// Fragments the (one-line) error must contain, in any case.
    pub fragments: Vec<String>,
    /// Paths that must not exist afterwards (no partial output).
    pub absent: Vec<PathBuf>,
}

impl Case {
    /// A case expecting exit code 2 and an error containing every fragment.
    pub fn err(name: &str, args: &[&str], fragments: &[&str]) -> Self {
        Self {
            name: name.into(),
            args: args.iter().map(|s| (*s).to_string()).collect(),
            code: 2,
            fragments: fragments.iter().map(|s| (*s).to_string()).collect(),
            absent: Vec::new(),
        }
    }

    /// Adds paths that must not exist after the command.
    pub fn leaves_nothing(mut self, paths: &[&Path]) -> Self {
        self.absent.extend(paths.iter().map(|p| p.to_path_buf()));
        self
    }
}

/// Runs a command with a time limit (a hostile input must not hang the tool).
pub fn run_limited(mut cmd: Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("rankstab starts");
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_end(&mut stdout);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_end(&mut stderr);
            }
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} ran past {limit:?}: a hostile input hung the tool");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs every case; collects every failure and panics once with all of them. Returns the
/// number of cases run.
pub fn run_cases(cases: &[Case]) -> usize {
    let mut failures = Vec::new();
    for case in cases {
        let mut cmd = bin();
        cmd.args(&case.args);
        let o = run_limited(cmd, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&o.stderr);
        let code = o.status.code().unwrap_or(-1);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let lower = stderr.to_lowercase();
        let mut why = Vec::new();
        if code != case.code {
            why.push(format!("exit code {code}, expected {}", case.code));
        }
        if case.code != 0 && lines.len() != 1 {
            why.push(format!("{} lines on stderr, expected one", lines.len()));
        }
        if stderr.contains("panicked") || stderr.contains("memory allocation of") {
            why.push("a panic or an abort".into());
        }
        for f in &case.fragments {
            if !lower.contains(&f.to_lowercase()) {
                why.push(format!("no {f:?} in the message"));
            }
        }
        for p in &case.absent {
            if p.exists() {
                why.push(format!("{} was left behind", p.display()));
            }
        }
        if !why.is_empty() {
            failures.push(format!(
                "{}: {} -- stderr: {}",
                case.name,
                why.join("; "),
                stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}
