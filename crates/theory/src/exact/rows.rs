//! The exact law's rows of one trial: for every cell, site (fwd, fwd_heldout, bwd), layer,
//! step and moment order m <= 4 where the law applies, `E_A[mean |y|^m]` given the trial's
//! data, written as `law` rows beside the Monte Carlo's `abs` rows.
//!
//! Step 1 is exact. Later steps are first order in the learning rate ("linear response":
//! the loss gradients at the adapters and A keep their step-0 values, proofs/exact-law.md):
//! SGD's B after t steps is `-lr gamma sum_s c_s V_s^T U_s A^T` over the batches s < t
//! (`c_s = 1`; with momentum `c_s = (1 - mu^(t-s)) / (1 - mu)`), the first step's form with
//! the batches' directions added up; Adam with one reused batch takes t equal steps, t times
//! the first. Where no such form exists (Adam with fresh batches after step 1, the input
//! gradient under Adam, Adam with L2 weight decay, m > 4) there is no law row.
use super::pairs::Pairs;
use super::table::{AdamTable, RankTable, SgdTerm};
use crate::config::{Init, Reuse, TheoryConfig};
use crate::data::TrialData;
use crate::sim::{frozen_pass, CellSpec, Prepared};
use ndarray::{concatenate, s, Array2, Axis};
use rankstab_records::{MomentRow, Optimizer, Site, Stat};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The law's tables for the ranks of a run (built once per run; Adam's filled lazily).
#[derive(Debug)]
pub struct LawTables {
    /// SGD sums of the adapter's outputs (Gaussian linear forms of A's rows).
    fwd: RankTable,
    /// SGD sums of the input gradient (one entry of A: the init's own distribution).
    bwd: RankTable,
    adam: AdamTable,
}

/// The first optimizer step of one adapter, as the law needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstStep {
    /// The optimizer (SGD and momentum are the same at step 1; Adam and AdamW too, but for
    /// AdamW's decoupled decay, `decay`).
    pub optimizer: Optimizer,
    /// Index of the rank in the tables' ranks.
    pub rank_index: usize,
    /// The scaling factor gamma_r.
    pub gamma: f64,
    /// The learning rate.
    pub lr: f64,
    /// The standard deviation of A's entries.
    pub s: f64,
    /// Adam's eps.
    pub eps: f64,
    /// The factor A is multiplied by at step 1 (1 - lr wd under AdamW; 1 otherwise).
    pub decay: f64,
}

impl LawTables {
    /// The tables for `cfg`'s ranks and init, shared by every caller in the process that
    /// asks for the same ranks and init (the Adam table fills up as runs and tests use it;
    /// its values do not depend on who computed them).
    pub fn shared(cfg: &TheoryConfig) -> Arc<LawTables> {
        Self::shared_for(&cfg.ranks, cfg.init)
    }

    /// As [`Self::shared`], for `ranks` and `init` alone.
    pub fn shared_for(ranks: &[usize], init: Init) -> Arc<LawTables> {
        type Cache = Mutex<Vec<((Vec<usize>, bool), Arc<LawTables>)>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let key = (ranks.to_vec(), init == Init::KaimingUniform);
        let mut cache = CACHE
            .get_or_init(|| Mutex::new(Vec::new()))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = cache.iter().find(|(k, _)| *k == key) {
            return Arc::clone(t);
        }
        let t = Arc::new(LawTables::for_ranks(ranks, init));
        cache.push((key, Arc::clone(&t)));
        if cache.len() > 8 {
            cache.remove(0);
        }
        t
    }

    /// Tables for `cfg`'s ranks and init.
    pub fn new(cfg: &TheoryConfig) -> Self {
        Self::for_ranks(&cfg.ranks, cfg.init)
    }

    /// Tables for `ranks` and `init`.
    pub fn for_ranks(ranks: &[usize], init: Init) -> Self {
        let fwd = RankTable::new(ranks, SgdTerm::Gaussian);
        let bwd = match init {
            Init::KaimingUniform => RankTable::new(ranks, SgdTerm::UniformEntry),
            Init::Gaussian | Init::PeftGaussian => fwd.clone(),
        };
        LawTables {
            fwd,
            bwd,
            adam: AdamTable::new(ranks),
        }
    }

