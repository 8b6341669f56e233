//! One cell of the checker: a synthetic network with an adapter per layer, trained for a
//! few steps, with every adapter's moments measured at every step.
//!
//! Layer l maps h to h' = [h +] act(W_l u + gamma B_l A_l u), u = [rmsnorm](h). Gradients
//! are written out by hand (the network is small and the point is to see every term).
use crate::config::{Activation, Init, Loss, OptimizerKind, Reuse, TheoryConfig};
use crate::data::TrialData;
use ndarray::{s, Array1, Array2, ArrayView2, Axis, Zip};

const RMS_EPS: f32 = 1e-6;

/// Where a statistic was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// Adapter output gamma B A u on the training batch.
    Fwd,
    /// Adapter output on the held-out batch.
    FwdHeldout,
    /// Gradient into the adapter input through the adapter, (gamma B A)^T v.
    Bwd,
    /// Loss gradient v at the adapter output.
    GradOut,
    /// Parameter norms.
    Param,
}

impl Site {
    /// Name used in records.
    pub fn name(self) -> &'static str {
        match self {
            Site::Fwd => "fwd",
            Site::FwdHeldout => "fwd_heldout",
            Site::Bwd => "bwd",
            Site::GradOut => "grad_out",
            Site::Param => "param",
        }
    }
}

/// One measured number of a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Obs {
    /// Layer.
    pub layer: u32,
    /// Step (0 = initialisation).
    pub step: u32,
    /// Site.
    pub site: Site,
    /// abs, raw, grad_norm_a, grad_norm_b, delta_norm.
    pub stat: &'static str,
    /// Moment order, for moments.
    pub m: Option<u32>,
    /// Value.
    pub value: f64,
}

/// What one cell simulates.
#[derive(Debug, Clone, PartialEq)]
pub struct CellSpec {
    /// Optimizer.
    pub opt: OptimizerKind,
    /// Scaling name.
    pub scaling: String,
    /// Scaling exponent.
    pub beta: f64,
    /// Input regime.
    pub reuse: Reuse,
    /// Rank.
    pub rank: usize,
}

/// Per-trial values shared by every cell: layer-0 inputs and frozen outputs for each batch,
/// and the targets.
pub(crate) struct Prepared {
    /// Layer-0 adapter input u_0 per batch (training batches, then held-out last).
    pub u0: Vec<Array2<f32>>,
    /// Frozen layer-0 output u_0 W_0^T per batch.
    pub base0: Vec<Array2<f32>>,
    /// Targets per batch: MSE targets (n x d) or CE labels.
    pub targets: Vec<Target>,
}

pub(crate) enum Target {
    Mse(Array2<f32>),
    Ce(Vec<usize>),
}

pub(crate) fn rmsnorm(h: &Array2<f32>) -> (Array2<f32>, Array1<f32>) {
    let d = h.ncols() as f32;
    let rms: Array1<f32> = h.map_axis(Axis(1), |row| (row.iter().map(|v| v * v).sum::<f32>() / d + RMS_EPS).sqrt());
    let mut u = h.clone();
    for (mut row, &r) in u.axis_iter_mut(Axis(0)).zip(rms.iter()) {
        row.mapv_inplace(|v| v / r);
    }
    (u, rms)
}

fn rmsnorm_backward(du: &Array2<f32>, u: &Array2<f32>, rms: &Array1<f32>) -> Array2<f32> {
    let d = u.ncols() as f32;
    let mut dh = du.clone();
    for ((mut row, urow), &r) in dh.axis_iter_mut(Axis(0)).zip(u.axis_iter(Axis(0))).zip(rms.iter()) {
        let dot: f32 = row.iter().zip(urow.iter()).map(|(a, b)| a * b).sum::<f32>() / d;
        Zip::from(&mut row).and(&urow).for_each(|g, &uu| *g = (*g - uu * dot) / r);
    }
    dh
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2/pi)

fn act(a: Activation, z: f32) -> f32 {
    match a {
        Activation::Identity => z,
        Activation::Relu => z.max(0.0),
        Activation::Gelu => 0.5 * z * (1.0 + (GELU_C * (z + 0.044715 * z * z * z)).tanh()),
    }
}

fn act_grad(a: Activation, z: f32) -> f32 {
    match a {
        Activation::Identity => 1.0,
        Activation::Relu => {
            if z > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let t = (GELU_C * (z + 0.044715 * z * z * z)).tanh();
            0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * z * z)
        }
    }
}

