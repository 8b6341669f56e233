//! A sweep's `lrs` axis as a transfer study: does the learning rate transfer across ranks
//! in a real model?
//!
//! A sweep whose configuration gives an optimizer an `lrs` grid ([`LrGrids`]) trains every
//! rank, scaling and seed of a model at every value of the grid. Once every one of those
//! cells has ended, their final held-out losses are the rows of a transfer study
//! ([`rankstab_theory::transfer`]), analysed by the same code as `rankstab transfer`: lr*
//! per scaling and rank (the grid minimum of the seed-mean log loss, refined by a parabola
//! in `ln lr`; a minimum at the grid's edge is reported as such), a bootstrap interval over
//! the sweep's seeds, the exponent c of `lr* ~ r^c` with its 90% interval, and the loss at
//! lr* per rank. A cell that diverged counts as an infinite loss.
//!
//! No law predicts c for a trained model: the laws of proofs/lr-transfer.md need one
//! layer's data terms and target scale ([`Laws::None`]). Each exponent is judged against
//! c = 0, the published "the learning rate transfers across ranks" (rsLoRA with alpha/sqrt r;
//! LoRA Without Regret with alpha/r and Adam), with the rule of proofs/verdicts.md.
//!
//! The rank the update actually used is the stable rank of `gamma B A` the cells record
//! (mean over adapters, at the end of the run, at the grid lr nearest lr*), and the
//! adapters' output moment along the run gives the moment exponent per step (`horizon`).
//!
//! The study is written to `SWEEP/transfer-<model>/` (`manifest.json` with command
//! `transfer`, `transfer_runs.csv`, `transfer_steps.csv`, `transfer.json`), which
//! `rankstab report` reads like a `rankstab transfer` run. It is derived from the cells
//! and rewritten whenever the sweep ends with every cell of that model's grid ended.
use crate::run::{ModelSpec, RunMeta, RunState};
use crate::sweep::{Cell, LrGrids, SweepConfig};
use crate::TrainError;
use rankstab_records::{
    read_json, read_table, table_sizes, write_json_atomic, Manifest, Metric, MetricRow, MomentRow,
    RunStatus, Site, Stat, TableWriter, SCHEMA_VERSION,
};
use rankstab_theory::transfer::analyse::{analyse_with, Laws, TransferSummary};
use rankstab_theory::transfer::{RunRow, StepRow, Study, TransferConfig, RUNS, STEPS, SUMMARY};
use rankstab_theory::{AdapterInit, Init, Reuse};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bootstrap resamples of the seeds for a sweep's lr* intervals.
pub const BOOTSTRAP: usize = 1000;

/// The study directory of `model` in sweep directory `out`.
pub fn study_dir(out: &Path, model: &str) -> PathBuf {
    out.join(format!("transfer-{model}"))
}

/// One model's lr x rank study in a sweep.
#[derive(Debug, Clone)]
pub struct LrStudy {
    /// The model.
    pub model: String,
    /// Where the study is written.
    pub dir: PathBuf,
    /// Cells of the grid that have ended (complete or diverged).
    pub ended: usize,
    /// Cells of the grid.
    pub cells: usize,
    /// The analysis, once every cell has ended.
    pub summary: Option<TransferSummary>,
}

