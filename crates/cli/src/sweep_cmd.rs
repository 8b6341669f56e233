//! `rankstab sweep`: a manifest of training cells (models x ranks x scalings x optimizers
//! x seeds), each run into its own run directory; finished cells are skipped, a killed
//! one resumes from its checkpoint.
use crate::slurm::{self, SlurmOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use rankstab_train::data::Dataset;
use rankstab_train::device::DeviceName;
use rankstab_train::limits::MAX_CONFIG_BYTES;
use rankstab_train::run::{load_model, run_dir, LoadedModel, RunState};
use rankstab_train::sweep::{claim_dir, load_data, SweepConfig, AUDIT_SWEEP};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `rankstab sweep`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab sweep --out runs/sweep                 # the embedded default (make audit): a small
                                                  # random GPT-J and SmolLM2-135M, ranks 4..64,
                                                  # lora vs rslora, and an lr x rank grid on the
                                                  # GPT-J (~12 min on 2 cores)
  rankstab sweep --config paper.toml --out runs/paper --list
  rankstab sweep --config paper.toml --out runs/paper --cell 7      # one cell (a job-array task)
  rankstab sweep --config paper.toml --out /shared/paper --slurm --gres gpu:1 --time 24:00:00 \
      --max-parallel 16 --device auto             # one Slurm job array, a task per cell
  rankstab sweep --status /shared/paper           # every cell's state, with Slurm's
  rankstab sweep --status /shared/paper --resubmit   # the cells neither finished nor queued
  rankstab sweep --print-default > my.toml

Writes OUT/sweep.json (configuration and cells) and OUT/cells/<NNN-model-rR-scaling-opt-sS>/
(manifest.json, moments.csv, metrics.csv, adapters/). Run the same command again after a
kill: finished cells are skipped and an interrupted cell resumes from its last checkpoint.
A cell whose loss becomes NaN or infinite ends as \"diverged at step k\" and the sweep goes on.
SIGTERM (Slurm's warning before a preemption or the time limit), SIGINT or SIGHUP stops a cell
after its step with a checkpoint and exit status 75; a second signal ends it at once.
With an lrs grid in the configuration ([lrs] adamw = \"1e-4:1e-1:7\", or per model), every
value is a cell of its own; once all of a model's cells have ended, OUT/transfer-<model>/
holds its lr x rank study (lr* per rank, the exponent of lr* ~ r^c judged against c = 0).")]
pub struct SweepArgs {
    /// Sweep configuration (TOML; see --print-default). Default: the embedded audit sweep.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Sweep directory (default runs/sweep-<time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Run only these cells (0-based, comma-separated).
    #[arg(long, value_delimiter = ',')]
    cell: Vec<usize>,
    /// List the cells and their state, run nothing.
    #[arg(long)]
    list: bool,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default: bool,
    /// Refuse to start when any model's up-front memory estimate exceeds SIZE (e.g. 16G,
    /// 512M; default: the machine's available memory). Checked for every cell before the
    /// first one runs.
    #[arg(long, value_name = "SIZE", value_parser = rankstab_records::guard::parse_memory)]
    max_memory: Option<u64>,
    /// Print JSON lines on stdout instead of text: `{"event":"step",...}` per step (with
    /// the cell's index), `{"event":"cell",...}` per cell and a final `{"event":"sweep",...}`;
    /// with --list, one `{"event":"cell_state",...}` per cell; with --status, one
    /// `{"event":"cell_status",...}` per cell and a `{"event":"sweep_status",...}`.
    #[arg(long)]
    json: bool,
    /// Run on this device instead of the configuration's: cpu, cuda, cuda:N, or auto (the
    /// GPU a scheduler assigned through CUDA_VISIBLE_DEVICES, else the CPU).
    #[arg(long, value_name = "DEVICE")]
    device: Option<DeviceName>,
    /// Submit the unfinished cells to Slurm as a job array (one task per cell, each
    /// `rankstab sweep --out DIR --cell N`), record the job id in OUT/slurm/jobs.json and
    /// print it. Cells already queued or running are left alone.
    #[arg(long)]
    slurm: bool,
    /// Where the sweep stands: one line per cell (pending, running, complete, diverged,
    /// failed; step reached, last loss, the Slurm job's state) and a summary line.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "out", "slurm", "list", "cell"])]
    status: Option<PathBuf>,
    /// With --status: submit again the cells that are neither finished nor queued nor
    /// running, with the last submission's options (those given here replace them).
    #[arg(long, requires = "status")]
    resubmit: bool,
    /// With --slurm or --resubmit: write OUT/slurm/sweep.sbatch and submit nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    sbatch: SbatchArgs,
}

/// The `sbatch` options of `--slurm` and `--resubmit`.
#[derive(Args, Debug, Default)]
struct SbatchArgs {
    /// Slurm partition.
    #[arg(long, value_name = "P", help_heading = "Slurm")]
    partition: Option<String>,
    /// Generic resources per task, e.g. gpu:1.
    #[arg(long, value_name = "GRES", help_heading = "Slurm")]
    gres: Option<String>,
    /// CPUs per task (also the task's thread count).
    #[arg(long, value_name = "N", help_heading = "Slurm")]
    cpus_per_task: Option<u32>,
    /// Memory per task (Slurm's spelling: 16G, 64000 = MB). Also the bound of the
    /// up-front memory check (default there: none, the login node's memory says nothing).
    #[arg(long, value_name = "M", help_heading = "Slurm")]
    mem: Option<String>,
    /// Time limit per task (e.g. 2:00:00); a task warned before it stops with a checkpoint.
    #[arg(long, value_name = "T", help_heading = "Slurm")]
    time: Option<String>,
    /// At most K tasks at once (the array's %K throttle).
    #[arg(long, value_name = "K", help_heading = "Slurm")]
    max_parallel: Option<usize>,
}

impl SbatchArgs {
    fn options(&self, device: Option<DeviceName>) -> SlurmOptions {
        SlurmOptions {
            partition: self.partition.clone(),
            gres: self.gres.clone(),
            cpus_per_task: self.cpus_per_task,
            mem: self.mem.clone(),
            time: self.time.clone(),
            max_parallel: self.max_parallel,
            device: device.map(|d| d.to_string()),
        }
    }

    fn any(&self) -> bool {
        self.partition.is_some()
            || self.gres.is_some()
            || self.cpus_per_task.is_some()
            || self.mem.is_some()
            || self.time.is_some()
            || self.max_parallel.is_some()
    }
}

/// Slurm's `--mem` in bytes: a bare number is MB; K, M, G, T suffixes.
fn slurm_mem_bytes(mem: &str) -> Result<u64> {
    let m = if mem.chars().all(|c| c.is_ascii_digit()) {
        format!("{mem}M")
    } else {
        mem.to_string()
    };
    rankstab_records::guard::parse_memory(&m).map_err(|e| anyhow::anyhow!("--mem {mem:?}: {e}"))
}

/// Before the first cell runs: every model's shape from its configuration alone
/// (`inspect`), every target module exists, every rank fits every targeted module (the
/// rule `train` applies, `lora::check_rank`), and every cell's memory estimate fits.
fn preflight(
    cfg: &SweepConfig,
    cells: &[rankstab_train::sweep::Cell],
    max: Option<u64>,
) -> Result<()> {
    use rankstab_train::memory;
    let mut shapes = std::collections::BTreeMap::new();
    for cell in cells {
        let spec = cfg.model(cell);
        if !shapes.contains_key(&cell.model) {
            let shape = rankstab_train::load::inspect_spec(spec)
                .with_context(|| format!("model {:?}", spec.name))?;
            shapes.insert(cell.model.clone(), shape);
        }
        let shape = &shapes[&cell.model];
        let tc = cfg.train_config(cell);
        let modules = shape.modules();
        if let Some(t) = tc
            .target_modules
            .iter()
            .find(|t| !modules.iter().any(|m| m.name == t.as_str()))
        {
            let names: Vec<&str> = modules.iter().map(|m| m.name).collect();
            bail!(
                "model {:?}: target module {t:?} does not exist in this model (available: {})",
                spec.name,
                names.join(", ")
            );
        }
        for m in modules.iter().filter(|m| {
            tc.target_modules.is_empty() || tc.target_modules.iter().any(|t| t == m.name)
        }) {
            let fits = rankstab_train::lora::check_rank(tc.rank, m.in_features, m.out_features);
            if fits.is_err() {
                bail!(
                    "model {:?}: rank {} does not fit module {} ({} -> {}): ranks from 1 to {} are allowed",
                    spec.name,
                    tc.rank,
                    m.name,
                    m.in_features,
                    m.out_features,
                    m.in_features.max(m.out_features)
                );
            }
        }
        let sizes = memory::TrainSizes {
            rank: tc.rank,
            target_modules: tc.target_modules.clone(),
            optimizer: tc.optimizer,
            micro_batch: tc.micro(),
            context: tc.context,
            activation_checkpointing: tc.activation_checkpointing,
        };
        memory::check(
            &format!(
                "cell {} ({}: model {:?}, rank {})",
                cell.index, cell.name, spec.name, tc.rank
            ),
            memory::train_bytes(shape, cfg.dtype.kind(), &sizes),
            max,
        )?;
    }
    Ok(())
}

pub fn run(a: SweepArgs) -> Result<()> {
    if a.print_default {
        print!("{AUDIT_SWEEP}");
        return Ok(());
    }
    if let Some(dir) = &a.status {
        if !a.resubmit && (a.dry_run || a.sbatch.any() || a.device.is_some()) {
            bail!("--dry-run, --device and the Slurm options go with --status only together with --resubmit");
        }
        return status(&a, dir);
    }
    if !a.slurm && (a.dry_run || a.sbatch.any()) {
        bail!("--dry-run and the Slurm options (--partition, --gres, --cpus-per-task, --mem, --time, --max-parallel) go with --slurm or --resubmit");
    }
    let (mut cfg, text) = match &a.config {
        Some(p) => {
            // A regular file of at most 1 MiB: a FIFO or a device cannot hang or fill memory.
            let text = rankstab_records::guard::read_regular_text(p, MAX_CONFIG_BYTES)
                .with_context(|| format!("{}: cannot read the sweep configuration", p.display()))?;
            (
                SweepConfig::from_toml(&text, &p.display().to_string())?,
                text,
            )
        }
        None => (SweepConfig::audit(), AUDIT_SWEEP.to_string()),
    };
    if let Some(d) = a.device {
        cfg.device = d;
    }
    let cells = cfg.cells();
    if let Some(&bad) = a.cell.iter().find(|&&c| c >= cells.len()) {
        bail!(
            "--cell {bad} does not exist: this sweep has cells 0..={}",
            cells.len() - 1
        );
    }
    // The whole sweep is checked before sweep.json or cells/ are written: the
    // configuration (above), the models' paths and the data file.
    cfg.check_inputs()?;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "sweep-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    if a.list {
        for c in &cells {
            let state = RunState::of(&out.join("cells").join(&c.name));
            if a.json {
                crate::json_line(&serde_json::json!({
                    "event": "cell_state", "cell": c.index, "name": c.name,
                    "state": state.to_string(),
                }));
            } else {
                println!("{:>4}  {state:<9} {}", c.index, c.name);
            }
        }
        return Ok(());
    }
    if a.slurm {
        return submit(&a, &cfg, &text, &out);
    }
    preflight(&cfg, &cells, a.max_memory)?;
    let device = cfg.device.device()?;
    // Held for the sweep's life: exclusive for the whole sweep, shared for --cell tasks.
    let (manifest, _sweep_lock) = claim_dir(&out, &cfg, a.cell.is_empty())?;
    let chosen: Vec<usize> = if a.cell.is_empty() {
        (0..cells.len()).collect()
    } else {
        a.cell.clone()
    };
    // The device asked for (auto: what it became is `device`), and the Slurm job, task and
    // node of a cluster task.
    let meta = crate::run_meta(
        device,
        serde_json::json!({
            "sweep": out, "data": cfg.data, "dtype": cfg.dtype,
            "device_requested": cfg.device, "slurm": slurm::task_record(),
        }),
    );
    let total_steps: u64 = chosen
        .iter()
        .map(|&i| cfg.train_config(&manifest.cells[i]).steps as u64)
        .sum();
    let mut pb = crate::progress::Progress::new("sweep", total_steps);
    let mut loaded: Option<(String, LoadedModel)> = None;
    let mut data: Option<((String, u64), Dataset)> = None;
    let (mut done, mut skipped, mut diverged) = (0, 0, 0);
    for &i in &chosen {
        let cell = &manifest.cells[i];
        let dir = out.join("cells").join(&cell.name);
        let tc = cfg.train_config(cell);
        if RunState::of(&dir).is_finished() {
            pb.skip(tc.steps as u64);
            skipped += 1;
            continue;
        }
        // The cell's lock, held while it runs (another process running it: exit at once).
        let cell_lock = rankstab_records::RunLock::exclusive(&dir)
            .with_context(|| format!("cell {} ({})", cell.index, cell.name))?;
        if RunState::of(&dir).is_finished() {
            // Finished by another process meanwhile.
            pb.skip(tc.steps as u64);
            skipped += 1;
            continue;
        }
        crate::interrupt::running(&out, "rankstab sweep");
        // A signal (Slurm's SIGTERM before a preemption or the time limit) stops the cell
        // after its step with a checkpoint.
        crate::interrupt::checkpoint_on_signal(true);
        let t0 = Instant::now();
        if loaded.as_ref().is_none_or(|(n, _)| *n != cell.model) {
            pb.message(&format!("loading {}", cell.model));
            // Free the previous model before loading the next.
            drop(loaded.take());
            data = None;
            let spec = cfg.model(cell);
            loaded = Some((
                cell.model.clone(),
                load_model(spec, cfg.dtype.kind(), device)?,
            ));
        }
        let lm = &mut loaded.as_mut().expect("loaded above").1;
        let key = (cell.model.clone(), cell.seed);
        if data.as_ref().is_none_or(|(k, _)| *k != key) {
            data = Some((key, load_data(&cfg, lm, cell.seed)?));
        }
        let ds = &data.as_ref().expect("loaded above").1;
        let label = format!("cell {} ({})", cell.index, cell.name);
        // The model as `rankstab train --model` spells it: a path, or preset:NAME.
        let spec = cfg.model(cell);
        let model = match (&spec.path, &spec.preset) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(p)) => format!("preset:{p}"),
            (None, None) => cell.model.clone(),
        };
        let mut meta = meta.clone();
        meta.extra["model"] = serde_json::json!(model);
        // Steps of this cell counted so far (a resumed cell skips to its checkpoint).
        let mut counted = 0u64;
        let mut events = crate::tensorboard::EventWriter::create(&dir);
        let o = run_dir(&mut lm.model, ds, &tc, &dir, &meta, &cell_lock, |p| {
            pb.skip((p.step as u64).saturating_sub(counted));
            pb.step(&label, p);
            events.step(p);
            if a.json {
                let mut v = crate::train_cmd::step_json(p);
                v["cell"] = serde_json::json!(cell.index);
                crate::json_line(&v);
            }
            counted = p.step as u64 + 1;
        })
        .with_context(|| label.clone())?;
        crate::interrupt::checkpoint_on_signal(false);
        // A diverged cell stops early: count its remaining steps.
        pb.skip((tc.steps as u64).saturating_sub(counted));
        let what = match &o.diverged {
            Some(d) => {
                diverged += 1;
                d.clone()
            }
            None => format!("held-out perplexity {:.3}", o.heldout_loss.exp()),
        };
        let resumed = o
            .resumed_from
            .map_or(String::new(), |s| format!(", resumed at step {s}"));
        let line = format!(
            "cell {:>3} {}: {what} ({:.1} s{resumed})",
            cell.index,
            cell.name,
            t0.elapsed().as_secs_f64()
        );
        if a.json {
            crate::json_line(&serde_json::json!({
                "event": "cell",
                "cell": cell.index,
                "name": cell.name,
                "run_dir": dir,
                "status": if o.diverged.is_some() { "diverged" } else { "complete" },
                "note": o.diverged,
                "resumed_from": o.resumed_from,
                "heldout_perplexity": crate::train_cmd::finite(o.heldout_loss.exp()),
                "seconds": t0.elapsed().as_secs_f64(),
            }));
        } else {
            pb.println(&line);
        }
        done += 1;
    }
    pb.finish();
    // The lrs axis: each model's lr x rank study, once all of its grid's cells have ended.
    let widths = |spec: &rankstab_train::run::ModelSpec| {
        let shape = rankstab_train::load::inspect_spec(spec)?;
        Ok(shape
            .modules()
            .first()
            .map_or(0, |m| m.in_features as usize))
    };
    let studies = rankstab_train::sweep_lr::studies(&cfg, &manifest.cells, &out, &widths, &meta)
        .context("the sweep's lr x rank study")?;
    for st in &studies {
        match (&st.summary, a.json) {
            (Some(s), true) => crate::json_line(&serde_json::json!({
                "event": "transfer", "model": st.model, "run_dir": st.dir, "transfer": s,
                "verdict": crate::transfer_cmd::verdict_sentences(s),
            })),
            (Some(s), false) => {
                println!("\nlr x rank study of {} ({}):", st.model, st.dir.display());
                crate::transfer_cmd::print_study(s);
                for line in crate::transfer_cmd::verdict_sentences(s) {
                    println!("{line}");
                }
            }
            (None, true) => {}
            (None, false) => println!(
                "lr x rank study of {}: {} of {} cells ended; it is analysed once all have",
                st.model, st.ended, st.cells
            ),
        }
    }
    if a.json {
        let verdict = crate::verdict_of(&out)
            .map(|h| h.sentences)
            .unwrap_or_default();
        crate::json_line(&serde_json::json!({
            "event": "sweep", "run_dir": out, "run": done, "already_finished": skipped,
            "diverged": diverged, "verdict": verdict,
        }));
        return Ok(());
    }
    println!(
        "sweep: {done} cell(s) run, {skipped} already finished, {diverged} diverged; sweep directory: {}",
        out.display()
    );
    // The verdict over every finished cell of the sweep, as the report judges it.
    if let Some(h) = crate::verdict_of(&out) {
        crate::print_headline(&h);
    }
    Ok(())
}

