//! From loaded runs to everything the report shows: exponent tables with predictions and
//! verdicts, the data of every figure, the paper's findings next to ours. Pure: no I/O.
//!
//! Statistics come from `rankstab_theory` (one implementation for the checker and the
//! report): `fit_slope` (slope of log mean against log rank, jackknife over seeds paired
//! across ranks), `mean_ci`, `verdict`, and the laws of `predict::law`.
//!
//! **Training exponents.** Rows are grouped by (model, optimizer, scaling, learning rate,
//! module, layer, site, stat, m); the recorded steps of a model are cut into step windows
//! ([`step_windows`]: step 0 alone, then equal-count chunks), and within a window each
//! (rank, seed) contributes the mean of its values. Seeds present at every rank are paired
//! (jackknife interval over seeds); when no seed is common to all ranks, each rank's mean
//! over its seeds is one point and the interval comes from the OLS residuals. Besides each
//! layer, every module is also fitted on the mean over its layers (`layer = all`).
//!
//! **Predictions for training rows** (the rule stated in the report's reading guide,
//! [`crate::render::TRAIN_LAW_CHOICE`]) depend only on the training row itself, never on
//! which other runs are given, so a training row's `agrees` is the same in every report.
//! Forward outputs (`fwd`, `fwd_heldout`) use the paper's asymptotic law, the coherent
//! limit `m (1 - a beta)` (SGD `a = 2`: `m (1 - 2 beta)`; Adam/AdamW `a = 1`: `m (1 - beta)`):
//! the coherence of real inputs is not observable, and text shares a common direction.
//! Input gradients (`bwd`) use the law of `rankstab_theory::predict::law` over the fitted
//! ranks, kappa = 1/(d + k4 - 2) with the row's width (exact, `proofs/finite-rank.md`), and
//! parameter norms their kappa-free laws. Both limits (coherent and incoherent) are always
//! shown; `in_band` says whether the interval meets the band between them. When theory runs
//! are given, the Monte Carlo slopes of the matching setting are shown beside the prediction
//! (`mc_coherent`, `mc_fresh`), never in its place. A with PEFT's default Kaiming-uniform
//! init is assumed (kurtosis 9/5).
// Grouping maps keyed by tuples of axis values read best spelled out where they are built.
#![allow(clippy::type_complexity)]

use crate::load::{Run, RunKind, Skipped};
use rankstab_records::{Fit, Metric, MetricRow, MomentRow, Optimizer, Site, Stat};
use rankstab_theory::predict::{law, Law};
use rankstab_theory::stats::{fit_slope, mean_ci, verdict, SlopeFit};
use rankstab_theory::TheoryConfig;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Kurtosis of A's entries under PEFT's default init (Kaiming-uniform): 9/5.
pub const PEFT_DEFAULT_KURTOSIS: f64 = 9.0 / 5.0;

/// Settings of the analysis.
#[derive(Debug, Clone)]
pub struct AnalysisOptions {
    /// Tolerance in exponent units for verdicts and agreement (the checker's default 0.15).
    pub tolerance: f64,
    /// Step windows after step 0 for training exponents.
    pub windows: usize,
    /// Most panels (steps) per moment-vs-rank figure.
    pub max_panels: usize,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        Self {
            tolerance: 0.15,
            windows: 3,
            max_panels: 4,
        }
    }
}

/// Everything a report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// Provenance of every run used.
    pub runs: Vec<RunInfo>,
    /// Directories not used, with reasons.
    pub skipped: Vec<Skipped>,
    /// One section per theory run.
    pub theory: Vec<TheorySection>,
    /// The merged training runs, when any.
    pub train: Option<TrainSection>,
    /// The paper's findings next to ours.
    pub paper: Vec<PaperRow>,
    /// Every figure, in display order.
    pub plots: Vec<Plot>,
    /// Tolerance used for verdicts.
    pub tolerance: f64,
}

/// Provenance of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Short id.
    pub id: String,
    /// Directory as given.
    pub dir: String,
    /// theory or train.
    pub kind: RunKind,
    /// One-line description (model, rank, scaling, ... or width, ranks, trials).
    pub summary: String,
    /// complete, running, or "diverged at step k".
    pub status: String,
    /// Schema version.
    pub schema_version: u32,
    /// rankstab version that wrote it.
    pub tool_version: String,
    /// Source revision, when known.
    pub git_revision: String,
    /// Device.
    pub device: String,
    /// Created (RFC 3339).
    pub created: String,
    /// Finished (RFC 3339), when complete.
    pub finished: String,
    /// Seeds.
    pub seeds: String,
    /// The full configuration, pretty JSON.
    pub config_json: String,
    /// Rows in moments.csv.
    pub moment_rows: usize,
    /// Rows in metrics.csv.
    pub metric_rows: usize,
    /// Notes (incomplete, missing optional files).
    pub notes: Vec<String>,
}

/// One fitted rank exponent as the report shows it (theory and training alike).
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ExponentRow {
    /// theory or train.
    pub source: String,
    /// Run id (theory) or "merged" (training).
    pub run: String,
    /// Model.
    pub model: String,
    /// Module ("adapter" in theory runs; "all" when pooled over modules).
    pub module: String,
    /// Layer index, or "all" when pooled over layers.
    pub layer: String,
    /// Step window ("step 3", "steps 10-50").
    pub window: String,
    /// Optimizer.
    pub optimizer: String,
    /// Scaling name.
    pub scaling: String,
    /// Scaling exponent.
    pub beta: f64,
    /// Learning rate of the runs (training; empty when not recorded or for theory runs).
    pub lr: String,
    /// Input regime (theory) or data set (training).
    pub inputs: String,
    /// Site.
    pub site: String,
    /// Statistic.
    pub stat: String,
    /// Moment order (1 for norms).
    pub m: u32,
    /// Ranks fitted, comma-separated.
    pub ranks: String,
    /// Seeds (trials) per rank behind the fit.
    pub seeds: u32,
    /// Fitted slope of log statistic against log rank.
    pub slope: f64,
    /// Its standard error.
    pub se: f64,
    /// 95% interval, lower end.
    pub ci_low: f64,
    /// 95% interval, upper end.
    pub ci_high: f64,
    /// Predicted slope over the fitted ranks, when a law applies.
    pub predicted: Option<f64>,
    /// Which law gave `predicted`.
    pub law: String,
    /// Large-rank limit with coherent inputs (the paper's law).
    pub coherent_limit: Option<f64>,
    /// Limit with incoherent inputs (the fluctuation term alone).
    pub incoherent_limit: Option<f64>,
    /// Monte Carlo slope of the matching setting, coherent inputs (training rows).
    pub mc_coherent: Option<f64>,
    /// Monte Carlo slope of the matching setting, fresh inputs (training rows).
    pub mc_fresh: Option<f64>,
    /// stable, collapsing, exploding or diverged (from the fitted slope).
    pub verdict: String,
    /// Verdict implied by the prediction.
    pub predicted_verdict: String,
    /// Prediction within the interval widened by the tolerance.
    pub agrees: Option<bool>,
    /// Interval (widened by the tolerance) meets the band between the two limits.
    pub in_band: Option<bool>,
}

/// What the report shows of one theory run.
#[derive(Debug, Clone, Serialize)]
pub struct TheorySection {
    /// Run id.
    pub run: String,
    /// One-line setting.
    pub summary: String,
    /// Every fit (also written to exponents.csv).
    pub rows: Vec<ExponentRow>,
    /// The rows shown in the page: last step, second moments (or the lowest order) and norms.
    pub shown: Vec<ExponentRow>,
    /// Fits that agree with the prediction.
    pub agree: usize,
    /// Fits with a prediction.
    pub total: usize,
    /// Closed-form checks.
    pub checks: Vec<rankstab_theory::ClosedFormCheck>,
    /// Checks with 0 in the interval.
    pub checks_within: usize,
    /// Names of this section's figures.
    pub figures: Vec<String>,
}

/// A step window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Label ("step 0", "steps 10-50").
    pub label: String,
    /// First step.
    pub lo: u32,
    /// Last step.
    pub hi: u32,
}

/// What the report shows of the training runs (merged).
#[derive(Debug, Clone, Serialize)]
pub struct TrainSection {
    /// Models present.
    pub models: Vec<String>,
    /// Training runs merged.
    pub runs: usize,
    /// Step windows per model.
    pub windows: Vec<(String, Vec<Window>)>,
    /// Every fit: per layer and pooled over layers (also written to exponents.csv).
    pub rows: Vec<ExponentRow>,
    /// The rows shown in the page: pooled over layers, abs moments and norms.
    pub shown: Vec<ExponentRow>,
    /// Fits with a prediction that agrees / with a prediction.
    pub agree: usize,
    /// Fits with a prediction.
    pub total: usize,
    /// How the predictions were made.
    pub law_note: String,
    /// Whether a theory run gave Monte Carlo slopes to show beside the predictions.
    pub has_mc: bool,
    /// Things a reader should know (cells running or diverged, single ranks, missing metrics).
    pub notes: Vec<String>,
    /// Names of this section's figures.
    pub figures: Vec<String>,
}

/// One of the paper's reported findings next to ours.
#[derive(Debug, Clone, Serialize)]
pub struct PaperRow {
    /// The finding.
    pub finding: String,
    /// What the paper reports.
    pub paper: String,
    /// What we measured.
    pub ours: String,
    /// Where ours comes from (run, setting).
    pub source: String,
    /// "same setup", "shape only (...)", or "not measured".
    pub comparable: String,
}

