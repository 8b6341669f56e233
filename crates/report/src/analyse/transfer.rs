//! The section of one learning-rate transfer study (`rankstab transfer`): its analysis as
//! the study wrote it (`transfer.json`, [`TransferSummary`]: lr* per setting and rank with
//! bootstrap intervals, the exponents of lr* judged against the long-horizon law, the
//! one-step law and c = 0, the published claims, the moment exponents along the runs), laid
//! out as tables and as the figures' data. Nothing is fitted or judged here: the study's
//! own rule decided every outcome.
//!
//! Figures, one panel per setting (optimizer x scaling x adapter init x lr ratio):
//! the final held-out loss against the learning rate (a curve per rank, lr* marked, the
//! learning rates where some seed diverged marked at the top), lr* against rank with its
//! interval and the law's line, the loss at lr* against rank, the effective rank of the
//! learned update against rank, and, when the study has a width axis, lr* against width.
use super::plots::{slug, EdgeMark, LrCurve, LrPanel, Plot, PlotKind, XyAxis, XyPanel};
use super::row::fmt_ranks;
use crate::load::Run;
use rankstab_records::{Optimizer, Outcome, Scaling};
use rankstab_theory::transfer::analyse::{Exponent, Finding, HorizonRow, OptCell, TransferSummary};
use rankstab_theory::transfer::{Study, TransferConfig};
use rankstab_theory::AdapterInit;
use serde::Serialize;
use std::collections::BTreeMap;

/// What the report shows of one transfer study.
#[derive(Debug, Clone, Serialize)]
pub struct TransferSection {
    /// Run id.
    pub run: String,
    /// One-line setting.
    pub summary: String,
    /// The outcomes counted, in words.
    pub headline: String,
    /// Seeds.
    pub seeds: usize,
    /// Bootstrap resamples.
    pub bootstrap: usize,
    /// Steps per run.
    pub steps: usize,
    /// Level of the intervals (0.90).
    pub level: f64,
    /// The exponents of lr*, judged (rank axis first).
    pub exponents: Vec<TransferExponentRow>,
    /// The published claims with what the study measured of them.
    pub findings: Vec<Finding>,
    /// The forward moment's rank exponent along the runs.
    pub horizon: Vec<HorizonView>,
    /// lr* per setting, width and rank.
    pub cells: Vec<CellView>,
    /// Things a reader should know (lr* at the grid's edge, diverged runs).
    pub notes: Vec<String>,
    /// Names of this section's figures.
    pub figures: Vec<String>,
}

/// One exponent of lr*, with its setting in words.
#[derive(Debug, Clone, Serialize)]
pub struct TransferExponentRow {
    /// The exponent as the study judged it.
    #[serde(flatten)]
    pub exponent: Exponent,
    /// The setting in words ("sgd | rsLoRA | init a").
    pub setting: String,
    /// The scaling in words ("LoRA (beta 1)", "rsLoRA (beta 0.5)").
    pub scaling: String,
    /// What is held fixed ("width 128", "rank 8").
    pub at: String,
    /// The ranks (or widths) fitted, comma-separated.
    pub values_text: String,
    /// The long-horizon law's exponent, "-" where no law predicts one (a trained model).
    pub law_text: String,
    /// The one-step law's exponent, "-" likewise.
    pub first_step_text: String,
}

/// One row of the horizon table.
#[derive(Debug, Clone, Serialize)]
pub struct HorizonView {
    /// The row as the study wrote it.
    #[serde(flatten)]
    pub row: HorizonRow,
    /// The setting in words.
    pub setting: String,
    /// Effective rank of the update per rank ("2: 1.9, 4: 3.6").
    pub effective_text: String,
}

