//! Rank sweeps: models x ranks x scalings x optimizers x seeds, as a manifest of
//! independent cells.
//!
//! A sweep directory holds `sweep.json` (the resolved configuration and the list of cells)
//! and one training run directory per cell under `cells/<index>-<model>-r<rank>-<scaling>-
//! <optimizer>-s<seed>/`. Any cell runs alone (`rankstab sweep --cell N`, the shape of a
//! Slurm array job); a cell whose manifest says complete or diverged is skipped; a cell
//! killed mid-run resumes from its last checkpoint (adapters, optimizer state, data
//! position) and ends with the numbers of an uninterrupted run. Each cell is one run of
//! `crate::run`, as `rankstab train` runs it.
//!
//! A configuration is TOML (every key optional except `models` and `data`; unknown keys
//! are errors):
//! ```toml
//! data = "assets/texts/moby-dick.txt"   # .txt: plain text; .jsonl / .parquet: OpenOrca schema
//! ranks = [4, 8, 32, 128, 512, 2048]     # the paper's
//! scalings = ["lora", "rslora"]           # or "constant", or "beta=0.75"
//! optimizers = ["adamw", "sgd"]
//! seeds = [0]
//! steps = 100
//! batch = 32
//! micro_batch = 4
//! context = 512
//! [lr]
//! adamw = 5e-5
//! sgd = 1e-3
//! [[models]]
//! name = "smollm2-135m"
//! path = "assets/SmolLM2-135M-Instruct.Q4_1.gguf"   # a GGUF file or a Hugging Face directory
//! [[models]]
//! name = "gpt-j-mini"
//! preset = "gpt-j-mini"                   # random initialisation of a named shape
//! tokenizer = "assets/gpt2-tokenizer"     # tokenizer.json, or vocab.json + merges.txt, in it
//! ranks = [4, 16, 64]                     # per-model override
//! ```
use crate::data::{check_data_file, load_dataset, DataFormat, DataSpec, Dataset};
use crate::device::{DeviceName, Dtype};
use crate::limits::{self, OutOfRange};
use crate::lora::LoraInit;
use crate::optim::check_supported;
use crate::run::{LoadedModel, ModelSpec};
use crate::trainer::TrainConfig;
use crate::TrainError;
use rankstab_records::{read_json, write_json_atomic, Optimizer, Scaling, SCHEMA_VERSION};
pub use rankstab_theory::transfer::LrGrid;
use std::path::{Path, PathBuf};

/// The embedded default sweep of `make audit` (see `audit_sweep.toml`).
pub const AUDIT_SWEEP: &str = include_str!("audit_sweep.toml");

/// Learning rates per optimizer (rank-independent).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    /// AdamW (the paper, HF's default: 5e-5).
    #[serde(default = "default_adamw_lr")]
    pub adamw: f64,
    /// SGD.
    #[serde(default = "default_sgd_lr")]
    pub sgd: f64,
}

/// Learning-rate grids per optimizer family (the `lrs` axis): each value of a grid is a
/// cell of its own, and the sweep's cells of one model then form an lr x rank study
/// ([`crate::sweep_lr`]). A family without a grid trains at its single [`Rates`] value.
///
/// ```toml
/// [lrs]
/// adamw = "1e-4:1e-1:7"    # LO:HI:N, N log-spaced values
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrGrids {
    /// The Adam family's grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adamw: Option<LrGrid>,
    /// The SGD family's grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sgd: Option<LrGrid>,
}

impl LrGrids {
    /// The grid of `opt`'s family, if any.
    pub fn of(&self, opt: Optimizer) -> Option<LrGrid> {
        if opt.is_adaptive() {
            self.adamw
        } else {
            self.sgd
        }
    }
}

fn default_adamw_lr() -> f64 {
    5e-5
}
fn default_sgd_lr() -> f64 {
    1e-3
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            adamw: default_adamw_lr(),
            sgd: default_sgd_lr(),
        }
    }
}

fn d_ranks() -> Vec<usize> {
    vec![4, 8, 32, 128, 512, 2048]
}
fn d_scalings() -> Vec<Scaling> {
    vec![Scaling::LORA, Scaling::RSLORA]
}
fn d_optimizers() -> Vec<Optimizer> {
    vec![Optimizer::Adamw]
}
fn d_seeds() -> Vec<u64> {
    vec![0]
}
fn d_steps() -> usize {
    100
}
fn d_batch() -> usize {
    32
}
fn d_micro() -> usize {
    4
}
fn d_context() -> usize {
    512
}
fn d_alpha() -> f64 {
    16.0
}
fn d_one() -> usize {
    1
}
fn d_probe_tokens() -> usize {
    crate::trainer::DEFAULT_PROBE_TOKENS
}
fn d_eval() -> usize {
    10
}
fn d_ckpt() -> usize {
    10
}
fn d_heldout_max() -> usize {
    crate::trainer::DEFAULT_HELDOUT_MAX
}
fn d_heldout() -> f64 {
    0.1
}
fn d_moments() -> Vec<u32> {
    vec![1, 2, 3, 4]
}

