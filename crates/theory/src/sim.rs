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
use crate::kernel::{self, matmul, matmul_into};
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
    /// `fresh`: m and v are known to be zero, as before the first update. Their buffers
    /// are then not read (the first update starts from zero without reading them, and
    /// nothing else reads them) and hold whatever the pool had: Adam's state is the
    /// largest memory traffic of a cell, and this saves zeroing it and reading it once.
    Adam {
        m: Array2<f32>,
        v: Array2<f32>,
        fresh: bool,
    },
}

impl OptState {
    /// The state before the first update. `known`: Adam's state may be left unzeroed
    /// (`fresh`); otherwise it is zeroed and read like any other (the shortcut-free path
    /// the tests compare with).
    fn new(opt: Optimizer, (r, c): (usize, usize), known: bool) -> Self {
        match opt {
            Optimizer::Sgd => OptState::Plain,
            Optimizer::SgdMomentum => OptState::Momentum(pool::zeros(r, c)),
            Optimizer::Adam | Optimizer::Adamw if known => OptState::Adam {
                m: pool::any(r, c),
                v: pool::any(r, c),
                fresh: true,
            },
            Optimizer::Adam | Optimizer::Adamw => OptState::Adam {
                m: pool::zeros(r, c),
                v: pool::zeros(r, c),
                fresh: false,
            },
        }
    }

    fn release(self) {
        match self {
            OptState::Plain => {}
            OptState::Momentum(b) => pool::give(b),
            OptState::Adam { m, v, .. } => {
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
    /// Adam's regime after the step: the share of the second-moment entries whose
    /// bias-corrected `sqrt(v_hat)` is below `10 eps` (eps dominates their step), counted
    /// as they are written. `None` without a step or for optimizers without second moments.
    eps_share: Option<f64>,
    /// Floating-point operations of the products computed.
    flops: f64,
}

/// The optimizer step a [`fused_pass`] takes.
struct Step<'a> {
    h: &'a Hyper,
    state: &'a mut OptState,
    /// The step's number, from 1.
    t: i32,
    /// Whether it is the cell's last update: nothing reads the optimizer state after it,
    /// so Adam's m and v are not written back (their share below eps is still counted).
    last: bool,
}

/// Adam's step over a block of entries (`p`, its moments `m` and `v`, its gradient `g`),
/// run by [`kernel::wide`] at the machine's vector width (Adam's update is the cell's
/// largest element-wise work). Returns how many new `v` entries are below `limit`.
struct AdamBlock<'a> {
    decoupled: bool,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    /// `lr / bc1`.
    step: f32,
    bc2_sqrt: f32,
    limit: f32,
    /// m and v are known to be zero: not read.
    fresh: bool,
    /// The last update: m and v are not written.
    last: bool,
    p: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    g: &'a [f32],
}

impl kernel::Wide for AdamBlock<'_> {
    type Out = u32;

    #[inline(always)]
    fn run(self) -> u32 {
        let AdamBlock {
            decoupled,
            lr,
            beta1,
            beta2,
            eps,
            wd,
            step,
            bc2_sqrt,
            limit,
            fresh,
            last,
            p,
            m,
            v,
            g,
        } = self;
        // One entry's step from its old value and moments (0.0 when fresh: `beta * 0.0`
        // is +0, as from a zeroed state, so the bits are the same); returns the new value
        // and moments. PyTorch's order of operations.
        let adam = |pj: f32, mj: f32, vj: f32, gj: f32| {
            let gj = if decoupled { gj } else { gj + wd * pj };
            let pj = if decoupled { pj * (1.0 - lr * wd) } else { pj };
            let mj = beta1 * mj + (1.0 - beta1) * gj;
            let vj = beta2 * vj + (1.0 - beta2) * gj * gj;
            (pj - step * mj / (vj.sqrt() / bc2_sqrt + eps), mj, vj)
        };
        // A local count in 32 bits, so that the compiler vectorises it with the floats.
        let mut small = 0u32;
        match (fresh, last) {
            (true, false) => {
                for (((pj, mj), vj), &gj) in p.iter_mut().zip(m).zip(v).zip(g) {
                    (*pj, *mj, *vj) = adam(*pj, 0.0, 0.0, gj);
                    small += (*vj < limit) as u32;
                }
            }
            (false, false) => {
                for (((pj, mj), vj), &gj) in p.iter_mut().zip(m).zip(v).zip(g) {
                    (*pj, *mj, *vj) = adam(*pj, *mj, *vj, gj);
                    small += (*vj < limit) as u32;
                }
            }
            (true, true) => {
                for (pj, &gj) in p.iter_mut().zip(g) {
                    let (p1, _, v1) = adam(*pj, 0.0, 0.0, gj);
                    *pj = p1;
                    small += (v1 < limit) as u32;
                }
            }
            (false, true) => {
                for (((pj, &mj), &vj), &gj) in p.iter_mut().zip(&*m).zip(&*v).zip(g) {
                    let (p1, _, v1) = adam(*pj, mj, vj, gj);
                    *pj = p1;
                    small += (v1 < limit) as u32;
                }
            }
        }
        small
    }
}

