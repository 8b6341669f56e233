//! End-to-end tests of `rankstab sweep` on the tiny Llama fixture: cells, --cell, skip,
//! kill -9 and resume with identical numbers, a diverging cell that does not stop the
//! sweep, and bad configurations.
#[path = "common/sweep_config.rs"]
mod sweep_config;
use rankstab_records::{read_table, MetricRow, MomentRow};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use sweep_config::write_config;

fn sweep(cfg: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .arg("sweep")
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("runs")
}

/// A sweep in the background (stdout dropped), to be killed or signalled.
fn spawn_sweep(cfg: &Path, out: &Path, stderr: std::process::Stdio) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .arg("sweep")
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawns")
}

fn cells(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out.join("cells"))
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Tables and adapter bytes of every cell, without the wall-clock metric.
/// A cell's name, moment rows, metric rows (without seconds) and adapter file bytes.
type CellNumbers = (String, Vec<MomentRow>, Vec<MetricRow>, Vec<u8>);

fn numbers(out: &Path) -> Vec<CellNumbers> {
    cells(out)
        .iter()
        .map(|c| {
            let m: Vec<MomentRow> = read_table(&c.join("moments.csv")).expect("moments");
            let x: Vec<MetricRow> = read_table(&c.join("metrics.csv")).expect("metrics");
            let x = x
                .into_iter()
                .filter(|r| r.metric.as_str() != "seconds")
                .collect();
            let a = std::fs::read(c.join("adapters/adapter_model.safetensors")).expect("adapter");
            (
                c.file_name().expect("name").to_string_lossy().to_string(),
                m,
                x,
                a,
            )
        })
        .collect()
}

/// The 4 cells of the sweeps in `a` and `b` have the same names, moment rows, metric rows
/// (wall clock aside) and adapter bytes.
fn assert_same_numbers(a: &Path, b: &Path) {
    let (a, b) = (numbers(a), numbers(b));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!(x.1 == y.1, "{}: moments differ", x.0);
        assert!(x.2 == y.2, "{}: metrics differ", x.0);
        assert!(x.3 == y.3, "{}: adapters differ", x.0);
    }
}

#[test]
fn sweep_runs_every_cell_skips_finished_ones_and_runs_one_cell_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), "steps = 3\ncheckpoint_every = 0");
    let out = dir.path().join("s");
    let o = sweep(&cfg, &out, &["--cell", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = cells(&out);
    assert_eq!(c.len(), 1);
    assert!(c[0].ends_with("002-tiny-r8-lora-adamw-s0"), "{c:?}");
    let list = sweep(&cfg, &out, &["--list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("complete  002-tiny-r8-lora-adamw-s0")
            && list.contains("new       000-tiny-r2-lora-adamw-s0"),
        "{list}"
    );
    let o = sweep(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("3 cell(s) run, 1 already finished"),
        "{stdout}"
    );
    assert_eq!(cells(&out).len(), 4);
    let m: Vec<MomentRow> = read_table(&cells(&out)[3].join("moments.csv")).expect("rows");
    assert!(m
        .iter()
        .all(|r| r.rank == 8 && r.scaling.to_string() == "rslora" && r.model == "tiny"));
    // The same directory with another configuration is refused.
    let other = write_config(dir.path(), "steps = 4\ncheckpoint_every = 0");
    let o = sweep(&other, &out, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("different sweep"));
}

/// kill -9 in the middle of a cell, after its first checkpoint; the same command again
/// resumes it and every cell ends with the numbers of an uninterrupted sweep.
#[test]
fn kill_9_then_the_same_command_resumes_with_identical_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "steps = 60\ncheckpoint_every = 4\nprobe_every = 3",
    );
    let full = dir.path().join("full");
    let o = sweep(&cfg, &full, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = dir.path().join("killed");
    let mut child = spawn_sweep(&cfg, &out, std::process::Stdio::null());
    let target = out.join("cells/001-tiny-r2-rslora-adamw-s0/checkpoint/state.json");
    let t0 = Instant::now();
    while !target.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the sweep ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SIGKILL: no destructor, no flush.
    child.kill().expect("kill");
    child.wait().expect("reaped");
    assert_eq!(cells(&out).len(), 2);
    let o = sweep(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("1 already finished"), "{stdout}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("resumed at step") || stdout.contains("resumed at step"),
        "{stdout}{stderr}"
    );
    assert_same_numbers(&full, &out);
}

/// SIGTERM (what a cluster sends before a preemption or the time limit) in the middle of a
/// cell without periodic checkpoints: the cell finishes its step, writes a checkpoint and
/// the sweep exits with status 75; the same command again resumes there and every cell
/// ends with the numbers of an uninterrupted sweep.
#[test]
fn sigterm_stops_after_the_step_with_a_checkpoint_and_the_sweep_resumes_identically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "steps = 60\ncheckpoint_every = 0\nprobe_every = 3",
    );
    let full = dir.path().join("full");
    let o = sweep(&cfg, &full, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = dir.path().join("stopped");
    let child = spawn_sweep(&cfg, &out, std::process::Stdio::piped());
    let metrics = out.join("cells/001-tiny-r2-rslora-adamw-s0/metrics.csv");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "cell 1 did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let o = child.wait_with_output().expect("reaped");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("stops after the step in flight")
            && stderr.contains("stopped on request after step"),
        "{stderr}"
    );
    assert!(metrics
        .with_file_name("checkpoint")
        .join("state.json")
        .exists());
    assert_eq!(cells(&out).len(), 2, "the sweep stopped in cell 1");
    let o = sweep(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(all.contains("resumed at step"), "{all}");
    assert_same_numbers(&full, &out);
}

