//! One cell of the checker: a synthetic network with an adapter per layer, trained for a
//! few steps, with every adapter's moments measured at every step.
//!
//! Layer l maps h to h' = [h +] act(W_l u + gamma B_l A_l u), u = [rmsnorm](h). Gradients
//! are written out by hand (the network is small and the point is to see every term).
//!
//! Longer than 600 lines because the forward pass, the hand-written backward pass, the
//! optimizers' steps and the probes of every site are one cell's computation and share its
//! buffers; the exact law is in `exact/`, the data in `data.rs`.
use crate::config::{Activation, AdapterInit, Init, Loss, Reuse, TheoryConfig};
use crate::data::TrialData;
use crate::kernel::{matmul, matmul_into};
use ndarray::{s, Array1, Array2, ArrayView2, Axis, Zip};
use rankstab_records::{Optimizer, Scaling, Site, Stat};
use rayon::prelude::*;

const RMS_EPS: f32 = 1e-6;

/// One measured number of a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Obs {
    /// Layer.
    pub layer: u32,
    /// Step (0 = initialisation).
    pub step: u32,
    /// Site.
    pub site: Site,
    /// What is measured.
    pub stat: Stat,
    /// Moment order, for moments.
    pub m: Option<u32>,
    /// Value.
    pub value: f64,
}

/// What one cell simulates.
#[derive(Debug, Clone, PartialEq)]
pub struct CellSpec {
    /// Optimizer.
    pub opt: Optimizer,
    /// Scaling.
    pub scaling: Scaling,
    /// Input regime.
    pub reuse: Reuse,
    /// Rank.
    pub rank: usize,
}

/// Per-trial values shared by every cell. Each training batch is stacked with the held-out
/// batch ([train; heldout], so one pass over A and B serves both); for each stack: the
/// layer-0 adapter input u_0, the frozen layer-0 output u_0 W_0^T, and the targets; for the
/// first two stacks also u_0 A_max^T, the layer-0 adapters' first product at every rank.
pub(crate) struct Prepared {
    /// Rows of the training batch at the top of every stack.
    pub n_train: usize,
    /// Stacked network inputs per training batch.
    pub x: Vec<Array2<f32>>,
    /// Stacked layer-0 adapter inputs per training batch.
    pub u0: Vec<Array2<f32>>,
    /// Stacked frozen layer-0 outputs per training batch.
    pub base0: Vec<Array2<f32>>,
    /// Targets of each stack (training rows, then held-out rows).
    pub targets: Vec<Target>,
    /// u_0 A_max^T (rows x largest rank) for stacks 0 and 1 (those that exist), with A_max
    /// the trial's unscaled draw of the layer-0 A. While a cell's A is still its initial
    /// draw (steps 0 and 1: the first step's gradient of A is zero because B is), its
    /// product u_0 A^T is the first r columns of this, times the init's scale: one product
    /// per trial instead of one per cell and step ([`SHARED_STACKS`]).
    pub ax0: Vec<Array2<f32>>,
    /// Floating-point operations of the shared products above.
    pub flops: f64,
}

/// Stacks whose layer-0 product with the initial A is computed once per trial.
pub(crate) const SHARED_STACKS: usize = 2;

/// Floating-point operations of an (m x k) by (k x n) product.
pub(crate) fn mm_flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

pub(crate) enum Target {
    Mse(Array2<f32>),
    Ce(Vec<usize>),
}

pub(crate) fn rmsnorm(h: &Array2<f32>) -> (Array2<f32>, Array1<f32>) {
    let d = h.ncols() as f32;
    let rms: Array1<f32> = h.map_axis(Axis(1), |row| {
        (row.iter().map(|v| v * v).sum::<f32>() / d + RMS_EPS).sqrt()
    });
    let mut u = h.clone();
    for (mut row, &r) in u.axis_iter_mut(Axis(0)).zip(rms.iter()) {
        row.mapv_inplace(|v| v / r);
    }
    (u, rms)
}

fn rmsnorm_backward(du: &Array2<f32>, u: &Array2<f32>, rms: &Array1<f32>) -> Array2<f32> {
    let d = u.ncols() as f32;
    let mut dh = du.clone();
    for ((mut row, urow), &r) in dh
        .axis_iter_mut(Axis(0))
        .zip(u.axis_iter(Axis(0)))
        .zip(rms.iter())
    {
        let dot: f32 = row.iter().zip(urow.iter()).map(|(a, b)| a * b).sum::<f32>() / d;
        Zip::from(&mut row)
            .and(&urow)
            .for_each(|g, &uu| *g = (*g - uu * dot) / r);
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

/// Prepares the cell-independent per-batch values of a trial, one batch per worker.
pub(crate) fn prepare(cfg: &TheoryConfig, data: &TrialData) -> Prepared {
    let per_batch: Vec<_> = data
        .batches
        .par_iter()
        .enumerate()
        .map(|(idx, batch)| {
            let x = ndarray::concatenate(Axis(0), &[batch.view(), data.heldout.view()])
                .expect("same width");
            let u = if cfg.rmsnorm {
                rmsnorm(&x).0
            } else {
                x.clone()
            };
            let base0 = matmul(u.view(), data.weights[0].t());
            let ax0 = (idx < SHARED_STACKS).then(|| matmul(u.view(), data.adapters[0].t()));
            let target = match cfg.loss {
                Loss::Mse => Target::Mse(matmul(x.view(), data.teacher.t())),
                Loss::Ce => {
                    let scores = matmul(x.view(), data.teacher.t());
                    Target::Ce(
                        scores
                            .axis_iter(Axis(0))
                            .map(|row| {
                                row.iter()
                                    .enumerate()
                                    .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                                        if v > best.1 {
                                            (i, v)
                                        } else {
                                            best
                                        }
                                    })
                                    .0
                            })
                            .collect(),
                    )
                }
            };
            (x, u, base0, ax0, target)
        })
        .collect();
    let mut out = Prepared {
        n_train: cfg.batch,
        x: Vec::new(),
        u0: Vec::new(),
        base0: Vec::new(),
        targets: Vec::new(),
        ax0: Vec::new(),
        flops: 0.0,
    };
    for (x, u, base0, ax0, target) in per_batch {
        if let Some(ax0) = ax0 {
            out.flops += mm_flops(u.nrows(), u.ncols(), ax0.ncols());
            out.ax0.push(ax0);
        }
        out.x.push(x);
        out.u0.push(u);
        out.base0.push(base0);
        out.targets.push(target);
    }
    out
}

