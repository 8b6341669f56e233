//! Predictions for the exponents of training runs (the rule the report states in its reading
//! guide). A training row's prediction depends on the row alone, never on which other runs
//! are given, so its agreement is the same in every report:
//!
//! * forward outputs (`fwd`, `fwd_heldout`): the paper's asymptotic law, the coherent limit
//!   `m (1 - a beta)` (SGD `a = 2`; Adam/AdamW `a = 1`): the coherence of real inputs is not
//!   observable, and text shares a common direction;
//! * input gradients (`bwd`): the finite-rank [`law`] over the fitted ranks with
//!   kappa = 1/(d + k4 - 2) and the row's width (exact, `proofs/finite-rank.md`);
//! * parameter norms: their kappa-free laws.
//!
//! A is assumed to have PEFT's default Kaiming-uniform init ([`PEFT_DEFAULT_KURTOSIS`]).
use super::{law, Limits, Prediction};
use rankstab_records::{Optimizer, Site, Stat};

/// Kurtosis of A's entries under PEFT's default init (Kaiming-uniform): 9/5.
pub const PEFT_DEFAULT_KURTOSIS: f64 = 9.0 / 5.0;

/// The prediction for a training exponent of `stat` at `site` (the rule of the module docs).
///
/// ```
/// use rankstab_records::{Optimizer, Site, Stat};
/// use rankstab_theory::predict::predict_train;
/// // rsLoRA under AdamW: the forward second moment follows m (1 - beta) = 1.
/// let p = predict_train(Optimizer::Adamw, Site::Fwd, Stat::Abs, 2, 576, 0.5, &[4, 16, 64]);
/// assert_eq!(p.predicted, Some(1.0));
/// assert_eq!(p.limits.map(|l| l.incoherent), Some(0.0));
/// // rsLoRA under SGD: m (1 - 2 beta) = 0, rank-flat (Theorem 3.2).
/// assert_eq!(predict_train(Optimizer::Sgd, Site::Fwd, Stat::Abs, 2, 576, 0.5, &[4, 16, 64]).predicted, Some(0.0));
/// // LoRA's B-gradient norm: gamma sqrt(r), slope 1/2 - 1.
/// let p = predict_train(Optimizer::Sgd, Site::Param, Stat::GradNormB, 1, 576, 1.0, &[4, 16, 64]);
/// assert!((p.predicted.unwrap() + 0.5).abs() < 1e-12);
/// ```
pub fn predict_train(
    optimizer: Optimizer,
    site: Site,
    stat: Stat,
    m: u32,
    width: u32,
    beta: f64,
    ranks: &[u32],
) -> Prediction {
    let rs: Vec<usize> = ranks.iter().map(|&r| r as usize).collect();
    let d = width.max(1) as usize;
    // The site's own law (bwd: kappa = 1/(d + k4 - 2); norms: kappa-free); for the forward
    // sites the kappa given here only serves the limits.
    let Some(own) = law(optimizer, site, stat, m, 0.0, d, PEFT_DEFAULT_KURTOSIS) else {
        return Prediction {
            predicted: None,
            law: format!("no law for {site}/{stat}"),
            limits: None,
        };
    };
    let limits = own.limits(beta, 0.0);
    let (predicted, law, limits) = match site {
        Site::Fwd | Site::FwdHeldout => (
            limits.coherent,
            format!(
                "paper's law m (1 - {}beta) (coherent limit)",
                if optimizer.is_adaptive() { "" } else { "2 " }
            ),
            limits,
        ),
        // Both limits are real for the input gradient (the coherent one only beyond r = d).
        Site::Bwd => (
            own.predicted(&rs, beta, 0.0),
            format!("finite-rank law, kappa = 1/(d + k4 - 2), d = {d}"),
            limits,
        ),
        // The norms' laws are kappa-free: the prediction is both limits. (grad_out has no law
        // and returned above.)
        Site::Param | Site::GradOut => {
            let p = own.predicted(&rs, beta, 0.0);
            let both = Limits {
                coherent: p,
                incoherent: p,
            };
            (p, "finite-rank law".to_string(), both)
        }
    };
    Prediction {
        predicted: Some(predicted),
        law,
        limits: Some(limits),
    }
}

