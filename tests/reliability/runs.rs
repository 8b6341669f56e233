//! Run directories and the checker: two processes on one `--out`, damaged tables, sizes
//! refused before they are allocated, interrupts, and the report's output directory.
use super::harness::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A small theory run (about a second in a debug build).
const SMALL: &[&str] = &[
    "theory",
    "--width",
    "32",
    "--ranks",
    "4,8,16",
    "--trials",
    "3",
    "--steps",
    "1",
    "--optimizers",
    "sgd",
    "--scalings",
    "lora,rslora",
    "--inputs",
    "coherent",
    "--moments",
    "2",
];

/// A theory run that takes several seconds (so a second process can meet it running).
const SLOW: &[&str] = &[
    "theory",
    "--width",
    "256",
    "--ranks",
    "4,8,16,32",
    "--trials",
    "24",
    "--steps",
    "2",
    "--optimizers",
    "sgd,adam",
    "--scalings",
    "lora,rslora",
    "--inputs",
    "coherent,fresh",
    "--moments",
    "2",
    "--threads",
    "1",
];

fn args_with_out(base: &[&str], out: &Path) -> Vec<String> {
    let mut a: Vec<String> = base.iter().map(|s| (*s).to_string()).collect();
    a.push("--out".into());
    a.push(out.display().to_string());
    a
}

fn spawn(args: &[String]) -> Child {
    bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rankstab starts")
}

/// Sends `sig` (`-STOP`, `-CONT`, ...) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let sent = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {sig} {pid}");
}

/// A process stopped (SIGSTOP) until this is dropped (SIGCONT, also when an assertion
/// fails meanwhile). The tests that start a second process on a run's folder stop the
/// first one meanwhile: a tiny model's run can otherwise end before the second process has
/// started, on a loaded machine (seen once in `make test`: "holds a finished run" instead
/// of "in use"). A stopped process keeps its lock.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal(pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Waits until a process holds the exclusive lock of `dir` (the lock file alone is not
/// enough: a process stopped between creating it and locking it holds nothing).
fn wait_for_lock(dir: &Path, limit: Duration) {
    let t0 = Instant::now();
    while rankstab_records::guard::lock_holder(dir).is_none() {
        assert!(
            t0.elapsed() < limit,
            "nobody took the lock of {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `path` exists.
fn wait_for(path: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ok(args: &[String]) -> String {
    let o = run_limited(
        {
            let mut c = bin();
            c.args(args);
            c
        },
        Duration::from_secs(600),
    );
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn two_theory_runs_on_one_out_one_runs_and_the_other_exits_2_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let args = args_with_out(SLOW, &out);
    let mut first = spawn(&args);
    wait_for_lock(&out, Duration::from_secs(60));
    // The first run is stopped while the second tries (see `Stopped`).
    let stopped = Stopped::new(first.id());
    let t0 = Instant::now();
    let o = run_limited(
        {
            let mut c = bin();
            c.args(&args);
            c
        },
        Duration::from_secs(60),
    );
    let took = t0.elapsed();
    drop(stopped);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is in use by pid") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        took < Duration::from_secs(10),
        "the second process waited {took:?}"
    );
    let status = first.wait().expect("first ends");
    assert!(status.success(), "the first run failed");
    // The first run's numbers are those of a run alone.
    let alone = dir.path().join("alone");
    ok(&args_with_out(SLOW, &alone));
    for f in ["fits.json", "moments.csv", "checks.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).expect("read"),
            std::fs::read(alone.join(f)).expect("read"),
            "{f} differs from the run alone"
        );
    }
    let m: rankstab_records::Manifest =
        rankstab_records::read_json(&out.join("manifest.json")).expect("manifest");
    assert_eq!(m.status, rankstab_records::RunStatus::Complete);
    let rows = m.tables.get("moments.csv").expect("sizes recorded").rows;
    let lines = std::fs::read_to_string(out.join("moments.csv"))
        .expect("read")
        .lines()
        .count() as u64;
    assert_eq!(rows + 1, lines);
}

/// A run that has taken its lock but not yet written its manifest (here: this test process
/// holds the lock of a folder with one half-written file) is in use, for every command
/// that writes a run folder: not "not a run directory", and the folder is left as it was.
/// Deterministic twin of the two-process tests above (which once met this window).
#[test]
fn a_locked_folder_without_a_manifest_is_in_use_for_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "A short text for a tiny model. ".repeat(40)).expect("write");
    let cfg = sweep_config(dir.path());
    let commands: Vec<(&str, Vec<String>)> = vec![
        ("theory", SMALL.iter().map(|s| (*s).to_string()).collect()),
        (
            "train",
            [
                "train",
                "--model",
                &tiny_llama().display().to_string(),
                "--data",
                &text.display().to_string(),
                "--rank",
                "4",
                "--steps",
                "2",
                "--context",
                "16",
                "--batch",
                "2",
            ]
            .iter()
            .map(|s| (*s).to_string())
            .collect(),
        ),
        (
            "sweep",
            vec!["sweep".into(), "--config".into(), cfg.display().to_string()],
        ),
    ];
    for (name, base) in commands {
        let out = dir.path().join(format!("{name}-run"));
        let lock = rankstab_records::RunLock::exclusive(&out).expect("lock");
        std::fs::write(out.join("half-written.tmp"), b"x").expect("write");
        let try_out = || {
            let mut c = bin();
            c.args(args_with_out(
                &base.iter().map(String::as_str).collect::<Vec<_>>(),
                &out,
            ));
            run_limited(c, Duration::from_secs(120))
        };
        let o = try_out();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains(&format!("in use by pid {}", std::process::id())),
            "{name}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [rankstab_records::guard::LOCK_FILE, "half-written.tmp"],
            "{name}"
        );
        drop(lock);
        // Released, the same folder is a foreign one: refused as such.
        let o = try_out();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name} released: {err}");
        assert!(!err.contains("in use"), "{name} released: {err}");
    }
}

