//! Predicted rank exponents (derivations in proofs/).
//!
//! Every statistic the checker fits scales, to leading order in the learning rate, as
//!
//!   stat(r) ~ ( gamma_r^(2 a_g) s_r^(2 a_s) (r + kappa r^2) )^(p/2)
//!
//! where the r term is the incoherent fluctuation of a sum of r independent rank-one
//! contributions and kappa r^2 its coherent mean (the Theta(r) of E[A^T A] = r s^2 I).
//! [`Law`] holds (p, a_g, a_s, kappa) for a statistic; the predicted slope is the
//! least-squares slope of log stat against log r over the ranks actually fitted, and the
//! asymptotic slope its limit for large rank (the paper's law when kappa > 0).
//!
//! Every prediction the tools state lives in this module, and so does the one rule that
//! sets a fitted exponent against it:
//!
//! | module        | job                                                                  |
//! |---------------|----------------------------------------------------------------------|
//! | this file     | [`law`] and [`Law`]: the two-term law, its slope and its two limits  |
//! | `train.rs`    | the prediction for a training row ([`predict_train`])                |
//! | `verdict.rs`  | the rule: stability [`Verdict`], agreement and band ([`judge`])      |
//!
//! The checker (`fits.json`) and the report both ask these functions; neither computes a
//! law or a verdict of its own.
use crate::config::TheoryConfig;
use crate::stats::ols_slope;
use rankstab_records::{Fit, Optimizer, Rival, Site, Stat};

pub mod train;
pub mod verdict;

pub use train::{grad_norm_avg, predict_train, PEFT_DEFAULT_KURTOSIS};
pub use verdict::{judge_all, Claims, Judged};

/// Scaling law of one statistic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Law {
    /// Power of the statistic: m for m-th moments, 1 for norms.
    pub p: f64,
    /// Power of gamma in the amplitude (2 for SGD adapters, 1 for Adam's sign-like steps).
    pub a_gamma: f64,
    /// Power of the init standard deviation s in the amplitude.
    pub a_s: f64,
    /// Coherence: weight of the r^2 term relative to the r term.
    pub kappa: f64,
}

/// The law of statistic `stat` at `site` (see the module docs and proofs/adam.md,
/// proofs/theorem-3.2-sgd.md). `kappa_fwd` is the measured coherence of the site's inputs
/// (from the exact first-step coefficients), `width` the layer width, `kurtosis` that of A.
/// `None` for statistics without a law (raw moments, losses).
pub fn law(
    opt: Optimizer,
    site: Site,
    stat: Stat,
    m: u32,
    kappa_fwd: f64,
    width: usize,
    kurtosis: f64,
) -> Option<Law> {
    let q = if opt.is_adaptive() { 1.0 } else { 2.0 };
    let p = m as f64;
    let d = width as f64;
    match (site, stat) {
        (Site::Fwd | Site::FwdHeldout, Stat::Abs) => Some(Law {
            p,
            a_gamma: q,
            a_s: q,
            kappa: kappa_fwd,
        }),
        (Site::Bwd, Stat::Abs) => Some(Law {
            p,
            a_gamma: q,
            a_s: q,
            kappa: 1.0 / (d + kurtosis - 2.0),
        }),
        (Site::Param, Stat::GradNormB) => Some(Law {
            p: 1.0,
            a_gamma: 1.0,
            a_s: 1.0,
            kappa: 0.0,
        }),
        (Site::Param, Stat::GradNormA) => Some(Law {
            p: 1.0,
            a_gamma: q,
            a_s: q - 1.0,
            kappa: 0.0,
        }),
        (Site::Param, Stat::DeltaNorm) => Some(Law {
            p: 1.0,
            a_gamma: q,
            a_s: q,
            kappa: if opt.is_adaptive() {
                2.0 / std::f64::consts::PI / d
            } else {
                1.0 / d
            },
        }),
        _ => None,
    }
}

impl Law {
    fn log_stat(&self, r: f64, beta: f64, log_s_slope: f64) -> f64 {
        let ln_r = r.ln();
        self.p
            * (-self.a_gamma * beta * ln_r
                + self.a_s * log_s_slope * ln_r
                + 0.5 * (r + self.kappa * r * r).ln())
    }

    /// Predicted slope over `ranks` for exponent `beta`; `log_s_slope` = d ln s / d ln r of
    /// the init (0, or -1 for PEFT's gaussian).
    ///
    /// ```
    /// use rankstab_theory::predict::Law;
    /// // SGD, fully coherent: m (1 - 2 beta) at large rank.
    /// let law = Law { p: 2.0, a_gamma: 2.0, a_s: 2.0, kappa: 1e9 };
    /// assert!((law.predicted(&[4, 64, 1024], 0.5, 0.0)).abs() < 1e-6);
    /// assert!((law.predicted(&[4, 64, 1024], 1.0, 0.0) + 2.0).abs() < 1e-6);
    /// ```
    pub fn predicted(&self, ranks: &[usize], beta: f64, log_s_slope: f64) -> f64 {
        let x: Vec<f64> = ranks.iter().map(|&r| (r as f64).ln()).collect();
        let y: Vec<f64> = ranks
            .iter()
            .map(|&r| self.log_stat(r as f64, beta, log_s_slope))
            .collect();
        ols_slope(&x, &y)
    }

