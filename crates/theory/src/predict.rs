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
use crate::stats::ols_slope;
use rankstab_records::{Optimizer, Site, Stat};

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

    /// "coherent" when the r^2 term dominates at the largest rank, else "incoherent".
    pub fn regime(&self, r_max: usize) -> &'static str {
        if self.kappa * r_max as f64 >= 1.0 {
            "coherent"
        } else {
            "incoherent"
        }
    }
}
