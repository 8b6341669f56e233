//! `rankstab transfer`: does the learning rate transfer across ranks (and widths)?
//!
//! For each setting (optimizer, scaling, adapter init, lr ratio `lr_B / lr_A`) and rank, a
//! log-spaced grid of learning rates is trained for many steps on the checker's synthetic
//! networks, with several seeds. The final held-out loss locates the optimal learning rate
//! per rank ([`analyse`]: a parabola in `ln lr` around the grid minimum, intervals by a
//! bootstrap over seeds), its exponent `c` in `lr*(r) ~ r^c` is set against the one-step
//! law of [`law`] (proofs/lr-transfer.md) and the published claims, and the learned
//! updates' singular values say how many directions each rank actually uses.
//!
//! Run directory: `manifest.json`, `transfer_runs.csv` (one row per seed, width, setting,
//! rank and lr: final losses, diverged or not), `transfer_steps.csv` (the same runs at
//! log-spaced steps: held-out loss, the forward moment, the update's spectrum),
//! `transfer.json` ([`analyse::TransferSummary`]). Resumes per seed, as `theory` does per
//! trial.
//!
//! ```no_run
//! use rankstab_theory::transfer::{run, TransferConfig};
//! use rankstab_theory::{NoProgress, RunOptions};
//! let cfg = TransferConfig { ranks: vec![2, 8, 32], seeds: 3, ..Default::default() };
//! let out = run(&cfg, std::path::Path::new("runs/transfer"), &RunOptions::default(), &NoProgress).unwrap();
//! for e in &out.summary.unwrap().exponents { println!("{} c = {:?} (predicted {:.2}): {}", e.optimizer, e.slope, e.predicted, e.outcome); }
//! ```
pub mod analyse;
pub mod law;

use crate::config::{AdapterInit, Init, Reuse, TheoryConfig};
use crate::data::TrialData;
use crate::sim::{frozen_pass, prepare, run_cell_with, CellRun, CellSpec};
use crate::{NoProgress, Progress, RunOptions, TheoryError};
use rankstab_records::{
    files, read_json, read_table, write_json_atomic, Optimizer, RunStatus, Scaling, Site, Stat,
    TableWriter,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// One row per seed and run file names.
pub const RUNS: &str = "transfer_runs.csv";
/// The runs at log-spaced steps.
pub const STEPS: &str = "transfer_steps.csv";
/// The analysis.
pub const SUMMARY: &str = "transfer.json";
const PROGRESS: &str = "progress.json";

/// A log-spaced grid of learning rates, `LO:HI:N` (N values from LO to HI inclusive).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrGrid {
    /// Smallest learning rate.
    pub lo: f64,
    /// Largest learning rate.
    pub hi: f64,
    /// Number of values.
    pub n: usize,
}

impl LrGrid {
    /// The learning rates, smallest first.
    ///
    /// ```
    /// let g: rankstab_theory::transfer::LrGrid = "1e-3:1e3:7".parse().unwrap();
    /// let v = g.values();
    /// assert_eq!(v.len(), 7);
    /// assert!((v[0] - 1e-3).abs() < 1e-15 && (v[3] - 1.0).abs() < 1e-12 && (v[6] - 1e3).abs() < 1e-9);
    /// ```
    pub fn values(&self) -> Vec<f64> {
        let (a, b) = (self.lo.ln(), self.hi.ln());
        (0..self.n)
            .map(|i| (a + (b - a) * i as f64 / (self.n - 1) as f64).exp())
            .collect()
    }

    /// The spacing of the grid in `ln lr`.
    pub fn log_step(&self) -> f64 {
        (self.hi / self.lo).ln() / (self.n - 1) as f64
    }
}

impl fmt::Display for LrGrid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:e}:{:e}:{}", self.lo, self.hi, self.n)
    }
}