/// One lr* cell.
#[derive(Debug, Clone, Serialize)]
pub struct CellView {
    /// `rank` or `width`.
    pub axis: String,
    /// The setting in words.
    pub setting: String,
    /// Width.
    pub width: u32,
    /// Rank.
    pub rank: u32,
    /// lr*, when inside the grid.
    pub lr_opt: Option<f64>,
    /// Its interval.
    pub lr_opt_ci_low: Option<f64>,
    /// Its interval.
    pub lr_opt_ci_high: Option<f64>,
    /// Why there is no lr* (empty when there is one).
    pub edge: String,
    /// The law's lr* (level fitted to the measured ones).
    pub predicted_lr: Option<f64>,
    /// Loss at lr*.
    pub loss_at_opt: Option<f64>,
    /// Its interval.
    pub loss_ci_low: Option<f64>,
    /// Its interval.
    pub loss_ci_high: Option<f64>,
    /// Effective rank of the final update at the grid lr nearest lr*.
    pub effective_rank: Option<f64>,
    /// Its stable rank (a trained model's: mean over adapters).
    pub stable_rank: Option<f64>,
    /// Diverged runs.
    pub diverged_runs: u32,
    /// Runs.
    pub runs: u32,
}

/// The scaling of exponent `beta` in words: "LoRA (beta 1)", "rsLoRA (beta 0.5)".
pub(super) fn scaling_name(beta: f64) -> String {
    if beta == Scaling::LORA.beta() {
        "LoRA (beta 1)".into()
    } else if beta == Scaling::RSLORA.beta() {
        "rsLoRA (beta 0.5)".into()
    } else if beta == Scaling::CONSTANT.beta() {
        "constant (beta 0)".into()
    } else {
        format!("beta {beta}")
    }
}

/// A setting's key: optimizer, beta, adapter init and lr ratio (floats by their bits).
type SettingKey = (Optimizer, u64, AdapterInit, u64);

fn key_of(opt: Optimizer, beta: f64, init: AdapterInit, ratio: f64) -> SettingKey {
    (opt, beta.to_bits(), init, ratio.to_bits())
}

/// A setting in words, short enough for a panel title: "sgd | rsLoRA | init a", with
/// " | lr_B/lr_A 16" when the ratio is not 1.
pub(super) fn setting_name(opt: Optimizer, beta: f64, init: AdapterInit, ratio: f64) -> String {
    let ratio = if ratio == 1.0 {
        String::new()
    } else {
        format!(" | lr_B/lr_A {ratio}")
    };
    let scaling = scaling_name(beta);
    let scaling = scaling.split(" (").next().unwrap_or(&scaling);
    format!("{opt} | {scaling} | init {init}{ratio}")
}

/// A law's exponent, signed with two decimals, or "-" where no law predicts one.
fn law_text(v: f64) -> String {
    if v.is_finite() {
        format!("{v:+.2}")
    } else {
        "-".into()
    }
}

/// The configuration of a transfer study, when its manifest holds a readable one.
fn config(run: &Run) -> Option<TransferConfig> {
    serde_json::from_value(run.manifest.config.clone()).ok()
}

