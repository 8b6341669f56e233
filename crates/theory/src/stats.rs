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
    if ranks.len() < 2 || values.len() != ranks.len() {
        return None;
    }
    let trials = values[0].len();
    if trials == 0 || values.iter().any(|v| v.len() != trials) {
        return None;
    }
    for v in values {
        let mean = v.iter().sum::<f64>() / trials as f64;
        if !(mean.is_finite() && mean > 0.0) {
            return None;
        }
    }
    let log_r: Vec<f64> = ranks.iter().map(|&r| (r as f64).ln()).collect();
    let slope = log_mean_slope(&log_r, values, None);
    let (se, df) = if trials >= 2 {
        let loo: Vec<f64> = (0..trials)
            .map(|k| log_mean_slope(&log_r, values, Some(k)))
            .collect();
        let m = loo.iter().sum::<f64>() / trials as f64;
        let var =
            loo.iter().map(|s| (s - m).powi(2)).sum::<f64>() * (trials - 1) as f64 / trials as f64;
        (var.sqrt(), trials - 1)
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
        ((rss / (n - 2.0) / sxx).sqrt(), ranks.len() - 2)
    } else {
        (f64::NAN, 0)
    };
    let h = if se.is_finite() {
        t_quantile(df) * se
    } else {
        f64::INFINITY
    };
    Some(SlopeFit {
        slope,
        se,
        ci_low: slope - h,
        ci_high: slope + h,
    })
}