impl FromStr for LrGrid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "learning-rate grid '{s}' is not allowed: use LO:HI:N with 0 < LO < HI and \
                 3 <= N <= {MAX_LRS}, e.g. 1e-3:1e3:25"
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let [lo, hi, n] = parts.as_slice() else {
            return Err(bad());
        };
        let lo: f64 = lo.trim().parse().map_err(|_| bad())?;
        let hi: f64 = hi.trim().parse().map_err(|_| bad())?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > lo && (3..=MAX_LRS).contains(&n))
        {
            return Err(bad());
        }
        Ok(LrGrid { lo, hi, n })
    }
}

rankstab_records::serde_via_str!(LrGrid);

/// Most learning rates in a grid.
pub const MAX_LRS: usize = 200;

/// The configuration of a transfer study. Also the TOML file format: any subset of the
/// fields, nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Optimizers.
    pub optimizers: Vec<Optimizer>,
    /// Scalings (`lora`, `rslora`, `beta=X`).
    pub scalings: Vec<Scaling>,
    /// Which factor starts random: `a` (PEFT) and/or `b`.
    pub adapter_inits: Vec<AdapterInit>,
    /// Ratios `lr_B / lr_A` (1 = LoRA, > 1 = LoRA+). The grid's learning rate is A's.
    pub lr_ratios: Vec<f64>,
    /// Ranks of the rank study (at `width`).
    pub ranks: Vec<usize>,
    /// Width of the rank study.
    pub width: usize,
    /// Widths of the width study (at `width_rank`); empty: no width study.
    pub widths: Vec<usize>,
    /// Rank of the width study.
    pub width_rank: usize,
    /// Training batch size N.
    pub batch: usize,
    /// Held-out batch size (the loss that locates lr*).
    pub heldout: usize,
    /// Input regime: `fresh` (a new batch every step) or `coherent` (one batch reused).
    pub inputs: Reuse,
    /// Input distribution (as `theory --dist`).
    pub dist: String,
    /// Distribution of the random factor (the checker's inits).
    pub init: Init,
    /// Scaling numerator alpha.
    pub alpha: f64,
    /// One grid for every optimizer (overrides `lrs_sgd` and `lrs_adam`).
    pub lrs: Option<LrGrid>,
    /// Grid for the SGD family.
    pub lrs_sgd: LrGrid,
    /// Grid for the Adam family.
    pub lrs_adam: LrGrid,
    /// Optimisation steps per run.
    pub steps: usize,
    /// Seeds (independent trials: network, teacher, data, init).
    pub seeds: usize,
    /// Base seed.
    pub seed: u64,
    /// Momentum of sgd-momentum.
    pub momentum: f64,
    /// Adam beta1.
    pub adam_beta1: f64,
    /// Adam beta2.
    pub adam_beta2: f64,
    /// Adam epsilon.
    pub adam_eps: f64,
    /// A run is stopped and marked diverged once its training loss exceeds this multiple
    /// of its initial value (or is not finite).
    pub divergence: f64,
    /// Bootstrap resamples of the seeds.
    pub bootstrap: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            optimizers: vec![Optimizer::Sgd, Optimizer::Adam],
            scalings: vec![Scaling::LORA, Scaling::RSLORA],
            adapter_inits: vec![AdapterInit::A],
            lr_ratios: vec![1.0],
            ranks: vec![2, 4, 8, 16, 32, 64],
            width: 128,
            widths: vec![64, 128, 256],
            width_rank: 8,
            batch: 16,
            heldout: 64,
            inputs: Reuse::Fresh,
            dist: "gaussian".into(),
            init: Init::KaimingUniform,
            alpha: 1.0,
            lrs: None,
            lrs_sgd: LrGrid {
                lo: 1e-4,
                hi: 1e2,
                n: 25,
            },
            lrs_adam: LrGrid {
                lo: 1e-4,
                hi: 1e2,
                n: 25,
            },
            steps: 200,
            seeds: 6,
            seed: 0,
            momentum: 0.9,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            divergence: 1e3,
            bootstrap: 1000,
        }
    }
}

/// The study a run belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Study {
    /// Ranks at the main width.
    #[default]
    Rank,
    /// Widths at `width_rank`.
    Width,
}