/// What runs without a Slurm: `--status` of a local sweep, `--slurm --dry-run` (the
/// script, nothing submitted), and the refusals (one line, exit 2, nothing written).
#[test]
fn status_of_a_local_sweep_the_slurm_script_and_its_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), "steps = 2\ncheckpoint_every = 0");
    let out = dir.path().join("s");
    let o = sweep(&cfg, &out, &["--cell", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let status = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rankstab"))
            .args(["sweep", "--status"])
            .arg(&out)
            .args(extra)
            .output()
            .expect("runs")
    };
    let o = status(&[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("4 cells: 1 complete, 0 diverged, 0 running, 3 pending, 0 failed"),
        "{text}"
    );
    assert!(
        text.lines().nth(1).is_some_and(|l| l.contains("complete")
            && l.contains("step      2/2")
            && l.contains("001-tiny-r2-rslora-adamw-s0")),
        "{text}"
    );
    // The script, without sbatch: every unfinished cell, and nothing recorded as submitted.
    let o = sweep(
        &cfg,
        &out,
        &[
            "--slurm",
            "--dry-run",
            "--max-parallel",
            "2",
            "--time",
            "1:00:00",
            "--device",
            "cpu",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = std::fs::read_to_string(out.join("slurm/sweep.sbatch")).expect("script");
    for want in [
        "#SBATCH --array=0,2-3%2\n",
        "#SBATCH --time=1:00:00\n",
        "#SBATCH --requeue\n",
        "--device 'cpu' --cell \"$SLURM_ARRAY_TASK_ID\"",
    ] {
        assert!(script.contains(want), "{want:?} not in\n{script}");
    }
    assert!(!out.join("slurm/jobs.json").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("slurm/sweep.toml")).expect("copy"),
        std::fs::read_to_string(&cfg).expect("config")
    );
    // Refusals: one line naming what is wrong, exit 2.
    let bad_partition = sweep(&cfg, &out, &["--slurm", "--partition", "a b"]);
    let nothing_here = Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .args(["sweep", "--status"])
        .arg(dir.path())
        .output()
        .expect("runs");
    let never_submitted = {
        let other = dir.path().join("other");
        assert!(sweep(&cfg, &other, &["--cell", "0"]).status.success());
        Command::new(env!("CARGO_BIN_EXE_rankstab"))
            .args(["sweep", "--resubmit", "--status"])
            .arg(&other)
            .output()
            .expect("runs")
    };
    let dry_alone = sweep(&cfg, &out, &["--dry-run"]);
    let too_little = sweep(&cfg, &out, &["--slurm", "--dry-run", "--mem", "1"]);
    let other_device = status(&["--resubmit", "--device", "cuda"]);
    for (o, want) in [
        (&bad_partition, "--partition \"a b\""),
        (&nothing_here, "no sweep.json"),
        (&never_submitted, "never submitted with --slurm"),
        (&dry_alone, "go with --slurm"),
        (&too_little, "--mem 1 (the cap of each task): cell 0"),
        (&other_device, "a sweep keeps one device"),
    ] {
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{want}: {e}");
        assert!(
            e.contains(want) && e.trim().lines().count() == 1,
            "{want}: {e}"
        );
    }
}

#[test]
fn a_diverging_cell_is_recorded_and_the_sweep_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), "steps = 30\ncheckpoint_every = 0");
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("sgd = 0.1", "sgd = 1e30")
        .replace("optimizers = [\"adamw\"]", "optimizers = [\"sgd\"]")
        .replace("ranks = [2, 8]", "ranks = [4]");
    std::fs::write(&cfg, text).expect("write");
    let out = dir.path().join("s");
    let o = sweep(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("2 diverged"), "{stdout}");
    for c in cells(&out) {
        let m: rankstab_records::Manifest =
            rankstab_records::read_json(&c.join("manifest.json")).expect("manifest");
        assert_eq!(m.status, rankstab_records::RunStatus::Diverged);
        assert!(m
            .note
            .as_deref()
            .is_some_and(|n| n.starts_with("diverged at step ")));
    }
    // Finished (diverged) cells are skipped on the next run.
    let o = sweep(&cfg, &out, &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 cell(s) run, 2 already finished"));
}