    /// Large-rank limit of the slope: p (1 - a_g beta + a_s ds) with a coherent term,
    /// p (1/2 - a_g beta + a_s ds) without.
    ///
    /// ```
    /// use rankstab_theory::predict::Law;
    /// let adam = Law { p: 3.0, a_gamma: 1.0, a_s: 1.0, kappa: 0.1 };
    /// assert_eq!(adam.asymptotic(0.5, 0.0), 1.5); // m (1 - beta)
    /// ```
    pub fn asymptotic(&self, beta: f64, log_s_slope: f64) -> f64 {
        let base = if self.kappa > 0.0 { 1.0 } else { 0.5 };
        self.p * (base - self.a_gamma * beta + self.a_s * log_s_slope)
    }

    /// Both large-rank limits of the law: with its coherent term (the paper's law, what
    /// [`Law::asymptotic`] gives for kappa > 0) and without it (the fluctuation term alone),
    /// whatever this law's own kappa.
    ///
    /// ```
    /// use rankstab_theory::predict::{Law, Limits};
    /// let sgd = Law { p: 2.0, a_gamma: 2.0, a_s: 2.0, kappa: 0.0 };
    /// assert_eq!(sgd.limits(1.0, 0.0), Limits { coherent: -2.0, incoherent: -3.0 });
    /// ```
    pub fn limits(&self, beta: f64, log_s_slope: f64) -> Limits {
        Limits {
            coherent: Law {
                kappa: 1.0,
                ..*self
            }
            .asymptotic(beta, log_s_slope),
            incoherent: Law {
                kappa: 0.0,
                ..*self
            }
            .asymptotic(beta, log_s_slope),
        }
    }

    /// "coherent" when the r^2 term dominates at the largest rank, else "incoherent".
    pub fn regime(&self, r_max: usize) -> &'static str {
        if self.kappa * r_max as f64 >= 1.0 {
            "coherent"
        } else {
            "incoherent"
        }
    }
}

/// The rival laws of a fit of statistic `stat` at `site` (proofs/verdicts.md), with their
/// slopes for scaling exponent `beta`: for moments the paper's coherent limit, the
/// incoherent limit (the negation of the paper's mechanism), the other optimizer family's
/// coherent limit and slope 0; for norms the other family's law and slope 0.
///
/// ```
/// use rankstab_records::{Optimizer, Rival, Site, Stat};
/// use rankstab_theory::predict::rivals;
/// let r = rivals(Optimizer::Sgd, Site::Fwd, Stat::Abs, 2, 4096, 1.8, 0.5, 0.0);
/// assert_eq!(r, vec![(Rival::CoherentLimit, 0.0), (Rival::IncoherentLimit, -1.0),
///                    (Rival::OtherOptimizer, 1.0), (Rival::Flat, 0.0)]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn rivals(
    opt: Optimizer,
    site: Site,
    stat: Stat,
    m: u32,
    width: usize,
    kurtosis: f64,
    beta: f64,
    log_s_slope: f64,
) -> Vec<(Rival, f64)> {
    let other = if opt.is_adaptive() {
        Optimizer::Sgd
    } else {
        Optimizer::Adam
    };
    let (Some(own), Some(theirs)) = (
        law(opt, site, stat, m, 1.0, width, kurtosis),
        law(other, site, stat, m, 1.0, width, kurtosis),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if stat.is_moment() {
        let l = own.limits(beta, log_s_slope);
        out.push((Rival::CoherentLimit, l.coherent));
        out.push((Rival::IncoherentLimit, l.incoherent));
        out.push((
            Rival::OtherOptimizer,
            theirs.limits(beta, log_s_slope).coherent,
        ));
    } else {
        out.push((Rival::OtherOptimizer, theirs.asymptotic(beta, log_s_slope)));
    }
    out.push((Rival::Flat, 0.0));
    out
}

/// The two large-rank limits of a law: a real slope should lie between them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// With coherent inputs: the paper's law.
    pub coherent: f64,
    /// With incoherent inputs: the fluctuation term alone.
    pub incoherent: f64,
}

/// What is predicted for one fitted exponent, as the report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Predicted slope over the fitted ranks, when a law gives one.
    pub predicted: Option<f64>,
    /// Which law gave it (or why there is none), in words.
    pub law: String,
    /// The law's two large-rank limits.
    pub limits: Option<Limits>,
}

/// The prediction for a fit of a theory run: the finite-rank slope `fits.json` holds, and
/// the limits from the run's configuration when it is known.
pub fn fit_prediction(fit: &Fit, cfg: Option<&TheoryConfig>) -> Prediction {
    Prediction {
        predicted: fit.predicted.is_finite().then_some(fit.predicted),
        law: format!("finite-rank law ({} regime at the top rank)", fit.regime),
        limits: cfg.and_then(|c| fit_limits(c, fit)),
    }
}

/// The limits of a theory run's fit, from the run's configuration (width, init): the band
/// the report shows beside the finite-rank prediction of `fits.json`. `None` for a
/// statistic without a law.
pub fn fit_limits(cfg: &TheoryConfig, fit: &Fit) -> Option<Limits> {
    let law = law(
        fit.optimizer,
        fit.site,
        fit.stat,
        fit.m,
        1.0,
        cfg.width,
        cfg.init.kurtosis(),
    )?;
    Some(law.limits(fit.beta, cfg.init.log_std_rank_slope()))
}