/// A sweep's configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// Models.
    pub models: Vec<ModelSpec>,
    /// Training data (plain text, or OpenOrca-schema JSONL / Parquet).
    pub data: PathBuf,
    /// How to read the data (auto: by extension).
    #[serde(default)]
    pub format: DataFormat,
    /// Use only the first N rows of an instruction dataset.
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// Ranks.
    #[serde(default = "d_ranks")]
    pub ranks: Vec<usize>,
    /// Scalings: lora, rslora, constant or beta=B.
    #[serde(default = "d_scalings")]
    pub scalings: Vec<Scaling>,
    /// Optimizers.
    #[serde(default = "d_optimizers")]
    pub optimizers: Vec<Optimizer>,
    /// Seeds.
    #[serde(default = "d_seeds")]
    pub seeds: Vec<u64>,
    /// Learning rates per optimizer.
    #[serde(default)]
    pub lr: Rates,
    /// Learning-rate grids per optimizer (an lr x rank study; overrides `lr` for the
    /// families it names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lrs: Option<LrGrids>,
    /// Scaling numerator alpha.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Optimisation steps.
    #[serde(default = "d_steps")]
    pub steps: usize,
    /// Sequences per step.
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Sequences per forward/backward pass (gradient accumulation).
    #[serde(default = "d_micro")]
    pub micro_batch: usize,
    /// Tokens per sequence.
    #[serde(default = "d_context")]
    pub context: usize,
    /// Probe every k steps.
    #[serde(default = "d_one")]
    pub probe_every: usize,
    /// Tokens per pass the probes read from step 2 on (0: every token; default
    /// [`crate::trainer::DEFAULT_PROBE_TOKENS`]).
    #[serde(default = "d_probe_tokens")]
    pub probe_tokens: usize,
    /// Held-out perplexity every k steps.
    #[serde(default = "d_eval")]
    pub eval_every: usize,
    /// Checkpoint every k steps (0: never).
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// Fraction held out.
    #[serde(default = "d_heldout")]
    pub heldout_fraction: f64,
    /// Held-out perplexity on at most this many held-out sequences (0: all; default
    /// [`crate::trainer::DEFAULT_HELDOUT_MAX`]).
    #[serde(default = "d_heldout_max")]
    pub heldout_max: usize,
    /// Also evaluate before the first update.
    #[serde(default)]
    pub eval_at_start: bool,
    /// Norm and stable rank of gamma B A every k steps and at the last step (0: with the
    /// held-out evaluation).
    #[serde(default)]
    pub norm_every: usize,
    /// Moment orders.
    #[serde(default = "d_moments")]
    pub moments: Vec<u32>,
    /// Adapter dropout.
    #[serde(default)]
    pub dropout: f64,
    /// Gradient clipping.
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Activation checkpointing.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// cpu, cuda or cuda:N.
    #[serde(default)]
    pub device: DeviceName,
    /// Base model dtype: f32 or bf16 (adapters stay f32).
    #[serde(default)]
    pub dtype: Dtype,
}

/// One cell of a sweep.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cell {
    /// Position in the sweep (0-based; `--cell N`).
    pub index: usize,
    /// Directory name under `cells/`.
    pub name: String,
    /// Model name.
    pub model: String,
    /// Rank.
    pub rank: usize,
    /// Scaling.
    pub scaling: Scaling,
    /// Scaling exponent.
    pub beta: f64,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
}

/// `sweep.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SweepManifest {
    /// Schema version of the records.
    pub schema_version: u32,
    /// The resolved configuration.
    pub config: SweepConfig,
    /// The cells, in order.
    pub cells: Vec<Cell>,
}