/// A figure's data.
#[derive(Debug, Clone, Serialize)]
pub struct Plot {
    /// File stem (unique).
    pub name: String,
    /// Title drawn on the figure.
    pub title: String,
    /// Caption under it.
    pub caption: String,
    /// What to draw.
    pub kind: PlotKind,
}

/// The three kinds of figure.
#[derive(Debug, Clone, Serialize)]
pub enum PlotKind {
    /// Statistic against rank, log-log, one panel per step.
    Rank(Vec<RankPanel>),
    /// A curve per rank against step, one panel per scaling.
    Step {
        /// y-axis label.
        y_label: String,
        /// Logarithmic y axis.
        log_y: bool,
        /// Panels.
        panels: Vec<StepPanel>,
    },
    /// Exponents, rows x columns.
    Heat {
        /// Row labels (layers).
        rows: Vec<String>,
        /// Column labels (modules).
        cols: Vec<String>,
        /// values[row][col].
        values: Vec<Vec<Option<f64>>>,
        /// Predicted exponent, drawn as the reference in the title.
        predicted: Option<f64>,
    },
}

/// One panel of a moment-vs-rank figure.
#[derive(Debug, Clone, Serialize)]
pub struct RankPanel {
    /// Panel title ("step 3").
    pub title: String,
    /// y-axis label.
    pub y_label: String,
    /// Series.
    pub series: Vec<RankSeries>,
}

/// One curve of a moment-vs-rank panel.
#[derive(Debug, Clone, Serialize)]
pub struct RankSeries {
    /// Legend label.
    pub label: String,
    /// (rank, mean, ci low, ci high); ci bounds equal the mean with one seed.
    pub points: Vec<(f64, f64, f64, f64)>,
    /// Fitted slope, drawn as a solid line through the centroid of the log points.
    pub fitted: Option<f64>,
    /// Predicted slope, drawn dashed through the same centroid.
    pub predicted: Option<f64>,
}

/// One panel of a curve-per-rank figure.
#[derive(Debug, Clone, Serialize)]
pub struct StepPanel {
    /// Panel title (scaling).
    pub title: String,
    /// Series, one per rank (and learning rate).
    pub series: Vec<StepSeries>,
}

/// One curve against step.
#[derive(Debug, Clone, Serialize)]
pub struct StepSeries {
    /// Legend label ("r=4").
    pub label: String,
    /// Rank (colour order).
    pub rank: u32,
    /// (step, mean over seeds).
    pub points: Vec<(f64, f64)>,
}

/// Cuts the sorted distinct `steps` into windows: step 0 alone when present, then at most
/// `n` chunks of (nearly) equal numbers of recorded steps.
///
/// ```
/// use rankstab_report::analyse::step_windows;
/// let w = step_windows(&[0, 10, 20, 30, 40, 50, 60], 3);
/// let labels: Vec<&str> = w.iter().map(|w| w.label.as_str()).collect();
/// assert_eq!(labels, ["step 0", "steps 10-20", "steps 30-40", "steps 50-60"]);
/// ```
pub fn step_windows(steps: &[u32], n: usize) -> Vec<Window> {
    let set: BTreeSet<u32> = steps.iter().copied().collect();
    let mut out = Vec::new();
    if set.contains(&0) {
        out.push(Window {
            label: "step 0".into(),
            lo: 0,
            hi: 0,
        });
    }
    let rest: Vec<u32> = set.into_iter().filter(|&s| s > 0).collect();
    let n = n.max(1).min(rest.len());
    for k in 0..n {
        let a = k * rest.len() / n;
        let b = (k + 1) * rest.len() / n;
        let (lo, hi) = (rest[a], rest[b - 1]);
        let label = if lo == hi {
            format!("step {lo}")
        } else {
            format!("steps {lo}-{hi}")
        };
        out.push(Window { label, lo, hi });
    }
    out
}

/// Values per rank per seed, as the fits take them.
pub type ByRank = BTreeMap<u32, BTreeMap<u64, f64>>;

/// Fits log E[value] against log rank: seeds common to every rank are paired (jackknife over
/// them); without a common seed each rank's mean over its seeds is one point. Returns the
/// ranks, the seeds per point and the fit; `None` with fewer than two ranks or a mean that is
/// not positive.
///
/// ```
/// use rankstab_report::analyse::fit_by_rank;
/// use std::collections::BTreeMap;
/// let mut by = BTreeMap::new();
/// for r in [4u32, 16, 64] {
///     let v: BTreeMap<u64, f64> = [(0, 1.0), (1, 1.2)].into_iter().map(|(s, c)| (s, c * (r as f64).powf(-1.0))).collect();
///     by.insert(r, v);
/// }
/// let (ranks, seeds, fit) = fit_by_rank(&by).unwrap();
/// assert_eq!((ranks, seeds), (vec![4, 16, 64], 2));
/// assert!((fit.slope + 1.0).abs() < 1e-12);
/// ```
pub fn fit_by_rank(by_rank: &ByRank) -> Option<(Vec<u32>, u32, SlopeFit)> {
    let by_rank: BTreeMap<u32, &BTreeMap<u64, f64>> = by_rank
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(r, v)| (*r, v))
        .collect();
    if by_rank.len() < 2 {
        return None;
    }
    let ranks: Vec<u32> = by_rank.keys().copied().collect();
    let rs: Vec<usize> = ranks.iter().map(|&r| r as usize).collect();
    let first = by_rank.values().next()?;
    let common: Vec<u64> = first
        .keys()
        .copied()
        .filter(|s| by_rank.values().all(|v| v.contains_key(s)))
        .collect();
    let (values, seeds): (Vec<Vec<f64>>, u32) = if common.is_empty() {
        let v = by_rank
            .values()
            .map(|v| vec![v.values().sum::<f64>() / v.len() as f64])
            .collect();
        (v, 1)
    } else {
        let v = by_rank
            .values()
            .map(|v| common.iter().map(|s| v[s]).collect())
            .collect();
        (v, common.len() as u32)
    };
    let fit = fit_slope(&rs, &values)?;
    Some((ranks, seeds, fit))
}

/// Prediction of one exponent.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Predicted slope over the fitted ranks.
    pub predicted: Option<f64>,
    /// Which law.
    pub law: String,
    /// Coherent limit.
    pub coherent: Option<f64>,
    /// Incoherent limit.
    pub incoherent: Option<f64>,
}

/// The prediction for a training exponent (the rule of the module docs): the paper's
/// asymptotic law for forward outputs, the finite-rank law of `predict.rs` for input
/// gradients, the kappa-free laws for parameter norms. It depends on nothing but the row.
///
/// ```
/// use rankstab_report::analyse::predict_train;
/// // rsLoRA under AdamW: the forward second moment follows m (1 - beta) = 1.
/// let p = predict_train("adamw", "fwd", "abs", 2, 576, 0.5, &[4, 16, 64]);
/// assert_eq!(p.predicted, Some(1.0));
/// assert_eq!(p.incoherent, Some(0.0));
/// // rsLoRA under SGD: m (1 - 2 beta) = 0, rank-flat (Theorem 3.2).
/// assert_eq!(predict_train("sgd", "fwd", "abs", 2, 576, 0.5, &[4, 16, 64]).predicted, Some(0.0));
/// // LoRA's B-gradient norm: gamma sqrt(r), slope 1/2 - 1.
/// let p = predict_train("sgd", "param", "grad_norm_b", 1, 576, 1.0, &[4, 16, 64]);
/// assert!((p.predicted.unwrap() + 0.5).abs() < 1e-12);
/// ```
pub fn predict_train(
    optimizer: &str,
    site: &str,
    stat: &str,
    m: u32,
    width: u32,
    beta: f64,
    ranks: &[u32],
) -> Prediction {
    let none = |why: String| Prediction {
        predicted: None,
        law: why,
        coherent: None,
        incoherent: None,
    };
    let Ok(opt) = optimizer.parse::<Optimizer>() else {
        return none(format!("no law for optimizer '{optimizer}'"));
    };
    let (Ok(site_t), Ok(stat_t)) = (site.parse::<Site>(), stat.parse::<Stat>()) else {
        return none(format!("no law for {site}/{stat}"));
    };
    let rs: Vec<usize> = ranks.iter().map(|&r| r as usize).collect();
    let d = width.max(1) as usize;
    if site == "param" && stat == "grad_norm_avg" {
        // Mean of the A and B gradient norms: both scale as gamma sqrt(r) under Adam; under
        // SGD B's does and A's as gamma^2 sqrt(r), so only a band is predicted.
        let b = 0.5 - beta;
        return if opt.is_adaptive() {
            Prediction {
                predicted: Some(b),
                law: "gradient-norm law: gamma sqrt(r) (Adam)".into(),
                coherent: Some(b),
                incoherent: Some(b),
            }
        } else {
            Prediction {
                predicted: None,
                law: "band between the A and B gradient-norm laws (SGD)".into(),
                coherent: Some(0.5 - 2.0 * beta),
                incoherent: Some(b),
            }
        };
    }
    // The site's own law (bwd: kappa = 1/(d + k4 - 2); norms: kappa-free); for the forward
    // sites the kappa given here only serves the limits below.
    let Some(own) = law(opt, site_t, stat_t, m, 0.0, d, PEFT_DEFAULT_KURTOSIS) else {
        return none(format!("no law for {site}/{stat}"));
    };
    let coherent = Law { kappa: 1.0, ..own }.asymptotic(beta, 0.0);
    let incoherent = Law { kappa: 0.0, ..own }.asymptotic(beta, 0.0);
    let (predicted, law_name, limits) = match site {
        "fwd" | "fwd_heldout" => (
            coherent,
            format!(
                "paper's law m (1 - {}beta) (coherent limit)",
                if opt.is_adaptive() { "" } else { "2 " }
            ),
            (coherent, incoherent),
        ),
        // Both limits are real for the input gradient (the coherent one only beyond r = d).
        "bwd" => (
            own.predicted(&rs, beta, 0.0),
            format!("finite-rank law, kappa = 1/(d + k4 - 2), d = {d}"),
            (coherent, incoherent),
        ),
        // The norms' laws are kappa-free: the prediction is both limits.
        _ => {
            let p = own.predicted(&rs, beta, 0.0);
            (p, "finite-rank law".to_string(), (p, p))
        }
    };
    Prediction {
        predicted: Some(predicted),
        law: law_name,
        coherent: Some(limits.0),
        incoherent: Some(limits.1),
    }
}