#[test]
fn bad_sweeps_are_one_line_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write_config(dir.path(), "steps = 2");
    let bad_key = dir.path().join("bad.toml");
    std::fs::write(
        &bad_key,
        std::fs::read_to_string(&good)
            .expect("read")
            .replace("batch = 4", "batch = 4\nbatchsize = 3"),
    )
    .expect("write");
    let bad_rank = dir.path().join("rank.toml");
    std::fs::write(
        &bad_rank,
        std::fs::read_to_string(&good)
            .expect("read")
            .replace("ranks = [2, 8]", "ranks = [0]"),
    )
    .expect("write");
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        std::fs::read_to_string(&good)
            .expect("read")
            .replace("t.txt", "nothere.txt"),
    )
    .expect("write");
    for (cfg, extra, want) in [
        (&bad_key, vec![], "batchsize"),
        (&bad_rank, vec![], "ranks"),
        (&missing, vec![], "nothere.txt"),
        (&good, vec!["--cell", "9"], "cells 0..=3"),
        (&dir.path().join("absent.toml"), vec![], "absent.toml"),
    ] {
        let out = dir.path().join("o");
        let o = sweep(cfg, &out, &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{want}: {err}");
        assert!(
            err.contains(want) && err.trim().lines().count() == 1,
            "{want}: {err}"
        );
        assert!(!out.exists(), "{want}: left a directory");
    }
}

/// `--json`: JSON lines only on stdout; `--list --json` one state per cell, then a run
/// with a step object per step, a cell object per cell and the sweep object last.
#[test]
fn sweep_json_is_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), "steps = 2\nseeds = [0]");
    let out = dir.path().join("sweep");
    let parse = |o: &Output| -> Vec<serde_json::Value> {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    };
    let listed = parse(&sweep(&cfg, &out, &["--list", "--json"]));
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|v| v["event"] == "cell_state"));
    let lines = parse(&sweep(&cfg, &out, &["--cell", "0,3", "--json"]));
    let events: Vec<&str> = lines
        .iter()
        .map(|v| v["event"].as_str().expect("event"))
        .collect();
    assert_eq!(
        events,
        ["step", "step", "cell", "step", "step", "cell", "sweep"]
    );
    assert_eq!(lines[3]["cell"], 3);
    assert_eq!(lines[5]["status"], "complete");
    assert_eq!(lines[6]["run"], 2);
}

