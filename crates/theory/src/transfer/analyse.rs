//! From a transfer study's runs to its answers: lr* per rank with bootstrap intervals over
//! seeds, the exponents of lr* across ranks and widths judged against the one-step law and
//! the published claims, the loss at lr* per rank, the moment exponent along the run, and
//! the rank the updates actually use.
//!
//! **lr\*.** For a setting, width and rank, the final held-out losses form a seeds x lrs
//! matrix (a diverged run counts as infinite). The mean over seeds of `ln loss` is taken
//! at each lr (infinite when any seed diverged there); its grid minimum, refined by the
//! parabola through it and its two neighbours in `ln lr`, is `ln lr*`. A minimum at the
//! grid's first or last value is reported as such, never as lr*.
//!
//! **Intervals.** Seeds are resampled with replacement ([`TransferConfig::bootstrap`]
//! times; the same resample for every setting and rank, since seeds pair them). A
//! per-rank interval is the 5-95% percentile interval of the resampled lr*. An exponent
//! (least-squares slope of `ln lr*` on `ln r`) gets the bootstrap standard error and a
//! Student-t reference with `seeds - 1` degrees of freedom (90% two-sided), because a
//! percentile interval from a handful of seeds is too narrow. More than 10% of resamples
//! with an lr* at the grid's edge make the exponent inconclusive.
//!
//! **Judgement.** The rule of proofs/verdicts.md (`judge_family`, Benjamini-Hochberg over
//! the study's exponents) against a band `leverage(values) (ln(1 + LR_TOLERANCE) +
//! step / 4)`: two lr laws whose lr* differ by less than 25% over the fitted ranks are the
//! same, and lr* is located on a grid of log-spacing `step`.
use super::law::{self, DataTerms, LawSetting};
use super::{RunRow, StepRow, Study, TransferConfig};
use crate::config::AdapterInit;
use crate::predict::verdict::{judge_family, resolution};
use crate::stats::{fit_slope, leverage, ols_slope, Band, Estimate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rankstab_records::{Optimizer, Outcome};
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};
use std::collections::BTreeMap;

/// lr laws whose lr* differ by less than this factor over the fitted values are the same.
pub const LR_TOLERANCE: f64 = 0.25;
/// The least relative loss gain at lr* that counts as a gain (LoRA+'s claim).
pub const LOSS_GAIN: f64 = 0.01;
/// Why a trained model's exponents have no prediction ([`Laws::None`]).
pub const NO_LAW: &str = "no law predicts lr* for a trained model (the laws of proofs/lr-transfer.md need one layer's data terms); only c = 0 is judged";
/// Share of bootstrap resamples that may put some lr* at the grid's edge before an
/// exponent is left inconclusive.
pub const EDGE_SHARE: f64 = 0.10;

/// lr* of one setting at one width and rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptCell {
    /// `rank` (the rank study) or `width` (the width study).
    pub axis: Study,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling exponent beta.
    pub beta: f64,
    /// Which factor started random (`a`: PEFT, `b`).
    pub init: AdapterInit,
    /// lr_B / lr_A.
    pub lr_ratio: f64,
    /// Width.
    pub width: u32,
    /// Rank.
    pub rank: u32,
    /// The optimal learning rate (A's), when located inside the grid.
    pub lr_opt: Option<f64>,
    /// 5% bootstrap percentile.
    pub lr_opt_ci_low: Option<f64>,
    /// 95% bootstrap percentile.
    pub lr_opt_ci_high: Option<f64>,
    /// Why there is no lr*: `below the grid`, `above the grid`, `every lr diverged`.
    pub edge: Option<String>,
    /// Held-out loss at lr* (geometric mean over seeds).
    pub loss_at_opt: Option<f64>,
    /// 5% bootstrap percentile.
    pub loss_ci_low: Option<f64>,
    /// 95% bootstrap percentile.
    pub loss_ci_high: Option<f64>,
    /// The long-horizon law's lr* at this rank (or width), its level fitted to the
    /// measured lr* of the same setting (the law predicts how lr* changes, not its level):
    /// the predicted line of the lr*-vs-rank figure.
    pub predicted_lr: Option<f64>,
    /// Runs stopped as diverged, of `runs`.
    pub diverged_runs: u32,
    /// Runs (seeds x lrs).
    pub runs: u32,
    /// Mean over seeds of the final update's effective rank at the grid lr nearest lr*.
    pub effective_rank: Option<f64>,
    /// The same for the stable rank.
    pub stable_rank: Option<f64>,
    /// The same for the share of spectral mass in the top 8 directions.
    pub top_share: Option<f64>,
    /// The loss curve: per lr, the geometric mean over seeds (None where a seed diverged)
    /// and the number of seeds that diverged.
    pub curve: Vec<CurvePoint>,
}

/// One point of a loss-vs-lr curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Learning rate of A.
    pub lr: f64,
    /// Geometric mean over seeds of the final held-out loss.
    pub loss: Option<f64>,
    /// Seeds that diverged at this lr.
    pub diverged: u32,
}

