//! Every training row with its claims, judged as one family by the rule of
//! `rankstab_theory::predict::verdict`: one row per group, layer (and the mean over layers)
//! and step window, with the Monte Carlo slopes of the matching theory setting.
//!
//! The claims of a row ([`Claims`]):
//! * measured: [`fit_by_rank`] (jackknife over the seeds common to every rank);
//! * prediction: only from the law rows the trainer writes (`stat = law`, `site = fwd`,
//!   step 1: the exact first-step law of `E|fwd|^m` given the run's own step-0 data), tested
//!   on the paired difference of slopes (measured minus law, seed by seed) against a band
//!   around 0. Other statistics and windows, and runs written before law rows existed, get no
//!   prediction (`law` says why);
//! * rivals: `rankstab_theory::predict::rivals` with PEFT's default init;
//! * judgeable only with [`MIN_SEEDS`] seeds and [`MIN_RANKS`] ranks whose largest reaches
//!   d / [`RANK_REACH`] of the model's smallest adapted module (else inconclusive /
//!   undetermined, with a note).
use super::fit::{fit_by_rank, paired, pool_layers, window_mean, ByRank};
use super::row::{fmt_ranks, ExponentRow};
use super::train::{TrainData, TrainKey};
use super::TheorySection;
use rankstab_records::{Layer, Window};
use rankstab_theory::predict::verdict::{band_half_width, law_error, resolution, LawError};
use rankstab_theory::predict::{judge_all, rivals, Claims, PEFT_DEFAULT_KURTOSIS};
use rankstab_theory::stats::{fit_slope, fit_slope_diff, Band, Estimate, SlopeFit};
use std::collections::{BTreeMap, BTreeSet};

/// Seeds (common to every rank) a training fit needs to be judged.
pub const MIN_SEEDS: u32 = 3;
/// Ranks a training fit needs to be judged.
pub const MIN_RANKS: usize = 5;
/// The largest rank of a judged fit reaches d / `RANK_REACH` of the smallest adapted module
/// of its model (d = min(in, out)): the sweep's rank range, as issue 10 and
/// proofs/verdicts.md set it.
pub const RANK_REACH: u32 = 8;

/// The law's name in the rows that have one.
const EXACT_LAW: &str = "exact first step";

/// The fits of a cell (model, optimizer, scaling, lr) that could not be judged, and why.
#[derive(Debug, Default)]
pub(super) struct Unjudged {
    fits: usize,
    of: usize,
    why: BTreeSet<String>,
}

impl Unjudged {
    pub(super) fn note(&self, cell: &str) -> String {
        format!(
            "{cell}: {} of {} fits not judged (outcome inconclusive, verdict undetermined): {}. A judgement needs >= \
             {MIN_SEEDS} seeds and >= {MIN_RANKS} ranks, the largest reaching d/{RANK_REACH} of the smallest adapted module.",
            self.fits,
            self.of,
            self.why.iter().cloned().collect::<Vec<_>>().join("; ")
        )
    }
}

/// Every training row, judged, with what the notes need.
pub(super) struct Fitted {
    pub rows: Vec<ExponentRow>,
    /// Per row: whether it belongs to the primary family (a module's fit pooled over its
    /// layers, or the fit of a module with one layer) rather than to the per-layer family.
    pub primary: Vec<bool>,
    /// Cells with one rank in all their data (no exponent to fit).
    pub single_rank: BTreeSet<String>,
    /// Per cell, the fits that could not be judged.
    pub unjudged: BTreeMap<String, Unjudged>,
}

/// A row before the family is judged: the row, its claims, and why it cannot be judged.
struct Pending {
    /// The cell as notes name it.
    cell: String,
    row: ExponentRow,
    claims: Claims,
    why_not: Vec<String>,
    /// In the primary family (see [`Fitted::primary`]).
    primary: bool,
}

