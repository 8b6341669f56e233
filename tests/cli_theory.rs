//! End-to-end tests of `rankstab theory`: a small run, its files and their readers
//! (pandas, polars), bad input, and resume after kill -9.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rankstab"))
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("rankstab runs")
}

fn small(out: &Path) -> Vec<String> {
    [
        "theory",
        "--width",
        "64",
        "--ranks",
        "4,8,16,32",
        "--trials",
        "3",
        "--steps",
        "2",
        "--batch",
        "4",
        "--heldout",
        "8",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

fn args_ref(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn small_run_writes_a_complete_run_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let o = run(&args_ref(&small(&out)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("that can tell their law from a rival")
            && stdout.contains("What the data rule out"),
        "{stdout}"
    );
    assert!(stdout.contains("Run directory:"), "{stdout}");
    // The run ends with the verdict in sentences, one per optimizer and input regime, after
    // the tables.
    let verdict = stdout
        .find("Verdict (is it rank-stable?):")
        .unwrap_or_else(|| panic!("no verdict sentences: {stdout}"));
    assert!(verdict > stdout.find("Run directory:").expect("tables first"));
    let sentences: Vec<&str> = stdout[verdict..]
        .lines()
        .filter(|l| l.starts_with("* [theory "))
        .collect();
    assert!(sentences.len() >= 2, "{stdout}");
    for s in &sentences {
        assert!(
            s.contains("Under SGD (theory checker") || s.contains("Under Adam (theory checker"),
            "{s}"
        );
        assert!(s.contains(" trials): "), "{s}");
        let lower = s.to_lowercase();
        assert!(
            lower.contains("rank-stable here") || lower.contains("not resolved here"),
            "no answer to the question: {s}"
        );
    }
    for f in [
        "manifest.json",
        "moments.csv",
        "metrics.csv",
        "summary.csv",
        "fits.json",
        "checks.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).expect("read"))
            .expect("json");
    assert_eq!(manifest["status"], "complete");
    assert_eq!(manifest["config"]["width"], 64);
    assert_eq!(manifest["seeds"].as_array().map(Vec::len), Some(3));
    let fits: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("fits.json")).expect("read"))
            .expect("json");
    assert!(!fits.is_empty());
    for key in [
        "optimizer",
        "beta",
        "inputs",
        "site",
        "m",
        "step",
        "slope",
        "ci_low",
        "ci_high",
        "predicted",
        "verdict",
        "law",
        "band",
        "outcome",
        "rivals",
    ] {
        assert!(fits[0].get(key).is_some(), "fits.json lacks '{key}'");
    }
    // The default optimizers (SGD and Adam) and scalings (lora, rslora, constant) are all there.
    for opt in ["sgd", "adam"] {
        for s in ["lora", "rslora", "constant"] {
            assert!(
                fits.iter()
                    .any(|f| f["optimizer"] == opt && f["scaling"] == s),
                "{opt}/{s}"
            );
        }
    }
}

#[test]
fn json_output_matches_fits_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let mut a = small(&out);
    a.push("--json".into());
    let o = run(&args_ref(&a));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("fits.json")).expect("read"))
            .expect("json");
    // One line, one object: the run directory and fits.json's fits.
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim().lines().count(), 1);
    assert_eq!(printed["event"], "theory");
    assert_eq!(printed["fits"], file);
}

fn python() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let deps = root.join(".deps/python");
    if deps.join("pandas").exists() && deps.join("polars").exists() {
        Some((PathBuf::from("python3"), deps))
    } else if std::env::var("RANKSTAB_REQUIRE_PYTHON").is_ok() {
        panic!("pandas/polars missing in .deps/python: run `bash scripts/setup.sh --python`");
    } else {
        eprintln!("SKIPPED: pandas/polars not installed (bash scripts/setup.sh --python)");
        None
    }
}

