//! Statistics the training probes record for every adapter, computed on libtorch tensors:
//! the same quantities as the theory checker (`rankstab_theory::sim`), so that the two
//! kinds of rows compare directly.
use crate::data::Sequence;
use crate::CausalLm;
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

/// Absolute and raw moments of order 1..=max_m of all entries of `y`.
///
/// Computed for speed on every adapter at every step: `y` is divided by its largest
/// absolute entry `s` (so that no power underflows or overflows in f32, whatever the
/// scale of the gradients), the sums of `|z|`, `z`, `z^2`, `|z| z^2`, `z^3` and `z^4` are
/// taken in f32 (a BLAS dot product for the last three), and each moment is multiplied by
/// `s^m` in f64. The relative error is that of an f32 sum, about 1e-6.
///
/// ```
/// use tch::Tensor;
/// let y = Tensor::from_slice(&[1.0f32, -2.0, 0.0, 3.0]);
/// let (abs, raw) = rankstab_train::probe::moments(&y, 3);
/// let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5 * y.abs().max(1.0));
/// assert!(close(&abs, &[1.5, 3.5, 9.0]));
/// assert!(close(&raw, &[0.5, 3.5, 5.0]));
/// ```
pub fn moments(y: &Tensor, max_m: u32) -> (Vec<f64>, Vec<f64>) {
    tch::no_grad(|| {
        let y = y.detach().flatten(0, -1).to_kind(Kind::Float);
        let n = y.numel() as f64;
        let zeros = (vec![0.0; max_m as usize], vec![0.0; max_m as usize]);
        if n == 0.0 || max_m == 0 {
            return zeros;
        }
        let a = y.abs();
        let s = a.max().double_value(&[]);
        if s == 0.0 || !s.is_finite() {
            return if s == 0.0 {
                zeros
            } else {
                (vec![s; max_m as usize], vec![f64::NAN; max_m as usize])
            };
        }
        // Always rescale: besides keeping every power within f32's range, this keeps the
        // products away from subnormal numbers, which are very slow on x86 (raw loss
        // gradients are often 1e-9 and below).
        let z = &y / s;
        let a = a / s;
        // Sums in the order abs_1, raw_1, abs_2, raw_2, ...
        let mut parts = vec![a.sum(Kind::Float), z.sum(Kind::Float)];
        let z2 = (max_m >= 2).then(|| &z * &z);
        if let Some(z2) = &z2 {
            let q = z2.sum(Kind::Float);
            parts.push(q.shallow_clone());
            parts.push(q);
        }
        if let (Some(z2), true) = (&z2, max_m >= 3) {
            parts.push(a.dot(z2));
            parts.push(z.dot(z2));
        }
        if let (Some(z2), true) = (&z2, max_m >= 4) {
            let q = z2.dot(z2);
            parts.push(q.shallow_clone());
            parts.push(q);
        }
        for m in 5..=max_m {
            parts.push(a.pow_tensor_scalar(i64::from(m)).sum(Kind::Float));
            parts.push(z.pow_tensor_scalar(i64::from(m)).sum(Kind::Float));
        }
        let sums: Vec<f64> =
            Vec::try_from(Tensor::stack(&parts, 0).to_kind(Kind::Double)).expect("f64 sums");
        let mut abs = Vec::with_capacity(max_m as usize);
        let mut raw = Vec::with_capacity(max_m as usize);
        for m in 1..=max_m as usize {
            let scale = s.powi(m as i32) / n;
            abs.push(sums[2 * (m - 1)] * scale);
            raw.push(sums[2 * (m - 1) + 1] * scale);
        }
        (abs, raw)
    })
}

/// Frobenius norm (f64 tensors in f64, others by libtorch's f32 norm kernel: no f64
/// copy of large gradients).
pub fn fro(t: &Tensor) -> f64 {
    tch::no_grad(|| {
        if !t.defined() || t.numel() == 0 {
            return 0.0;
        }
        let t = t.detach();
        let t = if t.kind() == Kind::Double {
            t
        } else {
            t.to_kind(Kind::Float)
        };
        t.norm().double_value(&[])
    })
}

/// Frobenius norm and stable rank (||M||_F^2 / ||M||_2^2) of `gamma B A` without forming
/// it: with B = Q_B R_B and A^T = Q_A R_A, the singular values of B A are those of the
/// r x r matrix R_B R_A^T.
///
/// ```
/// use tch::{Kind, Tensor, Device};
/// let b = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 2.0, 0.0, 0.0]).view([3, 2]);
/// let a = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 0.0, 1.0, 0.0]).view([2, 3]);
/// let (fro, srank) = rankstab_train::probe::delta_norm_and_stable_rank(&b, &a, 0.5);
/// // B A = diag(3, 2, 0): scaled by 0.5, singular values 1.5 and 1.
/// assert!((fro - (1.5f64 * 1.5 + 1.0).sqrt()).abs() < 1e-6);
/// assert!((srank - 3.25 / 2.25).abs() < 1e-6);
/// ```
pub fn delta_norm_and_stable_rank(b: &Tensor, a: &Tensor, gamma: f64) -> (f64, f64) {
    tch::no_grad(|| {
        let b = b.detach().to_kind(Kind::Double);
        let a = a.detach().to_kind(Kind::Double);
        let (_, rb) = Tensor::linalg_qr(&b, "reduced");
        let (_, ra) = Tensor::linalg_qr(&a.tr(), "reduced");
        let core = rb.matmul(&ra.tr()) * gamma;
        let (_, s, _) = core.svd(true, false);
        let fro2 = s.square().sum(Kind::Double).double_value(&[]);
        let top = s.max().double_value(&[]);
        let srank = if top > 0.0 { fro2 / (top * top) } else { 0.0 };
        (fro2.sqrt(), srank)
    })
}