enum OptState {
    Plain,
    Momentum(Array2<f32>),
    Adam { m: Array2<f32>, v: Array2<f32> },
}

impl OptState {
    fn new(opt: Optimizer, (r, c): (usize, usize)) -> Self {
        match opt {
            Optimizer::Sgd => OptState::Plain,
            Optimizer::SgdMomentum => OptState::Momentum(pool::zeros(r, c)),
            Optimizer::Adam | Optimizer::Adamw => OptState::Adam {
                m: pool::zeros(r, c),
                v: pool::zeros(r, c),
            },
        }
    }

    fn release(self) {
        match self {
            OptState::Plain => {}
            OptState::Momentum(b) => pool::give(b),
            OptState::Adam { m, v } => {
                pool::give(m);
                pool::give(v);
            }
        }
    }
}

/// Hyper-parameters of one update, resolved from the config.
struct Hyper {
    opt: Optimizer,
    lr: f32,
    momentum: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
}

/// What one [`fused_pass`] produced.
struct Pass {
    /// `coef p` with the old `p`.
    back: Array2<f32>,
    /// Whether `p` was updated (false when no step was asked for, or when a zero gradient
    /// from a zero state would change nothing).
    updated: bool,
    /// Floating-point operations of the products computed.
    flops: f64,
}

/// One fused pass over an adapter matrix `p` (R x C): the backward product through it and,
/// optionally, its optimizer step.
///
/// * returns `back = coef p` (N x C) with the old `p` (the gradient flowing through it);
/// * if `step` is given, updates `p` with the gradient `coef^T q` (q: N x C) by `state`.
///
/// For B (d x r): coef = v, q = gamma A u, back = v B. For A (r x d): coef = gamma v B,
/// q = u, back = (gamma v B) A. The gradient is formed one row at a time inside the update
/// and never stored: the checker is bound by memory traffic, and one read and one write of
/// each matrix per step is the least it can do.
///
/// `p_zero` says that every entry of `p` is zero (B before its first update): `back` is
/// then zero without a product, as it is when `coef` is zero (A's pass at step 0, where
/// coef = gamma v B with B = 0).
fn fused_pass(
    p: &mut Array2<f32>,
    p_zero: bool,
    coef: ArrayView2<f32>,
    q: ArrayView2<f32>,
    step: Option<(&Hyper, &mut OptState, i32)>,
) -> Pass {
    /// Rows of `p` per block: a block and its gradient stay in L2 between the two products
    /// and the update.
    const BLOCK: usize = 32;
    let (rows, cols) = p.dim();
    let n = coef.nrows();
    let mut back = Array2::<f32>::zeros((n, cols));
    let (h, mut state, t) = match step {
        Some((h, st, t)) => (Some(h), Some(st), t),
        None => (None, None, 0),
    };
    let first = t == 1;
    let coef_zero = coef.iter().all(|&v| v == 0.0);
    // From a zero state a zero gradient changes nothing (unless weight decay acts).
    let skip_update = h.is_none_or(|h| first && coef_zero && (h.wd == 0.0 || !h.opt.is_adaptive()));
    let back_zero = p_zero || coef_zero;
    let mut flops = 0.0;
    if !back_zero {
        flops += mm_flops(n, rows, cols);
    }
    if !skip_update {
        flops += mm_flops(rows, n, cols);
    }
    if back_zero && skip_update {
        return Pass {
            back,
            updated: false,
            flops,
        };
    }
    let (adam_step, bc2_sqrt) = match h {
        Some(h) => {
            let bc1 = 1.0 - (h.beta1 as f64).powi(t);
            let bc2 = 1.0 - (h.beta2 as f64).powi(t);
            ((h.lr as f64 / bc1) as f32, bc2.sqrt() as f32)
        }
        None => (0.0, 1.0),
    };
    let mut gbuf = if skip_update {
        Array2::zeros((0, cols))
    } else {
        Array2::<f32>::zeros((BLOCK, cols))
    };
    for i0 in (0..rows).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(rows);
        let cblk = coef.slice(s![.., i0..i1]);
        if !back_zero {
            matmul_into(cblk, p.slice(s![i0..i1, ..]), true, back.view_mut());
        }
        if skip_update {
            continue;
        }
        let (Some(h), Some(state)) = (h, state.as_deref_mut()) else {
            continue;
        };
        let mut g = gbuf.slice_mut(s![..i1 - i0, ..]);
        matmul_into(cblk.t(), q, false, g.view_mut());
        let pblk = p.slice_mut(s![i0..i1, ..]);
        match state {
            OptState::Plain => Zip::from(pblk).and(&g).for_each(|pj, &gj| *pj -= h.lr * gj),
            OptState::Momentum(buf) => {
                Zip::from(pblk)
                    .and(buf.slice_mut(s![i0..i1, ..]))
                    .and(&g)
                    .for_each(|pj, bj, &gj| {
                        // PyTorch: the first step initialises the buffer with the gradient.
                        *bj = if first { gj } else { h.momentum * *bj + gj };
                        *pj -= h.lr * *bj;
                    })
            }
            OptState::Adam { m, v } => {
                let decoupled = h.opt == Optimizer::Adamw;
                Zip::from(pblk)
                    .and(m.slice_mut(s![i0..i1, ..]))
                    .and(v.slice_mut(s![i0..i1, ..]))
                    .and(&g)
                    .for_each(|pj, mj, vj, &gj| {
                        let gj = if decoupled { gj } else { gj + h.wd * *pj };
                        if decoupled {
                            *pj *= 1.0 - h.lr * h.wd;
                        }
                        *mj = h.beta1 * *mj + (1.0 - h.beta1) * gj;
                        *vj = h.beta2 * *vj + (1.0 - h.beta2) * gj * gj;
                        *pj -= adam_step * *mj / (vj.sqrt() / bc2_sqrt + h.eps);
                    })
            }
        }
    }
    Pass {
        back,
        updated: !skip_update,
        flops,
    }
}