impl SweepConfig {
    /// Parses a TOML configuration; `origin` names it in errors.
    ///
    /// # Errors
    /// Malformed TOML, unknown keys, values a sweep cannot use.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, TrainError> {
        let c: Self = toml::from_str(text).map_err(|error| TrainError::Toml {
            origin: origin.to_string(),
            error,
        })?;
        c.validate(origin)?;
        Ok(c)
    }

    /// The embedded default of `make audit`.
    ///
    /// # Panics
    /// Never: the embedded file is tested.
    pub fn audit() -> Self {
        Self::from_toml(AUDIT_SWEEP, "embedded audit sweep").expect("the embedded sweep is valid")
    }

    /// Checks the whole configuration before anything is loaded or written: every field
    /// against its bound ([`crate::limits`]), every list for duplicates, the number of
    /// cells, and [`TrainConfig::check`] on the first cell for the shared fields. Errors
    /// name `origin` and the field path (`origin: models[1].ranks = [4, 4]: ...`).
    ///
    /// # Errors
    /// No models; a model with neither or both of path and preset, an unknown preset, a
    /// preset without tokenizer, a bad or repeated name; empty or repeated ranks, seeds,
    /// scalings, optimizers, target modules or moment orders; a value out of range;
    /// unsupported optimizers; more than [`MAX_CELLS`](crate::limits::MAX_CELLS) cells.
    pub fn validate(&self, origin: &str) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(format!("{origin}: {m}")));
        let field = |e: OutOfRange| e.in_file(origin);
        if self.models.is_empty() {
            return bad("no [[models]]: name at least one model".into());
        }
        if self.data.as_os_str().is_empty() {
            return bad("data = \"\": name the training data file".into());
        }
        for (i, m) in self.models.iter().enumerate() {
            match (&m.path, &m.preset) {
                (Some(_), None) => {}
                (None, Some(p)) if crate::random::PRESETS.contains(&p.as_str()) => {
                    if m.tokenizer.is_none() {
                        return bad(format!(
                            "models[{i}] ({}): a preset needs a tokenizer = PATH",
                            m.name
                        ));
                    }
                }
                (None, Some(p)) => {
                    return bad(format!(
                        "models[{i}] ({}): preset {p:?} is not known (known: {})",
                        m.name,
                        crate::random::PRESETS.join(", ")
                    ))
                }
                _ => {
                    return bad(format!(
                        "models[{i}] ({}): give exactly one of path and preset",
                        m.name
                    ))
                }
            }
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return bad(format!(
                    "models[{i}].name = {:?}: the name is used twice (duplicate model names make cells of one model look like two)",
                    m.name
                ));
            }
            if m.name.is_empty()
                || m.name.chars().count() > 64
                || m.name.contains(['/', '\\'])
                || m.name.chars().any(char::is_control)
                || m.name == "."
                || m.name == ".."
            {
                return bad(format!(
                    "models[{i}].name = {:?}: use 1 to 64 characters without slashes or control characters (it names the cells' directories)",
                    m.name
                ));
            }
            let at = format!("models[{i}]");
            if let Some(r) = &m.ranks {
                check_ranks(r).map_err(|e| field(e.under(&at)))?;
            }
            if let Some(steps) = m.steps {
                limits::steps("steps", steps).map_err(|e| field(e.under(&at)))?;
            }
            if let Some(seeds) = &m.seeds {
                check_seeds(seeds).map_err(|e| field(e.under(&at)))?;
            }
            if let Some(o) = &m.optimizers {
                limits::distinct(
                    "optimizers",
                    o,
                    "duplicate optimizers make duplicate cells that look like replication",
                )
                .map_err(|e| field(e.under(&at)))?;
            }
            if !m.target_modules.is_empty() {
                limits::distinct(
                    "target_modules",
                    &m.target_modules,
                    "a module is adapted once",
                )
                .map_err(|e| field(e.under(&at)))?;
            }
        }
        check_ranks(&self.ranks).map_err(field)?;
        check_seeds(&self.seeds).map_err(field)?;
        limits::distinct(
            "optimizers",
            &self.optimizers,
            "duplicate optimizers make duplicate cells that look like replication",
        )
        .map_err(field)?;
        limits::distinct("scalings", &self.scalings, "a scaling is its beta: duplicate scalings make duplicate cells that look like replication")
            .map_err(field)?;
        for s in &self.scalings {
            limits::float(
                "scalings",
                s.beta(),
                (-limits::MAX_ABS_BETA, false),
                (limits::MAX_ABS_BETA, false),
                "as beta (alpha r^-beta must stay inside f32 for every rank up to 65536)",
            )
            .map_err(field)?;
        }
        for &o in self.optimizers.iter().chain(
            self.models
                .iter()
                .filter_map(|m| m.optimizers.as_ref())
                .flatten(),
        ) {
            check_supported(o).map_err(|e| e.within(origin))?;
        }
        for (name, lr) in [("lr.adamw", self.lr.adamw), ("lr.sgd", self.lr.sgd)] {
            limits::float(
                name,
                lr,
                (limits::MIN_LR, false),
                (limits::MAX_LR, false),
                "(outside it the f32 update is zero or overflows)",
            )
            .map_err(field)?;
        }
        limits::max_examples("max_examples", self.max_examples).map_err(field)?;
        let grids = std::iter::once(("lrs".to_string(), self.lrs.as_ref())).chain(
            self.models
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("models[{i}].lrs"), m.lrs.as_ref())),
        );
        for (at, g) in grids {
            for (family, grid) in g.iter().flat_map(|g| [("adamw", g.adamw), ("sgd", g.sgd)]) {
                if let Some(grid) = grid {
                    for (end, v) in [("low end", grid.lo), ("high end", grid.hi)] {
                        limits::float(
                            &format!("{at}.{family} ({end})"),
                            v,
                            (limits::MIN_LR, false),
                            (limits::MAX_LR, false),
                            "(outside it the f32 update is zero or overflows)",
                        )
                        .map_err(field)?;
                    }
                }
            }
        }
        let mut n_cells: usize = 0;
        for m in &self.models {
            let per_opt = m
                .optimizers
                .as_ref()
                .unwrap_or(&self.optimizers)
                .iter()
                .map(|&o| self.lr_grid(m, o).map_or(1, |g| g.n))
                .sum::<usize>();
            let n = [
                m.ranks.as_ref().unwrap_or(&self.ranks).len(),
                self.scalings.len(),
                per_opt,
                m.seeds.as_ref().unwrap_or(&self.seeds).len(),
            ]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .and_then(|n| n.checked_add(n_cells));
            n_cells = match n {
                Some(n) if n <= limits::MAX_CELLS => n,
                _ => {
                    return bad(format!(
                        "the sweep has more than {} cells (models x ranks x scalings x optimizers x lrs x seeds): sweep.json lists every cell; shorten the lists or split the sweep",
                        limits::MAX_CELLS
                    ))
                }
            };
        }
        if let Some(c) = self.cells().first() {
            let tc = self.train_config(c);
            tc.check().map_err(field)?;
        }
        Ok(())
    }

    /// Checks what the sweep reads, before it writes anything: every model path and
    /// tokenizer exists, and the data file is a regular, non-empty file that parses in its
    /// format ([`check_data_file`]: text, or OpenOrca rows). What needs a model's tokenizer
    /// (windows of the context, prompt lengths) is checked when a model's data is loaded.
    ///
    /// # Errors
    /// A missing model or tokenizer path (named with its model); every error of
    /// [`check_data_file`].
    pub fn check_inputs(&self) -> Result<(), TrainError> {
        for m in &self.models {
            for p in m.path.iter().chain(m.tokenizer.iter()) {
                if !p.exists() {
                    return Err(TrainError::Invalid(format!(
                        "model {:?}: {} does not exist (the default sweep's assets come from `bash scripts/setup.sh`)",
                        m.name,
                        p.display()
                    )));
                }
            }
        }
        if !self.data.exists() {
            return Err(TrainError::Invalid(format!(
                "{}: the sweep's data file does not exist (the default's comes from `bash scripts/setup.sh`)",
                self.data.display()
            )));
        }
        check_data_file(&self.data, self.format, self.max_examples)?;
        Ok(())
    }

    /// The cells: models x ranks x scalings x optimizers x lrs (one unless the optimizer
    /// has an `lrs` grid) x seeds, in that nesting order.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for m in &self.models {
            for &rank in m.ranks.as_ref().unwrap_or(&self.ranks) {
                for &scaling in &self.scalings {
                    for &optimizer in m.optimizers.as_ref().unwrap_or(&self.optimizers) {
                        let grid = self.lr_grid(m, optimizer);
                        let lrs = grid.map_or_else(
                            || {
                                vec![if optimizer.is_adaptive() {
                                    self.lr.adamw
                                } else {
                                    self.lr.sgd
                                }]
                            },
                            // Seven significant digits: 1e-4, not 1.0000000000000009e-4
                            // from exp(ln), in names, manifests and the report's keys.
                            |g| {
                                g.values()
                                    .into_iter()
                                    .map(|v| format!("{v:.6e}").parse().unwrap_or(v))
                                    .collect()
                            },
                        );
                        for lr in lrs {
                            // The lr is in the name only on an lr axis: sweeps without one
                            // keep their cells' names.
                            let lr_part = grid.map_or(String::new(), |_| format!("-lr{lr:.3e}"));
                            for &seed in m.seeds.as_ref().unwrap_or(&self.seeds) {
                                let index = cells.len();
                                cells.push(Cell {
                                    index,
                                    name: format!(
                                        "{index:03}-{}-r{rank}-{scaling}-{optimizer}{lr_part}-s{seed}",
                                        m.name,
                                    ),
                                    model: m.name.clone(),
                                    rank,
                                    scaling,
                                    beta: scaling.beta(),
                                    optimizer,
                                    lr,
                                    seed,
                                });
                            }
                        }
                    }
                }
            }
        }
        cells
    }

    /// The learning-rate grid of `model`'s cells under `opt`: the model's `lrs` when it
    /// has one, else the sweep's; `None` trains at the single rate of `lr`.
    pub fn lr_grid(&self, model: &ModelSpec, opt: Optimizer) -> Option<LrGrid> {
        model.lrs.as_ref().or(self.lrs.as_ref())?.of(opt)
    }

    /// The model spec of a cell.
    ///
    /// # Panics
    /// A cell that is not from this configuration.
    pub fn model(&self, cell: &Cell) -> &ModelSpec {
        self.models
            .iter()
            .find(|m| m.name == cell.model)
            .expect("cell from this sweep")
    }

    /// The training configuration of a cell.
    pub fn train_config(&self, cell: &Cell) -> TrainConfig {
        let m = self.model(cell);
        TrainConfig {
            model_name: cell.model.clone(),
            rank: cell.rank,
            alpha: self.alpha,
            beta: cell.beta,
            init: LoraInit::KaimingUniform,
            dropout: self.dropout,
            optimizer: cell.optimizer,
            lr: cell.lr,
            steps: m.steps.unwrap_or(self.steps),
            batch: self.batch,
            micro_batch: self.micro_batch,
            context: self.context,
            probe_every: self.probe_every,
            probe_tokens: self.probe_tokens,
            eval_every: self.eval_every,
            eval_at_start: self.eval_at_start,
            heldout_fraction: self.heldout_fraction,
            heldout_max: self.heldout_max,
            norm_every: self.norm_every,
            target_modules: m.target_modules.clone(),
            moments: self.moments.clone(),
            seed: cell.seed,
            clip_grad_norm: self.clip_grad_norm,
            weight_decay: 0.0,
            checkpoint_every: self.checkpoint_every,
            activation_checkpointing: self.activation_checkpointing,
            base_model: m.path.as_ref().map(|p| p.display().to_string()),
            init_adapter: None,
        }
    }

    /// The data specification.
    pub fn data_spec(&self, seed: u64, eos_token: Option<String>) -> DataSpec {
        DataSpec {
            format: self.format,
            context: self.context,
            heldout_fraction: self.heldout_fraction,
            seed,
            max_examples: self.max_examples,
            eos_token,
        }
    }
}