/// An `lrs` axis: one cell per learning rate, then the lr x rank study of the model in
/// `SWEEP/transfer-MODEL/`. Its lr* curve is checked against the cells' own held-out
/// losses (the geometric mean over seeds, computed here independently), it predicts no
/// law (inconclusive) but judges c = 0, it is rewritten identically when the finished sweep
/// is run again, it is not written while cells are missing, and the report reads it.
#[test]
fn an_lrs_axis_is_an_lr_x_rank_study_the_report_reads() {
    use rankstab_theory::transfer::analyse::TransferSummary;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "steps = 3\ncheckpoint_every = 0\nseeds = [0, 1]\n[lrs]\nadamw = \"1e-3:1e-1:3\"",
    );
    let out = dir.path().join("s");
    // One cell alone: the study waits for the others.
    let o = sweep(&cfg, &out, &["--cell", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("1 of 24 cells ended"), "{stdout}");
    assert!(!out.join("transfer-tiny").exists());
    let o = sweep(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("lr x rank study of tiny"), "{stdout}");
    let names: Vec<String> = cells(&out)
        .iter()
        .map(|c| c.file_name().expect("name").to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 2 * 2 * 3 * 2, "ranks x scalings x lrs x seeds");
    assert!(
        names.contains(&"002-tiny-r2-lora-adamw-lr1.000e-2-s0".to_string()),
        "{names:?}"
    );
    let study = out.join("transfer-tiny");
    let s: TransferSummary =
        rankstab_records::read_json(&study.join("transfer.json")).expect("transfer.json");
    assert_eq!(s.model.as_deref(), Some("tiny"));
    assert_eq!(
        (s.seeds, s.steps, s.cells.len(), s.exponents.len()),
        (2, 3, 4, 2)
    );
    // The curve of each (scaling, rank): per lr, the geometric mean over the two seeds of
    // each cell's last held-out loss.
    let heldout = |name: &str| {
        let rows: Vec<MetricRow> =
            read_table(&out.join("cells").join(name).join("metrics.csv")).expect("metrics");
        rows.iter()
            .filter(|r| r.metric.as_str() == "heldout_loss")
            .max_by_key(|r| r.step)
            .expect("a held-out loss")
            .value
    };
    for c in &s.cells {
        let scaling = if c.beta == 1.0 { "lora" } else { "rslora" };
        assert_eq!(c.curve.len(), 3);
        for p in &c.curve {
            let of_seed = |seed: u64| {
                let n = names
                    .iter()
                    .find(|n| {
                        n.contains(&format!(
                            "-r{}-{scaling}-adamw-lr{:.3e}-s{seed}",
                            c.rank, p.lr
                        ))
                    })
                    .expect("the cell of this point");
                heldout(n)
            };
            let want = (0.5 * (of_seed(0).ln() + of_seed(1).ln())).exp();
            let got = p.loss.expect("no divergence here");
            assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        }
        // lr* is reported only inside the grid, at or next to the curve's minimum.
        if let Some(lr) = c.lr_opt {
            assert!(c.edge.is_none() && (1e-3..=1e-1).contains(&lr), "{lr}");
        } else {
            assert!(c.edge.is_some());
        }
    }
    // The rank the update used: each cell's last recorded stable rank of gamma B A, mean
    // over its adapters, then over seeds at the grid lr nearest lr* (at most the rank).
    let moments = |name: &str| -> Vec<MomentRow> {
        read_table(&out.join("cells").join(name).join("moments.csv")).expect("moments")
    };
    for c in s.cells.iter().filter(|c| c.lr_opt.is_some()) {
        let scaling = if c.beta == 1.0 { "lora" } else { "rslora" };
        let lr = c.lr_opt.expect("filtered").ln();
        let nearest = c
            .curve
            .iter()
            .min_by(|a, b| (a.lr.ln() - lr).abs().total_cmp(&(b.lr.ln() - lr).abs()))
            .expect("a curve")
            .lr;
        let mut per_seed = Vec::new();
        for seed in [0u64, 1] {
            let n = names
                .iter()
                .find(|n| {
                    n.contains(&format!(
                        "-r{}-{scaling}-adamw-lr{nearest:.3e}-s{seed}",
                        c.rank
                    ))
                })
                .expect("the cell");
            let rows: Vec<MomentRow> = moments(n)
                .into_iter()
                .filter(|r| r.stat.as_str() == "stable_rank")
                .collect();
            let last = rows.iter().map(|r| r.step).max().expect("a stable rank");
            let v: Vec<f64> = rows
                .iter()
                .filter(|r| r.step == last)
                .map(|r| r.value)
                .collect();
            per_seed.push(v.iter().sum::<f64>() / v.len() as f64);
        }
        let want = per_seed.iter().sum::<f64>() / 2.0;
        let got = c.stable_rank.expect("a stable rank at lr*");
        assert!((got - want).abs() < 1e-9 * want.max(1.0), "{got} vs {want}");
        assert!(got >= 1.0 - 1e-9 && got <= c.rank as f64 + 1e-9, "{got}");
    }
    for e in &s.exponents {
        assert!(e.predicted.is_nan(), "no law for a trained model");
        assert_eq!(e.outcome, rankstab_records::Outcome::Inconclusive);
        assert!(!e.reason.is_empty());
    }
    let m: rankstab_records::Manifest =
        rankstab_records::read_json(&study.join("manifest.json")).expect("manifest");
    assert_eq!(m.command, "transfer");
    assert_eq!(m.status, rankstab_records::RunStatus::Complete);
    // Derived data: the finished sweep run again rewrites the same analysis.
    let before = std::fs::read(study.join("transfer.json")).expect("read");
    let o = sweep(&cfg, &out, &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 cell(s) run, 24 already finished"));
    assert_eq!(
        std::fs::read(study.join("transfer.json")).expect("read"),
        before
    );
    // The report reads the study beside the cells.
    let report = dir.path().join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .arg("report")
        .arg(&out)
        .arg("--out")
        .arg(&report)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(report.join("report.md")).expect("report.md");
    assert!(
        md.contains("transfer (model tiny, trained in a sweep"),
        "{md}"
    );
}
