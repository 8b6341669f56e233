//! Predicted optimal learning rates across ranks and widths (derivation:
//! proofs/lr-transfer.md).
//!
//! One step from the initialisation moves the update `W = gamma B A` to `W - eta D`; on
//! the quadratic loss of a linear layer the loss then changes by
//! `-eta <G, D> + eta^2 / 2 tr(D Sigma D^T)`, with `G` the full-matrix gradient and
//! `Sigma` the batch's input second moment. The step that minimises it is
//! `eta* = <G, D> / tr(D Sigma D^T)` (a Cauchy step). Its expectation over the random
//! factor is a closed form in `r`, `gamma`, the init's standard deviation `s` and a few
//! numbers of the data (measured on each trial's first batch, [`DataTerms`]):
//!
//! | optimizer | init | `eta*`                                                                     |
//! |-----------|------|----------------------------------------------------------------------------|
//! | SGD       | A    | `1 / (gamma^2 s^2 ((r + 1) rho + tr Sigma))`                               |
//! | SGD       | B    | `1 / (gamma^2 s^2 (r + 1 + d) rho)`                                        |
//! | Adam      | A    | `sqrt(2/pi) sum_i ‖g_i‖ / (gamma s (d tr Sigma + 2/pi (r - 1) sum_i rho_i))` |
//! | Adam      | B    | `sqrt(2/pi) sum_j ‖c_j‖ / (gamma s (d Q1 + 2/pi (r - 1) Q2))`               |
//!
//! (`rho` the Rayleigh quotient of `Sigma` along `G`, `g_i` / `c_j` its rows / columns.)
//! The predicted exponent is the least-squares slope of `ln eta*` against `ln r` (or
//! `ln d`) over the values actually run, as the checker's finite-rank predictions are.
//! Under init A the first step moves only B, so `eta*` is B's rate and A's is `eta* /
//! lr_ratio`; under init B only A moves. The ratio shifts the level, not the exponent.
use crate::config::{AdapterInit, Init};
use crate::stats::ols_slope;
use ndarray::{Array2, ArrayView2, Axis};
use rankstab_records::Optimizer;
use serde::{Deserialize, Serialize};
use std::f64::consts::FRAC_2_PI;

/// The numbers of one batch that the closed forms need: from the adapter inputs `U`
/// (N x d) and the loss gradient at the adapter's output `V` (N x d, the mean over rows
/// folded in), with `G = V^T U` and `Sigma = U^T U / N`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DataTerms {
    /// Output width d.
    pub d_out: f64,
    /// `tr Sigma`.
    pub tr_sigma: f64,
    /// `tr(G Sigma G^T) / ‖G‖_F^2`.
    pub rho: f64,
    /// `sum_i ‖g_i‖` over the rows of G.
    pub row_norms: f64,
    /// `sum_i g_i^T Sigma g_i / ‖g_i‖^2`.
    pub row_rho: f64,
    /// `sum_j ‖c_j‖` over the columns of G.
    pub col_norms: f64,
    /// `sum_jk Sigma_jk (2/pi) asin(c_j . c_k / ‖c_j‖ ‖c_k‖)`.
    pub q1: f64,
    /// `sum_jk Sigma_jk c_j . c_k / ‖c_j‖ ‖c_k‖`.
    pub q2: f64,
    /// Largest eigenvalue of `Sigma`.
    pub lambda_max: f64,
    /// Largest singular value of the update the adapter is asked to learn (`T - W` for the
    /// linear teacher): the scale its factors must grow to.
    pub w_top: f64,
}

impl DataTerms {
    /// The terms of a batch (`u`, `v`: N x d).
    pub fn of(u: ArrayView2<f32>, v: ArrayView2<f32>) -> Self {
        let u = u.mapv(f64::from);
        let v = v.mapv(f64::from);
        let n = u.nrows().max(1) as f64;
        let g: Array2<f64> = v.t().dot(&u); // d_out x d_in
        let sigma: Array2<f64> = u.t().dot(&u) / n;
        let ug = u.dot(&g.t()); // N x d_out: column i is U g_i
        let g_norm_sq: f64 = g.iter().map(|x| x * x).sum();
        let rho = ug.iter().map(|x| x * x).sum::<f64>() / n / g_norm_sq.max(f64::MIN_POSITIVE);
        let row_sq: Vec<f64> = g.axis_iter(Axis(0)).map(|r| r.dot(&r)).collect();
        let row_norms = row_sq.iter().map(|x| x.sqrt()).sum();
        let row_rho = ug
            .axis_iter(Axis(1))
            .zip(&row_sq)
            .filter(|(_, &s)| s > 0.0)
            .map(|(c, &s)| c.dot(&c) / n / s)
            .sum();
        let col_norm: Vec<f64> = g.axis_iter(Axis(1)).map(|c| c.dot(&c).sqrt()).collect();
        let mut chat = g.clone();
        for (mut c, &nrm) in chat.axis_iter_mut(Axis(1)).zip(&col_norm) {
            if nrm > 0.0 {
                c.mapv_inplace(|x| x / nrm);
            }
        }
        let gram = chat.t().dot(&chat); // d_in x d_in
        let (mut q1, mut q2) = (0.0, 0.0);
        for ((j, k), &c) in gram.indexed_iter() {
            let s = sigma[[j, k]];
            q1 += s * FRAC_2_PI * c.clamp(-1.0, 1.0).asin();
            q2 += s * c;
        }
        let lambda_max = largest_singular_value(&u).powi(2) / n;
        DataTerms {
            d_out: g.nrows() as f64,
            tr_sigma: sigma.diag().sum(),
            rho,
            row_norms,
            row_rho,
            col_norms: col_norm.iter().sum(),
            q1,
            q2,
            lambda_max,
            w_top: f64::NAN,
        }
    }

