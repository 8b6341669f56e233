//! `rankstab sweep --slurm` against a real Slurm: each test starts a one-node cluster on
//! this machine (Debian's slurmctld, slurmd and munge, `scripts/setup.sh --slurm`; root is
//! needed, as in CI), submits a small sweep of the tiny Llama and checks its tables against
//! the same sweep run here; the second one stops a task with SIGTERM (checkpoint, requeue,
//! resume), kills another one hard and resubmits. The daemons are stopped by the pids in
//! their pid files whatever happens (the guard's Drop runs when a test panics), and every
//! process left with this cluster's SLURM_CONF in its environment is killed.
//!
//! Skipped with a message when Slurm is not installed or this is not root, unless
//! RANKSTAB_REQUIRE_SLURM=1 (`make test` sets it), which turns the skip into a failure.
#[path = "common/sweep_config.rs"]
mod sweep_config;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use sweep_config::write_config;

/// One cluster at a time: the tests share this machine's cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A one-node Slurm cluster in a temporary directory, stopped on drop.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string()
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Cluster {
    /// Starts munged, slurmctld and slurmd; None (the test skips) where that cannot be.
    fn start() -> Option<Cluster> {
        let missing: Vec<&str> = [
            "/usr/sbin/munged",
            "/usr/sbin/slurmctld",
            "/usr/sbin/slurmd",
            "/usr/bin/sbatch",
        ]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
        // The effective uid, from /proc/self/status ("Uid: real effective saved fs").
        let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
                == Some(true)
        });
        if !missing.is_empty() || !root {
            let why = format!(
                "Slurm tests need root and Slurm (scripts/setup.sh --slurm); missing: {missing:?}, root: {root}"
            );
            assert!(
                std::env::var("RANKSTAB_REQUIRE_SLURM").as_deref() != Ok("1"),
                "RANKSTAB_REQUIRE_SLURM=1: {why}"
            );
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // munged wants its socket's folders searchable by all, its key readable by it only.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        for sub in ["munge", "sock", "state", "spool"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
        }
        mode(d, 0o755);
        mode(&d.join("sock"), 0o755);
        mode(&d.join("munge"), 0o700);
        let mut key = vec![0u8; 1024];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("urandom"),
            &mut key,
        )
        .expect("1024 random bytes");
        std::fs::write(d.join("munge/munge.key"), key).expect("key");
        mode(&d.join("munge/munge.key"), 0o400);
        let p = |s: &str| d.join(s).display().to_string();
        run_ok(Command::new("/usr/sbin/munged").args([
            format!("--key-file={}", p("munge/munge.key")),
            format!("--socket={}", p("sock/munge.socket")),
            format!("--pid-file={}", p("munge/munged.pid")),
            format!("--log-file={}", p("munge/munged.log")),
            format!("--seed-file={}", p("munge/munged.seed")),
        ]));
        // Addresses given: nothing depends on the host name resolving.
        let host = hostname();
        let conf = d.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=rankstabtest\nSlurmctldHost={host}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nSchedulerType=sched/builtin\n\
                 StateSaveLocation={state}\nSlurmdSpoolDir={spool}\n\
                 SlurmctldPidFile={ctld_pid}\nSlurmdPidFile={d_pid}\n\
                 SlurmctldLogFile={ctld_log}\nSlurmdLogFile={d_log}\n\
                 SlurmctldPort={p1}\nSlurmdPort={p2}\nReturnToService=2\nMpiDefault=none\n\
                 JobCompType=jobcomp/none\nAccountingStorageType=accounting_storage/none\n\
                 MinJobAge=3600\nKillWait=10\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN\n\
                 PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
                sock = p("sock/munge.socket"),
                state = p("state"),
                spool = p("spool"),
                ctld_pid = p("slurmctld.pid"),
                d_pid = p("slurmd.pid"),
                ctld_log = p("slurmctld.log"),
                d_log = p("slurmd.log"),
                p1 = free_port(),
                p2 = free_port(),
                cpus = std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
        )
        .expect("slurm.conf");
        // The guard exists before the daemons: a failed start still stops what started.
        let c = Cluster { dir, conf };
        run_ok(&mut c.cmd("/usr/sbin/slurmctld"));
        run_ok(&mut c.cmd("/usr/sbin/slurmd"));
        let t0 = Instant::now();
        loop {
            let o = c.cmd("sinfo").args(["-h", "-o", "%T"]).output();
            if o.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the node is not idle after 60 s: {}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(c)
    }

    /// A command that talks to this cluster.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn rankstab(&self, args: &[&str]) -> Output {
        self.cmd(env!("CARGO_BIN_EXE_rankstab"))
            .args(args)
            .output()
            .expect("runs")
    }

    /// `rankstab sweep --config CFG --out OUT --slurm EXTRA...` against this cluster.
    fn submit(&self, cfg: &Path, out: &Path, extra: &[&str]) -> Output {
        let (cfg, out) = (cfg.to_str().expect("utf-8"), out.to_str().expect("utf-8"));
        let mut args = vec!["sweep", "--config", cfg, "--out", out, "--slurm"];
        args.extend_from_slice(extra);
        self.rankstab(&args)
    }

    fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| {
                let t = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                format!(
                    "--- {f}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn pid(&self, file: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Whether process `pid` is alive (and not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            != Some("Z")
    })
}