/// `--slurm`: the cells to submit (those asked for with --cell, else all) that are not
/// finished, queued or running; the up-front checks; the script; `sbatch`.
fn submit(a: &SweepArgs, cfg: &SweepConfig, text: &str, out: &Path) -> Result<()> {
    let cells = cfg.cells();
    let opts = a.sbatch.options(a.device);
    opts.check()?;
    // The memory check against what a task asks for, not against this (login) node.
    let max = match (a.max_memory, &opts.mem) {
        (Some(m), _) => Some(m),
        (None, Some(mem)) => Some(slurm_mem_bytes(mem)?),
        (None, None) => Some(u64::MAX),
    };
    preflight(cfg, &cells, max).map_err(|e| match (&opts.mem, a.max_memory) {
        (Some(mem), None) => e.context(format!("--mem {mem} (the cap of each task)")),
        _ => e,
    })?;
    // sweep.json and cells/ before any task starts (the tasks then agree on them).
    let (manifest, lock) = claim_dir(out, cfg, false)?;
    drop(lock);
    let copy = slurm::config_copy(out);
    std::fs::create_dir_all(slurm::slurm_dir(out))
        .with_context(|| format!("{}: cannot create", slurm::slurm_dir(out).display()))?;
    slurm::write_text_atomic(&copy, text)?;
    let st = slurm::statuses(out, &manifest, &slurm::load_state(out)?);
    let mut todo = slurm::unfinished(&st);
    if !a.cell.is_empty() {
        todo.retain(|c| a.cell.contains(c));
    }
    submit_cells(a, out, &todo, &opts)
}

