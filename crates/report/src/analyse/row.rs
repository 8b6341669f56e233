//! One fitted rank exponent as the report shows it, theory and training alike
//! ([`ExponentRow`], also a line of `exponents.csv`), and the counts the page's headlines
//! give ([`tally_rows`]). What the rule says of a fit (outcome, stability, rivals) is asked of
//! `rankstab_theory::predict::verdict` and applied with [`ExponentRow::judged`]; nothing is
//! decided here.
use rankstab_records::{
    Layer, Optimizer, Outcome, RivalCheck, Scaling, Site, Stat, Verdict, Window,
};
use rankstab_theory::predict::verdict::Tally;
use rankstab_theory::predict::Judged;
use serde::Serialize;

/// One fitted rank exponent as the report shows it (theory and training alike). The axis
/// columns are typed; they serialise with the vocabulary's spellings ("step 3", "all",
/// "rslora", "agrees", ...). Rivals are flattened into text and counts, so that the row is
/// one CSV line.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ExponentRow {
    /// theory or train.
    pub source: String,
    /// Run id (theory) or "merged" (training).
    pub run: String,
    /// Model.
    pub model: String,
    /// Module ("adapter" in theory runs; "all" when pooled over modules).
    pub module: String,
    /// Layer index, or all when pooled over layers.
    pub layer: Layer,
    /// Step window ("step 3", "steps 10-50").
    pub window: Window,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling.
    pub scaling: Scaling,
    /// Scaling exponent.
    pub beta: f64,
    /// Learning rate of the runs (training; empty when not recorded or for theory runs).
    pub lr: String,
    /// Input regime (theory) or data set (training).
    pub inputs: String,
    /// Site.
    pub site: Site,
    /// Statistic.
    pub stat: Stat,
    /// Moment order (1 for norms).
    pub m: u32,
    /// Ranks fitted, comma-separated.
    pub ranks: String,
    /// Seeds (trials) per rank behind the fit.
    pub seeds: u32,
    /// Fitted slope of log statistic against log rank.
    pub slope: f64,
    /// Its standard error.
    pub se: f64,
    /// 95% interval, lower end.
    pub ci_low: f64,
    /// 95% interval, upper end.
    pub ci_high: f64,
    /// Which law gave `predicted` ("exact first step", ...), or "none: " and why it has none.
    pub law: String,
    /// The law's slope over the fitted ranks, when a law applies.
    pub predicted: Option<f64>,
    /// Half-width of the prediction's band, when there is a prediction.
    pub band: Option<f64>,
    /// Paired difference of the slopes, measured minus law, when the law gives a value per
    /// seed (the band is then centred on 0).
    pub diff: Option<f64>,
    /// Lower end of the difference's 95% interval.
    pub diff_ci_low: Option<f64>,
    /// Upper end of the difference's 95% interval.
    pub diff_ci_high: Option<f64>,
    /// agrees, disagrees or inconclusive (Benjamini-Hochberg over the row's family).
    pub outcome: Outcome,
    /// stable, collapsing, exploding, undetermined or diverged (interval against the
    /// resolution band around 0).
    pub verdict: Verdict,
    /// Whether some rival is distinct from the prediction (only such rows count in the
    /// headlines).
    pub discriminating: bool,
    /// The rival laws: "coherent_limit +0.00 rejected (not distinct); flat +0.00 kept; ...".
    pub rivals: String,
    /// Rivals distinct from the prediction.
    pub rivals_distinct: u32,
    /// Of those, the rejected ones.
    pub rivals_rejected: u32,
    /// Monte Carlo slope of the matching setting, coherent inputs (training rows).
    pub mc_coherent: Option<f64>,
    /// Monte Carlo slope of the matching setting, fresh inputs (training rows).
    pub mc_fresh: Option<f64>,
}

impl ExponentRow {
    /// The row with what the rule said of it: outcome, stability and the rivals (as text and
    /// counts).
    pub fn judged(self, j: Judged) -> Self {
        let distinct = j.rivals.iter().filter(|r| r.distinct).count();
        let rejected = j.rivals.iter().filter(|r| r.distinct && r.rejected).count();
        Self {
            outcome: j.outcome,
            verdict: j.verdict,
            discriminating: j.discriminating,
            rivals: rivals_text(&j.rivals),
            rivals_distinct: distinct as u32,
            rivals_rejected: rejected as u32,
            ..self
        }
    }
}

