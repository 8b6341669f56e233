//! The one rule that sets fitted rank exponents against their claims (proofs/verdicts.md).
//! The checker (`fits.json`, the CLI's table) and the report both call [`judge_all`]; a
//! change of the rule is a change here, nowhere else.
//!
//! Each fit carries three kinds of claim, all judged on intervals with the one-sided level
//! [`ALPHA`] (two-sided 90% intervals) and the Benjamini-Hochberg procedure over the family
//! of fits (a theory run, or every training fit of a report), each kind on its own:
//!
//! * **the prediction**: `agrees` when the interval lies inside the prediction's band,
//!   `disagrees` when it lies outside, `inconclusive` otherwise (also with no law, or with
//!   too few seeds or ranks). When the law gives a value per trial, the interval is that of
//!   the paired difference (measured minus law) and the band is centred on 0.
//! * **rival laws** (the paper's coherent limit, the incoherent limit, the other
//!   optimizer's law, slope 0): a rival is rejected when the fit's interval lies outside the
//!   rival's band. A rival is *distinct* from the prediction when their bands do not touch
//!   (they differ by more than twice the band); a fit that has a distinct rival can tell
//!   the prediction from it, and only such fits count in headline counts.
//! * **stability**: stable when the interval lies inside the resolution band around 0,
//!   collapsing / exploding when it lies below / above it, undetermined otherwise.
//!
//! Bands: the resolution `p ln(1 + SCALE_TOLERANCE) * leverage(ranks)` (slopes closer than
//! this change the per-entry scale by less than 5% over the fitted ranks; `p` the moment
//! order) plus, for a prediction, `leverage(ranks) * eps` with `eps` the law's known
//! relative error ([`law_error`]).
use crate::stats::{bh_reject, leverage, p_values, Band, Estimate, SlopeFit};
use rankstab_records::{Outcome, Rival, RivalCheck, Verdict};

/// One-sided level of every decision (two-sided 90% intervals), and the false discovery
/// rate over a family.
pub const ALPHA: f64 = 0.05;

/// The scale tolerance behind a band: two rank laws whose per-entry scales (the m-th root
/// of the m-th moment) differ by less than this factor over the whole fitted range of ranks
/// are treated as the same.
pub const SCALE_TOLERANCE: f64 = 0.05;

/// Relative accuracy of the tabulated exact law (interpolation and quadrature; the tables'
/// tests bound it by 2e-4).
pub const NUMERICAL_ERROR: f64 = 2e-4;

/// The resolution part of a band for a statistic of power `p` (the moment order m; 1 for
/// norms): slopes closer than this make per-entry scales that differ by less than
/// [`SCALE_TOLERANCE`] anywhere over the fitted ranks.
///
/// ```
/// use rankstab_theory::predict::verdict::{resolution, SCALE_TOLERANCE};
/// use rankstab_theory::stats::leverage;
/// let r = [4, 16, 64, 256, 1024];
/// assert!((resolution(2.0, &r) - 2.0 * (1.0 + SCALE_TOLERANCE).ln() * leverage(&r)).abs() < 1e-15);
/// assert!(resolution(4.0, &r) > resolution(1.0, &r));
/// ```
pub fn resolution(p: f64, ranks: &[u32]) -> f64 {
    p * (1.0 + SCALE_TOLERANCE).ln() * leverage(ranks)
}

/// The half-width of a prediction's band: the resolution plus the slope error that the
/// law's relative error `eps` (at any rank) can cause.
pub fn band_half_width(p: f64, ranks: &[u32], eps: f64) -> f64 {
    resolution(p, ranks) + leverage(ranks) * eps
}

/// What makes up a law's known relative error on a statistic of power `p`
/// (proofs/verdicts.md).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LawError {
    /// The outputs' linear forms of A taken as normal under a non-normal init: the
    /// relative fourth cumulant `3 |k4 - 3| / d` per unit of power.
    pub init: f64,
    /// First order in the learning rate after step 1: the measured relative drift of the
    /// loss gradient at the adapter up to the step before (largest over the fitted ranks),
    /// plus, under Adam, A's own sign-like drift `(t - 1) lr / s`.
    pub drift: f64,
}

/// `eps` of a law (see [`LawError`]) for a statistic of power `p`.
pub fn law_error(p: f64, e: LawError) -> f64 {
    NUMERICAL_ERROR + p * (e.init + e.drift)
}

impl From<SlopeFit> for Estimate {
    fn from(f: SlopeFit) -> Self {
        Estimate {
            slope: f.slope,
            se: f.se,
            df: if f.df > 0.0 { f.df } else { f64::NAN },
        }
    }
}

/// The claims of one fit.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    /// The fitted slope.
    pub measured: Option<Estimate>,
    /// The prediction's test: the estimate it is judged on (the paired difference when the
    /// law gives values per trial, else the measured slope) and its band.
    pub test: Option<(Estimate, Band)>,
    /// The predicted slope (for the rivals' distinctness).
    pub predicted: Option<f64>,
    /// The rivals' slopes.
    pub rivals: Vec<(Rival, f64)>,
    /// Half-width of the rivals' and the stability band.
    pub resolution: f64,
    /// Whether the fit has the seeds and ranks to be judged at all (else everything is
    /// inconclusive / undetermined).
    pub judgeable: bool,
}

