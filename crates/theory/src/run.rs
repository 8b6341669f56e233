//! A checker run: trials of every cell, written to a run directory as they finish, then
//! fits, summaries and closed-form checks computed from the files.
//!
//! Resume: after each trial the rows are appended and `progress.json` records the trial
//! and the table lengths. Running the same command again skips recorded trials and cuts
//! anything written after the last record, so a kill loses at most the trial in flight.
//!
//! Longer than 600 lines because the run's lifecycle (resume state, the tables written as
//! trials finish, fits, summaries, closed-form checks) is one sequence over one directory;
//! the fits themselves are `fits.rs`, the verdicts `predict/`.
use crate::closed_form::Coefficients;
use crate::config::{Reuse, TheoryConfig};
use crate::data::TrialData;
use crate::exact::rows::{law_rows, LawTables};
use crate::fits::fit_rows;
use crate::sim::{frozen_pass, prepare, run_cell, CellSpec};
use crate::stats::mean_ci;
use crate::TheoryError;
use rankstab_records::{
    files, read_json, read_moments, write_json_atomic, CoefRow, CoefStat, Fit, Manifest, Metric,
    MetricRow, MomentRow, Optimizer, RunLock, RunStatus, Scaling, Site, Stat, SummaryRow,
    TableWriter, SCHEMA_VERSION,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Progress reporting hooks (the CLI draws a bar; tests pass [`NoProgress`]).
pub trait Progress: Sync {
    /// Work of `total` cells begins.
    fn start(&self, total: u64);
    /// `n` more cells are done.
    fn inc(&self, n: u64);
    /// A status line.
    fn message(&self, msg: &str);
}

/// Progress that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn inc(&self, _: u64) {}
    fn message(&self, _: &str) {}
}

/// Options that do not change the numbers.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Worker threads (None: rayon's default, RAYON_NUM_THREADS or the core count).
    pub threads: Option<usize>,
    /// Source revision to record in the manifest.
    pub git_revision: Option<String>,
    /// Stop after this many trials in this invocation (for tests of resume).
    pub max_trials_this_run: Option<usize>,
    /// Refuse a run whose memory estimate exceeds this many bytes (None: the machine's
    /// available memory).
    pub max_memory: Option<u64>,
}

/// Closed-form check of the first-step SGD second moment against the Monte Carlo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosedFormCheck {
    /// sgd or sgd-momentum (identical at step 1).
    pub optimizer: Optimizer,
    /// Scaling.
    pub scaling: Scaling,
    /// Scaling exponent.
    pub beta: f64,
    /// Input regime.
    pub inputs: String,
    /// fwd or fwd_heldout.
    pub site: Site,
    /// Rank.
    pub rank: u32,
    /// Trials.
    pub trials: u32,
    /// Monte Carlo mean of E[y^2] over trials.
    pub monte_carlo: f64,
    /// Mean of the closed form over the same trials.
    pub closed_form: f64,
    /// (MC - closed form) / closed form.
    pub rel_diff: f64,
    /// 95% interval of the paired relative difference, lower end.
    pub rel_ci_low: f64,
    /// 95% interval of the paired relative difference, upper end.
    pub rel_ci_high: f64,
    /// Whether 0 lies in the interval.
    pub within: bool,
}

