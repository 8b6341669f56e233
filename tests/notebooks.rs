//! Executes every notebook in notebooks/ headless (nbclient + ipykernel from the pinned
//! install in `.deps/notebooks`, see scripts/notebook-requirements.txt): on the committed
//! example run, and on the example plus a synthetic training sweep nested as `make audit`
//! leaves it (so the training branches and the search for nested runs run too). A notebook
//! that raises fails the test.
//!
//! Skips with a message when the pinned packages are not installed, unless
//! `RANKSTAB_REQUIRE_PYTHON=1` (then it fails).
#[path = "../crates/report/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const RUNNER: &str = r#"
import sys, nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
nb = nbformat.read(sys.argv[1], as_version=4)
try:
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
except CellExecutionError as e:
    sys.exit(f"{sys.argv[1]}: {e}")
figures = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
print(f"{sys.argv[1]}: executed, {figures} figures")
# What the notebook printed, for the tests to check.
print("".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"))
"#;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The pinned install, or `None` (after a message) when the test should skip.
fn deps() -> Option<PathBuf> {
    let deps = root().join(".deps/notebooks");
    let ok = ["nbclient", "ipykernel", "matplotlib", "pandas"]
        .iter()
        .all(|p| deps.join(p).is_dir())
        && Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(deps);
    }
    let msg = "notebook packages missing in .deps/notebooks: python3 -m pip install --no-deps --target .deps/notebooks -r scripts/notebook-requirements.txt";
    if std::env::var("RANKSTAB_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED notebooks: {msg} (set RANKSTAB_REQUIRE_PYTHON=1 to make this a failure)");
    None
}

fn notebooks() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("notebooks"))
        .expect("notebooks/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "ipynb"))
        .collect();
    v.sort();
    v
}

/// One notebook kernel at a time: Jupyter picks a kernel's ports by binding port 0 and
/// letting it go before the kernel binds it again, so two kernels started at once (the two
/// tests run in parallel) can pick the same port ("Address already in use", seen once).
static ONE_KERNEL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Executes every notebook on `runs`; returns what each printed.
fn execute(deps: &Path, runs: &[PathBuf], scratch: &Path) -> Vec<String> {
    let _one = ONE_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    let mut printed = Vec::new();
    let joined = std::env::join_paths(runs).expect("paths");
    for nb in notebooks() {
        let o = Command::new("python3")
            .args(["-c", RUNNER])
            .arg(&nb)
            .arg(root().join("notebooks"))
            .env("PYTHONPATH", deps)
            .env("RANKSTAB_RUNS", &joined)
            // (No MPLBACKEND: the kernel draws with matplotlib-inline, headless, and keeps the PNGs.)
            // Keep Jupyter's and IPython's state out of the home directory.
            .env("JUPYTER_RUNTIME_DIR", scratch.join("runtime"))
            .env("JUPYTER_DATA_DIR", scratch.join("data"))
            .env("JUPYTER_CONFIG_DIR", scratch.join("config"))
            .env("IPYTHONDIR", scratch.join("ipython"))
            .env("MPLCONFIGDIR", scratch.join("mpl"))
            .env("JUPYTER_PLATFORM_DIRS", "1")
            .output()
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{} failed on {runs:?}:\n{}\n{}",
            nb.display(),
            stdout,
            String::from_utf8_lossy(&o.stderr)
        );
        let figures: usize = stdout
            .split(", ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(figures > 0, "{} drew no figure: {stdout}", nb.display());
        printed.push(stdout.into_owned());
    }
    printed
}

#[test]
fn notebooks_run_on_the_committed_example() {
    let Some(deps) = deps() else { return };
    assert!(
        notebooks().len() >= 2,
        "notebooks/ should hold the notebooks"
    );
    let scratch = tempfile::tempdir().expect("tempdir");
    execute(
        &deps,
        &[root().join("reports/example/runs/theory-small")],
        scratch.path(),
    );
}

#[test]
fn notebooks_run_on_theory_and_training_runs() {
    let Some(deps) = deps() else { return };
    let scratch = tempfile::tempdir().expect("tempdir");
    // A sweep as `make audit` nests it (sweep.json, cells/<cell>/checkpoint/, a running and
    // a diverged cell), given as the folder above it: the notebooks find the cells.
    let audit = scratch.path().join("audit");
    let cells = common::write_audit_sweep(&audit);
    let printed = execute(
        &deps,
        &[root().join("reports/example/runs/theory-small"), audit],
        scratch.path(),
    );
    for out in printed {
        // Every cell is loaded (one line each), checkpoint/ and logs/ are not runs.
        for c in &cells {
            let name = c.file_name().and_then(|n| n.to_str()).expect("name");
            assert!(
                out.contains(&format!("cells/{name}: train")),
                "{name} not loaded:\n{out}"
            );
        }
        assert!(out.contains("r64-lora-adamw-s0: train, diverged"), "{out}");
        assert!(!out.contains("not used"), "{out}");
    }
}
