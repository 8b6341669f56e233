//! The exact first-step law of every moment (proofs/exact-law.md).
//!
//! After one optimizer step from `B = 0`, an output entry of an adapter is a sum of `r`
//! independent, identically distributed terms, one per row `a_j` of A: `u_j t_j` under SGD
//! and `h(gamma u_j / eps) t_j` under Adam, with `u_j = a_j . w` (w: the entry's gradient
//! direction from the training batch) and `t_j = a_j . x` (x: the input it is evaluated on).
//! Given the data, `(u, t)` is a bivariate normal pair (exactly for Gaussian A; up to the
//! O(1/d) fourth-cumulant term for other iid inits), so `E_A|y|^m` depends on the data only
//! through `|w|`, `|x|` and the angle between them, and on the rank through the number of
//! terms: [`sgd`] and [`mixture`] compute it for m = 1..=4, [`table`] tabulates it over the
//! correlation (and Adam's `lambda`) for the ranks of a run, [`pairs`] averages it over a
//! layer's (entry, input) pairs, [`rows`] writes the `law` rows of a trial.
pub mod folded;
pub mod mixture;
pub mod pairs;
pub mod quad;
pub mod rows;
pub mod sgd;
pub mod table;

/// Test helper: the four absolute moments `got` each within relative `tol` of `want`.
#[cfg(test)]
pub(crate) fn assert_moments_close(got: [f64; 4], want: [f64; 4], tol: f64, what: &str) {
    for m in 0..4 {
        assert!(
            (got[m] / want[m] - 1.0).abs() < tol,
            "{what} m {}: {} vs {}",
            m + 1,
            got[m],
            want[m]
        );
    }
}