/// The distinct checks among `checks` and how many of them have 0 in their interval. Gamma
/// cancels from the relative difference and held-out inputs (and, at step 1, every input
/// regime's shared data) are the same across cells, so many cells repeat one check: cells
/// with the same optimizer, site, rank and the same relative difference and interval (to
/// 1e-6: gamma cancels in exact arithmetic, not in floating point) count once.
pub fn distinct_checks(checks: &[ClosedFormCheck]) -> (usize, usize) {
    let micro = |x: f64| (x * 1e6).round() as i64;
    let mut seen = std::collections::BTreeMap::new();
    for c in checks {
        seen.entry((
            c.optimizer,
            c.site,
            c.rank,
            micro(c.rel_diff),
            micro(c.rel_ci_low),
            micro(c.rel_ci_high),
        ))
        .or_insert(c.within);
    }
    (seen.len(), seen.values().filter(|&&w| w).count())
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run directory.
    pub dir: PathBuf,
    /// Fitted exponents.
    pub fits: Vec<Fit>,
    /// Closed-form checks.
    pub checks: Vec<ClosedFormCheck>,
    /// Trials computed by this invocation (0 when the run was already complete).
    pub trials_run: usize,
    /// Whether every trial is done.
    pub complete: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ProgressFile {
    done: Vec<usize>,
    moments_len: u64,
    metrics_len: u64,
    /// Absent in runs written before coefficients.csv existed (their coefficients are in
    /// moments.csv).
    #[serde(default)]
    coefficients_len: Option<u64>,
}

const PROGRESS: &str = "progress.json";
/// Closed-form checks file name.
pub const CHECKS: &str = "checks.json";
/// Trial-aggregated summary file name.
pub const SUMMARY: &str = "summary.csv";

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TheoryError + '_ {
    move |source| TheoryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cells of one trial, in canonical order.
pub fn cells(cfg: &TheoryConfig) -> Vec<CellSpec> {
    let mut out = Vec::new();
    for &reuse in &cfg.inputs {
        for &opt in &cfg.optimizers {
            for &scaling in &cfg.scalings {
                for &rank in &cfg.ranks {
                    out.push(CellSpec {
                        opt,
                        scaling,
                        reuse,
                        rank,
                    });
                }
            }
        }
    }
    out
}

fn config_value(cfg: &TheoryConfig) -> serde_json::Value {
    serde_json::to_value(cfg).expect("the config serialises")
}

/// Runs (or resumes) the checker into `out`.
///
/// # Errors
/// Invalid configuration (nothing is written), an `out` that holds something else, I/O.
pub fn run(
    cfg: &TheoryConfig,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<RunOutcome, TheoryError> {
    cfg.validate()?;
    if cfg.ranks.len() < 2 {
        return Err(TheoryError::Invalid(format!(
            "ranks {:?}: a run fits rank exponents, which need at least two ranks (three or \
             more for a judged slope), e.g. --ranks 4,8,16",
            cfg.ranks
        )));
    }
    cfg.input_dist()?;
    let cell_list = cells(cfg);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| {
            TheoryError::Invalid(format!("cannot start {:?} threads: {e}", opts.threads))
        })?;
    let threads = pool.current_num_threads();
    let estimate = memory_estimate(cfg, threads);
    rankstab_records::guard::check_memory(
        &format!(
            "this theory run (width {}, {} layers, {threads} threads)",
            cfg.width, cfg.layers
        ),
        estimate.min(u64::MAX as f64) as u64,
        opts.max_memory,
    )
    .map_err(TheoryError::Invalid)?;

    in_run_dir(out, || {
        run_locked(cfg, out, opts, progress, &pool, &cell_list)
    })
}

/// Runs `work` in the run directory `out`, locked: `out` must be absent, empty or a
/// rankstab run; a directory this call created is removed again if `work` fails before
/// writing anything into it.
pub(crate) fn in_run_dir<T>(
    out: &Path,
    work: impl FnOnce() -> Result<T, TheoryError>,
) -> Result<T, TheoryError> {
    let existed = out.exists();
    // A run that holds the lock is in use, whatever it has written so far.
    rankstab_records::guard::refuse_if_held(out)?;
    if existed
        && !out.join(files::MANIFEST).exists()
        && !rankstab_records::guard::is_empty_dir(out)?
    {
        return Err(TheoryError::Exists(format!(
            "{} exists and is not a rankstab run directory: choose another --out",
            out.display()
        )));
    }
    // Held until the work returns; the OS releases it if the process dies.
    let lock = RunLock::exclusive(out)?;
    let result = work();
    if result.is_err() && !existed && rankstab_records::guard::is_empty_dir(out).unwrap_or(false) {
        let _ = std::fs::remove_dir_all(out);
    }
    drop(lock);
    result
}

/// The manifest of the run directory `out`: an existing one must be of `command`, of this
/// schema, with a configuration that `same` accepts, and its finished tables as they were
/// at completion; otherwise a new one is written with status running.
pub(crate) fn open_manifest(
    out: &Path,
    command: &str,
    config: serde_json::Value,
    same: impl Fn(&serde_json::Value) -> bool,
    seeds: Vec<u64>,
    threads: usize,
    opts: &RunOptions,
) -> Result<Manifest, TheoryError> {
    let manifest_path = out.join(files::MANIFEST);
    if manifest_path.exists() {
        let m: Manifest = read_json(&manifest_path)?;
        if m.schema_version != SCHEMA_VERSION {
            return Err(rankstab_records::RecordsError::Schema {
                path: manifest_path,
                found: m.schema_version,
                expected: SCHEMA_VERSION,
            }
            .into());
        }
        if m.command != command || !same(&m.config) {
            return Err(TheoryError::Exists(format!(
                "{} holds a run with a different configuration: choose another --out or remove it",
                out.display()
            )));
        }
        // A finished run is only re-read: its tables must be as they were at completion.
        rankstab_records::verify_tables(out, &m)?;
        return Ok(m);
    }
    let m = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: "rankstab".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: opts.git_revision.clone(),
        command: command.into(),
        config,
        seeds,
        device: format!("cpu ({threads} threads)"),
        created: now(),
        finished: None,
        status: RunStatus::Running,
        note: None,
        tables: Default::default(),
    };
    write_json_atomic(&manifest_path, &m)?;
    Ok(m)
}