#[test]
fn two_train_runs_on_one_out_one_runs_and_the_other_exits_2_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. "
            .repeat(40),
    )
    .expect("write");
    let out = dir.path().join("run");
    let args: Vec<String> = [
        "train",
        "--model",
        &tiny_llama().display().to_string(),
        "--data",
        &text.display().to_string(),
        "--rank",
        "4",
        "--steps",
        "40",
        "--context",
        "16",
        "--batch",
        "2",
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    let mut first = spawn(&args);
    wait_for_lock(&out, Duration::from_secs(60));
    // The first run is stopped while the second tries (see `Stopped`).
    let stopped = Stopped::new(first.id());
    let t0 = Instant::now();
    let o = run_limited(
        {
            let mut c = bin();
            c.args(&args);
            c
        },
        Duration::from_secs(60),
    );
    let took = t0.elapsed();
    drop(stopped);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("in use by pid {}", first.id())),
        "{err}"
    );
    assert!(took < Duration::from_secs(10));
    assert!(first.wait().expect("first ends").success());
    // One row per key: no step written twice.
    let rows: Vec<rankstab_records::MomentRow> =
        rankstab_records::read_table(&out.join("moments.csv")).expect("no duplicate rows");
    assert!(rows.iter().any(|r| r.step == 39));
    let metrics: Vec<rankstab_records::MetricRow> =
        rankstab_records::read_table(&out.join("metrics.csv")).expect("no duplicate rows");
    assert_eq!(
        metrics
            .iter()
            .filter(|r| r.step == 0 && r.metric == rankstab_records::Metric::Loss)
            .count(),
        1
    );
}