/// Ranks of a sweep: distinct, each in 1..=65536.
fn check_ranks(ranks: &[usize]) -> Result<(), OutOfRange> {
    limits::distinct(
        "ranks",
        ranks,
        "duplicate ranks make duplicate cells that look like replication",
    )?;
    for &r in ranks {
        limits::rank("ranks", r)
            .map_err(|e| OutOfRange::new("ranks", format!("[.., {r}, ..]"), e.allowed))?;
    }
    Ok(())
}

/// Seeds of a sweep: distinct, each at most 2^53 - 1.
fn check_seeds(seeds: &[u64]) -> Result<(), OutOfRange> {
    limits::distinct(
        "seeds",
        seeds,
        "duplicate seeds make duplicate cells that look like replication",
    )?;
    for &s in seeds {
        limits::seed("seeds", s)
            .map_err(|e| OutOfRange::new("seeds", format!("[.., {s}, ..]"), e.allowed))?;
    }
    Ok(())
}

/// Writes `sweep.json` in `dir`, or checks that the one there describes the same sweep.
///
/// # Errors
/// `dir` holds a different sweep, is not a directory, or is a non-empty directory without
/// `sweep.json`; I/O.
pub fn prepare_dir(dir: &Path, cfg: &SweepConfig) -> Result<SweepManifest, TrainError> {
    if dir.exists() && !dir.is_dir() {
        return Err(TrainError::Invalid(format!(
            "--out {}: is a file, not a directory: a sweep directory is absent, empty or holds the same sweep",
            dir.display()
        )));
    }
    if dir.is_dir()
        && !dir.join("sweep.json").exists()
        && !rankstab_records::guard::is_empty_dir(dir)?
    {
        return Err(TrainError::Invalid(format!(
            "--out {}: exists, is not empty and holds no sweep.json: choose another --out (a sweep directory is absent, empty or holds the same sweep)",
            dir.display()
        )));
    }
    let m = SweepManifest {
        schema_version: SCHEMA_VERSION,
        config: cfg.clone(),
        cells: cfg.cells(),
    };
    let path = dir.join("sweep.json");
    if path.exists() {
        let old: SweepManifest = read_json(&path)?;
        if old != m {
            return Err(TrainError::Invalid(format!(
                "{}: this directory holds a different sweep; use another --out (or the same configuration)",
                path.display()
            )));
        }
        return Ok(old);
    }
    std::fs::create_dir_all(dir.join("cells")).map_err(TrainError::io(dir))?;
    write_json_atomic(&path, &m)?;
    Ok(m)
}