    /// With the target update `delta` (d_out x d_in) whose top singular value the factors
    /// must reach.
    pub fn with_target(mut self, delta: ArrayView2<f32>) -> Self {
        self.w_top = largest_singular_value(&delta.mapv(f64::from));
        self
    }

    /// The mean of several batches' terms (trials).
    pub fn mean(terms: &[DataTerms]) -> DataTerms {
        let n = terms.len().max(1) as f64;
        let sum = |f: fn(&DataTerms) -> f64| terms.iter().map(f).sum::<f64>() / n;
        DataTerms {
            d_out: sum(|t| t.d_out),
            tr_sigma: sum(|t| t.tr_sigma),
            rho: sum(|t| t.rho),
            row_norms: sum(|t| t.row_norms),
            row_rho: sum(|t| t.row_rho),
            col_norms: sum(|t| t.col_norms),
            q1: sum(|t| t.q1),
            q2: sum(|t| t.q2),
            lambda_max: sum(|t| t.lambda_max),
            w_top: sum(|t| t.w_top),
        }
    }
}

fn largest_singular_value(m: &Array2<f64>) -> f64 {
    let (r, c) = m.dim();
    let nm = nalgebra::DMatrix::<f64>::from_fn(r, c, |i, j| m[[i, j]]);
    nm.singular_values().iter().copied().fold(0.0, f64::max)
}

/// What a setting is: everything the closed form depends on but the rank and the data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LawSetting {
    /// Optimizer (SGD family: the gradient step; Adam family: the sign step).
    pub opt: Optimizer,
    /// Scaling exponent: `gamma = alpha r^-beta`.
    pub beta: f64,
    /// Scaling numerator.
    pub alpha: f64,
    /// Distribution of the random factor.
    pub init: Init,
    /// Which factor is random.
    pub adapter_init: AdapterInit,
}

/// `ln eta*` of the one-step law at rank `r` and input width `d` (natural log).
///
/// ```
/// use rankstab_theory::transfer::law::{ln_lr_opt, DataTerms, LawSetting};
/// use rankstab_theory::{AdapterInit, Init};
/// use rankstab_records::Optimizer;
/// let t = DataTerms { d_out: 64.0, tr_sigma: 64.0, rho: 4.0, ..Default::default() };
/// let s = LawSetting { opt: Optimizer::Sgd, beta: 0.5, alpha: 1.0, init: Init::Gaussian, adapter_init: AdapterInit::A };
/// // SGD, init A: 1 / (gamma^2 s^2 ((r + 1) rho + tr Sigma)) with gamma^2 = 1/r, s^2 = 1/64.
/// let want = (1.0 / ((1.0 / 8.0) * (1.0 / 64.0) * (9.0 * 4.0 + 64.0))) as f64;
/// assert!((ln_lr_opt(s, 8, 64, &t) - want.ln()).abs() < 1e-12);
/// ```
pub fn ln_lr_opt(s: LawSetting, r: usize, d: usize, t: &DataTerms) -> f64 {
    let rf = r as f64;
    let ln_gamma = s.alpha.ln() - s.beta * rf.ln();
    let var = s.init.variance(d, r);
    let ln_s = 0.5 * var.ln();
    if s.opt.is_adaptive() {
        let (num, den) = match s.adapter_init {
            AdapterInit::A => (
                t.row_norms,
                t.d_out * t.tr_sigma + FRAC_2_PI * (rf - 1.0) * t.row_rho,
            ),
            AdapterInit::B => (t.col_norms, t.d_out * t.q1 + FRAC_2_PI * (rf - 1.0) * t.q2),
        };
        0.5 * FRAC_2_PI.ln() + num.ln() - ln_gamma - ln_s - den.ln()
    } else {
        let den = match s.adapter_init {
            AdapterInit::A => (rf + 1.0) * t.rho + t.tr_sigma,
            AdapterInit::B => (rf + 1.0 + t.d_out) * t.rho,
        };
        -2.0 * ln_gamma - 2.0 * ln_s - den.ln()
    }
}

