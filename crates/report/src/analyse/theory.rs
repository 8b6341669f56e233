//! The section of one theory run: its fits, judged by today's rule (fitted again from the
//! run's moments and coefficients with `rankstab_theory::fit_rows` whenever its
//! configuration parses, so an old run directory is re-judged; its `fits.json` only
//! otherwise), the rows shown in the page with the headline counts, the closed-form checks,
//! and the figures of moments against rank (one panel per step, one curve per scaling).
use super::plots::{figure_order, rank_panels, rank_points, slug, spread, stat_label};
use super::row::{finite, fmt_ranks, tally_rows, ExponentRow};
use super::runs::{summary, theory_config};
use super::{AnalysisOptions, Plot, PlotKind, RankSeries};
use crate::load::Run;
use rankstab_records::{Fit, Layer, Optimizer, Scaling, Site, Stat, Window};
use rankstab_theory::predict::verdict::Tally;
use rankstab_theory::predict::Judged;
use rankstab_theory::ClosedFormCheck;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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
    /// Where the fits come from (refitted from the moments, or `fits.json` as written).
    pub fits_from: String,
    /// Outcomes and rivals counted over the fits that can discriminate.
    pub counts: Tally,
    /// The counts in words.
    pub headline: String,
    /// Closed-form checks.
    pub checks: Vec<ClosedFormCheck>,
    /// Checks with 0 in the interval.
    pub checks_within: usize,
    /// Distinct checks among `checks` (`rankstab_theory::distinct_checks`): gamma cancels and
    /// held-out inputs are shared, so cells repeat checks; `checks_within` counts these.
    pub checks_distinct: usize,
    /// Names of this section's figures.
    pub figures: Vec<String>,
}

impl TheorySection {
    /// The last step fitted (each theory fit is of one step).
    pub(super) fn last_step(&self) -> Option<u32> {
        last_step(&self.rows)
    }
}

fn last_step(rows: &[ExponentRow]) -> Option<u32> {
    rows.iter().filter_map(|r| r.window.single()).max()
}

/// The section of theory run `run`; its figures are appended to `plots`.
pub(super) fn section(run: &Run, opts: &AnalysisOptions, plots: &mut Vec<Plot>) -> TheorySection {
    let (fits, fits_from) = fits(run);
    let rows: Vec<ExponentRow> = fits.iter().map(|f| row(run, f)).collect();
    let order = figure_order(run.moments.iter());
    let shown = shown(&rows, order);
    let counts = tally_rows(&rows);
    let checks: Vec<ClosedFormCheck> = run.checks.iter().flatten().cloned().collect();
    let (checks_distinct, checks_within) = rankstab_theory::distinct_checks(&checks);
    let mine = figures(run, &rows, order, opts.max_panels);
    let figures = mine.iter().map(|p| p.name.clone()).collect();
    plots.extend(mine);
    TheorySection {
        run: run.id.clone(),
        summary: summary(run),
        rows,
        shown,
        fits_from,
        headline: counts.headline(),
        counts,
        checks,
        checks_within,
        checks_distinct,
        figures,
    }
}

/// The run's fits and where they come from: fitted and judged again by today's rule when
/// the run's configuration parses, else its `fits.json` as written (judged by the rankstab
/// that wrote it).
fn fits(run: &Run) -> (Vec<Fit>, String) {
    match (theory_config(run), &run.fits) {
        (Some(cfg), _) => (
            rankstab_theory::fit_rows(&cfg, &run.moments, &run.coefficients),
            "fitted and judged here from moments.csv and coefficients.csv by this rankstab's rule".into(),
        ),
        (None, Some(f)) => (
            f.clone(),
            format!(
                "fits.json as written by {} {} (the configuration in manifest.json does not parse, so the fits \
                 could not be recomputed; their judgements are that version's)",
                run.manifest.tool, run.manifest.tool_version
            ),
        ),
        (None, None) => (
            Vec::new(),
            "no fits: no fits.json, and the configuration in manifest.json does not parse".into(),
        ),
    }
}

/// A fit of the checker as a row, with the judgement the fit carries.
fn row(run: &Run, f: &Fit) -> ExponentRow {
    let has_diff = f.diff.is_finite();
    ExponentRow {
        source: "theory".into(),
        run: run.id.clone(),
        model: f.model.clone(),
        module: f.module.clone(),
        layer: Layer::Index(f.layer),
        window: Window::step(f.step),
        optimizer: f.optimizer,
        scaling: f.scaling,
        beta: f.beta,
        inputs: f.inputs.clone(),
        site: f.site,
        stat: f.stat,
        m: f.m,
        ranks: fmt_ranks(&f.ranks),
        seeds: f.trials,
        slope: f.slope,
        se: f.se,
        ci_low: f.ci_low,
        ci_high: f.ci_high,
        law: f.law.clone(),
        predicted: finite(f.predicted),
        band: finite(f.band),
        diff: finite(f.diff),
        diff_ci_low: has_diff.then_some(f.diff_ci_low),
        diff_ci_high: has_diff.then_some(f.diff_ci_high),
        ..ExponentRow::default()
    }
    .judged(Judged {
        outcome: f.outcome,
        verdict: f.verdict,
        rivals: f.rivals.clone(),
        discriminating: f.discriminating,
    })
}

/// Order of the rows shown.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ShownOrder<'a> {
    optimizer: Optimizer,
    inputs: &'a str,
    scaling: Scaling,
    site: Site,
    stat: Stat,
}

impl<'a> ShownOrder<'a> {
    fn of(r: &'a ExponentRow) -> Self {
        ShownOrder {
            optimizer: r.optimizer,
            inputs: &r.inputs,
            scaling: r.scaling,
            site: r.site,
            stat: r.stat,
        }
    }
}