#[test]
fn damaged_tables_of_a_finished_run_are_refused_by_rerun_and_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let args = args_with_out(SMALL, &out);
    ok(&args);
    let moments = out.join("moments.csv");
    let text = std::fs::read_to_string(&moments).expect("read");
    let report_out = dir.path().join("report");
    let report = |name: &str| {
        Case::err(
            name,
            &[
                "report",
                &out.display().to_string(),
                "--out",
                &report_out.display().to_string(),
            ],
            &["run", "damaged", "moments.csv"],
        )
        .leaves_nothing(&[&report_out])
    };
    // Cut in half (at a line boundary: no partial line that a reader would drop).
    let lines: Vec<&str> = text.lines().collect();
    let half = lines[..lines.len() / 2].join("\n") + "\n";
    std::fs::write(&moments, &half).expect("write");
    let rerun = Case {
        name: "rerun of a finished run whose moments.csv was cut".into(),
        args: args.clone(),
        code: 2,
        fragments: vec!["moments.csv".into(), "rows".into(), "recorded".into()],
        absent: vec![],
    };
    run_cases(&[rerun, report("report on a cut table")]);
    // Whole again, then rows appended twice over (as two writers leave them).
    std::fs::write(&moments, &text).expect("write");
    ok(&args);
    let mut doubled = text.clone();
    doubled.push_str(&lines[1..].join("\n"));
    doubled.push('\n');
    std::fs::write(&moments, &doubled).expect("write");
    run_cases(&[report("report on a doubled table")]);
    // A running run (no sizes recorded yet) with duplicate rows: the reader names the lines.
    let mut m: rankstab_records::Manifest =
        rankstab_records::read_json(&out.join("manifest.json")).expect("manifest");
    m.status = rankstab_records::RunStatus::Running;
    m.tables.clear();
    rankstab_records::write_json_atomic(&out.join("manifest.json"), &m).expect("write");
    run_cases(&[Case::err(
        "report on a running run with duplicate rows",
        &[
            "report",
            &out.display().to_string(),
            "--out",
            &report_out.display().to_string(),
        ],
        &["damaged", "repeats line 2"],
    )
    .leaves_nothing(&[&report_out])]);
}

#[test]
fn theory_sizes_are_refused_before_they_are_allocated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let o = out.display().to_string();
    let toml = dir.path().join("deep.toml");
    std::fs::write(&toml, "layers = 4294967297\nwidth = 64\nranks = [4, 8]\n").expect("write");
    let t = toml.display().to_string();
    // Width 64 and ranks 4,8 unless the case sets them.
    let with = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec!["theory".into(), "--out".into(), o.clone()];
        for (flag, default) in [("--width", "64"), ("--ranks", "4,8")] {
            if !extra.contains(&flag) {
                a.extend([flag.to_string(), default.to_string()]);
            }
        }
        a.extend(extra.iter().map(|s| (*s).to_string()));
        a
    };
    let case = |name: &str, extra: &[&str], frags: &[&str]| {
        let mut c = Case::err(name, &[], frags).leaves_nothing(&[&out]);
        c.args = with(extra);
        c
    };
    let cases = vec![
        case(
            "--layers 2^32+1",
            &["--layers", "4294967297"],
            &["layers = 4294967297", "1..=1024"],
        ),
        case(
            "--batch 2^32+1",
            &["--batch", "4294967297"],
            &["batch = 4294967297", "1..="],
        ),
        case(
            "--heldout 2^32+1",
            &["--heldout", "4294967297"],
            &["heldout = 4294967297"],
        ),
        case(
            "--classes 2^32+1",
            &["--loss", "ce", "--classes", "4294967297"],
            &["classes = 4294967297"],
        ),
        case("--trials 0", &["--trials", "0"], &["trials = 0"]),
        case(
            "--trials absurd",
            &["--trials", "99999999"],
            &["trials = 99999999"],
        ),
        case(
            "--steps absurd",
            &["--steps", "99999999"],
            &["steps = 99999999"],
        ),
        case(
            "--threads 0",
            &["--threads", "0"],
            &["--threads 0", "1..=1024"],
        ),
        case(
            "--threads huge",
            &["--threads", "100000"],
            &["--threads 100000"],
        ),
        case(
            "--layers from TOML",
            &["--config", &t],
            &["layers = 4294967297"],
        ),
        case(
            "a run larger than --max-memory",
            &["--max-memory", "1M"],
            &["needs about", "--max-memory cap (1.0 MiB)"],
        ),
        case(
            "--max-memory not a size",
            &["--max-memory", "lots"],
            &["lots", "memory size"],
        ),
        case(
            "--ranks 4 alone",
            &["--ranks", "4"],
            &["at least two ranks"],
        ),
        case("--width 0", &["--width", "0"], &["width 0"]),
        case(
            "--width beyond the maximum",
            &["--width", "65537"],
            &["width 65537", "65536"],
        ),
    ];
    // The documented maximum width is refused on a machine without the memory, with the
    // estimate (four width x width matrices of f32 at 65536 are 64 GiB).
    let mut cases = cases;
    let available = rankstab_records::guard::available_memory().unwrap_or(0);
    if available < 60 << 30 {
        cases.push(case(
            "--width 65536 on this machine",
            &["--width", "65536", "--ranks", "4,8"],
            &["needs about", "available memory", "--max-memory"],
        ));
    }
    run_cases(&cases);
}