/// One line on what the study is.
pub(super) fn summary(run: &Run) -> String {
    let Some(t) = run.transfer.as_deref() else {
        return "transfer: no transfer.json".into();
    };
    let mut settings: Vec<SettingKey> = t
        .cells
        .iter()
        .map(|c| key_of(c.optimizer, c.beta, c.init, c.lr_ratio))
        .collect();
    settings.sort();
    settings.dedup();
    let ranks = |axis: Study| {
        let mut v: Vec<u32> = t
            .cells
            .iter()
            .filter(|c| c.axis == axis)
            .map(|c| if axis == Study::Rank { c.rank } else { c.width })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let width = t
        .cells
        .iter()
        .find(|c| c.axis == Study::Rank)
        .map_or("?".into(), |c| c.width.to_string());
    let widths = ranks(Study::Width);
    let width_part = if widths.is_empty() {
        String::new()
    } else {
        format!(", widths {}", fmt_ranks(&widths))
    };
    let grids = config(run)
        .map(|c| {
            let mut opts: Vec<Optimizer> = c.optimizers.clone();
            opts.dedup();
            let g: Vec<String> = opts
                .iter()
                .map(|&o| format!("{o} lrs {}", c.grid(o)))
                .collect();
            format!(", {}", g.join(", "))
        })
        .unwrap_or_default();
    let what = t.model.as_ref().map_or_else(
        || "transfer (synthetic)".to_string(),
        |m| format!("transfer (model {m}, trained in a sweep; no law, judged against c = 0)"),
    );
    format!(
        "{what}: width {width}, ranks {}{width_part}, {} settings, {} seeds, {} steps{grids}",
        fmt_ranks(&ranks(Study::Rank)),
        settings.len(),
        t.seeds,
        t.steps
    )
}

/// The section of transfer study `run`; its figures are appended to `plots`.
pub(super) fn section(run: &Run, plots: &mut Vec<Plot>) -> Option<TransferSection> {
    let t = run.transfer.as_deref()?;
    let exponents: Vec<TransferExponentRow> = t
        .exponents
        .iter()
        .map(|e| TransferExponentRow {
            setting: setting_name(e.optimizer, e.beta, e.init, e.lr_ratio),
            scaling: scaling_name(e.beta),
            at: match (e.axis, e.width, e.rank) {
                (Study::Rank, Some(w), _) => format!("width {w}"),
                (Study::Width, _, Some(r)) => format!("rank {r}"),
                _ => "-".into(),
            },
            values_text: fmt_ranks(&e.values),
            law_text: law_text(e.predicted),
            first_step_text: law_text(e.first_step),
            exponent: e.clone(),
        })
        .collect();
    let horizon = t
        .horizon
        .iter()
        .map(|h| HorizonView {
            setting: setting_name(h.optimizer, h.beta, h.init, h.lr_ratio),
            effective_text: h
                .effective_rank
                .iter()
                .map(|(r, v)| match v {
                    Some(v) => format!("{r}: {v:.1}"),
                    None => format!("{r}: -"),
                })
                .collect::<Vec<_>>()
                .join(", "),
            row: h.clone(),
        })
        .collect();
    let cells = t
        .cells
        .iter()
        .map(|c| CellView {
            axis: c.axis.to_string(),
            setting: setting_name(c.optimizer, c.beta, c.init, c.lr_ratio),
            width: c.width,
            rank: c.rank,
            lr_opt: c.lr_opt,
            lr_opt_ci_low: c.lr_opt_ci_low,
            lr_opt_ci_high: c.lr_opt_ci_high,
            edge: c.edge.clone().unwrap_or_default(),
            predicted_lr: c.predicted_lr,
            loss_at_opt: c.loss_at_opt,
            loss_ci_low: c.loss_ci_low,
            loss_ci_high: c.loss_ci_high,
            effective_rank: c.effective_rank,
            stable_rank: c.stable_rank,
            diverged_runs: c.diverged_runs,
            runs: c.runs,
        })
        .collect();
    let mine = figures(&run.id, t);
    let figures = mine.iter().map(|p| p.name.clone()).collect();
    plots.extend(mine);
    Some(TransferSection {
        run: run.id.clone(),
        summary: summary(run),
        headline: headline(t),
        seeds: t.seeds,
        bootstrap: t.bootstrap,
        steps: t.steps,
        level: t.level,
        exponents,
        findings: t.findings.clone(),
        horizon,
        cells,
        notes: notes(t),
        figures,
    })
}

/// The outcomes of the study's exponents, counted: "rank exponents of lr*: 2 agree with
/// the long-horizon law, 1 disagrees, 1 inconclusive; c = 0 rejected for 3 of 4".
fn headline(t: &TransferSummary) -> String {
    let mut parts = Vec::new();
    for axis in [Study::Rank, Study::Width] {
        let e: Vec<&Exponent> = t.exponents.iter().filter(|e| e.axis == axis).collect();
        if e.is_empty() {
            continue;
        }
        let n = |f: &dyn Fn(&Exponent) -> bool| e.iter().filter(|x| f(x)).count();
        parts.push(format!(
            "{} {axis} exponents of lr*: {} agree with the long-horizon law, {} disagree, {} inconclusive; \
             c = 0 rejected for {}",
            e.len(),
            n(&|x| x.outcome == Outcome::Agrees),
            n(&|x| x.outcome == Outcome::Disagrees),
            n(&|x| x.outcome == Outcome::Inconclusive),
            n(&|x| x.flat == Outcome::Disagrees),
        ));
    }
    if parts.is_empty() {
        "no exponent of lr*".into()
    } else {
        parts.join("; ")
    }
}

/// lr* at the grid's edge and diverged runs, in a few lines.
fn notes(t: &TransferSummary) -> Vec<String> {
    let mut out = Vec::new();
    for c in &t.cells {
        if let Some(edge) = &c.edge {
            let at = match c.axis {
                Study::Rank => format!("rank {}", c.rank),
                Study::Width => format!("width {}", c.width),
            };
            out.push(format!(
                "{} at {at}: lr* {edge} (no lr* there; the exponent of this setting is inconclusive)",
                setting_name(c.optimizer, c.beta, c.init, c.lr_ratio)
            ));
        }
    }
    let diverged: u64 = t.cells.iter().map(|c| u64::from(c.diverged_runs)).sum();
    let runs: u64 = t.cells.iter().map(|c| u64::from(c.runs)).sum();
    if diverged > 0 {
        out.push(format!(
            "{diverged} of {runs} training runs diverged (stopped once their loss exceeded the divergence \
             multiple of its initial value); a learning rate where any seed diverged has no mean loss"
        ));
    }
    out
}

/// The cells of one axis, grouped by setting, in the study's order.
fn by_setting(t: &TransferSummary, axis: Study) -> Vec<(String, Vec<&OptCell>)> {
    let mut groups: BTreeMap<SettingKey, Vec<&OptCell>> = BTreeMap::new();
    for c in t.cells.iter().filter(|c| c.axis == axis) {
        groups
            .entry(key_of(c.optimizer, c.beta, c.init, c.lr_ratio))
            .or_default()
            .push(c);
    }
    groups
        .into_values()
        .map(|mut cells| {
            cells.sort_by_key(|c| match axis {
                Study::Rank => c.rank,
                Study::Width => c.width,
            });
            let c = cells[0];
            (setting_name(c.optimizer, c.beta, c.init, c.lr_ratio), cells)
        })
        .collect()
}

fn exponent_of<'a>(t: &'a TransferSummary, axis: Study, c: &OptCell) -> Option<&'a Exponent> {
    t.exponents.iter().find(|e| {
        e.axis == axis
            && e.optimizer == c.optimizer
            && e.beta == c.beta
            && e.init == c.init
            && e.lr_ratio == c.lr_ratio
    })
}