/// `ln eta*` of the long-horizon law (balanced factors, proofs/lr-transfer.md) at rank `r`
/// and width `d`, up to a constant that depends on neither.
///
/// Gradient flow keeps `B^T B - A^T A`-type differences fixed, so once the update reaches
/// its target scale `w` the factors' squared singular values are
/// `S = (c0 + sqrt(c0^2 + 4 w^2 / gamma^2)) / 2` each (`c0 = d s^2`, the random factor's).
/// SGD is stable below `2 / (gamma^2 (S_A + S_B) lambda_max)`, i.e.
/// `eta* ~ 1 / (lambda_max sqrt(gamma^4 c0^2 + 4 gamma^2 w^2))`; Adam's scale-free steps
/// move each entry by about eta, so `eta*` follows the entries' scale `sqrt(S / d)`.
///
/// ```
/// use rankstab_theory::transfer::law::{ln_lr_long, rank_exponent_with, DataTerms, LawSetting};
/// use rankstab_theory::{AdapterInit, Init};
/// use rankstab_records::Optimizer;
/// let t = DataTerms { d_out: 128.0, tr_sigma: 128.0, lambda_max: 20.0, w_top: 2.8, ..Default::default() };
/// let s = |opt, beta| LawSetting { opt, beta, alpha: 1.0, init: Init::KaimingUniform, adapter_init: AdapterInit::A };
/// // Small gamma: SGD's c -> beta, Adam's -> beta / 2.
/// let c = rank_exponent_with(ln_lr_long, s(Optimizer::Sgd, 1.0), &[16, 32, 64], 128, &t);
/// assert!((c - 1.0).abs() < 0.01, "{c}");
/// let c = rank_exponent_with(ln_lr_long, s(Optimizer::Adam, 0.5), &[16, 32, 64], 128, &t);
/// assert!((c - 0.25).abs() < 0.01, "{c}");
/// ```
pub fn ln_lr_long(s: LawSetting, r: usize, d: usize, t: &DataTerms) -> f64 {
    let gamma = s.alpha * (r as f64).powf(-s.beta);
    let c0 = d as f64 * s.init.variance(d, r);
    let w = t.w_top;
    if s.opt.is_adaptive() {
        let big = 0.5 * (c0 + (c0 * c0 + 4.0 * w * w / (gamma * gamma)).sqrt());
        0.5 * (big / d as f64).ln()
    } else {
        let g2 = gamma * gamma;
        -t.lambda_max.ln() - 0.5 * (g2 * g2 * c0 * c0 + 4.0 * g2 * w * w).ln()
    }
}

/// A law's `ln eta*` at rank `r` and width `d`.
pub type LnLaw = fn(LawSetting, usize, usize, &DataTerms) -> f64;

/// The predicted exponent of `lr*` over `ranks` at width `d`: the least-squares slope of
/// a law's `ln eta*` against `ln r`.
pub fn rank_exponent_with(
    law: LnLaw,
    s: LawSetting,
    ranks: &[usize],
    d: usize,
    t: &DataTerms,
) -> f64 {
    let x: Vec<f64> = ranks.iter().map(|&r| (r as f64).ln()).collect();
    let y: Vec<f64> = ranks.iter().map(|&r| law(s, r, d, t)).collect();
    ols_slope(&x, &y)
}

/// The one-step law's exponent over `ranks` ([`ln_lr_opt`]).
pub fn rank_exponent(s: LawSetting, ranks: &[usize], d: usize, t: &DataTerms) -> f64 {
    rank_exponent_with(ln_lr_opt, s, ranks, d, t)
}

/// The predicted exponent of `lr*` over widths at rank `r`: the slope of a law's `ln eta*`
/// against `ln d`, each width with its own data terms.
pub fn width_exponent_with(
    law: LnLaw,
    s: LawSetting,
    r: usize,
    widths: &[(usize, DataTerms)],
) -> f64 {
    let x: Vec<f64> = widths.iter().map(|&(d, _)| (d as f64).ln()).collect();
    let y: Vec<f64> = widths.iter().map(|(d, t)| law(s, r, *d, t)).collect();
    ols_slope(&x, &y)
}