/// The exponent of lr* across ranks (or widths) for one setting, judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exponent {
    /// `rank`: `lr*(r) ~ r^c` at `width`; `width`: `lr*(d) ~ d^c` at `rank`.
    pub axis: Study,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling exponent beta.
    pub beta: f64,
    /// Which factor started random.
    pub init: AdapterInit,
    /// lr_B / lr_A.
    pub lr_ratio: f64,
    /// Width (rank axis).
    pub width: Option<u32>,
    /// Rank (width axis).
    pub rank: Option<u32>,
    /// The ranks (or widths) fitted.
    pub values: Vec<u32>,
    /// Measured exponent c.
    pub slope: Option<f64>,
    /// 90% interval.
    pub ci_low: Option<f64>,
    /// 90% interval.
    pub ci_high: Option<f64>,
    /// Bootstrap standard error.
    pub se: Option<f64>,
    /// Degrees of freedom of the t reference (seeds - 1).
    pub df: f64,
    /// The long-horizon law's exponent over the same values (proofs/lr-transfer.md); NaN
    /// (`null` in JSON) without a law ([`Laws::None`]).
    #[serde(deserialize_with = "rankstab_records::nan_as_null::deserialize")]
    pub predicted: f64,
    /// The one-step law's exponent over the same values (NaN / `null` without a law).
    #[serde(deserialize_with = "rankstab_records::nan_as_null::deserialize")]
    pub first_step: f64,
    /// Against the one-step law (judged with the same band).
    pub first_step_outcome: Outcome,
    /// Its limits far below and far above the crossover (rank axis).
    pub limits: Option<(f64, f64)>,
    /// Half-width of the band.
    pub band: f64,
    /// Against the prediction.
    pub outcome: Outcome,
    /// Against c = 0 ("the learning rate transfers unchanged").
    pub flat: Outcome,
    /// Why an outcome is inconclusive (empty otherwise).
    pub reason: String,
    /// Slope of ln(loss at lr*) against ln r (or ln d): < 0 when more rank helps.
    pub loss_slope: Option<f64>,
    /// 90% interval.
    pub loss_slope_ci_low: Option<f64>,
    /// 90% interval.
    pub loss_slope_ci_high: Option<f64>,
}

/// A published claim, with what this study measured of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The claim, in one sentence.
    pub claim: String,
    /// Where it is published.
    pub source: String,
    /// The setting it was tested on.
    pub setting: String,
    /// `supports`, `contradicts`, `inconclusive` or `not measured`.
    pub verdict: String,
    /// What the verdict rests on.
    pub rests_on: String,
}

/// The forward moment's rank exponent at one step of the runs at a fixed lr.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HorizonRow {
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling exponent beta.
    pub beta: f64,
    /// Which factor started random.
    pub init: AdapterInit,
    /// lr_B / lr_A.
    pub lr_ratio: f64,
    /// The fixed learning rate (the grid lr with the lowest mean loss over ranks where no
    /// run diverged).
    pub lr: f64,
    /// Step.
    pub step: u32,
    /// Rank exponent of the second moment of the adapter's output.
    pub slope: Option<f64>,
    /// 90% interval (jackknife over seeds).
    pub ci_low: Option<f64>,
    /// 90% interval.
    pub ci_high: Option<f64>,
    /// The exponent at step 1 (the first-step law's regime).
    pub first_step: Option<f64>,
    /// Whether the interval lies outside the step-1 exponent's resolution band.
    pub departs: bool,
    /// Mean effective rank of the update per rank at this step.
    pub effective_rank: Vec<(u32, Option<f64>)>,
}

/// Everything `transfer.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferSummary {
    /// The trained model, for a sweep's lr grid (`rankstab sweep` with `lrs`); absent for a
    /// synthetic study (`rankstab transfer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Seeds.
    pub seeds: usize,
    /// Bootstrap resamples.
    pub bootstrap: usize,
    /// Steps per run.
    pub steps: usize,
    /// Level of the two-sided intervals.
    pub level: f64,
    /// lr* per setting, width and rank.
    pub cells: Vec<OptCell>,
    /// Exponents, judged.
    pub exponents: Vec<Exponent>,
    /// The published claims.
    pub findings: Vec<Finding>,
    /// Moment exponents along the runs.
    pub horizon: Vec<HorizonRow>,
}

type Key = (Study, u32, Optimizer, u64, AdapterInit, u64, u32);
type SettingKey = (Optimizer, u64, AdapterInit, u64);
/// Final-step (effective rank, stable rank, top share) per group and lr.
type Spectra = BTreeMap<(Key, u64), Vec<(f64, f64, f64)>>;
/// A published claim of c = 0: text, source, which exponents it covers.
type FlatClaim = (&'static str, &'static str, fn(&Exponent) -> bool);

fn key(r: &RunRow) -> Key {
    (
        r.study,
        r.width,
        r.optimizer,
        r.beta.to_bits(),
        r.init,
        r.lr_ratio.to_bits(),
        r.rank,
    )
}

/// Where the minimum of a loss curve lies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Star {
    /// Inside the grid: `ln lr*` and the mean `ln loss` there.
    Interior(f64, f64),
    /// At the smallest lr.
    Below,
    /// At the largest lr.
    Above,
    /// Every lr diverged.
    Diverged,
}

/// The minimum of a curve `y` (mean ln loss, infinite where diverged) on the uniform grid
/// `x` (ln lr), refined by a parabola through the minimum and its neighbours.
///
/// ```
/// use rankstab_theory::transfer::analyse::{locate, Star};
/// let x: Vec<f64> = (0..7).map(|i| i as f64 * 0.5).collect();
/// // y = (x - 1.3)^2: the parabola recovers 1.3 exactly.
/// let y: Vec<f64> = x.iter().map(|v| (v - 1.3f64).powi(2)).collect();
/// let Star::Interior(at, _) = locate(&x, &y) else { panic!() };
/// assert!((at - 1.3).abs() < 1e-12);
/// // A minimum at the last value is not an optimum.
/// assert_eq!(locate(&x, &[5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1]), Star::Above);
/// ```
pub fn locate(x: &[f64], y: &[f64]) -> Star {
    let mut best: Option<usize> = None;
    for (j, &v) in y.iter().enumerate() {
        if v.is_finite() && best.is_none_or(|b| v < y[b]) {
            best = Some(j);
        }
    }
    let Some(j) = best else {
        return Star::Diverged;
    };
    if j == 0 {
        return Star::Below;
    }
    if j + 1 == y.len() {
        return Star::Above;
    }
    let (y0, y1, y2) = (y[j - 1], y[j], y[j + 1]);
    if !(y0.is_finite() && y2.is_finite()) {
        return Star::Interior(x[j], y1);
    }
    let h = x[j + 1] - x[j];
    let curv = y0 - 2.0 * y1 + y2;
    if curv <= 0.0 {
        return Star::Interior(x[j], y1);
    }
    let off = (0.5 * h * (y0 - y2) / curv).clamp(-h, h);
    let at = x[j] + off;
    // The parabola's value at its vertex.
    let val = y1 - (y2 - y0).powi(2) / (8.0 * curv);
    Star::Interior(at, val)
}

