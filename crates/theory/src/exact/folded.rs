//! Absolute moments of a normal variable and raw moments of sums of iid terms.
use statrs::function::erf::erf;

/// `E|X|^m` for `X ~ N(mu, var)`, `m = 1..=4` (the folded normal's moments).
///
/// ```
/// use rankstab_theory::exact::folded::abs_moment;
/// assert!((abs_moment(0.0, 1.0, 1) - (2.0 / std::f64::consts::PI).sqrt()).abs() < 1e-15);
/// assert_eq!(abs_moment(2.0, 0.0, 3), 8.0);
/// assert_eq!(abs_moment(1.0, 2.0, 4), 1.0 + 12.0 + 12.0);
/// ```
///
/// # Panics
/// An order outside 1..=4.
pub fn abs_moment(mu: f64, var: f64, m: u32) -> f64 {
    let mu2 = mu * mu;
    match m {
        2 => return mu2 + var,
        4 => return mu2 * mu2 + 6.0 * mu2 * var + 3.0 * var * var,
        1 | 3 => {}
        _ => panic!("absolute moments of order {m} are not implemented (1..=4)"),
    }
    if var <= 0.0 {
        return mu.abs().powi(m as i32);
    }
    let sd = var.sqrt();
    let g = (2.0 / std::f64::consts::PI).sqrt() * sd * (-0.5 * mu2 / var).exp();
    let e = erf(mu / (sd * std::f64::consts::SQRT_2));
    if m == 1 {
        g + mu * e
    } else {
        (mu2 + 2.0 * var) * g + mu * (mu2 + 3.0 * var) * e
    }
}

/// Raw moments `E[S^n]`, n = 1..=4, of a sum of `r` iid copies of a variable whose raw
/// moments are `mq = [E q, E q^2, E q^3, E q^4]` (through the cumulants, which add).
///
/// ```
/// use rankstab_theory::exact::folded::sum_moments;
/// // A sum of r squared standard normals is chi-square(r): r, r(r+2), r(r+2)(r+4), ...
/// let s = sum_moments([1.0, 3.0, 15.0, 105.0], 5.0);
/// assert_eq!(s, [5.0, 35.0, 315.0, 3465.0]);
/// ```
pub fn sum_moments(mq: [f64; 4], r: f64) -> [f64; 4] {
    let [m1, m2, m3, m4] = mq;
    let k1 = r * m1;
    let k2 = r * (m2 - m1 * m1);
    let k3 = r * (m3 - 3.0 * m2 * m1 + 2.0 * m1.powi(3));
    let k4 = r * (m4 - 4.0 * m3 * m1 - 3.0 * m2 * m2 + 12.0 * m2 * m1 * m1 - 6.0 * m1.powi(4));
    [
        k1,
        k2 + k1 * k1,
        k3 + 3.0 * k2 * k1 + k1.powi(3),
        k4 + 4.0 * k3 * k1 + 3.0 * k2 * k2 + 6.0 * k2 * k1 * k1 + k1.powi(4),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::quad::{normal_pdf, panel_nodes};

    #[test]
    fn folded_moments_match_numerical_integration() {
        for &(mu, var) in &[(0.0, 1.0), (0.7, 0.3), (-2.0, 1.5), (3.0, 0.01), (0.1, 4.0)] {
            let sd: f64 = f64::sqrt(var);
            // Panels with a break at the kink of |mu + sd z|.
            let mut breaks: Vec<f64> = (0..=160).map(|k| -20.0 + 0.25 * k as f64).collect();
            breaks.push(-mu / sd);
            breaks.sort_by(f64::total_cmp);
            let nodes = panel_nodes(&breaks);
            for m in 1..=4 {
                let num: f64 = nodes
                    .iter()
                    .map(|&(z, w)| w * normal_pdf(z) * (mu + sd * z).abs().powi(m as i32))
                    .sum();
                let exact = abs_moment(mu, var, m);
                assert!(
                    (num / exact - 1.0).abs() < 1e-10,
                    "mu {mu} var {var} m {m}: {num} vs {exact}"
                );
            }
        }
    }
}
