//! Statistics: trial means with t-intervals, log-log slopes with jackknife intervals. Pure
//! functions, no I/O. (Verdicts are part of the rule, [`crate::predict::judge`].)
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Two-sided 95% Student-t quantile with `df` degrees of freedom (infinite for df = 0).
pub fn t_quantile(df: usize) -> f64 {
    if df == 0 {
        return f64::INFINITY;
    }
    StudentsT::new(0.0, 1.0, df as f64).map_or(f64::INFINITY, |t| t.inverse_cdf(0.975))
}

/// Mean, standard error and 95% t-interval of independent samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanCi {
    /// Sample mean.
    pub mean: f64,
    /// Standard error of the mean (NaN for one sample).
    pub se: f64,
    /// Lower end of the 95% interval.
    pub low: f64,
    /// Upper end of the 95% interval.
    pub high: f64,
}

/// Mean with a t-based 95% confidence interval.
///
/// ```
/// let ci = rankstab_theory::stats::mean_ci(&[1.0, 2.0, 3.0]);
/// assert_eq!(ci.mean, 2.0);
/// assert!((ci.high - (2.0 + 4.302652729911275 / 3f64.sqrt())).abs() < 1e-9);
/// ```
pub fn mean_ci(x: &[f64]) -> MeanCi {
    let n = x.len();
    let mean = x.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return MeanCi {
            mean,
            se: f64::NAN,
            low: f64::NEG_INFINITY,
            high: f64::INFINITY,
        };
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (var / n as f64).sqrt();
    let h = t_quantile(n - 1) * se;
    MeanCi {
        mean,
        se,
        low: mean - h,
        high: mean + h,
    }
}

/// Ordinary least-squares slope of y on x.
///
/// ```
/// let s = rankstab_theory::stats::ols_slope(&[0.0, 1.0, 2.0], &[1.0, 3.0, 5.0]);
/// assert!((s - 2.0).abs() < 1e-12);
/// ```
pub fn ols_slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    sxy / sxx
}

/// A fitted rank exponent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlopeFit {
    /// Slope of log(mean over trials) against log(rank).
    pub slope: f64,
    /// Standard error (jackknife over trials; OLS residuals when there is one trial).
    pub se: f64,
    /// 95% interval.
    pub ci_low: f64,
    /// 95% interval.
    pub ci_high: f64,
    /// Degrees of freedom of the interval's t reference (trials - 1 for the jackknife,
    /// ranks - 2 for residuals, 0 when there is no interval).
    pub df: f64,
}

impl SlopeFit {
    /// A fit with no interval (non-finite slope, or nothing to estimate its error from).
    pub fn without_interval(slope: f64) -> Self {
        SlopeFit {
            slope,
            se: f64::NAN,
            ci_low: f64::NAN,
            ci_high: f64::NAN,
            df: 0.0,
        }
    }

    /// With the interval of standard error `se` on `df` degrees of freedom.
    fn with_se(slope: f64, se: f64, df: usize) -> Self {
        let h = if se.is_finite() {
            t_quantile(df) * se
        } else {
            f64::INFINITY
        };
        SlopeFit {
            slope,
            se,
            ci_low: slope - h,
            ci_high: slope + h,
            df: df as f64,
        }
    }
}

/// The jackknife over `trials` of a statistic computed with trial `k` left out (`stat(None)`
/// uses every trial): its standard error.
fn jackknife_se(trials: usize, stat: impl Fn(Option<usize>) -> f64) -> f64 {
    let loo: Vec<f64> = (0..trials).map(|k| stat(Some(k))).collect();
    let m = loo.iter().sum::<f64>() / trials as f64;
    let var =
        loo.iter().map(|s| (s - m).powi(2)).sum::<f64>() * (trials - 1) as f64 / trials as f64;
    var.sqrt()
}

/// Every rank has the same trials, each mean positive and finite.
fn fittable(ranks: &[usize], values: &[Vec<f64>]) -> Option<usize> {
    if ranks.len() < 2 || values.len() != ranks.len() {
        return None;
    }
    let trials = values[0].len();
    if trials == 0 || values.iter().any(|v| v.len() != trials) {
        return None;
    }
    values
        .iter()
        .all(|v| {
            let mean = v.iter().sum::<f64>() / trials as f64;
            mean.is_finite() && mean > 0.0
        })
        .then_some(trials)
}

