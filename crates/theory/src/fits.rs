//! The fitted rank exponents of a theory run, judged (proofs/verdicts.md): every
//! (optimizer, scaling, inputs, layer, site, statistic, m, step) group of the Monte Carlo's
//! rows is fitted against log rank with a jackknife over trials, set against the exact law
//! of its `law` rows (the paired difference, trial by trial), against the rival laws, and
//! for stability, all by the one rule of [`crate::predict::verdict`].
use crate::config::TheoryConfig;
use crate::predict::verdict::{band_half_width, law_error, resolution, LawError};
use crate::predict::{judge_all, law, rivals, Claims};
use crate::stats::{fit_slope, fit_slope_diff, Band, Estimate, SlopeFit};
use rankstab_records::{CoefRow, CoefStat, Fit, MomentRow, Optimizer, Scaling, Site, Stat};
use std::collections::BTreeMap;

/// What a fit groups by: everything but the rank and the seed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FitKey {
    optimizer: Optimizer,
    scaling: Scaling,
    inputs: String,
    dist: String,
    layer: u32,
    site: Site,
    stat: Stat,
    m: u32,
    step: u32,
}

/// A cell at one layer, for the per-step diagnostics (loss-gradient drift, Adam's regime).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct CellKey {
    optimizer: Optimizer,
    scaling: Scaling,
    inputs: String,
    layer: u32,
    rank: u32,
}

type BySeed = BTreeMap<u64, f64>;
type ByRank = BTreeMap<u32, BySeed>;

/// Whether a statistic is fitted (measurements, not laws or diagnostics).
fn fitted(stat: Stat) -> bool {
    match stat {
        Stat::Abs | Stat::GradNormA | Stat::GradNormB | Stat::DeltaNorm => true,
        Stat::Raw
        | Stat::StableRank
        | Stat::ClosedForm
        | Stat::Law
        | Stat::EpsShareA
        | Stat::EpsShareB => false,
    }
}

/// Coherence per (inputs, layer, site) from the exact first-step coefficients, summed over
/// trials: quad / lin (the two-term law's kappa).
fn coherence(coefs: &[CoefRow]) -> BTreeMap<(String, u32, Site), f64> {
    let mut acc: BTreeMap<(String, u32, Site), (f64, f64)> = BTreeMap::new();
    for r in coefs {
        let e = acc.entry((r.inputs.clone(), r.layer, r.site)).or_default();
        match r.stat {
            CoefStat::Lin => e.0 += r.value,
            CoefStat::Quad => e.1 += r.value,
            CoefStat::Entries => {}
        }
    }
    acc.into_iter()
        .map(|(k, (lin, quad))| (k, if lin > 0.0 { quad / lin } else { 0.0 }))
        .collect()
}

/// Per-cell, per-step means over trials of a diagnostic statistic.
fn cell_means(
    rows: &[MomentRow],
    pick: impl Fn(&MomentRow) -> bool,
) -> BTreeMap<CellKey, BTreeMap<u32, f64>> {
    let mut acc: BTreeMap<CellKey, BTreeMap<u32, (f64, usize)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| pick(r)) {
        let k = CellKey {
            optimizer: r.optimizer,
            scaling: r.scaling,
            inputs: r.inputs.clone(),
            layer: r.layer,
            rank: r.rank,
        };
        let e = acc.entry(k).or_default().entry(r.step).or_insert((0.0, 0));
        e.0 += r.value;
        e.1 += 1;
    }
    acc.into_iter()
        .map(|(k, v)| {
            (
                k,
                v.into_iter().map(|(s, (t, n))| (s, t / n as f64)).collect(),
            )
        })
        .collect()
}

/// The run's diagnostics for the law's error and Adam's regime.
struct Diagnostics {
    /// Mean |v|^2 of the loss gradient at the adapter (lowest recorded order if not 2),
    /// and that order.
    grad_out: BTreeMap<CellKey, BTreeMap<u32, f64>>,
    grad_order: u32,
    /// Mean share of B's coordinates in Adam's eps-dominated regime.
    eps_share: BTreeMap<CellKey, BTreeMap<u32, f64>>,
}