/// What the rule says of one fit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Judged {
    /// Against the prediction.
    pub outcome: Outcome,
    /// Stability.
    pub verdict: Verdict,
    /// Every rival with its slope, distinctness and rejection.
    pub rivals: Vec<RivalCheck>,
    /// Whether some rival is distinct from the prediction.
    pub discriminating: bool,
}

/// Outcomes of a family of (estimate, band) claims, Benjamini-Hochberg at [`ALPHA`] over the
/// family, separately for "disagrees" and "agrees" claims.
///
/// ```
/// use rankstab_theory::predict::verdict::judge_family;
/// use rankstab_theory::stats::{Band, Estimate};
/// use rankstab_records::Outcome;
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

/// Judges a family of fits (see the module docs).
///
/// ```
/// use rankstab_theory::predict::verdict::{judge_all, Claims};
/// use rankstab_theory::stats::{Band, Estimate};
/// use rankstab_records::{Outcome, Rival, Verdict};
/// let est = Estimate { slope: -2.01, se: 0.01, df: 11.0 };
/// let claims = Claims {
///     measured: Some(est),
///     test: Some((est, Band { center: -2.0, half_width: 0.05 })),
///     predicted: Some(-2.0),
///     rivals: vec![(Rival::IncoherentLimit, -3.0), (Rival::Flat, 0.0)],
///     resolution: 0.05,
///     judgeable: true,
/// };
/// let j = &judge_all(&[claims])[0];
/// assert_eq!((j.outcome, j.verdict), (Outcome::Agrees, Verdict::Collapsing));
/// assert!(j.discriminating && j.rivals.iter().all(|r| r.rejected && r.distinct));
/// ```
pub fn judge_all(items: &[Claims]) -> Vec<Judged> {
    // The prediction.
    let idx: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].judgeable && items[i].test.is_some())
        .collect();
    let tests: Vec<(Estimate, Band)> = idx.iter().filter_map(|&i| items[i].test).collect();
    let mut outcome = vec![Outcome::Inconclusive; items.len()];
    for (&i, o) in idx.iter().zip(judge_family(&tests)) {
        outcome[i] = o;
    }
    // Stability.
    let band0 = |c: &Claims| Band {
        center: 0.0,
        half_width: c.resolution,
    };
    let idx: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].judgeable && items[i].measured.is_some_and(|m| m.slope.is_finite()))
        .collect();
    let stab: Vec<(Estimate, Band)> = idx
        .iter()
        .map(|&i| (items[i].measured.expect("filtered"), band0(&items[i])))
        .collect();
    let mut verdict: Vec<Verdict> = items
        .iter()
        .map(|c| match c.measured {
            Some(m) if !m.slope.is_finite() => Verdict::Diverged,
            _ => Verdict::Undetermined,
        })
        .collect();
    for ((&i, o), (e, _)) in idx.iter().zip(judge_family(&stab)).zip(&stab) {
        verdict[i] = match o {
            Outcome::Agrees => Verdict::Stable,
            Outcome::Disagrees if e.slope < 0.0 => Verdict::Collapsing,
            Outcome::Disagrees => Verdict::Exploding,
            Outcome::Inconclusive => Verdict::Undetermined,
        };
    }
    // Rivals: rejection only (a rival is never "confirmed").
    let mut rival_tests = Vec::new();
    for (i, c) in items.iter().enumerate() {
        if let (true, Some(m)) = (c.judgeable, c.measured) {
            for (k, &(_, slope)) in c.rivals.iter().enumerate() {
                let band = Band {
                    center: slope,
                    half_width: c.resolution,
                };
                rival_tests.push((i, k, p_values(m, band).0));
            }
        }
    }
    let p: Vec<f64> = rival_tests.iter().map(|t| t.2).collect();
    let rejected = bh_reject(&p, ALPHA);
    let mut out: Vec<Judged> = items
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let half = c.test.map_or(c.resolution, |t| t.1.half_width);
            let rivals: Vec<RivalCheck> = c
                .rivals
                .iter()
                .map(|&(rival, slope)| RivalCheck {
                    rival,
                    slope,
                    distinct: c.predicted.is_some_and(|p| (slope - p).abs() > 2.0 * half),
                    rejected: false,
                })
                .collect();
            Judged {
                outcome: outcome[i],
                verdict: verdict[i],
                discriminating: rivals.iter().any(|r| r.distinct),
                rivals,
            }
        })
        .collect();
    for (&(i, k, _), r) in rival_tests.iter().zip(rejected) {
        out[i].rivals[k].rejected = r;
    }
    out
}