#[test]
fn usage_errors_are_one_line_and_name_the_argument() {
    let cases = vec![
        Case::err(
            "eval without --model",
            &["eval", "--text", "x.txt"],
            &["--model"],
        ),
        Case::err("an unknown flag", &["theory", "--widht", "4"], &["--widht"]),
        Case::err(
            "a value that is not a number",
            &["theory", "--width", "wide"],
            &["wide", "--width"],
        ),
        Case::err("an unknown subcommand", &["theroy"], &["theroy"]),
    ];
    run_cases(&cases);
}

#[test]
fn a_report_is_not_written_into_a_run_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    ok(&args_with_out(SMALL, &out));
    let before: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("read")
        .map(|e| e.expect("entry").path())
        .collect();
    let o = out.display().to_string();
    let inside = out.join("report").display().to_string();
    run_cases(&[
        Case::err(
            "--out is the run directory",
            &["report", &o, "--out", &o],
            &["inside the run directory"],
        ),
        Case::err(
            "--out inside the run directory",
            &["report", &o, "--out", &inside],
            &["inside"],
        )
        .leaves_nothing(&[&out.join("report")]),
    ]);
    let after: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("read")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(before.len(), after.len(), "the run directory changed");
}

#[test]
fn an_interrupt_says_how_to_resume_and_the_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let args = args_with_out(SLOW, &out);
    let child = spawn(&args);
    // Interrupt after the first trial is recorded.
    wait_for(&out.join("progress.json"), Duration::from_secs(120));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let o = child.wait_with_output().expect("ends");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted")
            && err.contains(&out.display().to_string())
            && err.contains("resume"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{err}"
    );
    ok(&args);
    let alone = dir.path().join("alone");
    ok(&args_with_out(SLOW, &alone));
    assert_eq!(
        std::fs::read(out.join("fits.json")).expect("read"),
        std::fs::read(alone.join("fits.json")).expect("read")
    );
}

#[test]
fn a_theory_run_resumed_with_another_configuration_is_refused_on_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let args = args_with_out(SMALL, &out);
    let one_trial: Vec<String> = args
        .iter()
        .map(|a| if a == "3" { "1".to_string() } else { a.clone() })
        .collect();
    ok(&one_trial);
    run_cases(&[Case {
        name: "resume with other trials".into(),
        args,
        code: 2,
        fragments: vec!["different configuration".into(), "another --out".into()],
        absent: vec![],
    }]);
}

/// A small sweep of the tiny Llama: 4 cells of 30 steps.
fn sweep_config(dir: &Path) -> PathBuf {
    let text = dir.join("t.txt");
    std::fs::write(
        &text,
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. "
            .repeat(40),
    )
    .expect("write");
    let cfg = dir.join("sweep.toml");
    std::fs::write(
        &cfg,
        format!(
            "data = {:?}\nranks = [2, 8]\nscalings = [\"lora\", \"rslora\"]\noptimizers = [\"adamw\"]\n\
             steps = 30\nbatch = 4\nmicro_batch = 2\ncontext = 16\nalpha = 8.0\neval_every = 10\nheldout_fraction = 0.2\n\
             [lr]\nadamw = 0.01\nsgd = 0.1\n[[models]]\nname = \"tiny\"\npath = {:?}\n",
            text.display().to_string(),
            tiny_llama().display().to_string()
        ),
    )
    .expect("write");
    cfg
}

