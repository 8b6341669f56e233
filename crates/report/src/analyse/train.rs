//! The training section: the training runs merged into groups ([`TrainData`], keyed by
//! [`TrainKey`]), one exponent row per group, layer (and the mean over layers) and step
//! window, with the training prediction and the Monte Carlo slopes of the matching theory
//! setting; the rows shown in the page and the notes a reader needs. The figures are
//! [`super::train_plots`]'s.
use super::fit::{fit_by_rank, pool_layers, put, step_windows, window_mean, ByRank, ByStep};
use super::plots::figure_order;
use super::row::{agreement, fmt_ranks, ExponentRow};
use super::runs::run_lr;
use super::train_plots;
use super::{AnalysisOptions, Plot, TheorySection};
use crate::load::Run;
use rankstab_records::{Layer, Optimizer, RunStatus, Scaling, Site, Stat, Window};
use rankstab_theory::predict::predict_train;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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

/// A group of training moments: everything but layer, step, rank and seed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TrainKey {
    pub model: String,
    pub optimizer: Optimizer,
    /// Ordered by decreasing beta: lora, rslora, constant.
    pub scaling: Scaling,
    /// Learning rate as the run's config spells it (empty when not recorded).
    pub lr: String,
    pub inputs: String,
    pub module: String,
    pub site: Site,
    pub stat: Stat,
    pub m: u32,
}

/// Where a layer width is recorded: a model's module at a site.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModuleSite {
    model: String,
    module: String,
    site: Site,
}

/// The training runs' moments, merged.
pub(super) struct TrainData {
    /// Per group: layer -> step -> rank -> seed -> value.
    pub groups: BTreeMap<TrainKey, BTreeMap<u32, ByStep>>,
    widths: BTreeMap<ModuleSite, u32>,
}

impl TrainData {
    fn new(train_runs: &[&Run]) -> Self {
        let mut groups: BTreeMap<TrainKey, BTreeMap<u32, ByStep>> = BTreeMap::new();
        let mut widths = BTreeMap::new();
        for run in train_runs {
            let lr = run_lr(run).unwrap_or_default();
            for r in run.moments.iter().filter(|r| r.stat != Stat::ClosedForm) {
                let key = TrainKey {
                    model: r.model.clone(),
                    optimizer: r.optimizer,
                    scaling: r.scaling,
                    lr: lr.clone(),
                    inputs: r.inputs.clone(),
                    module: r.module.clone(),
                    site: r.site,
                    stat: r.stat,
                    m: r.m.unwrap_or(1),
                };
                let at = ModuleSite {
                    model: r.model.clone(),
                    module: r.module.clone(),
                    site: r.site,
                };
                widths.insert(at, r.width);
                let by_step = groups.entry(key).or_default().entry(r.layer).or_default();
                put(by_step, r.step, r.rank, r.seed, r.value);
            }
        }
        TrainData { groups, widths }
    }

    /// The width of `key`'s module at its site (0 when not recorded).
    pub(super) fn width(&self, key: &TrainKey) -> u32 {
        let at = ModuleSite {
            model: key.model.clone(),
            module: key.module.clone(),
            site: key.site,
        };
        self.widths.get(&at).copied().unwrap_or(0)
    }

    /// The models present.
    fn models(&self) -> BTreeSet<String> {
        self.groups.keys().map(|k| k.model.clone()).collect()
    }

    /// Whether the runs used more than one learning rate.
    pub(super) fn multi_lr(&self) -> bool {
        let lrs: BTreeSet<&str> = self.groups.keys().map(|k| k.lr.as_str()).collect();
        lrs.len() > 1
    }
}

/// The training section of `train_runs`; its figures are appended to `plots`.
pub(super) fn section(
    train_runs: &[&Run],
    theory: &[TheorySection],
    opts: &AnalysisOptions,
    plots: &mut Vec<Plot>,
) -> TrainSection {
    let data = TrainData::new(train_runs);
    let models = data.models();
    let windows: BTreeMap<String, Vec<Window>> = models
        .iter()
        .map(|model| (model.clone(), model_windows(&data, model, opts.windows)))
        .collect();
    let (rows, single_rank) = fit_rows(&data, &windows, theory, opts.tolerance);
    let figure_data = train_plots::Inputs {
        runs: train_runs,
        data: &data,
        windows: &windows,
        rows: &rows,
        order: figure_order(train_runs.iter().flat_map(|r| r.moments.iter())),
        max_panels: opts.max_panels,
    };
    let (mine, figure_notes) = train_plots::figures(&figure_data);
    let mut notes = status_notes(train_runs);
    notes.extend(
        single_rank.iter().map(|s| {
            format!("{s}: one rank only, so no rank exponent (its curves are still drawn)")
        }),
    );
    notes.extend(figure_notes);
    let figures = mine.iter().map(|p| p.name.clone()).collect();
    plots.extend(mine);
    let (agree, total) = agreement(&rows);
    let has_mc = rows
        .iter()
        .any(|r| r.mc_coherent.is_some() || r.mc_fresh.is_some());
    TrainSection {
        models: models.into_iter().collect(),
        runs: train_runs.len(),
        windows: windows.into_iter().collect(),
        shown: shown(&rows),
        rows,
        agree,
        total,
        law_note: law_note(has_mc),
        has_mc,
        notes,
        figures,
    }
}

/// The step windows of `model`: step 0, then `n` equal-count chunks of its recorded steps.
fn model_windows(data: &TrainData, model: &str, n: usize) -> Vec<Window> {
    let steps: Vec<u32> = data
        .groups
        .iter()
        .filter(|(k, _)| k.model == model)
        .flat_map(|(_, by_layer)| {
            by_layer
                .values()
                .flat_map(|by_step| by_step.keys().copied())
        })
        .collect();
    step_windows(&steps, n)
}