/// Prepares the cell-independent per-batch values of a trial.
pub(crate) fn prepare(cfg: &TheoryConfig, data: &TrialData) -> Prepared {
    let mut u0 = Vec::new();
    let mut base0 = Vec::new();
    let mut targets = Vec::new();
    for x in data.batches.iter().chain(std::iter::once(&data.heldout)) {
        let u = if cfg.rmsnorm { rmsnorm(x).0 } else { x.clone() };
        base0.push(u.dot(&data.weights[0].t()));
        u0.push(u);
        targets.push(match cfg.loss {
            Loss::Mse => Target::Mse(x.dot(&data.teacher.t())),
            Loss::Ce => {
                let scores = x.dot(&data.teacher.t());
                Target::Ce(
                    scores
                        .axis_iter(Axis(0))
                        .map(|row| {
                            row.iter()
                                .enumerate()
                                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
                                .0
                        })
                        .collect(),
                )
            }
        });
    }
    Prepared { u0, base0, targets }
}

enum OptState {
    Plain,
    Momentum(Array2<f32>),
    Adam { m: Array2<f32>, v: Array2<f32> },
}

impl OptState {
    fn new(opt: OptimizerKind, shape: (usize, usize)) -> Self {
        match opt {
            OptimizerKind::Sgd => OptState::Plain,
            OptimizerKind::SgdMomentum => OptState::Momentum(Array2::zeros(shape)),
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                OptState::Adam { m: Array2::zeros(shape), v: Array2::zeros(shape) }
            }
        }
    }
}

/// Hyper-parameters of one update, resolved from the config.
struct Hyper {
    opt: OptimizerKind,
    lr: f32,
    momentum: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
}

/// One optimizer step on `p` (t counts from 1).
fn update(h: &Hyper, state: &mut OptState, p: &mut Array2<f32>, g: &Array2<f32>, t: i32) {
    match state {
        OptState::Plain => Zip::from(p).and(g).for_each(|p, &g| *p -= h.lr * g),
        OptState::Momentum(buf) => Zip::from(p).and(buf).and(g).for_each(|p, b, &g| {
            // PyTorch: the first step initialises the buffer with the gradient.
            *b = if t == 1 { g } else { h.momentum * *b + g };
            *p -= h.lr * *b;
        }),
        OptState::Adam { m, v } => {
            let bc1 = 1.0 - (h.beta1 as f64).powi(t);
            let bc2 = 1.0 - (h.beta2 as f64).powi(t);
            let step = (h.lr as f64 / bc1) as f32;
            let bc2_sqrt = bc2.sqrt() as f32;
            let decoupled = h.opt == OptimizerKind::Adamw;
            Zip::from(p).and(m).and(v).and(g).for_each(|p, m, v, &g| {
                let g = if decoupled { g } else { g + h.wd * *p };
                if decoupled {
                    *p *= 1.0 - h.lr * h.wd;
                }
                *m = h.beta1 * *m + (1.0 - h.beta1) * g;
                *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
                *p -= step * *m / (v.sqrt() / bc2_sqrt + h.eps);
            });
        }
    }
}

/// Absolute and raw moments of order 1..=max_m of the entries of `y` (f64 accumulation).
pub fn moments(y: ArrayView2<f32>, max_m: u32) -> (Vec<f64>, Vec<f64>) {
    let mut abs = vec![0.0f64; max_m as usize];
    let mut raw = vec![0.0f64; max_m as usize];
    for &v in y.iter() {
        let a = (v as f64).abs();
        let neg = v < 0.0;
        let mut p = a;
        for k in 0..max_m as usize {
            abs[k] += p;
            raw[k] += if neg && k % 2 == 0 { -p } else { p };
            p *= a;
        }
    }
    let n = y.len().max(1) as f64;
    abs.iter_mut().for_each(|v| *v /= n);
    raw.iter_mut().for_each(|v| *v /= n);
    (abs, raw)
}

fn fro(a: &Array2<f32>) -> f64 {
    a.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()
}

struct Layer {
    a: Array2<f32>,
    b: Array2<f32>,
    sa: OptState,
    sb: OptState,
}

struct Cache {
    u: Array2<f32>,
    rms: Option<Array1<f32>>,
    ax: Array2<f32>,
    ad: Array2<f32>,
    z: Array2<f32>,
}

/// Result of one cell: the observations and per-step losses.
pub struct CellResult {
    /// Moments and norms.
    pub obs: Vec<Obs>,
    /// (step, training loss, held-out loss).
    pub losses: Vec<(u32, f64, f64)>,
}

struct Net<'a> {
    cfg: &'a TheoryConfig,
    data: &'a TrialData,
    prep: &'a Prepared,
    gamma: f32,
}