/// Sends `signal` (TERM, KILL) to `pids` with kill(1).
fn signal(pids: &[i32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(|p| p.to_string()))
        .stderr(std::process::Stdio::null())
        .status();
}

/// Processes whose environment holds `needle` (this cluster's jobs and their steps).
fn processes_with_env(needle: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| pid != me)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--full", "-p", "debug"]).output();
        let needle = format!("SLURM_CONF={}", self.conf.display()).into_bytes();
        let daemons: Vec<i32> = ["slurmd.pid", "slurmctld.pid", "munge/munged.pid"]
            .iter()
            .filter_map(|f| self.pid(f))
            .collect();
        for sig in ["TERM", "KILL"] {
            // Pids from our own pid files, and processes with our cluster's configuration
            // in their environment (jobs, slurmstepd).
            let mut pids: Vec<i32> = daemons.iter().copied().filter(|&p| alive(p)).collect();
            pids.extend(processes_with_env(&needle));
            signal(&pids, sig);
            let t0 = Instant::now();
            while pids.iter().any(|&p| alive(p)) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The job id in `submitted Slurm job N: ...`.
fn job_id(stdout: &str) -> String {
    stdout
        .split("submitted Slurm job ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no job id in {stdout:?}"))
        .to_string()
}

/// Every cell's status (`--status --json`).
fn status(c: &Cluster, out: &Path) -> Vec<serde_json::Value> {
    let o = c.rankstab(&["sweep", "--status", out.to_str().expect("utf-8"), "--json"]);
    ok(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|v| v["event"] == "cell_status")
        .map(|v| v["status"].clone())
        .collect()
}

