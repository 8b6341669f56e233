//! Sweeps on a Slurm cluster: a job array with one task per unfinished cell
//! (`rankstab sweep --slurm`), the state of every cell with the scheduler's (`--status`),
//! and a resubmission of the cells that are neither finished nor queued (`--resubmit`).
//!
//! Each task `exec`s `rankstab sweep --config DIR/slurm/sweep.toml --out DIR --cell
//! $SLURM_ARRAY_TASK_ID`: the array index is the cell's index, so a cell on the cluster is
//! the same computation as the cell run locally. The task is the batch shell itself (no
//! wrapper process), so Slurm's SIGTERM before a preemption or a time limit
//! (`--signal=B:TERM@120`) reaches `rankstab` once: it finishes the step in flight, writes a
//! checkpoint and exits with status 75; the requeued (or resubmitted) task resumes there.
use anyhow::{bail, Context, Result};
use rankstab_records::{read_json, write_json_atomic};
use rankstab_train::run::RunState;
use rankstab_train::sweep::{Cell, SweepManifest};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `sbatch` options of a submission (None: the cluster's default).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--gres` (e.g. gpu:1).
    pub gres: Option<String>,
    /// `--cpus-per-task` (also the task's OMP_NUM_THREADS).
    pub cpus_per_task: Option<u32>,
    /// `--mem` (e.g. 16G; Slurm reads a bare number as MB).
    pub mem: Option<String>,
    /// `--time` (e.g. 2:00:00).
    pub time: Option<String>,
    /// At most this many tasks at once (the array's `%K`).
    pub max_parallel: Option<usize>,
    /// `--device` passed to every task (e.g. auto).
    pub device: Option<String>,
}

impl SlurmOptions {
    /// Each option given in `over` replaces this one's.
    pub fn overridden_by(&self, over: &SlurmOptions) -> SlurmOptions {
        SlurmOptions {
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            gres: over.gres.clone().or_else(|| self.gres.clone()),
            cpus_per_task: over.cpus_per_task.or(self.cpus_per_task),
            mem: over.mem.clone().or_else(|| self.mem.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            max_parallel: over.max_parallel.or(self.max_parallel),
            device: over.device.clone().or_else(|| self.device.clone()),
        }
    }

    /// Refuses values that cannot go into an `#SBATCH` line as they are.
    ///
    /// # Errors
    /// The option and its value, and what is allowed.
    pub fn check(&self) -> Result<()> {
        for (flag, v) in [
            ("--partition", &self.partition),
            ("--gres", &self.gres),
            ("--mem", &self.mem),
            ("--time", &self.time),
            ("--device", &self.device),
        ] {
            if let Some(v) = v {
                if v.is_empty() || !v.chars().all(safe_char) {
                    bail!(
                        "{flag} {v:?}: not a value for an #SBATCH line (allowed: letters, digits and _ . : , = + - /)"
                    );
                }
            }
        }
        if self.max_parallel == Some(0) || self.cpus_per_task == Some(0) {
            bail!("--max-parallel and --cpus-per-task take a number of at least 1");
        }
        Ok(())
    }
}

fn safe_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:,=+-/".contains(c)
}

/// One `sbatch` submission of a sweep.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Submission {
    /// The job id `sbatch --parsable` printed (the array's job id).
    pub job_id: String,
    /// The cells submitted (the array's indices).
    pub cells: Vec<usize>,
    /// When (UTC, RFC 3339).
    pub submitted: String,
    /// The options it was submitted with.
    pub options: SlurmOptions,
}

/// `DIR/slurm/jobs.json`: every submission of the sweep, oldest first.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlurmState {
    /// Submissions in order.
    pub submissions: Vec<Submission>,
}

impl SlurmState {
    /// The job ids of every submission, oldest first.
    pub fn job_ids(&self) -> Vec<String> {
        self.submissions.iter().map(|s| s.job_id.clone()).collect()
    }
}

/// The sweep's Slurm folder.
pub fn slurm_dir(out: &Path) -> PathBuf {
    out.join("slurm")
}

/// The configuration the tasks read (a copy of the one submitted).
pub fn config_copy(out: &Path) -> PathBuf {
    slurm_dir(out).join("sweep.toml")
}

fn jobs_path(out: &Path) -> PathBuf {
    slurm_dir(out).join("jobs.json")
}

/// The sweep's submissions so far (none when it was never submitted).
///
/// # Errors
/// `jobs.json` exists and cannot be read.
pub fn load_state(out: &Path) -> Result<SlurmState> {
    let p = jobs_path(out);
    if !p.exists() {
        return Ok(SlurmState::default());
    }
    read_json(&p).with_context(|| format!("{}: the sweep's Slurm submissions", p.display()))
}

