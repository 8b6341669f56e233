//! The exact law tabulated for the ranks of a run: `E|S_r|^m` over the angle between a
//! gradient direction and an input (and, for Adam, over `lambda`), interpolated per pair of
//! (output entry, input). Values are stored as logarithms (they span many orders of
//! magnitude across the angle) and interpolated with 4-point Lagrange cubics, whose error
//! on these smooth functions is far below the Monte Carlo's (tested against direct
//! evaluation off the grid).
use super::{mixture::Mixture, sgd};
use rayon::prelude::*;
use std::sync::RwLock;

/// A uniform grid on `[lo, hi]` with `n` points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    /// First point.
    pub lo: f64,
    /// Last point.
    pub hi: f64,
    /// Number of points (>= 4).
    pub n: usize,
}

impl Grid {
    /// The k-th point.
    pub fn at(&self, k: usize) -> f64 {
        self.lo + (self.hi - self.lo) * k as f64 / (self.n - 1) as f64
    }

    /// The first of the 4 points around `x` (clamped into the grid) and their Lagrange
    /// weights.
    pub fn cubic(&self, x: f64) -> (usize, [f64; 4]) {
        let h = (self.hi - self.lo) / (self.n - 1) as f64;
        let u = ((x - self.lo) / h).clamp(0.0, (self.n - 1) as f64);
        let i = (u.floor() as usize).saturating_sub(1).min(self.n - 4);
        let t = u - i as f64; // position relative to point i, in [0, 3]
        let w = [
            -(t - 1.0) * (t - 2.0) * (t - 3.0) / 6.0,
            t * (t - 2.0) * (t - 3.0) / 2.0,
            -t * (t - 1.0) * (t - 3.0) / 2.0,
            t * (t - 1.0) * (t - 2.0) / 6.0,
        ];
        (i, w)
    }
}

/// The grid variable for the correlation at rank r: the mean of `atan(sqrt(r) rho / c)`
/// and `asin(rho) = atan(rho / c)` (`c = sqrt(1 - rho^2)`), in [0, pi/2]. The first term is
/// the sum's mean over its spread up to a constant, so the law turns from incoherent to
/// coherent over the same stretch of the variable at every rank (a grid uniform in the angle
/// would need ever finer steps near rho = 0 as r grows); the second keeps the coherent side
/// from being squeezed. The law is smooth in it at both ends (even in rho; smooth in the
/// angle at rho = 1).
pub fn coherence_var(r: usize, rho: f64) -> f64 {
    Corr::new(rho).var(r)
}

/// A correlation with the rank-independent parts of [`coherence_var`] computed once.
#[derive(Debug, Clone, Copy)]
pub struct Corr {
    rho: f64,
    c: f64,
    asin: f64,
}

impl Corr {
    /// The correlation `rho` (its sign does not matter: the law is even in rho).
    pub fn new(rho: f64) -> Self {
        let rho = rho.abs().min(1.0);
        let c = (1.0 - rho * rho).sqrt();
        Corr {
            rho,
            c,
            asin: rho.atan2(c),
        }
    }

    /// [`coherence_var`] at rank `r` (its square root given as `sqrt_r`).
    pub fn var_sqrt(&self, sqrt_r: f64) -> f64 {
        0.5 * ((sqrt_r * self.rho).atan2(self.c) + self.asin)
    }

    /// [`coherence_var`] at rank `r`.
    pub fn var(&self, r: usize) -> f64 {
        self.var_sqrt((r as f64).sqrt())
    }
}