    /// `E_A[mean over pairs |y|^m]`, m = 1..=4, of an adapter's outputs after one step
    /// from B = 0, for the (entry, input) `pairs` of its data (proofs/exact-law.md).
    ///
    /// ```
    /// use rankstab_records::Optimizer;
    /// use rankstab_theory::exact::pairs::Pairs;
    /// use rankstab_theory::exact::rows::{FirstStep, LawTables};
    /// use rankstab_theory::Init;
    /// let t = LawTables::for_ranks(&[4], Init::Gaussian);
    /// // One entry and one input along the same direction (rho = 1), |w| = |x| = 1: the
    /// // SGD output is -lr gamma^2 s^2 chi^2_4, so E y^2 = (lr gamma^2 s^2)^2 * 4 * 6.
    /// let pairs = Pairs { a: vec![1.0], b: vec![1.0], rho: vec![1.0] };
    /// let step = FirstStep { optimizer: Optimizer::Sgd, rank_index: 0, gamma: 0.5, lr: 0.1, s: 1.0, eps: 1e-8, decay: 1.0 };
    /// let e = t.first_step_outputs(&pairs, &step);
    /// assert!((e[1] / (0.025f64.powi(2) * 24.0) - 1.0).abs() < 1e-6);
    /// ```
    pub fn first_step_outputs(&self, pairs: &Pairs, step: &FirstStep) -> [f64; 4] {
        let corrs = pairs.corrs();
        let rank = self.fwd.ranks()[step.rank_index];
        let (k, mean) = if step.optimizer.is_adaptive() {
            let lam_per_a = step.gamma * step.s / step.eps;
            (
                step.lr * step.gamma * step.s * step.decay,
                pairs.adam_mean(&corrs, &self.adam, step.rank_index, rank, lam_per_a),
            )
        } else {
            (
                step.lr * step.gamma * step.gamma * step.s * step.s,
                pairs.sgd_mean(&corrs, &self.fwd, step.rank_index, rank),
            )
        };
        let mut out = [0.0; 4];
        for (m, o) in out.iter_mut().enumerate() {
            *o = k.powi(m as i32 + 1) * mean[m];
        }
        out
    }
}

/// The moment orders the law covers.
fn orders(cfg: &TheoryConfig) -> Vec<u32> {
    cfg.moments
        .iter()
        .copied()
        .filter(|m| (1..=4).contains(m))
        .collect()
}

fn f64s(a: ndarray::ArrayView2<f32>) -> Array2<f64> {
    a.mapv(f64::from)
}

/// The frozen network's adapter inputs (all rows) and loss gradients (training rows) per
/// layer, for each batch index.
struct Frozen {
    n_train: usize,
    passes: Vec<(Vec<Array2<f32>>, Vec<Array2<f32>>)>,
}

impl Frozen {
    fn new(cfg: &TheoryConfig, data: &TrialData, prep: &Prepared) -> Self {
        let batches = if cfg.inputs.contains(&Reuse::Fresh) {
            cfg.steps + 1
        } else {
            1
        };
        Frozen {
            n_train: prep.n_train,
            passes: (0..batches)
                .map(|idx| frozen_pass(cfg, data, prep, idx))
                .collect(),
        }
    }

    /// Layer l's training inputs and output gradients of batch `idx`.
    fn train(&self, idx: usize, l: usize) -> (Array2<f64>, Array2<f64>) {
        let (u, v) = &self.passes[idx];
        (f64s(u[l].slice(s![..self.n_train, ..])), f64s(v[l].view()))
    }

    /// Layer l's held-out inputs (the same rows in every stack).
    fn heldout(&self, l: usize) -> Array2<f64> {
        f64s(self.passes[0].0[l].slice(s![self.n_train.., ..]))
    }

    /// The weighted training rows of the batches behind B_t: `(c_s U_s; ...)`, `(V_s; ...)`.
    fn factors(&self, l: usize, batches: &[(usize, f64)]) -> (Array2<f64>, Array2<f64>) {
        let (us, vs): (Vec<_>, Vec<_>) = batches
            .iter()
            .map(|&(idx, c)| {
                let (u, v) = self.train(idx, l);
                (u * c, v)
            })
            .unzip();
        let uv: Vec<_> = us.iter().map(|a| a.view()).collect();
        let vv: Vec<_> = vs.iter().map(|a| a.view()).collect();
        (
            concatenate(Axis(0), &uv).expect("same width"),
            concatenate(Axis(0), &vv).expect("same width"),
        )
    }
}