/// Turns the probes of every attached adapter on (the next forward pass records a
/// [`crate::linear::Capture`]) or off.
pub(crate) fn capture(model: &mut CausalLm, on: bool) {
    for (_, lin) in model.linears_mut() {
        if lin.adapter.is_some() {
            lin.capture = on.then(|| RefCell::new(None));
        }
    }
}

/// Rows (b * T + t) of the flattened (B * T, features) activations that are real tokens
/// (not padding), or `None` when every position is real.
pub(crate) fn valid_rows(seqs: &[&Sequence], device: Device) -> Option<Tensor> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1) - 1;
    if seqs.iter().all(|s| s.ids.len() - 1 == t) {
        return None;
    }
    let idx: Vec<i64> = seqs
        .iter()
        .enumerate()
        .flat_map(|(b, s)| (0..s.ids.len() - 1).map(move |i| (b * t + i) as i64))
        .collect();
    Some(Tensor::from_slice(&idx).to_device(device))
}

/// The rows of `t` (flattened to (rows, features)) at `valid`, or all of them.
pub(crate) fn rows_of(t: &Tensor, valid: Option<&Tensor>) -> Tensor {
    let f = t.size().last().copied().unwrap_or(1);
    let flat = t.reshape([-1, f]);
    match valid {
        Some(idx) => flat.index_select(0, idx),
        None => flat,
    }
}

/// Moment sums of one adapter at one site over the micro-batches of a step: element count
/// and count-weighted absolute and raw moments (the step's moment of order m is
/// `abs[m - 1] / n`).
#[derive(Default)]
pub(crate) struct SiteSums {
    pub(crate) n: f64,
    pub(crate) abs: Vec<f64>,
    pub(crate) raw: Vec<f64>,
}

impl SiteSums {
    /// Adds the sums of `other` (another batch of the same site).
    pub(crate) fn merge(&mut self, other: &SiteSums) {
        if other.n == 0.0 {
            return;
        }
        if self.abs.is_empty() {
            self.abs = vec![0.0; other.abs.len()];
            self.raw = vec![0.0; other.raw.len()];
        }
        for (s, v) in self.abs.iter_mut().zip(&other.abs) {
            *s += v;
        }
        for (s, v) in self.raw.iter_mut().zip(&other.raw) {
            *s += v;
        }
        self.n += other.n;
    }

    /// Adds the moments of order 1..=max_m of `t`'s entries, weighted by their count.
    pub(crate) fn add(&mut self, t: &Tensor, max_m: u32) {
        let n = t.numel() as f64;
        if n == 0.0 {
            return;
        }
        let (a, r) = moments(t, max_m);
        if self.abs.is_empty() {
            self.abs = vec![0.0; a.len()];
            self.raw = vec![0.0; r.len()];
        }
        for (s, v) in self.abs.iter_mut().zip(&a) {
            *s += n * v;
        }
        for (s, v) in self.raw.iter_mut().zip(&r) {
            *s += n * v;
        }
        self.n += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_match_a_direct_computation() {
        let y = Tensor::randn([7, 5], (Kind::Float, Device::Cpu));
        let v: Vec<f32> = Vec::<f32>::try_from(y.flatten(0, -1)).expect("f32");
        // Tiny values (gradients of a mean loss are often 1e-9 and below): their 4th and 6th
        // powers underflow f32, not the scaled computation.
        for scale in [1.0f64, 1e-9, 1e12] {
            let y = &y * scale;
            let (abs, raw) = moments(&y, 6);
            for m in 1..=6i32 {
                let a: f64 = v
                    .iter()
                    .map(|&x| (x as f64 * scale).abs().powi(m))
                    .sum::<f64>()
                    / v.len() as f64;
                let r: f64 =
                    v.iter().map(|&x| (x as f64 * scale).powi(m)).sum::<f64>() / v.len() as f64;
                assert!(
                    (abs[m as usize - 1] / a - 1.0).abs() < 1e-5,
                    "m {m}, scale {scale}"
                );
                // Raw odd moments can be near zero by cancellation: compare to the abs scale.
                assert!(
                    (raw[m as usize - 1] - r).abs() < 1e-5 * a,
                    "m {m}, scale {scale}"
                );
            }
        }
        assert_eq!(
            moments(&Tensor::zeros([3], (Kind::Float, Device::Cpu)), 2),
            (vec![0.0; 2], vec![0.0; 2])
        );
    }

    #[test]
    fn stable_rank_and_norm_match_the_full_matrix() {
        let b = Tensor::randn([20, 4], (Kind::Double, Device::Cpu));
        let a = Tensor::randn([4, 30], (Kind::Double, Device::Cpu));
        let (f, sr) = delta_norm_and_stable_rank(&b, &a, 0.3);
        let full = b.matmul(&a) * 0.3;
        let (_, s, _) = full.svd(true, false);
        let f2 = s.square().sum(Kind::Double).double_value(&[]);
        let top = s.max().double_value(&[]);
        assert!((f - f2.sqrt()).abs() < 1e-9 * f);
        assert!((sr - f2 / (top * top)).abs() < 1e-9 * sr);
        assert!((f - fro(&full)).abs() < 1e-9 * f);
    }
}
