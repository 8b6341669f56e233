//! The data side of the exact law: for every (output entry, input) pair of an adapter, the
//! norms of its two linear forms and the correlation between them, and the law's average
//! over the pairs at a rank.
use super::table::{AdamTable, Corr, RankTable};
use ndarray::{Array2, ArrayView2, Axis};

/// Pairs of (entry, input): `a[i]` = |w_i| for the entry's linear form `u = a_j . w_i`,
/// `b[n]` = |x_n| for the input's `t = a_j . x_n`, and `rho[n * a.len() + i]` their
/// correlation `w_i . x_n / (|w_i| |x_n|)` (0 when either is zero).
#[derive(Debug, Clone, Default)]
pub struct Pairs {
    /// Norm of each entry's gradient direction.
    pub a: Vec<f64>,
    /// Norm of each input.
    pub b: Vec<f64>,
    /// Correlations, input-major.
    pub rho: Vec<f64>,
}

fn row_norms(m: &Array2<f64>) -> Vec<f64> {
    m.axis_iter(Axis(0))
        .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect()
}

fn corr(dot: f64, a: f64, b: f64) -> f64 {
    if a > 0.0 && b > 0.0 {
        (dot / (a * b)).clamp(-1.0, 1.0)
    } else {
        0.0
    }
}

/// At most this many entries (output coordinates, or input coordinates of the input
/// gradient) per layer enter the law's average: every k-th one, `k = ceil(width / MAX_ENTRIES)`.
/// The law is exact for each pair; the mean over an evenly spread subset of a wide layer's
/// entries differs from the mean over all of them by far less than the Monte Carlo's own
/// sampling error, and the cost of the law stays a small part of a trial's.
pub const MAX_ENTRIES: usize = 1024;

/// Every k-th column of `m`, so that at most [`MAX_ENTRIES`] remain.
fn spread_columns(m: ArrayView2<f64>) -> Array2<f64> {
    let k = m.ncols().div_ceil(MAX_ENTRIES).max(1);
    m.slice(ndarray::s![.., ..;k]).to_owned()
}

impl Pairs {
    /// The adapter's outputs: entry i's gradient direction is `w_i = sum_k v_ki u_k` over
    /// the training rows k (u: K x d_in, each row already weighted by its coefficient; v:
    /// K x d_out), evaluated on the inputs `x` (n x d_in).
    pub fn forward(u: ArrayView2<f64>, v: ArrayView2<f64>, x: ArrayView2<f64>) -> Self {
        let v = spread_columns(v);
        let gram = u.dot(&u.t()); // K x K
        let gv = gram.dot(&v); // K x d_out
        let a: Vec<f64> = (&gv * &v)
            .sum_axis(Axis(0))
            .iter()
            .map(|s| s.max(0.0).sqrt())
            .collect();
        let dots = x.dot(&u.t()).dot(&v); // n x entries: w_i . x_n
        let b = row_norms(&x.to_owned());
        let mut rho = Vec::with_capacity(dots.len());
        for (n, row) in dots.axis_iter(Axis(0)).enumerate() {
            rho.extend(row.iter().zip(&a).map(|(d, ai)| corr(*d, *ai, b[n])));
        }
        Pairs { a, b, rho }
    }

    /// The gradient into the adapter's input: for an output gradient `v'_n` the first step
    /// gives `-lr gamma^2 A^T A z_n` with `z_n = sum_k (v_k . v'_n) u_k`; coordinate l is a
    /// sum over rows of A of `a_jl (a_j . z_n)`, so the pair is (e_l, z_n): `a = 1`.
    pub fn backward(u: ArrayView2<f64>, v: ArrayView2<f64>, v_out: ArrayView2<f64>) -> Self {
        let full = v_out.dot(&v.t()).dot(&u); // n x d_in
                                              // |z_n| over every coordinate; the pairs over an evenly spread subset of them.
        let b = row_norms(&full);
        let z = spread_columns(full.view());
        let d_in = z.ncols();
        let mut rho = Vec::with_capacity(z.len());
        for (n, row) in z.axis_iter(Axis(0)).enumerate() {
            rho.extend(row.iter().map(|zl| corr(*zl, 1.0, b[n])));
        }
        Pairs {
            a: vec![1.0; d_in],
            b,
            rho,
        }
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.rho.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.rho.is_empty()
    }

    /// The correlations with their rank-independent parts computed once.
    pub fn corrs(&self) -> Vec<Corr> {
        self.rho.iter().map(|&r| Corr::new(r)).collect()
    }

    /// SGD: the mean over pairs of `(a b)^m E|S_r|^m`, m = 1..=4, for rank `r` at `ri` of
    /// `table` (`corrs` from [`Self::corrs`]). Times `(lr gamma^2 s^2)^m` it is the mean
    /// `E_A |y|^m` over the pairs.
    pub fn sgd_mean(&self, corrs: &[Corr], table: &RankTable, ri: usize, r: usize) -> [f64; 4] {
        let sqrt_r = (r as f64).sqrt();
        let mut acc = [0.0; 4];
        let ni = self.a.len();
        for (p, corr) in corrs.iter().enumerate() {
            let ab = self.a[p % ni] * self.b[p / ni];
            let f = table.get_at(ri, table.locate(corr.var_sqrt(sqrt_r)));
            let mut s = 1.0;
            for (o, fm) in acc.iter_mut().zip(f) {
                s *= ab;
                *o += s * fm;
            }
        }
        acc.map(|v| v / self.len().max(1) as f64)
    }

    /// Adam: the mean over pairs of `(nu b)^m E|S_r|^m` for rank `r` at `ri`, where
    /// `lambda = lam_per_a * a` (`lam_per_a = gamma s / eps`) and `nu = lambda / (1 + lambda)`.
    /// Times `(lr gamma s)^m` it is the mean `E_A |y|^m`.
    pub fn adam_mean(
        &self,
        corrs: &[Corr],
        table: &AdamTable,
        ri: usize,
        r: usize,
        lam_per_a: f64,
    ) -> [f64; 4] {
        let sqrt_r = (r as f64).sqrt();
        // lambda depends on the entry only.
        let lam: Vec<(f64, (usize, [f64; 4]))> = self
            .a
            .iter()
            .map(|&a| {
                let l = lam_per_a * a;
                (l / (1.0 + l), table.locate_lambda(l))
            })
            .collect();
        let ni = self.a.len();
        let pos: Vec<(usize, [f64; 4])> = corrs
            .iter()
            .map(|c| table.locate_corr(c.var_sqrt(sqrt_r)))
            .collect();
        table.ensure_blocks(
            pos.iter()
                .enumerate()
                .map(|(p, pi)| (ri, pi.0, lam[p % ni].1 .0)),
        );
        let reader = table.reader();
        let mut acc = [0.0; 4];
        for (p, pi) in pos.iter().enumerate() {
            let (nu, pj) = lam[p % ni];
            let nub = nu * self.b[p / ni];
            let f = reader.get_at(ri, *pi, pj);
            let mut s = 1.0;
            for (o, fm) in acc.iter_mut().zip(f) {
                s *= nub;
                *o += s * fm;
            }
        }
        acc.map(|v| v / self.len().max(1) as f64)
    }
}