/// The slope of log E[a] minus that of log E[b] against log rank, with a jackknife interval
/// over the trials, which pair a and b (and the ranks): `a[i][k]` and `b[i][k]` are measured
/// on the same data of trial k at `ranks[i]`. Used for the Monte Carlo against the exact
/// law, whose per-trial values differ from the Monte Carlo's only by A's randomness.
/// `None` as for [`fit_slope`], or with fewer than two trials.
///
/// ```
/// use rankstab_theory::stats::fit_slope_diff;
/// let ranks = [4usize, 16, 64];
/// // b = r^-1 times a trial factor; a = b with a 2% wobble: the difference is near 0.
/// let b: Vec<Vec<f64>> = ranks.iter().map(|&r| [1.0, 2.0, 0.5, 1.5].iter().map(|c| c / r as f64).collect()).collect();
/// let a: Vec<Vec<f64>> = b.iter().enumerate().map(|(i, v)| v.iter().enumerate().map(|(k, x)| x * (1.0 + 0.02 * ((i + k) % 3) as f64 - 0.02)).collect()).collect();
/// let d = fit_slope_diff(&ranks, &a, &b).unwrap();
/// assert!(d.slope.abs() < 0.02 && d.ci_low < d.slope && d.slope < d.ci_high);
/// ```
pub fn fit_slope_diff(ranks: &[usize], a: &[Vec<f64>], b: &[Vec<f64>]) -> Option<SlopeFit> {
    let trials = fittable(ranks, a)?;
    if fittable(ranks, b)? != trials || trials < 2 {
        return None;
    }
    let log_r: Vec<f64> = ranks.iter().map(|&r| (r as f64).ln()).collect();
    let diff = |skip| log_mean_slope(&log_r, a, skip) - log_mean_slope(&log_r, b, skip);
    Some(SlopeFit::with_se(
        diff(None),
        jackknife_se(trials, diff),
        trials - 1,
    ))
}

fn log_mean_slope(log_r: &[f64], values: &[Vec<f64>], skip: Option<usize>) -> f64 {
    let y: Vec<f64> = values
        .iter()
        .map(|trials| {
            let (s, n) = trials
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != skip)
                .fold((0.0, 0usize), |(s, n), (_, v)| (s + v, n + 1));
            (s / n as f64).ln()
        })
        .collect();
    ols_slope(log_r, &y)
}

/// Fits the slope of log E[value] against log rank. `values[i][k]` is the value at
/// `ranks[i]` in trial k (every rank has the same trials, so trials are paired across ranks
/// and the jackknife over trials accounts for that). Returns `None` when a mean is not
/// positive and finite (nothing to take the log of) or fewer than two ranks are given.
///
/// ```
/// use rankstab_theory::stats::fit_slope;
/// // value = r^-0.5 exactly, three trials with multiplicative noise shared across ranks.
/// let ranks = [4usize, 16, 64];
/// let values: Vec<Vec<f64>> = ranks.iter().map(|&r| vec![1.0, 1.1, 0.9].into_iter().map(|c| c * (r as f64).powf(-0.5)).collect()).collect();
/// let fit = fit_slope(&ranks, &values).unwrap();
/// assert!((fit.slope + 0.5).abs() < 1e-12 && fit.ci_low <= -0.5 && fit.ci_high >= -0.5);
/// ```
pub fn fit_slope(ranks: &[usize], values: &[Vec<f64>]) -> Option<SlopeFit> {
    let trials = fittable(ranks, values)?;
    let log_r: Vec<f64> = ranks.iter().map(|&r| (r as f64).ln()).collect();
    let slope = log_mean_slope(&log_r, values, None);
    if trials >= 2 {
        let se = jackknife_se(trials, |skip| log_mean_slope(&log_r, values, skip));
        Some(SlopeFit::with_se(slope, se, trials - 1))
    } else if ranks.len() >= 3 {
        let y: Vec<f64> = values.iter().map(|v| v[0].ln()).collect();
        let n = log_r.len() as f64;
        let mx = log_r.iter().sum::<f64>() / n;
        let my = y.iter().sum::<f64>() / n;
        let intercept = my - slope * mx;
        let rss: f64 = log_r
            .iter()
            .zip(&y)
            .map(|(x, y)| (y - intercept - slope * x).powi(2))
            .sum();
        let sxx: f64 = log_r.iter().map(|x| (x - mx).powi(2)).sum();
        let se = (rss / (n - 2.0) / sxx).sqrt();
        Some(SlopeFit::with_se(slope, se, ranks.len() - 2))
    } else {
        Some(SlopeFit::with_se(slope, f64::NAN, 0))
    }
}

/// An estimated slope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Point estimate.
    pub slope: f64,
    /// Standard error.
    pub se: f64,
    /// Degrees of freedom of its t reference (infinite: normal).
    pub df: f64,
}

/// A claimed value with the half-width of its band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    /// The claimed slope.
    pub center: f64,
    /// Half-width.
    pub half_width: f64,
}