impl fmt::Display for Study {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Study::Rank => "rank",
            Study::Width => "width",
        })
    }
}

impl FromStr for Study {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rank" => Ok(Study::Rank),
            "width" => Ok(Study::Width),
            _ => Err(format!("unknown study '{s}' (allowed: rank, width)")),
        }
    }
}

rankstab_records::serde_via_str!(Study);

/// One training run: a seed, a setting, a rank and width, a learning rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RunRow {
    /// Trial index (0-based).
    pub trial: u32,
    /// Its seed.
    pub seed: u64,
    /// `rank` or `width` study.
    pub study: Study,
    /// Width d.
    pub width: u32,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling exponent beta.
    pub beta: f64,
    /// Which factor started random.
    pub init: AdapterInit,
    /// lr_B / lr_A.
    pub lr_ratio: f64,
    /// Rank.
    pub rank: u32,
    /// Learning rate of A (B's is `lr * lr_ratio`).
    pub lr: f64,
    /// Held-out loss at step 0.
    pub initial_loss: f64,
    /// Held-out loss after the last step (infinite when diverged).
    pub final_loss: f64,
    /// Training loss at the last step run.
    pub final_train_loss: f64,
    /// Whether the run was stopped as diverging.
    pub diverged: bool,
    /// Steps run.
    pub steps_run: u32,
}

/// One run at one of the log-spaced measured steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StepRow {
    /// Trial index.
    pub trial: u32,
    /// `rank` or `width` study.
    pub study: Study,
    /// Width d.
    pub width: u32,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Scaling exponent beta.
    pub beta: f64,
    /// Which factor started random.
    pub init: AdapterInit,
    /// lr_B / lr_A.
    pub lr_ratio: f64,
    /// Rank.
    pub rank: u32,
    /// Learning rate of A.
    pub lr: f64,
    /// Step (parameters after this many updates).
    pub step: u32,
    /// Held-out loss.
    pub heldout_loss: f64,
    /// Second absolute moment of the adapter's output `gamma B A u` on the training rows.
    pub fwd_m2: f64,
    /// Frobenius norm of `gamma B A`.
    pub update_norm: f64,
    /// Stable rank of `gamma B A`.
    pub stable_rank: f64,
    /// Effective rank of `gamma B A`.
    pub effective_rank: f64,
    /// Share of its spectral mass in the top 8 directions.
    pub top_share: f64,
}

/// A setting: everything but rank, width and lr.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    /// Optimizer.
    pub opt: Optimizer,
    /// Scaling.
    pub scaling: Scaling,
    /// Which factor starts random.
    pub adapter_init: AdapterInit,
    /// lr_B / lr_A.
    pub lr_ratio: f64,
}

impl TransferConfig {
    /// Parses a TOML document; unknown keys are errors naming the line.
    ///
    /// # Errors
    /// [`TheoryError::Config`].
    ///
    /// ```
    /// let c = rankstab_theory::transfer::TransferConfig::from_toml("ranks = [2, 4]\nlrs = \"1e-2:1e2:9\"").unwrap();
    /// assert_eq!(c.lrs.unwrap().n, 9);
    /// assert!(rankstab_theory::transfer::TransferConfig::from_toml("rank = [2]").is_err());
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, TheoryError> {
        crate::config::toml_from_str(text)
    }

    /// The grid of an optimizer.
    pub fn grid(&self, opt: Optimizer) -> LrGrid {
        self.lrs.unwrap_or(if opt.is_adaptive() {
            self.lrs_adam
        } else {
            self.lrs_sgd
        })
    }

    /// The settings, in canonical order.
    pub fn settings(&self) -> Vec<Setting> {
        let mut out = Vec::new();
        for &opt in &self.optimizers {
            for &scaling in &self.scalings {
                for &adapter_init in &self.adapter_inits {
                    for &lr_ratio in &self.lr_ratios {
                        out.push(Setting {
                            opt,
                            scaling,
                            adapter_init,
                            lr_ratio,
                        });
                    }
                }
            }
        }
        out
    }