/// "c = +0.52 [+0.44, +0.61]", or why there is none.
fn c_text(e: Option<&Exponent>) -> String {
    match e.map(|e| (e.slope, e.ci_low, e.ci_high)) {
        Some((Some(s), Some(l), Some(h))) => format!("c = {s:+.2} [{l:+.2}, {h:+.2}]"),
        Some((Some(s), _, _)) => format!("c = {s:+.2} (no interval)"),
        _ => "no c".into(),
    }
}

/// The grid's edges of a setting (its curves' first and last learning rates).
fn grid_edges(cells: &[&OptCell]) -> (f64, f64) {
    let lrs = cells.iter().flat_map(|c| c.curve.iter().map(|p| p.lr));
    lrs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    })
}

/// Edge marks for the cells without lr*.
fn edge_marks(cells: &[&OptCell], x_of: impl Fn(&OptCell) -> f64) -> Vec<EdgeMark> {
    let (lo, hi) = grid_edges(cells);
    cells
        .iter()
        .filter_map(|c| {
            let edge = c.edge.as_deref()?;
            let above = edge.contains("above");
            Some(EdgeMark {
                x: x_of(c),
                y: if above { hi } else { lo },
                up: above,
                what: edge.to_string(),
            })
        })
        .collect()
}

/// The figures of one study.
fn figures(run: &str, t: &TransferSummary) -> Vec<Plot> {
    let mut out = Vec::new();
    let rank = by_setting(t, Study::Rank);
    if !rank.is_empty() {
        out.push(loss_curves(run, t, &rank));
        out.push(lr_opt_plot(run, t, &rank, Study::Rank));
        out.push(loss_at_opt_plot(run, t, &rank));
        out.push(effective_rank_plot(run, &rank));
    }
    let width = by_setting(t, Study::Width);
    if !width.is_empty() {
        out.push(lr_opt_plot(run, t, &width, Study::Width));
    }
    out
}

