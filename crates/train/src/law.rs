//! The exact first-step law of a training run (proofs/exact-law.md): from step 0's adapter
//! inputs and loss gradients (the gradient direction `w_i = sum_k v_ki x_k` of an evenly
//! spread subset of each adapter's output entries) and step 1's adapter inputs, the
//! expectation over A of the step-1 forward moments `E|y|^m`, m <= 4, that the Monte Carlo
//! of A would give on this model and these batches. It is written as `law` rows (site
//! `fwd`, step 1) beside the probes' measured `abs` rows, so that the report can set the
//! measured rank exponent against the predicted one seed by seed.
//!
//! The law needs what step 1 depends on to be the first optimizer step alone: no dropout and
//! no gradient clipping (which rescales the step); then it is exact, up to the linear forms
//! of A's rows taken as normal (relative error 3 |k4 - 3| / d_in).
use crate::lora::LoraInit;
use crate::trainer::TrainConfig;
use rankstab_records::{MomentRow, Optimizer, Site, Stat};
use rankstab_theory::exact::pairs::Pairs;
use rankstab_theory::exact::rows::{FirstStep, LawTables};
use rankstab_theory::Init;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// At most this many output entries (every k-th) and step-1 tokens per adapter enter the law.
const MAX_ENTRIES: i64 = 256;
const MAX_TOKENS: i64 = 256;

/// The law's state over steps 0 and 1.
pub(crate) struct Law {
    tables: Arc<LawTables>,
    /// Per adapter (the model's order): `x^T v[:, S]` summed over step 0's micro-batches
    /// (d_in x |S|), on the adapter's device.
    dirs: Vec<Option<Tensor>>,
    /// Per adapter: a spread subset of step 1's input rows.
    inputs: Vec<Vec<Tensor>>,
    /// Keep every k-th token of step 1.
    token_stride: i64,
}

impl Law {
    /// The law for `cfg`, when it applies: moments of order <= 4 recorded, probes at steps
    /// 0 and 1, at least two steps, no dropout, no clipping, and the run starts from the
    /// init (B = 0, A drawn), not from an existing adapter (`init_adapter`).
    pub(crate) fn new(cfg: &TrainConfig) -> Option<Self> {
        let applies = cfg.moments.iter().any(|m| (1..=4).contains(m))
            && cfg.probe_every == 1
            && cfg.steps >= 2
            && cfg.dropout == 0.0
            && cfg.clip_grad_norm.is_none()
            && cfg.init_adapter.is_none();
        let init = match cfg.init {
            LoraInit::KaimingUniform => Init::KaimingUniform,
            LoraInit::Gaussian => Init::PeftGaussian,
        };
        let tokens = (cfg.batch * cfg.context) as i64;
        applies.then(|| Law {
            tables: LawTables::shared_for(&[cfg.rank], init),
            dirs: Vec::new(),
            inputs: Vec::new(),
            token_stride: (tokens + MAX_TOKENS - 1) / MAX_TOKENS,
        })
    }

    /// Step 0, adapter `i`, one micro-batch: adds `x^T v[:, S]` (rows: real tokens).
    pub(crate) fn record_step0(&mut self, i: usize, x: &Tensor, v: &Tensor) {
        if self.dirs.len() <= i {
            self.dirs.resize_with(i + 1, || None);
        }
        tch::no_grad(|| {
            let d_out = v.size()[1];
            let stride = (d_out + MAX_ENTRIES - 1) / MAX_ENTRIES;
            let cols = v.slice(1, 0, d_out, stride).to_kind(Kind::Float);
            let g = x.to_kind(Kind::Float).tr().matmul(&cols);
            self.dirs[i] = Some(match self.dirs[i].take() {
                Some(acc) => acc + g,
                None => g,
            });
        });
    }