impl ExponentRow {
    /// Sets the prediction columns.
    fn predicted_by(self, p: Prediction) -> Self {
        Self {
            predicted: p.predicted,
            law: p.law,
            coherent_limit: p.coherent,
            incoherent_limit: p.incoherent,
            ..self
        }
    }
}

/// Fills the verdicts and agreement from the slope, interval and prediction.
fn finish_row(mut row: ExponentRow, tol: f64) -> ExponentRow {
    row.verdict = verdict(row.slope, tol).into();
    row.predicted_verdict = row
        .predicted
        .map(|p| verdict(p, tol).to_string())
        .unwrap_or_default();
    let finite = row.slope.is_finite();
    row.agrees = row
        .predicted
        .map(|p| finite && p >= row.ci_low - tol && p <= row.ci_high + tol);
    row.in_band = match (row.coherent_limit, row.incoherent_limit) {
        (Some(a), Some(b)) if finite => {
            Some(row.ci_high + tol >= a.min(b) && row.ci_low - tol <= a.max(b))
        }
        _ => None,
    };
    row
}

fn fmt_ranks(ranks: &[u32]) -> String {
    ranks
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn theory_config(run: &Run) -> Option<TheoryConfig> {
    serde_json::from_value(run.manifest.config.clone()).ok()
}

fn run_info(run: &Run) -> RunInfo {
    let m = &run.manifest;
    let cfg = &m.config;
    let summary = match run.kind {
        RunKind::Theory => {
            let ranks: BTreeSet<u32> = run
                .moments
                .iter()
                .map(|r| r.rank)
                .filter(|&r| r > 0)
                .collect();
            format!(
                "theory: width {}, ranks {}, {} trials, optimizers {}, scalings {}, inputs {}",
                cfg.get("width").map_or("?".into(), |v| v.to_string()),
                fmt_ranks(&ranks.into_iter().collect::<Vec<_>>()),
                m.seeds.len(),
                json_list(cfg.get("optimizers")),
                json_list(cfg.get("scalings")),
                json_list(cfg.get("inputs")),
            )
        }
        RunKind::Train => {
            let first = run.moments.first();
            let cells: BTreeSet<(String, u32, String, String)> = run
                .moments
                .iter()
                .map(|r| {
                    (
                        r.model.clone(),
                        r.rank,
                        r.scaling.to_string(),
                        r.optimizer.to_string(),
                    )
                })
                .collect();
            let cells: Vec<String> = cells
                .into_iter()
                .map(|(mo, r, s, o)| format!("{mo}, rank {r}, {s}, {o}"))
                .collect();
            let lr = run_lr(run).map(|l| format!(", lr {l}")).unwrap_or_default();
            format!(
                "train: {}{lr}, data {}",
                if cells.is_empty() {
                    "no rows".into()
                } else {
                    cells.join("; ")
                },
                first.map_or("?", |r| r.inputs.as_str())
            )
        }
    };
    RunInfo {
        id: run.id.clone(),
        dir: run.dir.display().to_string(),
        kind: run.kind,
        summary,
        status: run.status_text(),
        schema_version: m.schema_version,
        tool_version: format!("{} {}", m.tool, m.tool_version),
        git_revision: m.git_revision.clone().unwrap_or_else(|| "unknown".into()),
        device: m.device.clone(),
        created: m.created.clone(),
        finished: m.finished.clone().unwrap_or_default(),
        seeds: m
            .seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        config_json: serde_json::to_string_pretty(&m.config).unwrap_or_default(),
        moment_rows: run.moments.len(),
        metric_rows: run.metrics.len(),
        notes: run.notes.clone(),
    }
}

fn json_list(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Some(x) => x.to_string(),
        None => "?".into(),
    }
}

/// Learning rate recorded in a run's config (`lr` or `learning_rate`, at the top or in the
/// `train` object that `rankstab train` and `sweep` write), as text.
fn run_lr(run: &Run) -> Option<String> {
    let c = &run.manifest.config;
    [Some(c), c.get("train")]
        .into_iter()
        .flatten()
        .flat_map(|c| [c.get("lr"), c.get("learning_rate")])
        .flatten()
        .find(|v| !v.is_null())
        .map(|v| v.to_string())
}

/// Runs the whole analysis.
pub fn analyse(runs: &[Run], skipped: &[Skipped], opts: &AnalysisOptions) -> Analysis {
    let mut plots = Vec::new();
    let theory: Vec<TheorySection> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Theory)
        .map(|r| theory_section(r, opts, &mut plots))
        .collect();
    let train_runs: Vec<&Run> = runs.iter().filter(|r| r.kind == RunKind::Train).collect();
    let train =
        (!train_runs.is_empty()).then(|| train_section(&train_runs, &theory, opts, &mut plots));
    let paper = paper_rows(&theory, &train_runs, opts);
    Analysis {
        runs: runs.iter().map(run_info).collect(),
        skipped: skipped.to_vec(),
        theory,
        train,
        paper,
        plots,
        tolerance: opts.tolerance,
    }
}

// ---------------------------------------------------------------------------------------
// Theory runs

fn theory_fits(run: &Run) -> Vec<Fit> {
    if let Some(f) = &run.fits {
        return f.clone();
    }
    theory_config(run)
        .map(|cfg| rankstab_theory::fit_rows(&cfg, &run.moments, &run.coefficients))
        .unwrap_or_default()
}

fn fit_to_row(run: &Run, f: &Fit, cfg: Option<&TheoryConfig>, tol: f64) -> ExponentRow {
    let limits = cfg.and_then(|c| {
        let ds = c.init.log_std_rank_slope();
        let l = law(
            f.optimizer,
            f.site,
            f.stat,
            f.m,
            1.0,
            c.width,
            c.init.kurtosis(),
        )?;
        Some((
            Law { kappa: 1.0, ..l }.asymptotic(f.beta, ds),
            Law { kappa: 0.0, ..l }.asymptotic(f.beta, ds),
        ))
    });
    let row = ExponentRow {
        source: "theory".into(),
        run: run.id.clone(),
        model: f.model.clone(),
        module: f.module.clone(),
        layer: f.layer.to_string(),
        window: format!("step {}", f.step),
        optimizer: f.optimizer.to_string(),
        scaling: f.scaling.to_string(),
        beta: f.beta,
        inputs: f.inputs.clone(),
        site: f.site.to_string(),
        stat: f.stat.to_string(),
        m: f.m,
        ranks: fmt_ranks(&f.ranks),
        seeds: f.trials,
        slope: f.slope,
        se: f.se,
        ci_low: f.ci_low,
        ci_high: f.ci_high,
        ..ExponentRow::default()
    };
    let p = Prediction {
        predicted: f.predicted.is_finite().then_some(f.predicted),
        law: format!("finite-rank law ({} regime at the top rank)", f.regime),
        coherent: limits.map(|l| l.0),
        incoherent: limits.map(|l| l.1),
    };
    finish_row(row.predicted_by(p), tol)
}

/// The moment order a figure shows: 2 when recorded, else the lowest recorded.
fn figure_order(rows: &[MomentRow]) -> u32 {
    let ms: BTreeSet<u32> = rows
        .iter()
        .filter(|r| r.stat == Stat::Abs)
        .filter_map(|r| r.m)
        .collect();
    if ms.contains(&2) {
        2
    } else {
        ms.into_iter().next().unwrap_or(2)
    }
}

/// Evenly spread choice of at most `k` items, keeping the first and the last.
fn spread<T: Clone>(v: &[T], k: usize) -> Vec<T> {
    if v.len() <= k {
        return v.to_vec();
    }
    if k < 2 {
        return v.iter().rev().take(k).cloned().collect();
    }
    (0..k)
        .map(|i| v[i * (v.len() - 1) / (k - 1)].clone())
        .collect()
}

fn stat_label(site: &str, stat: &str, m: u32) -> String {
    match stat {
        "abs" => format!("E|{site}|^{m}"),
        "raw" => format!("E {site}^{m}"),
        s => s.to_string(),
    }
}