/// [`run`] once the run directory is locked.
fn run_locked(
    cfg: &TheoryConfig,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
    pool: &rayon::ThreadPool,
    cell_list: &[CellSpec],
) -> Result<RunOutcome, TheoryError> {
    let dist = cfg.input_dist()?;
    let threads = pool.current_num_threads();
    let manifest_path = out.join(files::MANIFEST);
    // Compared as configurations, not as JSON: the same run written by an older rankstab
    // may spell a value differently (a scaling "0.75" is now "beta=0.75").
    let mut manifest = open_manifest(
        out,
        "theory",
        config_value(cfg),
        |v| serde_json::from_value::<TheoryConfig>(v.clone()).is_ok_and(|c| c == *cfg),
        (0..cfg.trials)
            .map(|t| crate::data::trial_seed(cfg.seed, t))
            .collect(),
        threads,
        opts,
    )?;

    let progress_path = out.join(PROGRESS);
    let mut state: ProgressFile = if progress_path.exists() {
        read_json(&progress_path)?
    } else {
        ProgressFile::default()
    };
    let mut moments = TableWriter::<MomentRow>::open(&out.join(files::MOMENTS))?;
    let mut metrics = TableWriter::<MetricRow>::open(&out.join(files::METRICS))?;
    let mut coefficients = TableWriter::<CoefRow>::open(&out.join(files::COEFFICIENTS))?;
    if !state.done.is_empty() {
        moments.truncate(state.moments_len)?;
        metrics.truncate(state.metrics_len)?;
        match state.coefficients_len {
            Some(len) => coefficients.truncate(len)?,
            None => coefficients.clear()?,
        }
    } else {
        // Rows of a first trial killed before it was recorded.
        moments.clear()?;
        metrics.clear()?;
        coefficients.clear()?;
    }
    let todo: Vec<usize> = (0..cfg.trials)
        .filter(|t| !state.done.contains(t))
        .collect();
    let budget = opts.max_trials_this_run.unwrap_or(usize::MAX);
    let todo: Vec<usize> = todo.into_iter().take(budget).collect();
    progress.start((todo.len() * cell_list.len()) as u64);
    let tables = LawTables::shared(cfg);
    let mut trials_run = 0;
    for &trial in &todo {
        progress.message(&format!("trial {}/{}", trial + 1, cfg.trials));
        let rows =
            pool.install(|| trial_rows_inner(cfg, dist, cell_list, trial, &tables, progress));
        moments.append(&rows.moments)?;
        metrics.append(&rows.metrics)?;
        coefficients.append(&rows.coefficients)?;
        state.done.push(trial);
        state.moments_len = moments.len()?;
        state.metrics_len = metrics.len()?;
        state.coefficients_len = Some(coefficients.len()?);
        write_json_atomic(&progress_path, &state)?;
        trials_run += 1;
    }
    let complete = state.done.len() == cfg.trials;
    let (fits, checks) = if complete {
        progress.message("fitting");
        let (rows, coefs) = read_moments(&out.join(files::MOMENTS))?;
        let fits = fit_rows(cfg, &rows, &coefs);
        let checks = closed_form_checks(&rows);
        let summary = summarize(&rows);
        write_json_atomic(&out.join(files::FITS), &fits)?;
        write_json_atomic(&out.join(CHECKS), &checks)?;
        let sp = out.join(SUMMARY);
        if sp.exists() {
            std::fs::remove_file(&sp).map_err(io(&sp))?;
        }
        TableWriter::<SummaryRow>::open(&sp)?.append(&summary)?;
        if manifest.status != RunStatus::Complete {
            manifest.status = RunStatus::Complete;
            manifest.finished = Some(now());
            rankstab_records::parquet_copy::write_parquet_copies(
                out,
                rankstab_records::parquet_copy::PARQUET_MIN_BYTES,
            )?;
            manifest.tables = rankstab_records::table_sizes(out)?;
            write_json_atomic(&manifest_path, &manifest)?;
        }
        (fits, checks)
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(RunOutcome {
        dir: out.to_path_buf(),
        fits,
        checks,
        trials_run,
        complete,
    })
}

/// The rows of one trial.
#[derive(Debug, Clone, Default)]
pub struct TrialRows {
    /// Moments and norms of every cell, and the closed-form first-step moments.
    pub moments: Vec<MomentRow>,
    /// Losses of every cell.
    pub metrics: Vec<MetricRow>,
    /// The exact first-step law's data coefficients.
    pub coefficients: Vec<CoefRow>,
    /// Floating-point operations of the trial's matrix products, counted as they were
    /// computed (what [`trial_flops`] models).
    pub flops: f64,
    /// Wall-clock seconds of the trial's parts (summed over trials when collected).
    pub seconds: TrialSeconds,
}

/// Where a trial's wall-clock time went (`make bench` prints it beside the roofline: the
/// products and optimizer steps the roofline models are in `cells`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrialSeconds {
    /// Drawing the trial's data and the cell-independent products.
    pub data: f64,
    /// Running every cell (forward, backward, optimizer steps, moments).
    pub cells: f64,
    /// The rows: nearly all of it the exact first-step law's coefficients and rows and the
    /// closed forms (the cells' own rows are only gathered here).
    pub law: f64,
}

impl FromIterator<TrialRows> for TrialRows {
    /// The rows of several trials, one after the other.
    fn from_iter<I: IntoIterator<Item = TrialRows>>(iter: I) -> Self {
        let mut all = TrialRows::default();
        for t in iter {
            all.moments.extend(t.moments);
            all.metrics.extend(t.metrics);
            all.coefficients.extend(t.coefficients);
            all.flops += t.flops;
            all.seconds.data += t.seconds.data;
            all.seconds.cells += t.seconds.cells;
            all.seconds.law += t.seconds.law;
        }
        all
    }
}

/// Computes one trial: every cell's moment rows and metric rows, plus the exact first-step
/// coefficients and closed forms. Pure computation (no I/O); runs on the current rayon pool
/// and gives bit-identical results whatever its size.
///
/// # Errors
/// An invalid configuration.
///
/// ```
/// use rankstab_records::{Metric, Site};
/// let cfg = rankstab_theory::TheoryConfig { width: 32, ranks: vec![2, 4], trials: 1, ..Default::default() };
/// let rows = rankstab_theory::trial_rows(&cfg, 0).unwrap();
/// assert!(rows.moments.iter().any(|r| r.site == Site::Fwd && r.step == 1 && r.value > 0.0));
/// assert!(rows.metrics.iter().any(|r| r.metric == Metric::Loss));
/// ```
pub fn trial_rows(cfg: &TheoryConfig, trial: usize) -> Result<TrialRows, TheoryError> {
    cfg.validate()?;
    let dist = cfg.input_dist()?;
    let tables = LawTables::shared(cfg);
    Ok(trial_rows_inner(
        cfg,
        dist,
        &cells(cfg),
        trial,
        &tables,
        &NoProgress,
    ))
}

