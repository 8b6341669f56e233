//! The one rule that sets a fitted rank exponent against its prediction: the stability
//! [`Verdict`] of a slope, whether the prediction agrees with the fit, and whether the fit
//! meets the band between the law's two limits. The checker (`fits.json`) and the report
//! both call [`judge`]; a change of the rule (more outcomes, rival laws, a correction for
//! multiplicity) is a change of [`Judgement`] and [`judge`] here, nowhere else.
use super::Limits;
use crate::stats::SlopeFit;

rankstab_records::named_enum! {
    /// What a rank exponent says about the statistic as the rank grows.
    Verdict, "verdict" {
        /// Within the tolerance of 0: rank-stable.
        #[default]
        Stable => "stable",
        /// Below: the statistic vanishes with rank.
        Collapsing => "collapsing",
        /// Above: it blows up with rank.
        Exploding => "exploding",
        /// The slope is not finite (the statistic overflowed or the run diverged).
        Diverged => "diverged",
    }
}

/// Verdict for a rank exponent: within `tol` of 0 is stable.
///
/// ```
/// use rankstab_theory::predict::{verdict, Verdict};
/// assert_eq!(verdict(0.05, 0.15), Verdict::Stable);
/// assert_eq!(verdict(-1.0, 0.15), Verdict::Collapsing);
/// assert_eq!(verdict(2.0, 0.15).to_string(), "exploding");
/// assert_eq!(verdict(f64::NAN, 0.15), Verdict::Diverged);
/// ```
pub fn verdict(slope: f64, tol: f64) -> Verdict {
    if !slope.is_finite() {
        Verdict::Diverged
    } else if slope < -tol {
        Verdict::Collapsing
    } else if slope > tol {
        Verdict::Exploding
    } else {
        Verdict::Stable
    }
}

/// What the rule says of one fitted exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    /// Verdict of the fitted slope.
    pub verdict: Verdict,
    /// Verdict of the predicted slope, when there is a prediction.
    pub predicted_verdict: Option<Verdict>,
    /// Whether the prediction lies within the fit's interval widened by the tolerance (a
    /// non-finite slope agrees with nothing); `None` without a prediction.
    pub agrees: Option<bool>,
    /// Whether the widened interval meets the band between the two limits; `None` without
    /// limits or with a non-finite slope.
    pub in_band: Option<bool>,
}

/// Judges a fit against its prediction and the law's limits, `tol` in exponent units.
///
/// ```
/// use rankstab_theory::predict::{judge, Limits, Verdict};
/// use rankstab_theory::stats::SlopeFit;
/// let fit = SlopeFit { slope: -0.1, se: 0.05, ci_low: -0.2, ci_high: 0.0 };
/// let band = Limits { coherent: 0.1, incoherent: -1.0 };
/// let j = judge(&fit, Some(0.1), Some(band), 0.15);
/// assert_eq!((j.verdict, j.agrees, j.in_band), (Verdict::Stable, Some(true), Some(true)));
/// let j = judge(&fit, Some(1.0), None, 0.15);
/// assert_eq!((j.predicted_verdict, j.agrees, j.in_band), (Some(Verdict::Exploding), Some(false), None));
/// ```
pub fn judge(
    fit: &SlopeFit,
    predicted: Option<f64>,
    limits: Option<Limits>,
    tol: f64,
) -> Judgement {
    let finite = fit.slope.is_finite();
    Judgement {
        verdict: verdict(fit.slope, tol),
        predicted_verdict: predicted.map(|p| verdict(p, tol)),
        agrees: predicted.map(|p| finite && p >= fit.ci_low - tol && p <= fit.ci_high + tol),
        in_band: limits.filter(|_| finite).map(|l| {
            let (lo, hi) = (l.coherent.min(l.incoherent), l.coherent.max(l.incoherent));
            fit.ci_high + tol >= lo && fit.ci_low - tol <= hi
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(slope: f64) -> SlopeFit {
        SlopeFit {
            slope,
            se: 0.05,
            ci_low: -0.2,
            ci_high: 0.0,
        }
    }

    #[test]
    fn verdicts_and_agreement_use_the_tolerance() {
        let band = |a, b| {
            Some(Limits {
                coherent: a,
                incoherent: b,
            })
        };
        let j = judge(&fit(-0.1), Some(0.1), band(0.1, -1.0), 0.15);
        assert_eq!(j.verdict, Verdict::Stable);
        assert_eq!(j.agrees, Some(true));
        assert_eq!(j.in_band, Some(true));
        let j = judge(&fit(-0.1), Some(1.0), band(1.0, 0.5), 0.15);
        assert_eq!(j.agrees, Some(false));
        assert_eq!(j.in_band, Some(false));
        assert_eq!(j.predicted_verdict, Some(Verdict::Exploding));
        let j = judge(&fit(f64::NAN), Some(0.1), band(0.1, -1.0), 0.15);
        assert_eq!(j.verdict, Verdict::Diverged);
        assert_eq!(j.agrees, Some(false));
        assert_eq!(j.in_band, None);
        // Without a prediction: a verdict, nothing else.
        let j = judge(&fit(-0.1), None, None, 0.15);
        assert_eq!(
            (j.predicted_verdict, j.agrees, j.in_band),
            (None, None, None)
        );
        // A non-finite prediction agrees with nothing.
        let j = judge(&fit(-0.1), Some(f64::NAN), None, 0.15);
        assert_eq!(
            (j.predicted_verdict, j.agrees),
            (Some(Verdict::Diverged), Some(false))
        );
    }
}