fn theory_section(run: &Run, opts: &AnalysisOptions, plots: &mut Vec<Plot>) -> TheorySection {
    let tol = opts.tolerance;
    let cfg = theory_config(run);
    let fits = theory_fits(run);
    let rows: Vec<ExponentRow> = fits
        .iter()
        .map(|f| fit_to_row(run, f, cfg.as_ref(), tol))
        .collect();
    let last_step = rows
        .iter()
        .filter_map(|r| {
            r.window
                .strip_prefix("step ")
                .and_then(|s| s.parse::<u32>().ok())
        })
        .max();
    let order = figure_order(&run.moments);
    let shown: Vec<ExponentRow> = rows
        .iter()
        .filter(|r| last_step.is_some_and(|s| r.window == format!("step {s}")))
        .filter(|r| r.layer == "0")
        .filter(|r| (r.stat.as_str() == "abs" && r.m == order) || r.site.as_str() == "param")
        .cloned()
        .collect();
    let mut shown = shown;
    shown.sort_by(|a, b| {
        (&a.optimizer, &a.inputs, beta_key(a.beta), &a.site, &a.stat).cmp(&(
            &b.optimizer,
            &b.inputs,
            beta_key(b.beta),
            &b.site,
            &b.stat,
        ))
    });
    let total = rows.iter().filter(|r| r.agrees.is_some()).count();
    let agree = rows.iter().filter(|r| r.agrees == Some(true)).count();
    let checks: Vec<rankstab_theory::ClosedFormCheck> =
        run.checks.iter().flatten().cloned().collect();
    let checks_within = checks.iter().filter(|c| c.within).count();

    // Figures: per (optimizer, inputs), the forward, held-out, backward moments and the
    // B-gradient norm against rank, one panel per step, one curve per scaling.
    let mut figures = Vec::new();
    let combos: BTreeSet<(String, String)> = run
        .moments
        .iter()
        .filter(|r| r.stat == Stat::Abs || r.site == Site::Param)
        .map(|r| (r.optimizer.to_string(), r.inputs.clone()))
        .collect();
    let fit_index: BTreeMap<(String, String, String, String, String, u32, u32), &ExponentRow> =
        rows.iter()
            .filter(|r| r.layer == "0")
            .filter_map(|r| {
                let step = r.window.strip_prefix("step ")?.parse::<u32>().ok()?;
                Some((
                    (
                        r.optimizer.clone(),
                        r.inputs.clone(),
                        r.scaling.clone(),
                        r.site.clone(),
                        r.stat.clone(),
                        r.m,
                        step,
                    ),
                    r,
                ))
            })
            .collect();
    for (opt, inputs) in &combos {
        for (site, stat, m) in [
            ("fwd", "abs", order),
            ("fwd_heldout", "abs", order),
            ("bwd", "abs", order),
            ("param", "grad_norm_b", 1),
        ] {
            // scaling -> step -> rank -> values over seeds
            let mut data: BTreeMap<(u64, String), BTreeMap<u32, BTreeMap<u32, Vec<f64>>>> =
                BTreeMap::new();
            for r in run.moments.iter().filter(|r| {
                r.optimizer.as_str() == opt
                    && &r.inputs == inputs
                    && r.site.as_str() == site
                    && r.stat.as_str() == stat
                    && r.layer == 0
                    && r.m.unwrap_or(1) == m
            }) {
                // Sort scalings by decreasing beta (lora, rslora, constant).
                let key = (beta_key(r.beta), r.scaling.to_string());
                data.entry(key)
                    .or_default()
                    .entry(r.step)
                    .or_default()
                    .entry(r.rank)
                    .or_default()
                    .push(r.value);
            }
            if data.is_empty() {
                continue;
            }
            let steps: BTreeSet<u32> = data
                .values()
                .flat_map(|by_step| {
                    by_step
                        .iter()
                        .filter(|(_, by_rank)| by_rank.values().flatten().any(|v| *v > 0.0))
                        .map(|(s, _)| *s)
                })
                .collect();
            let steps: Vec<u32> = spread(&steps.into_iter().collect::<Vec<_>>(), opts.max_panels);
            let mut panels = Vec::new();
            for &step in &steps {
                let mut series = Vec::new();
                for ((_, scaling), by_step) in &data {
                    let Some(by_rank) = by_step.get(&step) else {
                        continue;
                    };
                    let points = rank_points(by_rank);
                    if points.is_empty() {
                        continue;
                    }
                    let fit = fit_index.get(&(
                        opt.clone(),
                        inputs.clone(),
                        scaling.clone(),
                        site.to_string(),
                        stat.to_string(),
                        m,
                        step,
                    ));
                    let fitted = fit.map(|f| f.slope).filter(|s| s.is_finite());
                    let predicted = fit.and_then(|f| f.predicted);
                    series.push(RankSeries {
                        label: series_label(scaling, fitted, predicted),
                        points,
                        fitted,
                        predicted,
                    });
                }
                if !series.is_empty() {
                    panels.push(RankPanel {
                        title: format!("step {step}"),
                        y_label: stat_label(site, stat, m),
                        series,
                    });
                }
            }
            if panels.is_empty() {
                continue;
            }
            let name = slug(&format!(
                "theory-{}-{opt}-{inputs}-{site}-{stat}{}",
                run.id,
                if stat == "abs" {
                    format!("-m{m}")
                } else {
                    String::new()
                }
            ));
            figures.push(name.clone());
            plots.push(Plot {
                name,
                title: format!("{} vs rank: {opt}, {inputs} inputs ({})", stat_label(site, stat, m), run.id),
                caption: format!(
                    "Theory run {}: mean over trials with the 95% interval of each mean, log-log; thin solid line: fitted \
                     slope, thick dashed line: predicted (finite-rank law). Layer 0, {opt}, {inputs} inputs, one panel per \
                     step. Trials share their random draws across ranks, so the slope is much sharper than the \
                     intervals of single points.",
                    run.id
                ),
                kind: PlotKind::Rank(panels),
            });
        }
    }
    TheorySection {
        run: run.id.clone(),
        summary: run_info(run).summary,
        rows,
        shown,
        agree,
        total,
        checks,
        checks_within,
        figures,
    }
}

fn series_label(name: &str, fitted: Option<f64>, predicted: Option<f64>) -> String {
    let f = fitted.map_or("-".into(), |s| format!("{s:+.2}"));
    match predicted {
        Some(p) => format!("{name}: fit {f}, pred {p:+.2}"),
        None => format!("{name}: fit {f}"),
    }
}

fn rank_points(by_rank: &BTreeMap<u32, Vec<f64>>) -> Vec<(f64, f64, f64, f64)> {
    by_rank
        .iter()
        .filter_map(|(&r, v)| {
            let ci = mean_ci(v);
            if !(ci.mean.is_finite() && ci.mean > 0.0) {
                return None;
            }
            let (lo, hi) = if ci.low.is_finite() && ci.high.is_finite() {
                (ci.low, ci.high)
            } else {
                (ci.mean, ci.mean)
            };
            Some((f64::from(r), ci.mean, lo, hi))
        })
        .collect()
}

/// File-name-safe version of `s`.
pub fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

// ---------------------------------------------------------------------------------------
// Training runs

/// A training moment's grouping key without layer and step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TrainKey {
    model: String,
    optimizer: String,
    beta: u64, // bits, sorted so that lora (1) precedes rslora (0.5): stored as bits of -beta
    scaling: String,
    lr: String,
    inputs: String,
    module: String,
    site: String,
    stat: String,
    m: u32,
}