/// The moment and metric rows (without wall-clock seconds) of every cell of a sweep.
fn sweep_numbers(out: &Path) -> Vec<(String, String, String)> {
    let mut cells: Vec<PathBuf> = std::fs::read_dir(out.join("cells"))
        .expect("cells")
        .map(|e| e.expect("entry").path())
        .collect();
    cells.sort();
    cells
        .iter()
        .map(|c| {
            let metrics: String = std::fs::read_to_string(c.join("metrics.csv"))
                .expect("metrics")
                .lines()
                .filter(|l| !l.contains(",seconds,"))
                .collect::<Vec<_>>()
                .join("\n");
            (
                c.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read_to_string(c.join("moments.csv")).expect("moments"),
                metrics,
            )
        })
        .collect()
}

#[test]
fn two_sweeps_on_one_out_one_runs_and_the_other_exits_2_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = sweep_config(dir.path());
    let out = dir.path().join("sweep");
    let args: Vec<String> = [
        "sweep",
        "--config",
        &cfg.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    let mut first = spawn(&args);
    wait_for_lock(&out, Duration::from_secs(60));
    // The first sweep is stopped while the others try (see `Stopped`).
    let stopped = Stopped::new(first.id());
    for extra in [None, Some("1")] {
        // A second whole sweep, and a task running one cell beside the whole sweep.
        let mut c = bin();
        c.args(&args);
        if let Some(cell) = extra {
            c.args(["--cell", cell]);
        }
        let t0 = Instant::now();
        let o = run_limited(c, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(
            err.contains(&format!("in use by pid {}", first.id())),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    drop(stopped);
    assert!(first.wait().expect("ends").success());
    // The tables are those of the same sweep run alone.
    let alone = dir.path().join("alone");
    let mut a2 = args.clone();
    *a2.last_mut().expect("out") = alone.display().to_string();
    ok(&a2);
    assert_eq!(sweep_numbers(&out), sweep_numbers(&alone));
    assert_eq!(sweep_numbers(&out).len(), 4);
}

#[test]
fn cell_tasks_run_side_by_side_and_one_cell_is_run_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = sweep_config(dir.path());
    let out = dir.path().join("sweep");
    let base: Vec<String> = [
        "sweep",
        "--config",
        &cfg.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    let with_cell = |c: &str| {
        let mut a = base.clone();
        a.extend(["--cell".to_string(), c.to_string()]);
        a
    };
    let mut first = spawn(&with_cell("0"));
    wait_for(&out.join("cells"), Duration::from_secs(60));
    // Another cell runs beside it; the same cell does not.
    let other = spawn(&with_cell("1"));
    // Until cell 0's lock is taken by the first task.
    let t0 = Instant::now();
    while !std::fs::read_dir(out.join("cells")).is_ok_and(|mut d| {
        d.any(|e| {
            e.is_ok_and(|e| {
                e.file_name().to_string_lossy().starts_with("000")
                    && rankstab_records::guard::lock_holder(&e.path()).is_some()
            })
        })
    }) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "cell 0 did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = bin();
    c.args(with_cell("0"));
    let o = run_limited(c, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    // Either cell 0 is still running (refused, naming its holder) or it has finished
    // meanwhile (skipped): never run twice.
    if o.status.code() == Some(2) {
        assert!(
            err.contains(&format!("in use by pid {}", first.id())),
            "{err}"
        );
    } else {
        assert!(o.status.success(), "{err}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("0 cell(s) run, 1 already finished"));
    }
    assert!(first.wait().expect("ends").success());
    let o = other.wait_with_output().expect("ends");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_terminated_training_run_ends_with_one_line_and_no_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "It is a truth universally acknowledged, that a single man. ".repeat(400),
    )
    .expect("write");
    let out = dir.path().join("run");
    let args: Vec<String> = [
        "train",
        "--model",
        &tiny_llama().display().to_string(),
        "--data",
        &text.display().to_string(),
        "--rank",
        "4",
        "--steps",
        "100000",
        "--context",
        "16",
        "--batch",
        "2",
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    let child = spawn(&args);
    // Inside libtorch's training loop when the signal arrives.
    wait_for(&out.join("metrics.csv"), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let o = child.wait_with_output().expect("ends");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked") && err.contains("resume"), "{err}");
    // Besides the progress lines (one per step: stderr is not a terminal here), one line.
    assert_eq!(
        err.lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("train: step "))
            .count(),
        1,
        "{err}"
    );
}