/// Counts over a family of judged fits: how many, with a prediction, able to discriminate
/// it from a rival, and their outcomes; how many distinct rivals were rejected. The
/// headline of the checker's table and of the report's sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Tally {
    /// Fits.
    pub fits: usize,
    /// Fits with a prediction.
    pub predicted: usize,
    /// Fits with a prediction and a rival distinct from it (the headline's fits).
    pub discriminating: usize,
    /// Among the discriminating fits: agrees.
    pub agrees: usize,
    /// Among the discriminating fits: disagrees.
    pub disagrees: usize,
    /// Among the discriminating fits: inconclusive.
    pub inconclusive: usize,
    /// Rivals distinct from their fit's prediction.
    pub rivals_distinct: usize,
    /// Of those, rejected.
    pub rivals_rejected: usize,
}

impl Tally {
    /// Counts one fit: whether it has a prediction, whether a rival is distinct from it, its
    /// outcome, and its distinct and rejected rivals.
    pub fn add(
        &mut self,
        predicted: bool,
        discriminating: bool,
        outcome: Outcome,
        rivals_distinct: usize,
        rivals_rejected: usize,
    ) {
        self.fits += 1;
        self.rivals_distinct += rivals_distinct;
        self.rivals_rejected += rivals_rejected;
        if !predicted {
            return;
        }
        self.predicted += 1;
        if !discriminating {
            return;
        }
        self.discriminating += 1;
        match outcome {
            Outcome::Agrees => self.agrees += 1,
            Outcome::Disagrees => self.disagrees += 1,
            Outcome::Inconclusive => self.inconclusive += 1,
        }
    }

    /// The headline: "of the N fits that can tell their law from a rival: a agree, d
    /// disagree, i inconclusive; x of y distinct rivals rejected (z%)".
    ///
    /// ```
    /// use rankstab_theory::predict::verdict::Tally;
    /// use rankstab_records::Outcome;
    /// let mut t = Tally::default();
    /// t.add(true, true, Outcome::Agrees, 2, 2);
    /// t.add(true, false, Outcome::Inconclusive, 0, 0);
    /// assert_eq!(t.headline(), "of the 1 fit that can tell its law from a rival: 1 agree, 0 disagree, 0 inconclusive; 2 of 2 distinct rivals rejected (100%)");
    /// ```
    pub fn headline(&self) -> String {
        let one = self.discriminating == 1;
        format!(
            "of the {} fit{} that can tell {} law from a rival: {} agree, {} disagree, {} inconclusive; \
             {} of {} distinct rivals rejected{}",
            self.discriminating,
            if one { "" } else { "s" },
            if one { "its" } else { "their" },
            self.agrees,
            self.disagrees,
            self.inconclusive,
            self.rivals_rejected,
            self.rivals_distinct,
            if self.rivals_distinct > 0 {
                format!(
                    " ({:.0}%)",
                    100.0 * self.rivals_rejected as f64 / self.rivals_distinct as f64
                )
            } else {
                String::new()
            }
        )
    }
}

/// The [`Tally`] of judged fits.
pub fn tally(fits: &[rankstab_records::Fit]) -> Tally {
    let mut t = Tally::default();
    for f in fits {
        let distinct = f.rivals.iter().filter(|r| r.distinct);
        t.add(
            f.predicted.is_finite(),
            f.discriminating,
            f.outcome,
            distinct.clone().count(),
            distinct.filter(|r| r.rejected).count(),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(slope: f64, se: f64, judgeable: bool) -> Claims {
        let e = Estimate {
            slope,
            se,
            df: 11.0,
        };
        Claims {
            measured: Some(e),
            test: Some((
                e,
                Band {
                    center: 1.0,
                    half_width: 0.1,
                },
            )),
            predicted: Some(1.0),
            rivals: vec![(Rival::Flat, 0.0), (Rival::CoherentLimit, 1.1)],
            resolution: 0.1,
            judgeable,
        }
    }

    #[test]
    fn outcomes_follow_the_interval_and_the_band() {
        let j = judge_all(&[
            claims(1.02, 0.02, true),
            claims(1.5, 0.05, true),
            claims(0.5, 0.05, true),
            claims(1.1, 0.02, true),
            claims(1.0, 1.0, true),
            claims(1.0, 0.01, false),
            claims(f64::NAN, 0.1, true),
        ]);
        let o: Vec<Outcome> = j.iter().map(|j| j.outcome).collect();
        use Outcome::*;
        assert_eq!(
            o,
            [
                Agrees,
                Disagrees,
                Disagrees,
                Inconclusive,
                Inconclusive,
                Inconclusive,
                Inconclusive
            ]
        );
        let v: Vec<Verdict> = j.iter().map(|j| j.verdict).collect();
        use Verdict::*;
        assert_eq!(
            v,
            [
                Exploding,
                Exploding,
                Exploding,
                Exploding,
                Undetermined,
                Undetermined,
                Diverged
            ]
        );
        // A rival within twice the band is not distinct; one far away is, and is rejected.
        let r = &j[0].rivals;
        assert!(r[0].distinct && r[0].rejected);
        assert!(!r[1].distinct);
        // Nothing is rejected for a fit that cannot be judged.
        assert!(j[5].rivals.iter().all(|r| !r.rejected));
    }
}