/// The correlation at grid variable `v` and rank `r` (inverse of [`coherence_var`], by
/// bisection: it is increasing in rho).
pub fn rho_at(r: usize, v: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if coherence_var(r, mid) < v {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The uniform grid of [`coherence_var`] values.
pub fn coherence_grid(n: usize) -> Grid {
    Grid {
        lo: 0.0,
        hi: std::f64::consts::FRAC_PI_2,
        n,
    }
}

fn log4(v: [f64; 4]) -> [f64; 4] {
    v.map(|x| x.max(1e-300).ln())
}

/// Which SGD sum a [`RankTable`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SgdTerm {
    /// `u (rho u + c e)` with u standard normal: the adapter's outputs (u a linear form of
    /// A's row), and the input gradient under a Gaussian init.
    Gaussian,
    /// `u (rho u + c e)` with u uniform of unit variance: the input gradient under the
    /// Kaiming-uniform init (u a single entry of A).
    UniformEntry,
}

/// `ln E|S_r|^m` of an SGD sum for each rank and [`coherence_var`] (computed eagerly: one
/// dimension, a few thousand points).
#[derive(Debug, Clone)]
pub struct RankTable {
    ranks: Vec<usize>,
    grid: Grid,
    vals: Vec<[f64; 4]>,
}

impl RankTable {
    /// Grid points per rank.
    pub const POINTS: usize = 129;

    /// The table of `term` for `ranks`.
    pub fn new(ranks: &[usize], term: SgdTerm) -> Self {
        let grid = coherence_grid(Self::POINTS);
        let vals = ranks
            .par_iter()
            .flat_map_iter(|&r| {
                let chi = sgd::chi_nodes(r);
                (0..grid.n)
                    .map(|k| {
                        let rho = rho_at(r, grid.at(k));
                        log4(match term {
                            SgdTerm::Gaussian => sgd::abs_moments(r, rho, &chi),
                            SgdTerm::UniformEntry => Mixture::uniform_entry(rho).abs_moments(r),
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        RankTable {
            ranks: ranks.to_vec(),
            grid,
            vals,
        }
    }

    /// The ranks, in table order.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// `E|S|^m`, m = 1..=4, for the rank at `ri` and correlation `rho`.
    pub fn get(&self, ri: usize, rho: f64) -> [f64; 4] {
        self.get_at(ri, self.grid.cubic(coherence_var(self.ranks[ri], rho)))
    }

    /// The grid position of the coherence variable `v` ([`Corr::var`]).
    pub fn locate(&self, v: f64) -> (usize, [f64; 4]) {
        self.grid.cubic(v)
    }

    /// `E|S|^m` for the rank at `ri` at a grid position from [`Self::locate`].
    pub fn get_at(&self, ri: usize, (i, w): (usize, [f64; 4])) -> [f64; 4] {
        let base = ri * self.grid.n + i;
        let mut out = [0.0; 4];
        for (k, wk) in w.iter().enumerate() {
            for (o, v) in out.iter_mut().zip(self.vals[base + k]) {
                *o += wk * v;
            }
        }
        out.map(f64::exp)
    }
}

/// `ln E|S_r|^m` of the normalised Adam sum for each rank, [`coherence_var`] and
/// `ln lambda`, computed lazily: only the grid points around the pairs a run meets
/// ([`AdamTable::ensure`]), kept for the rest of the run.
#[derive(Debug)]
pub struct AdamTable {
    ranks: Vec<usize>,
    grid: Grid,
    lnlam: Grid,
    /// Dense over (rank, grid, lambda); NaN where not computed yet.
    cells: RwLock<Vec<[f64; 4]>>,
}

impl AdamTable {
    /// `lambda` outside this range is clamped to it: within 1e-4 of the eps-dominated and of
    /// the sign-like limit there.
    pub const LAMBDA_RANGE: (f64, f64) = (1e-4, 1e4);

    /// An empty table for `ranks`.
    pub fn new(ranks: &[usize]) -> Self {
        let grid = coherence_grid(65);
        let lnlam = Grid {
            lo: Self::LAMBDA_RANGE.0.ln(),
            hi: Self::LAMBDA_RANGE.1.ln(),
            n: 49,
        };
        AdamTable {
            ranks: ranks.to_vec(),
            grid,
            lnlam,
            cells: RwLock::new(vec![[f64::NAN; 4]; ranks.len() * grid.n * lnlam.n]),
        }
    }

    fn index(&self, ri: usize, k: usize, l: usize) -> usize {
        (ri * self.grid.n + k) * self.lnlam.n + l
    }

    /// The grid position of the coherence variable `v` ([`Corr::var`]).
    pub fn locate_corr(&self, v: f64) -> (usize, [f64; 4]) {
        self.grid.cubic(v)
    }

    /// The grid position of `lambda` (clamped to [`Self::LAMBDA_RANGE`]).
    pub fn locate_lambda(&self, lambda: f64) -> (usize, [f64; 4]) {
        let (lo, hi) = Self::LAMBDA_RANGE;
        self.lnlam.cubic(lambda.clamp(lo, hi).ln())
    }

    /// Computes (in parallel) the grid points that interpolation at the grid positions
    /// `blocks` (rank index, first grid index, first lambda index) needs and that are not
    /// there yet.
    pub fn ensure_blocks(&self, blocks: impl IntoIterator<Item = (usize, usize, usize)>) {
        let mut need = Vec::new();
        {
            let have = self.cells.read().unwrap_or_else(|e| e.into_inner());
            let mut seen = vec![false; have.len()];
            for (ri, i, j) in blocks {
                if seen[self.index(ri, i, j)] {
                    continue;
                }
                seen[self.index(ri, i, j)] = true;
                for a in i..i + 4 {
                    for b in j..j + 4 {
                        if have[self.index(ri, a, b)][0].is_nan() {
                            need.push((ri, a, b));
                        }
                    }
                }
            }
        }
        need.sort_unstable();
        need.dedup();
        if need.is_empty() {
            return;
        }
        let computed: Vec<(usize, [f64; 4])> = need
            .par_iter()
            .map(|&(ri, k, l)| {
                let r = self.ranks[ri];
                let term = Mixture::adam(rho_at(r, self.grid.at(k)), self.lnlam.at(l).exp());
                (self.index(ri, k, l), log4(term.abs_moments(r)))
            })
            .collect();
        let mut cells = self.cells.write().unwrap_or_else(|e| e.into_inner());
        for (x, v) in computed {
            cells[x] = v;
        }
    }

    /// `E|S|^m`, m = 1..=4, of the normalised sum for the rank at `ri`, correlation `rho`
    /// and `lambda` (computing the grid points it needs first).
    pub fn get(&self, ri: usize, rho: f64, lambda: f64) -> [f64; 4] {
        let pi = self.locate_corr(coherence_var(self.ranks[ri], rho));
        let pj = self.locate_lambda(lambda);
        self.ensure_blocks([(ri, pi.0, pj.0)]);
        self.reader().get_at(ri, pi, pj)
    }

    /// Read access for many lookups; every position looked up must have been ensured.
    pub fn reader(&self) -> AdamReader<'_> {
        AdamReader {
            table: self,
            cells: self.cells.read().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// Lookups in an [`AdamTable`] under one read lock.
pub struct AdamReader<'a> {
    table: &'a AdamTable,
    cells: std::sync::RwLockReadGuard<'a, Vec<[f64; 4]>>,
}

impl AdamReader<'_> {
    /// As [`AdamTable::get`], at grid positions ensured before.
    pub fn get_at(
        &self,
        ri: usize,
        (i, wi): (usize, [f64; 4]),
        (j, wj): (usize, [f64; 4]),
    ) -> [f64; 4] {
        let mut out = [0.0; 4];
        for (a, wa) in wi.iter().enumerate() {
            let row = self.table.index(ri, i + a, j);
            for (b, wb) in wj.iter().enumerate() {
                let w = wa * wb;
                for (o, v) in out.iter_mut().zip(self.cells[row + b]) {
                    *o += w * v;
                }
            }
        }
        out.map(f64::exp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_reproduce_cubics() {
        let g = Grid {
            lo: -1.0,
            hi: 2.0,
            n: 7,
        };
        let f = |x: f64| 2.0 - x + 0.5 * x * x - 0.25 * x.powi(3);
        for x in [-1.0, -0.9, 0.3, 1.1, 1.99, 2.0] {
            let (i, w) = g.cubic(x);
            let v: f64 = (0..4).map(|k| w[k] * f(g.at(i + k))).sum();
            assert!((v - f(x)).abs() < 1e-12, "{x}");
        }
    }

    #[test]
    fn tables_interpolate_to_direct_evaluation() {
        let ranks = [1usize, 4, 37, 512];
        let s = RankTable::new(&ranks, SgdTerm::Gaussian);
        let u = RankTable::new(&ranks, SgdTerm::UniformEntry);
        let a = AdamTable::new(&ranks);
        for (ri, &r) in ranks.iter().enumerate() {
            let chi = sgd::chi_nodes(r);
            for rho in [0.0, 0.0013, 0.013, 0.041, 0.27, 0.61, 0.93, 0.999] {
                let direct = sgd::abs_moments(r, rho, &chi);
                let got = s.get(ri, rho);
                crate::exact::assert_moments_close(
                    got,
                    direct,
                    1e-5,
                    &format!("sgd r {r} rho {rho}"),
                );
                let direct = Mixture::uniform_entry(rho).abs_moments(r);
                let got = u.get(ri, rho);
                crate::exact::assert_moments_close(
                    got,
                    direct,
                    1e-5,
                    &format!("uniform r {r} rho {rho}"),
                );
                for lambda in [3e-4, 0.07, 1.3, 45.0, 2e3] {
                    let direct = Mixture::adam(rho, lambda).abs_moments(r);
                    let got = a.get(ri, rho, lambda);
                    crate::exact::assert_moments_close(
                        got,
                        direct,
                        2e-4,
                        &format!("adam r {r} rho {rho} lambda {lambda}"),
                    );
                }
            }
        }
    }
}
