//! One term of the first-step sum as a normal mixture, and the absolute moments of a sum of
//! `r` iid terms (proofs/exact-law.md).
//!
//! Every term met here is normal given one scalar latent variable: under Adam
//! `q = h(lambda z) (rho z + c e)` given z (`h(x) = x / (|x| + 1)`, normalised by
//! `nu = lambda / (1 + lambda)`), under SGD `q = u (rho u + c e)` given the entry u of A
//! (Gaussian, or uniform for the input gradient under PEFT's Kaiming-uniform init, where u is
//! a single entry of A). Even orders of the sum follow from the term's moments (an integral
//! over the latent), odd orders from the sum's characteristic function `phi_q(tau)^r`:
//! `E|S| = 2/pi int_0^inf (1 - Re phi_S(tau)) / tau^2 dtau` and
//! `E|S|^3 = 12/pi int_0^inf (Re phi_S(tau) - 1 + tau^2 E[S^2] / 2) / tau^4 dtau`.
//!
//! The Adam term: from zero moments, bias-corrected Adam moves each entry of B by
//! `-lr g / (|g| + eps)`, `g = gamma u`, so an output entry is `-lr gamma sum_j h(lambda z_j) t_j`
//! with `lambda = gamma sd(u) / eps`; `lambda -> infinity` is the sign-like regime, `lambda -> 0`
//! the eps-dominated one, where Adam is SGD with learning rate `lr / eps`.
use super::folded::sum_moments;
use super::quad::{normal_pdf, panel_nodes};
use num_complex::Complex64;

/// A term as a normal mixture: nodes of the latent's integral, each with its weight and the
/// term's conditional mean and half variance.
#[derive(Debug, Clone)]
pub struct Mixture {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    w: f64,
    mean: f64,
    half_var: f64,
}

impl Mixture {
    fn normalised(mut nodes: Vec<Node>) -> Self {
        let total: f64 = nodes.iter().map(|n| n.w).sum();
        for n in &mut nodes {
            n.w /= total;
        }
        Mixture { nodes }
    }

    /// The SGD term with a standard normal entry: `u (rho u + c e)`, u ~ N(0, 1) (for tests:
    /// [`super::sgd`] computes its sums by conditioning on the chi-square).
    pub fn gaussian_product(rho: f64) -> Self {
        let c2 = (1.0 - rho * rho).max(0.0);
        let breaks: Vec<f64> = (0..=12).map(|k| 0.75 * k as f64).collect();
        Self::normalised(
            panel_nodes(&breaks)
                .into_iter()
                .map(|(u, w)| Node {
                    w: 2.0 * normal_pdf(u) * w,
                    mean: rho * u * u,
                    half_var: 0.5 * c2 * u * u,
                })
                .collect(),
        )
    }

    /// The SGD term of the input gradient under a uniform init: `u (rho u + c e)` with u a
    /// single entry of A, uniform with unit variance (on `[-sqrt 3, sqrt 3]`).
    pub fn uniform_entry(rho: f64) -> Self {
        let c2 = (1.0 - rho * rho).max(0.0);
        let b = 3f64.sqrt();
        let breaks: Vec<f64> = (0..=8).map(|k| b * k as f64 / 8.0).collect();
        Self::normalised(
            panel_nodes(&breaks)
                .into_iter()
                .map(|(u, w)| Node {
                    w,
                    mean: rho * u * u,
                    half_var: 0.5 * c2 * u * u,
                })
                .collect(),
        )
    }

    /// The Adam term for correlation `rho` and `lambda = gamma sd(u) / eps`, normalised by
    /// `nu = lambda / (1 + lambda)`.
    pub fn adam(rho: f64, lambda: f64) -> Self {
        let nu = lambda / (1.0 + lambda);
        let mut breaks: Vec<f64> = (0..=12).map(|k| 0.75 * k as f64).collect();
        // Resolve the bend of h at z ~ 1/lambda.
        for k in -2..=3 {
            let b = 2f64.powi(k) / lambda;
            if b > 0.0 && b < 9.0 {
                breaks.push(b);
            }
        }
        breaks.sort_by(f64::total_cmp);
        breaks.dedup();
        let c2 = (1.0 - rho * rho).max(0.0);
        Self::normalised(
            panel_nodes(&breaks)
                .into_iter()
                .map(|(z, w)| {
                    let x = lambda * z;
                    let h = x / (x.abs() + 1.0) / nu;
                    Node {
                        w: 2.0 * normal_pdf(z) * w,
                        mean: rho * h * z,
                        half_var: 0.5 * c2 * h * h,
                    }
                })
                .collect(),
        )
    }

