//! The training figures, in display order: per model and optimizer the paper's
//! gradient-norm and perplexity curves against step (lora and rslora side by side), then the
//! moments against rank with fits (one curve per module, pooled over layers), then heatmaps
//! of the exponents per layer and module in the last step window.
use super::fit::{fit_by_rank, pool_layers, ByStep};
use super::plots::{module_order, rank_panels, rank_points, slug, spread, stat_label};
use super::row::ExponentRow;
use super::runs::run_lr;
use super::train::{TrainData, TrainKey};
use super::{Plot, PlotKind, RankSeries, StepPanel, StepSeries};
use crate::load::Run;
use rankstab_records::{Layer, Metric, MetricRow, Optimizer, Scaling, Site, Stat, Window};
use std::collections::{BTreeMap, BTreeSet};

/// What the training figures are drawn from.
pub(super) struct Inputs<'a> {
    /// The training runs (metrics, learning rates).
    pub runs: &'a [&'a Run],
    /// Their moments, merged.
    pub data: &'a TrainData,
    /// Step windows per model.
    pub windows: &'a BTreeMap<String, Vec<Window>>,
    /// The training rows.
    pub rows: &'a [ExponentRow],
    /// The moment order shown.
    pub order: u32,
    /// Most panels per rank figure.
    pub max_panels: usize,
}

impl Inputs<'_> {
    fn models(&self) -> impl Iterator<Item = &String> {
        self.windows.keys()
    }
}

/// Every training figure, with notes on the figures that could not be drawn.
pub(super) fn figures(inp: &Inputs) -> (Vec<Plot>, Vec<String>) {
    let (mut plots, notes) = metric_figures(inp);
    plots.extend(rank_figures(inp));
    plots.extend(heatmaps(inp));
    (plots, notes)
}

/// One curve against step: a rank (and learning rate).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Curve {
    rank: u32,
    lr: String,
}

/// Values per scaling (a panel), curve and step.
type Curves = BTreeMap<Scaling, BTreeMap<Curve, BTreeMap<u32, Vec<f64>>>>;

