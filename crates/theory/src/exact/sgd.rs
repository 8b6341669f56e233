//! The SGD first step, exactly: after one step from B = 0, an output entry of the adapter
//! is `-lr gamma^2 sum_{j=1..r} u_j t_j`, a sum of `r` iid products of a bivariate normal
//! pair (`u = a_j . w`, `t = a_j . x` for a row `a_j` of A; proofs/exact-law.md). In units
//! of their standard deviations `(u, t) = (z, rho z + c e)` with `c = sqrt(1 - rho^2)`, and
//! given `G = sum z_j^2 ~ chi^2_r` the sum is `N(rho G, c^2 G)`: its absolute moments are
//! one integral over the chi distribution of the folded normal's closed forms.
use super::folded::{abs_moment, sum_moments};
use super::quad::panel_nodes;

/// Raw moments `E[q^n]`, n = 1..=4, of one term `q = z (rho z + c e)`.
///
/// ```
/// // rho = 1: q = z^2, chi-square(1) moments 1, 3, 15, 105.
/// assert_eq!(rankstab_theory::exact::sgd::term_moments(1.0), [1.0, 3.0, 15.0, 105.0]);
/// ```
pub fn term_moments(rho: f64) -> [f64; 4] {
    let c2 = 1.0 - rho * rho;
    let r2 = rho * rho;
    [
        rho,
        1.0 + 2.0 * r2,
        9.0 * rho + 6.0 * rho * r2,
        105.0 * r2 * r2 + 90.0 * r2 * c2 + 9.0 * c2 * c2,
    ]
}

/// Nodes and normalised weights of the chi distribution with `r` degrees of freedom
/// (density proportional to `y^(r-1) exp(-y^2/2)`), on panels around its mode.
pub fn chi_nodes(r: usize) -> Vec<(f64, f64)> {
    let mode = ((r as f64) - 1.0).max(0.0).sqrt();
    let lo = (mode - 10.0).max(0.0);
    let hi = mode + 10.0;
    let n = ((hi - lo) / 0.5).ceil() as usize;
    let breaks: Vec<f64> = (0..=n)
        .map(|k| lo + (hi - lo) * k as f64 / n as f64)
        .collect();
    let mut nodes = panel_nodes(&breaks);
    let logd = |y: f64| (r as f64 - 1.0) * y.ln() - 0.5 * y * y;
    let top = logd(mode.max(1e-300));
    let total: f64 = nodes
        .iter_mut()
        .map(|(y, w)| {
            *w *= (logd(*y) - top).exp();
            *w
        })
        .sum();
    for (_, w) in &mut nodes {
        *w /= total;
    }
    nodes
}

/// `E|S|^m`, m = 1..=4, of `S = sum_{j=1..r} z_j (rho z_j + c e_j)`: even orders from the
/// cumulants, odd orders by conditioning on the chi-square `G`.
///
/// ```
/// use rankstab_theory::exact::sgd::abs_moments;
/// // rho = 1: S is chi-square(r): E S^m = r (r+2) ... (r+2m-2).
/// let m = abs_moments(4, 1.0, &rankstab_theory::exact::sgd::chi_nodes(4));
/// for (got, want) in m.iter().zip([4.0, 24.0, 192.0, 1920.0]) {
///     assert!((got / want - 1.0).abs() < 1e-10);
/// }
/// ```
pub fn abs_moments(r: usize, rho: f64, chi: &[(f64, f64)]) -> [f64; 4] {
    let raw = sum_moments(term_moments(rho), r as f64);
    let c2 = (1.0 - rho * rho).max(0.0);
    let mut odd = [0.0; 2];
    for &(y, w) in chi {
        let g = y * y;
        odd[0] += w * abs_moment(rho * g, c2 * g, 1);
        odd[1] += w * abs_moment(rho * g, c2 * g, 3);
    }
    [odd[0], raw[1], odd[1], raw[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_quadrature_reproduces_chi_square_moments() {
        for r in [1usize, 2, 3, 7, 64, 2048] {
            let nodes = chi_nodes(r);
            let rf = r as f64;
            for (p, want) in [
                (1, rf),
                (2, rf * (rf + 2.0)),
                (3, rf * (rf + 2.0) * (rf + 4.0)),
            ] {
                let got: f64 = nodes.iter().map(|(y, w)| w * y.powi(2 * p)).sum();
                assert!(
                    (got / want - 1.0).abs() < 1e-11,
                    "r {r} p {p}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn even_orders_by_conditioning_equal_the_cumulant_formula() {
        for r in [1usize, 3, 16, 500] {
            let chi = chi_nodes(r);
            for rho in [0.0, 0.1, 0.5, 0.9, 1.0] {
                let exact = abs_moments(r, rho, &chi);
                let c2 = 1.0 - rho * rho;
                for (k, m) in [(1usize, 2u32), (3, 4)] {
                    let cond: f64 = chi
                        .iter()
                        .map(|&(y, w)| w * abs_moment(rho * y * y, c2 * y * y, m))
                        .sum();
                    assert!(
                        (cond / exact[k] - 1.0).abs() < 1e-10,
                        "r {r} rho {rho} m {m}"
                    );
                }
            }
        }
    }

    /// The chi-square case of the issue: one reused example, the first SGD output is
    /// proportional to gamma^2 chi^2_r, so rsLoRA's m = 4 slope over ranks 4..64 is -0.650
    /// (the two-term law said -0.263).
    #[test]
    fn rslora_fourth_moment_slope_over_ranks_4_to_64() {
        let ranks = [4usize, 8, 16, 32, 64];
        let x: Vec<f64> = ranks.iter().map(|&r| (r as f64).ln()).collect();
        let y: Vec<f64> = ranks
            .iter()
            .map(|&r| {
                let gamma4m = (r as f64).powf(-0.5 * 2.0 * 4.0); // gamma^(2m), m = 4
                (gamma4m * abs_moments(r, 1.0, &chi_nodes(r))[3]).ln()
            })
            .collect();
        let slope = crate::stats::ols_slope(&x, &y);
        assert!((slope + 0.650).abs() < 0.005, "slope {slope}");
    }
}