fn trial_rows_inner(
    cfg: &TheoryConfig,
    dist: crate::config::InputDist,
    cell_list: &[CellSpec],
    trial: usize,
    tables: &LawTables,
    progress: &dyn Progress,
) -> TrialRows {
    let need_fresh = cfg.inputs.contains(&Reuse::Fresh);
    let t0 = std::time::Instant::now();
    let data = TrialData::draw(cfg, dist, trial, need_fresh);
    let prep = prepare(cfg, &data);
    let secs_data = t0.elapsed().as_secs_f64();
    tracing::debug!("trial {trial}: data drawn in {secs_data:.2} s");
    let t0 = std::time::Instant::now();
    // Largest ranks first so the workers finish together.
    let mut order: Vec<usize> = (0..cell_list.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(cell_list[i].rank));
    let mut results: Vec<(usize, crate::sim::CellResult)> = order
        .par_iter()
        .map(|&i| {
            let r = run_cell(cfg, &data, &prep, &cell_list[i]);
            progress.inc(1);
            (i, r)
        })
        .collect();
    results.sort_by_key(|(i, _)| *i);
    let secs_cells = t0.elapsed().as_secs_f64();
    tracing::debug!("trial {trial}: cells in {secs_cells:.2} s");
    let t0 = std::time::Instant::now();
    let mut out = TrialRows {
        flops: prep.flops + results.iter().map(|(_, r)| r.flops).sum::<f64>(),
        ..Default::default()
    };
    for (i, res) in &results {
        let c = &cell_list[*i];
        let base = MomentRow {
            source: "theory".into(),
            model: "synthetic".into(),
            module: "adapter".into(),
            rank: c.rank as u32,
            alpha: cfg.alpha,
            scaling: c.scaling,
            beta: c.scaling.beta(),
            optimizer: c.opt,
            inputs: c.reuse.to_string(),
            dist: dist.to_string(),
            width: cfg.width as u32,
            seed: data.seed,
            ..Default::default()
        };
        for o in &res.obs {
            out.moments.push(MomentRow {
                layer: o.layer,
                step: o.step,
                site: o.site,
                stat: o.stat,
                m: o.m,
                value: o.value,
                ..base.clone()
            });
        }
        for &(step, loss, loss_h) in &res.losses {
            for (metric, value) in [(Metric::Loss, loss), (Metric::HeldoutLoss, loss_h)] {
                out.metrics.push(MetricRow {
                    source: "theory".into(),
                    model: "synthetic".into(),
                    rank: c.rank as u32,
                    scaling: c.scaling,
                    beta: c.scaling.beta(),
                    optimizer: c.opt,
                    inputs: c.reuse.to_string(),
                    seed: data.seed,
                    step,
                    metric,
                    value,
                });
            }
        }
    }
    let (coefs, closed) = coefficient_rows(cfg, &data, &prep, cell_list, &dist.to_string());
    out.moments.extend(closed);
    out.coefficients = coefs;
    let base = MomentRow {
        source: "theory".into(),
        model: "synthetic".into(),
        module: "adapter".into(),
        alpha: cfg.alpha,
        dist: dist.to_string(),
        width: cfg.width as u32,
        seed: data.seed,
        ..Default::default()
    };
    out.moments
        .extend(law_rows(cfg, &data, &prep, cell_list, tables, &base));
    let secs_law = t0.elapsed().as_secs_f64();
    tracing::debug!("trial {trial}: rows, law rows and closed forms in {secs_law:.2} s");
    out.seconds = TrialSeconds {
        data: secs_data,
        cells: secs_cells,
        law: secs_law,
    };
    out
}

/// Rows with the exact first-step coefficients (per regime, layer, site) and the closed-form
/// first-step SGD second moment of every SGD-family cell at layer 0.
fn coefficient_rows(
    cfg: &TheoryConfig,
    data: &TrialData,
    prep: &crate::sim::Prepared,
    cell_list: &[CellSpec],
    dist: &str,
) -> (Vec<CoefRow>, Vec<MomentRow>) {
    let mut coefs = Vec::new();
    let mut rows = Vec::new();
    let n = prep.n_train;
    let (u_stack0, v_train) = frozen_pass(cfg, data, prep, 0);
    for &reuse in &cfg.inputs {
        // The training rows the adapter is evaluated on at step 1, and the held-out rows.
        let fwd_u = match reuse {
            Reuse::Coherent => u_stack0.clone(),
            Reuse::Fresh => frozen_pass(cfg, data, prep, 1).0,
        };
        for (site, stack, rows_range) in [
            (Site::Fwd, &fwd_u, 0..n),
            (Site::FwdHeldout, &u_stack0, n..u_stack0[0].nrows()),
        ] {
            for l in 0..cfg.layers {
                let u_train = u_stack0[l].slice(ndarray::s![..n, ..]).to_owned();
                let u_test = stack[l]
                    .slice(ndarray::s![rows_range.clone(), ..])
                    .to_owned();
                let c = Coefficients::new(&u_train, &v_train[l], &u_test, cfg.init.kurtosis());
                let base = MomentRow {
                    source: "theory".into(),
                    model: "synthetic".into(),
                    module: "adapter".into(),
                    layer: l as u32,
                    alpha: cfg.alpha,
                    inputs: reuse.to_string(),
                    dist: dist.into(),
                    width: cfg.width as u32,
                    seed: data.seed,
                    step: 1,
                    site,
                    ..Default::default()
                };
                for (stat, value) in [
                    (CoefStat::Lin, c.lin),
                    (CoefStat::Quad, c.quad),
                    (CoefStat::Entries, c.entries),
                ] {
                    coefs.push(CoefRow::at(&base, stat, value));
                }
                if l > 0 {
                    continue;
                }
                for cell in cell_list
                    .iter()
                    .filter(|c| c.reuse == reuse && !c.opt.is_adaptive())
                {
                    let gamma = cell.scaling.factor(cfg.alpha, cell.rank);
                    let s2 = cfg.init.variance(cfg.width, cell.rank);
                    rows.push(MomentRow {
                        optimizer: cell.opt,
                        scaling: cell.scaling,
                        beta: cell.scaling.beta(),
                        rank: cell.rank as u32,
                        stat: Stat::ClosedForm,
                        m: Some(2),
                        value: c.mean_second_moment(cell.rank, cfg.lr(cell.opt), gamma, s2),
                        ..base.clone()
                    });
                }
            }
        }
    }
    (coefs, rows)
}