/// Two-sided 90% Student-t quantile (the normal's for infinite or huge df).
fn t90(df: f64) -> f64 {
    if !(df.is_finite() && df > 0.0 && df < 1e4) {
        return 1.644_853_626_951_472_2;
    }
    StudentsT::new(0.0, 1.0, df).map_or(f64::INFINITY, |t| t.inverse_cdf(0.95))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos.fract());
    if i + 1 < sorted.len() {
        sorted[i] * (1.0 - f) + sorted[i + 1] * f
    } else {
        sorted[i]
    }
}

fn sd(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt()
}

/// One group's curve under seed weights.
struct Group {
    x: Vec<f64>,
    lrs: Vec<f64>,
    /// ln loss per seed and lr (infinite when diverged).
    y: Vec<Vec<f64>>,
    diverged: Vec<u32>,
}

impl Group {
    fn star(&self, w: &[u32]) -> Star {
        let total: u32 = w.iter().sum();
        let mean: Vec<f64> = (0..self.x.len())
            .map(|j| {
                let mut s = 0.0;
                for (k, &wk) in w.iter().enumerate() {
                    if wk > 0 {
                        let v = self.y[k][j];
                        if !v.is_finite() {
                            return f64::INFINITY;
                        }
                        s += f64::from(wk) * v;
                    }
                }
                s / f64::from(total)
            })
            .collect();
        locate(&self.x, &mean)
    }
}

/// Point, standard error and 90% interval from bootstrap values. `floor` is a standard
/// error that the bootstrap cannot see and that is added in quadrature: an lr* that is a
/// grid point of log-spacing `step` (not refined by the parabola) has an error uniform
/// over a cell (sd `step / sqrt 12`) that every resample shares.
fn estimate_of(
    point: Option<f64>,
    boot: &[Option<f64>],
    df: f64,
    floor: f64,
) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
    let valid: Vec<f64> = boot.iter().flatten().copied().collect();
    let Some(p) = point else {
        return (None, None, None, None);
    };
    if (valid.len() as f64) < (1.0 - EDGE_SHARE) * boot.len() as f64 || valid.len() < 2 {
        return (Some(p), None, None, None);
    }
    let se = sd(&valid).hypot(floor);
    let h = t90(df) * se;
    (Some(p), Some(se), Some(p - h), Some(p + h))
}

/// What the laws of proofs/lr-transfer.md can be evaluated with.
#[derive(Debug, Clone, Copy)]
pub enum Laws<'a> {
    /// A synthetic study: the data terms of each trial's first batch, per (width, trial).
    Measured(&'a [(usize, usize, DataTerms)]),
    /// A trained model (`rankstab sweep` with `lrs`): the laws need the data terms and the
    /// target scale of one linear layer, which a deep network does not have, so no exponent
    /// is predicted (`predicted` and `first_step` are NaN, written as `null`, and judged
    /// inconclusive); c = 0, the published "the learning rate transfers", is still judged.
    None,
}

/// Analyses a synthetic study's rows (see the module docs): [`analyse_with`] and the data
/// terms it measured.
pub fn analyse(
    cfg: &TransferConfig,
    runs: &[RunRow],
    steps: &[StepRow],
    terms: &[(usize, usize, DataTerms)],
) -> TransferSummary {
    analyse_with(cfg, runs, steps, Laws::Measured(terms))
}