/// Array indices as Slurm spells them: runs of consecutive cells as ranges ("0-3,7,9-10").
pub fn array_spec(cells: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cells.len() {
        let mut j = i;
        while j + 1 < cells.len() && cells[j + 1] == cells[j] + 1 {
            j += 1;
        }
        parts.push(if j == i {
            cells[i].to_string()
        } else {
            format!("{}-{}", cells[i], cells[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Single-quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A path that can stand unquoted in an `#SBATCH` line.
fn sbatch_path(p: &Path, what: &str) -> Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{what} {}: not UTF-8", p.display()))?;
    if !s.chars().all(|c| safe_char(c) || c == '@' || c == '%') || s.contains('%') {
        bail!(
            "{what} {s:?}: Slurm's #SBATCH lines cannot quote it; use a path of letters, digits and _ . : , = + - / only"
        );
    }
    Ok(s.to_string())
}

/// What the job-array script needs besides the options.
pub struct ScriptInputs<'a> {
    /// The sweep directory (absolute).
    pub out: &'a Path,
    /// The `rankstab` binary the tasks run (absolute, on a file system the nodes share).
    pub exe: &'a Path,
    /// The tasks' working directory (the configuration's relative paths start there).
    pub workdir: &'a Path,
    /// The cells to run, ascending.
    pub cells: &'a [usize],
}

/// `DIR/slurm/sweep.sbatch`: a job array, one task per cell in `inp.cells`.
///
/// # Errors
/// A path that an `#SBATCH` line cannot hold.
pub fn script(inp: &ScriptInputs<'_>, o: &SlurmOptions) -> Result<String> {
    let out = sbatch_path(inp.out, "the sweep directory")?;
    let workdir = sbatch_path(inp.workdir, "the working directory")?;
    let name = inp
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("sweep");
    let name: String = name.chars().filter(|&c| safe_char(c)).collect();
    let mut array = array_spec(inp.cells);
    if let Some(k) = o.max_parallel {
        array.push_str(&format!("%{k}"));
    }
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(
        "# Written by `rankstab sweep --slurm`: one task per unfinished cell of the sweep; the\n\
         # array index is the cell's index. Submit again with `rankstab sweep --status DIR --resubmit`.\n",
    );
    let mut line = |k: &str, v: &str| s.push_str(&format!("#SBATCH --{k}={v}\n"));
    line("job-name", &format!("rankstab-{name}"));
    line("array", &array);
    line("output", &format!("{out}/logs/cell-%a.log"));
    line("open-mode", "append");
    line("chdir", &workdir);
    // Requeued after a preemption or a node failure; warned 120 s before the time limit
    // (the batch shell is rankstab itself: it checkpoints and exits).
    s.push_str("#SBATCH --requeue\n#SBATCH --signal=B:TERM@120\n");
    let mut line = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            s.push_str(&format!("#SBATCH --{k}={v}\n"));
        }
    };
    line("partition", &o.partition);
    line("gres", &o.gres);
    line("cpus-per-task", &o.cpus_per_task.map(|n| n.to_string()));
    line("mem", &o.mem);
    line("time", &o.time);
    s.push_str(
        "set -eu\n\
         echo \"rankstab: cell $SLURM_ARRAY_TASK_ID, job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname) at $(date -u +%FT%TZ)\" >&2\n\
         if [ -n \"${SLURM_CPUS_PER_TASK:-}\" ]; then export OMP_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\"; fi\n",
    );
    let device = o
        .device
        .as_ref()
        .map_or(String::new(), |d| format!(" --device {}", sh_quote(d)));
    s.push_str(&format!(
        "exec {} sweep --config {} --out {}{device} --cell \"$SLURM_ARRAY_TASK_ID\"\n",
        sh_quote(&inp.exe.display().to_string()),
        sh_quote(&config_copy(inp.out).display().to_string()),
        sh_quote(&out),
    ));
    Ok(s)
}

/// The Slurm state of one array task: (state, reason or node, exit code).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    /// PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    pub state: String,
    /// squeue's reason or node list, or sacct's exit code.
    pub detail: String,
}

impl TaskState {
    /// Queued or running: a resubmission would run the cell twice.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
                | "RESIZING"
                | "SUSPENDED"
                | "STAGE_OUT"
                | "SIGNALING"
                | "STOPPED"
        )
    }

    /// Running now (or finishing).
    pub fn is_running(&self) -> bool {
        matches!(
            self.state.as_str(),
            "RUNNING" | "COMPLETING" | "SIGNALING" | "STAGE_OUT" | "CONFIGURING"
        )
    }
}