impl Net<'_> {
    fn forward(&self, layers: &[Layer], idx: usize) -> (Array2<f32>, Vec<Cache>) {
        let mut caches = Vec::with_capacity(layers.len());
        let mut h = if idx < self.data.batches.len() { self.data.batches[idx].clone() } else { self.data.heldout.clone() };
        for (l, layer) in layers.iter().enumerate() {
            let (u, rms, base) = if l == 0 {
                (self.prep.u0[idx].clone(), None, self.prep.base0[idx].clone())
            } else {
                let (u, rms) = if self.cfg.rmsnorm {
                    let (u, r) = rmsnorm(&h);
                    (u, Some(r))
                } else {
                    (h.clone(), None)
                };
                let base = u.dot(&self.data.weights[l].t());
                (u, rms, base)
            };
            let ax = u.dot(&layer.a.t());
            let mut ad = ax.dot(&layer.b.t());
            ad.mapv_inplace(|v| v * self.gamma);
            let z = &base + &ad;
            let a = z.mapv(|v| act(self.cfg.activation, v));
            let next = if self.cfg.residual { &h + &a } else { a };
            caches.push(Cache { u, rms, ax, ad, z });
            h = next;
        }
        (h, caches)
    }

    /// Loss and its gradient with respect to the network output.
    fn loss(&self, f: &Array2<f32>, idx: usize) -> (f64, Array2<f32>) {
        let n = f.nrows() as f32;
        match &self.prep.targets[idx] {
            Target::Mse(t) => {
                let diff = f - t;
                let loss = diff.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / (2.0 * n as f64);
                (loss, diff / n)
            }
            Target::Ce(labels) => {
                let r = self.data.readout.as_ref().expect("readout drawn for cross-entropy");
                let mut logits = f.dot(&r.t());
                let mut loss = 0.0f64;
                for (mut row, &y) in logits.axis_iter_mut(Axis(0)).zip(labels) {
                    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    row.mapv_inplace(|v| (v - mx).exp());
                    let s: f32 = row.sum();
                    row.mapv_inplace(|v| v / s);
                    loss -= (row[y].max(1e-30) as f64).ln();
                    row[y] -= 1.0;
                }
                logits.mapv_inplace(|v| v / n);
                (loss / n as f64, logits.dot(r))
            }
        }
    }
}