/// The pairs of the three sites for gradient directions `(u, v)`, outputs evaluated on
/// `x_fwd` and the held-out rows, input gradient for output gradients `v_now`.
fn site_pairs(
    u: &Array2<f64>,
    v: &Array2<f64>,
    x_fwd: &Array2<f64>,
    heldout: &Array2<f64>,
    v_now: Option<&Array2<f64>>,
) -> Vec<(Site, Pairs)> {
    let mut out = vec![
        (Site::Fwd, Pairs::forward(u.view(), v.view(), x_fwd.view())),
        (
            Site::FwdHeldout,
            Pairs::forward(u.view(), v.view(), heldout.view()),
        ),
    ];
    if let Some(vn) = v_now {
        out.push((Site::Bwd, Pairs::backward(u.view(), v.view(), vn.view())));
    }
    out
}

/// The law rows of one trial (see the module docs). The (regime, layer, optimizer) units
/// run in parallel; rows come out in a fixed order whatever the thread count.
pub(crate) fn law_rows(
    cfg: &TheoryConfig,
    data: &TrialData,
    prep: &Prepared,
    cells: &[CellSpec],
    tables: &LawTables,
    base: &MomentRow,
) -> Vec<MomentRow> {
    let ms = orders(cfg);
    if ms.is_empty() {
        return Vec::new();
    }
    let fz = Frozen::new(cfg, data, prep);
    let units: Vec<(Reuse, usize, Optimizer)> = cfg
        .inputs
        .iter()
        .flat_map(|&reuse| {
            (0..cfg.layers).flat_map(move |l| cfg.optimizers.iter().map(move |&o| (reuse, l, o)))
        })
        .collect();
    let per_unit: Vec<Vec<MomentRow>> = units
        .par_iter()
        .map(|&(reuse, l, opt)| {
            let rows = CellRows {
                cfg,
                cells,
                tables,
                base,
                ms: &ms,
                reuse,
                opt,
                layer: l,
            };
            let heldout = fz.heldout(l);
            match (opt.is_adaptive(), reuse) {
                (false, Reuse::Coherent) => rows.sgd_coherent(&fz, &heldout),
                (false, Reuse::Fresh) => rows.sgd_fresh(&fz, &heldout),
                (true, _) => rows.adam(&fz, &heldout),
            }
        })
        .collect();
    per_unit.into_iter().flatten().collect()
}

/// Rows of the cells of one (regime, optimizer, layer).
struct CellRows<'a> {
    cfg: &'a TheoryConfig,
    cells: &'a [CellSpec],
    tables: &'a LawTables,
    base: &'a MomentRow,
    ms: &'a [u32],
    reuse: Reuse,
    opt: Optimizer,
    layer: usize,
}