    /// The widths run, the main width first.
    pub fn all_widths(&self) -> Vec<usize> {
        let mut w = vec![self.width];
        for &x in &self.widths {
            if !w.contains(&x) {
                w.push(x);
            }
        }
        w
    }

    /// The (study, rank) pairs run at width `d`.
    pub fn ranks_at(&self, d: usize) -> Vec<(Study, usize)> {
        let mut out = Vec::new();
        if d == self.width {
            out.extend(self.ranks.iter().map(|&r| (Study::Rank, r)));
        }
        if self.widths.contains(&d) {
            out.push((Study::Width, self.width_rank));
        }
        out
    }

    /// The steps measured in `transfer_steps.csv`: 0, 1, 2, 4, 8, ... and the last.
    pub fn measured_steps(&self) -> Vec<u32> {
        let mut s = vec![0u32];
        let mut t = 1usize;
        while t < self.steps {
            s.push(t as u32);
            t *= 2;
        }
        s.push(self.steps as u32);
        s
    }

    /// The checker's configuration for width `d` (the network every run trains).
    pub fn checker(&self, d: usize) -> TheoryConfig {
        let mut ranks: Vec<usize> = self.ranks_at(d).into_iter().map(|(_, r)| r).collect();
        ranks.sort_unstable();
        ranks.dedup();
        TheoryConfig {
            ranks,
            width: d,
            layers: 1,
            init: self.init,
            alpha: self.alpha,
            scalings: self.scalings.clone(),
            optimizers: self.optimizers.clone(),
            momentum: self.momentum,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_eps: self.adam_eps,
            inputs: vec![self.inputs],
            dist: self.dist.clone(),
            batch: self.batch,
            heldout: self.heldout,
            steps: self.steps,
            trials: self.seeds,
            seed: self.seed,
            moments: vec![2],
            ..TheoryConfig::default()
        }
    }

    /// Checks every field; the error names the field, the value and what is allowed.
    ///
    /// # Errors
    /// [`TheoryError::Invalid`].
    pub fn validate(&self) -> Result<(), TheoryError> {
        let bad = |m: String| Err(TheoryError::Invalid(m));
        if self.optimizers.is_empty() || self.scalings.is_empty() || self.adapter_inits.is_empty() {
            return bad(
                "optimizers, scalings and adapter_inits must each name at least one value".into(),
            );
        }
        if self.lr_ratios.is_empty() {
            return bad("lr_ratios is empty: use 1 for plain LoRA, e.g. --lr-ratio 1,16".into());
        }
        for &x in &self.lr_ratios {
            if !(x.is_finite() && x > 0.0) {
                return bad(format!(
                    "lr ratio {x} is not allowed: use a finite number > 0"
                ));
            }
        }
        if self.ranks.len() < 3 {
            return bad(format!(
                "ranks {:?}: the rank exponent of lr* needs at least three ranks, e.g. --ranks 2,8,32",
                self.ranks
            ));
        }
        if !self.widths.is_empty() && self.widths.len() < 3 {
            return bad(format!(
                "widths {:?}: the width exponent needs at least three widths (or none: --widths '')",
                self.widths
            ));
        }
        for (name, v, lo, hi) in [
            ("seeds", self.seeds, 2, crate::config::MAX_TRIALS),
            ("steps", self.steps, 1, crate::config::MAX_STEPS),
            ("batch", self.batch, 1, crate::config::MAX_ROWS),
            ("heldout", self.heldout, 1, crate::config::MAX_ROWS),
            ("bootstrap", self.bootstrap, 100, 100_000),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(format!("{name} = {v} is not allowed: use {lo}..={hi}"));
            }
        }
        if !(self.divergence.is_finite() && self.divergence > 1.0) {
            return bad(format!(
                "divergence = {} is not allowed: use a finite multiple of the initial loss > 1",
                self.divergence
            ));
        }
        if !self.widths.is_empty() && self.width_rank == 0 {
            return bad("width_rank = 0 is not allowed: ranks are >= 1".into());
        }
        for d in self.all_widths() {
            let mut c = self.checker(d);
            if c.ranks.is_empty() {
                c.ranks = vec![1];
            }
            c.validate()
                .map_err(|e| TheoryError::Invalid(format!("width {d}: {e}")))?;
        }
        for &opt in &self.optimizers {
            // The grid's own parse checks LO, HI, N; a config may build one directly.
            let g = self.grid(opt);
            g.to_string()
                .parse::<LrGrid>()
                .map_err(TheoryError::Invalid)?;
        }
        Ok(())
    }

    /// Number of training runs per seed.
    pub fn runs_per_seed(&self) -> usize {
        let settings = self.settings();
        self.all_widths()
            .iter()
            .map(|&d| self.ranks_at(d).len())
            .sum::<usize>()
            * settings.iter().map(|s| self.grid(s.opt).n).sum::<usize>()
    }
}