/// Runs a Slurm command; None when it is not installed or fails (its stderr is dropped).
fn query(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Expands an array-task field: "7", "[4-6,9]" or "4-6%2" into task ids.
fn task_ids(field: &str) -> Vec<usize> {
    let f = field.trim().trim_start_matches('[');
    let f = f.split(']').next().unwrap_or("");
    let f = f.split('%').next().unwrap_or("");
    let mut ids = Vec::new();
    for part in f.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    ids.extend(a..=b.min(a + 1_000_000));
                }
            }
            None => ids.extend(part.parse::<usize>().ok()),
        }
    }
    ids
}

/// The tasks of the sweep's jobs as the scheduler knows them, (job, task) -> state:
/// `squeue` first (jobs it still holds, finished ones too for a few minutes), then
/// `sacct` (accounting, where the cluster keeps it) for the others. Empty when neither
/// command is there.
pub fn task_states(jobs: &[String]) -> BTreeMap<(String, usize), TaskState> {
    let mut states = BTreeMap::new();
    for job in jobs {
        if let Some(text) = query(
            "squeue",
            &["-h", "-r", "--states=all", "-j", job, "-o", "%F|%K|%T|%R"],
        ) {
            for l in text.lines() {
                let f: Vec<&str> = l.split('|').collect();
                if f.len() == 4 && f[0] == job {
                    for t in task_ids(f[1]) {
                        states.insert(
                            (job.clone(), t),
                            TaskState {
                                state: f[2].to_string(),
                                detail: f[3].to_string(),
                            },
                        );
                    }
                }
            }
        }
        if let Some(text) = query(
            "sacct",
            &["-n", "-P", "-X", "-j", job, "-o", "JobID,State,ExitCode"],
        ) {
            for l in text.lines() {
                let f: Vec<&str> = l.split('|').collect();
                let Some((j, t)) = f.first().and_then(|id| id.split_once('_')) else {
                    continue;
                };
                if f.len() == 3 && j == job {
                    // "CANCELLED by 0" -> CANCELLED
                    let state = f[1].split_whitespace().next().unwrap_or("").to_string();
                    for t in task_ids(t) {
                        states.entry((job.clone(), t)).or_insert(TaskState {
                            state: state.clone(),
                            detail: format!("exit {}", f[2]),
                        });
                    }
                }
            }
        }
    }
    states
}

/// Where one cell of the sweep stands.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CellStatus {
    /// The cell's index.
    pub cell: usize,
    /// Its directory name.
    pub name: String,
    /// pending, running, complete, diverged or failed.
    pub state: &'static str,
    /// Steps with a training loss recorded, and the cell's steps.
    pub steps_done: usize,
    /// The cell's steps.
    pub steps: usize,
    /// The last training loss recorded (NaN: none).
    pub last_loss: Option<f64>,
    /// The Slurm job and task of its last submission, with the scheduler's state.
    pub slurm: Option<String>,
    /// What else there is to say (the divergence, a checkpoint to resume from, the holder).
    pub note: String,
}

/// The steps recorded and the last training loss of a cell directory.
fn progress_of(dir: &Path) -> (usize, Option<f64>) {
    use rankstab_records::{Metric, MetricRow};
    let rows: Vec<MetricRow> =
        rankstab_records::read_table(&dir.join("metrics.csv")).unwrap_or_default();
    rows.iter()
        .rev()
        .find(|r| r.metric == Metric::Loss)
        .map_or((0, None), |r| (r.step as usize + 1, Some(r.value)))
}

/// Every cell's status: its run directory, whether a process holds its lock, and the
/// Slurm state (`task_states`) of the task of its last submission.
pub fn statuses(out: &Path, m: &SweepManifest, state: &SlurmState) -> Vec<CellStatus> {
    let tasks = task_states(&state.job_ids());
    m.cells
        .iter()
        .map(|c| cell_status(out, m, c, state, &tasks))
        .collect()
}

