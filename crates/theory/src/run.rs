//! A checker run: trials of every cell, written to a run directory as they finish, then
//! fits, summaries and closed-form checks computed from the files.
//!
//! Resume: after each trial the rows are appended and `progress.json` records the trial
//! and the table lengths. Running the same command again skips recorded trials and cuts
//! anything written after the last record, so a kill loses at most the trial in flight.
use crate::closed_form::Coefficients;
use crate::config::{OptimizerKind, TheoryConfig};
use crate::data::TrialData;
use crate::predict::law;
use crate::sim::{frozen_pass, prepare, run_cell, CellSpec};
use crate::stats::{fit_slope, mean_ci, verdict};
use crate::TheoryError;
use rankstab_records::{
    files, read_json, read_table, scaling_factor, write_json_atomic, Fit, Manifest, MetricRow,
    MomentRow, RunStatus, SummaryRow, TableWriter, SCHEMA_VERSION,
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
}

/// Closed-form check of the first-step SGD second moment against the Monte Carlo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosedFormCheck {
    /// sgd or sgd-momentum (identical at step 1).
    pub optimizer: String,
    /// Scaling name.
    pub scaling: String,
    /// Scaling exponent.
    pub beta: f64,
    /// Input regime.
    pub inputs: String,
    /// fwd or fwd_heldout.
    pub site: String,
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
}

const PROGRESS: &str = "progress.json";
/// Closed-form checks file name.
pub const CHECKS: &str = "checks.json";
/// Trial-aggregated summary file name.
pub const SUMMARY: &str = "summary.csv";

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TheoryError + '_ {
    move |source| TheoryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cells of one trial, in canonical order.