/// The rows shown in the page: layer 0 at the last step, moments of the figures' order and
/// parameter norms, by optimizer, inputs, scaling (lora, rslora, constant), site and stat.
fn shown(rows: &[ExponentRow], order: u32) -> Vec<ExponentRow> {
    let last = last_step(rows);
    let mut shown: Vec<ExponentRow> = rows
        .iter()
        .filter(|r| last.is_some_and(|s| r.window == Window::step(s)))
        .filter(|r| r.layer == Layer::Index(0))
        .filter(|r| (r.stat == Stat::Abs && r.m == order) || r.site == Site::Param)
        .cloned()
        .collect();
    shown.sort_by(|a, b| ShownOrder::of(a).cmp(&ShownOrder::of(b)));
    shown
}

/// A setting of the run: the figures of one optimizer and input regime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Setting<'a> {
    optimizer: Optimizer,
    inputs: &'a str,
}

/// One figure: a setting and a statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FigureKey<'a> {
    setting: Setting<'a>,
    site: Site,
    stat: Stat,
    m: u32,
}

/// One curve of a figure's panel: a figure, a scaling and a step.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct CurveKey<'a> {
    figure: FigureKey<'a>,
    scaling: Scaling,
    step: u32,
}

/// Per (optimizer, inputs), the forward, held-out and backward moments and the B-gradient
/// norm against rank, one panel per step, one curve per scaling (layer 0).
fn figures(run: &Run, rows: &[ExponentRow], order: u32, max_panels: usize) -> Vec<Plot> {
    let settings: BTreeSet<Setting> = run
        .moments
        .iter()
        .filter(|r| r.stat == Stat::Abs || r.site == Site::Param)
        .map(|r| Setting {
            optimizer: r.optimizer,
            inputs: &r.inputs,
        })
        .collect();
    let fits: BTreeMap<CurveKey, &ExponentRow> = rows
        .iter()
        .filter(|r| r.layer == Layer::Index(0))
        .filter_map(|r| {
            let figure = FigureKey {
                setting: Setting {
                    optimizer: r.optimizer,
                    inputs: &r.inputs,
                },
                site: r.site,
                stat: r.stat,
                m: r.m,
            };
            let step = r.window.single()?;
            Some((
                CurveKey {
                    figure,
                    scaling: r.scaling,
                    step,
                },
                r,
            ))
        })
        .collect();
    let mut plots = Vec::new();
    for setting in settings {
        for (site, stat, m) in [
            (Site::Fwd, Stat::Abs, order),
            (Site::FwdHeldout, Stat::Abs, order),
            (Site::Bwd, Stat::Abs, order),
            (Site::Param, Stat::GradNormB, 1),
        ] {
            let figure = FigureKey {
                setting,
                site,
                stat,
                m,
            };
            plots.extend(rank_figure(run, figure, &fits, max_panels));
        }
    }
    plots
}

/// The figure of `figure`'s statistic against rank, when the run recorded it.
fn rank_figure(
    run: &Run,
    figure: FigureKey,
    fits: &BTreeMap<CurveKey, &ExponentRow>,
    max_panels: usize,
) -> Option<Plot> {
    let FigureKey {
        setting: Setting {
            optimizer: opt,
            inputs,
        },
        site,
        stat,
        m,
    } = figure;
    // scaling (lora, rslora, constant) -> step -> rank -> values over seeds
    let mut data: BTreeMap<Scaling, BTreeMap<u32, BTreeMap<u32, Vec<f64>>>> = BTreeMap::new();
    for r in run.moments.iter().filter(|r| {
        r.optimizer == opt
            && r.inputs == inputs
            && r.site == site
            && r.stat == stat
            && r.layer == 0
            && r.m.unwrap_or(1) == m
    }) {
        data.entry(r.scaling)
            .or_default()
            .entry(r.step)
            .or_default()
            .entry(r.rank)
            .or_default()
            .push(r.value);
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
    let steps = spread(&steps.into_iter().collect::<Vec<_>>(), max_panels);
    let panels = rank_panels(&steps, &stat_label(site, stat, m), |step| {
        let mut series = Vec::new();
        for (&scaling, by_step) in &data {
            let Some(by_rank) = by_step.get(&step) else {
                continue;
            };
            let points = rank_points(by_rank);
            if points.is_empty() {
                continue;
            }
            let fit = fits.get(&CurveKey {
                figure,
                scaling,
                step,
            });
            let fitted = fit.map(|f| f.slope).filter(|s| s.is_finite());
            let predicted = fit.and_then(|f| f.predicted);
            let name = scaling.to_string();
            series.push(RankSeries::new(&name, points, fitted, predicted));
        }
        series
    })?;
    let order = if stat == Stat::Abs {
        format!("-m{m}")
    } else {
        String::new()
    };
    Some(Plot {
        name: slug(&format!(
            "theory-{}-{opt}-{inputs}-{site}-{stat}{order}",
            run.id
        )),
        title: format!(
            "{} vs rank: {opt}, {inputs} inputs ({})",
            stat_label(site, stat, m),
            run.id
        ),
        caption: format!(
            "Theory run {}: mean over trials with the 95% interval of each mean, log-log; thin solid line: fitted \
             slope, thick dashed line: predicted (the fit's law, when it has one). Layer 0, {opt}, {inputs} inputs, one panel per \
             step. Trials share their random draws across ranks, so the slope is much sharper than the \
             intervals of single points.",
            run.id
        ),
        kind: PlotKind::Rank(panels),
    })
}