/// Analyses a study's rows against the laws `laws` can evaluate.
pub fn analyse_with(
    cfg: &TransferConfig,
    runs: &[RunRow],
    steps: &[StepRow],
    laws: Laws<'_>,
) -> TransferSummary {
    let terms: &[(usize, usize, DataTerms)] = match laws {
        Laws::Measured(t) => t,
        Laws::None => &[],
    };
    let has_law = matches!(laws, Laws::Measured(_));
    let seeds = cfg.seeds;
    let df = (seeds as f64 - 1.0).max(1.0);
    // Groups.
    let mut groups: BTreeMap<Key, Group> = BTreeMap::new();
    let mut by_key: BTreeMap<Key, Vec<&RunRow>> = BTreeMap::new();
    for r in runs {
        by_key.entry(key(r)).or_default().push(r);
    }
    for (k, rows) in &by_key {
        let mut lrs: Vec<f64> = rows.iter().map(|r| r.lr).collect();
        lrs.sort_by(f64::total_cmp);
        lrs.dedup();
        let mut y = vec![vec![f64::INFINITY; lrs.len()]; seeds];
        let mut diverged = vec![0u32; lrs.len()];
        for r in rows {
            let j = lrs.partition_point(|&v| v < r.lr);
            let t = r.trial as usize;
            if t < seeds && j < lrs.len() {
                y[t][j] = if r.diverged || !(r.final_loss.is_finite() && r.final_loss > 0.0) {
                    f64::INFINITY
                } else {
                    r.final_loss.ln()
                };
                if r.diverged {
                    diverged[j] += 1;
                }
            }
        }
        groups.insert(
            *k,
            Group {
                x: lrs.iter().map(|v| v.ln()).collect(),
                lrs,
                y,
                diverged,
            },
        );
    }
    // Bootstrap weights: the same resample of seeds for every group.
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x7261_6e6b_7374_6162);
    let weights: Vec<Vec<u32>> = (0..cfg.bootstrap)
        .map(|_| {
            let mut w = vec![0u32; seeds];
            for _ in 0..seeds {
                w[rng.random_range(0..seeds)] += 1;
            }
            w
        })
        .collect();
    let all = vec![1u32; seeds];
    let stars: BTreeMap<Key, (Star, Vec<Star>)> = groups
        .iter()
        .map(|(k, g)| {
            (
                *k,
                (g.star(&all), weights.iter().map(|w| g.star(w)).collect()),
            )
        })
        .collect();
    // Data terms per width, averaged over trials.
    let mut tw: BTreeMap<usize, Vec<DataTerms>> = BTreeMap::new();
    for (d, _, t) in terms {
        tw.entry(*d).or_default().push(*t);
    }
    let terms_at: BTreeMap<usize, DataTerms> =
        tw.iter().map(|(d, v)| (*d, DataTerms::mean(v))).collect();
    let law_setting = |opt: Optimizer, beta: f64, init: AdapterInit| LawSetting {
        opt,
        beta,
        alpha: cfg.alpha,
        init: cfg.init,
        adapter_init: init,
    };
    // The long-horizon law's ln lr* per group (up to a constant).
    let law_ln = |k: &Key| {
        if !has_law {
            return f64::NAN;
        }
        let (_, width, opt, beta, init, _, rank) = *k;
        let t = terms_at.get(&(width as usize)).copied().unwrap_or_default();
        law::ln_lr_long(
            law_setting(opt, f64::from_bits(beta), init),
            rank as usize,
            width as usize,
            &t,
        )
    };
    // Final-step spectra per (key, lr).
    let mut spec: Spectra = BTreeMap::new();
    for s in steps.iter().filter(|s| s.step as usize == cfg.steps) {
        let k = (
            s.study,
            s.width,
            s.optimizer,
            s.beta.to_bits(),
            s.init,
            s.lr_ratio.to_bits(),
            s.rank,
        );
        spec.entry((k, s.lr.to_bits())).or_default().push((
            s.effective_rank,
            s.stable_rank,
            s.top_share,
        ));
    }
    let mean_finite = |v: &[f64]| {
        let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        (!f.is_empty()).then(|| f.iter().sum::<f64>() / f.len() as f64)
    };
    // Cells.
    let mut cells = Vec::new();
    for (k, g) in &groups {
        let (point, boot) = &stars[k];
        let interior = |s: &Star| match *s {
            Star::Interior(x, y) => Some((x, y)),
            _ => None,
        };
        let bx: Vec<f64> = boot
            .iter()
            .filter_map(interior)
            .map(|p| p.0.exp())
            .collect();
        let by: Vec<f64> = boot
            .iter()
            .filter_map(interior)
            .map(|p| p.1.exp())
            .collect();
        let enough = (bx.len() as f64) >= (1.0 - EDGE_SHARE) * boot.len() as f64 && bx.len() >= 2;
        let ci = |mut v: Vec<f64>| {
            if !enough {
                return (None, None);
            }
            v.sort_by(f64::total_cmp);
            (Some(percentile(&v, 0.05)), Some(percentile(&v, 0.95)))
        };
        let (lo, hi) = ci(bx);
        let (llo, lhi) = ci(by);
        let p = interior(point);
        let edge = match point {
            Star::Interior(..) => None,
            Star::Below => Some("below the grid".to_string()),
            Star::Above => Some("above the grid".to_string()),
            Star::Diverged => Some("every lr diverged".to_string()),
        };
        let nearest = p.map(|(x, _)| {
            g.x.iter()
                .enumerate()
                .min_by(|a, b| (a.1 - x).abs().total_cmp(&(b.1 - x).abs()))
                .map_or(0, |(j, _)| j)
        });
        let sp = nearest.and_then(|j| spec.get(&(*k, g.lrs[j].to_bits())));
        let pick = |f: fn(&(f64, f64, f64)) -> f64| {
            sp.and_then(|v| mean_finite(&v.iter().map(f).collect::<Vec<_>>()))
        };
        let (study, width, opt, beta, init, ratio, rank) = *k;
        cells.push(OptCell {
            axis: study,
            optimizer: opt,
            beta: f64::from_bits(beta),
            init,
            lr_ratio: f64::from_bits(ratio),
            width,
            rank,
            lr_opt: p.map(|v| v.0.exp()),
            lr_opt_ci_low: lo,
            lr_opt_ci_high: hi,
            edge,
            loss_at_opt: p.map(|v| v.1.exp()),
            loss_ci_low: llo,
            loss_ci_high: lhi,
            predicted_lr: None,
            diverged_runs: g.diverged.iter().sum(),
            runs: (g.lrs.len() * seeds) as u32,
            effective_rank: pick(|t| t.0),
            stable_rank: pick(|t| t.1),
            top_share: pick(|t| t.2),
            curve: (0..g.lrs.len())
                .map(|j| {
                    let col: Vec<f64> = g.y.iter().map(|row| row[j]).collect();
                    let finite = col.iter().all(|v| v.is_finite());
                    CurvePoint {
                        lr: g.lrs[j],
                        loss: finite.then(|| (col.iter().sum::<f64>() / col.len() as f64).exp()),
                        diverged: g.diverged[j],
                    }
                })
                .collect(),
        });
    }
    // The law's line through the measured lr* of each setting along each axis.
    let mut anchor: BTreeMap<(Study, SettingKey), Vec<f64>> = BTreeMap::new();
    let skey = |c: &OptCell| (c.optimizer, c.beta.to_bits(), c.init, c.lr_ratio.to_bits());
    let ckey = |c: &OptCell| -> Key {
        (
            c.axis,
            c.width,
            c.optimizer,
            c.beta.to_bits(),
            c.init,
            c.lr_ratio.to_bits(),
            c.rank,
        )
    };
    for c in &cells {
        if let Some(lr) = c.lr_opt {
            anchor
                .entry((c.axis, skey(c)))
                .or_default()
                .push(lr.ln() - law_ln(&ckey(c)));
        }
    }
    for c in &mut cells {
        if let Some(v) = anchor.get(&(c.axis, skey(c))).filter(|_| has_law) {
            let level = v.iter().sum::<f64>() / v.len() as f64;
            c.predicted_lr = Some((law_ln(&ckey(c)) + level).exp());
        }
    }
    // Exponents: per setting along each axis.
    let mut axes: BTreeMap<(Study, SettingKey), Vec<(u32, Key)>> = BTreeMap::new();
    for k in groups.keys() {
        let (study, width, opt, beta, init, ratio, rank) = *k;
        let along = match study {
            Study::Rank => rank,
            Study::Width => width,
        };
        axes.entry((study, (opt, beta, init, ratio)))
            .or_default()
            .push((along, *k));
    }
    let mut exps = Vec::new();
    let mut loss_boot: Boot = BTreeMap::new();
    let mut x_boot: Boot = BTreeMap::new();
    for ((study, sk), mut members) in axes {
        members.sort_by_key(|m| m.0);
        let (opt, beta_bits, init, ratio_bits) = sk;
        let beta = f64::from_bits(beta_bits);
        let values: Vec<u32> = members.iter().map(|m| m.0).collect();
        let lx: Vec<f64> = values.iter().map(|&v| f64::from(v).ln()).collect();
        let per = |s: &Star| match *s {
            Star::Interior(x, y) => Some((x, y)),
            _ => None,
        };
        let point: Option<Vec<(f64, f64)>> = members.iter().map(|m| per(&stars[&m.1].0)).collect();
        let boot: Vec<Option<Vec<(f64, f64)>>> = (0..weights.len())
            .map(|b| members.iter().map(|m| per(&stars[&m.1].1[b])).collect())
            .collect();
        let slope_of = |v: &[(f64, f64)], which: usize| {
            let y: Vec<f64> = v
                .iter()
                .map(|p| if which == 0 { p.0 } else { p.1 })
                .collect();
            ols_slope(&lx, &y)
        };
        let pc = point.as_ref().map(|v| slope_of(v, 0));
        let pl = point.as_ref().map(|v| slope_of(v, 1));
        let bc: Vec<Option<f64>> = boot
            .iter()
            .map(|b| b.as_ref().map(|v| slope_of(v, 0)))
            .collect();
        let bl: Vec<Option<f64>> = boot
            .iter()
            .map(|b| b.as_ref().map(|v| slope_of(v, 1)))
            .collect();
        // The grid's resolution, carried through the least-squares slope: a rank whose lr*
        // is a grid point itself (not refined by the parabola: a diverged neighbour, or no
        // curvature) is known to a cell only, whatever the seeds say.
        let mean_x = lx.iter().sum::<f64>() / lx.len() as f64;
        let sxx: f64 = lx.iter().map(|x| (x - mean_x).powi(2)).sum();
        let quantum = cfg.grid(opt).log_step() / 12f64.sqrt();
        let floor = point.as_ref().map_or(0.0, |v| {
            v.iter()
                .zip(&members)
                .zip(&lx)
                .filter(|((p, m), _)| groups[&m.1].x.contains(&p.0))
                .map(|(_, x)| ((x - mean_x) / sxx * quantum).powi(2))
                .sum::<f64>()
                .sqrt()
        });
        let (slope, se, lo, hi) = estimate_of(pc, &bc, df, floor);
        let (lslope, _, llo, lhi) = estimate_of(pl, &bl, df, 0.0);
        loss_boot.insert(
            (study, sk),
            (
                boot.iter()
                    .map(|b| b.as_ref().map(|v| v.iter().map(|p| p.1).collect()))
                    .collect(),
                point
                    .as_ref()
                    .map(|v| v.iter().map(|p| p.1).collect())
                    .unwrap_or_default(),
            ),
        );
        x_boot.insert(
            (study, sk),
            (
                boot.iter()
                    .map(|b| b.as_ref().map(|v| v.iter().map(|p| p.0).collect()))
                    .collect(),
                point
                    .as_ref()
                    .map(|v| v.iter().map(|p| p.0).collect())
                    .unwrap_or_default(),
            ),
        );
        let ls = law_setting(opt, beta, init);
        let (mut predicted, mut first_step, limits, fixed_width, fixed_rank) = match study {
            Study::Rank => {
                let t = terms_at.get(&cfg.width).copied().unwrap_or_default();
                let ranks: Vec<usize> = values.iter().map(|&r| r as usize).collect();
                (
                    law::rank_exponent_with(law::ln_lr_long, ls, &ranks, cfg.width, &t),
                    law::rank_exponent_with(law::ln_lr_opt, ls, &ranks, cfg.width, &t),
                    Some(law::limits(opt, beta)),
                    Some(cfg.width as u32),
                    None,
                )
            }
            Study::Width => {
                let w: Vec<(usize, DataTerms)> = values
                    .iter()
                    .map(|&d| {
                        (
                            d as usize,
                            terms_at.get(&(d as usize)).copied().unwrap_or_default(),
                        )
                    })
                    .collect();
                (
                    law::width_exponent_with(law::ln_lr_long, ls, cfg.width_rank, &w),
                    law::width_exponent_with(law::ln_lr_opt, ls, cfg.width_rank, &w),
                    None,
                    None,
                    Some(cfg.width_rank as u32),
                )
            }
        };
        if !has_law {
            (predicted, first_step) = (f64::NAN, f64::NAN);
        }
        let grid = cfg.grid(opt);
        let band = leverage(&values) * ((1.0 + LR_TOLERANCE).ln() + grid.log_step() / 4.0);
        let reason = if let Some(m) = members.iter().find(|m| per(&stars[&m.1].0).is_none()) {
            let what = match stars[&m.1].0 {
                Star::Below => "below the grid: lower --lrs",
                Star::Above => "above the grid: raise --lrs",
                _ => "every lr diverged",
            };
            format!("lr* at {} {}: {what}", study, m.0)
        } else if se.is_none() {
            format!(
                "lr* reached the grid's edge in more than {:.0}% of bootstrap resamples",
                EDGE_SHARE * 100.0
            )
        } else if !has_law {
            NO_LAW.to_string()
        } else {
            String::new()
        };
        exps.push(Exponent {
            axis: study,
            optimizer: opt,
            beta,
            init,
            lr_ratio: f64::from_bits(ratio_bits),
            width: fixed_width,
            rank: fixed_rank,
            values,
            slope,
            ci_low: lo,
            ci_high: hi,
            se,
            df,
            predicted,
            first_step,
            first_step_outcome: Outcome::Inconclusive,
            limits,
            band,
            outcome: Outcome::Inconclusive,
            flat: Outcome::Inconclusive,
            reason,
            loss_slope: lslope,
            loss_slope_ci_low: llo,
            loss_slope_ci_high: lhi,
        });
    }
    judge_exponents(&mut exps);
    let findings = findings(cfg, &exps, &loss_boot, &x_boot);
    let horizon = horizon(cfg, &groups, steps);
    TransferSummary {
        model: None,
        seeds,
        bootstrap: cfg.bootstrap,
        steps: cfg.steps,
        level: 0.90,
        cells,
        exponents: exps,
        findings,
        horizon,
    }
}