/// The p-values of an estimate against a band: `outside` for the claim that the slope lies
/// outside the band (small: evidence of disagreement), `inside` for the claim that it lies
/// inside (TOST; small: evidence of agreement). NaN estimates give 1 for both.
///
/// ```
/// use rankstab_theory::stats::{p_values, Band, Estimate};
/// let band = Band { center: 0.0, half_width: 0.1 };
/// let far = p_values(Estimate { slope: 1.0, se: 0.05, df: 10.0 }, band);
/// assert!(far.0 < 1e-6 && far.1 > 0.99);
/// let near = p_values(Estimate { slope: 0.01, se: 0.02, df: 10.0 }, band);
/// assert!(near.1 < 0.01 && near.0 > 0.99);
/// ```
pub fn p_values(est: Estimate, band: Band) -> (f64, f64) {
    if !(est.slope.is_finite() && est.se.is_finite()) || est.se < 0.0 {
        return (1.0, 1.0);
    }
    let (lo, hi) = (band.center - band.half_width, band.center + band.half_width);
    if est.se == 0.0 {
        let inside = est.slope >= lo && est.slope <= hi;
        return if inside { (1.0, 0.0) } else { (0.0, 1.0) };
    }
    let sf = |x: f64| upper_tail(x, est.df);
    let (z_lo, z_hi) = ((est.slope - lo) / est.se, (est.slope - hi) / est.se);
    // Outside: on the side of the estimate, the slope beyond the nearer edge.
    let outside = if est.slope > band.center {
        sf(z_hi)
    } else {
        sf(-z_lo)
    };
    // Inside: both one-sided tests (slope > lo and slope < hi).
    let inside = sf(z_lo).max(sf(-z_hi));
    (outside, inside)
}

/// `P(T > x)` for Student's t with `df` degrees of freedom (normal when infinite).
fn upper_tail(x: f64, df: f64) -> f64 {
    // statrs's regularised beta panics for arguments that round to the ends of its range
    // (a standard error of 1e-15 puts x near 1e14): the tail there is 0 or 1 to machine
    // precision whatever df is.
    if x.is_nan() {
        return 0.5;
    }
    if x.abs() > 1e6 {
        return if x > 0.0 { 0.0 } else { 1.0 };
    }
    if df.is_infinite() {
        return 0.5 * statrs::function::erf::erfc(x / std::f64::consts::SQRT_2);
    }
    StudentsT::new(0.0, 1.0, df.max(1e-9)).map_or(0.5, |t| 1.0 - t.cdf(x))
}

/// The Benjamini-Hochberg procedure at level `q`: which of the hypotheses with p-values
/// `p` are rejected (the discoveries), controlling the false discovery rate.
///
/// ```
/// let r = rankstab_theory::stats::bh_reject(&[0.001, 0.2, 0.02, 0.9], 0.05);
/// assert_eq!(r, vec![true, false, true, false]);
/// ```
pub fn bh_reject(p: &[f64], q: f64) -> Vec<bool> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut k = 0;
    for (rank, &i) in order.iter().enumerate() {
        if p[i] <= q * (rank + 1) as f64 / m as f64 {
            k = rank + 1;
        }
    }
    let mut out = vec![false; m];
    for &i in &order[..k] {
        out[i] = true;
    }
    out
}

/// `sum |x_i - mean| / sum (x_i - mean)^2` over `x = ln r`: the largest change of a
/// least-squares slope when every log value moves by at most 1. A relative error `e` of a
/// law's level at every rank moves its slope by at most `leverage * e`.
///
/// ```
/// // Two ranks: the slope moves by 2 e / ln(r2 / r1).
/// let l = rankstab_theory::stats::leverage(&[4, 64]);
/// assert!((l - 2.0 / 16f64.ln()).abs() < 1e-12);
/// ```
pub fn leverage(ranks: &[u32]) -> f64 {
    let x: Vec<f64> = ranks.iter().map(|&r| f64::from(r).ln()).collect();
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let sxx: f64 = x.iter().map(|v| (v - mean).powi(2)).sum();
    let sad: f64 = x.iter().map(|v| (v - mean).abs()).sum();
    if sxx > 0.0 {
        sad / sxx
    } else {
        f64::INFINITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_of_huge_statistics_do_not_panic() {
        let est = Estimate {
            slope: 0.7,
            se: 1e-16,
            df: 5.0,
        };
        let (outside, inside) = p_values(
            est,
            Band {
                center: 0.0,
                half_width: 0.1,
            },
        );
        assert_eq!((outside, inside), (0.0, 1.0));
        let (outside, inside) = p_values(
            est,
            Band {
                center: 0.7,
                half_width: 0.1,
            },
        );
        assert_eq!((outside, inside), (1.0, 0.0));
    }

    #[test]
    fn bh_controls_what_it_should() {
        // All nulls true (uniform p-values): rarely any discovery.
        let p: Vec<f64> = (1..=200).map(|k| k as f64 / 201.0).collect();
        assert!(bh_reject(&p, 0.05).iter().all(|&r| !r));
        // Tiny p-values are discovered whatever their position.
        let mut p = p;
        p[7] = 1e-9;
        p[150] = 1e-8;
        let r = bh_reject(&p, 0.05);
        assert!(r[7] && r[150]);
        assert_eq!(r.iter().filter(|&&x| x).count(), 2);
    }
}
