//! The training section: the training runs merged into groups ([`TrainData`], keyed by
//! [`TrainKey`]) with the exact law's rows beside them, the step windows, the rows shown in
//! the page and the notes a reader needs. The rows themselves, their claims and their
//! judgement are [`super::train_rows`]'s; the figures are [`super::train_plots`]'s.
use super::fit::{pool_layers, put, step_windows, ByRank, ByStep};
use super::plots::figure_order;
use super::row::{tally_rows, ExponentRow};
use super::runs::run_lr;
use super::{train_plots, train_rows};
use super::{AnalysisOptions, Plot, TheorySection};
use crate::load::Run;
use rankstab_records::{Layer, Optimizer, RunStatus, Scaling, Site, Stat, Window};
use rankstab_theory::predict::verdict::Tally;
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
    /// Outcomes and rivals counted over the primary family's fits that can discriminate (per module
    /// on the mean over layers; the headline adds the per-layer family's).
    pub counts: Tally,
    /// The counts in words.
    pub headline: String,
    /// Where the predictions come from in these runs.
    pub law_note: String,
    /// Whether a theory run gave Monte Carlo slopes to show beside the predictions.
    pub has_mc: bool,
    /// Things a reader should know (cells running or diverged, fits that cannot be judged,
    /// single ranks, missing metrics).
    pub notes: Vec<String>,
    /// Names of this section's figures.
    pub figures: Vec<String>,
}

/// A group of training moments: everything but layer, step, rank and seed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TrainKey {
    /// The rows' source: `train` (rankstab's trainer) or `audit` (adapters trained
    /// elsewhere, measured by `rankstab audit`); never merged with each other.
    pub source: String,
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

impl TrainKey {
    /// The cell as notes name it: "model optimizer scaling (lr x)".
    pub(super) fn label(&self) -> String {
        format!(
            "{} {} {} (lr {})",
            self.model,
            self.optimizer,
            self.scaling,
            if self.lr.is_empty() { "?" } else { &self.lr }
        )
    }
}

/// Where a layer width is recorded: a model's module at a site.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModuleSite {
    model: String,
    module: String,
    site: Site,
}

/// A model's module.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ModuleOf {
    model: String,
    module: String,
}

/// Per group: layer -> step -> rank -> seed -> value.
type Groups = BTreeMap<TrainKey, BTreeMap<u32, ByStep>>;

/// The training runs' moments, merged.
pub(super) struct TrainData {
    /// The measured statistics.
    pub groups: Groups,
    /// The exact law's rows (`stat = law`), keyed as the measured group they predict
    /// (`stat = abs`).
    laws: Groups,
    widths: BTreeMap<ModuleSite, u32>,
    /// min(in, out) of a model's module, from the runs' `config.run.modules`.
    dims: BTreeMap<ModuleOf, u32>,
}

impl TrainData {
    fn new(train_runs: &[&Run]) -> Self {
        let mut groups = Groups::new();
        let mut laws = Groups::new();
        let mut widths = BTreeMap::new();
        let mut dims = BTreeMap::new();
        for run in train_runs {
            let lr = run_lr(run).unwrap_or_default();
            let models: BTreeSet<&str> = run.moments.iter().map(|r| r.model.as_str()).collect();
            for (module, d) in config_dims(run) {
                for model in &models {
                    let at = ModuleOf {
                        model: (*model).to_string(),
                        module: module.clone(),
                    };
                    dims.insert(at, d);
                }
            }
            for r in &run.moments {
                let (target, stat) = match r.stat {
                    Stat::ClosedForm => continue,
                    Stat::Law => (&mut laws, Stat::Abs),
                    s => (&mut groups, s),
                };
                let key = TrainKey {
                    source: r.source.clone(),
                    model: r.model.clone(),
                    optimizer: r.optimizer,
                    scaling: r.scaling,
                    lr: lr.clone(),
                    inputs: r.inputs.clone(),
                    module: r.module.clone(),
                    site: r.site,
                    stat,
                    m: r.m.unwrap_or(1),
                };
                if r.stat != Stat::Law {
                    let at = ModuleSite {
                        model: r.model.clone(),
                        module: r.module.clone(),
                        site: r.site,
                    };
                    widths.insert(at, r.width);
                }
                let by_step = target.entry(key).or_default().entry(r.layer).or_default();
                put(by_step, r.step, r.rank, r.seed, r.value);
            }
        }
        TrainData {
            groups,
            laws,
            widths,
            dims,
        }
    }