fn estimate(e: &Exponent) -> Option<Estimate> {
    Some(Estimate {
        slope: e.slope?,
        se: e.se?,
        df: e.df,
    })
}

/// The claim that every exponent of `exps` is `claim(e)`, judged as a family; an exponent
/// without an estimate or a finite claim is inconclusive and not in the family.
pub fn judge_claims(exps: &[&Exponent], claim: impl Fn(&Exponent) -> f64) -> Vec<Outcome> {
    let idx: Vec<usize> = (0..exps.len())
        .filter(|&i| estimate(exps[i]).is_some() && claim(exps[i]).is_finite())
        .collect();
    let items: Vec<(Estimate, Band)> = idx
        .iter()
        .map(|&i| {
            (
                estimate(exps[i]).expect("filtered"),
                Band {
                    center: claim(exps[i]),
                    half_width: exps[i].band,
                },
            )
        })
        .collect();
    let mut out = vec![Outcome::Inconclusive; exps.len()];
    for (&i, o) in idx.iter().zip(judge_family(&items)) {
        out[i] = o;
    }
    out
}

/// Sets each exponent's outcomes against its prediction, the one-step law and c = 0.
pub fn judge_exponents(exps: &mut [Exponent]) {
    let refs: Vec<&Exponent> = exps.iter().collect();
    let pred = judge_claims(&refs, |e| e.predicted);
    let first = judge_claims(&refs, |e| e.first_step);
    let flat = judge_claims(&refs, |_| 0.0);
    for (((e, p), f), o) in exps.iter_mut().zip(pred).zip(flat).zip(first) {
        e.outcome = p;
        e.flat = f;
        e.first_step_outcome = o;
    }
}