/// The transfer-study configuration that describes `model`'s cells: its ranks at `width`
/// (the model's hidden size), the sweep's scalings, the optimizers that have a grid, its
/// seeds and steps.
pub fn transfer_config(cfg: &SweepConfig, m: &ModelSpec, width: usize) -> TransferConfig {
    let grids: LrGrids = m.lrs.or(cfg.lrs).unwrap_or_default();
    let optimizers: Vec<_> = m
        .optimizers
        .as_ref()
        .unwrap_or(&cfg.optimizers)
        .iter()
        .copied()
        .filter(|&o| grids.of(o).is_some())
        .collect();
    let ranks = m.ranks.clone().unwrap_or_else(|| cfg.ranks.clone());
    let defaults = TransferConfig::default();
    TransferConfig {
        optimizers,
        scalings: cfg.scalings.clone(),
        adapter_inits: vec![AdapterInit::A],
        lr_ratios: vec![1.0],
        width_rank: ranks[0],
        ranks,
        width,
        widths: Vec::new(),
        batch: cfg.batch,
        heldout: cfg.heldout_max,
        inputs: Reuse::Fresh,
        dist: cfg.data.display().to_string(),
        init: Init::KaimingUniform,
        alpha: cfg.alpha,
        lrs: None,
        lrs_sgd: grids.sgd.unwrap_or(defaults.lrs_sgd),
        lrs_adam: grids.adamw.unwrap_or(defaults.lrs_adam),
        steps: m.steps.unwrap_or(cfg.steps),
        seeds: m.seeds.as_ref().unwrap_or(&cfg.seeds).len(),
        seed: 0,
        bootstrap: BOOTSTRAP,
        ..defaults
    }
}

/// A finished cell as a transfer study's row: its final held-out loss (the last
/// `heldout_loss` of `metrics.csv`; infinite when the cell diverged) and training loss.
///
/// # Errors
/// An unreadable `metrics.csv`, or a complete cell without a held-out loss.
pub fn run_row(cell: &Cell, dir: &Path, trial: u32, width: usize) -> Result<RunRow, TrainError> {
    let state = RunState::of(dir);
    let diverged = state == RunState::Diverged;
    // A cell that diverged counts as infinite whatever its table holds (it may have none).
    let metrics: Vec<MetricRow> = match read_table(&dir.join("metrics.csv")) {
        Err(_) if diverged => Vec::new(),
        m => m?,
    };
    let last = |metric: Metric| {
        metrics
            .iter()
            .filter(|r| r.metric == metric)
            .max_by_key(|r| r.step)
            .map(|r| (r.step, r.value))
    };
    let heldout = last(Metric::HeldoutLoss);
    // A run whose last update blew up the weights ends with a finite training loss and a
    // non-finite held-out loss: it diverged too, at its last step.
    let diverged = diverged || heldout.is_some_and(|h| !h.1.is_finite());
    let final_loss = match heldout {
        _ if diverged => f64::INFINITY,
        Some((_, v)) => v,
        None => {
            return Err(TrainError::Invalid(format!(
                "{}: a complete cell without a held-out loss in metrics.csv (heldout_max = 0 and no held-out data?)",
                dir.display()
            )))
        }
    };
    let train = last(Metric::Loss);
    Ok(RunRow {
        trial,
        seed: cell.seed,
        study: Study::Rank,
        width: width as u32,
        optimizer: cell.optimizer,
        beta: cell.beta,
        init: AdapterInit::A,
        lr_ratio: 1.0,
        rank: cell.rank as u32,
        lr: cell.lr,
        initial_loss: f64::NAN,
        final_loss,
        final_train_loss: train.map_or(f64::NAN, |t| t.1),
        diverged,
        steps_run: train.map_or(0, |t| t.0 + 1),
    })
}

