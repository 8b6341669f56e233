//! End-to-end tests of `rankstab train` on the tiny Llama fixture.
use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/tests/fixtures/tiny-llama")
}

fn text(dir: &Path) -> PathBuf {
    let p = dir.join("t.txt");
    let s = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
    std::fs::write(&p, s.repeat(8)).expect("write");
    p
}

#[test]
fn train_writes_a_run_directory_in_the_shared_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .args(["train", "--model"])
        .arg(model())
        .arg("--data")
        .arg(text(dir.path()))
        .args([
            "--rank",
            "4",
            "--scaling",
            "lora",
            "--optimizer",
            "sgd",
            "--lr",
            "0.1",
            "--steps",
            "6",
            "--context",
            "16",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: Vec<rankstab_records::MomentRow> =
        rankstab_records::read_table(&out.join("moments.csv")).expect("moments");
    assert!(m.iter().all(|r| r.source == "train"
        && r.rank == 4
        && r.scaling.to_string() == "lora"
        && r.optimizer.as_str() == "sgd"));
    assert!(m
        .iter()
        .any(|r| r.site.as_str() == "bwd" && r.step == 5 && r.value > 0.0));
    let x: Vec<rankstab_records::MetricRow> =
        rankstab_records::read_table(&out.join("metrics.csv")).expect("metrics");
    assert!(x.iter().any(|r| r.metric.as_str() == "heldout_perplexity"));
    assert!(x.iter().any(|r| r.metric.as_str() == "grad_norm_avg"));
    let manifest: rankstab_records::Manifest =
        rankstab_records::read_json(&out.join("manifest.json")).expect("manifest");
    assert_eq!(manifest.status, rankstab_records::RunStatus::Complete);
    assert!(out.join("adapters/adapter_model.safetensors").exists());
    // Not on a terminal (a pipe here): one plain progress line per step, no colour codes.
    let err = String::from_utf8_lossy(&o.stderr);
    for k in 1..=6 {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("train: step {k}/6 loss "))
                    && l.contains("tokens/s")),
            "no progress line for step {k}: {err}"
        );
    }
    assert!(
        !err.contains('\x1b'),
        "colour codes in a piped log: {err:?}"
    );
    // Held-out rows after steps 5 (eval_every 10 > steps: the last step only), none at step 0.
    let held: Vec<u32> = x
        .iter()
        .filter(|r| r.metric.as_str() == "heldout_loss")
        .map(|r| r.step)
        .collect();
    assert_eq!(held, vec![5]);
    // The revision the binary was built from, as `--version` prints it.
    let v = Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .arg("--version")
        .output()
        .expect("runs");
    let version = String::from_utf8_lossy(&v.stdout);
    if let Some(rev) = &manifest.git_revision {
        assert!(version.contains(rev.as_str()), "{version} vs {rev}");
        assert!(
            rev.len() >= 40 && rev[..40].chars().all(|c| c.is_ascii_hexdigit()),
            "{rev}"
        );
    } else {
        assert!(version.contains("git unknown"), "{version}");
    }
}

#[test]
fn train_bad_input_is_one_line_exit_2_and_no_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = text(dir.path());
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").expect("write");
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (vec!["--rank", "0"], &t, "rank 0"),
        (
            vec!["--rank", "4", "--target-modules", "qkv"],
            &t,
            "available: down_proj",
        ),
        // Not an optimizer at all (refused by the argument parser), and one of the
        // vocabulary that the trainer does not implement.
        (
            vec!["--rank", "4", "--optimizer", "lion"],
            &t,
            "unknown optimizer 'lion' (allowed: sgd",
        ),
        (
            vec!["--rank", "4", "--optimizer", "adam"],
            &t,
            "adamw or sgd",
        ),
        (
            vec!["--rank", "4", "--scaling", "weird"],
            &t,
            "lora, rslora",
        ),
        (vec!["--rank", "4"], &short, "window"),
        (vec!["--rank", "99"], &t, "rank 99 is not allowed"),
    ];
    for (i, (extra, data, needle)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let o = Command::new(env!("CARGO_BIN_EXE_rankstab"))
            .args(["train", "--model"])
            .arg(model())
            .arg("--data")
            .arg(data)
            .args(["--steps", "2", "--context", "16"])
            .args(&extra)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?}: left a run directory");
    }
}

