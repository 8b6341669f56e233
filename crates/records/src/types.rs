//! The record types. Column and field names follow the project's axis names: rank, alpha,
//! beta, scaling, optimizer, width, step, seed, layer, module, site, stat, m. Axis values
//! are the typed vocabulary of [`crate::vocab`]; the files keep its spellings.
use crate::vocab::{Metric, Optimizer, Outcome, Rival, Scaling, Site, Stat, Verdict};
use serde::{Deserialize, Serialize};

/// State of a run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Work in progress (or killed: the run resumes when the command is run again).
    #[default]
    Running,
    /// Every unit of work finished and the outputs are final.
    Complete,
    /// A training run whose loss became non-finite: its rows up to that step are final,
    /// and `Manifest::note` says at which step ("diverged at step k").
    Diverged,
}

/// `manifest.json`: everything needed to reproduce and to trust a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`crate::SCHEMA_VERSION`] at write time.
    pub schema_version: u32,
    /// Always "rankstab".
    pub tool: String,
    /// Version of the rankstab that wrote the run.
    pub tool_version: String,
    /// `git rev-parse HEAD` of the source tree, when known.
    pub git_revision: Option<String>,
    /// Which tool produced the run: "theory", "train", ...
    pub command: String,
    /// The full, resolved configuration (every default filled in).
    pub config: serde_json::Value,
    /// Seeds used (one per trial or cell).
    pub seeds: Vec<u64>,
    /// Device description, e.g. "cpu (2 threads)".
    pub device: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Completion time, RFC 3339 UTC, once complete.
    pub finished: Option<String>,
    /// Running, complete or diverged.
    pub status: RunStatus,
    /// A remark on how the run ended, e.g. "diverged at step 3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Rows and bytes of every table at completion (empty while running, and in runs
    /// written before rankstab recorded them): readers check a finished run's tables
    /// against them ([`crate::verify_tables`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tables: std::collections::BTreeMap<String, TableSize>,
}

/// Size of one table of a finished run, recorded in its manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TableSize {
    /// Data rows (lines after the header).
    pub rows: u64,
    /// Bytes of the file.
    pub bytes: u64,
}

/// One row of `moments.csv` (long format: one measured number per row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MomentRow {
    /// "theory" (synthetic network) or "train" (real model).
    pub source: String,
    /// Model name ("synthetic" for the checker).
    pub model: String,
    /// Adapted module ("adapter" in the checker; "q_proj", "fc_in", ... in models).
    pub module: String,
    /// Layer index, 0-based.
    pub layer: u32,
    /// Adapter rank r.
    pub rank: u32,
    /// Scaling numerator alpha.
    pub alpha: f64,
    /// Scaling: lora, rslora, constant or `beta=<b>`.
    pub scaling: Scaling,
    /// Scaling exponent: gamma_r = alpha * r^-beta (the scaling's beta, a column of its own
    /// for readers of the table).
    pub beta: f64,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Input regime: "coherent" (one batch reused) or "fresh" (new batch per step); data
    /// set name for training runs.
    pub inputs: String,
    /// Input distribution (gaussian, rademacher, student-t(5), ...); "text" for training.
    pub dist: String,
    /// Model width d.
    pub width: u32,
    /// Seed of the trial or run.
    pub seed: u64,
    /// Optimisation step; 0 is initialisation.
    pub step: u32,
    /// Where it is measured.
    pub site: Site,
    /// What is measured.
    pub stat: Stat,
    /// Moment order m; empty for norms.
    pub m: Option<u32>,
    /// The measured value.
    pub value: f64,
}

/// One row of `metrics.csv`: per-step scalar metrics (loss, perplexity, lr, timings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MetricRow {
    /// "theory" or "train".
    pub source: String,
    /// Model name.
    pub model: String,
    /// Adapter rank.
    pub rank: u32,
    /// Scaling.
    pub scaling: Scaling,
    /// Scaling exponent.
    pub beta: f64,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Input regime or data set.
    pub inputs: String,
    /// Seed.
    pub seed: u64,
    /// Optimisation step.
    pub step: u32,
    /// Which metric.
    pub metric: Metric,
    /// Value.
    pub value: f64,
}