    /// Raw moments `E[q^n]`, n = 1..=4 (normal moments given the latent, averaged).
    pub fn moments(&self) -> [f64; 4] {
        let mut out = [0.0; 4];
        for &Node {
            w,
            mean: mu,
            half_var,
        } in &self.nodes
        {
            let v = 2.0 * half_var;
            out[0] += w * mu;
            out[1] += w * (mu * mu + v);
            out[2] += w * (mu.powi(3) + 3.0 * mu * v);
            out[3] += w * (mu.powi(4) + 6.0 * mu * mu * v + 3.0 * v * v);
        }
        out
    }

    /// `log phi_q(tau)`, accurate near tau = 0 (principal branch: only integer powers of
    /// `phi_q` are taken, for which the branch does not matter).
    pub fn log_cf(&self, tau: f64) -> Complex64 {
        let mut d = Complex64::new(0.0, 0.0);
        let t2 = tau * tau;
        for n in &self.nodes {
            // exp(a + ib) - 1 without cancellation.
            let a = -t2 * n.half_var;
            let (sb, cb) = (tau * n.mean).sin_cos();
            let (sh, _) = (0.5 * tau * n.mean).sin_cos();
            let em1 = a.exp_m1();
            d += n.w * Complex64::new(em1 * cb - 2.0 * sh * sh, (em1 + 1.0) * sb);
        }
        Complex64::new(
            0.5 * (2.0 * d.re + d.norm_sqr()).ln_1p(),
            d.im.atan2(1.0 + d.re),
        )
    }

    /// `E|S|^m`, m = 1..=4, of the sum of `r` iid terms.
    pub fn abs_moments(&self, r: usize) -> [f64; 4] {
        let raw = sum_moments(self.moments(), r as f64);
        // The law is even in rho: work with a non-negative mean.
        let mean = raw[0].abs();
        let var = (raw[1] - mean * mean).max(0.0);
        let sd = var.sqrt();
        // Far from zero the sum never changes sign: odd absolute moments are raw moments
        // (the neglected mass is below the normal tail at 10 sd, e^-50).
        if mean > 10.0 * sd || var == 0.0 {
            return [mean, raw[1], raw[2].abs(), raw[3]];
        }
        let (e1, e3) = self.odd_abs_moments(r, sd, mean, raw);
        [e1, raw[1], e3, raw[3]]
    }