    /// Step 1, adapter `i`, one micro-batch: keeps every k-th input row (in f32, the
    /// precision the adapter saw them in; widened to f64 when the rows are computed).
    pub(crate) fn record_step1(&mut self, i: usize, x: &Tensor) {
        if self.inputs.len() <= i {
            self.inputs.resize_with(i + 1, Vec::new);
        }
        let n = x.size()[0];
        self.inputs[i].push(tch::no_grad(|| {
            x.slice(0, 0, n, self.token_stride)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
        }));
    }

    /// The tensors a checkpoint after step 0 keeps: the gradient directions.
    pub(crate) fn state(&self) -> Vec<(String, Tensor)> {
        self.dirs
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|d| (format!("law.{i}"), d.shallow_clone())))
            .collect()
    }

    /// Restores the directions of a checkpoint written after step 0 (absent in later ones,
    /// after which the law's rows are written already).
    pub(crate) fn restore(&mut self, tensors: &std::collections::HashMap<String, Tensor>) {
        let mut i = 0;
        while let Some(t) = tensors.get(&format!("law.{i}")) {
            if self.dirs.len() <= i {
                self.dirs.resize_with(i + 1, || None);
            }
            self.dirs[i] = Some(t.shallow_clone());
            i += 1;
        }
    }

    /// The law rows of step 1, one per adapter and order, from `base(i)` (the adapter's row
    /// without site, statistic and value) and `in_features(i)`.
    pub(crate) fn rows(
        &self,
        cfg: &TrainConfig,
        gamma: f64,
        base: impl Fn(usize) -> MomentRow,
        in_features: impl Fn(usize) -> i64,
    ) -> Vec<MomentRow> {
        let mut out = Vec::new();
        for (i, (dir, xs)) in self.dirs.iter().zip(&self.inputs).enumerate() {
            let (Some(dir), false) = (dir, xs.is_empty()) else {
                continue;
            };
            let d_in = in_features(i);
            let s = match cfg.init {
                LoraInit::KaimingUniform => (1.0 / (3.0 * d_in as f64)).sqrt(),
                LoraInit::Gaussian => 1.0 / cfg.rank as f64,
            };
            let step = FirstStep {
                optimizer: cfg.optimizer,
                rank_index: 0,
                gamma,
                lr: cfg.lr,
                s,
                eps: crate::optim::AdamwParams::default().eps,
                decay: if cfg.optimizer == Optimizer::Adamw {
                    1.0 - cfg.lr * cfg.weight_decay
                } else {
                    1.0
                },
            };
            let pairs = pairs(dir, &Tensor::cat(xs, 0).to_kind(Kind::Double));
            let e = self.tables.first_step_outputs(&pairs, &step);
            for &m in cfg.moments.iter().filter(|m| (1..=4).contains(*m)) {
                out.push(MomentRow {
                    site: Site::Fwd,
                    stat: Stat::Law,
                    m: Some(m),
                    value: e[m as usize - 1],
                    ..base(i)
                });
            }
        }
        out
    }
}

/// The (entry, input) pairs of gradient directions `dir` (d_in x entries) and inputs `x`
/// (tokens x d_in).
fn pairs(dir: &Tensor, x: &Tensor) -> Pairs {
    let dir = dir.to_kind(Kind::Double).to_device(Device::Cpu);
    let vec = |t: Tensor| Vec::<f64>::try_from(t.flatten(0, -1)).unwrap_or_default();
    let a = vec(dir.square().sum_dim_intlist(0, false, Kind::Double).sqrt());
    let b = vec(x.square().sum_dim_intlist(1, false, Kind::Double).sqrt());
    let dots = vec(x.matmul(&dir)); // tokens x entries, row-major
    let ni = a.len();
    let rho = dots
        .iter()
        .enumerate()
        .map(|(p, d)| {
            let (ai, bn) = (a[p % ni], b[p / ni]);
            if ai > 0.0 && bn > 0.0 {
                (d / (ai * bn)).clamp(-1.0, 1.0)
            } else {
                0.0
            }
        })
        .collect();
    Pairs { a, b, rho }
}