impl CellRows<'_> {
    fn mine(&self) -> impl Iterator<Item = (usize, &CellSpec)> + '_ {
        self.cells
            .iter()
            .filter(move |c| c.reuse == self.reuse && c.opt == self.opt)
            .map(move |c| {
                let ri = self
                    .cfg
                    .ranks
                    .iter()
                    .position(|&r| r == c.rank)
                    .expect("cells are built from the ranks");
                (ri, c)
            })
    }

    /// Momentum's weight of the gradient of step s in B_t (1 for plain SGD).
    fn coef(&self, t: usize, s: usize) -> f64 {
        match self.opt {
            Optimizer::SgdMomentum => {
                let mu = self.cfg.momentum;
                (1.0 - mu.powi((t - s) as i32)) / (1.0 - mu)
            }
            _ => 1.0,
        }
    }

    fn row(&self, c: &CellSpec, site: Site, step: usize, m: u32, value: f64) -> MomentRow {
        MomentRow {
            layer: self.layer as u32,
            rank: c.rank as u32,
            scaling: c.scaling,
            beta: c.scaling.beta(),
            optimizer: c.opt,
            inputs: c.reuse.to_string(),
            step: step as u32,
            site,
            stat: Stat::Law,
            m: Some(m),
            value,
            ..self.base.clone()
        }
    }

    /// SGD-family rows of `pairs` at `step`: `(lr gamma^2 s^2 scale)^m` times the pairs' mean.
    fn sgd_rows(&self, site: Site, pairs: &Pairs, steps: &[(usize, f64)]) -> Vec<MomentRow> {
        let table = if site == Site::Bwd {
            &self.tables.bwd
        } else {
            &self.tables.fwd
        };
        let corrs = pairs.corrs();
        let mut means: BTreeMap<usize, [f64; 4]> = BTreeMap::new();
        let mut out = Vec::new();
        for (ri, c) in self.mine() {
            let mean = *means
                .entry(ri)
                .or_insert_with(|| pairs.sgd_mean(&corrs, table, ri, c.rank));
            let gamma = c.scaling.factor(self.cfg.alpha, c.rank);
            let s2 = self.cfg.init.variance(self.cfg.width, c.rank);
            for &(step, scale) in steps {
                let k = self.cfg.lr(c.opt) * gamma * gamma * s2 * scale;
                for &m in self.ms {
                    out.push(self.row(c, site, step, m, k.powi(m as i32) * mean[m as usize - 1]));
                }
            }
        }
        out
    }

    /// One reused batch: B_t is (sum_s c_s) times B_1, so every step is the first scaled.
    fn sgd_coherent(&self, fz: &Frozen, heldout: &Array2<f64>) -> Vec<MomentRow> {
        let (u, v) = fz.train(0, self.layer);
        let steps: Vec<(usize, f64)> = (1..=self.cfg.steps)
            .map(|t| (t, (0..t).map(|s| self.coef(t, s)).sum()))
            .collect();
        site_pairs(&u, &v, &u, heldout, Some(&v))
            .into_iter()
            .flat_map(|(site, p)| self.sgd_rows(site, &p, &steps))
            .collect()
    }

    /// A fresh batch per step: B_t adds the directions of batches 0..t; the outputs are
    /// evaluated on batch t, the input gradient taken at batch t's output gradients.
    fn sgd_fresh(&self, fz: &Frozen, heldout: &Array2<f64>) -> Vec<MomentRow> {
        let mut out = Vec::new();
        for t in 1..=self.cfg.steps {
            let batches: Vec<(usize, f64)> = (0..t).map(|s| (s, self.coef(t, s))).collect();
            let (u, v) = fz.factors(self.layer, &batches);
            let (x_now, v_now) = fz.train(t, self.layer);
            for (site, p) in site_pairs(&u, &v, &x_now, heldout, Some(&v_now)) {
                out.extend(self.sgd_rows(site, &p, &[(t, 1.0)]));
            }
        }
        out
    }

    /// Adam: the first step; with one reused batch, t equal steps (t times the first). No law
    /// for the input gradient, for fresh batches after step 1, for Adam's L2 weight decay,
    /// or for AdamW's decay after step 1.
    fn adam(&self, fz: &Frozen, heldout: &Array2<f64>) -> Vec<MomentRow> {
        let wd = self.cfg.weight_decay;
        if self.opt == Optimizer::Adam && wd > 0.0 {
            return Vec::new();
        }
        let last = match self.reuse {
            Reuse::Coherent if wd == 0.0 => self.cfg.steps,
            _ => 1,
        };
        let decay = 1.0 - self.cfg.lr(self.opt) * wd;
        let (u, v) = fz.train(0, self.layer);
        let x_fwd = fz
            .train(if self.reuse == Reuse::Fresh { 1 } else { 0 }, self.layer)
            .0;
        let mut out = Vec::new();
        for (site, pairs) in site_pairs(&u, &v, &x_fwd, heldout, None) {
            let corrs = pairs.corrs();
            for (ri, c) in self.mine() {
                let gamma = c.scaling.factor(self.cfg.alpha, c.rank);
                let s = self.cfg.init.variance(self.cfg.width, c.rank).sqrt();
                let lam_per_a = gamma * s / self.cfg.adam_eps;
                let mean = pairs.adam_mean(&corrs, &self.tables.adam, ri, c.rank, lam_per_a);
                for t in 1..=last {
                    let k = self.cfg.lr(c.opt) * gamma * s * decay * t as f64;
                    for &m in self.ms {
                        out.push(self.row(c, site, t, m, k.powi(m as i32) * mean[m as usize - 1]));
                    }
                }
            }
        }
        out
    }
}
