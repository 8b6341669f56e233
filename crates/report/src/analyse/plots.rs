//! What a figure holds ([`Plot`]: rank panels, curves against step, heatmaps), as data for
//! `crate::figures` to draw, and the helpers every figure of the theory and training
//! sections shares: points with intervals, legend labels, the moment order shown, panel
//! choice, file names and module order.
use rankstab_records::{MomentRow, Site, Stat};
use rankstab_theory::stats::mean_ci;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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

/// The kinds of figure.
#[derive(Debug, Clone, Serialize)]
pub enum PlotKind {
    /// The headline: one fitted exponent per row with its 90% interval, against the
    /// predicted band (shaded), coloured by outcome.
    Forest(Vec<super::HeadlinePoint>),
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
    /// Final loss against learning rate (log-log), one panel per setting, a curve per rank
    /// (transfer studies).
    LrCurves(Vec<LrPanel>),
    /// A quantity against rank or width (log-log), one panel per setting: points with
    /// intervals, a dashed reference line, marks at the edge for values without a point.
    Xy(Vec<XyPanel>),
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

/// The headline figure: every primary fit's exponent against its predicted band.
pub(super) fn headline_plot(h: &super::Headline) -> Plot {
    Plot {
        name: "headline".into(),
        title: "Fitted rank exponent vs the predicted band".into(),
        caption: "One row per scaling, optimizer and setting (theory: input regime; training and audit: model and \
                  module): the fitted exponent of E|adapter output|^m against log rank (point) with its 90% interval \
                  (bar), and the predicted exponent with its band (shaded; none when the fit has no law). Colour: \
                  green agrees, red disagrees, grey inconclusive. An exponent of 0 (dotted line) is rank-flat."
            .into(),
        kind: PlotKind::Forest(h.points.clone()),
    }
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

impl RankSeries {
    /// A curve named `name` through `points`, its legend giving the fitted and predicted
    /// slopes.
    pub(super) fn new(
        name: &str,
        points: Vec<(f64, f64, f64, f64)>,
        fitted: Option<f64>,
        predicted: Option<f64>,
    ) -> Self {
        let f = fitted.map_or("-".into(), |s| format!("{s:+.2}"));
        let label = match predicted {
            Some(p) => format!("{name}: fit {f}, pred {p:+.2}"),
            None => format!("{name}: fit {f}"),
        };
        RankSeries {
            label,
            points,
            fitted,
            predicted,
        }
    }
}

/// One panel per step with the series `series_at(step)` gives, empty panels left out;
/// `None` when every panel is empty (nothing to draw).
pub(super) fn rank_panels(
    steps: &[u32],
    y_label: &str,
    mut series_at: impl FnMut(u32) -> Vec<RankSeries>,
) -> Option<Vec<RankPanel>> {
    let panels: Vec<RankPanel> = steps
        .iter()
        .filter_map(|&step| {
            let series = series_at(step);
            (!series.is_empty()).then(|| RankPanel {
                title: format!("step {step}"),
                y_label: y_label.to_string(),
                series,
            })
        })
        .collect();
    (!panels.is_empty()).then_some(panels)
}

/// One panel of the loss-vs-learning-rate figure: a setting.
#[derive(Debug, Clone, Serialize)]
pub struct LrPanel {
    /// Panel title (the setting).
    pub title: String,
    /// One curve per rank.
    pub curves: Vec<LrCurve>,
}

/// The final loss of one rank against the learning rate.
#[derive(Debug, Clone, Serialize)]
pub struct LrCurve {
    /// Legend label ("r = 4").
    pub label: String,
    /// Rank (colour order).
    pub rank: u32,
    /// (learning rate, geometric mean loss over seeds or None where some seed diverged,
    /// seeds that diverged).
    pub points: Vec<(f64, Option<f64>, u32)>,
    /// lr* and the loss there, when inside the grid.
    pub opt: Option<(f64, f64)>,
}

/// How the y axis of an [`XyPanel`] is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum XyAxis {
    /// Powers of ten (learning rates).
    Decades,
    /// 1, 2, 5 times powers of ten (losses).
    Nice,
    /// Powers of two (ranks).
    PowersOfTwo,
}

/// A value with no point, marked at the edge of the grid (lr* at the grid's edge).
#[derive(Debug, Clone, Serialize)]
pub struct EdgeMark {
    /// Rank or width.
    pub x: f64,
    /// Where to draw it (the grid's edge).
    pub y: f64,
    /// Above the grid (pointing up) or below it (pointing down).
    pub up: bool,
    /// Why ("below the grid").
    pub what: String,
}

/// One panel of a quantity against rank or width.
#[derive(Debug, Clone, Serialize)]
pub struct XyPanel {
    /// Panel title (the setting).
    pub title: String,
    /// x-axis label.
    pub x_label: String,
    /// y-axis label.
    pub y_label: String,
    /// y-axis ticks.
    pub y_axis: XyAxis,
    /// Legend label of the points.
    pub point_label: String,
    /// (x, y, interval low, interval high); low = high = y without an interval.
    pub points: Vec<(f64, f64, f64, f64)>,
    /// A dashed reference line: legend label and its points.
    pub line: Option<(String, Vec<(f64, f64)>)>,
    /// Values without a point.
    pub edges: Vec<EdgeMark>,
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

/// Mean with its 95% interval per rank, for ranks with a positive finite mean (the interval
/// collapses to the mean when it is not finite, e.g. one seed).
pub(super) fn rank_points(by_rank: &BTreeMap<u32, Vec<f64>>) -> Vec<(f64, f64, f64, f64)> {
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

/// The y-axis label of a statistic: "E|fwd|^2", "E fwd^2", or its name.
pub(super) fn stat_label(site: Site, stat: Stat, m: u32) -> String {
    match stat {
        Stat::Abs => format!("E|{site}|^{m}"),
        Stat::Raw => format!("E {site}^{m}"),
        s => s.to_string(),
    }
}

/// The moment order a figure shows: 2 when recorded, else the lowest recorded.
pub(super) fn figure_order<'a>(rows: impl Iterator<Item = &'a MomentRow>) -> u32 {
    let ms: BTreeSet<u32> = rows
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
pub(super) fn spread<T: Clone>(v: &[T], k: usize) -> Vec<T> {
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

/// Llama then GPT-J module order; unknown modules after, alphabetically.
pub(super) fn module_order(mut modules: Vec<String>) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn labels_name_the_statistic_and_the_slopes() {
        assert_eq!(
            stat_label(Site::FwdHeldout, Stat::Abs, 2),
            "E|fwd_heldout|^2"
        );
        assert_eq!(stat_label(Site::Param, Stat::GradNormB, 1), "grad_norm_b");
        let s = RankSeries::new("lora", vec![], Some(-1.0), Some(-0.98));
        assert_eq!(s.label, "lora: fit -1.00, pred -0.98");
        assert_eq!(
            RankSeries::new("q_proj", vec![], None, None).label,
            "q_proj: fit -"
        );
    }
}