impl Diagnostics {
    fn new(rows: &[MomentRow]) -> Self {
        let orders: Vec<u32> = rows
            .iter()
            .filter(|r| r.site == Site::GradOut && r.stat == Stat::Abs)
            .filter_map(|r| r.m)
            .collect();
        let grad_order = if orders.contains(&2) {
            2
        } else {
            orders.into_iter().min().unwrap_or(2)
        };
        Diagnostics {
            grad_out: cell_means(rows, |r| {
                r.site == Site::GradOut && r.stat == Stat::Abs && r.m == Some(grad_order)
            }),
            grad_order,
            eps_share: cell_means(rows, |r| r.stat == Stat::EpsShareB),
        }
    }

    fn cell(k: &FitKey, rank: u32) -> CellKey {
        CellKey {
            optimizer: k.optimizer,
            scaling: k.scaling,
            inputs: k.inputs.clone(),
            layer: k.layer,
            rank,
        }
    }

    /// Largest relative drift of the loss gradient's scale from step 0 to `step - 1` over
    /// `ranks` (0 at steps 0 and 1).
    fn drift(&self, k: &FitKey, ranks: &[u32]) -> f64 {
        if k.step < 2 {
            return 0.0;
        }
        ranks
            .iter()
            .filter_map(|&r| {
                let by = self.grad_out.get(&Self::cell(k, r))?;
                let (now, first) = (by.get(&(k.step - 1))?, by.get(&0)?);
                (*first > 0.0)
                    .then(|| ((now / first).powf(1.0 / self.grad_order as f64) - 1.0).abs())
            })
            .fold(0.0, f64::max)
    }

    /// Adam's measured regime at the fit's step over `ranks`.
    fn adam_regime(&self, k: &FitKey, ranks: &[u32]) -> Option<String> {
        if !k.optimizer.is_adaptive() || k.step == 0 {
            return None;
        }
        let shares: Vec<f64> = ranks
            .iter()
            .filter_map(|&r| self.eps_share.get(&Self::cell(k, r))?.get(&k.step).copied())
            .collect();
        let lo = shares.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = shares.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if shares.is_empty() {
            None
        } else if hi < 0.1 {
            Some("sign-like".into())
        } else if lo > 0.9 {
            Some("eps-dominated".into())
        } else {
            Some(format!(
                "mixed ({:.0}-{:.0}% eps-dominated)",
                100.0 * lo,
                100.0 * hi
            ))
        }
    }
}

/// One fit before judging: the record and its claims.
struct Pending {
    fit: Fit,
    claims: Claims,
}

/// Fits every (optimizer, scaling, inputs, layer, site, stat, m, step) group of `rows` and
/// judges the family; `coefs` are the trials' first-step coefficients (the two-term law's
/// coherence, for the rival limits and for runs written before law rows existed).
pub fn fit_rows(cfg: &TheoryConfig, rows: &[MomentRow], coefs: &[CoefRow]) -> Vec<Fit> {
    let kappa = coherence(coefs);
    let diag = Diagnostics::new(rows);
    let has_law_rows = rows.iter().any(|r| r.stat == Stat::Law);
    let mut measured: BTreeMap<FitKey, ByRank> = BTreeMap::new();
    let mut laws: BTreeMap<FitKey, ByRank> = BTreeMap::new();
    for r in rows {
        let (target, stat) = match r.stat {
            Stat::Law => (&mut laws, Stat::Abs),
            s if fitted(s) && r.site != Site::GradOut => (&mut measured, s),
            _ => continue,
        };
        let key = FitKey {
            optimizer: r.optimizer,
            scaling: r.scaling,
            inputs: r.inputs.clone(),
            dist: r.dist.clone(),
            layer: r.layer,
            site: r.site,
            stat,
            m: r.m.unwrap_or(1),
            step: r.step,
        };
        target
            .entry(key)
            .or_default()
            .entry(r.rank)
            .or_default()
            .insert(r.seed, r.value);
    }
    let pending: Vec<Pending> = measured
        .into_iter()
        .filter_map(|(key, by_rank)| {
            let kappa = kappa
                .get(&(key.inputs.clone(), key.layer, key.site))
                .copied()
                .unwrap_or(0.0);
            pending_fit(
                cfg,
                key.clone(),
                &by_rank,
                laws.get(&key),
                kappa,
                has_law_rows,
                &diag,
            )
        })
        .collect();
    let claims: Vec<Claims> = pending.iter().map(|p| p.claims.clone()).collect();
    pending
        .into_iter()
        .zip(judge_all(&claims))
        .map(|(p, j)| Fit {
            outcome: j.outcome,
            verdict: j.verdict,
            rivals: j.rivals,
            discriminating: j.discriminating,
            ..p.fit
        })
        .collect()
}