/// Adam's regime after an update at step `t`: the share of the state's coordinates whose
/// bias-corrected `sqrt(v_hat)` is below `10 eps` (eps dominates their step). `None` for
/// optimizers without second moments.
fn eps_share(state: &OptState, h: &Hyper, t: i32) -> Option<f64> {
    let OptState::Adam { v, .. } = state else {
        return None;
    };
    let bc2 = 1.0 - (h.beta2 as f64).powi(t);
    // sqrt(v / bc2) < 10 eps  <=>  v < 100 eps^2 bc2.
    let limit = (100.0 * (h.eps as f64).powi(2) * bc2) as f32;
    let small = v.iter().filter(|&&x| x < limit).count();
    Some(small as f64 / v.len().max(1) as f64)
}

/// Absolute and raw moments of order 1..=max_m (max_m <= 8) of the entries of `y`,
/// accumulated in f64.
///
/// ```
/// let y = ndarray::array![[1.0f32, -2.0], [0.0, 3.0]];
/// let (abs, raw) = rankstab_theory::sim::moments(y.view(), 3);
/// assert_eq!(abs, vec![1.5, 3.5, 9.0]);
/// assert_eq!(raw, vec![0.5, 3.5, 5.0]);
/// ```
pub fn moments(y: ArrayView2<f32>, max_m: u32) -> (Vec<f64>, Vec<f64>) {
    fn acc<const M: usize>(y: ArrayView2<f32>) -> ([f64; M], [f64; M]) {
        let mut abs = [0.0f64; M];
        let mut raw = [0.0f64; M];
        for &v in y.iter() {
            let v = v as f64;
            let a = v.abs();
            // p = |v|^m, q = v |v|^(m-1): raw moments are p for even m, q for odd m.
            let (mut p, mut q) = (a, v);
            for k in 0..M {
                abs[k] += p;
                raw[k] += if k % 2 == 1 { p } else { q };
                p *= a;
                q *= a;
            }
        }
        (abs, raw)
    }
    let n = y.len().max(1) as f64;
    let (abs, raw): (Vec<f64>, Vec<f64>) = if max_m <= 4 {
        let (a, r) = acc::<4>(y);
        (a.to_vec(), r.to_vec())
    } else {
        let (a, r) = acc::<8>(y);
        (a.to_vec(), r.to_vec())
    };
    let k = max_m as usize;
    (
        abs[..k].iter().map(|v| v / n).collect(),
        raw[..k].iter().map(|v| v / n).collect(),
    )
}

/// Per-thread pool of large buffers: a cell's matrices (up to rank x width each) are taken
/// from it and given back, so the kernel is not asked to map and zero fresh pages for every
/// cell (that cost more than the arithmetic).
mod pool {
    use ndarray::Array2;
    use std::cell::RefCell;

    thread_local! {
        static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    }

    /// A zeroed rows x cols matrix.
    pub fn zeros(rows: usize, cols: usize) -> Array2<f32> {
        let len = rows * cols;
        let mut buf = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let best = p
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| p.swap_remove(i)).unwrap_or_default()
        });
        buf.clear();
        buf.resize(len, 0.0);
        Array2::from_shape_vec((rows, cols), buf).expect("length matches shape")
    }

    /// Returns a matrix's buffer to the pool.
    pub fn give(a: Array2<f32>) {
        let (v, _) = a.into_raw_vec_and_offset();
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            p.push(v);
            if p.len() > 16 {
                // keep the largest
                p.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
                p.truncate(16);
            }
        });
    }
}

