//! Helpers shared by the benchmarks of this crate (forward.rs, train_step.rs): the
//! environment, memory measures, the reference side's Python, and the results file.
use std::path::{Path, PathBuf};
use std::process::Command;

/// What every measurement records, on both sides (the JSON fields the Python scripts
/// print too); each benchmark's record flattens it in and adds its own.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Run {
    /// Who ran: "rankstab (tch)", "transformers", ...
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Sequences per pass.
    pub batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// Threads.
    pub threads: usize,
    /// Seconds to load the model.
    pub load_s: f64,
    /// Median seconds per timed repetition.
    pub median_s: f64,
    /// batch x context / median_s.
    pub tokens_per_s: f64,
    /// Resident memory after loading (and the warm-up), MB.
    pub rss_loaded_mb: f64,
}

impl Run {
    /// A run of `(batch, context)` tokens per timed repetition; the throughput follows
    /// from the median time.
    pub fn new(
        implementation: &str,
        (batch, context): (usize, usize),
        threads: usize,
        load_s: f64,
        median_s: f64,
        rss_loaded_mb: f64,
    ) -> Self {
        Self {
            implementation: implementation.to_string(),
            batch,
            context,
            threads,
            load_s,
            median_s,
            tokens_per_s: (batch * context) as f64 / median_s,
            rss_loaded_mb,
        }
    }
}

/// An integer from the environment, or `default` when unset or not a number.
pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A memory field of `/proc/self/status` (e.g. "VmHWM", "VmRSS") in MB; NaN if absent.
pub fn status_mb(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field).and_then(|r| {
                r.trim_start_matches(':')
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The median (upper median for an even count) of a non-empty sample.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Whether this is a smoke run: `cargo test --all-targets` runs the benchmarks without
/// `--bench`, to prove they work without timing them.
pub fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// The assets folder: RANKSTAB_ASSETS, or assets/ at the repository root.
pub fn assets() -> PathBuf {
    std::env::var_os("RANKSTAB_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
}

/// Whether benchmark `bench` must skip because one of `paths` (assets) is absent; says
/// which.
pub fn missing(bench: &str, paths: &[&Path]) -> bool {
    match paths.iter().find(|p| !p.exists()) {
        Some(p) => {
            println!(
                "{bench}: SKIPPED: {} is absent; run scripts/fetch-assets.sh",
                p.display()
            );
            true
        }
        None => false,
    }
}

/// The number of cores (the default thread count of both sides).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Writes a benchmark's results to target/rankstab-bench/<name>.json (best effort: the
/// printed table is the result, the file a copy).
pub fn write_result(name: &str, value: &serde_json::Value) {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/rankstab-bench");
    if std::fs::create_dir_all(&out).is_ok() {
        let _ = std::fs::write(
            out.join(format!("{name}.json")),
            serde_json::to_string_pretty(value).unwrap_or_default(),
        );
    }
}

/// The parsed last JSON line of a measuring process's standard output; `what` names the
/// process in errors.
pub fn parse_output<T: serde::de::DeserializeOwned>(
    what: &str,
    out: &std::process::Output,
) -> Result<T, String> {
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("no JSON from {what}"))?;
    serde_json::from_str(line).map_err(|e| format!("{what} output {line:?}: {e}"))
}

/// The Python of the reference side: RANKSTAB_PYTHON (default python3), with
/// RANKSTAB_PYTHONPATH as its PYTHONPATH.
pub struct Python {
    exe: String,
}

impl Python {
    /// The interpreter the environment names.
    pub fn from_env() -> Self {
        Self {
            exe: std::env::var("RANKSTAB_PYTHON").unwrap_or_else(|_| "python3".into()),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        if let Ok(pp) = std::env::var("RANKSTAB_PYTHONPATH") {
            cmd.env("PYTHONPATH", pp);
        }
        cmd
    }

    /// Runs `script` (in benches/) with `args` after checking that `modules` import, and
    /// parses the JSON line it prints; offline, without progress bars or warnings.
    pub fn run<T: serde::de::DeserializeOwned>(
        &self,
        script: &str,
        modules: &[&str],
        args: &[String],
    ) -> Result<T, String> {
        let python = &self.exe;
        let probe = self
            .command()
            .args(["-c", &format!("import {}", modules.join(", "))])
            .output()
            .map_err(|e| format!("{python}: {e}"))?;
        if !probe.status.success() {
            return Err(format!(
                "{} cannot be imported by {python} (set RANKSTAB_PYTHONPATH): {}",
                modules.join(", "),
                String::from_utf8_lossy(&probe.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
        }
        let out = self
            .command()
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error")
            .env("TQDM_DISABLE", "1")
            .env("PYTHONWARNINGS", "ignore")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("benches")
                    .join(script),
            )
            .args(args)
            .output()
            .map_err(|e| format!("{python}: {e}"))?;
        parse_output(&format!("the {script} run"), &out)
    }
}