/// Values at the seeds present at every rank, in rank order.
fn paired_values(by_rank: &ByRank, seeds: &[u64]) -> Vec<Vec<f64>> {
    by_rank
        .values()
        .map(|v| seeds.iter().map(|s| v[s]).collect())
        .collect()
}

/// One group's fit and claims (before the family is judged).
fn pending_fit(
    cfg: &TheoryConfig,
    key: FitKey,
    by_rank: &ByRank,
    law_rows: Option<&ByRank>,
    kappa: f64,
    has_law_rows: bool,
    diag: &Diagnostics,
) -> Option<Pending> {
    let ranks: Vec<u32> = by_rank.keys().copied().collect();
    let rs: Vec<usize> = ranks.iter().map(|&r| r as usize).collect();
    // Trials present at every rank (and in the law's rows, when they are compared).
    let seeds: Vec<u64> = by_rank
        .values()
        .next()
        .map(|s| {
            s.keys()
                .copied()
                .filter(|k| by_rank.values().all(|v| v.contains_key(k)))
                .filter(|k| {
                    law_rows.is_none_or(|l| {
                        ranks
                            .iter()
                            .all(|r| l.get(r).is_some_and(|v| v.contains_key(k)))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let values = paired_values(by_rank, &seeds);
    let any_nonfinite = values.iter().flatten().any(|v| !v.is_finite());
    // Identically zero (e.g. the adapter's output at step 0, where B = 0): nothing to fit.
    let sf = fit_slope(&rs, &values)
        .or_else(|| any_nonfinite.then(|| SlopeFit::without_interval(f64::NAN)))?;
    let lw = law(
        key.optimizer,
        key.site,
        key.stat,
        key.m,
        kappa,
        cfg.width,
        cfg.init.kurtosis(),
    )?;
    let beta = key.scaling.beta();
    let ds = cfg.init.log_std_rank_slope();
    let p = lw.p;
    let mut law_name = String::new();
    let mut predicted = f64::NAN;
    let mut band = f64::NAN;
    let mut diff = SlopeFit::without_interval(f64::NAN);
    let mut test = None;
    let exact: Option<Vec<Vec<f64>>> = law_rows
        .filter(|l| ranks.iter().all(|r| l.contains_key(r)))
        .map(|l| {
            ranks
                .iter()
                .map(|r| seeds.iter().map(|s| l[r][s]).collect())
                .collect()
        });
    match exact {
        Some(law_values) => {
            let law_fit = fit_slope(&rs, &law_values);
            if let (Some(lf), Some(d)) = (law_fit, fit_slope_diff(&rs, &values, &law_values)) {
                let init = match (key.site, cfg.init.kurtosis()) {
                    (Site::Fwd | Site::FwdHeldout, k4) => 3.0 * (k4 - 3.0).abs() / cfg.width as f64,
                    _ => 0.0,
                };
                let adam_a = if key.optimizer.is_adaptive() && key.step >= 2 {
                    let s_min = ranks
                        .iter()
                        .map(|&r| cfg.init.variance(cfg.width, r as usize).sqrt())
                        .fold(f64::INFINITY, f64::min);
                    (key.step - 1) as f64 * cfg.lr(key.optimizer) / s_min
                } else {
                    0.0
                };
                let err = LawError {
                    init,
                    drift: diag.drift(&key, &ranks) + adam_a,
                };
                band = band_half_width(p, &ranks, law_error(p, err));
                predicted = lf.slope;
                diff = d;
                law_name = if key.step <= 1 {
                    "exact first step".into()
                } else {
                    "first order in lr".into()
                };
                test = Some((
                    Estimate::from(d),
                    Band {
                        center: 0.0,
                        half_width: band,
                    },
                ));
            }
        }
        _ if !key.stat.is_moment() => {
            // Norm laws: E of the squared norm is exact; the norm's Jensen gap relative to
            // its square root is at most 1 / (8 r) for a sum of r terms of unit CV.
            let r_min = ranks.first().copied().unwrap_or(1) as f64;
            predicted = lw.predicted(&rs, beta, ds);
            band = band_half_width(
                p,
                &ranks,
                law_error(
                    p,
                    LawError {
                        init: 0.0,
                        drift: 1.0 / (8.0 * r_min),
                    },
                ),
            );
            law_name = "norm law".into();
            test = Some((
                Estimate::from(sf),
                Band {
                    center: predicted,
                    half_width: band,
                },
            ));
        }
        _ if !has_law_rows && key.m == 2 && !key.optimizer.is_adaptive() && key.step == 1 => {
            // A run written before law rows existed: the two-term law, exact for the
            // second moment after one SGD step.
            predicted = lw.predicted(&rs, beta, ds);
            band = band_half_width(p, &ranks, law_error(p, LawError::default()));
            law_name = "two-term law (exact at m = 2, step 1)".into();
            test = Some((
                Estimate::from(sf),
                Band {
                    center: predicted,
                    half_width: band,
                },
            ));
        }
        _ => {
            law_name = if has_law_rows {
                "none: no exact law for this setting (proofs/exact-law.md)".into()
            } else {
                "none: the run has no law rows (written by an older rankstab)".into()
            };
        }
    }
    let regime = match diag.adam_regime(&key, &ranks) {
        Some(a) => format!("{}; {a}", lw.regime(*rs.last().unwrap_or(&1))),
        None => lw.regime(*rs.last().unwrap_or(&1)).to_string(),
    };
    let claims = Claims {
        measured: Some(Estimate::from(sf)),
        test,
        predicted: predicted.is_finite().then_some(predicted),
        rivals: rivals(
            key.optimizer,
            key.site,
            key.stat,
            key.m,
            cfg.width,
            cfg.init.kurtosis(),
            beta,
            ds,
        ),
        resolution: resolution(p, &ranks),
        judgeable: seeds.len() >= 2 && ranks.len() >= 3,
    };
    let fit = Fit {
        source: "theory".into(),
        model: "synthetic".into(),
        module: "adapter".into(),
        layer: key.layer,
        optimizer: key.optimizer,
        scaling: key.scaling,
        beta,
        inputs: key.inputs,
        dist: key.dist,
        site: key.site,
        stat: key.stat,
        m: key.m,
        step: key.step,
        ranks,
        trials: seeds.len() as u32,
        slope: sf.slope,
        se: sf.se,
        ci_low: sf.ci_low,
        ci_high: sf.ci_high,
        law: law_name,
        predicted,
        band,
        diff: diff.slope,
        diff_ci_low: diff.ci_low,
        diff_ci_high: diff.ci_high,
        asymptotic: lw.asymptotic(beta, ds),
        regime,
        ..Fit::default()
    };
    Some(Pending { fit, claims })
}