/// The limits of the one-step law's rank exponent (proofs/lr-transfer.md): for `r` far below and far above
/// the crossover (the batch size under init A, the width under init B), with a
/// rank-independent init variance.
///
/// ```
/// use rankstab_theory::transfer::law::limits;
/// use rankstab_records::Optimizer;
/// assert_eq!(limits(Optimizer::Sgd, 0.5), (1.0, 0.0)); // SGD + rsLoRA
/// assert_eq!(limits(Optimizer::Adam, 1.0), (1.0, 0.0)); // Adam + LoRA
/// ```
pub fn limits(opt: Optimizer, beta: f64) -> (f64, f64) {
    if opt.is_adaptive() {
        (beta, beta - 1.0)
    } else {
        (2.0 * beta, 2.0 * beta - 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn gauss(rows: usize, cols: usize, std: f64, rng: &mut ChaCha8Rng) -> Array2<f64> {
        Array2::from_shape_fn((rows, cols), |_| {
            let z: f64 = StandardNormal.sample(rng);
            z * std
        })
    }

    /// The closed forms are expectations over the random factor of `<G, D>` and
    /// `tr(D Sigma D^T)`: check them against averages over many draws of that factor, for
    /// each optimizer and init, at ranks below, at and above the batch size.
    #[test]
    fn closed_forms_match_monte_carlo_over_the_random_factor() {
        let (n, d) = (8usize, 48usize);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let u = gauss(n, d, 1.0, &mut rng);
        let v = gauss(n, d, 1.0 / n as f64, &mut rng);
        let terms = DataTerms::of(u.mapv(|x| x as f32).view(), v.mapv(|x| x as f32).view());
        let g = v.t().dot(&u);
        let sigma = u.t().dot(&u) / n as f64;
        for opt in [Optimizer::Sgd, Optimizer::Adam] {
            for ai in [AdapterInit::A, AdapterInit::B] {
                for r in [2usize, 8, 32] {
                    let s = LawSetting {
                        opt,
                        beta: 0.5,
                        alpha: 1.0,
                        init: Init::Gaussian,
                        adapter_init: ai,
                    };
                    let std = Init::Gaussian.variance(d, r).sqrt();
                    let gamma = (r as f64).powf(-0.5);
                    let (mut lin, mut quad) = (0.0, 0.0);
                    let draws = 3000;
                    for _ in 0..draws {
                        // D = the update per unit lr of one step from the init.
                        let dmat = match (opt.is_adaptive(), ai) {
                            (false, AdapterInit::A) => {
                                let a = gauss(r, d, std, &mut rng);
                                g.dot(&a.t()).dot(&a) * gamma * gamma
                            }
                            (false, AdapterInit::B) => {
                                let b = gauss(d, r, std, &mut rng);
                                b.dot(&b.t()).dot(&g) * gamma * gamma
                            }
                            (true, AdapterInit::A) => {
                                let a = gauss(r, d, std, &mut rng);
                                g.dot(&a.t()).mapv(f64::signum).dot(&a) * gamma
                            }
                            (true, AdapterInit::B) => {
                                let b = gauss(d, r, std, &mut rng);
                                b.dot(&b.t().dot(&g).mapv(f64::signum)) * gamma
                            }
                        };
                        lin += (&g * &dmat).sum();
                        quad += (dmat.dot(&sigma) * &dmat).sum();
                    }
                    let mc = (lin / draws as f64) / (quad / draws as f64);
                    let want = ln_lr_opt(s, r, d, &terms).exp();
                    let rel = (mc / want - 1.0).abs();
                    // Exact expectations for SGD; Adam's sign steps use the Gaussian
                    // sign correlation and drop O(1/sqrt(d)) cross terms.
                    let tol = if opt.is_adaptive() { 0.08 } else { 0.03 };
                    assert!(
                        rel < tol,
                        "{opt} init {ai} r {r}: Monte Carlo {mc:.4e} vs closed form {want:.4e} ({rel:.3})"
                    );
                }
            }
        }
    }

    /// The exponent moves between the two limits across the crossover, and a prediction
    /// that ignored it (the small-rank limit) differs measurably at ranks above the batch.
    #[test]
    fn exponent_crosses_over_at_the_batch_size_under_init_a() {
        let t = DataTerms {
            d_out: 256.0,
            tr_sigma: 256.0,
            rho: 256.0 / 16.0,
            ..Default::default()
        };
        let s = LawSetting {
            opt: Optimizer::Sgd,
            beta: 0.5,
            alpha: 1.0,
            init: Init::KaimingUniform,
            adapter_init: AdapterInit::A,
        };
        let low = rank_exponent(s, &[1, 2], 256, &t);
        let high = rank_exponent(s, &[128, 256], 256, &t);
        assert!((low - 1.0).abs() < 0.1, "{low}");
        assert!(high.abs() < 0.15, "{high}");
    }
}
