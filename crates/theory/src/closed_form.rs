//! The exact first-step SGD moment (proofs/first-step.md).
//!
//! After one SGD step from B_0 = 0 on a training batch with adapter inputs U (N x d) and
//! output gradients V (N x d), the adapter is -eta gamma^2 V^T U A^T A. For a test input x
//! and A with iid entries of variance s^2 and kurtosis k4,
//!
//! sum_i E[y_i^2] = eta^2 gamma^4 s^4 [ r (|x|^2 tr(G H) + c^T H c + (k4 - 3) sum_j x_j^2 q_j)
//!                                      + r^2 c^T H c ],
//!
//! with G = U U^T, H = V V^T, c = U x, q_j = U_{:,j}^T H U_{:,j}. Summed over a test batch,
//! this is eta^2 gamma^4 s^4 (r * lin + r^2 * quad): [`Coefficients`].
use ndarray::{Array2, Axis, Zip};

/// The two coefficients of the exact first-step second moment, summed over a test batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Coefficients {
    /// Coefficient of r (the incoherent, fluctuation term).
    pub lin: f64,
    /// Coefficient of r^2 (the coherent term).
    pub quad: f64,
    /// Number of entries of the test output (test examples x width), to turn sums into means.
    pub entries: f64,
}

impl Coefficients {
    /// Computes the coefficients from the training adapter inputs `u`, output gradients `v`
    /// (both N x d), the test adapter inputs `x` (Nt x d) and the kurtosis of A's entries.
    pub fn new(u: &Array2<f32>, v: &Array2<f32>, x: &Array2<f32>, kurtosis: f64) -> Self {
        let u = u.mapv(f64::from);
        let v = v.mapv(f64::from);
        let x = x.mapv(f64::from);
        let h = v.dot(&v.t());
        let g = u.dot(&u.t());
        let tr_gh: f64 = Zip::from(&g).and(&h).fold(0.0, |acc, &a, &b| acc + a * b);
        let c = u.dot(&x.t()); // N x Nt
        let hc = h.dot(&c);
        let chc: f64 = Zip::from(&c).and(&hc).fold(0.0, |acc, &a, &b| acc + a * b);
        let x_sq: f64 = x.iter().map(|v| v * v).sum();
        let hu = h.dot(&u); // N x d
        let q = (&hu * &u).sum_axis(Axis(0)); // d
        let x2 = x.mapv(|v| v * v).sum_axis(Axis(0)); // d
        let kurt: f64 = Zip::from(&q).and(&x2).fold(0.0, |acc, &a, &b| acc + a * b);
        Self {
            lin: x_sq * tr_gh + chc + (kurtosis - 3.0) * kurt,
            quad: chc,
            entries: (x.nrows() * u.ncols()) as f64,
        }
    }

    /// Mean over test entries of E[y^2] after one SGD step, for rank `r`, learning rate
    /// `lr`, scaling `gamma` and A-variance `s2`.
    pub fn mean_second_moment(&self, r: usize, lr: f64, gamma: f64, s2: f64) -> f64 {
        let r = r as f64;
        lr * lr * gamma.powi(4) * s2 * s2 * (r * self.lin + r * r * self.quad) / self.entries
    }

    /// Coherence ratio quad / lin: the rank at which the coherent term overtakes is 1/ratio.
    pub fn kappa(&self) -> f64 {
        if self.lin > 0.0 {
            self.quad / self.lin
        } else {
            0.0
        }
    }
}