/// Waits until `done` holds for the sweep's statuses (10 minutes at most).
fn wait_for(
    c: &Cluster,
    out: &Path,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let t0 = Instant::now();
    loop {
        let s = status(c, out);
        if done(&s) {
            return s;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            let logs: String = std::fs::read_dir(out.join("logs"))
                .map(|d| {
                    d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            panic!("waited 10 min for {what}: {s:#?}\n{logs}\n{}", c.logs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn state(s: &[serde_json::Value], cell: usize) -> &str {
    s[cell]["state"].as_str().expect("state")
}

/// The files of every cell that must be the same bytes as the local sweep's: the moment
/// and metric tables (the wall-clock `seconds` rows left out of the latter) and the
/// adapter files.
fn cell_bytes(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut cells: Vec<PathBuf> = std::fs::read_dir(out.join("cells"))
        .expect("cells")
        .map(|e| e.expect("entry").path())
        .collect();
    cells.sort();
    for c in cells {
        let name = c.file_name().expect("name").to_string_lossy().to_string();
        let metrics = std::fs::read_to_string(c.join("metrics.csv")).expect("metrics");
        let metrics: String = metrics
            .lines()
            .filter(|l| !l.contains(",seconds,"))
            .map(|l| format!("{l}\n"))
            .collect();
        files.push((format!("{name}/metrics.csv"), metrics.into_bytes()));
        files.push((
            format!("{name}/moments.csv"),
            std::fs::read(c.join("moments.csv")).expect("moments"),
        ));
        let mut adapters: Vec<PathBuf> = std::fs::read_dir(c.join("adapters"))
            .expect("adapters")
            .map(|e| e.expect("entry").path())
            .collect();
        adapters.sort();
        for a in adapters {
            files.push((
                format!(
                    "{name}/adapters/{}",
                    a.file_name().expect("name").to_string_lossy()
                ),
                std::fs::read(&a).expect("adapter"),
            ));
        }
    }
    files
}

fn assert_same_cells(local: &Path, cluster: &Path) {
    let (a, b) = (cell_bytes(local), cell_bytes(cluster));
    assert_eq!(
        a.iter().map(|f| &f.0).collect::<Vec<_>>(),
        b.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.1 == y.1,
            "{} differs between the local and the Slurm sweep",
            x.0
        );
    }
}

fn local_sweep(cfg: &Path, out: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .args(["sweep", "--config"])
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .output()
        .expect("runs");
    ok(&o);
}

#[test]
fn a_sweep_on_slurm_has_the_tables_of_the_sweep_run_here() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(work.path(), "steps = 6\ncheckpoint_every = 0");
    let local = work.path().join("local");
    local_sweep(&cfg, &local);

    let out = work.path().join("slurm");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    // --dry-run writes the script and submits nothing.
    let o = cluster.submit(&cfg, &out, &["--dry-run"]);
    assert!(ok(&o).contains("wrote "), "{}", ok(&o));
    assert!(!out.join("slurm/jobs.json").exists());
    let o = cluster.submit(&cfg, &out, &["--cpus-per-task", "1", "--max-parallel", "2"]);
    let job = job_id(&ok(&o));
    let script = std::fs::read_to_string(out.join("slurm/sweep.sbatch")).expect("script");
    assert!(script.contains("#SBATCH --array=0-3%2\n"), "{script}");
    let st = wait_for(&cluster, &out, "4 complete cells", |s| {
        s.len() == 4 && s.iter().all(|c| c["state"] == "complete")
    });
    for c in &st {
        let slurm = c["slurm"].as_str().expect("the Slurm task");
        assert!(slurm.starts_with(&format!("{job}_")), "{slurm}");
        assert_eq!(c["steps_done"], 6);
    }
    assert_same_cells(&local, &out);
    // The manifest says which job, task and node ran the cell.
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("cells/002-tiny-r8-lora-adamw-s0/manifest.json"))
            .expect("manifest"),
    )
    .expect("json");
    let slurm = &m["config"]["run"]["slurm"];
    assert_eq!(slurm["array_job_id"], job.as_str(), "{m:#}");
    assert_eq!(slurm["array_task_id"], "2");
    assert_eq!(slurm["node"], hostname().as_str());
    assert!(
        m["device"]
            .as_str()
            .expect("device")
            .starts_with("cpu (1 threads)"),
        "{m:#}"
    );
    // Text status and a resubmission with nothing left to do.
    let o = cluster.rankstab(&["sweep", "--status", &s(&out), "--resubmit"]);
    let text = ok(&o);
    assert!(
        text.contains("4 cells: 4 complete, 0 diverged, 0 running, 0 pending, 0 failed")
            && text.contains("nothing to submit"),
        "{text}"
    );
}

/// SIGTERM (a preemption's or time limit's warning) stops a task after its step with a
/// checkpoint; requeued, it resumes there. A task killed hard starts its cell again
/// from its last checkpoint when resubmitted. Either way the tables end as the local ones.
#[test]
fn stopped_and_killed_tasks_resume_and_end_with_the_local_tables() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        work.path(),
        "steps = 300\ncheckpoint_every = 50\nprobe_every = 1",
    );
    let local = work.path().join("local");
    local_sweep(&cfg, &local);
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    let out = work.path().join("slurm");
    // Cells 0..2, one at a time; cell 3 is never submitted.
    let o = cluster.submit(
        &cfg,
        &out,
        &[
            "--cell",
            "0,1,2",
            "--cpus-per-task",
            "1",
            "--max-parallel",
            "1",
        ],
    );
    let job = job_id(&ok(&o));
    let started = |s: &[serde_json::Value], cell: usize| {
        state(s, cell) == "running" && s[cell]["steps_done"].as_u64() >= Some(3)
    };
    wait_for(&cluster, &out, "cell 0 complete, cell 1 running", |s| {
        state(s, 0) == "complete" && started(s, 1)
    });
    let task1 = format!("{job}_1");
    run_ok(
        cluster
            .cmd("scancel")
            .args(["--full", "--signal=TERM", &task1]),
    );
    let st = wait_for(&cluster, &out, "cell 1 stopped, cell 2 running", |s| {
        state(s, 1) == "failed" && started(s, 2)
    });
    // complete, failed (with a checkpoint), running and never started, all at once.
    assert_eq!(
        st.iter()
            .map(|c| c["state"].as_str().expect("state"))
            .collect::<Vec<_>>(),
        ["complete", "failed", "running", "pending"],
        "{st:#?}"
    );
    assert!(st[1]["note"]
        .as_str()
        .expect("note")
        .contains("resumes from its checkpoint"));
    assert!(
        st[1]["slurm"].as_str().expect("slurm").contains("FAILED"),
        "{st:#?}"
    );
    assert_eq!(st[3]["note"], "not started");
    let text = ok(&cluster.rankstab(&["sweep", "--status", &s(&out)]));
    assert!(
        text.contains("4 cells: 1 complete, 0 diverged, 1 running, 1 pending, 1 failed"),
        "{text}"
    );
    let log1 = std::fs::read_to_string(out.join("logs/cell-1.log")).expect("log");
    assert!(log1.contains("stops after the step in flight"), "{log1}");

    // Cell 2 killed hard (no checkpoint written for the kill).
    let task2 = format!("{job}_2");
    run_ok(
        cluster
            .cmd("scancel")
            .args(["--full", "--signal=KILL", &task2]),
    );
    wait_for(&cluster, &out, "cell 2 killed", |s| state(s, 2) == "failed");
    // Cell 1 requeued as a preemption would (now, not after Slurm's 120 s requeue delay):
    // it resumes from its checkpoint.
    run_ok(cluster.cmd("scontrol").args(["requeue", &task1]));
    run_ok(
        cluster
            .cmd("scontrol")
            .args(["update", &format!("JobId={task1}"), "StartTime=now"]),
    );
    wait_for(&cluster, &out, "cell 1 complete", |s| {
        state(s, 1) == "complete"
    });
    let log1 = std::fs::read_to_string(out.join("logs/cell-1.log")).expect("log");
    assert!(log1.contains("resumed at step"), "{log1}");

    // --resubmit: cells 2 (killed) and 3 (never submitted), and only those.
    let o = cluster.rankstab(&["sweep", "--status", &s(&out), "--resubmit"]);
    let text = ok(&o);
    assert!(text.contains("2 task(s), cells 2-3"), "{text}");
    wait_for(&cluster, &out, "every cell complete", |s| {
        s.iter().all(|c| c["state"] == "complete")
    });
    assert_same_cells(&local, &out);
    let jobs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("slurm/jobs.json")).expect("jobs.json"),
    )
    .expect("json");
    let subs = jobs["submissions"].as_array().expect("submissions");
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0]["cells"], serde_json::json!([0, 1, 2]));
    assert_eq!(subs[1]["cells"], serde_json::json!([2, 3]));
    assert_eq!(
        subs[1]["options"]["max_parallel"], 1,
        "the first submission's options"
    );
}
