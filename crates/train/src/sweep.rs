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
use crate::data::{load_dataset, DataFormat, DataSpec, Dataset};
use crate::device::{DeviceName, Dtype};
use crate::lora::LoraInit;
use crate::optim::check_supported;
use crate::run::{LoadedModel, ModelSpec};
use crate::trainer::TrainConfig;
use crate::TrainError;
use rankstab_records::{read_json, write_json_atomic, Optimizer, Scaling, SCHEMA_VERSION};
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
fn d_eval() -> usize {
    10
}
fn d_ckpt() -> usize {
    10
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
    /// Held-out perplexity every k steps.
    #[serde(default = "d_eval")]
    pub eval_every: usize,
    /// Checkpoint every k steps (0: never).
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// Fraction held out.
    #[serde(default = "d_heldout")]
    pub heldout_fraction: f64,
    /// Held-out perplexity on at most this many held-out sequences (0: all).
    #[serde(default)]
    pub heldout_max: usize,
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

    /// Checks the configuration.
    ///
    /// # Errors
    /// No models, no ranks (or rank 0), a model with neither or both of path and preset,
    /// an unknown preset, duplicate model names, unsupported optimizers, and the
    /// checks of [`TrainConfig::validate`] on the first cell.
    pub fn validate(&self, origin: &str) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(format!("{origin}: {m}")));
        if self.models.is_empty() {
            return bad("no [[models]]: name at least one model".into());
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
                return bad(format!("models[{i}]: the name {:?} is used twice", m.name));
            }
            if m.name.is_empty() || m.name.contains(['/', '\\']) {
                return bad(format!(
                    "models[{i}]: name {:?} must be non-empty and without slashes",
                    m.name
                ));
            }
        }
        for ranks in
            std::iter::once(&self.ranks).chain(self.models.iter().filter_map(|m| m.ranks.as_ref()))
        {
            if ranks.is_empty() || ranks.contains(&0) {
                return bad(format!("ranks {ranks:?}: give ranks >= 1"));
            }
        }
        if self.scalings.is_empty() || self.optimizers.is_empty() || self.seeds.is_empty() {
            return bad("scalings, optimizers and seeds must not be empty".into());
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.seeds.as_ref().is_some_and(Vec::is_empty)
                || m.optimizers.as_ref().is_some_and(Vec::is_empty)
            {
                return bad(format!(
                    "models[{i}] ({}): seeds and optimizers, when given, must not be empty",
                    m.name
                ));
            }
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
            if !lr.is_finite() || lr <= 0.0 {
                return bad(format!("{name} = {lr}: use a finite number > 0"));
            }
        }
        if let Some(c) = self.cells().first() {
            self.train_config(c)
                .validate()
                .map_err(|e| e.within(origin))?;
        }
        Ok(())
    }

    /// The cells: models x ranks x scalings x optimizers x seeds, in that nesting order.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for m in &self.models {
            for &rank in m.ranks.as_ref().unwrap_or(&self.ranks) {
                for &scaling in &self.scalings {
                    for &optimizer in m.optimizers.as_ref().unwrap_or(&self.optimizers) {
                        for &seed in m.seeds.as_ref().unwrap_or(&self.seeds) {
                            let index = cells.len();
                            cells.push(Cell {
                                index,
                                name: format!(
                                    "{index:03}-{}-r{rank}-{scaling}-{optimizer}-s{seed}",
                                    m.name,
                                ),
                                model: m.name.clone(),
                                rank,
                                scaling,
                                beta: scaling.beta(),
                                optimizer,
                                lr: if optimizer.is_adaptive() {
                                    self.lr.adamw
                                } else {
                                    self.lr.sgd
                                },
                                seed,
                            });
                        }
                    }
                }
            }
        }
        cells
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
            eval_every: self.eval_every,
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

/// Writes `sweep.json` in `dir`, or checks that the one there describes the same sweep.
///
/// # Errors
/// `dir` holds a different sweep; I/O.
pub fn prepare_dir(dir: &Path, cfg: &SweepConfig) -> Result<SweepManifest, TrainError> {
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
}