#[test]
fn tables_load_directly_in_pandas_and_polars() {
    let Some((py, deps)) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let o = run(&args_ref(&small(&out)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = r#"
import sys, json, pandas as pd, polars as pl
d = sys.argv[1]
for name in ["moments.csv", "metrics.csv", "summary.csv"]:
    a = pd.read_csv(f"{d}/{name}")
    b = pl.read_csv(f"{d}/{name}")
    assert len(a) == b.height > 0, name
    assert list(a.columns) == b.columns, name
m = pd.read_csv(f"{d}/moments.csv")
for col in ["source", "model", "module", "layer", "rank", "alpha", "scaling", "beta", "optimizer", "seed", "step", "site", "stat", "m", "value"]:
    assert col in m.columns, col
assert m["value"].dtype.kind == "f" and m["rank"].dtype.kind == "i"
assert pl.read_csv(f"{d}/moments.csv")["value"].dtype == pl.Float64
f = pd.DataFrame(json.load(open(f"{d}/fits.json")))
assert {"slope", "ci_low", "ci_high", "predicted"} <= set(f.columns)
# The fits are recomputable from the long table: mean over seeds, log-log slope.
import numpy as np
one = f[(f.site == "fwd") & (f.stat == "abs") & (f.m == 2) & (f.optimizer == "sgd") & (f.scaling == "rslora") & (f.inputs == "coherent") & (f.step == 2)].iloc[0]
sel = m[(m.site == "fwd") & (m.stat == "abs") & (m.m == 2) & (m.optimizer == "sgd") & (m.scaling == "rslora") & (m.inputs == "coherent") & (m.step == 2)]
g = sel.groupby("rank")["value"].mean()
slope = np.polyfit(np.log(g.index.values), np.log(g.values), 1)[0]
assert abs(slope - one.slope) < 1e-9, (slope, one.slope)
# The Parquet copy (written here by the test: this run is below the 4 MiB threshold) holds
# the CSV's rows, columns, types and values, as polars reads them.
p = pl.read_parquet(f"{d}/copy.parquet")
c = pl.read_csv(f"{d}/moments.csv")
assert p.columns == c.columns and p.height == c.height
assert p["value"].dtype == pl.Float64 and p["rank"].dtype == pl.Int64 and p["site"].dtype == pl.String
assert p["m"].null_count() == c["m"].null_count()
assert p.equals(c.with_columns(pl.col("m").cast(pl.Int64))), "values differ"
print("ok", len(m))
"#;
    rankstab_records::parquet_copy::write_parquet(
        &out.join("moments.csv"),
        &out.join("copy.parquet"),
    )
    .expect("parquet copy");
    let o = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(&out)
        .env("PYTHONPATH", deps)
        .output()
        .expect("python runs");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Bad input: one line naming the value, exit code 2, nothing written.
#[test]
fn bad_input_is_one_clear_line_and_exit_2_with_no_run_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "widht = 64\n").expect("write");
    let garbage_toml = dir.path().join("garbage.toml");
    std::fs::write(&garbage_toml, "width = [\n").expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--ranks".into(), "0,4".into()], "rank 0"),
        (vec!["--ranks".into(), "".into()], "rank"),
        (vec!["--alpha".into(), "inf".into()], "alpha"),
        (vec!["--alpha".into(), "NaN".into()], "alpha"),
        (vec!["--betas".into(), "nan".into()], "beta"),
        (vec!["--lr".into(), "-0.1".into()], "learning rate"),
        (vec!["--moments".into(), "0".into()], "m = 0"),
        (
            vec!["--dist".into(), "student-t:3".into()],
            "no moment of order 4",
        ),
        (vec!["--width".into(), "0".into()], "width 0"),
        (
            vec![
                "--ranks".into(),
                "4,128".into(),
                "--width".into(),
                "64".into(),
            ],
            "rank 128 exceeds the width",
        ),
        (
            vec![
                "--config".into(),
                dir.path().join("missing.toml").display().to_string(),
            ],
            "missing.toml",
        ),
        (
            vec!["--config".into(), bad_toml.display().to_string()],
            "widht",
        ),
        (
            vec!["--config".into(), garbage_toml.display().to_string()],
            "garbage.toml",
        ),
        (vec!["--optimizers".into(), "rmsprop".into()], "rmsprop"),
        (vec!["--scalings".into(), "bogus".into()], "bogus"),
        (vec!["--dist".into(), "cauchy".into()], "cauchy"),
        (vec!["--steps".into(), "0".into()], "steps = 0"),
    ];
    for (i, (extra, needle)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let mut a: Vec<String> = vec!["theory".into()];
        if !extra.iter().any(|e| e == "--width") {
            a.extend(["--width".into(), "64".into()]);
        }
        if !extra.iter().any(|e| e == "--ranks") {
            a.extend(["--ranks".into(), "4,8".into()]);
        }
        a.extend(extra.iter().cloned());
        a.extend(["--out".into(), out.display().to_string()]);
        let o = run(&args_ref(&a));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains(needle),
            "{extra:?}: stderr {err:?} lacks {needle:?}"
        );
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{extra:?}: not one line: {err}");
        assert!(!out.exists(), "{extra:?}: a run directory was created");
    }
}