/// Adam's eps limit on v after step `t`: `sqrt(v / bc2) < 10 eps  <=>  v < 100 eps^2 bc2`.
fn eps_limit(h: &Hyper, t: i32) -> f32 {
    let bc2 = 1.0 - (h.beta2 as f64).powi(t);
    (100.0 * (h.eps as f64).powi(2) * bc2) as f32
}

/// One fused pass over an adapter matrix `p` (R x C): the backward product through it and,
/// optionally, its optimizer step.
///
/// * returns `back = coef p` (N x C) with the old `p` (the gradient flowing through it);
/// * if `step` is given, updates `p` with the gradient `coef^T q` (q: N x C) by its state.
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
    step: Option<Step<'_>>,
) -> Pass {
    /// Rows of `p` per block: a block and its gradient stay in L2 between the two products
    /// and the update.
    const BLOCK: usize = 32;
    let (rows, cols) = p.dim();
    let n = coef.nrows();
    let mut back = Array2::<f32>::zeros((n, cols));
    let (h, mut state, t, last) = match step {
        Some(Step { h, state, t, last }) => (Some(h), Some(state), t, last),
        None => (None, None, 0, false),
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
    // Adam's v entries below the eps limit after the step.
    let mut small = 0usize;
    let limit = h.map_or(0.0, |h| eps_limit(h, t));
    let eps_share = |small: usize, state: Option<&OptState>| match state {
        Some(OptState::Adam { v, .. }) => Some(small as f64 / v.len().max(1) as f64),
        _ => None,
    };
    if skip_update {
        // The state is unchanged: count its v as it stands (zero when fresh).
        if let Some(OptState::Adam { v, fresh, .. }) = state.as_deref() {
            small = if *fresh {
                if 0.0 < limit {
                    v.len()
                } else {
                    0
                }
            } else {
                v.iter().filter(|&&x| x < limit).count()
            };
        }
        if back_zero {
            return Pass {
                back,
                updated: false,
                eps_share: eps_share(small, state.as_deref()),
                flops,
            };
        }
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
            OptState::Adam { m, v, fresh } => {
                // Whole rows of standard-layout matrices: contiguous.
                let contiguous = "the cell's matrices are in standard layout";
                small += kernel::wide(AdamBlock {
                    decoupled: h.opt == Optimizer::Adamw,
                    lr: h.lr,
                    beta1: h.beta1,
                    beta2: h.beta2,
                    eps: h.eps,
                    wd: h.wd,
                    step: adam_step,
                    bc2_sqrt,
                    limit,
                    fresh: *fresh,
                    last,
                    p: pblk.into_slice().expect(contiguous),
                    m: m.slice_mut(s![i0..i1, ..]).into_slice().expect(contiguous),
                    v: v.slice_mut(s![i0..i1, ..]).into_slice().expect(contiguous),
                    g: g.as_slice().expect(contiguous),
                }) as usize;
            }
        }
    }
    if !skip_update {
        if let Some(OptState::Adam { fresh, .. }) = state.as_deref_mut() {
            // After the last update m and v were not written: nothing reads them again.
            *fresh = false;
        }
    }
    Pass {
        back,
        updated: !skip_update,
        eps_share: eps_share(small, state.as_deref()),
        flops,
    }
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
        let mut buf = take(len);
        buf.clear();
        buf.resize(len, 0.0);
        Array2::from_shape_vec((rows, cols), buf).expect("length matches shape")
    }

    /// A rows x cols matrix whose entries are whatever the pool's buffer held (initialised
    /// values, zero where it grew): for a caller that writes every entry before it reads
    /// any, without the cost of zeroing it first.
    pub fn any(rows: usize, cols: usize) -> Array2<f32> {
        let len = rows * cols;
        let mut buf = take(len);
        buf.resize(len, 0.0);
        Array2::from_shape_vec((rows, cols), buf).expect("length matches shape")
    }

    /// The pool's smallest buffer of at least `len` entries, or an empty one.
    fn take(len: usize) -> Vec<f32> {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let best = p
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| p.swap_remove(i)).unwrap_or_default()
        })
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
            // The random factor is written whole, so its buffer needs no zeroing.
            let (a, b) = match how.adapter_init {
                // A random (the first r rows of the largest rank's draw), B zero.
                AdapterInit::A => {
                    let mut a = pool::any(r, d);
                    Zip::from(&mut a)
                        .and(&a_max.slice(s![..r, ..]))
                        .for_each(|x, &y| *x = y * std_scale);
                    (a, pool::zeros(d, r))
                }
                // B random with A's distribution (the same draw, transposed), A zero.
                AdapterInit::B => {
                    let mut b = pool::any(d, r);
                    Zip::from(&mut b)
                        .and(&a_max.slice(s![..r, ..]).t())
                        .for_each(|x, &y| *x = y * std_scale);
                    (pool::zeros(r, d), b)
                }
            };
            Layer {
                a,
                b,
                sa: OptState::new(cell.opt, (r, d), known),
                sb: OptState::new(cell.opt, (d, r), known),
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
                step.map(|t| Step {
                    h: &hyper_b,
                    state: &mut layer.sb,
                    t,
                    last: t as usize == cfg.steps,
                }),
            );
            layer.b_zero &= !pass_b.updated;
            let mut bv = pass_b.back;
            bv.mapv_inplace(|x| x * gamma); // gamma v B
            let pass_a = fused_pass(
                &mut layer.a,
                false,
                bv.view(),
                u,
                step.map(|t| Step {
                    h: &hyper,
                    state: &mut layer.sa,
                    t,
                    last: t as usize == cfg.steps,
                }),
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
                for (stat, share) in [
                    (Stat::EpsShareA, pass_a.eps_share),
                    (Stat::EpsShareB, pass_b.eps_share),
                ] {
                    if let Some(share) = share {
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

    /// Adam's block update against PyTorch's formulas written out in f64 here (within f32
    /// rounding), and bit for bit between its variants and widths: run directly (baseline
    /// SSE2) and through `kernel::wide` (AVX-512 or AVX2 where the CPU has them); `fresh`
    /// on garbage moments as from zeroed ones; `last` the same step and count without
    /// writing m and v. The count is the number of new v entries below the limit.
    #[test]
    fn adam_blocks_are_pytorch_adam_at_every_width() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // 203 entries: several vectors of every width and a remainder.
        let len = 203;
        let mut draw = |scale: f32| -> Vec<f32> {
            (0..len)
                .map(|_| scale * (rng.random::<f32>() - 0.5))
                .collect()
        };
        let (p0, m0) = (draw(2.0), draw(1e-3));
        // Gradients and second moments from tiny to large, so that some of the new second
        // moments fall below the limit and eps matters.
        let g: Vec<f32> = draw(1e-2)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 10f32.powi(-((i % 13) as i32)))
            .collect();
        let v0: Vec<f32> = draw(1.0)
            .iter()
            .enumerate()
            .map(|(i, x)| x * x * 10f32.powi(-((i % 20) as i32)))
            .collect();
        let garbage = draw(1e6);
        // Adam, Adam with L2 weight decay, AdamW.
        for (decoupled, wd) in [(false, 0.0f32), (false, 0.05), (true, 0.05)] {
            let (lr, beta1, beta2, eps, t) = (1e-3f32, 0.9f32, 0.999f32, 1e-8f32, 3);
            let bc1 = 1.0 - (beta1 as f64).powi(t);
            let bc2 = 1.0 - (beta2 as f64).powi(t);
            let limit = (100.0 * (eps as f64).powi(2) * bc2) as f32;
            let block = |fresh, last, p: &mut [f32], m: &mut [f32], v: &mut [f32], wide: bool| {
                let b = AdamBlock {
                    decoupled,
                    lr,
                    beta1,
                    beta2,
                    eps,
                    wd,
                    step: (lr as f64 / bc1) as f32,
                    bc2_sqrt: bc2.sqrt() as f32,
                    limit,
                    fresh,
                    last,
                    p,
                    m,
                    v,
                    g: &g,
                };
                if wide {
                    kernel::wide(b)
                } else {
                    kernel::Wide::run(b)
                }
            };
            for (fresh, m_in, v_in) in [(false, &m0, &v0), (true, &garbage, &garbage)] {
                // The reference: torch.optim.Adam / AdamW's step from (m0, v0), or from zero.
                // Each value with the size of its terms (f32 rounding is relative to them).
                let (mut want_p, mut want_m, mut want_v) = (
                    vec![(0.0, 0.0); len],
                    vec![(0.0, 0.0); len],
                    vec![(0.0, 0.0); len],
                );
                let mut want_small = 0;
                for i in 0..len {
                    let (mut p, gi) = (p0[i] as f64, g[i] as f64);
                    let (mi, vi) = if fresh {
                        (0.0, 0.0)
                    } else {
                        (m0[i] as f64, v0[i] as f64)
                    };
                    let gi = if decoupled { gi } else { gi + wd as f64 * p };
                    if decoupled {
                        p *= 1.0 - lr as f64 * wd as f64;
                    }
                    let m_terms = (beta1 as f64 * mi).abs() + ((1.0 - beta1 as f64) * gi).abs();
                    let mi = beta1 as f64 * mi + (1.0 - beta1 as f64) * gi;
                    let vi = beta2 as f64 * vi + (1.0 - beta2 as f64) * gi * gi;
                    let step = lr as f64 / bc1 * mi / ((vi / bc2).sqrt() + eps as f64);
                    want_p[i] = (p - step, p.abs() + step.abs());
                    (want_m[i], want_v[i]) = ((mi, m_terms), (vi, vi));
                    want_small += ((vi as f32) < limit) as u32;
                }
                let mut first: Option<(Vec<f32>, Vec<f32>, Vec<f32>, u32)> = None;
                for wide in [false, true] {
                    let (mut p, mut m, mut v) = (p0.clone(), m_in.clone(), v_in.clone());
                    let small = block(fresh, false, &mut p, &mut m, &mut v, wide);
                    let close = |a: &[f32], b: &[(f64, f64)], what: &str| {
                        for (x, (y, size)) in a.iter().zip(b) {
                            let err = (*x as f64 - y).abs();
                            assert!(
                                err <= 1e-6 * size,
                                "{what}: {x} vs {y} (decoupled {decoupled}, fresh {fresh})"
                            );
                        }
                    };
                    close(&p, &want_p, "p");
                    close(&m, &want_m, "m");
                    close(&v, &want_v, "v");
                    // (L2 decay adds wd p to every gradient: no second moment stays small.)
                    if decoupled || wd == 0.0 {
                        assert!(
                            want_small > 0 && (want_small as usize) < len,
                            "the limit splits the entries"
                        );
                    }
                    assert_eq!(small, v.iter().filter(|&&x| x < limit).count() as u32);
                    assert!(small.abs_diff(want_small) <= 2, "{small} vs {want_small}");
                    // The last update: the same p and count, m and v left as they were.
                    let (mut p2, mut m2, mut v2) = (p0.clone(), m_in.clone(), v_in.clone());
                    let small2 = block(fresh, true, &mut p2, &mut m2, &mut v2, wide);
                    assert_eq!((&p2, small2), (&p, small));
                    assert_eq!((&m2, &v2), (m_in, v_in));
                    let got = (p, m, v, small);
                    match &first {
                        // The same bits at both widths.
                        Some(f) => assert_eq!(f, &got, "wide and baseline differ"),
                        None => first = Some(got),
                    }
                }
            }
            // Fresh (moments not read) gives the bits of a zeroed state.
            let run = |fresh: bool, m: &[f32], v: &[f32]| {
                let (mut p, mut m, mut v) = (p0.clone(), m.to_vec(), v.to_vec());
                let small = block(fresh, false, &mut p, &mut m, &mut v, true);
                (p, m, v, small)
            };
            let zeros = vec![0.0f32; len];
            assert_eq!(run(true, &garbage, &garbage), run(false, &zeros, &zeros));
            assert_ne!(run(false, &garbage, &garbage), run(false, &zeros, &zeros));
        }
    }

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