/// The run's TensorBoard event file, read by TensorBoard's own reader (its
/// EventAccumulator, which checks every record's CRC-32C): the training loss per step equals
/// metrics.csv's, and the per-adapter moments are there. Needs .deps/python (setup.sh
/// --python); skipped without it unless RANKSTAB_REQUIRE_PYTHON is set.
#[test]
fn train_writes_tensorboard_events_that_tensorboard_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let deps = root.join(".deps/python");
    if !deps.join("tensorboard").exists() {
        assert!(
            std::env::var("RANKSTAB_REQUIRE_PYTHON").is_err(),
            "tensorboard missing in .deps/python: run `bash scripts/setup.sh --python`"
        );
        eprintln!("SKIPPED: tensorboard not installed (bash scripts/setup.sh --python)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .args(["train", "--model"])
        .arg(model())
        .arg("--data")
        .arg(text(dir.path()))
        .args([
            "--rank",
            "4",
            "--steps",
            "4",
            "--context",
            "16",
            "--eval-every",
            "2",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = r#"
import sys, json
from tensorboard.backend.event_processing import event_accumulator
ea = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
ea.Reload()
tags = ea.Tags()["scalars"]
out = {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags}
print(json.dumps(out))
"#;
    let py = Command::new("python3")
        .env("PYTHONPATH", &deps)
        .arg("-c")
        .arg(script)
        .arg(out.join("tensorboard"))
        .output()
        .expect("python3 runs");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let tb: std::collections::BTreeMap<String, Vec<(i64, f64)>> =
        serde_json::from_slice(&py.stdout).expect("json");
    let x: Vec<rankstab_records::MetricRow> =
        rankstab_records::read_table(&out.join("metrics.csv")).expect("metrics");
    let want: Vec<(i64, f64)> = x
        .iter()
        .filter(|r| r.metric.as_str() == "loss")
        .map(|r| (i64::from(r.step), r.value))
        .collect();
    let got = &tb["metrics/loss"];
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for ((s1, v1), (s2, v2)) in got.iter().zip(&want) {
        assert_eq!(s1, s2);
        // TensorBoard keeps scalars as f32.
        assert!((v1 - v2).abs() <= 1e-6 * v2.abs().max(1.0), "{v1} vs {v2}");
    }
    let held: Vec<i64> = tb["metrics/heldout_loss"].iter().map(|p| p.0).collect();
    assert_eq!(held, vec![1, 3]);
    assert!(tb.contains_key("speed/tokens_per_second"));
    let fwd = tb.keys().filter(|k| k.starts_with("fwd_abs2/")).count();
    let bwd = tb.keys().filter(|k| k.starts_with("bwd_abs2/")).count();
    // Every attention and MLP linear of the tiny Llama's 2 blocks: 7 modules each.
    assert_eq!((fwd, bwd), (14, 14), "{:?}", tb.keys().collect::<Vec<_>>());
}

/// `--json`: stdout is JSON lines only, one `step` object per step then the `train` object.
#[test]
fn train_json_is_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .args(["train", "--model"])
        .arg(model())
        .arg("--data")
        .arg(text(dir.path()))
        .args([
            "--rank",
            "4",
            "--steps",
            "3",
            "--context",
            "16",
            "--json",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let events: Vec<&str> = lines
        .iter()
        .map(|v| v["event"].as_str().expect("event"))
        .collect();
    assert_eq!(events, ["step", "step", "step", "train"]);
    assert_eq!(lines[2]["step"], 2);
    assert!(lines[2]["heldout_loss"].as_f64().is_some());
    let last = &lines[3];
    assert_eq!(last["status"], "complete");
    assert_eq!(last["run_dir"].as_str(), out.to_str());
    let h = last["heldout_loss"].as_f64().expect("heldout");
    assert!((last["heldout_perplexity"].as_f64().expect("ppl") / h.exp() - 1.0).abs() < 1e-9);
}