/// What a closed-form check pairs: one cell and site at layer 0, step 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CheckKey {
    optimizer: Optimizer,
    scaling: Scaling,
    inputs: String,
    site: Site,
    rank: u32,
}

/// Paired comparison of the closed-form first-step moment with the Monte Carlo.
pub fn closed_form_checks(rows: &[MomentRow]) -> Vec<ClosedFormCheck> {
    let mut cf: BTreeMap<CheckKey, BTreeMap<u64, f64>> = BTreeMap::new();
    let mut mc: BTreeMap<CheckKey, BTreeMap<u64, f64>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.layer == 0 && r.step == 1 && r.m == Some(2))
    {
        let k = CheckKey {
            optimizer: r.optimizer,
            scaling: r.scaling,
            inputs: r.inputs.clone(),
            site: r.site,
            rank: r.rank,
        };
        match r.stat {
            Stat::ClosedForm => {
                cf.entry(k).or_default().insert(r.seed, r.value);
            }
            Stat::Abs if r.site.is_forward() => {
                mc.entry(k).or_default().insert(r.seed, r.value);
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (k, cfs) in cf {
        let Some(mcs) = mc.get(&k) else { continue };
        let pairs: Vec<(f64, f64)> = cfs
            .iter()
            .filter_map(|(s, c)| mcs.get(s).map(|m| (*m, *c)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let cf_mean = pairs.iter().map(|p| p.1).sum::<f64>() / pairs.len() as f64;
        let rel: Vec<f64> = pairs.iter().map(|(m, c)| (m - c) / cf_mean).collect();
        let ci = mean_ci(&rel);
        out.push(ClosedFormCheck {
            optimizer: k.optimizer,
            scaling: k.scaling,
            beta: k.scaling.beta(),
            inputs: k.inputs,
            site: k.site,
            rank: k.rank,
            trials: pairs.len() as u32,
            monte_carlo: pairs.iter().map(|p| p.0).sum::<f64>() / pairs.len() as f64,
            closed_form: cf_mean,
            rel_diff: ci.mean,
            rel_ci_low: ci.low,
            rel_ci_high: ci.high,
            within: ci.low <= 0.0 && 0.0 <= ci.high,
        });
    }
    out
}

/// What a summary row aggregates over: everything but the seed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SummaryKey {
    optimizer: Optimizer,
    scaling: Scaling,
    inputs: String,
    layer: u32,
    rank: u32,
    step: u32,
    site: Site,
    stat: Stat,
    m: Option<u32>,
}

/// Trial means with t-intervals of every measured statistic.
pub fn summarize(rows: &[MomentRow]) -> Vec<SummaryRow> {
    let mut g: BTreeMap<SummaryKey, Vec<f64>> = BTreeMap::new();
    for r in rows {
        let k = SummaryKey {
            optimizer: r.optimizer,
            scaling: r.scaling,
            inputs: r.inputs.clone(),
            layer: r.layer,
            rank: r.rank,
            step: r.step,
            site: r.site,
            stat: r.stat,
            m: r.m,
        };
        g.entry(k).or_default().push(r.value);
    }
    g.into_iter()
        .map(|(k, v)| {
            let ci = mean_ci(&v);
            SummaryRow {
                source: "theory".into(),
                optimizer: k.optimizer,
                scaling: k.scaling,
                beta: k.scaling.beta(),
                inputs: k.inputs,
                layer: k.layer,
                rank: k.rank,
                step: k.step,
                site: k.site,
                stat: k.stat,
                m: k.m,
                trials: v.len() as u32,
                mean: ci.mean,
                se: ci.se,
                ci_low: ci.low,
                ci_high: ci.high,
            }
        })
        .collect()
}

/// What one adapter's step touches in the checker's kernels (`sim.rs`), for the models of
/// [`trial_flops`] and [`trial_bytes`]: which of its products it computes and which factor
/// it updates. At step 0 B = 0, so neither forward product through B nor either backward
/// product is computed, and A is updated only if Adam's weight decay moves it (its
/// gradient is zero); layer 0's u A^T is the trial's shared product while A is the draw.
struct StepWork {
    /// u A^T.
    a_forward: bool,
    /// (gamma A u) B^T.
    b_forward: bool,
    /// (gamma v B) A.
    a_back: bool,
    /// v B.
    b_back: bool,
    /// A's gradient and update.
    a_update: bool,
    /// B's gradient and update.
    b_update: bool,
}

/// How many of `xs` are true.
fn how_many(xs: &[bool]) -> f64 {
    xs.iter().filter(|&&x| x).count() as f64
}

impl StepWork {
    fn of(cfg: &TheoryConfig, opt: Optimizer, layer: usize, t: usize) -> Self {
        let updates = t < cfg.steps;
        let a_moves_at_0 = cfg.weight_decay != 0.0 && opt.is_adaptive();
        let a_drawn = t == 0 || (t == 1 && !a_moves_at_0);
        StepWork {
            a_forward: layer > 0 || !a_drawn,
            b_forward: t > 0,
            a_back: t > 0,
            b_back: t > 0,
            a_update: updates && (t > 0 || a_moves_at_0),
            b_update: updates,
        }
    }
}

/// Floating-point operations of the matrix products one trial of `cfg` computes (every
/// cell). Per adapter and step: the forward products u A^T and (gamma A u) B^T (2 M d r
/// each, M = batch + held-out rows), the backward products v B and (gamma v B) A (2 N d r
/// each) and, on the steps that update, the two gradients (2 N d r each); plus the frozen
/// products of the layers above the first (2 M d^2 and 2 N d^2 a step), and `delta_norm`'s
/// two r x r Grams (2 x 2 d r^2). Less what the checker knows without computing (`sim.rs`):
///
/// * at step 0, B = 0, so (gamma A u) B^T, v B and gamma v B are zero, and A's gradient is
///   zero, so A is not updated unless Adam's weight decay acts;
/// * while A is its initial draw (steps 0 and 1 when A was not updated at step 0), layer
///   0's u A^T is a slice of the trial's one product of each of the first two input stacks
///   with the draw of the largest rank (2 M d r_max each, counted once per trial).
///
/// Used by the benchmark to turn time into GFLOP/s, and tested against the count the
/// checker keeps as it computes (`TrialRows::flops`).
///
/// ```
/// use rankstab_records::{Optimizer, Scaling};
/// let cfg = rankstab_theory::TheoryConfig { width: 8, ranks: vec![2], optimizers: vec![Optimizer::Sgd],
///     scalings: vec![Scaling::LORA], inputs: vec![rankstab_theory::Reuse::Coherent], batch: 1, heldout: 1, steps: 1, ..Default::default() };
/// // M = 2, N = 1, d = 8, r = 2. Shared: u A^T of stack 0, 2*2*8*2 = 64. Step 0: B's
/// // gradient only, 2*1*8*2 = 32. Step 1 (A still drawn, no update): (gamma A u) B^T 64,
/// // v B 32, (gamma v B) A 32.
/// assert_eq!(rankstab_theory::trial_flops(&cfg), 64.0 + 32.0 + 64.0 + 32.0 + 32.0);
/// ```
pub fn trial_flops(cfg: &TheoryConfig) -> f64 {
    let d = cfg.width as f64;
    let n = cfg.batch as f64;
    let m = (cfg.batch + cfg.heldout) as f64;
    let per_rank_cells = (cfg.inputs.len() * cfg.scalings.len()) as f64;
    let r_max = cfg.ranks.iter().copied().max().unwrap_or(0) as f64;
    let stacks = if cfg.inputs.contains(&Reuse::Fresh) {
        cfg.steps + 1
    } else {
        1
    };
    let mut total = stacks.min(crate::sim::SHARED_STACKS) as f64 * 2.0 * m * d * r_max;
    for &r in &cfg.ranks {
        let r = r as f64;
        for &opt in &cfg.optimizers {
            let mut per_cell = 0.0;
            for l in 0..cfg.layers {
                for t in 0..=cfg.steps {
                    let w = StepWork::of(cfg, opt, l, t);
                    // Forward: u A^T, then (gamma A u) B^T.
                    let forward = [w.a_forward, w.b_forward];
                    // Backward: v B and B's gradient, (gamma v B) A and A's gradient.
                    let backward = [w.b_back, w.b_update, w.a_back, w.a_update];
                    let mut f = how_many(&forward) * 2.0 * m * d * r
                        + how_many(&backward) * 2.0 * n * d * r;
                    if cfg.delta_norm {
                        f += 4.0 * d * r * r;
                    }
                    if l > 0 {
                        f += 2.0 * m * d * d + 2.0 * n * d * d;
                    }
                    per_cell += f;
                }
            }
            total += per_rank_cells * per_cell;
        }
    }
    total
}

/// Bytes one trial of `cfg` must move between the cores and main memory: the denominator
/// of the checker's arithmetic intensity (`trial_flops / trial_bytes`), for the roofline of
/// the benchmark. `cache` is the cache that holds a cell's factors between its products
/// (the L2 of one core: each worker runs one cell at a time).
///
/// The model follows the kernels of `sim.rs` (f32 entries, 4 bytes each), per cell and
/// adapter (rank r, width d, N training rows, M = N + held-out rows, S steps, s = 0, 1 or
/// 2 optimizer state matrices per factor for SGD, momentum, Adam):
///
/// * Factors (A: r x d, B: d x r, and their state): at the start, A's rows are read from
///   the trial's draw and A, B and the state written, (1 + 2 + 2s) r d entries. If A, B and
///   the state together exceed `cache`, every step also moves them, as far as its products
///   and updates touch them ([`trial_flops`] lists what is skipped): the forward products
///   read A (not at layer 0 while A is the draw) and B (not at step 0, where B = 0), r d
///   each; each fused backward pass reads its factor once (r d) when it computes its
///   product or updates, and an update writes the factor and reads and writes its state
///   ((1 + 2s) r d); Adam's eps share reads both second moments on every updating step
///   (2 r d). Without anything skipped, 4 r d a step and (2 + 4s + 2) r d more on an
///   updating step. If they fit in `cache`, they are counted once (the start only).
/// * Activations (M x d and N x d, re-created every step, so always counted): per step the
///   products read u (M d) and write the adapter output (M d); the loss reads the frozen
///   output and target (2 M d) and writes v (N d); the backward passes read v and u (2 N d)
///   and write the input gradient (N d); the rank-r intermediates gamma A u (written M r,
///   read M r + N r) and gamma v B (written and read, 2 N r). In all 4 M d + 4 N d +
///   (2 M + 3 N) r entries.
/// * Layers above the first: each step reads the frozen weight twice (forward and back,
///   2 d^2 when it exceeds `cache`) and moves the same activations again.
///
/// The trial's set-up (drawing, the frozen layer-0 products shared by every cell) is not
/// counted, as in [`trial_flops`]. Intermediates smaller than `cache` that live inside one
/// fused pass (the gradient blocks) are not counted: they never leave the cache.
///
/// ```
/// use rankstab_records::{Optimizer, Scaling};
/// let cfg = rankstab_theory::TheoryConfig { width: 8, ranks: vec![2], optimizers: vec![Optimizer::Sgd],
///     scalings: vec![Scaling::LORA], inputs: vec![rankstab_theory::Reuse::Coherent], batch: 1, heldout: 1, steps: 1, ..Default::default() };
/// // Factors counted every step (no cache), r d = 16: start 3 r d = 48; step 0 reads and
/// // writes B for its update (2 r d); step 1 reads B forward and A and B backward (3 r d);
/// // activations per step 4*2*8 + 4*1*8 + (2*2 + 3*1)*2 = 110, two steps: 220.
/// assert_eq!(rankstab_theory::trial_bytes(&cfg, 0.0), 4.0 * (48.0 + 32.0 + 48.0 + 220.0));
/// ```
pub fn trial_bytes(cfg: &TheoryConfig, cache: f64) -> f64 {
    let f = 4.0; // bytes of an f32
    let d = cfg.width as f64;
    let n = cfg.batch as f64;
    let m = (cfg.batch + cfg.heldout) as f64;
    let steps = cfg.steps as f64;
    let per_rank_cells = (cfg.inputs.len() * cfg.scalings.len()) as f64;
    let mut total = 0.0;
    for &r in &cfg.ranks {
        let r = r as f64;
        for &opt in &cfg.optimizers {
            let s = match opt {
                Optimizer::Sgd => 0.0,
                Optimizer::SgdMomentum => 1.0,
                Optimizer::Adam | Optimizer::Adamw => 2.0,
            };
            let start = (3.0 + 2.0 * s) * r * d;
            let mut factors = 0.0;
            if f * (2.0 + 2.0 * s) * r * d > cache {
                for l in 0..cfg.layers {
                    for t in 0..=cfg.steps {
                        let w = StepWork::of(cfg, opt, l, t);
                        // A and B read forward; each read once by its fused pass when the
                        // pass computes its product or updates.
                        let reads = [
                            w.a_forward,
                            w.b_forward,
                            w.a_back || w.a_update,
                            w.b_back || w.b_update,
                        ];
                        let mut per = how_many(&reads);
                        for up in [w.a_update, w.b_update] {
                            if up {
                                per += 1.0 + 2.0 * s;
                            }
                        }
                        if w.b_update && opt.is_adaptive() {
                            per += 2.0;
                        }
                        if cfg.delta_norm {
                            per += 2.0;
                        }
                        factors += per * r * d;
                    }
                }
            }
            let acts = (steps + 1.0) * (4.0 * m * d + 4.0 * n * d + (2.0 * m + 3.0 * n) * r);
            let above = cfg.layers.saturating_sub(1) as f64;
            let weights = if f * d * d > cache { 2.0 * d * d } else { 0.0 };
            let frozen = above * (steps + 1.0) * (weights + 4.0 * m * d + 4.0 * n * d);
            let per_cell = cfg.layers as f64 * (start + acts) + factors + frozen;
            total += per_rank_cells * per_cell;
        }
    }
    f * total
}

/// Up-front estimate of the peak memory of a run of `cfg` on `threads` workers, in bytes,
/// from the sizes the run allocates (f32 entries): the trial's frozen weights, adapters'
/// initial A and teacher; its batches, each stacked with the held-out batch (inputs,
/// adapter inputs, frozen outputs, targets; the first two stacks' product with the largest
/// rank's A, shared by the cells); per worker, one cell in flight at the largest
/// rank (A, B, their gradients and optimizer state, cached activations per layer); the rows
/// of a trial before they are written, and the whole moment table when it is read back to
/// fit (about 400 bytes a row in memory); and the program itself (128 MiB: the binary with
/// libtorch's libraries peaks at about 122 MiB on a tiny run). Computed in floating point,
/// so absurd sizes give absurd estimates instead of overflowing. Measured peak resident sets
/// (debug build, 2 threads) against it: width 1024 x 4 layers, ranks 4..256: 214 MiB vs 231
/// MiB; width 2048, ranks 4..512, batch 64: 270 vs 315 MiB; width 4096, ranks 4..1024: 481
/// vs 481 MiB.
///
/// ```
/// let small = rankstab_theory::TheoryConfig { width: 64, ranks: vec![4, 8], ..Default::default() };
/// let deep = rankstab_theory::TheoryConfig { layers: 1 << 10, ..small.clone() };
/// let bytes = |c| rankstab_theory::memory_estimate(c, 2);
/// let program = 128.0 * 1024.0 * 1024.0;
/// assert!(bytes(&deep) - program > 500.0 * (bytes(&small) - program));
/// assert!(bytes(&small) > program + 4.0 * 64.0 * 64.0);
/// ```
pub fn memory_estimate(cfg: &TheoryConfig, threads: usize) -> f64 {
    let f = 4.0; // bytes of an f32
    let d = cfg.width as f64;
    let l = cfg.layers as f64;
    let r = cfg.ranks.iter().copied().max().unwrap_or(0) as f64;
    let n = cfg.batch as f64;
    let m = (cfg.batch + cfg.heldout) as f64;
    let c = cfg.classes as f64;
    let fresh = cfg.inputs.contains(&Reuse::Fresh);
    let n_batches = if fresh { cfg.steps as f64 + 1.0 } else { 1.0 };
    let teacher = match cfg.loss {
        crate::config::Loss::Mse => d * d,
        crate::config::Loss::Ce => 2.0 * c * d,
    };
    let trial = f * (l * d * d + l * r * d + teacher + n_batches * n * d + cfg.heldout as f64 * d);
    // Each stack's x, u, frozen output and target; the first two stacks' shared u A_max^T.
    let prepared = f * (n_batches * 4.0 * m * d + n_batches.min(2.0) * m * r);
    let per_cell = f * l * (6.0 * r * d + 5.0 * m * d + 2.0 * m * r);
    let cells = cells(cfg).len() as f64;
    let rows_per_trial =
        cells * l * (cfg.steps as f64 + 1.0) * (6.0 + 6.0 * cfg.moments.len() as f64);
    let rows = 400.0 * rows_per_trial * (1.0 + cfg.trials as f64);
    let program = 128.0 * 1024.0 * 1024.0;
    program + trial + prepared + threads.max(1) as f64 * per_cell + rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(scaling: Scaling, inputs: &str, site: Site, rank: u32, rel: f64) -> ClosedFormCheck {
        ClosedFormCheck {
            optimizer: Optimizer::Sgd,
            scaling,
            beta: scaling.beta(),
            inputs: inputs.into(),
            site,
            rank,
            trials: 8,
            monte_carlo: 1.0 + rel,
            closed_form: 1.0,
            rel_diff: rel,
            rel_ci_low: rel - 0.1,
            rel_ci_high: rel + 0.1,
            within: rel.abs() < 0.1,
        }
    }

    #[test]
    fn repeated_checks_count_once() {
        let mut checks = Vec::new();
        for scaling in [Scaling::LORA, Scaling::RSLORA] {
            for (inputs, fwd) in [("coherent", 0.01), ("fresh", 0.02)] {
                for rank in [4, 8] {
                    // Gamma cancels up to rounding.
                    let wobble = if scaling == Scaling::LORA {
                        1.0
                    } else {
                        1.0 + 1e-12
                    };
                    let rel = fwd * f64::from(rank) * wobble;
                    checks.push(check(scaling, inputs, Site::Fwd, rank, rel));
                    // Held-out inputs are shared by every regime: one check per rank.
                    checks.push(check(scaling, inputs, Site::FwdHeldout, rank, 0.5));
                }
            }
        }
        assert_eq!(checks.len(), 16);
        // Per rank: fwd coherent, fwd fresh, held-out; the held-out ones and fresh rank 8 lie
        // outside.
        assert_eq!(distinct_checks(&checks), (6, 3));
        // A check that differs in anything but the scaling and the input label is distinct.
        checks.push(check(Scaling::LORA, "coherent", Site::Fwd, 16, 0.01));
        assert_eq!(distinct_checks(&checks), (7, 4));
    }

    /// trial_flops (the model) against the products the checker counts as it computes them,
    /// over the cases its skipped products depend on: steps 1, 2 and 3, one and three
    /// layers, weight decay that moves A at step 0 (Adam, AdamW) or not (SGD), both input
    /// regimes, delta_norm.
    #[test]
    fn trial_flops_matches_the_products_counted() {
        use rankstab_records::Optimizer;
        for (steps, layers, wd, delta_norm) in [
            (3, 1, 0.0, false),
            (2, 1, 0.0, false),
            (1, 3, 0.0, true),
            (3, 2, 0.1, false),
            (1, 1, 0.1, true),
        ] {
            let cfg = TheoryConfig {
                width: 24,
                ranks: vec![2, 4, 8],
                layers,
                steps,
                weight_decay: wd,
                delta_norm,
                optimizers: vec![Optimizer::Sgd, Optimizer::Adam, Optimizer::Adamw],
                batch: 3,
                heldout: 2,
                ..Default::default()
            };
            let counted = trial_rows(&cfg, 0).expect("valid").flops;
            assert_eq!(
                trial_flops(&cfg),
                counted,
                "steps {steps}, layers {layers}, weight decay {wd}, delta_norm {delta_norm}"
            );
        }
    }

    /// trial_bytes against the closed form of its model on a small case: SGD and Adam, with
    /// the factors counted every step (no cache) and once (they fit).
    #[test]
    fn trial_bytes_matches_its_closed_form() {
        let (d, r, n, m, steps) = (16.0, 4.0, 2.0, 5.0, 2.0);
        let cfg = TheoryConfig {
            width: 16,
            ranks: vec![4],
            optimizers: vec![Optimizer::Sgd, Optimizer::Adam],
            scalings: vec![Scaling::LORA],
            inputs: vec![Reuse::Coherent, Reuse::Fresh],
            batch: 2,
            heldout: 3,
            steps: 2,
            ..Default::default()
        };
        let acts = (steps + 1.0) * (4.0 * m * d + 4.0 * n * d + (2.0 * m + 3.0 * n) * r);
        // SGD: start 3 r d. Step 0: B read and written for its update (2 r d). Step 1: B
        // read forward (A is the draw), A and B read backward and written (5 r d). Step 2
        // (no update): A and B read forward and backward (4 r d).
        let sgd_streamed = 3.0 * r * d + (2.0 + 5.0 + 4.0) * r * d;
        // Adam: start 7 r d. Step 0: B read, written with its two states read and written
        // (1 + 5 r d), both second moments read for the eps share (2 r d). Step 1: 3 reads,
        // two updates (10 r d), eps (2 r d). Step 2: 4 r d.
        let adam_streamed = 7.0 * r * d + (8.0 + 15.0 + 4.0) * r * d;
        let cells = 2.0; // two input regimes per optimizer
        let streamed = 4.0 * cells * (sgd_streamed + adam_streamed + 2.0 * acts);
        assert_eq!(trial_bytes(&cfg, 0.0), streamed);
        let resident = 4.0 * cells * (3.0 * r * d + 7.0 * r * d + 2.0 * acts);
        assert_eq!(trial_bytes(&cfg, 1e9), resident);
        // The default configuration: every factor of rank >= 16 exceeds a 1 MiB cache.
        let def = TheoryConfig::default();
        let i = trial_flops(&def) / trial_bytes(&def, 1024.0 * 1024.0);
        assert!(i > 1.0 && i < 100.0, "intensity {i}");
    }
}