/// Submits `todo` (or says there is nothing to submit) and prints what was done.
fn submit_cells(a: &SweepArgs, out: &Path, todo: &[usize], opts: &SlurmOptions) -> Result<()> {
    if todo.is_empty() {
        println!(
            "nothing to submit: every cell of {} is finished, queued or running (see rankstab sweep --status {})",
            out.display(),
            out.display()
        );
        return Ok(());
    }
    let (script, job) = slurm::submit(out, todo, opts, a.dry_run)?;
    let cells = slurm::array_spec(todo);
    match (&job, a.json) {
        (Some(j), true) => crate::json_line(&serde_json::json!({
            "event": "slurm_submitted", "job_id": j, "cells": todo, "script": script,
        })),
        (None, true) => crate::json_line(&serde_json::json!({
            "event": "slurm_script", "cells": todo, "script": script,
        })),
        (Some(j), false) => {
            println!(
                "submitted Slurm job {j}: {} task(s), cells {cells}{}",
                todo.len(),
                opts.max_parallel
                    .map_or(String::new(), |k| format!(", at most {k} at once"))
            );
            println!(
                "script {}; logs {}/logs/cell-N.log; watch it with: rankstab sweep --status {}",
                script.display(),
                out.display(),
                out.display()
            );
        }
        (None, false) => println!(
            "wrote {} ({} task(s), cells {cells}); submit it with: sbatch {}",
            script.display(),
            todo.len(),
            script.display()
        ),
    }
    Ok(())
}