fn cell_status(
    out: &Path,
    m: &SweepManifest,
    c: &Cell,
    state: &SlurmState,
    tasks: &BTreeMap<(String, usize), TaskState>,
) -> CellStatus {
    let dir = out.join("cells").join(&c.name);
    let run = RunState::of(&dir);
    let (steps_done, last_loss) = progress_of(&dir);
    let job = state
        .submissions
        .iter()
        .rev()
        .find(|s| s.cells.contains(&c.index))
        .map(|s| s.job_id.clone());
    let task = job.as_ref().and_then(|j| tasks.get(&(j.clone(), c.index)));
    let slurm = job.as_ref().map(|j| match task {
        Some(t) => format!("{j}_{} {} ({})", c.index, t.state, t.detail),
        None => format!("{j}_{} (not in squeue or sacct)", c.index),
    });
    let holder = rankstab_records::guard::lock_holder(&dir);
    let has_checkpoint = dir.join("checkpoint").exists();
    let (state, note) = match run {
        RunState::Complete => ("complete", String::new()),
        RunState::Diverged => {
            let note = read_json::<rankstab_records::Manifest>(&dir.join("manifest.json"))
                .ok()
                .and_then(|m| m.note)
                .unwrap_or_else(|| "diverged".into());
            ("diverged", note)
        }
        _ if task.is_some_and(TaskState::is_running) => ("running", String::new()),
        _ if holder.is_some() => ("running", format!("held by {}", holder.unwrap_or_default())),
        _ if task.is_some_and(TaskState::is_live) => ("pending", "queued".into()),
        RunState::New if task.is_none_or(|t| t.state == "COMPLETED") => {
            ("pending", "not started".into())
        }
        _ => (
            "failed",
            if has_checkpoint {
                "stopped; resumes from its checkpoint".into()
            } else if run == RunState::New {
                "ended before it started: see its log".into()
            } else {
                "stopped; starts over (no checkpoint)".into()
            },
        ),
    };
    CellStatus {
        cell: c.index,
        name: c.name.clone(),
        state,
        steps_done,
        steps: m.config.train_config(c).steps,
        last_loss,
        slurm,
        note,
    }
}

/// The cells to submit: not finished, and neither queued nor running anywhere.
pub fn unfinished(statuses: &[CellStatus]) -> Vec<usize> {
    statuses
        .iter()
        .filter(|s| s.state == "failed" || (s.state == "pending" && s.note == "not started"))
        .map(|s| s.cell)
        .collect()
}

