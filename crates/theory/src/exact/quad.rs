//! Quadrature: Gauss-Legendre rules and composite integration over panels.
use std::sync::OnceLock;

/// Nodes and weights of the n-point Gauss-Legendre rule on [-1, 1] (Newton's method on
/// the Legendre polynomial, from the Chebyshev guess).
///
/// ```
/// let (x, w) = rankstab_theory::exact::quad::gauss_legendre(8);
/// // Exact for polynomials of degree <= 15: the integral of t^14 over [-1, 1] is 2/15.
/// let i: f64 = x.iter().zip(&w).map(|(x, w)| w * x.powi(14)).sum();
/// assert!((i - 2.0 / 15.0).abs() < 1e-14);
/// ```
pub fn gauss_legendre(n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut x = vec![0.0; n];
    let mut w = vec![0.0; n];
    let m = n.div_ceil(2);
    for i in 0..m {
        let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut dp = 0.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, 0.0);
            for j in 0..n {
                let p2 = p1;
                p1 = p0;
                p0 = ((2 * j + 1) as f64 * z * p1 - j as f64 * p2) / (j + 1) as f64;
            }
            dp = n as f64 * (z * p0 - p1) / (z * z - 1.0);
            let dz = p0 / dp;
            z -= dz;
            if dz.abs() < 1e-15 {
                break;
            }
        }
        x[i] = -z;
        x[n - 1 - i] = z;
        w[i] = 2.0 / ((1.0 - z * z) * dp * dp);
        w[n - 1 - i] = w[i];
    }
    (x, w)
}

/// The 8-point rule, computed once.
pub fn gl8() -> &'static (Vec<f64>, Vec<f64>) {
    static RULE: OnceLock<(Vec<f64>, Vec<f64>)> = OnceLock::new();
    RULE.get_or_init(|| gauss_legendre(8))
}

/// Nodes and weights of the 8-point rule applied on every panel between consecutive
/// `breaks` (sorted, increasing).
pub fn panel_nodes(breaks: &[f64]) -> Vec<(f64, f64)> {
    let (x, w) = gl8();
    let mut out = Vec::with_capacity(8 * breaks.len());
    for p in breaks.windows(2) {
        let (a, b) = (p[0], p[1]);
        if b <= a {
            continue;
        }
        let (h, c) = (0.5 * (b - a), 0.5 * (a + b));
        out.extend(x.iter().zip(w).map(|(x, w)| (c + h * x, h * w)));
    }
    out
}

/// The standard normal density.
pub fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}
