//! End-to-end tests of `rankstab audit`: peft-made adapters of the tiny Llama fixture at
//! three ranks (`scripts/make_peft_fixtures.py --ranks`), one of them as a trainer's
//! checkpoint folders, audited into a run directory that `rankstab report` then reads; bad
//! input is one line, exit code 2, and nothing left behind.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/tests/fixtures")
}

fn text(dir: &Path) -> PathBuf {
    let p = dir.join("t.txt");
    let s = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
    std::fs::write(&p, s.repeat(8)).expect("write");
    p
}

fn rankstab(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .args(args)
        .output()
        .expect("runs")
}

fn copy_adapter(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

#[test]
fn audit_of_three_ranks_gives_exponents_and_a_run_the_report_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peft = fixtures().join("peft");
    // r = 8 as a trainer's output: the same adapter at steps 10 and 20.
    let trainer = dir.path().join("trainer-r8");
    copy_adapter(
        &peft.join("tiny-llama-r8-list"),
        &trainer.join("checkpoint-10"),
    );
    copy_adapter(
        &peft.join("tiny-llama-r8-list"),
        &trainer.join("checkpoint-20"),
    );
    let out = dir.path().join("audit");
    let data = text(dir.path());
    let o = rankstab(&[
        "audit".as_ref(),
        "--model".as_ref(),
        fixtures().join("tiny-llama").as_os_str(),
        "--adapters".as_ref(),
        peft.join("tiny-llama-r2-all-linear").as_os_str(),
        peft.join("tiny-llama-r4-regex").as_os_str(),
        peft.join("tiny-llama-r8-list").as_os_str(),
        trainer.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--context".as_ref(),
        "16".as_ref(),
        "--batch".as_ref(),
        "2".as_ref(),
        "--batches".as_ref(),
        "2".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("audit ").count(),
        5,
        "one progress line per adapter: {stderr}"
    );
    assert!(stdout.contains("rank exponents"), "{stdout}");
    // Ranks 2, 4, 8 of rsLoRA: exponents of fwd, grad_out, bwd and the norms at step 0.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("fwd") && l.contains("2,4,8") && l.contains("slope")),
        "{stdout}"
    );
    let m: Vec<rankstab_records::MomentRow> =
        rankstab_records::read_table(&out.join("moments.csv")).expect("moments");
    let ranks: std::collections::BTreeSet<u32> = m.iter().map(|r| r.rank).collect();
    assert_eq!(ranks.into_iter().collect::<Vec<_>>(), [2, 4, 8]);
    let steps: std::collections::BTreeSet<u32> = m.iter().map(|r| r.step).collect();
    assert_eq!(steps.into_iter().collect::<Vec<_>>(), [0, 10, 20]);
    assert!(m
        .iter()
        .all(|r| r.source == "audit" && r.scaling.to_string() == "rslora"));
    let x: Vec<rankstab_records::MetricRow> =
        rankstab_records::read_table(&out.join("metrics.csv")).expect("metrics");
    assert_eq!(
        x.iter()
            .filter(|r| r.metric.as_str() == "heldout_loss")
            .count(),
        5
    );

    // The report reads it like a training sweep.
    let rep = dir.path().join("report");
    let o = rankstab(&[
        "report".as_ref(),
        out.as_os_str(),
        "--out".as_ref(),
        rep.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The audit and its report end / open with the verdict sentences about the audit.
    assert!(
        stdout.contains("Verdict (is it rank-stable?)") && stdout.contains("[audit "),
        "{stdout}"
    );
    let html = std::fs::read_to_string(rep.join("index.html")).expect("index.html");
    let card = html.find("<section id=\"verdict\">").expect("verdict card");
    assert!(
        card < html.find("<details").unwrap_or(usize::MAX),
        "the card comes first"
    );
    let card_end = card + html[card..].find("</section>").expect("card ends");
    assert!(
        html[card..card_end].contains("audit:"),
        "{}",
        &html[card..card_end]
    );
    let exps = std::fs::read_to_string(rep.join("exponents.csv")).expect("exponents.csv");
    assert!(
        exps.lines()
            .any(|l| l.contains("fwd") && l.contains("2,4,8")),
        "{exps}"
    );

    // The same command again: the directory holds a finished audit.
    let o = rankstab(&[
        "audit".as_ref(),
        "--model".as_ref(),
        fixtures().join("tiny-llama").as_os_str(),
        "--adapters".as_ref(),
        peft.join("tiny-llama-r2-all-linear").as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out.join("manifest.json").exists(),
        "the earlier audit is kept"
    );
}

#[test]
fn bad_adapters_are_one_line_errors_and_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = text(dir.path());
    let bad = dir.path().join("bad");
    copy_adapter(&fixtures().join("peft/tiny-llama-r4-regex"), &bad);
    let cfg = std::fs::read_to_string(bad.join("adapter_config.json")).expect("read");
    let mut v: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    v["use_dora"] = true.into();
    std::fs::write(bad.join("adapter_config.json"), v.to_string()).expect("write");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    for (adapter, says) in [
        (bad.as_path(), "use_dora"),
        (empty.as_path(), "neither a PEFT adapter directory"),
    ] {
        let out = dir.path().join("out");
        // A model path that does not exist: the adapter is refused before the model is read.
        let o = rankstab(&[
            "audit".as_ref(),
            "--model".as_ref(),
            dir.path().join("no-model").as_os_str(),
            "--adapters".as_ref(),
            adapter.as_os_str(),
            "--data".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(says) && stderr.trim().lines().count() == 1,
            "{stderr}"
        );
        assert!(!out.exists(), "nothing written");
    }
}
