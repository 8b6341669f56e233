//! The adapters' optimizers, written out so that their state can be checkpointed and a
//! resumed run continues with bit-identical numbers (tch's optimizers keep their state in
//! C++ and cannot save it).
//!
//! AdamW follows `torch.optim.AdamW` (single-tensor path, no amsgrad) operation for
//! operation: decoupled weight decay `p <- p (1 - lr wd)`, `m <- m + (1 - b1)(g - m)`,
//! `v <- b2 v + (1 - b2) g^2`, `p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//! SGD is `p <- p - lr g` (no momentum, as the paper's appendix).
use crate::TrainError;
use rankstab_records::Optimizer;
use tch::Tensor;

/// The optimizers the trainer implements (AdamW and SGD, as the paper); the others of
/// the vocabulary are refused by [`check_supported`].
pub const SUPPORTED: [Optimizer; 2] = [Optimizer::Adamw, Optimizer::Sgd];

/// Whether the trainer implements `opt`.
///
/// # Errors
/// An optimizer the trainer does not implement, with the ones it does.
pub fn check_supported(opt: Optimizer) -> Result<(), TrainError> {
    if SUPPORTED.contains(&opt) {
        Ok(())
    } else {
        Err(TrainError::Invalid(format!(
            "optimizer {opt} is not supported by the trainer: use adamw or sgd"
        )))
    }
}

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamwParams {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// eps.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamwParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// An optimizer over a fixed list of parameters, with saveable state.
#[derive(Debug)]
pub struct AdapterOptimizer {
    kind: Optimizer,
    lr: f64,
    adam: AdamwParams,
    params: Vec<Tensor>,
    /// First and second moments (AdamW only).
    moments: Vec<(Tensor, Tensor)>,
    /// Steps taken.
    step: u64,
}

impl AdapterOptimizer {
    /// An optimizer of `params` (tensors that require grad).
    ///
    /// # Errors
    /// An optimizer the trainer does not implement ([`check_supported`]).
    pub fn new(
        kind: Optimizer,
        lr: f64,
        adam: AdamwParams,
        params: Vec<Tensor>,
    ) -> Result<Self, TrainError> {
        check_supported(kind)?;
        let moments = if kind.is_adaptive() {
            params
                .iter()
                .map(|p| (p.zeros_like(), p.zeros_like()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            kind,
            lr,
            adam,
            params,
            moments,
            step: 0,
        })
    }

    /// The parameters, in order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Sets every gradient to zero (before accumulating a new batch).
    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        tch::no_grad(|| {
            self.params
                .iter()
                .map(|p| p.grad())
                .filter(Tensor::defined)
                .map(|g| crate::probe::fro(&g).powi(2))
                .sum::<f64>()
                .sqrt()
        })
    }

    /// Scales the gradients so that their global norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`, factor `max_norm / (norm + 1e-6)` when above);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| {
                for p in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(coef);
                    }
                }
            });
        }
        norm
    }

    /// One update from the current gradients.
    pub fn step(&mut self) {
        self.step += 1;
        let lr = self.lr;
        // `new` admits AdamW and SGD only (check_supported).
        tch::no_grad(|| match self.kind {
            Optimizer::Sgd | Optimizer::SgdMomentum => {
                for p in &self.params {
                    let g = p.grad();
                    if g.defined() {
                        let mut p = p.shallow_clone();
                        let _ = p.g_add_(&(g * -lr));
                    }
                }
            }
            Optimizer::Adamw | Optimizer::Adam => {
                let AdamwParams {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } = self.adam;
                let t = self.step as i32;
                let bc1 = 1.0 - beta1.powi(t);
                let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                let step_size = lr / bc1;
                for (p, (m, v)) in self.params.iter().zip(self.moments.iter_mut()) {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    let mut p = p.shallow_clone();
                    if weight_decay != 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                    }
                    let _ = m.lerp_(&g, 1.0 - beta1);
                    let _ = v.g_mul_scalar_(beta2);
                    let _ = v.addcmul_(&g, &(&g * (1.0 - beta2)));
                    let denom = (v.sqrt() / bc2_sqrt) + eps;
                    let _ = p.g_add_(&(&*m / denom * -step_size));
                }
            }
        });
    }

    /// Adam's regime after the last step: per parameter, the share of its coordinates whose
    /// bias-corrected `sqrt(v_hat)` is below `10 eps` (eps dominates their step size).
    /// `None` for SGD or before the first step.
    pub fn eps_shares(&self) -> Option<Vec<f64>> {
        if !self.kind.is_adaptive() || self.step == 0 {
            return None;
        }
        let bc2 = 1.0 - self.adam.beta2.powi(self.step as i32);
        // sqrt(v / bc2) < 10 eps  <=>  v < 100 eps^2 bc2.
        let limit = 100.0 * self.adam.eps * self.adam.eps * bc2;
        Some(tch::no_grad(|| {
            self.moments
                .iter()
                .map(|(_, v)| {
                    let n = v.numel().max(1) as f64;
                    v.lt(limit).sum(tch::Kind::Double).double_value(&[]) / n
                })
                .collect()
        }))
    }

    /// The state to checkpoint: `(name, tensor)` pairs (moments of parameter i as
    /// `m.i` / `v.i`) and the step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut v = Vec::new();
        for (i, (m, s)) in self.moments.iter().enumerate() {
            v.push((format!("m.{i}"), m.shallow_clone()));
            v.push((format!("v.{i}"), s.shallow_clone()));
        }
        (v, self.step)
    }

    /// Restores a state written by [`Self::state`].
    ///
    /// # Errors
    /// A missing moment tensor or one of another shape.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<(), TrainError> {
        for (i, (m, v)) in self.moments.iter_mut().enumerate() {
            for (name, dst) in [(format!("m.{i}"), m), (format!("v.{i}"), v)] {
                crate::checkpoint::restore(tensors, "optimizer state", &name, dst)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::{Device, Kind};

    /// Our AdamW and SGD against libtorch's own (`torch.optim.AdamW` / `SGD` through tch),
    /// on the same quadratic for five steps with weight decay: the parameters agree to f32
    /// rounding.
    #[test]
    fn matches_libtorchs_optimizers() {
        for (kind, wd) in [
            (Optimizer::Adamw, 0.0),
            (Optimizer::Adamw, 0.1),
            (Optimizer::Sgd, 0.0),
        ] {
            tch::manual_seed(3);
            let target = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
            let vs_ref = nn::VarStore::new(Device::Cpu);
            let p_ref = vs_ref.root().var(
                "p",
                &[4, 3],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            );
            let p_ours = p_ref.detach().copy().set_requires_grad(true);
            let mut reference = match kind {
                Optimizer::Adamw => nn::AdamW {
                    beta1: 0.9,
                    beta2: 0.999,
                    wd,
                    eps: 1e-8,
                    amsgrad: false,
                }
                .build(&vs_ref, 0.05),
                _ => nn::Sgd::default().build(&vs_ref, 0.05),
            }
            .expect("tch's optimizer");
            let adam = AdamwParams {
                weight_decay: wd,
                ..AdamwParams::default()
            };
            let mut ours = AdapterOptimizer::new(kind, 0.05, adam, vec![p_ours.shallow_clone()])
                .expect("supported");
            for _ in 0..5 {
                let l = (&p_ref - &target).pow_tensor_scalar(4).sum(Kind::Float);
                reference.zero_grad();
                l.backward();
                reference.step();
                ours.zero_grad();
                let l = (&p_ours - &target).pow_tensor_scalar(4).sum(Kind::Float);
                l.backward();
                ours.step();
            }
            let diff = (&p_ref - &p_ours).abs().max().double_value(&[]);
            let moved = (&p_ref - &target).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{kind:?} wd {wd}: max diff {diff}");
            assert!(moved > 0.0);
        }
    }

    #[test]
    fn unsupported_optimizers_are_refused() {
        for kind in [Optimizer::Adam, Optimizer::SgdMomentum] {
            let err = AdapterOptimizer::new(kind, 0.1, AdamwParams::default(), vec![])
                .expect_err("not implemented");
            assert!(err.to_string().contains("use adamw or sgd"), "{err}");
        }
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut o = AdapterOptimizer::new(
            Optimizer::Sgd,
            1.0,
            AdamwParams::default(),
            vec![p.shallow_clone()],
        )
        .expect("supported");
        (&p * &p).sum(Kind::Float).backward(); // grad = 2p = (6, 8), norm 10
        let before = o.clip_grad_norm(1.0);
        assert!((before - 10.0).abs() < 1e-6);
        assert!((o.grad_norm() - 1.0).abs() < 1e-5);
        o.step();
        let v: Vec<f32> = Vec::try_from(p.detach()).expect("f32");
        assert!((v[0] - (3.0 - 0.6)).abs() < 1e-5 && (v[1] - (4.0 - 0.8)).abs() < 1e-5);
    }
}