/// The prediction for the paper's average parameter gradient norm (the `grad_norm_avg`
/// metric: mean of the A and B gradient norms over adapters). Both scale as gamma sqrt(r)
/// under Adam; under SGD B's does and A's as gamma^2 sqrt(r), so only a band is predicted.
///
/// ```
/// use rankstab_records::Optimizer;
/// use rankstab_theory::predict::grad_norm_avg;
/// assert_eq!(grad_norm_avg(Optimizer::Adamw, 1.0).predicted, Some(-0.5));
/// assert_eq!(grad_norm_avg(Optimizer::Sgd, 1.0).predicted, None);
/// ```
pub fn grad_norm_avg(optimizer: Optimizer, beta: f64) -> Prediction {
    let b = 0.5 - beta;
    if optimizer.is_adaptive() {
        Prediction {
            predicted: Some(b),
            law: "gradient-norm law: gamma sqrt(r) (Adam)".into(),
            limits: Some(Limits {
                coherent: b,
                incoherent: b,
            }),
        }
    } else {
        Prediction {
            predicted: None,
            law: "band between the A and B gradient-norm laws (SGD)".into(),
            limits: Some(Limits {
                coherent: 0.5 - 2.0 * beta,
                incoherent: b,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_follow_the_laws_of_the_proofs() {
        let r = [4u32, 16, 64, 256];
        let coherent = |p: &Prediction| p.limits.map(|l| l.coherent);
        let incoherent = |p: &Prediction| p.limits.map(|l| l.incoherent);
        // SGD, forward, coherent limit: m (1 - 2 beta).
        let p = predict_train(Optimizer::Sgd, Site::Fwd, Stat::Abs, 2, 4096, 0.5, &r);
        assert_eq!(p.predicted, Some(0.0));
        let p = predict_train(Optimizer::Sgd, Site::Fwd, Stat::Abs, 2, 4096, 1.0, &r);
        assert_eq!(p.predicted, Some(-2.0));
        assert_eq!(incoherent(&p), Some(-3.0));
        // Adam, forward: m (1 - beta); LoRA flat.
        let p = predict_train(Optimizer::Adamw, Site::Fwd, Stat::Abs, 2, 4096, 1.0, &r);
        assert_eq!(p.predicted, Some(0.0));
        assert!(p.law.contains("paper's law"), "{}", p.law);
        // The forward prediction does not depend on width or ranks: the asymptotic law.
        for (d, ranks) in [(64, &[4u32, 8][..]), (8192, &[4, 2048][..])] {
            let q = predict_train(Optimizer::Adamw, Site::Fwd, Stat::Abs, 2, d, 0.5, ranks);
            assert_eq!((q.predicted, coherent(&q)), (Some(1.0), Some(1.0)));
        }
        // Input gradient at r << d: incoherent, p (1/2 - 2 beta) under SGD.
        let p = predict_train(Optimizer::Sgd, Site::Bwd, Stat::Abs, 2, 4096, 0.5, &r);
        assert!((p.predicted.expect("law") + 1.0).abs() < 0.03, "{p:?}");
        // grad_norm_avg under Adam: 1/2 - beta; under SGD only a band.
        assert_eq!(grad_norm_avg(Optimizer::Adamw, 1.0).predicted, Some(-0.5));
        let p = grad_norm_avg(Optimizer::Sgd, 1.0);
        assert_eq!(
            (p.predicted, coherent(&p), incoherent(&p)),
            (None, Some(-1.5), Some(-0.5))
        );
        // No law: grad_out, raw moments.
        for (site, stat) in [(Site::GradOut, Stat::Abs), (Site::Fwd, Stat::Raw)] {
            let p = predict_train(Optimizer::Sgd, site, stat, 2, 64, 1.0, &r);
            assert_eq!((p.predicted, p.limits), (None, None));
        }
    }
}