/// Frobenius norm squared of sum_n p_n q_n^T from the Gram matrices of P and Q (rows are
/// examples): sum over (n, n') of (p_n . p_n')(q_n . q_n'). Costs N^2 (d + r), not d r.
fn outer_sum_norm_sq(p: ArrayView2<f32>, q: ArrayView2<f32>) -> f64 {
    let gp = matmul(p, p.t());
    let gq = matmul(q, q.t());
    Zip::from(&gp)
        .and(&gq)
        .fold(0.0f64, |acc, &a, &b| acc + (a as f64) * (b as f64))
}

struct Layer {
    a: Array2<f32>,
    b: Array2<f32>,
    sa: OptState,
    sb: OptState,
    /// A is still its initial draw: the first r rows of the trial's draw times
    /// [`Net::a_scale`] (its layer-0 product is then [`Prepared::ax0`]'s).
    a_drawn: bool,
    /// Every entry of B is zero (B = 0 at init, until its first update).
    b_zero: bool,
}

#[cfg(test)]
thread_local! {
    /// Tests: cells built on this thread know nothing of their factors (every product is
    /// computed), to compare against the shortcuts.
    static NO_SHORTCUTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether cells use what is known of their factors (always, outside tests).
fn shortcuts() -> bool {
    #[cfg(test)]
    return !NO_SHORTCUTS.with(|c| c.get());
    #[cfg(not(test))]
    true
}

impl Layer {
    /// A layer with nothing known of its factors: every product is computed.
    #[cfg(test)]
    fn general(a: Array2<f32>, b: Array2<f32>) -> Self {
        Layer {
            a,
            b,
            sa: OptState::Plain,
            sb: OptState::Plain,
            a_drawn: false,
            b_zero: false,
        }
    }
}

struct Cache {
    u: Array2<f32>,
    rms: Option<Array1<f32>>,
    ax: Array2<f32>,
    ad: Array2<f32>,
    z: Array2<f32>,
}

/// The loss gradient at layer l's pre-activation (training rows `..n`) from the gradient
/// `dh` at its output.
fn to_pre_activation(activation: Activation, c: &Cache, dh: &Array2<f32>, n: usize) -> Array2<f32> {
    let mut v = dh.clone();
    if activation != Activation::Identity {
        Zip::from(&mut v)
            .and(c.z.slice(s![..n, ..]))
            .for_each(|g, &z| *g *= act_grad(activation, z));
    }
    v
}

/// The loss gradient at layer l's input h (training rows `..n`), from the gradient `du` at
/// its adapter input u and the gradient `dh` that reaches h around the layer: back through
/// the RMSNorm (when on), plus `dh` itself with a residual connection.
fn to_layer_input(
    cfg: &TheoryConfig,
    c: &Cache,
    dh: &Array2<f32>,
    du: Array2<f32>,
    n: usize,
) -> Array2<f32> {
    let through = match &c.rms {
        Some(rms) => {
            let u = c.u.slice(s![..n, ..]).to_owned();
            rmsnorm_backward(&du, &u, &rms.slice(s![..n]).to_owned())
        }
        None => du,
    };
    if cfg.residual {
        dh + &through
    } else {
        through
    }
}

/// Result of one cell: the observations and per-step losses.
pub struct CellResult {
    /// Moments and norms.
    pub obs: Vec<Obs>,
    /// (step, training loss, held-out loss), up to the last step run.
    pub losses: Vec<(u32, f64, f64)>,
    /// Whether the run was stopped as diverging ([`CellRun::divergence`]).
    pub diverged: bool,
    /// (layer, step, summary of the singular values of `gamma B A`).
    pub spectra: Vec<(u32, u32, crate::spectrum::Spectrum)>,
    /// Floating-point operations of the cell's adapter products, of the frozen products of
    /// layers above the first and of `delta_norm`'s (what `run::trial_flops` counts).
    pub flops: f64,
}

struct Net<'a> {
    cfg: &'a TheoryConfig,
    data: &'a TrialData,
    prep: &'a Prepared,
    gamma: f32,
    /// The init's scale of the draw (A = a_scale x the draw's first r rows).
    a_scale: f32,
    /// Floating-point operations of the forward products so far.
    flops: std::cell::Cell<f64>,
}