pub fn cells(cfg: &TheoryConfig) -> Result<Vec<CellSpec>, TheoryError> {
    let rules = cfg.scaling_rules()?;
    let mut out = Vec::new();
    for &reuse in &cfg.inputs {
        for &opt in &cfg.optimizers {
            for s in &rules {
                for &rank in &cfg.ranks {
                    out.push(CellSpec {
                        opt,
                        scaling: s.name.clone(),
                        beta: s.beta,
                        reuse,
                        rank,
                    });
                }
            }
        }
    }
    Ok(out)
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
    let dist = cfg.input_dist()?;
    let cell_list = cells(cfg)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| {
            TheoryError::Invalid(format!("cannot start {:?} threads: {e}", opts.threads))
        })?;
    let threads = pool.current_num_threads();

    let manifest_path = out.join(files::MANIFEST);
    let mut manifest = if manifest_path.exists() {
        let m: Manifest = read_json(&manifest_path)?;
        if m.schema_version != SCHEMA_VERSION {
            return Err(rankstab_records::RecordsError::Schema {
                path: manifest_path,
                found: m.schema_version,
                expected: SCHEMA_VERSION,
            }
            .into());
        }
        if m.command != "theory" || m.config != config_value(cfg) {
            return Err(TheoryError::Exists(format!(
                "{} holds a run with a different configuration: choose another --out or remove it",
                out.display()
            )));
        }
        m
    } else {
        if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
            return Err(TheoryError::Exists(format!(
                "{} exists and is not a rankstab run directory: choose another --out",
                out.display()
            )));
        }
        std::fs::create_dir_all(out).map_err(io(out))?;
        let m = Manifest {
            schema_version: SCHEMA_VERSION,
            tool: "rankstab".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            git_revision: opts.git_revision.clone(),
            command: "theory".into(),
            config: config_value(cfg),
            seeds: (0..cfg.trials)
                .map(|t| crate::data::trial_seed(cfg.seed, t))
                .collect(),
            device: format!("cpu ({threads} threads)"),
            created: now(),
            finished: None,
            status: RunStatus::Running,
            note: None,
        };
        write_json_atomic(&manifest_path, &m)?;
        m
    };

    let progress_path = out.join(PROGRESS);
    let mut state: ProgressFile = if progress_path.exists() {
        read_json(&progress_path)?
    } else {
        ProgressFile::default()
    };
    let mut moments = TableWriter::<MomentRow>::open(&out.join(files::MOMENTS))?;
    let mut metrics = TableWriter::<MetricRow>::open(&out.join(files::METRICS))?;
    if !state.done.is_empty() {
        moments.truncate(state.moments_len)?;
        metrics.truncate(state.metrics_len)?;
    } else {
        // Rows of a first trial killed before it was recorded.
        moments.clear()?;
        metrics.clear()?;
    }
    let todo: Vec<usize> = (0..cfg.trials)
        .filter(|t| !state.done.contains(t))
        .collect();
    let budget = opts.max_trials_this_run.unwrap_or(usize::MAX);
    let todo: Vec<usize> = todo.into_iter().take(budget).collect();
    progress.start((todo.len() * cell_list.len()) as u64);
    let mut trials_run = 0;
    for &trial in &todo {
        progress.message(&format!("trial {}/{}", trial + 1, cfg.trials));
        let (rows, mrows) =
            pool.install(|| trial_rows_inner(cfg, dist, &cell_list, trial, progress));
        moments.append(&rows)?;
        metrics.append(&mrows)?;
        state.done.push(trial);
        state.moments_len = moments.len()?;
        state.metrics_len = metrics.len()?;
        write_json_atomic(&progress_path, &state)?;
        trials_run += 1;
    }
    let complete = state.done.len() == cfg.trials;
    let (fits, checks) = if complete {
        progress.message("fitting");
        let rows: Vec<MomentRow> = read_table(&out.join(files::MOMENTS))?;
        let fits = fit_rows(cfg, &rows);
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

/// Computes one trial: every cell's moment rows and metric rows, plus the exact first-step
/// coefficients and closed forms. Pure computation (no I/O); runs on the current rayon pool
/// and gives bit-identical results whatever its size.
///
/// # Errors
/// An invalid configuration.
///
/// ```
/// let cfg = rankstab_theory::TheoryConfig { width: 32, ranks: vec![2, 4], trials: 1, ..Default::default() };
/// let (moments, metrics) = rankstab_theory::trial_rows(&cfg, 0).unwrap();
/// assert!(moments.iter().any(|r| r.site == "fwd" && r.step == 1 && r.value > 0.0));
/// assert!(metrics.iter().any(|r| r.metric == "loss"));
/// ```
pub fn trial_rows(
    cfg: &TheoryConfig,
    trial: usize,
) -> Result<(Vec<MomentRow>, Vec<MetricRow>), TheoryError> {
    cfg.validate()?;
    let dist = cfg.input_dist()?;
    let cell_list = cells(cfg)?;
    Ok(trial_rows_inner(cfg, dist, &cell_list, trial, &NoProgress))
}

fn trial_rows_inner(
    cfg: &TheoryConfig,
    dist: crate::config::InputDist,
    cell_list: &[CellSpec],
    trial: usize,
    progress: &dyn Progress,
) -> (Vec<MomentRow>, Vec<MetricRow>) {
    let need_fresh = cfg.inputs.contains(&crate::config::Reuse::Fresh);
    let t0 = std::time::Instant::now();
    let data = TrialData::draw(cfg, dist, trial, need_fresh);
    let prep = prepare(cfg, &data);
    tracing::debug!(
        "trial {trial}: data drawn in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
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
    tracing::debug!(
        "trial {trial}: cells in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    let mut mrows = Vec::new();
    for (i, res) in &results {
        let c = &cell_list[*i];
        let base = MomentRow {
            source: "theory".into(),
            model: "synthetic".into(),
            module: "adapter".into(),
            rank: c.rank as u32,
            alpha: cfg.alpha,
            scaling: c.scaling.clone(),
            beta: c.beta,
            optimizer: c.opt.name().into(),
            inputs: c.reuse.name().into(),
            dist: dist.to_string(),
            width: cfg.width as u32,
            seed: data.seed,
            ..Default::default()
        };
        for o in &res.obs {
            rows.push(MomentRow {
                layer: o.layer,
                step: o.step,
                site: o.site.name().into(),
                stat: o.stat.into(),
                m: o.m,
                value: o.value,
                ..base.clone()
            });
        }
        for &(step, loss, loss_h) in &res.losses {
            for (metric, value) in [("loss", loss), ("heldout_loss", loss_h)] {
                mrows.push(MetricRow {
                    source: "theory".into(),
                    model: "synthetic".into(),
                    rank: c.rank as u32,
                    scaling: c.scaling.clone(),
                    beta: c.beta,
                    optimizer: c.opt.name().into(),
                    inputs: c.reuse.name().into(),
                    seed: data.seed,
                    step,
                    metric: metric.into(),
                    value,
                });
            }
        }
    }
    rows.extend(coefficient_rows(
        cfg,
        &data,
        &prep,
        cell_list,
        &dist.to_string(),
    ));
    (rows, mrows)
}

/// Rows with the exact first-step coefficients (per regime, layer, site) and the closed-form
/// first-step SGD second moment of every SGD-family cell at layer 0.
fn coefficient_rows(
    cfg: &TheoryConfig,
    data: &TrialData,
    prep: &crate::sim::Prepared,
    cell_list: &[CellSpec],
    dist: &str,
) -> Vec<MomentRow> {
    let mut rows = Vec::new();
    let n = prep.n_train;
    let (u_stack0, v_train) = frozen_pass(cfg, data, prep, 0);
    for &reuse in &cfg.inputs {
        // The training rows the adapter is evaluated on at step 1, and the held-out rows.
        let fwd_u = match reuse {
            crate::config::Reuse::Coherent => u_stack0.clone(),
            crate::config::Reuse::Fresh => frozen_pass(cfg, data, prep, 1).0,
        };
        for (site, stack, rows_range) in [
            ("fwd", &fwd_u, 0..n),
            ("fwd_heldout", &u_stack0, n..u_stack0[0].nrows()),
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
                    optimizer: "any".into(),
                    scaling: "any".into(),
                    inputs: reuse.name().into(),
                    dist: dist.into(),
                    width: cfg.width as u32,
                    seed: data.seed,
                    step: 1,
                    site: site.into(),
                    ..Default::default()
                };
                for (stat, value) in [
                    ("coef_lin", c.lin),
                    ("coef_quad", c.quad),
                    ("coef_entries", c.entries),
                ] {
                    rows.push(MomentRow {
                        stat: stat.into(),
                        value,
                        ..base.clone()
                    });
                }
                if l > 0 {
                    continue;
                }
                for cell in cell_list
                    .iter()
                    .filter(|c| c.reuse == reuse && !c.opt.is_adaptive())
                {
                    let gamma = scaling_factor(cfg.alpha, cell.beta, cell.rank);
                    let s2 = cfg.init.variance(cfg.width, cell.rank);
                    rows.push(MomentRow {
                        optimizer: cell.opt.name().into(),
                        scaling: cell.scaling.clone(),
                        beta: cell.beta,
                        rank: cell.rank as u32,
                        stat: "closed_form".into(),
                        m: Some(2),
                        value: c.mean_second_moment(cell.rank, cfg.lr(cell.opt), gamma, s2),
                        ..base.clone()
                    });
                }
            }
        }
    }
    rows
}

type Key = (
    String,
    String,
    u64,
    String,
    String,
    u32,
    String,
    String,
    u32,
    u32,
);

/// Fits every (optimizer, scaling, inputs, layer, site, stat, m, step) group of `rows`.
pub fn fit_rows(cfg: &TheoryConfig, rows: &[MomentRow]) -> Vec<Fit> {
    // Coherence per (inputs, layer, site) from the exact first-step coefficients.
    let mut coef: BTreeMap<(String, u32, String), (f64, f64)> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.stat == "coef_lin" || r.stat == "coef_quad")
    {
        let e = coef
            .entry((r.inputs.clone(), r.layer, r.site.clone()))
            .or_default();
        if r.stat == "coef_lin" {
            e.0 += r.value;
        } else {
            e.1 += r.value;
        }
    }
    let mut groups: BTreeMap<Key, BTreeMap<u32, BTreeMap<u64, f64>>> = BTreeMap::new();
    for r in rows {
        let fitted = matches!(
            r.stat.as_str(),
            "abs" | "grad_norm_a" | "grad_norm_b" | "delta_norm"
        );
        if !fitted || r.site == "grad_out" {
            continue;
        }
        let key = (
            r.optimizer.clone(),
            r.scaling.clone(),
            r.beta.to_bits(),
            r.inputs.clone(),
            r.dist.clone(),
            r.layer,
            r.site.clone(),
            r.stat.clone(),
            r.m.unwrap_or(1),
            r.step,
        );
        groups
            .entry(key)
            .or_default()
            .entry(r.rank)
            .or_default()
            .insert(r.seed, r.value);
    }
    let mut fits = Vec::new();
    for (key, by_rank) in groups {
        let (opt_name, scaling, beta_bits, inputs, dist, layer, site, stat, m, step) = key;
        let beta = f64::from_bits(beta_bits);
        let Ok(opt) = opt_name.parse::<OptimizerKind>() else {
            continue;
        };
        let ranks: Vec<usize> = by_rank.keys().map(|&r| r as usize).collect();
        // Trials present at every rank (all of them, in a complete run).
        let seeds: Vec<u64> = by_rank
            .values()
            .next()
            .map(|s| {
                s.keys()
                    .copied()
                    .filter(|k| by_rank.values().all(|v| v.contains_key(k)))
                    .collect()
            })
            .unwrap_or_default();
        let values: Vec<Vec<f64>> = by_rank
            .values()
            .map(|v| seeds.iter().map(|s| v[s]).collect())
            .collect();
        let any_nonfinite = values.iter().flatten().any(|v| !v.is_finite());
        let Some(sf) = fit_slope(&ranks, &values).or_else(|| {
            any_nonfinite.then_some(crate::stats::SlopeFit {
                slope: f64::NAN,
                se: f64::NAN,
                ci_low: f64::NAN,
                ci_high: f64::NAN,
            })
        }) else {
            continue; // identically zero (e.g. adapter output at step 0, where B = 0)
        };
        let kappa = coef
            .get(&(inputs.clone(), layer, site.clone()))
            .map_or(0.0, |&(lin, quad)| if lin > 0.0 { quad / lin } else { 0.0 });
        let Some(lw) = law(opt, &site, &stat, m, kappa, cfg.width, cfg.init.kurtosis()) else {
            continue;
        };
        let ds = cfg.init.log_std_rank_slope();
        let predicted = lw.predicted(&ranks, beta, ds);
        let asymptotic = lw.asymptotic(beta, ds);
        let tol = cfg.tolerance;
        let agrees =
            sf.slope.is_finite() && predicted >= sf.ci_low - tol && predicted <= sf.ci_high + tol;
        fits.push(Fit {
            source: "theory".into(),
            model: "synthetic".into(),
            module: "adapter".into(),
            layer,
            optimizer: opt_name,
            scaling,
            beta,
            inputs,
            dist,
            site,
            stat,
            m,
            step,
            ranks: ranks.iter().map(|&r| r as u32).collect(),
            trials: seeds.len() as u32,
            slope: sf.slope,
            se: sf.se,
            ci_low: sf.ci_low,
            ci_high: sf.ci_high,
            predicted,
            asymptotic,
            regime: lw.regime(*ranks.last().unwrap_or(&1)).into(),
            verdict: verdict(sf.slope, tol).into(),
            predicted_verdict: verdict(predicted, tol).into(),
            agrees,
        });
    }
    fits
}