/// (a) Final held-out loss against the learning rate, a curve per rank.
fn loss_curves(run: &str, t: &TransferSummary, groups: &[(String, Vec<&OptCell>)]) -> Plot {
    let panels = groups
        .iter()
        .map(|(name, cells)| LrPanel {
            title: name.clone(),
            curves: cells
                .iter()
                .map(|c| LrCurve {
                    label: format!("r = {}", c.rank),
                    rank: c.rank,
                    points: c.curve.iter().map(|p| (p.lr, p.loss, p.diverged)).collect(),
                    opt: c.lr_opt.zip(c.loss_at_opt),
                })
                .collect(),
        })
        .collect();
    Plot {
        name: slug(&format!("transfer-{run}-loss-vs-lr")),
        title: "Final held-out loss vs learning rate, one curve per rank".into(),
        caption: format!(
            "One panel per setting (optimizer | scaling | adapter init). Each curve is a rank: the final held-out loss \
             after {} steps, geometric mean over {} seeds, at each learning rate of the grid (log-log). Triangles mark \
             lr* of each rank (the parabola through the grid minimum and its neighbours in ln lr); a rank whose minimum \
             lies at the grid's edge has none. Crosses at the top of a panel mark learning rates where at least one seed \
             diverged: there the curve has no value and is broken.",
            t.steps, t.seeds
        ),
        kind: PlotKind::LrCurves(panels),
    }
}

/// (b) lr* against rank (or width) with its interval and the law's line.
fn lr_opt_plot(
    run: &str,
    t: &TransferSummary,
    groups: &[(String, Vec<&OptCell>)],
    axis: Study,
) -> Plot {
    let x_of = |c: &OptCell| {
        f64::from(match axis {
            Study::Rank => c.rank,
            Study::Width => c.width,
        })
    };
    let symbol = match axis {
        Study::Rank => "r",
        Study::Width => "d",
    };
    let panels = groups
        .iter()
        .map(|(name, cells)| {
            let e = cells.first().and_then(|c| exponent_of(t, axis, c));
            let at = match axis {
                Study::Rank => String::new(),
                Study::Width => cells
                    .first()
                    .map_or(String::new(), |c| format!(" | rank {}", c.rank)),
            };
            let law = e
                .filter(|e| e.predicted.is_finite())
                .map_or(String::new(), |e| format!(" (c = {:+.2})", e.predicted));
            XyPanel {
                title: format!("{name}{at}"),
                x_label: match axis {
                    Study::Rank => "rank r".into(),
                    Study::Width => "width d".into(),
                },
                y_label: "lr*".into(),
                y_axis: XyAxis::Decades,
                point_label: format!("lr* ({})", c_text(e)),
                points: cells
                    .iter()
                    .filter_map(|c| {
                        let lr = c.lr_opt?;
                        let (lo, hi) = match (c.lr_opt_ci_low, c.lr_opt_ci_high) {
                            (Some(l), Some(h)) => (l, h),
                            _ => (lr, lr),
                        };
                        Some((x_of(c), lr, lo, hi))
                    })
                    .collect(),
                line: {
                    let line: Vec<(f64, f64)> = cells
                        .iter()
                        .filter_map(|c| Some((x_of(c), c.predicted_lr?)))
                        .collect();
                    (line.len() > 1).then(|| (format!("long-horizon law{law}"), line))
                },
                edges: edge_marks(cells, x_of),
            }
        })
        .collect();
    let (what, name) = match axis {
        Study::Rank => ("rank", "lr-opt-vs-rank"),
        Study::Width => ("width", "lr-opt-vs-width"),
    };
    Plot {
        name: slug(&format!("transfer-{run}-{name}")),
        title: format!("Optimal learning rate lr* vs {what}"),
        caption: format!(
            "One panel per setting. Points: lr* with its {:.0}% bootstrap percentile interval over seeds (bars; none \
             when more than 10% of resamples put lr* at the grid's edge). Dashed line: the long-horizon law's lr*({symbol}), \
             its level fitted to the measured lr* (the law predicts how lr* changes, not its level). Red triangles at \
             the top or bottom of a panel: a {what} whose loss minimum lies at the grid's largest (pointing up) or \
             smallest (pointing down) learning rate, so it has no lr*; the legend gives the fitted exponent c of \
             lr* ~ {symbol}^c with its 90% interval.",
            t.level * 100.0
        ),
        kind: PlotKind::Xy(panels),
    }
}