impl Net<'_> {
    fn count(&self, flops: f64) {
        self.flops.set(self.flops.get() + flops);
    }

    /// Forward pass of stack `idx` ([train; heldout]) through every layer.
    fn forward(&self, layers: &[Layer], idx: usize) -> (Array2<f32>, Vec<Cache>) {
        let mut caches = Vec::with_capacity(layers.len());
        let mut h = self.prep.x[idx].clone();
        for (l, layer) in layers.iter().enumerate() {
            let (u, rms, base) = if l == 0 {
                (
                    self.prep.u0[idx].clone(),
                    None,
                    self.prep.base0[idx].clone(),
                )
            } else {
                let (u, rms) = if self.cfg.rmsnorm {
                    let (u, r) = rmsnorm(&h);
                    (u, Some(r))
                } else {
                    (h.clone(), None)
                };
                self.count(mm_flops(u.nrows(), u.ncols(), u.ncols()));
                let base = matmul(u.view(), self.data.weights[l].t());
                (u, rms, base)
            };
            let r = layer.a.nrows();
            let shared = if l == 0 && layer.a_drawn {
                self.prep.ax0.get(idx)
            } else {
                None
            };
            let mut ax = match shared {
                // The trial's product with the draw, its first r columns, scaled as A is.
                Some(ax0) => {
                    let scale = self.a_scale;
                    ax0.slice(s![.., ..r]).mapv(|v| v * scale)
                }
                None => {
                    self.count(mm_flops(u.nrows(), u.ncols(), r));
                    matmul(u.view(), layer.a.t())
                }
            };
            // gamma folded into the small factor: ad = (gamma ax) B^T.
            ax.mapv_inplace(|v| v * self.gamma);
            let ad = if layer.b_zero {
                Array2::zeros((u.nrows(), layer.b.nrows()))
            } else {
                self.count(mm_flops(u.nrows(), r, layer.b.nrows()));
                matmul(ax.view(), layer.b.t())
            };
            let z = &base + &ad;
            let a = if self.cfg.activation == Activation::Identity {
                z.clone()
            } else {
                z.mapv(|v| act(self.cfg.activation, v))
            };
            let next = if self.cfg.residual { h + &a } else { a };
            caches.push(Cache { u, rms, ax, ad, z });
            h = next;
        }
        (h, caches)
    }

    /// Loss of `rows` of stack `idx` and its gradient with respect to those rows of the
    /// output (mean over the rows).
    fn loss(
        &self,
        f: ArrayView2<f32>,
        idx: usize,
        rows: std::ops::Range<usize>,
    ) -> (f64, Array2<f32>) {
        let n = rows.len() as f32;
        let f = f.slice(s![rows.clone(), ..]);
        match &self.prep.targets[idx] {
            Target::Mse(t) => {
                let diff = &f - &t.slice(s![rows, ..]);
                let loss =
                    diff.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / (2.0 * n as f64);
                (loss, diff / n)
            }
            Target::Ce(labels) => {
                let r = self
                    .data
                    .readout
                    .as_ref()
                    .expect("readout drawn for cross-entropy");
                let mut logits = f.dot(&r.t());
                let mut loss = 0.0f64;
                for (mut row, &y) in logits.axis_iter_mut(Axis(0)).zip(&labels[rows]) {
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

/// How a cell is trained and what it records beyond its [`CellSpec`]. The checker's cells
/// use [`CellRun::checker`]; `rankstab transfer` sets the learning rates of A and B, the
/// init, the steps to measure, and stops a diverging run.
#[derive(Debug, Clone, PartialEq)]
pub struct CellRun {
    /// Learning rate of every A.
    pub lr_a: f64,
    /// Learning rate of every B (LoRA+ sets it above `lr_a`).
    pub lr_b: f64,
    /// Which factor starts random.
    pub adapter_init: AdapterInit,
    /// Steps whose moments and norms are recorded (`None`: every step).
    pub record: Option<Vec<u32>>,
    /// Stop once the training loss is not finite or exceeds this multiple of its initial
    /// value (the run is then marked diverged). `None`: always run every step.
    pub divergence: Option<f64>,
    /// Steps at which the singular values of each layer's `gamma B A` are summarised.
    pub spectrum_steps: Vec<u32>,
}

impl CellRun {
    /// The checker's cell: the configuration's learning rate for both factors, A random,
    /// every step recorded, no early stop, no spectra.
    pub fn checker(cfg: &TheoryConfig, opt: Optimizer) -> Self {
        let lr = cfg.lr(opt);
        CellRun {
            lr_a: lr,
            lr_b: lr,
            adapter_init: AdapterInit::A,
            record: None,
            divergence: None,
            spectrum_steps: Vec::new(),
        }
    }
}

/// Runs one cell of the checker for `cfg.steps` steps and measures everything.
pub(crate) fn run_cell(
    cfg: &TheoryConfig,
    data: &TrialData,
    prep: &Prepared,
    cell: &CellSpec,
) -> CellResult {
    run_cell_with(cfg, data, prep, cell, &CellRun::checker(cfg, cell.opt))
}

/// Runs one cell as `how` says.
pub(crate) fn run_cell_with(
    cfg: &TheoryConfig,
    data: &TrialData,
    prep: &Prepared,
    cell: &CellSpec,
    how: &CellRun,
) -> CellResult {
    let r = cell.rank;
    let d = cfg.width;
    let gamma = cell.scaling.factor(cfg.alpha, r) as f32;
    let std_scale = match cfg.init {
        Init::KaimingUniform => 1.0f32,
        Init::Gaussian | Init::PeftGaussian => cfg.init.variance(d, r).sqrt() as f32,
    };
    // A is the draw and B zero at init (LoRA's init); the other init is not used by the
    // checker and gets no shortcut.
    let known = how.adapter_init == AdapterInit::A && shortcuts();
    let mut layers: Vec<Layer> = data
        .adapters
        .iter()
        .map(|a_max| {
            let mut a = pool::zeros(r, d);
            let mut b = pool::zeros(d, r);
            match how.adapter_init {
                // A random (the first r rows of the largest rank's draw), B zero.
                AdapterInit::A => Zip::from(&mut a)
                    .and(&a_max.slice(s![..r, ..]))
                    .for_each(|x, &y| *x = y * std_scale),
                // B random with A's distribution (the same draw, transposed), A zero.
                AdapterInit::B => Zip::from(&mut b)
                    .and(&a_max.slice(s![..r, ..]).t())
                    .for_each(|x, &y| *x = y * std_scale),
            }
            Layer {
                a,
                b,
                sa: OptState::new(cell.opt, (r, d)),
                sb: OptState::new(cell.opt, (d, r)),
                a_drawn: known,
                b_zero: known,
            }
        })
        .collect();
    let hyper = Hyper {
        opt: cell.opt,
        lr: how.lr_a as f32,
        momentum: cfg.momentum as f32,
        beta1: cfg.adam_beta1 as f32,
        beta2: cfg.adam_beta2 as f32,
        eps: cfg.adam_eps as f32,
        wd: cfg.weight_decay as f32,
    };
    let hyper_b = Hyper {
        lr: how.lr_b as f32,
        ..hyper
    };
    let recorded = |t: usize| how.record.as_ref().is_none_or(|r| r.contains(&(t as u32)));
    let mut diverged = false;
    let mut spectra = Vec::new();
    let net = Net {
        cfg,
        data,
        prep,
        gamma,
        a_scale: std_scale,
        flops: std::cell::Cell::new(0.0),
    };
    let max_m = cfg.moments.iter().copied().max().unwrap_or(1);
    let n = prep.n_train;
    let total = prep.x[0].nrows();
    let mut obs = Vec::new();
    let mut losses = Vec::new();
    // Floating-point operations of the backward products (the forward's are counted by
    // `net`), as `run::trial_flops` models them.
    let mut flops = 0.0;
    let push_moments =
        |obs: &mut Vec<Obs>, l: usize, t: usize, site: Site, y: ArrayView2<f32>, raw_too: bool| {
            let (abs, raw) = moments(y, max_m);
            for &m in &cfg.moments {
                let k = m as usize - 1;
                obs.push(Obs {
                    layer: l as u32,
                    step: t as u32,
                    site,
                    stat: Stat::Abs,
                    m: Some(m),
                    value: abs[k],
                });
                if raw_too {
                    obs.push(Obs {
                        layer: l as u32,
                        step: t as u32,
                        site,
                        stat: Stat::Raw,
                        m: Some(m),
                        value: raw[k],
                    });
                }
            }
        };
    for t in 0..=cfg.steps {
        let idx = match cell.reuse {
            Reuse::Coherent => 0,
            Reuse::Fresh => t,
        };
        let (f, caches) = net.forward(&layers, idx);
        let (loss, mut dh) = net.loss(f.view(), idx, 0..n);
        let (loss_h, _) = net.loss(f.view(), idx, n..total);
        losses.push((t as u32, loss, loss_h));
        if how.spectrum_steps.contains(&(t as u32)) {
            for (l, layer) in layers.iter().enumerate() {
                let sv = crate::spectrum::update_singular_values(&layer.b, &layer.a, gamma);
                spectra.push((l as u32, t as u32, crate::spectrum::Spectrum::of(&sv)));
            }
        }
        if let Some(limit) = how.divergence {
            if !(loss.is_finite()
                && loss_h.is_finite()
                && loss <= limit * losses[0].1.max(f64::MIN_POSITIVE))
            {
                diverged = true;
                break;
            }
        }
        let record = recorded(t);
        for l in (0..layers.len()).rev() {
            let c = &caches[l];
            let v = to_pre_activation(cfg.activation, c, &dh, n);
            let ax = c.ax.slice(s![..n, ..]); // gamma A u, training rows
            let u = c.u.slice(s![..n, ..]);
            // Measurements first need the old A and B; the fused passes return the backward
            // products computed before they update. B first: its backward product feeds A's.
            let step = (t < cfg.steps).then_some(t as i32 + 1);
            let layer = &mut layers[l];
            let pass_b = fused_pass(
                &mut layer.b,
                layer.b_zero,
                v.view(),
                ax,
                step.map(|s| (&hyper_b, &mut layer.sb, s)),
            );
            layer.b_zero &= !pass_b.updated;
            let mut bv = pass_b.back;
            bv.mapv_inplace(|x| x * gamma); // gamma v B
            let pass_a = fused_pass(
                &mut layer.a,
                false,
                bv.view(),
                u,
                step.map(|s| (&hyper, &mut layer.sa, s)),
            );
            layer.a_drawn &= !pass_a.updated;
            let g_in = pass_a.back;
            flops += pass_b.flops + pass_a.flops;
            if l > 0 {
                flops += mm_flops(n, d, d);
            }
            if !record {
                if l > 0 {
                    let mut du = matmul(v.view(), data.weights[l].view());
                    du += &g_in;
                    dh = to_layer_input(cfg, c, &dh, du, n);
                }
                continue;
            }
            push_moments(&mut obs, l, t, Site::Fwd, c.ad.slice(s![..n, ..]), true);
            push_moments(
                &mut obs,
                l,
                t,
                Site::FwdHeldout,
                c.ad.slice(s![n.., ..]),
                true,
            );
            push_moments(&mut obs, l, t, Site::Bwd, g_in.view(), true);
            push_moments(&mut obs, l, t, Site::GradOut, v.view(), false);
            // grad_B = v^T (gamma A u) = sum_n v_n ax_n^T;  grad_A = bv^T u.
            let param = |stat, value| Obs {
                layer: l as u32,
                step: t as u32,
                site: Site::Param,
                stat,
                m: None,
                value,
            };
            obs.push(param(
                Stat::GradNormA,
                outer_sum_norm_sq(bv.view(), u).max(0.0).sqrt(),
            ));
            obs.push(param(
                Stat::GradNormB,
                outer_sum_norm_sq(v.view(), ax).max(0.0).sqrt(),
            ));
            if let Some(s) = step {
                for (stat, state) in [(Stat::EpsShareA, &layer.sa), (Stat::EpsShareB, &layer.sb)] {
                    if let Some(share) = eps_share(state, &hyper, s) {
                        obs.push(Obs {
                            step: s as u32,
                            ..param(stat, share)
                        });
                    }
                }
            }
            if cfg.delta_norm {
                flops += 2.0 * mm_flops(r, d, r);
                let btb = layer.b.t().dot(&layer.b);
                let aat = layer.a.dot(&layer.a.t());
                let sq: f64 = Zip::from(&btb)
                    .and(&aat)
                    .fold(0.0f64, |acc, &x, &y| acc + (x as f64) * (y as f64));
                obs.push(param(Stat::DeltaNorm, (gamma as f64) * sq.max(0.0).sqrt()));
            }
            if l > 0 {
                let mut du = matmul(v.view(), data.weights[l].view());
                du += &g_in;
                dh = to_layer_input(cfg, c, &dh, du, n);
            }
        }
    }
    for layer in layers {
        pool::give(layer.a);
        pool::give(layer.b);
        layer.sa.release();
        layer.sb.release();
    }
    CellResult {
        obs,
        losses,
        diverged,
        spectra,
        flops: flops + net.flops.get(),
    }
}

/// The frozen network (every B = 0, as at step 0) on stack `idx`: adapter inputs u_l of all
/// rows and, for the training rows, the loss gradients v_l at every adapter output.
/// Neither depends on A.
pub(crate) fn frozen_pass(
    cfg: &TheoryConfig,
    data: &TrialData,
    prep: &Prepared,
    idx: usize,
) -> (Vec<Array2<f32>>, Vec<Array2<f32>>) {
    let d = cfg.width;
    let layers: Vec<Layer> = (0..cfg.layers)
        .map(|_| Layer {
            a: Array2::zeros((1, d)),
            b: Array2::zeros((d, 1)),
            sa: OptState::Plain,
            sb: OptState::Plain,
            a_drawn: false,
            b_zero: true,
        })
        .collect();
    let net = Net {
        cfg,
        data,
        prep,
        gamma: 0.0,
        a_scale: 0.0,
        flops: std::cell::Cell::new(0.0),
    };
    let n = prep.n_train;
    let (f, caches) = net.forward(&layers, idx);
    let (_, mut dh) = net.loss(f.view(), idx, 0..n);
    let mut vs = Vec::new();
    for l in (0..layers.len()).rev() {
        let c = &caches[l];
        let v = to_pre_activation(cfg.activation, c, &dh, n);
        if l > 0 {
            let du = matmul(v.view(), data.weights[l].view());
            dh = to_layer_input(cfg, c, &dh, du, n);
        }
        vs.push(v);
    }
    vs.reverse();
    (caches.into_iter().map(|c| c.u).collect(), vs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Loss, TheoryConfig};
    use crate::data::TrialData;

    /// The products skipped or shared (B = 0 at step 0, A still the draw at steps 0 and 1)
    /// change no result: every observation and loss against the same cells with every
    /// product computed, bit for bit at scale 1 (Kaiming init); with a Gaussian init the
    /// shared product is scaled after the product instead of before, so within f32
    /// rounding. The counted products differ, so the shortcuts did act.
    #[test]
    fn the_shortcuts_change_no_result() {
        use crate::run::cells;
        for (init, exact) in [(Init::KaimingUniform, true), (Init::Gaussian, false)] {
            let cfg = TheoryConfig {
                width: 24,
                ranks: vec![2, 5],
                layers: 2,
                rmsnorm: true,
                residual: true,
                activation: Activation::Gelu,
                init,
                optimizers: vec![Optimizer::Sgd, Optimizer::SgdMomentum, Optimizer::Adam],
                batch: 4,
                heldout: 3,
                steps: 3,
                ..Default::default()
            };
            let data = TrialData::draw(&cfg, crate::config::InputDist::Gaussian, 0, true);
            let prep = prepare(&cfg, &data);
            for cell in cells(&cfg) {
                let fast = run_cell(&cfg, &data, &prep, &cell);
                NO_SHORTCUTS.with(|c| c.set(true));
                let full = run_cell(&cfg, &data, &prep, &cell);
                NO_SHORTCUTS.with(|c| c.set(false));
                assert!(fast.flops < full.flops, "{cell:?}");
                assert_eq!(fast.obs.len(), full.obs.len());
                // A raw moment's scale is its absolute moment's (an odd raw moment near zero
                // is a difference of large terms).
                let scale = |o: &Obs| {
                    fast.obs
                        .iter()
                        .find(|a| {
                            a.stat == Stat::Abs
                                && (a.layer, a.step, a.site, a.m) == (o.layer, o.step, o.site, o.m)
                        })
                        .map_or(o.value.abs(), |a| a.value)
                };
                for (a, b) in fast.obs.iter().zip(&full.obs) {
                    assert_eq!(
                        (a.layer, a.step, a.site, a.stat, a.m),
                        (b.layer, b.step, b.site, b.stat, b.m)
                    );
                    if exact {
                        assert_eq!(
                            a.value.to_bits(),
                            b.value.to_bits(),
                            "{cell:?} {a:?} vs {b:?}"
                        );
                    } else {
                        let err = (a.value - b.value).abs() / scale(a).max(1e-30);
                        assert!(err < 1e-5, "{cell:?} {a:?} vs {b:?}");
                    }
                }
                for (a, b) in fast.losses.iter().zip(&full.losses) {
                    if exact {
                        assert_eq!(a, b, "{cell:?}");
                    } else {
                        assert!((a.1 - b.1).abs() < 1e-5 * a.1 && (a.2 - b.2).abs() < 1e-5 * a.2);
                    }
                }
            }
        }
    }

    #[test]
    fn activation_gradients_match_finite_differences() {
        for a in [Activation::Identity, Activation::Relu, Activation::Gelu] {
            for &z in &[-2.3f32, -0.7, 0.3, 1.9] {
                let h = 1e-3f32;
                let fd = (act(a, z + h) - act(a, z - h)) / (2.0 * h);
                assert!(
                    (fd - act_grad(a, z)).abs() < 1e-3,
                    "{a:?} at {z}: fd {fd} vs {}",
                    act_grad(a, z)
                );
            }
        }
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let h = ndarray::array![[0.3f32, -1.2, 0.8, 2.0], [1.0, 0.1, -0.4, 0.5]];
        let w = ndarray::array![[0.2f32, -0.5, 1.0, 0.3], [-1.0, 0.4, 0.1, 0.7]]; // loss = sum(w * u)
        let (u, rms) = rmsnorm(&h);
        let dh = rmsnorm_backward(&w, &u, &rms);
        let loss = |h: &Array2<f32>| (&rmsnorm(h).0 * &w).sum() as f64;
        for i in 0..2 {
            for j in 0..4 {
                let eps = 1e-3f32;
                let (mut p, mut m) = (h.clone(), h.clone());
                p[[i, j]] += eps;
                m[[i, j]] -= eps;
                let fd = (loss(&p) - loss(&m)) / (2.0 * eps as f64);
                assert!(
                    (fd - dh[[i, j]] as f64).abs() < 2e-3,
                    "({i},{j}): fd {fd} vs {}",
                    dh[[i, j]]
                );
            }
        }
    }

    /// The loss gradient at the first adapter's output, back-propagated by hand through
    /// every layer (RMSNorm, GELU, residuals, cross-entropy), against finite differences of
    /// the loss in the direction of a perturbation of B_0.
    #[test]
    fn adapter_gradient_through_a_deep_network_matches_finite_differences() {
        for loss in [Loss::Mse, Loss::Ce] {
            let cfg = TheoryConfig {
                width: 12,
                ranks: vec![3],
                layers: 3,
                rmsnorm: true,
                residual: true,
                activation: Activation::Gelu,
                loss,
                batch: 4,
                heldout: 2,
                steps: 1,
                ..Default::default()
            };
            let data = TrialData::draw(&cfg, crate::config::InputDist::Gaussian, 0, false);
            let prep = prepare(&cfg, &data);
            let (u, v) = frozen_pass(&cfg, &data, &prep, 0);
            let n = cfg.batch;
            let gamma = 0.7f32;
            let a0 = data.adapters[0].clone(); // 3 x 12
                                               // grad_B0 = gamma v_0^T (A u_0) over the training rows.
            let ax = u[0].slice(s![..n, ..]).dot(&a0.t());
            let grad_b = v[0].t().dot(&ax) * gamma;
            let dir = Array2::from_shape_fn((12, 3), |(i, j)| ((i * 3 + j) % 5) as f32 * 0.1 - 0.2);
            let loss_at = |eps: f32| {
                let layers: Vec<Layer> = (0..cfg.layers)
                    .map(|l| {
                        if l == 0 {
                            Layer::general(a0.clone(), &dir * eps)
                        } else {
                            Layer::general(Array2::zeros((3, 12)), Array2::zeros((12, 3)))
                        }
                    })
                    .collect();
                let net = Net {
                    cfg: &cfg,
                    data: &data,
                    prep: &prep,
                    gamma,
                    a_scale: 1.0,
                    flops: std::cell::Cell::new(0.0),
                };
                let (f, _) = net.forward(&layers, 0);
                net.loss(f.view(), 0, 0..n).0
            };
            let eps = 1e-2f32;
            let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
            let analytic: f64 = Zip::from(&grad_b)
                .and(&dir)
                .fold(0.0, |acc, &g, &d| acc + (g * d) as f64);
            assert!(
                (fd - analytic).abs() < 1e-3 * (1.0 + analytic.abs()),
                "{loss:?}: finite difference {fd} vs analytic {analytic}"
            );
        }
    }
}