    /// The width of `key`'s module at its site as the rows record it (0 when not recorded).
    pub(super) fn width(&self, key: &TrainKey) -> u32 {
        let at = ModuleSite {
            model: key.model.clone(),
            module: key.module.clone(),
            site: key.site,
        };
        self.widths.get(&at).copied().unwrap_or(0)
    }

    /// The d of `key`'s module that the rank range is set against: min(in, out) from the
    /// runs' `config.run.modules` when recorded, else the rows' width; for rows pooled over
    /// modules (`module = all`) the smallest module's.
    pub(super) fn module_d(&self, key: &TrainKey) -> u32 {
        if key.module == "all" {
            return self.smallest_d(&key.model, Some(key.site));
        }
        let at = ModuleOf {
            model: key.model.clone(),
            module: key.module.clone(),
        };
        self.dims
            .get(&at)
            .copied()
            .unwrap_or_else(|| self.width(key))
    }

    /// The d of the smallest adapted module of `model` (min(in, out) from
    /// `config.run.modules`, and the rows' widths, at `site` when given): the rank range a
    /// training sweep needs reaches d / 8 of it (0 when no width is recorded).
    pub(super) fn smallest_d(&self, model: &str, site: Option<Site>) -> u32 {
        self.dims
            .iter()
            .filter(|(at, _)| at.model == model)
            .map(|(_, &d)| d)
            .chain(
                self.widths
                    .iter()
                    .filter(|(at, _)| at.model == model && site.is_none_or(|s| at.site == s))
                    .map(|(_, &d)| d),
            )
            .filter(|&d| d > 0)
            .min()
            .unwrap_or(0)
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

    /// The law's values at step 1 for `key` at `layer` (pooled like the measurement for
    /// `Layer::All`), or why there are none ("none: ...").
    pub(super) fn law_at(
        &self,
        key: &TrainKey,
        layer: Layer,
        window: Window,
    ) -> Result<ByRank, String> {
        let laws = self.laws.get(key);
        if key.stat != Stat::Abs || (laws.is_none() && key.site != Site::Fwd) {
            return Err(format!(
                "none: no law rows for {}/{} (the trainer writes them for |fwd|^m at step 1)",
                key.site, key.stat
            ));
        }
        if window != Window::step(1) {
            return Err("none: the exact first-step law applies at step 1 only".into());
        }
        let Some(laws) = laws else {
            return Err(if self.laws.is_empty() {
                "none: these runs have no law rows (written before the trainer recorded the exact first-step law)"
                    .into()
            } else {
                "none: no law rows for this group".into()
            });
        };
        let measured_layers = self.groups.get(key).map(|g| g.keys().collect::<Vec<_>>());
        let by_step = match layer {
            Layer::Index(l) => laws.get(&l).cloned(),
            // The mean over layers of the law is the law of the mean, over the same layers.
            Layer::All => (measured_layers == Some(laws.keys().collect::<Vec<_>>()))
                .then(|| pool_layers(laws)),
        };
        by_step
            .and_then(|mut by_step| by_step.remove(&1))
            .ok_or_else(|| "none: no law rows at step 1 for this layer".into())
    }
}

/// min(in, out) per module from a run's `config.run.modules` ({module: [in, out]}).
fn config_dims(run: &Run) -> Vec<(String, u32)> {
    let Some(modules) = run
        .manifest
        .config
        .get("run")
        .and_then(|r| r.get("modules"))
        .and_then(serde_json::Value::as_object)
    else {
        return Vec::new();
    };
    modules
        .iter()
        .filter_map(|(name, shape)| {
            let d = shape
                .as_array()?
                .iter()
                .map(serde_json::Value::as_u64)
                .collect::<Option<Vec<u64>>>()?
                .into_iter()
                .min()?;
            Some((name.clone(), u32::try_from(d).ok()?))
        })
        .collect()
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
    let fitted = train_rows::fit_rows(&data, &windows, theory);
    let rows = fitted.rows;
    let family = |primary: bool| -> Vec<ExponentRow> {
        rows.iter()
            .zip(&fitted.primary)
            .filter(|&(_, &p)| p == primary)
            .map(|(r, _)| r.clone())
            .collect()
    };
    let counts = tally_rows(&family(true));
    let layer_counts = tally_rows(&family(false));
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
    notes.extend(fitted.unjudged.into_iter().map(|(cell, u)| u.note(&cell)));
    notes.extend(
        fitted.single_rank.iter().map(|s| {
            format!("{s}: one rank only, so no rank exponent (its curves are still drawn)")
        }),
    );
    notes.extend(figure_notes);
    let figures = mine.iter().map(|p| p.name.clone()).collect();
    plots.extend(mine);
    let has_mc = rows
        .iter()
        .any(|r| r.mc_coherent.is_some() || r.mc_fresh.is_some());
    TrainSection {
        models: models.into_iter().collect(),
        runs: train_runs.len(),
        windows: windows.into_iter().collect(),
        shown: shown(&rows),
        law_note: law_note(&data, &rows, has_mc),
        rows,
        headline: if layer_counts.fits > 0 {
            format!(
                "{} (fits per module on the mean over layers; per-layer fits, a family of their own: {})",
                counts.headline(),
                layer_counts.headline()
            )
        } else {
            counts.headline()
        },
        counts,
        has_mc,
        notes,
        figures,
    }
}

/// The step windows of `model`: step 0, step 1, then `n` equal-count chunks of its later
/// recorded steps.
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
/// no pooled rows), abs moments and norms, after step 0 of a training run (its adapters
/// start with B = 0) and at every step of an audit (its step 0 is an adapter trained
/// elsewhere).
fn shown(rows: &[ExponentRow]) -> Vec<ExponentRow> {
    let pooled: BTreeSet<ModelModule> = rows
        .iter()
        .filter(|r| r.layer == Layer::All)
        .map(ModelModule::of)
        .collect();
    rows.iter()
        .filter(|r| r.layer == Layer::All || !pooled.contains(&ModelModule::of(r)))
        .filter(|r| r.stat == Stat::Abs || r.site == Site::Param)
        .filter(|r| r.source == "audit" || r.window != Window::step(0))
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

/// Where the training predictions of these runs come from, in a paragraph.
fn law_note(data: &TrainData, rows: &[ExponentRow], has_mc: bool) -> String {
    let with = rows.iter().filter(|r| r.predicted.is_some()).count();
    let laws = if data.laws.is_empty() {
        "No training run given has law rows (the exact first-step law that the trainer computes from each run's \
         own step-0 data; runs written before it recorded them get no prediction), so no training fit has a \
         prediction; rivals and stability are still judged."
            .to_string()
    } else {
        format!(
            "{with} training fit{} a prediction: the exact first-step law of E|fwd|^m, from the law rows each \
             run computed from its own step-0 data, tested at step 1 on the paired difference of slopes (measured \
             minus law, seed by seed) against a band around 0. Other statistics and windows have no prediction \
             (the law column says why); rivals and stability are judged for every fit.",
            if with == 1 { " has" } else { "s have" }
        )
    };
    format!(
        "{laws}{}",
        if has_mc {
            " The Monte Carlo slopes of the matching setting in the theory runs given (coherent and fresh inputs) are \
             shown beside them as MC columns; they change no judgement."
        } else {
            " No theory run given, so no Monte Carlo columns."
        }
    )
}