fn beta_key(beta: f64) -> u64 {
    // Order by decreasing beta: the bits of -beta, sign-flipped so unsigned order matches.
    let b = (-beta).to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

fn beta_of_key(k: u64) -> f64 {
    let b = if k >> 63 == 1 { k & !(1 << 63) } else { !k };
    -f64::from_bits(b)
}

/// Per key: layer -> step -> rank -> seed -> value.
type TrainData = BTreeMap<TrainKey, BTreeMap<u32, BTreeMap<u32, ByRank>>>;

/// Monte Carlo slopes (coherent, fresh) of the matching setting in the theory sections:
/// same optimizer (else same family), beta, site, statistic and order; layer 0; last step.
fn mc_slopes(
    theory: &[TheorySection],
    optimizer: &str,
    beta: f64,
    site: &str,
    stat: &str,
    m: u32,
) -> (Option<f64>, Option<f64>) {
    let adaptive = |o: &str| o.parse::<Optimizer>().map(Optimizer::is_adaptive).ok();
    for exact in [true, false] {
        for sec in theory {
            let last = sec
                .rows
                .iter()
                .filter_map(|r| r.window.strip_prefix("step ")?.parse::<u32>().ok())
                .max();
            let Some(last) = last else { continue };
            let pick = |inputs: &str| {
                sec.rows
                    .iter()
                    .find(|r| {
                        let opt_ok = if exact {
                            r.optimizer == optimizer
                        } else {
                            adaptive(&r.optimizer).is_some()
                                && adaptive(&r.optimizer) == adaptive(optimizer)
                        };
                        opt_ok
                            && (r.beta - beta).abs() < 1e-9
                            && r.site == site
                            && r.stat == stat
                            && r.m == m
                            && r.layer == "0"
                            && r.inputs == inputs
                            && r.window == format!("step {last}")
                    })
                    .map(|r| r.slope)
            };
            let (c, f) = (pick("coherent"), pick("fresh"));
            if c.is_some() || f.is_some() {
                return (c, f);
            }
        }
    }
    (None, None)
}

fn train_data(train_runs: &[&Run]) -> (TrainData, BTreeMap<String, u32>) {
    let mut data: TrainData = BTreeMap::new();
    let mut widths: BTreeMap<String, u32> = BTreeMap::new();
    for run in train_runs {
        let lr = run_lr(run).unwrap_or_default();
        for r in &run.moments {
            if r.stat == Stat::ClosedForm {
                continue;
            }
            let key = TrainKey {
                model: r.model.clone(),
                optimizer: r.optimizer.to_string(),
                beta: beta_key(r.beta),
                scaling: r.scaling.to_string(),
                lr: lr.clone(),
                inputs: r.inputs.clone(),
                module: r.module.clone(),
                site: r.site.to_string(),
                stat: r.stat.to_string(),
                m: r.m.unwrap_or(1),
            };
            widths.insert(format!("{}/{}/{}", r.model, r.module, r.site), r.width);
            data.entry(key)
                .or_default()
                .entry(r.layer)
                .or_default()
                .entry(r.step)
                .or_default()
                .entry(r.rank)
                .or_default()
                .insert(r.seed, r.value);
        }
    }
    (data, widths)
}

/// Mean over the steps of `w` per (rank, seed).
fn window_mean(by_step: &BTreeMap<u32, ByRank>, w: &Window) -> ByRank {
    let mut acc: BTreeMap<u32, BTreeMap<u64, (f64, usize)>> = BTreeMap::new();
    for (_, by_rank) in by_step.range(w.lo..=w.hi) {
        for (&r, seeds) in by_rank {
            for (&s, &v) in seeds {
                let e = acc.entry(r).or_default().entry(s).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    acc.into_iter()
        .map(|(r, s)| {
            (
                r,
                s.into_iter()
                    .map(|(k, (sum, n))| (k, sum / n as f64))
                    .collect(),
            )
        })
        .collect()
}

/// Mean over layers per (step, rank, seed).
fn pool_layers(by_layer: &BTreeMap<u32, BTreeMap<u32, ByRank>>) -> BTreeMap<u32, ByRank> {
    let mut acc: BTreeMap<u32, BTreeMap<u32, BTreeMap<u64, (f64, usize)>>> = BTreeMap::new();
    for by_step in by_layer.values() {
        for (&step, by_rank) in by_step {
            for (&r, seeds) in by_rank {
                for (&s, &v) in seeds {
                    let e = acc
                        .entry(step)
                        .or_default()
                        .entry(r)
                        .or_default()
                        .entry(s)
                        .or_insert((0.0, 0));
                    e.0 += v;
                    e.1 += 1;
                }
            }
        }
    }
    acc.into_iter()
        .map(|(st, br)| {
            (
                st,
                br.into_iter()
                    .map(|(r, s)| {
                        (
                            r,
                            s.into_iter()
                                .map(|(k, (sum, n))| (k, sum / n as f64))
                                .collect(),
                        )
                    })
                    .collect(),
            )
        })
        .collect()
}

fn train_row(
    key: &TrainKey,
    layer: String,
    window: &Window,
    by_rank: &ByRank,
    width: u32,
    theory: &[TheorySection],
    tol: f64,
) -> Option<ExponentRow> {
    let (ranks, seeds, fit) = fit_by_rank(by_rank)?;
    let beta = beta_of_key(key.beta);
    let p = predict_train(
        &key.optimizer,
        &key.site,
        &key.stat,
        key.m,
        width,
        beta,
        &ranks,
    );
    let (mc_coherent, mc_fresh) =
        mc_slopes(theory, &key.optimizer, beta, &key.site, &key.stat, key.m);
    let row = ExponentRow {
        source: "train".into(),
        run: "merged".into(),
        model: key.model.clone(),
        module: key.module.clone(),
        layer,
        window: window.label.clone(),
        optimizer: key.optimizer.clone(),
        scaling: key.scaling.clone(),
        beta,
        lr: key.lr.clone(),
        inputs: key.inputs.clone(),
        site: key.site.clone(),
        stat: key.stat.clone(),
        m: key.m,
        ranks: fmt_ranks(&ranks),
        seeds,
        slope: fit.slope,
        se: fit.se,
        ci_low: fit.ci_low,
        ci_high: fit.ci_high,
        mc_coherent,
        mc_fresh,
        ..ExponentRow::default()
    };
    Some(finish_row(row.predicted_by(p), tol))
}

fn train_section(
    train_runs: &[&Run],
    theory: &[TheorySection],
    opts: &AnalysisOptions,
    plots: &mut Vec<Plot>,
) -> TrainSection {
    let tol = opts.tolerance;
    let (data, widths) = train_data(train_runs);
    let models: BTreeSet<String> = data.keys().map(|k| k.model.clone()).collect();
    let mut windows: BTreeMap<String, Vec<Window>> = BTreeMap::new();
    for model in &models {
        let steps: Vec<u32> = data
            .iter()
            .filter(|(k, _)| &k.model == model)
            .flat_map(|(_, by_layer)| {
                by_layer
                    .values()
                    .flat_map(|by_step| by_step.keys().copied())
            })
            .collect();
        windows.insert(model.clone(), step_windows(&steps, opts.windows));
    }
    let mut notes = Vec::new();
    let mut rows = Vec::new();
    let mut single_rank = BTreeSet::new();
    for (key, by_layer) in &data {
        let width = widths
            .get(&format!("{}/{}/{}", key.model, key.module, key.site))
            .copied()
            .unwrap_or(0);
        let pooled = pool_layers(by_layer);
        let n_ranks = by_layer
            .values()
            .flat_map(|st| st.values().flat_map(|br| br.keys().copied()))
            .collect::<BTreeSet<u32>>()
            .len();
        for w in windows.get(&key.model).into_iter().flatten() {
            for (&layer, by_step) in by_layer {
                let br = window_mean(by_step, w);
                // A statistic recorded only at some steps (norms at intervals) leaves windows
                // without it: nothing to say there. One rank in all the data: say so.
                if br.len() < 2 && n_ranks < 2 {
                    single_rank.insert(format!(
                        "{} {} {} (lr {})",
                        key.model,
                        key.optimizer,
                        key.scaling,
                        if key.lr.is_empty() { "?" } else { &key.lr }
                    ));
                }
                rows.extend(train_row(
                    key,
                    layer.to_string(),
                    w,
                    &br,
                    width,
                    theory,
                    tol,
                ));
            }
            if by_layer.len() > 1 {
                let br = window_mean(&pooled, w);
                rows.extend(train_row(key, "all".into(), w, &br, width, theory, tol));
            }
        }
    }
    for s in &single_rank {
        notes.push(format!(
            "{s}: one rank only, so no rank exponent (its curves are still drawn)"
        ));
    }
    let shown: Vec<ExponentRow> = rows
        .iter()
        .filter(|r| {
            r.layer == "all"
                || !rows
                    .iter()
                    .any(|o| o.layer == "all" && o.module == r.module && o.model == r.model)
        })
        .filter(|r| r.stat.as_str() == "abs" || r.site.as_str() == "param")
        .filter(|r| r.window != "step 0")
        .cloned()
        .collect();

    let mut figures = Vec::new();
    // Gradient norm and perplexity against step, lora vs rslora side by side.
    let metric_rows: Vec<(&Run, &MetricRow)> = train_runs
        .iter()
        .flat_map(|r| r.metrics.iter().map(move |m| (*r, m)))
        .collect();
    for model in &models {
        let optimizers: BTreeSet<String> = data
            .keys()
            .filter(|k| &k.model == model)
            .map(|k| k.optimizer.clone())
            .collect();
        for opt in &optimizers {
            let gn = step_curves(&metric_rows, model, opt, &[Metric::GradNormAvg], |v| v);
            let (gn, gn_from) = if gn.is_empty() {
                (
                    grad_norm_from_moments(&data, model, opt),
                    "from moments.csv: mean over adapters of the A and B gradient norms",
                )
            } else {
                (gn, "metric grad_norm_avg")
            };
            if !gn.is_empty() {
                let name = slug(&format!("train-{model}-{opt}-grad-norm"));
                figures.push(name.clone());
                plots.push(Plot {
                    name,
                    title: format!("Average parameter gradient norm: {model}, {opt}"),
                    caption: format!(
                        "The paper's gradient-norm figure: one curve per rank, mean over seeds ({gn_from}); \
                         standard LoRA and rsLoRA side by side. The paper (Llama 2 7B, AdamW) reports LoRA's \
                         falling about two orders of magnitude from r=4 to 2048 and rsLoRA's staying within one."
                    ),
                    kind: PlotKind::Step { y_label: "gradient norm".into(), log_y: true, panels: gn },
                });
            } else {
                notes.push(format!("{model} {opt}: no gradient norms recorded (metric grad_norm_avg or param rows)"));
            }
            let (ppl, what) = {
                let p = step_curves(
                    &metric_rows,
                    model,
                    opt,
                    &[Metric::HeldoutPerplexity],
                    |v| v,
                );
                if !p.is_empty() {
                    (p, "held-out perplexity")
                } else {
                    let p = step_curves(&metric_rows, model, opt, &[Metric::HeldoutLoss], f64::exp);
                    if !p.is_empty() {
                        (p, "exp(held-out loss)")
                    } else {
                        (
                            step_curves(&metric_rows, model, opt, &[Metric::Perplexity], |v| v),
                            "training perplexity (no held-out metric recorded)",
                        )
                    }
                }
            };
            if !ppl.is_empty() {
                let name = slug(&format!("train-{model}-{opt}-perplexity"));
                figures.push(name.clone());
                plots.push(Plot {
                    name,
                    title: format!("Perplexity vs step: {model}, {opt}"),
                    caption: format!(
                        "The paper's perplexity figure: {what} per rank, mean over seeds; LoRA and rsLoRA side by side. \
                         The paper reports rsLoRA improving with rank while LoRA does not."
                    ),
                    kind: PlotKind::Step { y_label: what.into(), log_y: false, panels: ppl },
                });
            } else {
                notes.push(format!("{model} {opt}: no perplexity or loss recorded"));
            }
        }
    }
    // Moment vs rank (coordinate check with fits): per (model, optimizer, scaling, site),
    // one curve per module (pooled over layers), one panel per step.
    let order = figure_order(
        &train_runs
            .iter()
            .flat_map(|r| r.moments.iter().cloned())
            .collect::<Vec<_>>(),
    );
    let mut combos: BTreeSet<(String, String, u64, String, String, String)> = BTreeSet::new();
    for k in data.keys() {
        if (k.stat.as_str() == "abs" && k.m == order && k.site.as_str() != "grad_out")
            || (k.site.as_str() == "param" && k.stat.as_str() == "grad_norm_b")
        {
            combos.insert((
                k.model.clone(),
                k.optimizer.clone(),
                k.beta,
                k.scaling.clone(),
                k.site.clone(),
                k.stat.clone(),
            ));
        }
    }
    let multi_lr = data
        .keys()
        .map(|k| k.lr.as_str())
        .collect::<BTreeSet<_>>()
        .len()
        > 1;
    for (model, opt, bkey, scaling, site, stat) in &combos {
        let m = if stat == "abs" { order } else { 1 };
        let keys: Vec<(&TrainKey, BTreeMap<u32, ByRank>)> = data
            .iter()
            .filter(|(k, _)| {
                &k.model == model
                    && &k.optimizer == opt
                    && k.beta == *bkey
                    && &k.site == site
                    && &k.stat == stat
                    && k.m == m
            })
            .map(|(k, bl)| (k, pool_layers(bl)))
            .collect();
        let steps: BTreeSet<u32> = keys
            .iter()
            .flat_map(|(_, bs)| bs.iter().filter(|(_, br)| br.len() >= 2).map(|(s, _)| *s))
            .filter(|&s| s > 0 || site == "param")
            .collect();
        let steps = spread(&steps.into_iter().collect::<Vec<_>>(), opts.max_panels);
        let mut panels = Vec::new();
        for &step in &steps {
            let mut series = Vec::new();
            for (k, by_step) in &keys {
                let Some(br) = by_step.get(&step) else {
                    continue;
                };
                let as_vec: BTreeMap<u32, Vec<f64>> = br
                    .iter()
                    .map(|(r, s)| (*r, s.values().copied().collect()))
                    .collect();
                let points = rank_points(&as_vec);
                if points.len() < 2 {
                    continue;
                }
                let fitted = fit_by_rank(br).map(|f| f.2.slope);
                let ranks: Vec<u32> = br.keys().copied().collect();
                let width = widths
                    .get(&format!("{}/{}/{}", k.model, k.module, k.site))
                    .copied()
                    .unwrap_or(0);
                let predicted =
                    predict_train(opt, site, stat, m, width, beta_of_key(*bkey), &ranks).predicted;
                let name = if multi_lr {
                    format!("{} lr {}", k.module, k.lr)
                } else {
                    k.module.clone()
                };
                series.push(RankSeries {
                    label: series_label(&name, fitted, predicted),
                    points,
                    fitted,
                    predicted,
                });
            }
            if !series.is_empty() {
                panels.push(RankPanel {
                    title: format!("step {step}"),
                    y_label: stat_label(site, stat, m),
                    series,
                });
            }
        }
        if panels.is_empty() {
            continue;
        }
        let name = slug(&format!("train-{model}-{opt}-{scaling}-{site}-{stat}"));
        figures.push(name.clone());
        plots.push(Plot {
            name,
            title: format!("{} vs rank: {model}, {opt}, {scaling}", stat_label(site, stat, m)),
            caption: format!(
                "Coordinate check with fits: one curve per module (mean over layers and seeds, 95% intervals over seeds), \
                 one panel per step; solid: fitted slope, dashed: predicted ({}).",
                if site.starts_with("fwd") { "the paper's law, the coherent limit" } else { "finite-rank law" }
            ),
            kind: PlotKind::Rank(panels),
        });
    }
    // Heatmaps of exponents, layer x module, last window.
    for model in &models {
        let Some(last) = windows.get(model).and_then(|w| w.last()) else {
            continue;
        };
        let mut hm: BTreeMap<(String, u64, String, String, String), Vec<&ExponentRow>> =
            BTreeMap::new();
        for r in rows
            .iter()
            .filter(|r| &r.model == model && r.window == last.label && r.layer != "all")
        {
            if (r.stat.as_str() == "abs"
                && r.m == order
                && (r.site.as_str() == "fwd" || r.site.as_str() == "bwd"))
                || (r.site.as_str() == "param" && r.stat.as_str() == "grad_norm_b")
            {
                hm.entry((
                    r.optimizer.clone(),
                    beta_key(r.beta),
                    r.scaling.clone(),
                    r.site.clone(),
                    r.lr.clone(),
                ))
                .or_default()
                .push(r);
            }
        }
        for ((opt, _, scaling, site, lr), cells) in hm {
            let layers: BTreeSet<u32> = cells.iter().filter_map(|r| r.layer.parse().ok()).collect();
            let modules: Vec<String> =
                module_order(cells.iter().map(|r| r.module.clone()).collect());
            let values: Vec<Vec<Option<f64>>> = layers
                .iter()
                .map(|l| {
                    modules
                        .iter()
                        .map(|mo| {
                            cells
                                .iter()
                                .find(|r| r.layer == l.to_string() && &r.module == mo)
                                .map(|r| r.slope)
                        })
                        .collect()
                })
                .collect();
            let predicted = cells.iter().find_map(|r| r.predicted);
            let stat = cells.first().map_or(String::new(), |r| r.stat.clone());
            let name = slug(&format!(
                "train-{model}-{opt}-{scaling}-{site}-{stat}-heatmap{}",
                if multi_lr {
                    format!("-lr{lr}")
                } else {
                    String::new()
                }
            ));
            figures.push(name.clone());
            plots.push(Plot {
                name,
                title: format!("Rank exponent of {}: {model}, {opt}, {scaling}, {}", stat_label(&site, &stat, if stat == "abs" { order } else { 1 }), last.label),
                caption: format!(
                    "Fitted rank exponent per layer (rows) and module (columns) over {}; 0 (white) is rank-stable, blue \
                     collapsing, red exploding.{}",
                    last.label,
                    predicted.map_or(String::new(), |p| format!(" Predicted: {p:+.2}."))
                ),
                kind: PlotKind::Heat { rows: layers.iter().map(|l| format!("layer {l}")).collect(), cols: modules, values, predicted },
            });
        }
    }
    let total = rows.iter().filter(|r| r.agrees.is_some()).count();
    let agree = rows.iter().filter(|r| r.agrees == Some(true)).count();
    let has_mc = rows
        .iter()
        .any(|r| r.mc_coherent.is_some() || r.mc_fresh.is_some());
    let law_note = format!(
        "Predictions depend on the training rows alone, not on which other runs are given. Forward moments: the \
         paper's law, the coherent limit m (1 - a beta) (SGD a = 2, Adam/AdamW a = 1). Input gradients: the finite-rank \
         law with kappa = 1/(d + k4 - 2). Norms: kappa-free laws.{}",
        if has_mc {
            " The Monte Carlo slopes of the matching setting in the theory runs given (coherent and fresh inputs) are \
             shown beside them as MC columns."
        } else {
            " No theory run given, so no Monte Carlo columns."
        }
    );
    // Cells that did not finish normally, in one line each kind.
    let unfinished = |status: rankstab_records::RunStatus| -> Vec<String> {
        train_runs
            .iter()
            .filter(|r| r.manifest.status == status)
            .map(|r| format!("{} ({})", r.id, r.status_text()))
            .collect()
    };
    let running = unfinished(rankstab_records::RunStatus::Running);
    if !running.is_empty() {
        notes.insert(
            0,
            format!(
                "{} run(s) still running or interrupted; their rows so far are used: {}",
                running.len(),
                running.join(", ")
            ),
        );
    }
    let diverged = unfinished(rankstab_records::RunStatus::Diverged);
    if !diverged.is_empty() {
        notes.insert(
            0,
            format!(
                "{} run(s) diverged; their rows before the divergence are used: {}",
                diverged.len(),
                diverged.join(", ")
            ),
        );
    }
    TrainSection {
        models: models.into_iter().collect(),
        runs: train_runs.len(),
        windows: windows.into_iter().collect(),
        rows,
        shown,
        agree,
        total,
        law_note,
        has_mc,
        notes,
        figures,
    }
}

/// Llama then GPT-J module order; unknown modules after, alphabetically.
fn module_order(mut modules: Vec<String>) -> Vec<String> {
    const ORDER: [&str; 11] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "out_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "fc_in",
        "fc_out",
        "all",
    ];
    modules.sort();
    modules.dedup();
    modules.sort_by_key(|m| ORDER.iter().position(|o| o == m).unwrap_or(ORDER.len()));
    modules
}

/// Curves of a metric against step, one panel per scaling (decreasing beta), one series per
/// (rank, learning rate), mean over seeds.
fn step_curves(
    rows: &[(&Run, &MetricRow)],
    model: &str,
    opt: &str,
    metrics: &[Metric],
    f: impl Fn(f64) -> f64,
) -> Vec<StepPanel> {
    // (beta key, scaling) -> (rank, lr) -> step -> values
    let mut g: BTreeMap<(u64, String), BTreeMap<(u32, String), BTreeMap<u32, Vec<f64>>>> =
        BTreeMap::new();
    for (run, r) in rows {
        if r.model != model || r.optimizer.as_str() != opt || !metrics.contains(&r.metric) {
            continue;
        }
        let v = f(r.value);
        if !v.is_finite() {
            continue;
        }
        let lr = run_lr(run).unwrap_or_default();
        g.entry((beta_key(r.beta), r.scaling.to_string()))
            .or_default()
            .entry((r.rank, lr))
            .or_default()
            .entry(r.step)
            .or_default()
            .push(v);
    }
    let multi_lr = g
        .values()
        .flat_map(|s| s.keys().map(|(_, lr)| lr.clone()))
        .collect::<BTreeSet<_>>()
        .len()
        > 1;
    g.into_iter()
        .map(|((_, scaling), series)| StepPanel {
            title: scaling,
            series: series
                .into_iter()
                .map(|((rank, lr), by_step)| StepSeries {
                    label: if multi_lr {
                        format!("r={rank} lr {lr}")
                    } else {
                        format!("r={rank}")
                    },
                    rank,
                    points: by_step
                        .into_iter()
                        .map(|(s, v)| (f64::from(s), v.iter().sum::<f64>() / v.len() as f64))
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

/// Fallback gradient-norm curves from the param rows: mean over adapters and both factors.
fn grad_norm_from_moments(data: &TrainData, model: &str, opt: &str) -> Vec<StepPanel> {
    let mut g: BTreeMap<(u64, String), BTreeMap<(u32, String), BTreeMap<u32, Vec<f64>>>> =
        BTreeMap::new();
    for (k, by_layer) in data {
        if k.model != model
            || k.optimizer != opt
            || k.site.as_str() != "param"
            || !(k.stat.as_str() == "grad_norm_a" || k.stat.as_str() == "grad_norm_b")
        {
            continue;
        }
        for by_step in by_layer.values() {
            for (&step, by_rank) in by_step {
                for (&rank, seeds) in by_rank {
                    g.entry((k.beta, k.scaling.clone()))
                        .or_default()
                        .entry((rank, k.lr.clone()))
                        .or_default()
                        .entry(step)
                        .or_default()
                        .extend(seeds.values());
                }
            }
        }
    }
    g.into_iter()
        .map(|((_, scaling), series)| StepPanel {
            title: scaling,
            series: series
                .into_iter()
                .map(|((rank, _), by_step)| StepSeries {
                    label: format!("r={rank}"),
                    rank,
                    points: by_step
                        .into_iter()
                        .map(|(s, v)| (f64::from(s), v.iter().sum::<f64>() / v.len() as f64))
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The paper's findings

/// Factor by which a power law with exponent `slope` changes from r=4 to r=2048.
fn factor_4_to_2048(slope: f64) -> f64 {
    512f64.powf(slope)
}

fn describe_factor(slope: f64, ci: (f64, f64)) -> String {
    let f = factor_4_to_2048(slope);
    format!(
        "exponent {slope:+.2} [{:+.2}, {:+.2}]: x{} from r=4 to 2048 ({:+.1} orders of magnitude)",
        ci.0,
        ci.1,
        fmt_sig(f),
        f.log10()
    )
}

fn fmt_sig(x: f64) -> String {
    if !(0.01..100.0).contains(&x) {
        format!("{x:.2e}")
    } else {
        format!("{x:.3}")
    }
}

fn paper_rows(
    theory: &[TheorySection],
    train_runs: &[&Run],
    opts: &AnalysisOptions,
) -> Vec<PaperRow> {
    let mut out = Vec::new();
    let findings = [
        ("lora", 1.0, "Standard LoRA: the average parameter gradient norm falls with rank", "about two orders of magnitude lower at r=2048 than at r=4 (AdamW; Llama 2 7B, OpenOrca)"),
        ("rslora", 0.5, "rsLoRA: the average parameter gradient norm stays rank-stable", "within one order of magnitude from r=4 to r=2048 (AdamW; Llama 2 7B, OpenOrca)"),
    ];
    for (scaling, beta, finding, paper) in findings {
        // Training: the grad_norm_avg metric's exponent in the last window (or the B-gradient
        // norm pooled over modules and layers when the metric is absent).
        let mut measured = false;
        for (model, opt, slope, ci, what, ranks) in
            train_grad_norm_exponents(train_runs, scaling, beta, opts)
        {
            measured = true;
            let same = model.to_lowercase().contains("llama-2-7b")
                && opt == "adamw"
                && ranks.first() == Some(&4)
                && ranks.last() == Some(&2048);
            out.push(PaperRow {
                finding: finding.into(),
                paper: paper.into(),
                ours: describe_factor(slope, ci),
                source: format!(
                    "training: {model}, {opt}, {what}, ranks {}",
                    fmt_ranks(&ranks)
                ),
                comparable: if same {
                    "same setup".into()
                } else {
                    format!(
                        "shape only ({model}, ranks {}, not Llama 2 7B at r=4..2048)",
                        fmt_ranks(&ranks)
                    )
                },
            });
        }
        // Theory: the Monte Carlo B-gradient norm under Adam(W) and SGD.
        for sec in theory {
            let last = sec
                .rows
                .iter()
                .filter_map(|r| r.window.strip_prefix("step ")?.parse::<u32>().ok())
                .max();
            for r in sec.rows.iter().filter(|r| {
                r.site.as_str() == "param"
                    && r.stat.as_str() == "grad_norm_b"
                    && (r.beta - beta).abs() < 1e-9
                    && r.layer == "0"
                    && r.inputs == "coherent"
                    && Some(r.window.clone()) == last.map(|l| format!("step {l}"))
            }) {
                measured = true;
                out.push(PaperRow {
                    finding: finding.into(),
                    paper: paper.into(),
                    ours: describe_factor(r.slope, (r.ci_low, r.ci_high)),
                    source: format!(
                        "theory run {}: {}, B-gradient norm, {}, ranks {}",
                        sec.run, r.optimizer, r.window, r.ranks
                    ),
                    comparable: format!(
                        "shape only (synthetic network; law predicts {})",
                        r.predicted.map_or("-".into(), |p| format!(
                            "{p:+.2}, x{}",
                            fmt_sig(factor_4_to_2048(p))
                        ))
                    ),
                });
            }
        }
        if !measured {
            out.push(PaperRow {
                finding: finding.into(),
                paper: paper.into(),
                ours: "-".into(),
                source: "no gradient norms in the runs given".into(),
                comparable: "not measured".into(),
            });
        }
    }
    out.push(perplexity_row(train_runs));
    out
}

/// (model, optimizer, slope, ci, what, ranks) of the average gradient norm against rank.
fn train_grad_norm_exponents(
    train_runs: &[&Run],
    scaling: &str,
    beta: f64,
    opts: &AnalysisOptions,
) -> Vec<(String, String, f64, (f64, f64), String, Vec<u32>)> {
    let mut out = Vec::new();
    // model, optimizer -> step -> rank -> seed -> value
    let mut g: BTreeMap<(String, String), BTreeMap<u32, ByRank>> = BTreeMap::new();
    let mut what = "metric grad_norm_avg";
    let opt_of = |r: &Run| r.metrics.first().map(|m| m.optimizer.clone());
    for run in train_runs {
        // Runs of the same optimizer (each optimizer has its own learning rate).
        let peers: Vec<&&Run> = train_runs
            .iter()
            .filter(|r| opt_of(r) == opt_of(run))
            .collect();
        if run_lr(run).is_some()
            && peers
                .iter()
                .filter_map(|r| run_lr(r))
                .collect::<BTreeSet<_>>()
                .len()
                > 1
        {
            // Several learning rates: compare like with like, the most common one only.
            let lrs: Vec<String> = peers.iter().filter_map(|r| run_lr(r)).collect();
            let mode = lrs
                .iter()
                .max_by_key(|l| lrs.iter().filter(|x| x == l).count())
                .cloned();
            if run_lr(run) != mode {
                continue;
            }
        }
        for r in run.metrics.iter().filter(|r| {
            r.metric == Metric::GradNormAvg
                && r.scaling.to_string() == scaling
                && (r.beta - beta).abs() < 1e-9
        }) {
            g.entry((r.model.clone(), r.optimizer.to_string()))
                .or_default()
                .entry(r.step)
                .or_default()
                .entry(r.rank)
                .or_default()
                .insert(r.seed, r.value);
        }
    }
    if g.is_empty() {
        what = "mean B-gradient norm over adapters";
        for run in train_runs {
            let mut acc: BTreeMap<(String, String, u32, u32, u64), (f64, usize)> = BTreeMap::new();
            for r in run.moments.iter().filter(|r| {
                r.site == Site::Param
                    && r.stat == Stat::GradNormB
                    && r.scaling.to_string() == scaling
                    && (r.beta - beta).abs() < 1e-9
            }) {
                let e = acc
                    .entry((
                        r.model.clone(),
                        r.optimizer.to_string(),
                        r.step,
                        r.rank,
                        r.seed,
                    ))
                    .or_insert((0.0, 0));
                e.0 += r.value;
                e.1 += 1;
            }
            for ((model, opt, step, rank, seed), (s, n)) in acc {
                g.entry((model, opt))
                    .or_default()
                    .entry(step)
                    .or_default()
                    .entry(rank)
                    .or_default()
                    .insert(seed, s / n as f64);
            }
        }
    }
    for ((model, opt), by_step) in g {
        let steps: Vec<u32> = by_step.keys().copied().collect();
        let Some(w) = step_windows(&steps, opts.windows).into_iter().last() else {
            continue;
        };
        let br = window_mean(&by_step, &w);
        if let Some((ranks, _, fit)) = fit_by_rank(&br) {
            out.push((
                model,
                opt,
                fit.slope,
                (fit.ci_low, fit.ci_high),
                format!("{what}, {}", w.label),
                ranks,
            ));
        }
    }
    out
}

fn perplexity_row(train_runs: &[&Run]) -> PaperRow {
    let finding = "Best perplexity: rsLoRA at high rank beats the best standard LoRA";
    let paper = "best LoRA (r=4, lr x10) 1.863 vs rsLoRA r=2048 1.836 (Llama 2 7B, OpenOrca)";
    // Final held-out perplexity per (model, optimizer, scaling, rank, lr), mean over seeds;
    // LoRA and rsLoRA are compared within one model and optimizer (the paper: AdamW).
    type Key = (String, String, String, u32, String);
    let mut fin: BTreeMap<Key, BTreeMap<u64, (u32, f64)>> = BTreeMap::new();
    for run in train_runs {
        let lr = run_lr(run).unwrap_or_default();
        for r in run
            .metrics
            .iter()
            .filter(|r| r.metric == Metric::HeldoutPerplexity && r.value.is_finite())
        {
            let e = fin
                .entry((
                    r.model.clone(),
                    r.optimizer.to_string(),
                    r.scaling.to_string(),
                    r.rank,
                    lr.clone(),
                ))
                .or_default()
                .entry(r.seed)
                .or_insert((0, f64::NAN));
            if r.step >= e.0 {
                *e = (r.step, r.value);
            }
        }
    }
    let mean =
        |m: &BTreeMap<u64, (u32, f64)>| m.values().map(|v| v.1).sum::<f64>() / m.len() as f64;
    let mut parts = Vec::new();
    let groups: BTreeSet<(String, String)> =
        fin.keys().map(|k| (k.0.clone(), k.1.clone())).collect();
    for (model, opt) in &groups {
        let here = |k: &Key| &k.0 == model && &k.1 == opt;
        let best_lora = fin
            .iter()
            .filter(|(k, _)| here(k) && k.2 == "lora")
            .map(|(k, v)| (mean(v), k.3, k.4.clone()))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let top_rank = fin
            .keys()
            .filter(|k| here(k) && k.2 == "rslora")
            .map(|k| k.3)
            .max();
        let top_rs = fin
            .iter()
            .filter(|(k, _)| here(k) && k.2 == "rslora" && Some(k.3) == top_rank)
            .map(|(k, v)| (mean(v), k.3, k.4.clone()))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let model = format!("{model} ({opt})");
        let lr = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!(", lr {l}")
            }
        };
        match (best_lora, top_rs) {
            (Some(a), Some(b)) => parts.push(format!(
                "{model}: best LoRA (r={}{}) {:.4} vs rsLoRA r={}{} {:.4}",
                a.1,
                lr(&a.2),
                a.0,
                b.1,
                lr(&b.2),
                b.0
            )),
            (Some(a), None) => parts.push(format!(
                "{model}: best LoRA (r={}) {:.4}; no rsLoRA runs",
                a.1, a.0
            )),
            (None, Some(b)) => parts.push(format!(
                "{model}: rsLoRA r={} {:.4}; no LoRA runs",
                b.1, b.0
            )),
            (None, None) => {}
        }
    }
    if parts.is_empty() {
        return PaperRow {
            finding: finding.into(),
            paper: paper.into(),
            ours: "-".into(),
            source: "no held-out perplexity in the runs given".into(),
            comparable: "not measured".into(),
        };
    }
    let same = groups
        .iter()
        .any(|(m, _)| m.to_lowercase().contains("llama-2-7b"));
    PaperRow {
        finding: finding.into(),
        paper: paper.into(),
        ours: parts.join("; "),
        source: "training: final held-out perplexity, mean over seeds".into(),
        comparable: if same {
            "same model (check data and steps)".into()
        } else {
            "shape only (other model, data and length)".into()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_handle_few_steps_and_no_step_zero() {
        assert_eq!(step_windows(&[], 3), vec![]);
        let w = step_windows(&[5, 5, 7], 3);
        assert_eq!(
            w.iter().map(|w| w.label.as_str()).collect::<Vec<_>>(),
            ["step 5", "step 7"]
        );
        let w = step_windows(&[0], 3);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn unpaired_seeds_fall_back_to_rank_means() {
        let mut by: ByRank = BTreeMap::new();
        for (i, r) in [4u32, 8, 16, 32].into_iter().enumerate() {
            // Each rank has its own seed; values r^0.5 with a small wobble.
            let v = (f64::from(r)).powf(0.5) * (1.0 + 0.01 * (i as f64 - 1.5));
            by.insert(r, [(i as u64, v)].into_iter().collect());
        }
        let (ranks, seeds, fit) = fit_by_rank(&by).expect("fits");
        assert_eq!(ranks.len(), 4);
        assert_eq!(seeds, 1);
        assert!((fit.slope - 0.5).abs() < 0.02, "{fit:?}");
        assert!(fit.ci_low < fit.slope && fit.slope < fit.ci_high);
    }

    #[test]
    fn one_rank_or_zero_values_give_no_fit() {
        let mut by: ByRank = BTreeMap::new();
        by.insert(4, [(0, 1.0)].into_iter().collect());
        assert!(fit_by_rank(&by).is_none());
        by.insert(8, [(0, 0.0)].into_iter().collect());
        by.insert(4, [(0, 0.0)].into_iter().collect());
        assert!(fit_by_rank(&by).is_none());
    }

    #[test]
    fn predictions_follow_the_laws_of_the_proofs() {
        let r = [4u32, 16, 64, 256];
        // SGD, forward, coherent limit: m (1 - 2 beta).
        let p = predict_train("sgd", "fwd", "abs", 2, 4096, 0.5, &r);
        assert_eq!(p.predicted, Some(0.0));
        let p = predict_train("sgd", "fwd", "abs", 2, 4096, 1.0, &r);
        assert_eq!(p.predicted, Some(-2.0));
        assert_eq!(p.incoherent, Some(-3.0));
        // Adam, forward: m (1 - beta); LoRA flat.
        let p = predict_train("adamw", "fwd", "abs", 2, 4096, 1.0, &r);
        assert_eq!(p.predicted, Some(0.0));
        assert!(p.law.contains("paper's law"), "{}", p.law);
        // The forward prediction does not depend on width or ranks: the asymptotic law.
        for (d, ranks) in [(64, &[4u32, 8][..]), (8192, &[4, 2048][..])] {
            let q = predict_train("adamw", "fwd", "abs", 2, d, 0.5, ranks);
            assert_eq!((q.predicted, q.coherent), (Some(1.0), Some(1.0)));
        }
        // Input gradient at r << d: incoherent, p (1/2 - 2 beta) under SGD.
        let p = predict_train("sgd", "bwd", "abs", 2, 4096, 0.5, &r);
        assert!((p.predicted.expect("law") + 1.0).abs() < 0.03, "{p:?}");
        // grad_norm_avg under Adam: 1/2 - beta; under SGD only a band.
        assert_eq!(
            predict_train("adamw", "param", "grad_norm_avg", 1, 64, 1.0, &r).predicted,
            Some(-0.5)
        );
        let p = predict_train("sgd", "param", "grad_norm_avg", 1, 64, 1.0, &r);
        assert_eq!(
            (p.predicted, p.coherent, p.incoherent),
            (None, Some(-1.5), Some(-0.5))
        );
        // No law: grad_out, raw moments, unknown optimizer.
        assert_eq!(
            predict_train("sgd", "grad_out", "abs", 2, 64, 1.0, &r).predicted,
            None
        );
        assert_eq!(
            predict_train("adafactor", "fwd", "abs", 2, 64, 1.0, &r).predicted,
            None
        );
    }

    #[test]
    fn verdicts_and_agreement_use_the_tolerance() {
        let base = ExponentRow {
            source: "train".into(),
            beta: 1.0,
            m: 2,
            seeds: 2,
            slope: -0.1,
            se: 0.05,
            ci_low: -0.2,
            ci_high: 0.0,
            predicted: Some(0.1),
            coherent_limit: Some(0.1),
            incoherent_limit: Some(-1.0),
            ..ExponentRow::default()
        };
        let r = finish_row(base.clone(), 0.15);
        assert_eq!(r.verdict, "stable");
        assert_eq!(r.agrees, Some(true));
        assert_eq!(r.in_band, Some(true));
        let r = finish_row(
            ExponentRow {
                predicted: Some(1.0),
                coherent_limit: Some(1.0),
                incoherent_limit: Some(0.5),
                ..base.clone()
            },
            0.15,
        );
        assert_eq!(r.agrees, Some(false));
        assert_eq!(r.in_band, Some(false));
        assert_eq!(r.predicted_verdict, "exploding");
        let r = finish_row(
            ExponentRow {
                slope: f64::NAN,
                ..base
            },
            0.15,
        );
        assert_eq!(r.verdict, "diverged");
        assert_eq!(r.agrees, Some(false));
    }

    #[test]
    fn beta_keys_sort_lora_before_rslora_and_round_trip() {
        for b in [1.0, 0.5, 0.0, 0.75, -0.25] {
            assert_eq!(beta_of_key(beta_key(b)), b);
        }
        assert!(beta_key(1.0) < beta_key(0.5));
        assert!(beta_key(0.5) < beta_key(0.0));
        assert!(beta_key(0.0) < beta_key(-0.25));
    }

    #[test]
    fn spread_keeps_ends() {
        assert_eq!(spread(&[1, 2, 3, 4, 5, 6, 7], 3), vec![1, 4, 7]);
        assert_eq!(spread(&[1, 2], 4), vec![1, 2]);
    }

    #[test]
    fn slugs_are_file_safe() {
        assert_eq!(
            slug("train-SmolLM2 135M/q_proj<x>"),
            "train-SmolLM2-135M-q_proj-x"
        );
    }
}