/// Every training row: per group, window and layer, and on the mean over layers. Judged as
/// two families, each with Benjamini-Hochberg: the primary one (every module's fit on the
/// mean over its layers, or its one layer's fit) and the per-layer fits of modules with
/// several layers, which are many and noisier and would otherwise dilute the primary
/// fits' power.
pub(super) fn fit_rows(
    data: &TrainData,
    windows: &BTreeMap<String, Vec<Window>>,
    theory: &[TheorySection],
) -> Fitted {
    let mut pending = Vec::new();
    let mut single_rank = BTreeSet::new();
    let mut unjudged: BTreeMap<String, Unjudged> = BTreeMap::new();
    for (key, by_layer) in &data.groups {
        let pooled = pool_layers(by_layer);
        let n_ranks = by_layer
            .values()
            .flat_map(|st| st.values().flat_map(|br| br.keys().copied()))
            .collect::<BTreeSet<u32>>()
            .len();
        let several = by_layer.len() > 1;
        let mut at = |layer: Layer, w: Window, br: &ByRank| {
            let law = data.law_at(key, layer, w);
            pending.extend(
                pending_row(data, key, layer, w, br, law, theory).map(|p| Pending {
                    primary: !several || layer == Layer::All,
                    ..p
                }),
            );
        };
        for &w in windows.get(&key.model).into_iter().flatten() {
            for (&layer, by_step) in by_layer {
                let br = window_mean(by_step, w);
                // A statistic recorded only at some steps (norms at intervals) leaves windows
                // without it: nothing to say there. One rank in all the data: say so.
                if br.len() < 2 && n_ranks < 2 {
                    single_rank.insert(key.label());
                }
                at(Layer::Index(layer), w, &br);
            }
            if several {
                at(Layer::All, w, &window_mean(&pooled, w));
            }
        }
    }
    for p in &pending {
        let u = unjudged.entry(p.cell.clone()).or_default();
        u.of += 1;
        if !p.why_not.is_empty() {
            u.fits += 1;
            u.why.extend(p.why_not.iter().cloned());
        }
    }
    unjudged.retain(|_, u| u.fits > 0);
    let mut judged: Vec<Option<rankstab_theory::predict::Judged>> = vec![None; pending.len()];
    for family in [true, false] {
        let (at, claims): (Vec<usize>, Vec<Claims>) = pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.primary == family)
            .map(|(i, p)| (i, p.claims.clone()))
            .unzip();
        for (i, j) in at.into_iter().zip(judge_all(&claims)) {
            judged[i] = Some(j);
        }
    }
    let primary = pending.iter().map(|p| p.primary).collect();
    let rows = pending
        .into_iter()
        .zip(judged)
        .map(|(p, j)| p.row.judged(j.expect("every row is in one family")))
        .collect();
    Fitted {
        rows,
        primary,
        single_rank,
        unjudged,
    }
}