/// Runs one cell for `cfg.steps` steps and measures everything.
pub(crate) fn run_cell(cfg: &TheoryConfig, data: &TrialData, prep: &Prepared, cell: &CellSpec) -> CellResult {
    let r = cell.rank;
    let d = cfg.width;
    let gamma = rankstab_records::scaling_factor(cfg.alpha, cell.beta, r) as f32;
    let std_scale = match cfg.init {
        Init::KaimingUniform => 1.0f32,
        Init::Gaussian | Init::PeftGaussian => cfg.init.variance(d, r).sqrt() as f32,
    };
    let mut layers: Vec<Layer> = data
        .adapters
        .iter()
        .map(|a_max| Layer {
            a: a_max.slice(s![..r, ..]).mapv(|v| v * std_scale),
            b: Array2::zeros((d, r)),
            sa: OptState::new(cell.opt, (r, d)),
            sb: OptState::new(cell.opt, (d, r)),
        })
        .collect();
    let hyper = Hyper {
        opt: cell.opt,
        lr: cfg.lr(cell.opt) as f32,
        momentum: cfg.momentum as f32,
        beta1: cfg.adam_beta1 as f32,
        beta2: cfg.adam_beta2 as f32,
        eps: cfg.adam_eps as f32,
        wd: cfg.weight_decay as f32,
    };
    let net = Net { cfg, data, prep, gamma };
    let max_m = cfg.moments.iter().copied().max().unwrap_or(1);
    let heldout_idx = data.batches.len();
    let mut obs = Vec::new();
    let mut losses = Vec::new();
    let push_moments = |obs: &mut Vec<Obs>, l: usize, t: usize, site: Site, y: ArrayView2<f32>, raw_too: bool| {
        let (abs, raw) = moments(y, max_m);
        for &m in &cfg.moments {
            let k = m as usize - 1;
            obs.push(Obs { layer: l as u32, step: t as u32, site, stat: "abs", m: Some(m), value: abs[k] });
            if raw_too {
                obs.push(Obs { layer: l as u32, step: t as u32, site, stat: "raw", m: Some(m), value: raw[k] });
            }
        }
    };
    for t in 0..=cfg.steps {
        let idx = match cell.reuse {
            Reuse::Coherent => 0,
            Reuse::Fresh => t,
        };
        let (f, caches) = net.forward(&layers, idx);
        let (loss, mut dh) = net.loss(&f, idx);
        let (fh, caches_h) = net.forward(&layers, heldout_idx);
        let (loss_h, _) = net.loss(&fh, heldout_idx);
        losses.push((t as u32, loss, loss_h));
        let mut grads: Vec<(Array2<f32>, Array2<f32>)> = Vec::with_capacity(layers.len());
        for l in (0..layers.len()).rev() {
            let c = &caches[l];
            let layer = &layers[l];
            let mut v = dh.clone();
            if cfg.activation != Activation::Identity {
                Zip::from(&mut v).and(&c.z).for_each(|g, &z| *g *= act_grad(cfg.activation, z));
            }
            let mut grad_b = v.t().dot(&c.ax);
            grad_b.mapv_inplace(|x| x * gamma);
            let bv = v.dot(&layer.b);
            let mut grad_a = bv.t().dot(&c.u);
            grad_a.mapv_inplace(|x| x * gamma);
            let mut g_in = bv.dot(&layer.a);
            g_in.mapv_inplace(|x| x * gamma);
            push_moments(&mut obs, l, t, Site::Fwd, c.ad.view(), true);
            push_moments(&mut obs, l, t, Site::FwdHeldout, caches_h[l].ad.view(), true);
            push_moments(&mut obs, l, t, Site::Bwd, g_in.view(), true);
            push_moments(&mut obs, l, t, Site::GradOut, v.view(), false);
            let param = |stat, value| Obs { layer: l as u32, step: t as u32, site: Site::Param, stat, m: None, value };
            obs.push(param("grad_norm_a", fro(&grad_a)));
            obs.push(param("grad_norm_b", fro(&grad_b)));
            if cfg.delta_norm && t == cfg.steps {
                let btb = layer.b.t().dot(&layer.b);
                let aat = layer.a.dot(&layer.a.t());
                let sq: f64 = Zip::from(&btb).and(&aat).fold(0.0f64, |acc, &x, &y| acc + (x as f64) * (y as f64));
                obs.push(param("delta_norm", (gamma as f64) * sq.max(0.0).sqrt()));
            }
            if l > 0 {
                let mut du = v.dot(&data.weights[l]);
                du += &g_in;
                let through = match &c.rms {
                    Some(rms) => rmsnorm_backward(&du, &c.u, rms),
                    None => du,
                };
                dh = if cfg.residual { &dh + &through } else { through };
            }
            grads.push((grad_a, grad_b));
        }
        grads.reverse();
        if t < cfg.steps {
            for (layer, (ga, gb)) in layers.iter_mut().zip(&grads) {
                update(&hyper, &mut layer.sa, &mut layer.a, ga, t as i32 + 1);
                update(&hyper, &mut layer.sb, &mut layer.b, gb, t as i32 + 1);
            }
        }
    }
    CellResult { obs, losses }
}

/// The frozen network (every B = 0, as at step 0): adapter inputs u_l for batch `idx` and,
/// with `grads`, the loss gradients v_l at every adapter output. Neither depends on A.
pub(crate) fn frozen_pass(
    cfg: &TheoryConfig,
    data: &TrialData,
    prep: &Prepared,
    idx: usize,
    grads: bool,
) -> (Vec<Array2<f32>>, Vec<Array2<f32>>) {
    let d = cfg.width;
    let layers: Vec<Layer> = (0..cfg.layers)
        .map(|_| Layer {
            a: Array2::zeros((1, d)),
            b: Array2::zeros((d, 1)),
            sa: OptState::Plain,
            sb: OptState::Plain,
        })
        .collect();
    let net = Net { cfg, data, prep, gamma: 0.0 };
    let (f, caches) = net.forward(&layers, idx);
    let mut vs = Vec::new();
    if grads {
        let (_, mut dh) = net.loss(&f, idx);
        for l in (0..layers.len()).rev() {
            let c = &caches[l];
            let mut v = dh.clone();
            if cfg.activation != Activation::Identity {
                Zip::from(&mut v).and(&c.z).for_each(|g, &z| *g *= act_grad(cfg.activation, z));
            }
            if l > 0 {
                let du = v.dot(&data.weights[l]);
                let through = match &c.rms {
                    Some(rms) => rmsnorm_backward(&du, &c.u, rms),
                    None => du,
                };
                dh = if cfg.residual { &dh + &through } else { through };
            }
            vs.push(v);
        }
        vs.reverse();
    }
    (caches.into_iter().map(|c| c.u).collect(), vs)
}