/// Locks the sweep directory and prepares it ([`prepare_dir`]): exclusively for a process
/// that runs the whole sweep, shared for one that runs chosen cells (`--cell`: tasks of a
/// job array run side by side, each cell under its own lock). A second whole-sweep process,
/// or a whole sweep beside cell tasks, is refused at once naming the holder. A directory
/// that holds something else is refused before the lock file is written into it, and a
/// directory made here is removed again if preparing it fails.
///
/// # Errors
/// As [`prepare_dir`]; the lock is held by another process.
pub fn claim_dir(
    dir: &Path,
    cfg: &SweepConfig,
    whole: bool,
) -> Result<(SweepManifest, rankstab_records::RunLock), TrainError> {
    let existed = dir.exists();
    // A whole sweep that holds the lock is in use, whatever it has written so far.
    rankstab_records::guard::refuse_if_held(dir)?;
    if existed
        && (!dir.is_dir()
            || (!dir.join("sweep.json").exists() && !rankstab_records::guard::is_empty_dir(dir)?))
    {
        // prepare_dir's error, before anything is written.
        prepare_dir(dir, cfg)?;
    }
    let lock = if whole {
        rankstab_records::RunLock::exclusive(dir)?
    } else {
        rankstab_records::RunLock::shared(dir)?
    };
    match prepare_dir(dir, cfg) {
        Ok(m) => Ok((m, lock)),
        Err(e) => {
            if !existed {
                let _ = std::fs::remove_dir_all(dir);
            }
            Err(e)
        }
    }
}