fn setting_name(e: &Exponent) -> String {
    let scaling = if e.beta == 1.0 {
        "LoRA (alpha/r)".to_string()
    } else if e.beta == 0.5 {
        "rsLoRA (alpha/sqrt r)".to_string()
    } else {
        format!("alpha r^-{}", e.beta)
    };
    let ratio = if e.lr_ratio == 1.0 {
        String::new()
    } else {
        format!(", lr_B/lr_A = {}", e.lr_ratio)
    };
    format!("{}, {scaling}, init {}{ratio}", e.optimizer, e.init)
}

fn verdict_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Agrees => "supports",
        Outcome::Disagrees => "contradicts",
        Outcome::Inconclusive => "inconclusive",
    }
}

fn c_text(e: &Exponent) -> String {
    match (e.slope, e.ci_low, e.ci_high) {
        (Some(s), Some(l), Some(h)) => format!("c = {s:.2} [{l:.2}, {h:.2}]"),
        (Some(s), _, _) => format!("c = {s:.2} (no interval: {})", e.reason),
        _ => format!("no c: {}", e.reason),
    }
}

/// Per setting along an axis: each bootstrap resample's per-value vector (None where
/// some lr* was not located) and the point estimates.
type Boot = BTreeMap<(Study, SettingKey), (Vec<Option<Vec<f64>>>, Vec<f64>)>;

/// A bootstrap interval of the mean over ranks of a paired difference between two
/// settings' per-rank values.
fn paired_diff(
    a: &(Vec<Option<Vec<f64>>>, Vec<f64>),
    b: &(Vec<Option<Vec<f64>>>, Vec<f64>),
    df: f64,
    floor: f64,
) -> Option<(f64, f64, f64)> {
    if a.1.is_empty() || a.1.len() != b.1.len() {
        return None;
    }
    let mean_diff =
        |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p - q).sum::<f64>() / x.len() as f64;
    let point = mean_diff(&a.1, &b.1);
    let boot: Vec<Option<f64>> =
        a.0.iter()
            .zip(&b.0)
            .map(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => Some(mean_diff(x, y)),
                _ => None,
            })
            .collect();
    let (_, _, lo, hi) = estimate_of(Some(point), &boot, df, floor);
    Some((point, lo?, hi?))
}