/// A cell along its run, from its `moments.csv`: per probed step, the adapters' output
/// second moment (`fwd`, `abs`, m = 2) and, where recorded, the stable rank and norm of
/// `gamma B A`, each the mean over every adapter (layers and modules); then the last
/// recorded stable rank and norm once more as step `steps` (the end of the run), where the
/// analysis reads the rank the update used. A diverged cell's rows are kept as recorded.
///
/// # Errors
/// An unreadable `moments.csv` of a cell that did not diverge.
pub fn step_rows(
    cell: &Cell,
    dir: &Path,
    trial: u32,
    width: usize,
    steps: usize,
) -> Result<Vec<StepRow>, TrainError> {
    let moments: Vec<MomentRow> = match read_table(&dir.join("moments.csv")) {
        Err(_) if RunState::of(dir) == RunState::Diverged => Vec::new(),
        m => m?,
    };
    // Per step: sums and counts of (fwd m2, stable rank, delta norm).
    let mut at: BTreeMap<u32, [(f64, u32); 3]> = BTreeMap::new();
    for r in &moments {
        let which = match (r.site, r.stat, r.m) {
            (Site::Fwd, Stat::Abs, Some(2)) => 0,
            (Site::Param, Stat::StableRank, _) => 1,
            (Site::Param, Stat::DeltaNorm, _) => 2,
            _ => continue,
        };
        if r.value.is_finite() {
            let e = &mut at.entry(r.step).or_default()[which];
            e.0 += r.value;
            e.1 += 1;
        }
    }
    let mean = |(s, n): (f64, u32)| if n > 0 { s / f64::from(n) } else { f64::NAN };
    let row = |step: u32, v: [(f64, u32); 3]| StepRow {
        trial,
        study: Study::Rank,
        width: width as u32,
        optimizer: cell.optimizer,
        beta: cell.beta,
        init: AdapterInit::A,
        lr_ratio: 1.0,
        rank: cell.rank as u32,
        lr: cell.lr,
        step,
        heldout_loss: f64::NAN,
        fwd_m2: mean(v[0]),
        update_norm: mean(v[2]),
        stable_rank: mean(v[1]),
        effective_rank: f64::NAN,
        top_share: f64::NAN,
    };
    let mut out: Vec<StepRow> = at
        .iter()
        .filter(|(&k, _)| (k as usize) < steps)
        .map(|(&k, v)| row(k, *v))
        .collect();
    if let Some((_, v)) = at.iter().rev().find(|(_, v)| v[1].1 > 0) {
        out.push(row(steps as u32, [(0.0, 0), v[1], v[2]]));
    }
    Ok(out)
}

/// Every model of the sweep with an lr grid: how many of its cells have ended and, once all
/// have, its analysis, written to [`study_dir`]. `widths` gives each model's hidden size.
///
/// # Errors
/// A cell's unreadable metrics; writing the study.
pub fn studies(
    cfg: &SweepConfig,
    cells: &[Cell],
    out: &Path,
    widths: &dyn Fn(&ModelSpec) -> Result<usize, TrainError>,
    meta: &RunMeta,
) -> Result<Vec<LrStudy>, TrainError> {
    let mut found = Vec::new();
    for m in &cfg.models {
        let optimizers = m.optimizers.as_ref().unwrap_or(&cfg.optimizers);
        let mine: Vec<&Cell> = cells
            .iter()
            .filter(|c| c.model == m.name && cfg.lr_grid(m, c.optimizer).is_some())
            .collect();
        if mine.is_empty() || optimizers.iter().all(|&o| cfg.lr_grid(m, o).is_none()) {
            continue;
        }
        let dir = study_dir(out, &m.name);
        let cell_dir = |c: &Cell| out.join("cells").join(&c.name);
        let ended = mine
            .iter()
            .filter(|c| RunState::of(&cell_dir(c)).is_finished())
            .count();
        let mut study = LrStudy {
            model: m.name.clone(),
            dir: dir.clone(),
            ended,
            cells: mine.len(),
            summary: None,
        };
        if ended == mine.len() {
            let width = widths(m)?;
            let tc = transfer_config(cfg, m, width);
            let seeds = m.seeds.as_ref().unwrap_or(&cfg.seeds);
            let (mut rows, mut steps) = (Vec::new(), Vec::new());
            for c in &mine {
                let trial = seeds.iter().position(|&s| s == c.seed).unwrap_or(0) as u32;
                rows.push(run_row(c, &cell_dir(c), trial, width)?);
                steps.extend(step_rows(c, &cell_dir(c), trial, width, tc.steps)?);
            }
            let mut summary = analyse_with(&tc, &rows, &steps, Laws::None);
            summary.model = Some(m.name.clone());
            write(&dir, &tc, seeds, (&rows, &steps), &summary, meta)?;
            study.summary = Some(summary);
        }
        found.push(study);
    }
    Ok(found)
}