/// `--status DIR` (and `--resubmit`).
fn status(a: &SweepArgs, dir: &Path) -> Result<()> {
    let path = dir.join("sweep.json");
    if !path.is_file() {
        bail!(
            "--status {}: no sweep.json there: not a sweep directory",
            dir.display()
        );
    }
    let manifest: rankstab_train::sweep::SweepManifest = rankstab_records::read_json(&path)
        .with_context(|| format!("{}: the sweep's manifest", path.display()))?;
    let state = slurm::load_state(dir)?;
    let st = slurm::statuses(dir, &manifest, &state);
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for s in &st {
        *counts.entry(s.state).or_default() += 1;
        if a.json {
            crate::json_line(&serde_json::json!({ "event": "cell_status", "status": s }));
        } else {
            let loss = s.last_loss.map_or("-".into(), |l| format!("{l:.4}"));
            println!(
                "{:>4}  {:<9} step {:>6}/{:<6} loss {:>8}  {}{}{}",
                s.cell,
                s.state,
                s.steps_done,
                s.steps,
                loss,
                s.name,
                s.slurm
                    .as_ref()
                    .map_or(String::new(), |j| format!("  [{j}]")),
                if s.note.is_empty() {
                    String::new()
                } else {
                    format!("  {}", s.note)
                }
            );
        }
    }
    let summary: Vec<String> = ["complete", "diverged", "running", "pending", "failed"]
        .iter()
        .map(|k| format!("{} {k}", counts.get(k).copied().unwrap_or(0)))
        .collect();
    if a.json {
        crate::json_line(&serde_json::json!({
            "event": "sweep_status", "run_dir": dir, "cells": st.len(), "counts": counts,
            "jobs": state.job_ids(),
        }));
    } else {
        println!("{} cells: {}", st.len(), summary.join(", "));
    }
    if !a.resubmit {
        return Ok(());
    }
    // The tasks check their configuration against sweep.json: another device is refused
    // here, before anything is submitted.
    if let Some(d) = a.device {
        if d != manifest.config.device {
            bail!(
                "--device {d}: this sweep runs on {} (its sweep.json); a sweep keeps one device",
                manifest.config.device
            );
        }
    }
    let copy = slurm::config_copy(dir);
    if !copy.is_file() {
        bail!(
            "--resubmit {}: it was never submitted with --slurm (no {}): use rankstab sweep --config FILE --out {} --slurm",
            dir.display(),
            copy.display(),
            dir.display()
        );
    }
    let last = state
        .submissions
        .last()
        .map(|s| s.options.clone())
        .unwrap_or_default();
    let opts = last.overridden_by(&a.sbatch.options(a.device));
    opts.check()?;
    submit_cells(a, dir, &slurm::unfinished(&st), &opts)
}