/// JSON has no NaN: `serde_json` writes it as `null`; read `null` back as NaN.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer};
    /// Deserialises a number or `null` (NaN).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// One fitted rank exponent (an element of `fits.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Fit {
    /// "theory" or "train".
    pub source: String,
    /// Model name.
    pub model: String,
    /// Module name.
    pub module: String,
    /// Layer index.
    pub layer: u32,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling.
    pub scaling: Scaling,
    /// Scaling exponent.
    pub beta: f64,
    /// Input regime.
    pub inputs: String,
    /// Input distribution.
    pub dist: String,
    /// Site.
    pub site: Site,
    /// Statistic.
    pub stat: Stat,
    /// Moment order (1 for norms).
    pub m: u32,
    /// Step.
    pub step: u32,
    /// Ranks used in the fit.
    pub ranks: Vec<u32>,
    /// Independent trials (seeds) behind each point.
    pub trials: u32,
    /// Least-squares slope of log(statistic) against log(rank).
    #[serde(deserialize_with = "nan_as_null::deserialize")]
    pub slope: f64,
    /// Standard error of the slope.
    #[serde(deserialize_with = "nan_as_null::deserialize")]
    pub se: f64,
    /// Lower end of the 95% confidence interval.
    #[serde(deserialize_with = "nan_as_null::deserialize")]
    pub ci_low: f64,
    /// Upper end of the 95% confidence interval.
    #[serde(deserialize_with = "nan_as_null::deserialize")]
    pub ci_high: f64,
    /// Which law gave `predicted` ("exact first step", "first order in lr", "norm law",
    /// "two-term law"); empty when no law applies.
    #[serde(default)]
    pub law: String,
    /// The law's slope over the same ranks (NaN when no law applies).
    #[serde(deserialize_with = "nan_as_null::deserialize")]
    pub predicted: f64,
    /// Half-width of the prediction's band (proofs/verdicts.md).
    #[serde(default = "nan", deserialize_with = "nan_as_null::deserialize")]
    pub band: f64,
    /// Paired difference of the slopes, measured minus law, when the law gives a value
    /// per trial (NaN otherwise), and its 95% interval.
    #[serde(default = "nan", deserialize_with = "nan_as_null::deserialize")]
    pub diff: f64,
    /// Lower end of the difference's 95% interval.
    #[serde(default = "nan", deserialize_with = "nan_as_null::deserialize")]
    pub diff_ci_low: f64,
    /// Upper end of the difference's 95% interval.
    #[serde(default = "nan", deserialize_with = "nan_as_null::deserialize")]
    pub diff_ci_high: f64,
    /// How the fit stands against the prediction (Benjamini-Hochberg over the run's fits).
    #[serde(default)]
    pub outcome: Outcome,
    /// The rival laws and whether the fit rejects them.
    #[serde(default)]
    pub rivals: Vec<RivalCheck>,
    /// Whether some rival differs from the prediction by more than twice the band, so that
    /// the fit can tell them apart.
    #[serde(default)]
    pub discriminating: bool,
    /// Limit of the two-term law for large rank with coherent inputs: the paper's law.
    #[serde(deserialize_with = "nan_as_null::deserialize")]
    pub asymptotic: f64,
    /// "coherent" or "incoherent" (which term of the two-term law dominates at the top
    /// rank); for Adam also its measured regime ("sign-like", "eps-dominated", "mixed").
    pub regime: String,
    /// Stability of the statistic from the fit's interval.
    pub verdict: Verdict,
}

fn nan() -> f64 {
    f64::NAN
}

/// A rival law set against a fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RivalCheck {
    /// Which rival.
    pub rival: Rival,
    /// Its slope.
    #[serde(deserialize_with = "nan_as_null::deserialize")]
    pub slope: f64,
    /// Whether it differs from the prediction by more than twice the band.
    pub distinct: bool,
    /// Whether the fit's interval excludes the rival's band (Benjamini-Hochberg over the
    /// family's rival tests).
    pub rejected: bool,
}

/// One row of `summary.csv`: a statistic of one cell aggregated over trials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SummaryRow {
    /// "theory" or "train".
    pub source: String,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling.
    pub scaling: Scaling,
    /// Scaling exponent.
    pub beta: f64,
    /// Input regime.
    pub inputs: String,
    /// Layer.
    pub layer: u32,
    /// Rank.
    pub rank: u32,
    /// Step.
    pub step: u32,
    /// Site.
    pub site: Site,
    /// Statistic.
    pub stat: Stat,
    /// Moment order; empty for norms.
    pub m: Option<u32>,
    /// Number of trials.
    pub trials: u32,
    /// Mean over trials.
    pub mean: f64,
    /// Standard error of the mean.
    pub se: f64,
    /// 95% t-interval, lower end.
    pub ci_low: f64,
    /// 95% t-interval, upper end.
    pub ci_high: f64,
}

crate::named_enum! {
    /// A data coefficient of the exact first-step law (theory runs, `coefficients.csv`).
    CoefStat, "coefficient" {
        /// Coefficient of r in the summed first-step second moment (incoherent term).
        #[default]
        Lin => "coef_lin",
        /// Coefficient of r^2 (coherent term).
        Quad => "coef_quad",
        /// Number of output entries the sums run over.
        Entries => "coef_entries",
    }
}

impl CoefRow {
    /// The coefficient `stat` with `value`, at the trial, layer, step and site of `at` (a
    /// moment row of the same data).
    pub fn at(at: &MomentRow, stat: CoefStat, value: f64) -> Self {
        CoefRow {
            source: at.source.clone(),
            model: at.model.clone(),
            module: at.module.clone(),
            layer: at.layer,
            inputs: at.inputs.clone(),
            dist: at.dist.clone(),
            width: at.width,
            seed: at.seed,
            step: at.step,
            site: at.site,
            stat,
            value,
        }
    }
}

/// One row of `coefficients.csv`: a data coefficient of the exact first-step law of one
/// trial, layer and site. It depends on the trial's data only, not on the optimizer,
/// scaling or rank. (Runs written before this file existed kept these rows in
/// `moments.csv` with optimizer and scaling `any`; [`crate::read_moments`] splits them out.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CoefRow {
    /// "theory".
    pub source: String,
    /// Model name.
    pub model: String,
    /// Module name.
    pub module: String,
    /// Layer index.
    pub layer: u32,
    /// Input regime.
    pub inputs: String,
    /// Input distribution.
    pub dist: String,
    /// Width d.
    pub width: u32,
    /// Seed of the trial.
    pub seed: u64,
    /// Step at which the law applies.
    pub step: u32,
    /// Site (fwd or fwd_heldout).
    pub site: Site,
    /// Which coefficient.
    pub stat: CoefStat,
    /// Its value.
    pub value: f64,
}