/// (c) Loss at lr* against rank.
fn loss_at_opt_plot(run: &str, t: &TransferSummary, groups: &[(String, Vec<&OptCell>)]) -> Plot {
    let panels = groups
        .iter()
        .map(|(name, cells)| {
            let e = cells.first().and_then(|c| exponent_of(t, Study::Rank, c));
            let slope = match e.map(|e| (e.loss_slope, e.loss_slope_ci_low, e.loss_slope_ci_high)) {
                Some((Some(s), Some(l), Some(h))) => {
                    format!("slope {s:+.3} [{l:+.3}, {h:+.3}]")
                }
                Some((Some(s), _, _)) => format!("slope {s:+.3}"),
                _ => "no slope".into(),
            };
            XyPanel {
                title: name.clone(),
                x_label: "rank r".into(),
                y_label: "held-out loss at lr*".into(),
                y_axis: XyAxis::Nice,
                point_label: format!("loss at lr* ({slope})"),
                points: cells
                    .iter()
                    .filter_map(|c| {
                        let y = c.loss_at_opt?;
                        let (lo, hi) = match (c.loss_ci_low, c.loss_ci_high) {
                            (Some(l), Some(h)) => (l, h),
                            _ => (y, y),
                        };
                        Some((f64::from(c.rank), y, lo, hi))
                    })
                    .collect(),
                line: None,
                edges: Vec::new(),
            }
        })
        .collect();
    Plot {
        name: slug(&format!("transfer-{run}-loss-at-opt-vs-rank")),
        title: "Held-out loss at lr* vs rank".into(),
        caption: format!(
            "One panel per setting: the final held-out loss at each rank's lr* (the parabola's value, geometric mean \
             over seeds) with its {:.0}% bootstrap percentile interval; ranks without lr* are left out. A falling \
             trend means a larger rank ends better once the learning rate is tuned for it; the legend gives the slope \
             of ln(loss at lr*) on ln r with its 90% interval.",
            t.level * 100.0
        ),
        kind: PlotKind::Xy(panels),
    }
}

/// (d) Effective rank of the learned update against rank.
fn effective_rank_plot(run: &str, groups: &[(String, Vec<&OptCell>)]) -> Plot {
    // A synthetic study has the effective rank; a trained model's cells record the stable
    // rank only (mean over adapters).
    let effective = groups
        .iter()
        .flat_map(|g| &g.1)
        .any(|c| c.effective_rank.is_some());
    let (what, of) = if effective {
        (
            "effective rank",
            (|c: &OptCell| c.effective_rank) as fn(&OptCell) -> Option<f64>,
        )
    } else {
        (
            "stable rank",
            (|c: &OptCell| c.stable_rank) as fn(&OptCell) -> Option<f64>,
        )
    };
    let panels = groups
        .iter()
        .map(|(name, cells)| {
            let ranks: Vec<f64> = cells.iter().map(|c| f64::from(c.rank)).collect();
            XyPanel {
                title: name.clone(),
                x_label: "rank r".into(),
                y_label: format!("{what} of gamma B A"),
                y_axis: XyAxis::PowersOfTwo,
                point_label: format!("{what} at lr*"),
                points: cells
                    .iter()
                    .filter_map(|c| {
                        let y = of(c).filter(|y| *y > 0.0)?;
                        Some((f64::from(c.rank), y, y, y))
                    })
                    .collect(),
                line: Some((
                    "y = r (every direction used)".into(),
                    ranks.iter().map(|&r| (r, r)).collect(),
                )),
                edges: Vec::new(),
            }
        })
        .collect();
    Plot {
        name: slug(&format!("transfer-{run}-effective-rank")),
        title: if effective {
            "Effective rank of the learned update vs rank".into()
        } else {
            "Stable rank of the learned update vs rank".into()
        },
        caption: format!(
            "One panel per setting: the {what} ({}) of the final update gamma B A, mean over seeds{} at the grid \
             learning rate nearest lr*; ranks without lr* are left out. Dashed: y = r, an update that uses every \
             direction it has.",
            if effective {
                "exponential of the entropy of the normalised singular values"
            } else {
                "squared Frobenius over squared spectral norm"
            },
            if effective { "" } else { " and adapters" }
        ),
        kind: PlotKind::Xy(panels),
    }
}