/// Writes the job-array script for `cells`, submits it (unless `dry_run`) and records the
/// submission in `DIR/slurm/jobs.json`. Returns the script's path and the job id.
///
/// # Errors
/// A path an `#SBATCH` line cannot hold; `sbatch` missing or refusing the job (its message).
pub fn submit(
    out: &Path,
    cells: &[usize],
    o: &SlurmOptions,
    dry_run: bool,
) -> Result<(PathBuf, Option<String>)> {
    o.check()?;
    let out = std::path::absolute(out).with_context(|| format!("{}", out.display()))?;
    let exe = std::env::current_exe().context("the path of the rankstab binary")?;
    let workdir = std::env::current_dir().context("the working directory")?;
    let dir = slurm_dir(&out);
    std::fs::create_dir_all(dir.join("..").join("logs"))
        .and_then(|()| std::fs::create_dir_all(&dir))
        .with_context(|| format!("{}: cannot create", dir.display()))?;
    let text = script(
        &ScriptInputs {
            out: &out,
            exe: &exe,
            workdir: &workdir,
            cells,
        },
        o,
    )?;
    let path = dir.join("sweep.sbatch");
    write_text_atomic(&path, &text)?;
    if dry_run {
        return Ok((path, None));
    }
    let run = Command::new("sbatch")
        .arg("--parsable")
        .arg(&path)
        .output()
        .map_err(|e| anyhow::anyhow!("sbatch: cannot run it ({e}); is Slurm's client installed? (--dry-run writes the script only)"))?;
    if !run.status.success() {
        bail!(
            "sbatch refused {}: {}",
            path.display(),
            String::from_utf8_lossy(&run.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    let job_id = stdout
        .trim()
        .split(';')
        .next()
        .filter(|j| !j.is_empty() && j.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("sbatch printed no job id: {:?}", stdout.trim()))?
        .to_string();
    // One writer at a time (two submitters of the same sweep).
    let _lock = rankstab_records::RunLock::wait_exclusive(&dir)?;
    let mut state = load_state(&out)?;
    state.submissions.push(Submission {
        job_id: job_id.clone(),
        cells: cells.to_vec(),
        submitted: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        options: o.clone(),
    });
    write_json_atomic(&jobs_path(&out), &state)?;
    Ok((path, Some(job_id)))
}

/// Writes `text` to `path` atomically (temporary file, then rename).
///
/// # Errors
/// I/O errors naming the file.
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// What the manifest of a cell run by a Slurm task records about it (None outside Slurm).
pub fn task_record() -> Option<serde_json::Value> {
    let var = |k: &str| std::env::var(k).ok();
    let job = var("SLURM_JOB_ID")?;
    Some(serde_json::json!({
        "job_id": job,
        "array_job_id": var("SLURM_ARRAY_JOB_ID"),
        "array_task_id": var("SLURM_ARRAY_TASK_ID"),
        "node": var("SLURMD_NODENAME"),
        "restart_count": var("SLURM_RESTART_COUNT"),
        "cuda_visible_devices": var("CUDA_VISIBLE_DEVICES"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_specs_compress_runs_of_cells() {
        assert_eq!(array_spec(&[0, 1, 2, 3]), "0-3");
        assert_eq!(array_spec(&[0, 2, 3, 4, 7, 9, 10]), "0,2-4,7,9-10");
        assert_eq!(array_spec(&[5]), "5");
        // and back
        for cells in [vec![0, 1, 2, 3], vec![0, 2, 3, 4, 7, 9, 10], vec![5]] {
            assert_eq!(task_ids(&format!("[{}%2]", array_spec(&cells))), cells);
        }
        assert_eq!(task_ids("7"), [7]);
        assert_eq!(task_ids("N/A"), Vec::<usize>::new());
    }

    #[test]
    fn the_script_runs_each_cell_by_its_index_with_the_options_given() {
        let o = SlurmOptions {
            partition: Some("gpu".into()),
            gres: Some("gpu:1".into()),
            cpus_per_task: Some(8),
            mem: Some("64G".into()),
            time: Some("2:00:00".into()),
            max_parallel: Some(4),
            device: Some("auto".into()),
        };
        let s = script(
            &ScriptInputs {
                out: Path::new("/data/sw"),
                exe: Path::new("/opt/it's/rankstab"),
                workdir: Path::new("/home/me"),
                cells: &[0, 1, 2, 5],
            },
            &o,
        )
        .expect("script");
        for want in [
            "#SBATCH --array=0-2,5%4\n",
            "#SBATCH --output=/data/sw/logs/cell-%a.log\n",
            "#SBATCH --requeue\n",
            "#SBATCH --signal=B:TERM@120\n",
            "#SBATCH --partition=gpu\n",
            "#SBATCH --gres=gpu:1\n",
            "#SBATCH --cpus-per-task=8\n",
            "#SBATCH --mem=64G\n",
            "#SBATCH --time=2:00:00\n",
            "#SBATCH --chdir=/home/me\n",
            "exec '/opt/it'\\''s/rankstab' sweep --config '/data/sw/slurm/sweep.toml' --out '/data/sw' --device 'auto' --cell \"$SLURM_ARRAY_TASK_ID\"\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        // Defaults: no partition line, no throttle.
        let s = script(
            &ScriptInputs {
                out: Path::new("/data/sw"),
                exe: Path::new("/bin/rankstab"),
                workdir: Path::new("/"),
                cells: &[3],
            },
            &SlurmOptions::default(),
        )
        .expect("script");
        assert!(s.contains("--array=3\n") && !s.contains("--partition") && !s.contains("--device"));
    }

    #[test]
    fn values_an_sbatch_line_cannot_hold_are_refused() {
        let bad = SlurmOptions {
            partition: Some("gpu\n#SBATCH --x".into()),
            ..Default::default()
        };
        let e = bad.check().expect_err("newline").to_string();
        assert!(e.contains("--partition") && e.contains("allowed"), "{e}");
        let bad = SlurmOptions {
            max_parallel: Some(0),
            ..Default::default()
        };
        assert!(bad.check().is_err());
        let e = script(
            &ScriptInputs {
                out: Path::new("/data/my sweep"),
                exe: Path::new("/bin/rankstab"),
                workdir: Path::new("/"),
                cells: &[0],
            },
            &SlurmOptions::default(),
        )
        .err()
        .expect("space")
        .to_string();
        assert!(e.contains("my sweep") && e.contains("#SBATCH"), "{e}");
    }

    #[test]
    fn options_given_again_replace_the_stored_ones() {
        let old = SlurmOptions {
            partition: Some("a".into()),
            time: Some("1:00:00".into()),
            ..Default::default()
        };
        let new = old.overridden_by(&SlurmOptions {
            time: Some("4:00:00".into()),
            ..Default::default()
        });
        assert_eq!(new.partition.as_deref(), Some("a"));
        assert_eq!(new.time.as_deref(), Some("4:00:00"));
    }

    #[test]
    fn live_and_running_task_states() {
        let t = |s: &str| TaskState {
            state: s.into(),
            detail: String::new(),
        };
        assert!(t("PENDING").is_live() && !t("PENDING").is_running());
        assert!(t("RUNNING").is_live() && t("RUNNING").is_running());
        for s in [
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "PREEMPTED",
            "NODE_FAIL",
        ] {
            assert!(!t(s).is_live(), "{s}");
        }
    }
}