/// Loads a sweep's data for a model's tokenizer.
///
/// # Errors
/// Data errors (named file, row, field).
pub fn load_data(cfg: &SweepConfig, lm: &LoadedModel, seed: u64) -> Result<Dataset, TrainError> {
    load_dataset(
        &cfg.data,
        &lm.tokenizer,
        &cfg.data_spec(seed, lm.eos_token.clone()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_embedded_audit_sweep_has_the_power_to_judge() {
        let c = SweepConfig::audit();
        let cells = c.cells();
        let smol: Vec<&Cell> = cells.iter().filter(|c| c.model == "smollm2-135m").collect();
        let gptj: Vec<&Cell> = cells.iter().filter(|c| c.model == "gpt-j-mini").collect();
        // The verdicts' minimum for a training exponent (proofs/verdicts.md): 5 ranks whose
        // largest reaches d/8 of the smallest adapted module (SmolLM2's v_proj 576 -> 192:
        // 24; GPT-J-mini's 256: 32), and 3 seeds.
        for (of, d, seeds, optimizers) in [(&smol, 192, 3, 1), (&gptj, 256, 6, 2)] {
            let ranks: BTreeSet<usize> = of.iter().map(|c| c.rank).collect();
            assert_eq!(ranks.into_iter().collect::<Vec<_>>(), [4, 8, 16, 32, 64]);
            assert!(64 >= d / 8);
            let s: BTreeSet<u64> = of.iter().map(|c| c.seed).collect();
            assert_eq!(s.len(), seeds);
            assert_eq!(of.len(), 5 * 2 * optimizers * seeds);
        }
        assert_eq!(
            c.model(smol[0]).target_modules,
            ["q_proj", "v_proj", "down_proj"]
        );
        // Names are unique and carry the index.
        for (i, c) in cells.iter().enumerate() {
            assert_eq!(c.index, i);
            assert!(c.name.starts_with(&format!("{i:03}-")));
        }
    }

    /// An `lrs` grid makes one cell per value (the lr in the name), per model or for the
    /// whole sweep; an optimizer without one keeps its single rate and its cells' names;
    /// bad grids are refused with their field.
    #[test]
    fn an_lrs_axis_makes_one_cell_per_learning_rate() {
        let base =
            "data = \"x.txt\"\nranks = [2, 8]\nseeds = [0, 1]\noptimizers = [\"adamw\", \"sgd\"]\n";
        let model = "[[models]]\nname = \"m\"\npath = \"m.gguf\"\n";
        let c = SweepConfig::from_toml(
            &format!("{base}[lrs]\nadamw = \"1e-4:1e-2:3\"\n{model}"),
            "s.toml",
        )
        .expect("valid");
        let cells = c.cells();
        // ranks x scalings x (3 adamw lrs + 1 sgd lr) x seeds.
        assert_eq!(cells.len(), 2 * 2 * (3 + 1) * 2);
        let adam: BTreeSet<u64> = cells
            .iter()
            .filter(|c| c.optimizer == Optimizer::Adamw)
            .map(|c| c.lr.to_bits())
            .collect();
        let want: BTreeSet<u64> = [1e-4, 1e-3, 1e-2]
            .iter()
            .map(|v: &f64| v.to_bits())
            .collect();
        assert_eq!(adam, want, "the grid's values, exactly");
        assert!(cells
            .iter()
            .any(|c| c.name == "001-m-r2-lora-adamw-lr1.000e-4-s1"));
        assert!(cells
            .iter()
            .filter(|c| c.optimizer == Optimizer::Sgd)
            .all(|c| c.lr == 1e-3 && !c.name.contains("-lr")));
        // A model's own grid replaces the sweep's.
        let own = SweepConfig::from_toml(
            &format!(
                "{base}[lrs]\nadamw = \"1e-4:1e-2:3\"\n{model}lrs = {{ sgd = \"1e-2:1:5\" }}\n"
            ),
            "s.toml",
        )
        .expect("valid");
        let m = &own.models[0];
        assert_eq!(own.lr_grid(m, Optimizer::Adamw), None);
        assert_eq!(own.lr_grid(m, Optimizer::Sgd).map(|g| g.n), Some(5));
        assert_eq!(own.cells().len(), 2 * 2 * (1 + 5) * 2);
        for (grid, want) in [
            ("[lrs]\nadamw = \"1e-2:1e-4:3\"\n", "learning-rate grid"),
            ("[lrs]\nadamw = \"1e-4:1e-2:2\"\n", "3 <= N"),
            ("[lrs]\nadam = \"1e-4:1e-2:3\"\n", "adam"),
            ("[lrs]\nsgd = \"1e-25:1e-2:3\"\n", "lrs.sgd (low end)"),
        ] {
            let e = SweepConfig::from_toml(&format!("{base}{grid}{model}"), "s.toml")
                .expect_err("refused")
                .to_string();
            assert!(e.contains("s.toml") && e.contains(want), "{grid}: {e}");
        }
        let e = SweepConfig::from_toml(
            &format!("{base}{model}lrs = {{ adamw = \"1e-30:1:3\" }}\n"),
            "s.toml",
        )
        .expect_err("refused")
        .to_string();
        assert!(e.contains("models[0].lrs.adamw (low end)"), "{e}");
    }

    #[test]
    fn bad_configs_are_named() {
        let base = "data = \"x.txt\"\n[[models]]\nname = \"m\"\npath = \"m.gguf\"\n";
        assert!(SweepConfig::from_toml(base, "s.toml").is_ok());
        // Per-model seeds and optimizers override the sweep's, and are checked the same way.
        let own = SweepConfig::from_toml(
            &format!("{base}seeds = [7, 8]\noptimizers = [\"sgd\"]\n"),
            "s.toml",
        )
        .expect("per-model seeds");
        assert!(own.cells().iter().all(|c| c.optimizer == Optimizer::Sgd));
        assert_eq!(
            own.cells()
                .iter()
                .map(|c| c.seed)
                .collect::<BTreeSet<_>>()
                .len(),
            2
        );
        for (extra, want) in [
            ("seeds = []\n", "must not be empty"),
            ("optimizers = [\"adam\"]\n", "adamw or sgd"),
        ] {
            let e = SweepConfig::from_toml(&format!("{base}{extra}"), "s.toml")
                .expect_err("refused")
                .to_string();
            assert!(e.contains("s.toml") && e.contains(want), "{extra}: {e}");
        }
        for (extra, want) in [
            ("ranks = [0]\n", "ranks"),
            ("scalings = [\"wide\"]\n", "wide"),
            ("colour = 1\n", "colour"),
            ("dtype = \"f8\"\n", "f8"),
            ("optimizers = [\"adam\"]\n", "adamw or sgd"),
            ("batch = 32\nmicro_batch = 5\n", "divide"),
        ] {
            let e = SweepConfig::from_toml(&format!("{extra}{base}"), "s.toml")
                .expect_err("refused")
                .to_string();
            assert!(e.contains("s.toml") && e.contains(want), "{extra}: {e}");
        }
        let e = SweepConfig::from_toml(
            "data = \"x\"\n[[models]]\nname = \"m\"\npreset = \"gpt-j-huge\"\ntokenizer = \"t\"\n",
            "s.toml",
        )
        .expect_err("unknown preset")
        .to_string();
        assert!(e.contains("gpt-j-huge") && e.contains("gpt-j-mini"), "{e}");
    }

    #[test]
    fn the_example_configurations_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut n = 0;
        for dir in ["reports/example", "reports"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for e in entries {
                let p = e.expect("entry").path();
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                if p.extension().is_some_and(|x| x == "toml") && text.contains("[[models]]") {
                    SweepConfig::from_toml(&text, &p.display().to_string())
                        .unwrap_or_else(|e| panic!("{e}"));
                    n += 1;
                }
            }
        }
        assert!(n >= 1, "no example sweep found");
        SweepConfig::audit().validate("audit").expect("audit");
    }

    #[test]
    fn every_list_and_field_is_bounded_and_named_with_its_path() {
        let base = "data = \"x.txt\"\n";
        let model = "[[models]]\nname = \"m\"\npath = \"m.gguf\"\n";
        for (top, in_model, want) in [
            (
                "ranks = [4, 4]\n",
                "",
                "s.toml: ranks = [4, 4]: 4 appears twice",
            ),
            (
                "",
                "ranks = [8, 8]\n",
                "s.toml: models[0].ranks = [8, 8]: 8 appears twice",
            ),
            (
                "ranks = [65537]\n",
                "",
                "s.toml: ranks = [.., 65537, ..]: use 1..=65536",
            ),
            (
                "seeds = [3, 3]\n",
                "",
                "duplicate seeds make duplicate cells",
            ),
            ("", "seeds = [9007199254740992]\n", "models[0].seeds"),
            (
                "scalings = [\"rslora\", \"beta=0.5\"]\n",
                "",
                "rslora appears twice",
            ),
            ("optimizers = [\"sgd\", \"sgd\"]\n", "", "sgd appears twice"),
            ("moments = [1, 1]\n", "", "moments = [1, 1]"),
            (
                "",
                "target_modules = [\"q_proj\", \"q_proj\"]\n",
                "models[0].target_modules",
            ),
            (
                "batch = 4294967297\n",
                "",
                "s.toml: batch = 4294967297: use 1..=65536",
            ),
            ("context = 4294967297\n", "", "s.toml: context = 4294967297"),
            ("", "steps = 0\n", "s.toml: models[0].steps = 0"),
            ("alpha = nan\n", "", "s.toml: alpha = NaN"),
            (
                "heldout_fraction = 0.0\n",
                "",
                "heldout_fraction = 0: use a finite number in (0, 1)",
            ),
            ("max_examples = 1\n", "", "max_examples = 1"),
            ("[lr]\nsgd = inf\n", "", "s.toml: lr.sgd = inf"),
        ] {
            let text = format!("{base}{top}{model}{in_model}");
            let e = SweepConfig::from_toml(&text, "s.toml")
                .expect_err("refused")
                .to_string();
            assert!(e.contains(want), "{top}{in_model}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        // The number of cells is bounded before the cells are made.
        let seeds: Vec<String> = (0..400).map(|i| i.to_string()).collect();
        let ranks: Vec<String> = (1..=300).map(|i| i.to_string()).collect();
        let text = format!(
            "{base}seeds = [{}]\nranks = [{}]\n{model}",
            seeds.join(","),
            ranks.join(",")
        );
        let e = SweepConfig::from_toml(&text, "s.toml")
            .expect_err("too many")
            .to_string();
        assert!(e.contains("more than 100000 cells"), "{e}");
    }

    #[test]
    fn data_files_are_checked_before_the_sweep_directory_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, "x").expect("write");
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "").expect("write");
        let text = format!(
            "data = {:?}\n[[models]]\nname = \"m\"\npath = {:?}\n",
            data.display().to_string(),
            model.display().to_string()
        );
        let c = SweepConfig::from_toml(&text, "s.toml").expect("valid");
        let e = c.check_inputs().expect_err("empty").to_string();
        assert!(e.contains("d.jsonl") && e.contains("no rows"), "{e}");
        let row = r#"{"system_prompt": "", "question": "Q", "response": "A"}"#;
        std::fs::write(&data, format!("\u{feff}{row}\n{row}\n")).expect("write");
        c.check_inputs().expect("two rows with a BOM");
        // A directory that is neither empty nor a sweep is refused, and left as it was.
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::fs::write(theirs.join("notes"), "mine").expect("write");
        let e = prepare_dir(&theirs, &c)
            .expect_err("not a sweep")
            .to_string();
        assert!(e.contains("holds no sweep.json"), "{e}");
        assert!(!theirs.join("cells").exists() && !theirs.join("sweep.json").exists());
    }
}