/// Every training row: per group, window and layer, and on the mean over layers. Also the
/// cells with one rank in all their data (no exponent to fit), as text for a note.
fn fit_rows(
    data: &TrainData,
    windows: &BTreeMap<String, Vec<Window>>,
    theory: &[TheorySection],
    tol: f64,
) -> (Vec<ExponentRow>, BTreeSet<String>) {
    let mut rows = Vec::new();
    let mut single_rank = BTreeSet::new();
    for (key, by_layer) in &data.groups {
        let width = data.width(key);
        let pooled = pool_layers(by_layer);
        let n_ranks = by_layer
            .values()
            .flat_map(|st| st.values().flat_map(|br| br.keys().copied()))
            .collect::<BTreeSet<u32>>()
            .len();
        for &w in windows.get(&key.model).into_iter().flatten() {
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
                let layer = Layer::Index(layer);
                rows.extend(row(key, layer, w, &br, width, theory, tol));
            }
            if by_layer.len() > 1 {
                let br = window_mean(&pooled, w);
                rows.extend(row(key, Layer::All, w, &br, width, theory, tol));
            }
        }
    }
    (rows, single_rank)
}

/// The row of one group, layer and window: fit, training prediction, Monte Carlo slopes.
fn row(
    key: &TrainKey,
    layer: Layer,
    window: Window,
    by_rank: &ByRank,
    width: u32,
    theory: &[TheorySection],
    tol: f64,
) -> Option<ExponentRow> {
    let (ranks, seeds, fit) = fit_by_rank(by_rank)?;
    let beta = key.scaling.beta();
    let p = predict_train(
        key.optimizer,
        key.site,
        key.stat,
        key.m,
        width,
        beta,
        &ranks,
    );
    let (mc_coherent, mc_fresh) = mc_slopes(theory, key);
    let row = ExponentRow {
        source: "train".into(),
        run: "merged".into(),
        model: key.model.clone(),
        module: key.module.clone(),
        layer,
        window,
        optimizer: key.optimizer,
        scaling: key.scaling,
        beta,
        lr: key.lr.clone(),
        inputs: key.inputs.clone(),
        site: key.site,
        stat: key.stat,
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
    Some(row.judged(p, tol))
}

/// Monte Carlo slopes (coherent, fresh) of the matching setting in the theory sections:
/// same optimizer (else same family), scaling, site, statistic and order; layer 0; last step.
fn mc_slopes(theory: &[TheorySection], key: &TrainKey) -> (Option<f64>, Option<f64>) {
    for exact in [true, false] {
        for sec in theory {
            let Some(last) = sec.last_step() else {
                continue;
            };
            let pick = |inputs: &str| {
                sec.rows
                    .iter()
                    .find(|r| {
                        let same_optimizer = if exact {
                            r.optimizer == key.optimizer
                        } else {
                            r.optimizer.is_adaptive() == key.optimizer.is_adaptive()
                        };
                        same_optimizer
                            && r.scaling == key.scaling
                            && r.site == key.site
                            && r.stat == key.stat
                            && r.m == key.m
                            && r.layer == Layer::Index(0)
                            && r.inputs == inputs
                            && r.window == Window::step(last)
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

/// A module of a model (whether it has rows pooled over layers).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ModelModule<'a> {
    model: &'a str,
    module: &'a str,
}

impl<'a> ModelModule<'a> {
    fn of(r: &'a ExponentRow) -> Self {
        ModelModule {
            model: &r.model,
            module: &r.module,
        }
    }
}

/// The rows shown in the page: pooled over layers (or the one layer of a module that has
/// no pooled rows), abs moments and norms, after step 0.
fn shown(rows: &[ExponentRow]) -> Vec<ExponentRow> {
    let pooled: BTreeSet<ModelModule> = rows
        .iter()
        .filter(|r| r.layer == Layer::All)
        .map(ModelModule::of)
        .collect();
    rows.iter()
        .filter(|r| r.layer == Layer::All || !pooled.contains(&ModelModule::of(r)))
        .filter(|r| r.stat == Stat::Abs || r.site == Site::Param)
        .filter(|r| r.window != Window::step(0))
        .cloned()
        .collect()
}

/// Runs that did not finish normally, one line per kind: diverged first, then running.
fn status_notes(train_runs: &[&Run]) -> Vec<String> {
    [
        (
            RunStatus::Diverged,
            "diverged; their rows before the divergence are used",
        ),
        (
            RunStatus::Running,
            "still running or interrupted; their rows so far are used",
        ),
    ]
    .into_iter()
    .filter_map(|(status, what)| {
        let runs: Vec<String> = train_runs
            .iter()
            .filter(|r| r.manifest.status == status)
            .map(|r| format!("{} ({})", r.id, r.status_text()))
            .collect();
        (!runs.is_empty()).then(|| format!("{} run(s) {what}: {}", runs.len(), runs.join(", ")))
    })
    .collect()
}

/// How the training predictions were made, in a paragraph.
fn law_note(has_mc: bool) -> String {
    format!(
        "Predictions depend on the training rows alone, not on which other runs are given. Forward moments: the \
         paper's law, the coherent limit m (1 - a beta) (SGD a = 2, Adam/AdamW a = 1). Input gradients: the finite-rank \
         law with kappa = 1/(d + k4 - 2). Norms: kappa-free laws.{}",
        if has_mc {
            " The Monte Carlo slopes of the matching setting in the theory runs given (coherent and fresh inputs) are \
             shown beside them as MC columns."
        } else {
            " No theory run given, so no Monte Carlo columns."
        }
    )
}