fn findings(cfg: &TransferConfig, exps: &[Exponent], loss: &Boot, xb: &Boot) -> Vec<Finding> {
    let df = (cfg.seeds as f64 - 1.0).max(1.0);
    let rank_rows: Vec<&Exponent> = exps.iter().filter(|e| e.axis == Study::Rank).collect();
    let mut out = Vec::new();
    let ranks_text = |e: &Exponent| {
        format!(
            "{} ranks ({}..{}), {} seeds",
            e.values.len(),
            e.values.first().copied().unwrap_or(0),
            e.values.last().copied().unwrap_or(0),
            cfg.seeds
        )
    };
    // c = 0 claims.
    let flat_claims: [FlatClaim; 2] = [
        (
            "with gamma = alpha/sqrt(r) the learning rate transfers across ranks (lr* flat in r)",
            "rsLoRA, Kalajdzievski 2023 (arXiv 2312.03732), as its one-lr-for-all-ranks experiments imply",
            |e| e.beta == 0.5,
        ),
        (
            "with alpha/r and Adam the optimal learning rate is nearly rank-independent",
            "LoRA Without Regret (Thinking Machines, 2025)",
            |e| e.beta == 1.0 && e.optimizer.is_adaptive(),
        ),
    ];
    for (claim, source, applies) in flat_claims {
        let rows: Vec<&&Exponent> = rank_rows.iter().filter(|e| applies(e)).collect();
        if rows.is_empty() {
            out.push(Finding {
                claim: claim.into(),
                source: source.into(),
                setting: "-".into(),
                verdict: "not measured".into(),
                rests_on: "no setting of this study is covered by the claim".into(),
            });
        }
        for e in rows {
            out.push(Finding {
                claim: claim.into(),
                source: source.into(),
                setting: setting_name(e),
                verdict: verdict_word(e.flat).into(),
                rests_on: format!(
                    "{} against c = 0 +- {:.2}; {}",
                    c_text(e),
                    e.band,
                    ranks_text(e)
                ),
            });
        }
    }
    // muA: c is 0 or -1 depending on init and scaling.
    let minus1 = judge_claims(&rank_rows, |_| -1.0);
    for (e, m1) in rank_rows.iter().zip(minus1) {
        let v = match (e.flat, m1) {
            (Outcome::Agrees, _) | (_, Outcome::Agrees) => "supports",
            (Outcome::Disagrees, Outcome::Disagrees) => "contradicts",
            _ => "inconclusive",
        };
        let which = match (e.flat, m1) {
            (Outcome::Agrees, _) => "consistent with c = 0",
            (_, Outcome::Agrees) => "consistent with c = -1",
            (Outcome::Disagrees, Outcome::Disagrees) => "neither 0 nor -1",
            _ => "cannot tell",
        };
        out.push(Finding {
            claim: "lr* is either rank-invariant (c = 0) or scales as 1/r (c = -1), depending on the init and the scaling".into(),
            source: "muA, Chen, Villar, Hayou (arXiv 2602.06204)".into(),
            setting: setting_name(e),
            verdict: v.into(),
            rests_on: format!("{}: {which}; {}", c_text(e), ranks_text(e)),
        });
    }
    // rsLoRA: larger ranks end better once lr is tuned.
    for e in rank_rows.iter().filter(|e| e.beta == 0.5) {
        let v = match (e.loss_slope_ci_low, e.loss_slope_ci_high) {
            (_, Some(h)) if h < 0.0 => "supports",
            (Some(l), _) if l > 0.0 => "contradicts",
            _ => "inconclusive",
        };
        out.push(Finding {
            claim: "with gamma = alpha/sqrt(r) larger ranks end better (loss at lr* falls with r)"
                .into(),
            source: "rsLoRA, Kalajdzievski 2023 (arXiv 2312.03732)".into(),
            setting: setting_name(e),
            verdict: v.into(),
            rests_on: match (e.loss_slope, e.loss_slope_ci_low, e.loss_slope_ci_high) {
                (Some(s), Some(l), Some(h)) => format!(
                    "slope of ln(loss at lr*) on ln r = {s:.3} [{l:.3}, {h:.3}]; {}",
                    ranks_text(e)
                ),
                _ => format!("no interval: {}", e.reason),
            },
        });
    }
    // LoRA+: a larger lr for B lowers the loss at lr* (by at least LOSS_GAIN).
    let gain = (1.0 + LOSS_GAIN).ln();
    let mut plus = 0;
    for ((study, sk), data) in loss
        .iter()
        .filter(|((s, k), _)| *s == Study::Rank && f64::from_bits(k.3) > 1.0)
    {
        let base = (sk.0, sk.1, sk.2, 1.0f64.to_bits());
        let Some(b) = loss.get(&(*study, base)) else {
            continue;
        };
        plus += 1;
        let setting = format!(
            "{}, beta {}, init {}, lr_B/lr_A = {} vs 1",
            sk.0,
            f64::from_bits(sk.1),
            sk.2,
            f64::from_bits(sk.3)
        );
        let (v, rest) = match paired_diff(data, b, df, 0.0) {
            Some((p, lo, hi)) => (
                if hi < -gain {
                    "supports"
                } else if lo > -gain {
                    "contradicts"
                } else {
                    "inconclusive"
                },
                format!(
                    "mean over ranks of ln(loss*_ratio / loss*_1) = {p:.3} [{lo:.3}, {hi:.3}] \
                     (a gain needs < {:.3}, 1% lower)",
                    -gain
                ),
            ),
            None => (
                "inconclusive",
                "lr* not located at every rank in both settings".into(),
            ),
        };
        out.push(Finding {
            claim: "B needs a larger learning rate than A: lr_B/lr_A > 1 lowers the loss at the best lr".into(),
            source: "LoRA+, Hayou, Ghosh, Yu 2024 (arXiv 2402.12354)".into(),
            setting,
            verdict: v.into(),
            rests_on: rest,
        });
    }
    if plus == 0 {
        out.push(Finding {
            claim: "B needs a larger learning rate than A: lr_B/lr_A > 1 lowers the loss at the best lr".into(),
            source: "LoRA+, Hayou, Ghosh, Yu 2024 (arXiv 2402.12354)".into(),
            setting: "-".into(),
            verdict: "not measured".into(),
            rests_on: "the study has no lr ratio > 1 beside ratio 1: add e.g. --lr-ratio 1,16".into(),
        });
    }
    // Init[A] vs Init[B]: different optimal learning rates.
    let mut inits = 0;
    for ((study, sk), data) in xb
        .iter()
        .filter(|((s, k), _)| *s == Study::Rank && k.2 == AdapterInit::B)
    {
        let other = (sk.0, sk.1, AdapterInit::A, sk.3);
        let Some(a) = xb.get(&(*study, other)) else {
            continue;
        };
        inits += 1;
        let tol = (1.0 + LR_TOLERANCE).ln();
        // The mean over ranks of the differences of two lr*: those that are grid points
        // (not refined by the parabola) are known to a cell only.
        let grid_x: Vec<f64> = cfg.grid(sk.0).values().iter().map(|v| v.ln()).collect();
        let unrefined =
            a.1.iter()
                .chain(&data.1)
                .filter(|x| grid_x.contains(x))
                .count();
        let n = a.1.len().max(1) as f64;
        let floor = cfg.grid(sk.0).log_step() / 12f64.sqrt() * (unrefined as f64).sqrt() / n;
        let (v, rest) = match paired_diff(data, a, df, floor) {
            Some((p, lo, hi)) => (
                if lo > tol || hi < -tol {
                    "supports"
                } else if lo > -tol && hi < tol {
                    "contradicts"
                } else {
                    "inconclusive"
                },
                format!(
                    "mean over ranks of ln(lr*_B / lr*_A) = {p:.2} [{lo:.2}, {hi:.2}] (the same within +-{tol:.2})"
                ),
            ),
            None => ("inconclusive", "lr* not located at every rank under both inits".into()),
        };
        out.push(Finding {
            claim: "Init[A] (PEFT's) and Init[B] have different optimal learning rates".into(),
            source: "Hayou, Ghosh, Yu 2024, The Impact of Initialization on LoRA Finetuning Dynamics (arXiv 2406.08447)".into(),
            setting: format!(
                "{}, beta {}, lr_B/lr_A = {}, init b vs a",
                sk.0,
                f64::from_bits(sk.1),
                f64::from_bits(sk.3)
            ),
            verdict: v.into(),
            rests_on: rest,
        });
    }
    if inits == 0 {
        out.push(Finding {
            claim: "Init[A] (PEFT's) and Init[B] have different optimal learning rates".into(),
            source: "Hayou, Ghosh, Yu 2024, The Impact of Initialization on LoRA Finetuning Dynamics (arXiv 2406.08447)".into(),
            setting: "-".into(),
            verdict: "not measured".into(),
            rests_on: "the study runs one adapter init: add --adapter-init a,b".into(),
        });
    }
    out
}

