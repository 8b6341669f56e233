//! End-to-end tests of `rankstab report`: a theory run from the binary plus a synthetic
//! training sweep (the shared record format, one directory per cell), the printed path,
//! the default output folder, and one-line errors with exit code 2.
#[path = "../crates/report/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn rankstab(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rankstab"));
    c.args(args).env("RUST_LOG", "error");
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.output().expect("rankstab runs")
}

fn theory(dir: &Path) -> PathBuf {
    let out = dir.join("theory");
    let o = rankstab(
        &[
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
            "--moments",
            "1,2",
            "--out",
            out.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn last_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn report_of_theory_and_training_runs_prints_index_html() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let th = theory(tmp.path());
    let sweep = tmp.path().join("sweep");
    common::write_train_sweep(&sweep);
    let out = tmp.path().join("report");
    let o = rankstab(
        &[
            "report",
            th.to_str().expect("utf-8"),
            sweep.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = PathBuf::from(last_line(&o));
    assert_eq!(printed, out.join("index.html"));
    assert!(printed.is_file());
    assert!(out.join("report.md").is_file() && out.join("exponents.csv").is_file());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("31 run directories used, 0 not used"),
        "{stdout}"
    );
    let html = std::fs::read_to_string(&printed).expect("html");
    assert!(html.contains("Training runs") && html.contains("Theory run theory"));
    // The training fits are judged by the rule: the fixture's law rows agree at step 1.
    assert!(
        html.contains(
            "of the 6 fits that can tell their law from a rival: 6 agree, 0 disagree, 0 inconclusive"
        ) && html.contains("per-layer fits, a family of their own: of the 12 fits that can tell their law from a rival: 12 agree"),
        "no training headline"
    );
    // ... and the command says so on its last screen.
    assert!(
        stdout.contains(
            "Verdicts, training (30 runs): of the 6 fits that can tell their law from a rival: 6 agree"
        ) && stdout.contains("Verdicts, theory theory: "),
        "{stdout}"
    );
    // ... and in plain sentences, one per source and setting: the fixture's law holds.
    assert!(
        stdout.contains("Verdict (is it rank-stable?):")
            && stdout.contains("* [train AGREES] Under AdamW (training tiny-llama")
            && stdout.contains("the theorem's prediction holds for every fit.")
            && stdout.contains("* [theory "),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(out.join("exponents.csv")).expect("csv");
    let header = csv.lines().next().expect("header");
    for col in [
        "law",
        "band",
        "diff",
        "outcome",
        "rivals",
        "rivals_rejected",
    ] {
        assert!(header.split(',').any(|c| c == col), "{col}: {header}");
    }
    assert!(!header.split(',').any(|c| c == "agrees"), "{header}");
    // The repository's proofs/ are found from the binary's location and linked relatively.
    assert!(
        html.replace("&#x2f;", "/")
            .contains("proofs/theorem-3.2-sgd.md"),
        "no proofs link"
    );
    // --json: the same report as one JSON line, with the same sentences.
    let out2 = tmp.path().join("report-json");
    let o = rankstab(
        &[
            "report",
            th.to_str().expect("utf-8"),
            sweep.to_str().expect("utf-8"),
            "--out",
            out2.to_str().expect("utf-8"),
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
    assert_eq!(v["event"], "report");
    assert_eq!(v["used"], 31);
    assert_eq!(v["index_html"].as_str(), out2.join("index.html").to_str());
    let sentences = v["verdict"].as_array().expect("verdict");
    assert!(sentences
        .iter()
        .any(|s| s["source"] == "train" && s["outcome"] == "agrees"));
}

#[test]
fn report_of_an_audit_directory_finds_nested_cells_quietly() {
    // `make audit` calls `rankstab report runs/audit-STAMP` on theory/ and sweep/cells/*/.
    let tmp = tempfile::tempdir().expect("tempdir");
    let audit = tmp.path().join("audit-20240101-000000");
    theory(&audit);
    let cells = common::write_audit_sweep(&audit);
    let out = tmp.path().join("report");
    let o = rankstab(
        &[
            "report",
            audit.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(&format!(
            "{} run directories used, 1 not used",
            cells.len() + 1
        )),
        "{stdout}"
    );
    // One line, for the cell that has not started; nothing about sweep.json, cells/,
    // checkpoint/ or logs/ as such.
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("not started"), "{stderr}");
    assert!(
        !stderr.contains("checkpoint") && !stderr.contains("logs"),
        "{stderr}"
    );
    let html = std::fs::read_to_string(out.join("index.html")).expect("html");
    assert!(html.contains("diverged at step 25"));
}

#[test]
fn default_output_is_reports_time_and_unusable_dirs_are_listed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let th = theory(tmp.path());
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let o = rankstab(
        &[
            "report",
            th.to_str().expect("utf-8"),
            empty.to_str().expect("utf-8"),
        ],
        Some(tmp.path()),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = last_line(&o);
    assert!(
        printed.starts_with("reports/") && printed.ends_with("/index.html"),
        "{printed}"
    );
    assert!(tmp.path().join(&printed).is_file());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("not used") && stderr.contains("empty") && stderr.contains("manifest.json"),
        "{stderr}"
    );
}

#[test]
fn errors_are_one_line_with_exit_code_2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("no-such-run");
    let out = tmp.path().join("out");
    for args in [
        vec![
            "report",
            missing.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
        ],
        // The bands are derived now: --tolerance is gone, and an unknown flag is a usage error.
        vec![
            "report",
            missing.to_str().expect("utf-8"),
            "--tolerance",
            "0.1",
        ],
        vec!["report", missing.to_str().expect("utf-8"), "--windows", "0"],
    ] {
        let o = rankstab(&args, None);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("rankstab: error:"), "{stderr}");
        if args.contains(&"--tolerance") {
            assert!(stderr.contains("--tolerance"), "{stderr}");
        }
    }
    let o = rankstab(
        &[
            "report",
            missing.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-run"));
    assert!(!out.exists(), "nothing is written when nothing is usable");
    // A run of another schema version is named with the reason.
    let th = tmp.path().join("old");
    std::fs::create_dir_all(&th).expect("mkdir");
    std::fs::write(th.join("manifest.json"), r#"{"schema_version": 99}"#).expect("write");
    let o = rankstab(&["report", th.to_str().expect("utf-8")], Some(tmp.path()));
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("schema version 99"), "{stderr}");
}