/// Paired comparison of the closed-form first-step moment with the Monte Carlo.
pub fn closed_form_checks(rows: &[MomentRow]) -> Vec<ClosedFormCheck> {
    type K = (String, String, u64, String, String, u32);
    let mut cf: BTreeMap<K, BTreeMap<u64, f64>> = BTreeMap::new();
    let mut mc: BTreeMap<K, BTreeMap<u64, f64>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.layer == 0 && r.step == 1 && r.m == Some(2))
    {
        let k = (
            r.optimizer.clone(),
            r.scaling.clone(),
            r.beta.to_bits(),
            r.inputs.clone(),
            r.site.clone(),
            r.rank,
        );
        match r.stat.as_str() {
            "closed_form" => {
                cf.entry(k).or_default().insert(r.seed, r.value);
            }
            "abs" if r.site.starts_with("fwd") => {
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
        let (opt, scaling, beta, inputs, site, rank) = k;
        out.push(ClosedFormCheck {
            optimizer: opt,
            scaling,
            beta: f64::from_bits(beta),
            inputs,
            site,
            rank,
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

/// Trial means with t-intervals of every measured statistic.
pub fn summarize(rows: &[MomentRow]) -> Vec<SummaryRow> {
    type K = (
        String,
        String,
        u64,
        String,
        u32,
        u32,
        u32,
        String,
        String,
        Option<u32>,
    );
    let mut g: BTreeMap<K, Vec<f64>> = BTreeMap::new();
    for r in rows.iter().filter(|r| !r.stat.starts_with("coef_")) {
        let k = (
            r.optimizer.clone(),
            r.scaling.clone(),
            r.beta.to_bits(),
            r.inputs.clone(),
            r.layer,
            r.rank,
            r.step,
            r.site.clone(),
            r.stat.clone(),
            r.m,
        );
        g.entry(k).or_default().push(r.value);
    }
    g.into_iter()
        .map(|(k, v)| {
            let ci = mean_ci(&v);
            SummaryRow {
                source: "theory".into(),
                optimizer: k.0,
                scaling: k.1,
                beta: f64::from_bits(k.2),
                inputs: k.3,
                layer: k.4,
                rank: k.5,
                step: k.6,
                site: k.7,
                stat: k.8,
                m: k.9,
                trials: v.len() as u32,
                mean: ci.mean,
                se: ci.se,
                ci_low: ci.low,
                ci_high: ci.high,
            }
        })
        .collect()
}

/// Floating-point operations of the matrix products of one trial of `cfg` (every cell):
/// per adapter and step, the forward products (2 x 2 M d r for M = batch + heldout rows),
/// the backward products (2 x 2 N d r) and, on steps that update, the two gradients
/// (2 x 2 N d r); plus the frozen products of layers above the first. Used by the benchmark
/// to turn time into GFLOP/s.
///
/// ```
/// let cfg = rankstab_theory::TheoryConfig { width: 8, ranks: vec![2], optimizers: vec![rankstab_theory::OptimizerKind::Sgd],
///     scalings: vec!["lora".into()], inputs: vec![rankstab_theory::Reuse::Coherent], batch: 1, heldout: 1, steps: 1, ..Default::default() };
/// // M = 2, N = 1, d = 8, r = 2: forward 4*2*8*2 = 128, backward 64, one update 64, two steps measured.
/// assert_eq!(rankstab_theory::trial_flops(&cfg), 2.0 * 128.0 + 2.0 * 64.0 + 64.0);
/// ```
pub fn trial_flops(cfg: &TheoryConfig) -> f64 {
    let d = cfg.width as f64;
    let n = cfg.batch as f64;
    let m = (cfg.batch + cfg.heldout) as f64;
    let cells_per_rank = (cfg.inputs.len() * cfg.optimizers.len() * cfg.scalings.len()) as f64;
    let steps = cfg.steps as f64;
    let mut total = 0.0;
    for &r in &cfg.ranks {
        let r = r as f64;
        let mut per_layer =
            (steps + 1.0) * (4.0 * m * d * r + 4.0 * n * d * r) + steps * 4.0 * n * d * r;
        if cfg.delta_norm {
            per_layer += (steps + 1.0) * 4.0 * d * r * r;
        }
        let frozen = (cfg.layers.saturating_sub(1)) as f64
            * (steps + 1.0)
            * (2.0 * m * d * d + 2.0 * n * d * d);
        total += cells_per_rank * (cfg.layers as f64 * per_layer + frozen);
    }
    total
}