fn horizon(
    cfg: &TransferConfig,
    groups: &BTreeMap<Key, Group>,
    steps: &[StepRow],
) -> Vec<HorizonRow> {
    let mut out = Vec::new();
    for s in cfg.settings() {
        let beta = s.scaling.beta();
        let members: Vec<(&Key, &Group)> = groups
            .iter()
            .filter(|(k, _)| {
                k.0 == Study::Rank
                    && k.2 == s.opt
                    && k.3 == beta.to_bits()
                    && k.4 == s.adapter_init
                    && k.5 == s.lr_ratio.to_bits()
            })
            .collect();
        let Some((_, first)) = members.first() else {
            continue;
        };
        // The grid lr with the lowest mean loss over ranks and seeds, among those where no
        // run diverged.
        let best = (0..first.lrs.len())
            .filter_map(|j| {
                let mut sum = 0.0;
                let mut n = 0.0;
                for (_, g) in &members {
                    for row in &g.y {
                        let v = *row.get(j)?;
                        if !v.is_finite() {
                            return None;
                        }
                        sum += v;
                        n += 1.0;
                    }
                }
                Some((j, sum / n))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|p| p.0);
        let Some(j) = best else { continue };
        let lr = first.lrs[j];
        let ranks: Vec<usize> = members.iter().map(|(k, _)| k.6 as usize).collect();
        let rows: Vec<&StepRow> = steps
            .iter()
            .filter(|r| {
                r.study == Study::Rank
                    && r.optimizer == s.opt
                    && r.beta == beta
                    && r.init == s.adapter_init
                    && r.lr_ratio == s.lr_ratio
                    && r.lr.to_bits() == lr.to_bits()
            })
            .collect();
        let r32: Vec<u32> = ranks.iter().map(|&r| r as u32).collect();
        let res = resolution(2.0, &r32);
        let mut first_step = None;
        for &t in cfg.measured_steps().iter().filter(|&&t| t >= 1) {
            let values: Vec<Vec<f64>> = ranks
                .iter()
                .map(|&r| {
                    (0..cfg.seeds)
                        .map(|k| {
                            rows.iter()
                                .find(|x| {
                                    x.rank as usize == r && x.trial as usize == k && x.step == t
                                })
                                .map_or(f64::NAN, |x| x.fwd_m2)
                        })
                        .collect()
                })
                .collect();
            let fit = fit_slope(&ranks, &values).filter(|f| f.slope.is_finite());
            let (slope, lo, hi) = match fit {
                Some(f) if f.se.is_finite() => {
                    let h = t90(f.df) * f.se;
                    (Some(f.slope), Some(f.slope - h), Some(f.slope + h))
                }
                Some(f) => (Some(f.slope), None, None),
                None => (None, None, None),
            };
            if t == 1 {
                first_step = slope;
            }
            let departs = match (first_step, lo, hi) {
                (Some(f), Some(l), Some(h)) => h < f - res || l > f + res,
                _ => false,
            };
            let eff: Vec<(u32, Option<f64>)> = ranks
                .iter()
                .map(|&r| {
                    let v: Vec<f64> = rows
                        .iter()
                        .filter(|x| {
                            x.rank as usize == r && x.step == t && x.effective_rank.is_finite()
                        })
                        .map(|x| x.effective_rank)
                        .collect();
                    (
                        r as u32,
                        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
                    )
                })
                .collect();
            if slope.is_none() && eff.iter().all(|e| e.1.is_none()) {
                // Nothing measured at this step (a trained model probes its own steps).
                continue;
            }
            out.push(HorizonRow {
                optimizer: s.opt,
                beta,
                init: s.adapter_init,
                lr_ratio: s.lr_ratio,
                lr,
                step: t,
                slope,
                ci_low: lo,
                ci_high: hi,
                first_step,
                departs,
                effective_rank: eff,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_handles_divergence_and_edges() {
        let x = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(locate(&x, &[f64::INFINITY; 4]), Star::Diverged);
        assert_eq!(locate(&x, &[0.5, 1.0, 2.0, f64::INFINITY]), Star::Below);
        // The right neighbour diverged: the grid point itself, not an extrapolation.
        assert_eq!(
            locate(&x, &[3.0, 2.0, 1.0, f64::INFINITY]),
            Star::Interior(2.0, 1.0)
        );
    }

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert!((percentile(&v, 0.05) - 1.2).abs() < 1e-12);
    }
}
