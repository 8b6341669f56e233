//! Verdicts that can be wrong (proofs/verdicts.md): three outcomes from intervals, bands
//! derived from the moment order, the fitted ranks and the law's known error, rival laws,
//! and Benjamini-Hochberg control of the false discovery rate over a family of fits.
//!
//! A fit's estimate (slope, standard error, degrees of freedom) is judged against a claim:
//! a value with a band. With the one-sided level `alpha` (0.05: the two-sided 90% interval)
//! * `agrees` when the interval lies inside the band (two one-sided tests, TOST),
//! * `disagrees` when it lies outside (the one-sided test at the band's nearer edge),
//! * `inconclusive` otherwise.
//!
//! Over a family of fits (a theory run, a report), each kind of claim is made only where
//! the Benjamini-Hochberg procedure at `alpha` accepts it among all fits of the family: of
//! all "disagrees" said, at most 5% are expected to be wrong, and likewise of all "agrees".
use statrs::distribution::{ContinuousCDF, StudentsT};

/// One-sided level of every decision (two-sided 90% intervals), and the false discovery
/// rate over a family.
pub const ALPHA: f64 = 0.05;

/// The scale tolerance behind a band: two rank laws whose per-entry scales (the m-th root
/// of the m-th moment) differ by less than this factor over the whole fitted range of ranks
/// are treated as the same.
pub const SCALE_TOLERANCE: f64 = 0.05;

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

rankstab_records::named_enum! {
    /// How a fit stands against a claim.
    Outcome, "outcome" {
        /// The interval lies inside the claim's band.
        Agrees => "agrees",
        /// The interval lies outside the claim's band.
        Disagrees => "disagrees",
        /// Neither (or too few seeds and ranks to say).
        #[default]
        Inconclusive => "inconclusive",
    }
}

/// The p-values of an estimate against a band: `outside` for the claim that the slope lies
/// outside the band (small: evidence of disagreement), `inside` for the claim that it lies
/// inside (TOST; small: evidence of agreement). NaN estimates give 1 for both.
///
/// ```
/// use rankstab_theory::judge::{p_values, Band, Estimate};
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
    if df.is_infinite() {
        return 0.5 * statrs::function::erf::erfc(x / std::f64::consts::SQRT_2);
    }
    StudentsT::new(0.0, 1.0, df.max(1e-9)).map_or(0.5, |t| 1.0 - t.cdf(x))
}

/// The Benjamini-Hochberg procedure at level `q`: which of the hypotheses with p-values
/// `p` are rejected (the discoveries), controlling the false discovery rate.
///
/// ```
/// let r = rankstab_theory::judge::bh_reject(&[0.001, 0.2, 0.02, 0.9], 0.05);
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

/// Outcomes of a family of (estimate, band) claims, with Benjamini-Hochberg at [`ALPHA`]
/// over the family, separately for the "disagrees" and the "agrees" claims.
///
/// ```
/// use rankstab_theory::judge::{judge_family, Band, Estimate, Outcome};
/// let b = Band { center: 0.0, half_width: 0.05 };
/// let out = judge_family(&[
///     (Estimate { slope: 0.0, se: 0.01, df: 11.0 }, b),
///     (Estimate { slope: 0.8, se: 0.01, df: 11.0 }, b),
///     (Estimate { slope: 0.05, se: 0.3, df: 11.0 }, b),
/// ]);
/// assert_eq!(out, vec![Outcome::Agrees, Outcome::Disagrees, Outcome::Inconclusive]);
/// ```
pub fn judge_family(items: &[(Estimate, Band)]) -> Vec<Outcome> {
    let (outside, inside): (Vec<f64>, Vec<f64>) =
        items.iter().map(|&(e, b)| p_values(e, b)).unzip();
    let dis = bh_reject(&outside, ALPHA);
    let agr = bh_reject(&inside, ALPHA);
    dis.iter()
        .zip(&agr)
        .map(|(&d, &a)| match (d, a) {
            (true, _) => Outcome::Disagrees,
            (false, true) => Outcome::Agrees,
            (false, false) => Outcome::Inconclusive,
        })
        .collect()
}

/// `sum |x_i - mean| / sum (x_i - mean)^2` over `x = ln r`: the largest change of a
/// least-squares slope when every log value moves by at most 1. A relative error `e` of a
/// law's level at every rank moves its slope by at most `leverage * e`.
///
/// ```
/// // Two ranks: the slope moves by 2 e / ln(r2 / r1).
/// let l = rankstab_theory::judge::leverage(&[4, 64]);
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

/// The resolution part of a band for a statistic of power `p` (the moment order m; 1 for
/// norms): slopes closer than this make per-entry scales that differ by less than
/// [`SCALE_TOLERANCE`] anywhere over the fitted ranks, `p ln(1 + tol) * leverage`.
///
/// ```
/// use rankstab_theory::judge::{resolution, leverage, SCALE_TOLERANCE};
/// let r = [4, 16, 64, 256, 1024];
/// assert!((resolution(2.0, &r) - 2.0 * (1.0 + SCALE_TOLERANCE).ln() * leverage(&r)).abs() < 1e-15);
/// assert!(resolution(4.0, &r) > resolution(1.0, &r));
/// ```
pub fn resolution(p: f64, ranks: &[u32]) -> f64 {
    p * (1.0 + SCALE_TOLERANCE).ln() * leverage(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn outcomes_follow_the_interval_and_the_band() {
        let b = Band {
            center: 1.0,
            half_width: 0.1,
        };
        let e = |slope, se| Estimate {
            slope,
            se,
            df: f64::INFINITY,
        };
        // Interval inside the band.
        assert_eq!(judge_family(&[(e(1.02, 0.02), b)]), vec![Outcome::Agrees]);
        // Interval outside, on either side.
        assert_eq!(judge_family(&[(e(1.5, 0.05), b)]), vec![Outcome::Disagrees]);
        assert_eq!(judge_family(&[(e(0.5, 0.05), b)]), vec![Outcome::Disagrees]);
        // Straddling an edge, or too wide.
        assert_eq!(
            judge_family(&[(e(1.1, 0.02), b)]),
            vec![Outcome::Inconclusive]
        );
        assert_eq!(
            judge_family(&[(e(1.0, 1.0), b)]),
            vec![Outcome::Inconclusive]
        );
        // A non-finite slope says nothing.
        assert_eq!(
            judge_family(&[(e(f64::NAN, 0.1), b)]),
            vec![Outcome::Inconclusive]
        );
    }
}
