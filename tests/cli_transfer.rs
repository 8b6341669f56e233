//! End-to-end tests of `rankstab transfer`: a small study, its files, its JSON line and its
//! verdict sentences; bad values exit 2 with one line and write nothing.
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .arg("transfer")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("rankstab runs")
}

const SMALL: &[&str] = &[
    "--optimizers",
    "sgd",
    "--scalings",
    "lora,rslora",
    "--ranks",
    "2,8,32",
    "--width",
    "64",
    "--widths",
    "",
    "--seeds",
    "3",
    "--steps",
    "60",
    "--lrs-sgd",
    "1e-3:1e1:13",
    "--bootstrap",
    "200",
];

#[test]
fn a_small_study_writes_its_tables_and_says_what_it_found() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let o = run(&[SMALL, &["--out", out.to_str().unwrap()]].concat());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for f in [
        "manifest.json",
        "transfer_runs.csv",
        "transfer_steps.csv",
        "transfer.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // 2 scalings x 3 ranks x 13 lrs x 3 seeds.
    let rows = std::fs::read_to_string(out.join("transfer_runs.csv")).unwrap();
    assert_eq!(rows.lines().count(), 1 + 2 * 3 * 13 * 3);
    let header = rows.lines().next().unwrap();
    for col in ["lr", "rank", "final_loss", "diverged", "init", "lr_ratio"] {
        assert!(header.split(',').any(|c| c == col), "{header}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("transfer.json")).unwrap()).unwrap();
    for k in [
        "optimizer",
        "beta",
        "init",
        "lr_ratio",
        "width",
        "rank",
        "lr_opt",
        "lr_opt_ci_low",
        "lr_opt_ci_high",
        "loss_at_opt",
    ] {
        assert!(v["cells"][0].get(k).is_some(), "cells lack {k}");
    }
    for k in [
        "optimizer",
        "beta",
        "init",
        "lr_ratio",
        "width",
        "slope",
        "ci_low",
        "ci_high",
        "predicted",
        "outcome",
    ] {
        assert!(v["exponents"][0].get(k).is_some(), "exponents lack {k}");
    }
    assert!(stdout.contains("Exponent c of lr*"), "{stdout}");
    assert!(
        stdout.contains("Under SGD, standard LoRA (init a; ranks 2..32, 3 seeds): lr* ~ r^"),
        "{stdout}"
    );
    // Progress off a terminal: a line per seed.
    assert!(stderr.contains("transfer: seed 3/3 ("), "{stderr}");
    // Again: resumed (nothing to do), same tables.
    let before = std::fs::read(out.join("transfer_runs.csv")).unwrap();
    let o = run(&[SMALL, &["--out", out.to_str().unwrap(), "--json"]].concat());
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(out.join("transfer_runs.csv")).unwrap(),
        before
    );
    let line = String::from_utf8_lossy(&o.stdout);
    assert_eq!(line.trim().lines().count(), 1, "{line}");
    let j: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(j["event"], "transfer");
    assert!(j["verdict"].as_array().is_some_and(|v| !v.is_empty()));
}

fn refused(args: &[&str], needle: &str, dir: &Path) {
    let out = dir.join("never");
    let o = run(&[args, &["--out", out.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(2), "{args:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
}

#[test]
fn bad_values_exit_2_with_one_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        &["--lrs", "1:0.1:5"],
        "learning-rate grid '1:0.1:5'",
        dir.path(),
    );
    refused(&["--lrs", "1e-3:1e3:2"], "3 <= N", dir.path());
    refused(&["--ranks", "2,4"], "at least three ranks", dir.path());
    refused(
        &["--ranks", "2,4,512", "--width", "64"],
        "rank 512 exceeds the width 64",
        dir.path(),
    );
    refused(&["--lr-ratio", "0"], "lr ratio 0", dir.path());
    refused(&["--seeds", "1"], "seeds = 1", dir.path());
    refused(&["--widths", "64,x"], "'x' is not a width", dir.path());
    refused(&["--adapter-init", "c"], "adapter init", dir.path());
}