/// What a transfer run produced.
#[derive(Debug, Clone)]
pub struct TransferOutcome {
    /// Run directory.
    pub dir: PathBuf,
    /// Seeds run by this call.
    pub seeds_run: usize,
    /// Whether every seed is done.
    pub complete: bool,
    /// The analysis (when complete).
    pub summary: Option<analyse::TransferSummary>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ProgressFile {
    done: Vec<usize>,
    runs_len: u64,
    steps_len: u64,
    /// Data terms per (width, trial) for the predictions.
    terms: Vec<(usize, usize, law::DataTerms)>,
}

/// Runs (or resumes) a transfer study into `out`.
///
/// # Errors
/// Invalid configuration (nothing is written), an `out` that holds something else, I/O.
pub fn run(
    cfg: &TransferConfig,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<TransferOutcome, TheoryError> {
    cfg.validate()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| {
            TheoryError::Invalid(format!("cannot start {:?} threads: {e}", opts.threads))
        })?;
    let threads = pool.current_num_threads();
    let widest = cfg.all_widths().into_iter().max().unwrap_or(cfg.width);
    let estimate = crate::memory_estimate(&cfg.checker(widest), threads);
    rankstab_records::guard::check_memory(
        &format!("this transfer study (width up to {widest}, {threads} threads)"),
        estimate.min(u64::MAX as f64) as u64,
        opts.max_memory,
    )
    .map_err(TheoryError::Invalid)?;
    crate::run::in_run_dir(out, || {
        pool.install(|| run_locked(cfg, out, opts, progress, threads))
    })
}

fn run_locked(
    cfg: &TransferConfig,
    out: &Path,
    opts: &RunOptions,
    progress: &dyn Progress,
    threads: usize,
) -> Result<TransferOutcome, TheoryError> {
    let manifest_path = out.join(files::MANIFEST);
    let mut manifest = crate::run::open_manifest(
        out,
        "transfer",
        serde_json::to_value(cfg).expect("the config serialises"),
        |v| serde_json::from_value::<TransferConfig>(v.clone()).is_ok_and(|c| c == *cfg),
        (0..cfg.seeds)
            .map(|t| crate::data::trial_seed(cfg.seed, t))
            .collect(),
        threads,
        opts,
    )?;
    let progress_path = out.join(PROGRESS);
    let mut state: ProgressFile = if progress_path.exists() {
        read_json(&progress_path)?
    } else {
        ProgressFile::default()
    };
    let mut runs = TableWriter::<RunRow>::open(&out.join(RUNS))?;
    let mut steps = TableWriter::<StepRow>::open(&out.join(STEPS))?;
    if state.done.is_empty() {
        runs.clear()?;
        steps.clear()?;
    } else {
        runs.truncate(state.runs_len)?;
        steps.truncate(state.steps_len)?;
    }
    let todo: Vec<usize> = (0..cfg.seeds)
        .filter(|t| !state.done.contains(t))
        .take(opts.max_trials_this_run.unwrap_or(usize::MAX))
        .collect();
    progress.start((todo.len() * cfg.runs_per_seed()) as u64);
    let mut seeds_run = 0;
    for &trial in &todo {
        progress.message(&format!("seed {}/{}", trial + 1, cfg.seeds));
        let (r, s, terms) = seed_rows(cfg, trial, progress)?;
        runs.append(&r)?;
        steps.append(&s)?;
        state.terms.extend(terms);
        state.done.push(trial);
        state.runs_len = runs.len()?;
        state.steps_len = steps.len()?;
        write_json_atomic(&progress_path, &state)?;
        seeds_run += 1;
    }
    let complete = state.done.len() == cfg.seeds;
    let summary = if complete {
        progress.message("analysing");
        let run_rows: Vec<RunRow> = read_table(&out.join(RUNS))?;
        let step_rows: Vec<StepRow> = read_table(&out.join(STEPS))?;
        let summary = analyse::analyse(cfg, &run_rows, &step_rows, &state.terms);
        write_json_atomic(&out.join(SUMMARY), &summary)?;
        if manifest.status != RunStatus::Complete {
            manifest.status = RunStatus::Complete;
            manifest.finished = Some(crate::run::now());
            manifest.tables = rankstab_records::table_sizes(out)?;
            write_json_atomic(&manifest_path, &manifest)?;
        }
        Some(summary)
    } else {
        None
    };
    Ok(TransferOutcome {
        dir: out.to_path_buf(),
        seeds_run,
        complete,
        summary,
    })
}

type SeedRows = (
    Vec<RunRow>,
    Vec<StepRow>,
    Vec<(usize, usize, law::DataTerms)>,
);

/// Every run of one seed, at every width.
///
/// # Errors
/// An invalid input distribution.
pub fn seed_rows(
    cfg: &TransferConfig,
    trial: usize,
    progress: &dyn Progress,
) -> Result<SeedRows, TheoryError> {
    let measured = cfg.measured_steps();
    let mut run_rows = Vec::new();
    let mut step_rows = Vec::new();
    let mut terms = Vec::new();
    for d in cfg.all_widths() {
        let tc = cfg.checker(d);
        let dist = tc.input_dist()?;
        let data = TrialData::draw(&tc, dist, trial, cfg.inputs == Reuse::Fresh);
        let prep = prepare(&tc, &data);
        let (u, v) = frozen_pass(&tc, &data, &prep, 0);
        let n = tc.batch;
        let delta = &data.teacher - &data.weights[0];
        terms.push((
            d,
            trial,
            law::DataTerms::of(u[0].slice(ndarray::s![..n, ..]), v[0].view())
                .with_target(delta.view()),
        ));
        // One training run per rank, setting and lr, whichever studies it serves (at the
        // main width the width study's rank may also be one of the rank study's).
        let mut by_rank: Vec<(usize, Vec<Study>)> = Vec::new();
        for (study, rank) in cfg.ranks_at(d) {
            match by_rank.iter_mut().find(|(r, _)| *r == rank) {
                Some((_, studies)) => studies.push(study),
                None => by_rank.push((rank, vec![study])),
            }
        }
        let mut jobs = Vec::new();
        for (rank, studies) in &by_rank {
            for s in cfg.settings() {
                for lr in cfg.grid(s.opt).values() {
                    jobs.push((studies, *rank, s, lr));
                }
            }
        }
        // Largest ranks first so the workers finish together.
        jobs.sort_by_key(|j| std::cmp::Reverse(j.1));
        let results: Vec<Vec<(RunRow, Vec<StepRow>)>> = jobs
            .par_iter()
            .map(|&(studies, rank, s, lr)| {
                let cell = CellSpec {
                    opt: s.opt,
                    scaling: s.scaling,
                    reuse: cfg.inputs,
                    rank,
                };
                let how = CellRun {
                    lr_a: lr,
                    lr_b: lr * s.lr_ratio,
                    adapter_init: s.adapter_init,
                    record: Some(measured.clone()),
                    divergence: Some(cfg.divergence),
                    spectrum_steps: measured.clone(),
                };
                let res = run_cell_with(&tc, &data, &prep, &cell, &how);
                progress.inc(studies.len() as u64);
                studies
                    .iter()
                    .map(|&study| rows_of(&tc, trial, data.seed, study, s, rank, lr, &res))
                    .collect()
            })
            .collect();
        for (r, s) in results.into_iter().flatten() {
            run_rows.push(r);
            step_rows.extend(s);
        }
    }
    let key = |r: &RunRow| (r.study, r.width, r.optimizer, r.init, r.rank);
    run_rows.sort_by(|a, b| {
        key(a)
            .cmp(&key(b))
            .then(a.beta.total_cmp(&b.beta))
            .then(a.lr_ratio.total_cmp(&b.lr_ratio))
            .then(a.lr.total_cmp(&b.lr))
    });
    let skey = |r: &StepRow| (r.study, r.width, r.optimizer, r.init, r.rank);
    step_rows.sort_by(|a, b| {
        skey(a)
            .cmp(&skey(b))
            .then(a.beta.total_cmp(&b.beta))
            .then(a.lr_ratio.total_cmp(&b.lr_ratio))
            .then(a.lr.total_cmp(&b.lr))
            .then(a.step.cmp(&b.step))
    });
    Ok((run_rows, step_rows, terms))
}

#[allow(clippy::too_many_arguments)]
fn rows_of(
    tc: &TheoryConfig,
    trial: usize,
    seed: u64,
    study: Study,
    s: Setting,
    rank: usize,
    lr: f64,
    res: &crate::sim::CellResult,
) -> (RunRow, Vec<StepRow>) {
    let last = res
        .losses
        .last()
        .copied()
        .unwrap_or((0, f64::NAN, f64::NAN));
    let final_loss = if res.diverged || !last.2.is_finite() {
        f64::INFINITY
    } else {
        last.2
    };
    let run = RunRow {
        trial: trial as u32,
        seed,
        study,
        width: tc.width as u32,
        optimizer: s.opt,
        beta: s.scaling.beta(),
        init: s.adapter_init,
        lr_ratio: s.lr_ratio,
        rank: rank as u32,
        lr,
        initial_loss: res.losses.first().map_or(f64::NAN, |l| l.2),
        final_loss,
        final_train_loss: last.1,
        diverged: res.diverged || !last.2.is_finite(),
        steps_run: last.0,
    };
    let steps = res
        .spectra
        .iter()
        .filter(|(layer, _, _)| *layer == 0)
        .map(|&(_, step, sp)| {
            let fwd_m2 = res
                .obs
                .iter()
                .find(|o| {
                    o.step == step
                        && o.layer == 0
                        && o.site == Site::Fwd
                        && o.stat == Stat::Abs
                        && o.m == Some(2)
                })
                .map_or(f64::NAN, |o| o.value);
            let heldout_loss = res
                .losses
                .iter()
                .find(|l| l.0 == step)
                .map_or(f64::NAN, |l| l.2);
            StepRow {
                trial: trial as u32,
                study,
                width: tc.width as u32,
                optimizer: s.opt,
                beta: s.scaling.beta(),
                init: s.adapter_init,
                lr_ratio: s.lr_ratio,
                rank: rank as u32,
                lr,
                step,
                heldout_loss,
                fwd_m2,
                update_norm: sp.frobenius,
                stable_rank: sp.stable_rank,
                effective_rank: sp.effective_rank,
                top_share: sp.top_share,
            }
        })
        .collect();
    (run, steps)
}

/// Runs a study in memory (no run directory): the rows and their analysis. For tests and
/// notebooks; the CLI uses [`run`].
///
/// # Errors
/// Invalid configuration.
pub fn study(cfg: &TransferConfig) -> Result<analyse::TransferSummary, TheoryError> {
    cfg.validate()?;
    let mut runs = Vec::new();
    let mut steps = Vec::new();
    let mut terms = Vec::new();
    for trial in 0..cfg.seeds {
        let (r, s, t) = seed_rows(cfg, trial, &NoProgress)?;
        runs.extend(r);
        steps.extend(s);
        terms.extend(t);
    }
    Ok(analyse::analyse(cfg, &runs, &steps, &terms))
}