/// The rivals as one cell: "incoherent_limit -1.00 rejected; flat +0.00 kept (not distinct)".
fn rivals_text(rivals: &[RivalCheck]) -> String {
    rivals
        .iter()
        .map(|r| {
            format!(
                "{} {:+.2} {}{}",
                r.rival,
                r.slope,
                if r.rejected { "rejected" } else { "kept" },
                if r.distinct { "" } else { " (not distinct)" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The headline counts of a family of rows (only fits that can tell their prediction from a
/// rival count in the outcomes), by the rule's [`Tally`].
pub fn tally_rows(rows: &[ExponentRow]) -> Tally {
    let mut t = Tally::default();
    for r in rows {
        t.add(
            r.predicted.is_some(),
            r.discriminating,
            r.outcome,
            r.rivals_distinct as usize,
            r.rivals_rejected as usize,
        );
    }
    t
}

/// A number of the CSV as an option: `None` when not finite (NaN marks "none" in `Fit`).
pub(super) fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Ranks as the tables write them: "4,8,16".
pub(super) fn fmt_ranks(ranks: &[u32]) -> String {
    ranks
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankstab_records::Rival;

    fn judged(outcome: Outcome, rivals: Vec<RivalCheck>) -> Judged {
        Judged {
            outcome,
            verdict: Verdict::Stable,
            discriminating: rivals.iter().any(|r| r.distinct),
            rivals,
        }
    }

    fn check(rival: Rival, slope: f64, distinct: bool, rejected: bool) -> RivalCheck {
        RivalCheck {
            rival,
            slope,
            distinct,
            rejected,
        }
    }

    #[test]
    fn rows_take_the_rule_s_outcome_and_rivals() {
        let base = ExponentRow {
            source: "train".into(),
            predicted: Some(0.0),
            ..ExponentRow::default()
        };
        let r = base.clone().judged(judged(
            Outcome::Agrees,
            vec![
                check(Rival::CoherentLimit, 0.0, false, false),
                check(Rival::IncoherentLimit, -1.0, true, true),
                check(Rival::OtherOptimizer, 1.0, true, false),
                check(Rival::Flat, 0.0, false, false),
            ],
        ));
        assert_eq!((r.outcome, r.verdict), (Outcome::Agrees, Verdict::Stable));
        assert!(r.discriminating);
        assert_eq!((r.rivals_distinct, r.rivals_rejected), (2, 1));
        assert_eq!(
            r.rivals,
            "coherent_limit +0.00 kept (not distinct); incoherent_limit -1.00 rejected; \
             other_optimizer +1.00 kept; flat +0.00 kept (not distinct)"
        );
        // A rejected rival that is not distinct is not counted as rejected.
        let r2 = base.clone().judged(judged(
            Outcome::Disagrees,
            vec![check(Rival::Flat, 0.0, false, true)],
        ));
        assert_eq!((r2.rivals_distinct, r2.rivals_rejected), (0, 0));
        assert!(!r2.discriminating);
        // Counts: only discriminating rows with a prediction count in the outcomes.
        let none = ExponentRow {
            predicted: None,
            ..r.clone()
        };
        let c = tally_rows(&[r.clone(), r2, none]);
        assert_eq!(
            c,
            Tally {
                fits: 3,
                predicted: 2,
                discriminating: 1,
                agrees: 1,
                disagrees: 0,
                inconclusive: 0,
                rivals_distinct: 4,
                rivals_rejected: 2,
            }
        );
        assert_eq!(
            c.headline(),
            "of the 1 fit that can tell its law from a rival: 1 agree, 0 disagree, 0 inconclusive; \
             2 of 4 distinct rivals rejected (50%)"
        );
    }

    #[test]
    fn typed_columns_keep_their_spellings_in_the_csv() {
        let row = ExponentRow {
            layer: Layer::All,
            window: Window { lo: 10, hi: 50 },
            optimizer: Optimizer::SgdMomentum,
            scaling: Scaling::RSLORA,
            site: Site::FwdHeldout,
            stat: Stat::GradNormB,
            outcome: Outcome::Disagrees,
            verdict: Verdict::Collapsing,
            ..ExponentRow::default()
        };
        let mut w = csv::Writer::from_writer(Vec::new());
        w.serialize(&row).expect("row");
        let text = String::from_utf8(w.into_inner().expect("flush")).expect("utf-8");
        let mut lines = text.lines();
        let header = lines.next().expect("a header");
        let line = lines.next().expect("a row");
        for cell in [
            "all",
            "steps 10-50",
            "sgd-momentum",
            "rslora",
            "fwd_heldout",
            "grad_norm_b",
            "disagrees",
            "collapsing",
        ] {
            assert!(line.split(',').any(|c| c == cell), "{cell} not in {line}");
        }
        // The rule's columns, none of the old ones; options empty when absent.
        for col in [
            "law",
            "predicted",
            "band",
            "diff",
            "diff_ci_low",
            "diff_ci_high",
            "outcome",
            "verdict",
            "discriminating",
            "rivals",
            "rivals_distinct",
            "rivals_rejected",
        ] {
            assert!(header.split(',').any(|c| c == col), "{col} not in {header}");
        }
        for old in ["agrees", "in_band", "predicted_verdict", "coherent_limit"] {
            assert!(!header.split(',').any(|c| c == old), "{old} in {header}");
        }
        assert!(
            line.ends_with(",disagrees,collapsing,false,,0,0,,"),
            "{line}"
        );
    }
}
