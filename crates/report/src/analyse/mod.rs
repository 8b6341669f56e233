//! From loaded runs to everything the report shows: exponent tables with predictions and
//! verdicts, the data of every figure, the paper's findings next to ours. Pure: no I/O.
//!
//! The analysis is a stack of small layers, each with one job:
//!
//! | module          | job                                                                  |
//! |-----------------|----------------------------------------------------------------------|
//! | this file       | [`Analysis`], its options and the [`analyse`] entry                  |
//! | `runs`          | provenance of each run ([`RunInfo`]), learning rate, configuration   |
//! | `fit`           | values by rank and seed, [`fit_by_rank`], step windows, layer means  |
//! | `row`           | one fitted exponent ([`ExponentRow`]) as judged; headline counts      |
//! | `theory`        | the section of a theory run: its fits and its figures                |
//! | `train`         | the training section: grouping the runs and their law rows, notes    |
//! | `train_rows`    | one row per training fit, its claims, the family judged              |
//! | `train_plots`   | the training figures: curves against step, rank panels, heatmaps     |
//! | `plots`         | what a figure holds ([`Plot`]) and the helpers shared by figures     |
//! | `findings`      | the paper's findings next to ours                                    |
//! | `transfer`      | the section of a learning-rate transfer study: tables, figure data    |
//! | `headline`      | the verdict in plain sentences and the headline figure's points       |
//!
//! Statistics come from `rankstab_theory::stats` (one implementation for the checker and the
//! report): `fit_slope` (slope of log mean against log rank, jackknife over seeds paired
//! across ranks), `fit_slope_diff` (the paired difference of two slopes) and `mean_ci`. The
//! one rule that judges a fit (three outcomes against its prediction, rival laws, stability)
//! is `rankstab_theory::predict::verdict`: the report builds the claims and asks, it decides
//! nothing itself.
//!
//! **Transfer studies** (`rankstab transfer`) are shown as their own `transfer.json` says:
//! lr* per rank, its exponent against the long-horizon law, the one-step law and c = 0, as
//! the study's rule judged them; the verdict card gains one sentence per rank exponent.
//!
//! **Theory runs** are fitted and judged again with `rankstab_theory::fit_rows` whenever
//! their configuration parses (so an old run directory is judged by today's rule); their
//! `fits.json` is used as written only otherwise.
//!
//! **Training exponents.** Rows are grouped by (model, optimizer, scaling, learning rate,
//! module, layer, site, stat, m); the recorded steps of a model are cut into step windows
//! ([`step_windows`]: step 0 alone, step 1 alone, then equal-count chunks), and within a
//! window each (rank, seed) contributes the mean of its values. Seeds present at every rank
//! are paired (jackknife interval over seeds); when no seed is common to all ranks, each
//! rank's mean over its seeds is one point and the interval comes from the OLS residuals.
//! Besides each layer, every module is also fitted on the mean over its layers
//! (`layer = all`).
//!
//! **Training claims** (the reading guide states them, [`crate::render::TRAIN_LAW_CHOICE`]):
//! the prediction comes only from the exact first-step law that each run computed from its
//! own step-0 data (its `law` rows), tested at step 1 on the paired difference of slopes;
//! every training fit of the report is one Benjamini-Hochberg family; a fit is judged only
//! with >= 3 seeds and >= 5 ranks reaching d/8. When theory runs are given, the Monte Carlo
//! slopes of the matching setting are shown beside the prediction (`mc_coherent`,
//! `mc_fresh`), never in its place and never in the family.

mod findings;
mod fit;
mod headline;
mod plots;
mod row;
mod runs;
mod theory;
mod train;
mod train_plots;
mod train_rows;
mod transfer;

pub use findings::PaperRow;
pub use fit::{fit_by_rank, step_windows, ByRank};
pub use headline::{
    outcome_words, sentences, slope_90, transfer_sentences, Headline, HeadlinePoint, Sentence,
};
pub use plots::{
    slug, EdgeMark, LrCurve, LrPanel, Plot, PlotKind, RankPanel, RankSeries, StepPanel, StepSeries,
    XyAxis, XyPanel,
};
pub use row::{tally_rows, ExponentRow};
pub(crate) use runs::run_lr;
pub use runs::RunInfo;
pub use theory::TheorySection;
pub use train::TrainSection;
pub use transfer::{CellView, HorizonView, TransferExponentRow, TransferSection};

use crate::load::{Run, RunKind, Skipped};
use serde::Serialize;

/// Settings of the analysis.
#[derive(Debug, Clone)]
pub struct AnalysisOptions {
    /// Step windows after step 0 for training exponents.
    pub windows: usize,
    /// Most panels (steps) per moment-vs-rank figure.
    pub max_panels: usize,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        Self {
            windows: 3,
            max_panels: 4,
        }
    }
}

/// Everything a report shows.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// The verdict in sentences (the page's first screen) and the headline figure's data.
    pub headline: Headline,
    /// Provenance of every run used.
    pub runs: Vec<RunInfo>,
    /// Directories not used, with reasons.
    pub skipped: Vec<Skipped>,
    /// One section per theory run.
    pub theory: Vec<TheorySection>,
    /// The merged training runs, when any.
    pub train: Option<TrainSection>,
    /// One section per learning-rate transfer study.
    pub transfer: Vec<TransferSection>,
    /// The paper's findings next to ours.
    pub paper: Vec<PaperRow>,
    /// Every figure, in display order.
    pub plots: Vec<Plot>,
}

/// Runs the whole analysis.
pub fn analyse(runs: &[Run], skipped: &[Skipped], opts: &AnalysisOptions) -> Analysis {
    let mut plots = Vec::new();
    let theory: Vec<TheorySection> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Theory)
        .map(|r| theory::section(r, opts, &mut plots))
        .collect();
    let train_runs: Vec<&Run> = runs.iter().filter(|r| r.kind == RunKind::Train).collect();
    let train =
        (!train_runs.is_empty()).then(|| train::section(&train_runs, &theory, opts, &mut plots));
    let transfer: Vec<TransferSection> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Transfer)
        .filter_map(|r| transfer::section(r, &mut plots))
        .collect();
    let paper = findings::paper_rows(&theory, &train_runs, opts);
    let primary: Vec<&ExponentRow> = theory
        .iter()
        .flat_map(|s| headline::theory_primary(&s.shown))
        .chain(train.iter().flat_map(|t| headline::train_primary(&t.shown)))
        .collect();
    let mut headline = headline::sentences(&primary);
    for r in runs.iter().filter(|r| r.kind == RunKind::Transfer) {
        if let Some(t) = r.transfer.as_deref() {
            headline.sentences.extend(headline::transfer_sentences(t));
        }
    }
    if !headline.points.is_empty() {
        plots.insert(0, plots::headline_plot(&headline));
    }
    Analysis {
        headline,
        runs: runs.iter().map(runs::run_info).collect(),
        skipped: skipped.to_vec(),
        theory,
        train,
        transfer,
        paper,
        plots,
    }
}