/// One panel per scaling (lora, rslora, constant), one series per curve, mean over seeds;
/// the legend names the learning rate when `lr_in_label`.
fn step_panels(curves: Curves, lr_in_label: bool) -> Vec<StepPanel> {
    curves
        .into_iter()
        .map(|(scaling, series)| StepPanel {
            title: scaling.to_string(),
            series: series
                .into_iter()
                .map(|(c, by_step)| StepSeries {
                    label: if lr_in_label {
                        format!("r={} lr {}", c.rank, c.lr)
                    } else {
                        format!("r={}", c.rank)
                    },
                    rank: c.rank,
                    points: by_step
                        .into_iter()
                        .map(|(s, v)| (f64::from(s), v.iter().sum::<f64>() / v.len() as f64))
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

/// Curves of `metric` (through `f`) against step for one model and optimizer, one series
/// per (rank, learning rate).
fn step_curves(
    metrics: &[(String, &MetricRow)],
    model: &str,
    opt: Optimizer,
    metric: Metric,
    f: impl Fn(f64) -> f64,
) -> Vec<StepPanel> {
    let mut curves = Curves::new();
    for (lr, r) in metrics {
        if r.model != model || r.optimizer != opt || r.metric != metric {
            continue;
        }
        let v = f(r.value);
        if !v.is_finite() {
            continue;
        }
        let curve = Curve {
            rank: r.rank,
            lr: lr.clone(),
        };
        curves
            .entry(r.scaling)
            .or_default()
            .entry(curve)
            .or_default()
            .entry(r.step)
            .or_default()
            .push(v);
    }
    let lrs: BTreeSet<&str> = curves
        .values()
        .flat_map(|s| s.keys().map(|c| c.lr.as_str()))
        .collect();
    let multi_lr = lrs.len() > 1;
    step_panels(curves, multi_lr)
}

/// Fallback gradient-norm curves from the param rows: mean over adapters and both factors.
fn grad_norm_from_moments(data: &TrainData, model: &str, opt: Optimizer) -> Vec<StepPanel> {
    let mut curves = Curves::new();
    for (k, by_layer) in &data.groups {
        if k.model != model
            || k.optimizer != opt
            || k.site != Site::Param
            || !matches!(k.stat, Stat::GradNormA | Stat::GradNormB)
        {
            continue;
        }
        for by_step in by_layer.values() {
            for (&step, by_rank) in by_step {
                for (&rank, seeds) in by_rank {
                    let curve = Curve {
                        rank,
                        lr: k.lr.clone(),
                    };
                    curves
                        .entry(k.scaling)
                        .or_default()
                        .entry(curve)
                        .or_default()
                        .entry(step)
                        .or_default()
                        .extend(seeds.values());
                }
            }
        }
    }
    step_panels(curves, false)
}

/// The paper's gradient-norm and perplexity figures per model and optimizer, and notes on
/// those that have nothing to draw.
fn metric_figures(inp: &Inputs) -> (Vec<Plot>, Vec<String>) {
    let metrics: Vec<(String, &MetricRow)> = inp
        .runs
        .iter()
        .flat_map(|run| {
            let lr = run_lr(run).unwrap_or_default();
            run.metrics.iter().map(move |m| (lr.clone(), m))
        })
        .collect();
    let (mut plots, mut notes) = (Vec::new(), Vec::new());
    for model in inp.models() {
        let optimizers: BTreeSet<Optimizer> = inp
            .data
            .groups
            .keys()
            .filter(|k| &k.model == model)
            .map(|k| k.optimizer)
            .collect();
        for opt in optimizers {
            let curves = |metric, f: fn(f64) -> f64| step_curves(&metrics, model, opt, metric, f);
            let gn = curves(Metric::GradNormAvg, |v| v);
            let (gn, gn_from) = if gn.is_empty() {
                (
                    grad_norm_from_moments(inp.data, model, opt),
                    "from moments.csv: mean over adapters of the A and B gradient norms",
                )
            } else {
                (gn, "metric grad_norm_avg")
            };
            if !gn.is_empty() {
                plots.push(Plot {
                    name: slug(&format!("train-{model}-{opt}-grad-norm")),
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
            // Held-out perplexity, else exp(held-out loss), else training perplexity.
            let (ppl, what) = [
                (
                    Metric::HeldoutPerplexity,
                    (|v| v) as fn(f64) -> f64,
                    "held-out perplexity",
                ),
                (Metric::HeldoutLoss, f64::exp, "exp(held-out loss)"),
                (
                    Metric::Perplexity,
                    |v| v,
                    "training perplexity (no held-out metric recorded)",
                ),
            ]
            .into_iter()
            .map(|(metric, f, what)| (curves(metric, f), what))
            .find(|(p, _)| !p.is_empty())
            .unwrap_or_default();
            if !ppl.is_empty() {
                plots.push(Plot {
                    name: slug(&format!("train-{model}-{opt}-perplexity")),
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
    (plots, notes)
}

/// A moment-vs-rank figure of the training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RankFigure<'a> {
    model: &'a str,
    optimizer: Optimizer,
    scaling: Scaling,
    site: Site,
    stat: Stat,
}

/// Moment vs rank (coordinate check with fits): per (model, optimizer, scaling, site), one
/// curve per module (pooled over layers), one panel per step.
fn rank_figures(inp: &Inputs) -> Vec<Plot> {
    let order = inp.order;
    let figures: BTreeSet<RankFigure> = inp
        .data
        .groups
        .keys()
        .filter(|k| {
            (k.stat == Stat::Abs && k.m == order && k.site != Site::GradOut)
                || (k.site == Site::Param && k.stat == Stat::GradNormB)
        })
        .map(|k| RankFigure {
            model: &k.model,
            optimizer: k.optimizer,
            scaling: k.scaling,
            site: k.site,
            stat: k.stat,
        })
        .collect();
    figures
        .into_iter()
        .filter_map(|fig| rank_figure(inp, fig))
        .collect()
}

fn rank_figure(inp: &Inputs, fig: RankFigure) -> Option<Plot> {
    let RankFigure {
        model,
        optimizer: opt,
        scaling,
        site,
        stat,
    } = fig;
    let m = if stat == Stat::Abs { inp.order } else { 1 };
    let multi_lr = inp.data.multi_lr();
    let groups: Vec<(&TrainKey, ByStep)> = inp
        .data
        .groups
        .iter()
        .filter(|(k, _)| {
            k.model == model
                && k.optimizer == opt
                && k.scaling == scaling
                && k.site == site
                && k.stat == stat
                && k.m == m
        })
        .map(|(k, by_layer)| (k, pool_layers(by_layer)))
        .collect();
    let steps: BTreeSet<u32> = groups
        .iter()
        .flat_map(|(_, bs)| bs.iter().filter(|(_, br)| br.len() >= 2).map(|(s, _)| *s))
        .filter(|&s| s > 0 || site == Site::Param)
        .collect();
    let steps = spread(&steps.into_iter().collect::<Vec<_>>(), inp.max_panels);
    let panels = rank_panels(&steps, &stat_label(site, stat, m), |step| {
        let mut series = Vec::new();
        for (k, by_step) in &groups {
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
            let predicted = row_prediction(inp.rows, k, step);
            let name = if multi_lr {
                format!("{} lr {}", k.module, k.lr)
            } else {
                k.module.clone()
            };
            series.push(RankSeries::new(&name, points, fitted, predicted));
        }
        series
    })?;
    Some(Plot {
        name: slug(&format!("train-{model}-{opt}-{scaling}-{site}-{stat}")),
        title: format!("{} vs rank: {model}, {opt}, {scaling}", stat_label(site, stat, m)),
        caption: "Coordinate check with fits: one curve per module (mean over layers and seeds, 95% intervals over \
                  seeds), one panel per step; solid: fitted slope, dashed: predicted (the exact first-step law from \
                  the runs' law rows, at step 1 only; no line where a fit has no prediction)."
            .into(),
        kind: PlotKind::Rank(panels),
    })
}

/// The prediction of the row that fits `k` pooled over layers (or its one layer) at `step`.
fn row_prediction(rows: &[ExponentRow], k: &TrainKey, step: u32) -> Option<f64> {
    let at_step: Vec<&ExponentRow> = rows
        .iter()
        .filter(|r| {
            r.window == Window::step(step)
                && r.model == k.model
                && r.optimizer == k.optimizer
                && r.scaling == k.scaling
                && r.lr == k.lr
                && r.inputs == k.inputs
                && r.module == k.module
                && r.site == k.site
                && r.stat == k.stat
                && r.m == k.m
        })
        .collect();
    match at_step.iter().find(|r| r.layer == Layer::All) {
        Some(pooled) => pooled.predicted,
        None if at_step.len() == 1 => at_step[0].predicted,
        None => None,
    }
}

/// A heatmap of exponents: one optimizer, scaling, site and learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct HeatKey<'a> {
    optimizer: Optimizer,
    scaling: Scaling,
    site: Site,
    lr: &'a str,
}

/// Heatmaps of exponents, layer x module, in each model's last window: forward and backward
/// moments and the B-gradient norm.
fn heatmaps(inp: &Inputs) -> Vec<Plot> {
    let mut plots = Vec::new();
    for (model, windows) in inp.windows {
        let Some(&last) = windows.last() else {
            continue;
        };
        let mut maps: BTreeMap<HeatKey, Vec<&ExponentRow>> = BTreeMap::new();
        for r in inp
            .rows
            .iter()
            .filter(|r| &r.model == model && r.window == last && r.layer != Layer::All)
        {
            if (r.stat == Stat::Abs && r.m == inp.order && matches!(r.site, Site::Fwd | Site::Bwd))
                || (r.site == Site::Param && r.stat == Stat::GradNormB)
            {
                let key = HeatKey {
                    optimizer: r.optimizer,
                    scaling: r.scaling,
                    site: r.site,
                    lr: &r.lr,
                };
                maps.entry(key).or_default().push(r);
            }
        }
        for (key, cells) in maps {
            plots.extend(heatmap(inp, model, last, key, &cells));
        }
    }
    plots
}

fn heatmap(
    inp: &Inputs,
    model: &str,
    last: Window,
    key: HeatKey,
    cells: &[&ExponentRow],
) -> Option<Plot> {
    let HeatKey {
        optimizer: opt,
        scaling,
        site,
        lr,
    } = key;
    let stat = cells.first()?.stat;
    let layers: BTreeSet<u32> = cells
        .iter()
        .filter_map(|r| match r.layer {
            Layer::Index(i) => Some(i),
            Layer::All => None,
        })
        .collect();
    let modules: Vec<String> = module_order(cells.iter().map(|r| r.module.clone()).collect());
    let values: Vec<Vec<Option<f64>>> = layers
        .iter()
        .map(|&l| {
            modules
                .iter()
                .map(|mo| {
                    cells
                        .iter()
                        .find(|r| r.layer == Layer::Index(l) && &r.module == mo)
                        .map(|r| r.slope)
                })
                .collect()
        })
        .collect();
    let predicted = cells.iter().find_map(|r| r.predicted);
    let m = if stat == Stat::Abs { inp.order } else { 1 };
    let lr_part = if inp.data.multi_lr() {
        format!("-lr{lr}")
    } else {
        String::new()
    };
    Some(Plot {
        name: slug(&format!("train-{model}-{opt}-{scaling}-{site}-{stat}-heatmap{lr_part}")),
        title: format!(
            "Rank exponent of {}: {model}, {opt}, {scaling}, {last}",
            stat_label(site, stat, m)
        ),
        caption: format!(
            "Fitted rank exponent per layer (rows) and module (columns) over {last}; 0 (white) is rank-stable, blue \
             collapsing, red exploding.{}",
            predicted.map_or(String::new(), |p| format!(" Predicted: {p:+.2}."))
        ),
        kind: PlotKind::Heat {
            rows: layers.iter().map(|l| format!("layer {l}")).collect(),
            cols: modules,
            values,
            predicted,
        },
    })
}
