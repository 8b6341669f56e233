//! Statistics the training probes record for every adapter, computed on libtorch tensors:
//! the same quantities as the theory checker (`rankstab_theory::sim`), so that the two
//! kinds of rows compare directly.
use tch::{Kind, Tensor};

/// Absolute and raw moments of order 1..=max_m of all entries of `y`, in f64.
///
/// ```
/// use tch::Tensor;
/// let y = Tensor::from_slice(&[1.0f32, -2.0, 0.0, 3.0]);
/// let (abs, raw) = rankstab_train::probe::moments(&y, 3);
/// assert_eq!(abs, vec![1.5, 3.5, 9.0]);
/// assert_eq!(raw, vec![0.5, 3.5, 5.0]);
/// ```
pub fn moments(y: &Tensor, max_m: u32) -> (Vec<f64>, Vec<f64>) {
    tch::no_grad(|| {
        let y = y.detach().to_kind(Kind::Double).flatten(0, -1);
        let a = y.abs();
        let mut abs = Vec::with_capacity(max_m as usize);
        let mut raw = Vec::with_capacity(max_m as usize);
        let mut p = a.shallow_clone();
        for m in 1..=max_m {
            abs.push(p.mean(Kind::Double).double_value(&[]));
            // v^m = |v|^m for even m, v |v|^(m-1) for odd m.
            let r = if m % 2 == 0 {
                p.mean(Kind::Double)
            } else {
                (&p * y.sign()).mean(Kind::Double)
            };
            raw.push(r.double_value(&[]));
            p = &p * &a;
        }
        (abs, raw)
    })
}

/// Frobenius norm.
pub fn fro(t: &Tensor) -> f64 {
    tch::no_grad(|| {
        t.detach()
            .to_kind(Kind::Double)
            .square()
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[])
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn moments_match_a_direct_computation() {
        let y = Tensor::randn([7, 5], (Kind::Float, Device::Cpu));
        let v: Vec<f32> = Vec::<f32>::try_from(y.flatten(0, -1)).expect("f32");
        let (abs, raw) = moments(&y, 4);
        for m in 1..=4i32 {
            let a: f64 = v.iter().map(|&x| (x as f64).abs().powi(m)).sum::<f64>() / v.len() as f64;
            let r: f64 = v.iter().map(|&x| (x as f64).powi(m)).sum::<f64>() / v.len() as f64;
            assert!((abs[m as usize - 1] - a).abs() < 1e-9 * a.max(1.0));
            assert!((raw[m as usize - 1] - r).abs() < 1e-9 * r.abs().max(1.0));
        }
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
