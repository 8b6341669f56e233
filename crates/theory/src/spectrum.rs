//! The rank an adapter actually uses: singular values of the learned update `gamma B A`
//! and the usual summaries of how its spectral mass spreads over directions.
//!
//! `B A` (d x d, rank <= r) is never formed: with thin QR factorisations `B = Q_B R_B` and
//! `A^T = Q_A R_A`, `B A = Q_B (R_B R_A^T) Q_A^T`, so its singular values are those of the
//! r x r matrix `R_B R_A^T` (nalgebra's QR and SVD). Cost `O(d r^2 + r^3)`.
use nalgebra::DMatrix;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

/// The singular values of `gamma B A`, largest first (`b`: d x r, `a`: r x d).
///
/// ```
/// use ndarray::array;
/// // B A = 2 e1 e1^T + 1 e2 e2^T (with gamma = 1): singular values 2 and 1.
/// let b = array![[2.0f32, 0.0], [0.0, 1.0], [0.0, 0.0]];
/// let a = array![[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0]];
/// let sv = rankstab_theory::spectrum::update_singular_values(&b, &a, 1.0);
/// assert!((sv[0] - 2.0).abs() < 1e-12 && (sv[1] - 1.0).abs() < 1e-12);
/// ```
pub fn update_singular_values(b: &Array2<f32>, a: &Array2<f32>, gamma: f32) -> Vec<f64> {
    let (d_out, r) = b.dim();
    let d_in = a.ncols();
    if r == 0 || d_out == 0 || d_in == 0 {
        return Vec::new();
    }
    let bm = DMatrix::<f64>::from_fn(d_out, r, |i, j| f64::from(b[[i, j]]));
    let atm = DMatrix::<f64>::from_fn(d_in, r, |i, j| f64::from(a[[j, i]]));
    // Thin QR needs at least as many rows as columns; ranks are validated <= width.
    let core = if d_out >= r && d_in >= r {
        let rb = bm.qr().r();
        let ra = atm.qr().r();
        rb * ra.transpose()
    } else {
        bm * atm.transpose()
    };
    let mut sv: Vec<f64> = core
        .singular_values()
        .iter()
        .map(|s| s * f64::from(gamma).abs())
        .collect();
    sv.sort_by(|x, y| y.total_cmp(x));
    sv
}

/// How many leading directions [`Spectrum::top_share`] counts.
pub const TOP_K: usize = 8;

/// Summaries of a spectrum (all NaN for a zero update).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Spectrum {
    /// Frobenius norm `sqrt(sum s_i^2)`.
    pub frobenius: f64,
    /// Stable rank `sum s_i^2 / s_1^2` (between 1 and r).
    pub stable_rank: f64,
    /// Effective rank (Roy and Vetterli 2007): `exp(-sum p_i ln p_i)` with
    /// `p_i = s_i / sum s_j` (between 1 and r).
    pub effective_rank: f64,
    /// Share of the spectral mass `sum s_i^2` in the top [`TOP_K`] directions.
    pub top_share: f64,
}

impl Spectrum {
    /// Summaries of the singular values `sv` (any order).
    ///
    /// ```
    /// use rankstab_theory::spectrum::Spectrum;
    /// // Four equal singular values: every notion of rank says 4.
    /// let s = Spectrum::of(&[1.0, 1.0, 1.0, 1.0]);
    /// assert!((s.stable_rank - 4.0).abs() < 1e-12 && (s.effective_rank - 4.0).abs() < 1e-12);
    /// assert_eq!(s.top_share, 1.0);
    /// // One dominant direction: both near 1.
    /// let s = Spectrum::of(&[10.0, 0.01, 0.01]);
    /// assert!(s.stable_rank < 1.01 && s.effective_rank < 1.02);
    /// ```
    pub fn of(sv: &[f64]) -> Self {
        let sum_sq: f64 = sv.iter().map(|s| s * s).sum();
        let sum: f64 = sv.iter().sum();
        let max = sv.iter().copied().fold(0.0f64, f64::max);
        if !(sum_sq > 0.0 && sum_sq.is_finite()) {
            return Spectrum {
                frobenius: if sum_sq == 0.0 { 0.0 } else { f64::NAN },
                stable_rank: f64::NAN,
                effective_rank: f64::NAN,
                top_share: f64::NAN,
            };
        }
        let entropy: f64 = sv
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|&s| {
                let p = s / sum;
                -p * p.ln()
            })
            .sum();
        let mut sorted = sv.to_vec();
        sorted.sort_by(|x, y| y.total_cmp(x));
        let top: f64 = sorted.iter().take(TOP_K).map(|s| s * s).sum();
        Spectrum {
            frobenius: sum_sq.sqrt(),
            stable_rank: sum_sq / (max * max),
            effective_rank: entropy.exp(),
            top_share: top / sum_sq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Against the singular values of the explicitly formed d x d product (nalgebra's SVD
    /// of the full matrix), for random factors.
    #[test]
    fn singular_values_match_the_formed_product() {
        let (d, r) = (12, 5);
        let b = Array2::from_shape_fn((d, r), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
        let a = Array2::from_shape_fn((r, d), |(i, j)| ((i * 5 + j * 2) % 13) as f32 * 0.1 - 0.6);
        let sv = update_singular_values(&b, &a, 0.5);
        let prod = b.dot(&a);
        let full = DMatrix::<f64>::from_fn(d, d, |i, j| 0.5 * f64::from(prod[[i, j]]));
        let mut want: Vec<f64> = full.singular_values().iter().copied().collect();
        want.sort_by(|x, y| y.total_cmp(x));
        for k in 0..r {
            assert!(
                (sv[k] - want[k]).abs() < 1e-5 * (1.0 + want[0]),
                "{k}: {} vs {}",
                sv[k],
                want[k]
            );
        }
        assert!(want[r..].iter().all(|s| s.abs() < 1e-4));
    }

    #[test]
    fn a_zero_update_has_no_rank() {
        let s = Spectrum::of(&[0.0, 0.0]);
        assert_eq!(s.frobenius, 0.0);
        assert!(s.stable_rank.is_nan() && s.effective_rank.is_nan());
    }
}