    /// `E|S|` and `E|S|^3` from the characteristic function (module docs).
    fn odd_abs_moments(&self, r: usize, sd: f64, mean: f64, raw: [f64; 4]) -> (f64, f64) {
        let rf = r as f64;
        let (m2, m4) = (raw[1], raw[3]);
        // tau in units of 1/sd: [0, ta] by the Taylor series, [ta, tb] on panels narrow
        // enough for the oscillation of phi_S (phase mean/sd per unit), beyond tb by
        // tau = tb / s.
        let (ta, tb) = (0.01 / sd, 12.0 / sd);
        let width = (0.5_f64).min(1.2 / (1.0 + mean / sd)) / sd;
        let n = ((tb - ta) / width).ceil() as usize;
        let breaks: Vec<f64> = (0..=n)
            .map(|k| ta + (tb - ta) * k as f64 / n as f64)
            .collect();
        let one_minus_re = |tau: f64| {
            let l = self.log_cf(tau) * rf;
            let s = (0.5 * l.im).sin();
            2.0 * s * s - l.im.cos() * l.re.exp_m1()
        };
        // Taylor: 1 - Re phi_S = m2 tau^2 / 2 - m4 tau^4 / 24 + O(m6 tau^6).
        let mut i1 = 0.5 * m2 * ta - m4 * ta.powi(3) / 72.0;
        let mut i3 = m4 * ta / 24.0;
        for (tau, w) in panel_nodes(&breaks) {
            let d = one_minus_re(tau);
            i1 += w * d / (tau * tau);
            i3 += w * (0.5 * tau * tau * m2 - d) / tau.powi(4);
        }
        // Tail: int_tb^inf f(tau) dtau = int_0^1 f(tb / s) tb / s^2 ds.
        let tail = panel_nodes(&[0.0, 0.03, 0.1, 0.25, 0.5, 1.0]);
        for (s, w) in tail {
            let tau = tb / s;
            let d = one_minus_re(tau);
            i1 += w * d / tb;
            // The Re phi / tau^4 part; the rest, (tau^2 m2 / 2 - 1) / tau^4, is added below.
            i3 += w * (1.0 - d) * s * s / tb.powi(3);
        }
        i3 += 0.5 * m2 / tb - 1.0 / (3.0 * tb.powi(3));
        let pi = std::f64::consts::PI;
        (2.0 / pi * i1, 12.0 / pi * i3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::folded::sum_moments;
    use crate::exact::sgd;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    #[test]
    fn sign_limit_moments_are_closed_forms() {
        // lambda -> infinity: q = sign(z) (rho z + c e) = rho |z| + c e'.
        for rho in [0.0, 0.3, 0.8, 1.0] {
            let m = Mixture::adam(rho, 1e9).moments();
            let mean = rho * (2.0 / std::f64::consts::PI).sqrt();
            assert!((m[0] - mean).abs() < 1e-7, "{rho}: {m:?}");
            assert!((m[1] - 1.0).abs() < 1e-7, "{rho}: {m:?}");
            assert!((m[3] - 3.0).abs() < 1e-6, "{rho}: {m:?}");
        }
    }

    #[test]
    fn eps_dominated_limit_is_sgd() {
        // lambda -> 0: h(lambda z) / nu -> z, the SGD term; every absolute moment agrees
        // with the independent chi-square computation of sgd.rs.
        for r in [1usize, 2, 5, 64, 1024] {
            let chi = sgd::chi_nodes(r);
            for rho in [0.0, 0.2, 0.6, 0.95] {
                let a = Mixture::adam(rho, 1e-7).abs_moments(r);
                let s = sgd::abs_moments(r, rho, &chi);
                crate::exact::assert_moments_close(a, s, 2e-6, &format!("r {r} rho {rho}"));
            }
        }
    }

    /// The characteristic-function route against the chi-square conditioning of sgd.rs, two
    /// independent computations of the same Gaussian SGD sums.
    #[test]
    fn gaussian_product_mixture_matches_the_chi_square_route() {
        for r in [1usize, 3, 20, 700] {
            let chi = sgd::chi_nodes(r);
            for rho in [0.0, 0.05, 0.4, 0.97] {
                let a = Mixture::gaussian_product(rho).abs_moments(r);
                let s = sgd::abs_moments(r, rho, &chi);
                crate::exact::assert_moments_close(a, s, 1e-5, &format!("r {r} rho {rho}"));
            }
        }
    }

    /// A uniform entry (kurtosis 9/5): fourth moments from its even moments 1, 9/5, 27/7, 9.
    #[test]
    fn uniform_entry_term_has_the_uniform_moments() {
        for rho in [0.0, 0.3, 1.0] {
            let m = Mixture::uniform_entry(rho).moments();
            let c2 = 1.0 - rho * rho;
            let want = [
                rho,
                rho * rho * 1.8 + c2,
                rho.powi(3) * 27.0 / 7.0 + 3.0 * rho * c2 * 1.8,
                rho.powi(4) * 9.0 + 6.0 * rho * rho * c2 * 27.0 / 7.0 + 3.0 * c2 * c2 * 1.8,
            ];
            for k in 0..4 {
                assert!(
                    (m[k] - want[k]).abs() < 1e-12,
                    "rho {rho} n {}: {} vs {}",
                    k + 1,
                    m[k],
                    want[k]
                );
            }
            // And the sum's fourth moment below the Gaussian one (lighter tails).
            let s = sum_moments(m, 4.0)[3];
            let g = sum_moments(sgd::term_moments(rho), 4.0)[3];
            assert!(s < g, "{s} vs {g}");
        }
    }

    #[test]
    fn odd_moments_match_monte_carlo() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for &(r, rho, lambda) in &[
            (1usize, 0.4, 3.0),
            (3, 0.1, 1e6),
            (8, 0.7, 0.5),
            (40, 0.05, 20.0),
        ] {
            let t = Mixture::adam(rho, lambda);
            let exact = t.abs_moments(r);
            let nu = lambda / (1.0 + lambda);
            let c = (1.0 - rho * rho).sqrt();
            let n = 400_000;
            let (mut s1, mut s3, mut q3) = (0.0, 0.0, 0.0);
            for _ in 0..n {
                let mut s = 0.0;
                for _ in 0..r {
                    let z: f64 = rng.sample(StandardNormal);
                    let e: f64 = rng.sample(StandardNormal);
                    let x = lambda * z;
                    s += x / (x.abs() + 1.0) / nu * (rho * z + c * e);
                }
                s1 += s.abs();
                s3 += s.abs().powi(3);
                q3 += s.abs().powi(6);
            }
            let (e1, e3) = (s1 / n as f64, s3 / n as f64);
            let se3 = ((q3 / n as f64 - e3 * e3) / n as f64).sqrt();
            assert!(
                (e1 / exact[0] - 1.0).abs() < 0.005,
                "r {r}: E|S| {e1} vs {}",
                exact[0]
            );
            assert!(
                (e3 - exact[2]).abs() < 4.0 * se3,
                "r {r}: E|S|^3 {e3} vs {} (se {se3})",
                exact[2]
            );
        }
    }
}