#[test]
fn help_shows_examples() {
    let o = run(&["theory", "--help"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("Examples:") && s.contains("rankstab theory --width"),
        "{s}"
    );
}

#[test]
fn an_existing_run_with_another_config_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    assert!(run(&args_ref(&small(&out))).status.success());
    let mut a = small(&out);
    a.extend(["--seed".into(), "9".into()]);
    let o = run(&args_ref(&a));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("different configuration"));
}

/// kill -9 in the middle of a run, then the same command again: it resumes and ends with
/// exactly the numbers of an uninterrupted run.
#[test]
fn kill_then_rerun_resumes_to_identical_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |out: &Path| -> Vec<String> {
        [
            "theory",
            "--width",
            "256",
            "--ranks",
            "4,16,64,256",
            "--trials",
            "16",
            "--steps",
            "3",
            "--threads",
            "1",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
    };
    let whole = dir.path().join("whole");
    assert!(run(&args_ref(&args(&whole))).status.success());

    let cut = dir.path().join("cut");
    let mut child = bin()
        .args(args(&cut))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let progress = cut.join("progress.json");
    let t0 = std::time::Instant::now();
    let mut killed_mid_run = false;
    while t0.elapsed() < std::time::Duration::from_secs(120) {
        if let Ok(text) = std::fs::read_to_string(&progress) {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let done = v["done"].as_array().map_or(0, Vec::len);
            if (2..16).contains(&done) {
                child.kill().expect("kill -9");
                killed_mid_run = true;
                break;
            }
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.wait();
    assert!(
        killed_mid_run,
        "the run finished before it could be killed: make it longer"
    );
    assert!(!cut.join("fits.json").exists());
    let o = run(&args_ref(&args(&cut)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "fits.json",
        "checks.json",
        "moments.csv",
        "metrics.csv",
        "summary.csv",
    ] {
        let a = std::fs::read(whole.join(f)).expect("read");
        let b = std::fs::read(cut.join(f)).expect("read");
        assert!(a == b, "{f} differs after resume");
    }
}

/// The committed example's theory run is what this rankstab computes from its configuration:
/// every fit's slope (to 1e-6: another CPU may round differently), outcome and verdict, and
/// every closed-form check's relative difference. A change that moves the example's numbers
/// must regenerate it (README, "The report").
#[test]
fn the_committed_example_theory_run_is_reproduced() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let example = root.join("reports/example/runs/theory-small");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("run");
    let config = root.join("reports/example/theory-small.toml");
    let o = run(&[
        "theory",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |dir: &Path, file: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(file)).expect(file)).expect(file)
    };
    for (file, number, labels) in [
        (
            "fits.json",
            "slope",
            &["outcome", "verdict", "predicted"][..],
        ),
        ("checks.json", "rel_diff", &["within"][..]),
    ] {
        let (want, got) = (read(&example, file), read(&out, file));
        let (want, got) = (want.as_array().expect(file), got.as_array().expect(file));
        assert_eq!(want.len(), got.len(), "{file}");
        for (w, g) in want.iter().zip(got) {
            let (a, b) = (w[number].as_f64(), g[number].as_f64());
            assert!(
                matches!((a, b), (Some(a), Some(b)) if (a - b).abs() < 1e-6) || a == b,
                "{file}: {w} vs {g}"
            );
            for l in labels {
                match (w[l].as_f64(), g[l].as_f64()) {
                    (Some(a), Some(b)) => assert!((a - b).abs() < 1e-6, "{file} {l}: {w} vs {g}"),
                    _ => assert_eq!(w[l], g[l], "{file} {l}"),
                }
            }
        }
    }
}
