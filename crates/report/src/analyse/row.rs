//! One fitted rank exponent as the report shows it, theory and training alike
//! ([`ExponentRow`], also a line of `exponents.csv`). Its prediction and its verdicts are
//! asked of `rankstab_theory::predict` ([`ExponentRow::judged`]), never computed here.
use rankstab_records::{Layer, Optimizer, Scaling, Site, Stat, Window};
use rankstab_theory::predict::{judge, Prediction, Verdict};
use rankstab_theory::stats::SlopeFit;
use serde::Serialize;

/// One fitted rank exponent as the report shows it (theory and training alike). The axis
/// columns are typed; they serialise with the vocabulary's spellings ("step 3", "all",
/// "rslora", ...).
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
    /// Predicted slope over the fitted ranks, when a law applies.
    pub predicted: Option<f64>,
    /// Which law gave `predicted`.
    pub law: String,
    /// Large-rank limit with coherent inputs (the paper's law).
    pub coherent_limit: Option<f64>,
    /// Limit with incoherent inputs (the fluctuation term alone).
    pub incoherent_limit: Option<f64>,
    /// Monte Carlo slope of the matching setting, coherent inputs (training rows).
    pub mc_coherent: Option<f64>,
    /// Monte Carlo slope of the matching setting, fresh inputs (training rows).
    pub mc_fresh: Option<f64>,
    /// stable, collapsing, exploding or diverged (from the fitted slope).
    pub verdict: Verdict,
    /// Verdict implied by the prediction (empty without one).
    pub predicted_verdict: Option<Verdict>,
    /// Prediction within the interval widened by the tolerance.
    pub agrees: Option<bool>,
    /// Interval (widened by the tolerance) meets the band between the two limits.
    pub in_band: Option<bool>,
}

impl ExponentRow {
    /// The fit of this row.
    pub fn fit(&self) -> SlopeFit {
        SlopeFit {
            slope: self.slope,
            se: self.se,
            ci_low: self.ci_low,
            ci_high: self.ci_high,
        }
    }

    /// The row with prediction `p`, and the verdicts and agreement that the rule
    /// (`rankstab_theory::predict::judge`) gives it at tolerance `tol`.
    pub fn judged(self, p: Prediction, tol: f64) -> Self {
        let j = judge(&self.fit(), p.predicted, p.limits, tol);
        Self {
            predicted: p.predicted,
            law: p.law,
            coherent_limit: p.limits.map(|l| l.coherent),
            incoherent_limit: p.limits.map(|l| l.incoherent),
            verdict: j.verdict,
            predicted_verdict: j.predicted_verdict,
            agrees: j.agrees,
            in_band: j.in_band,
            ..self
        }
    }
}

/// (agreeing, with a prediction) among `rows`.
pub(super) fn agreement(rows: &[ExponentRow]) -> (usize, usize) {
    let agree = rows.iter().filter(|r| r.agrees == Some(true)).count();
    let total = rows.iter().filter(|r| r.agrees.is_some()).count();
    (agree, total)
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
    use rankstab_theory::predict::Limits;

    #[test]
    fn rows_take_the_rule_s_verdicts_and_agreement() {
        let base = ExponentRow {
            source: "train".into(),
            beta: 1.0,
            m: 2,
            seeds: 2,
            slope: -0.1,
            se: 0.05,
            ci_low: -0.2,
            ci_high: 0.0,
            ..ExponentRow::default()
        };
        let predict = |p: f64, coherent: f64, incoherent: f64| Prediction {
            predicted: Some(p),
            law: "test law".into(),
            limits: Some(Limits {
                coherent,
                incoherent,
            }),
        };
        let r = base.clone().judged(predict(0.1, 0.1, -1.0), 0.15);
        assert_eq!(r.verdict, Verdict::Stable);
        assert_eq!(r.agrees, Some(true));
        assert_eq!(r.in_band, Some(true));
        assert_eq!(
            (r.predicted, r.coherent_limit, r.incoherent_limit),
            (Some(0.1), Some(0.1), Some(-1.0))
        );
        assert_eq!(r.law, "test law");
        let r = base.clone().judged(predict(1.0, 1.0, 0.5), 0.15);
        assert_eq!(r.agrees, Some(false));
        assert_eq!(r.in_band, Some(false));
        assert_eq!(r.predicted_verdict, Some(Verdict::Exploding));
        let r = ExponentRow {
            slope: f64::NAN,
            ..base
        }
        .judged(predict(0.1, 0.1, -1.0), 0.15);
        assert_eq!(r.verdict, Verdict::Diverged);
        assert_eq!(r.agrees, Some(false));
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
            ..ExponentRow::default()
        };
        let mut w = csv::Writer::from_writer(Vec::new());
        w.serialize(&row).expect("row");
        let text = String::from_utf8(w.into_inner().expect("flush")).expect("utf-8");
        let line = text.lines().nth(1).expect("a row");
        for cell in [
            "all",
            "steps 10-50",
            "sgd-momentum",
            "rslora",
            "fwd_heldout",
            "grad_norm_b",
        ] {
            assert!(line.split(',').any(|c| c == cell), "{cell} not in {line}");
        }
        // No prediction: empty predicted verdict, as before the columns were typed.
        assert!(line.ends_with(",stable,,,"), "{line}");
    }
}