/// Writes a study directory: the rows, the analysis, then the manifest (complete) last.
fn write(
    dir: &Path,
    tc: &TransferConfig,
    seeds: &[u64],
    (rows, steps): (&[RunRow], &[StepRow]),
    summary: &TransferSummary,
    meta: &RunMeta,
) -> Result<(), TrainError> {
    let io = |e: std::io::Error| TrainError::Invalid(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    // Job-array tasks (`--cell`) that end together may each write the study: one at a
    // time (they write the same numbers).
    let _lock = rankstab_records::RunLock::wait_exclusive(dir)?;
    let manifest_path = dir.join("manifest.json");
    let created = read_json::<Manifest>(&manifest_path)
        .map(|m| m.created)
        .unwrap_or_else(|_| chrono::Utc::now().to_rfc3339());
    // The manifest is rewritten last: until then a reader sees the previous study whole
    // or a running one.
    let _ = std::fs::remove_file(&manifest_path);
    let mut table = TableWriter::<RunRow>::open(&dir.join(RUNS))?;
    table.clear()?;
    table.append(rows)?;
    drop(table);
    let mut table = TableWriter::<StepRow>::open(&dir.join(STEPS))?;
    table.clear()?;
    table.append(steps)?;
    drop(table);
    write_json_atomic(&dir.join(SUMMARY), summary)?;
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: "rankstab".into(),
        tool_version: meta.tool_version.clone(),
        git_revision: meta.git_revision.clone(),
        command: "transfer".into(),
        config: serde_json::to_value(tc).expect("the config serialises"),
        seeds: seeds.to_vec(),
        device: meta.device.clone(),
        created,
        finished: Some(chrono::Utc::now().to_rfc3339()),
        status: RunStatus::Complete,
        note: Some(
            "derived from the sweep's cells (rankstab sweep with lrs): rewritten when the sweep ends"
                .into(),
        ),
        tables: table_sizes(dir)?,
    };
    write_json_atomic(&manifest_path, &manifest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankstab_records::{Optimizer, Scaling};

    fn cell() -> Cell {
        Cell {
            index: 0,
            name: "c".into(),
            model: "m".into(),
            rank: 8,
            scaling: Scaling::RSLORA,
            beta: 0.5,
            optimizer: Optimizer::Sgd,
            lr: 0.1,
            seed: 3,
        }
    }

    fn metrics(dir: &Path, rows: &[(u32, Metric, f64)]) {
        let mut t = TableWriter::<MetricRow>::open(&dir.join("metrics.csv")).expect("open");
        let rows: Vec<MetricRow> = rows
            .iter()
            .map(|&(step, metric, value)| MetricRow {
                step,
                metric,
                value,
                ..MetricRow::default()
            })
            .collect();
        t.append(&rows).expect("append");
    }

    /// The row of a cell is its last held-out loss; a non-finite one (the last update blew
    /// up the weights) is a divergence, counted as infinite; none at all is an error.
    #[test]
    fn a_cells_row_is_its_last_heldout_loss_and_a_non_finite_one_diverged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = cell();
        metrics(
            dir.path(),
            &[
                (0, Metric::Loss, 5.0),
                (1, Metric::HeldoutLoss, 4.5),
                (3, Metric::Loss, 4.0),
                (3, Metric::HeldoutLoss, 3.9),
            ],
        );
        let r = run_row(&c, dir.path(), 2, 64).expect("a row");
        assert_eq!(
            (r.final_loss, r.final_train_loss, r.steps_run),
            (3.9, 4.0, 4)
        );
        assert!(!r.diverged && r.trial == 2 && r.seed == 3 && r.rank == 8 && r.width == 64);

        let dir = tempfile::tempdir().expect("tempdir");
        metrics(
            dir.path(),
            &[
                (3, Metric::Loss, 4.0),
                (3, Metric::HeldoutLoss, f64::INFINITY),
            ],
        );
        let r = run_row(&c, dir.path(), 0, 64).expect("a row");
        assert!(r.diverged && r.final_loss == f64::INFINITY);

        let dir = tempfile::tempdir().expect("tempdir");
        metrics(dir.path(), &[(3, Metric::Loss, 4.0)]);
        let e = run_row(&c, dir.path(), 0, 64).expect_err("no held-out loss");
        assert!(e.to_string().contains("held-out loss"), "{e}");
    }
}