/// The row of one group, layer and window with its claims: the fit, the exact law's paired
/// test when the group has law rows there, the rivals, the Monte Carlo slopes.
fn pending_row(
    data: &TrainData,
    key: &TrainKey,
    layer: Layer,
    window: Window,
    by_rank: &ByRank,
    law: Result<ByRank, String>,
    theory: &[TheorySection],
) -> Option<Pending> {
    let (ranks, seeds, fit) = fit_by_rank(by_rank)?;
    let beta = key.scaling.beta();
    let d = data.module_d(key);
    let p = if key.stat.is_moment() {
        f64::from(key.m)
    } else {
        1.0
    };
    let (mc_coherent, mc_fresh) = mc_slopes(theory, key);
    let mut row = ExponentRow {
        source: key.source.clone(),
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
    let mut test = None;
    match law {
        Err(why) => row.law = why,
        Ok(law) => match exact_test(by_rank, &law, p, d) {
            Err(why) => row.law = why,
            Ok(t) => {
                row.law = EXACT_LAW.into();
                row.predicted = Some(t.predicted);
                row.band = Some(t.band);
                row.diff = Some(t.diff.slope);
                row.diff_ci_low = Some(t.diff.ci_low);
                row.diff_ci_high = Some(t.diff.ci_high);
                test = Some((
                    Estimate::from(t.diff),
                    Band {
                        center: 0.0,
                        half_width: t.band,
                    },
                ));
            }
        },
    }
    let why_not = unjudgeable(seeds, &ranks, data.smallest_d(&key.model, None), &key.model);
    let claims = Claims {
        measured: Some(Estimate::from(fit)),
        test,
        predicted: row.predicted,
        rivals: rivals(
            key.optimizer,
            key.site,
            key.stat,
            key.m,
            d as usize,
            PEFT_DEFAULT_KURTOSIS,
            beta,
            0.0,
        ),
        resolution: resolution(p, &ranks),
        judgeable: why_not.is_empty(),
    };
    Some(Pending {
        cell: key.label(),
        row,
        claims,
        why_not,
        primary: true,
    })
}

/// The exact law's test of one fit.
struct ExactTest {
    /// The law's slope over the fitted ranks.
    predicted: f64,
    /// Measured minus law, paired seed by seed.
    diff: SlopeFit,
    /// Half-width of the band around 0.
    band: f64,
}

/// The paired test of `by_rank` against the law's values `law` (statistic of power `p`), or
/// why there is none.
/// `d` is the module's smaller width (min(in, out)): a bound on the init term's d_in.
fn exact_test(by_rank: &ByRank, law: &ByRank, p: f64, d: u32) -> Result<ExactTest, String> {
    let pair = paired(by_rank, law)
        .ok_or_else(|| "none: the law rows do not cover every fitted rank and seed".to_string())?;
    let rs: Vec<usize> = pair.ranks.iter().map(|&r| r as usize).collect();
    let (Some(law_fit), Some(diff)) = (
        fit_slope(&rs, &pair.law),
        fit_slope_diff(&rs, &pair.measured, &pair.law),
    ) else {
        return Err(
            "none: the paired test needs >= 2 seeds common to every rank and positive means".into(),
        );
    };
    Ok(ExactTest {
        predicted: law_fit.slope,
        diff,
        // The outputs' linear forms of A taken as normal under PEFT's uniform init
        // (kurtosis 9/5): relative fourth cumulant 3 |k4 - 3| / d_in (proofs/verdicts.md).
        band: band_half_width(
            p,
            &pair.ranks,
            law_error(
                p,
                LawError {
                    init: 3.0 * (PEFT_DEFAULT_KURTOSIS - 3.0).abs() / f64::from(d.max(1)),
                    drift: 0.0,
                },
            ),
        ),
    })
}

/// Why a fit of `seeds` seeds over `ranks` of `model`, whose smallest adapted module has
/// width `d`, cannot be judged (empty when it can).
fn unjudgeable(seeds: u32, ranks: &[u32], d: u32, model: &str) -> Vec<String> {
    let mut why = Vec::new();
    if seeds < MIN_SEEDS {
        why.push(format!(
            "{seeds} seed{} common to every rank (>= {MIN_SEEDS} needed)",
            if seeds == 1 { "" } else { "s" }
        ));
    }
    if ranks.len() < MIN_RANKS {
        why.push(format!(
            "{} ranks {} (>= {MIN_RANKS} needed)",
            ranks.len(),
            fmt_ranks(ranks)
        ));
    }
    let r_max = ranks.last().copied().unwrap_or(0);
    if d == 0 {
        why.push(format!("no module width recorded for {model}"));
    } else if r_max * RANK_REACH < d {
        why.push(format!(
            "largest rank {r_max} below d/{RANK_REACH} = {} (smallest adapted module of {model}, d = {d})",
            f64::from(d) / f64::from(RANK_REACH)
        ));
    }
    why
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
