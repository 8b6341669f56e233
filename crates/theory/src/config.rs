//! The checker's configuration: a TOML file, command-line overrides, defaults, validation.
//!
//! [`TheoryConfig`] is the runtime value: every field filled in and checked. It is also the
//! file format (`#[serde(default, deny_unknown_fields)]`): a TOML file may set any subset
//! of the fields and nothing else.
use crate::TheoryError;
use rankstab_records::{Optimizer, Scaling};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

rankstab_records::named_enum! {
    /// Non-linearity between layers.
    Activation, "activation" {
        /// No non-linearity.
        #[default]
        Identity => "identity",
        /// max(0, x).
        Relu => "relu",
        /// GELU, tanh approximation.
        Gelu => "gelu",
    }
}

rankstab_records::named_enum! {
    /// Initialisation of the adapter's A matrix (B is always zero).
    Init, "init" {
        /// PEFT's default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(d), 1/sqrt(d)).
        #[default]
        KaimingUniform => "kaiming-uniform",
        /// N(0, 1/d): rank-independent variance.
        Gaussian => "gaussian",
        /// PEFT's `init_lora_weights="gaussian"`: N(0, 1/r^2), variance depends on rank.
        PeftGaussian => "peft-gaussian",
    }
}

impl Init {
    /// Variance s^2 of the entries of A for input width `d` and rank `r`.
    pub fn variance(self, d: usize, r: usize) -> f64 {
        match self {
            Init::KaimingUniform => 1.0 / (3.0 * d as f64),
            Init::Gaussian => 1.0 / d as f64,
            Init::PeftGaussian => 1.0 / (r as f64 * r as f64),
        }
    }
    /// Kurtosis E[a^4] / s^4 of the entries (3 for Gaussian, 9/5 for uniform).
    pub fn kurtosis(self) -> f64 {
        match self {
            Init::KaimingUniform => 9.0 / 5.0,
            Init::Gaussian | Init::PeftGaussian => 3.0,
        }
    }
    /// d ln(s) / d ln(r): 0 for rank-independent inits, -1 for PEFT's gaussian.
    pub fn log_std_rank_slope(self) -> f64 {
        match self {
            Init::PeftGaussian => -1.0,
            _ => 0.0,
        }
    }
}

rankstab_records::named_enum! {
    /// Which adapter factor starts random (the other starts at zero, so the update
    /// `gamma B A` is zero at initialisation either way).
    AdapterInit, "adapter init" {
        /// A random with the distribution [`Init`] gives, B zero: PEFT's default ("Init[A]"
        /// of Hayou et al. 2024).
        #[default]
        A => "a",
        /// B random with the same distribution as A would have, A zero ("Init[B]").
        B => "b",
    }
}

rankstab_records::named_enum! {
    /// How training batches are drawn.
    Reuse, "input regime" {
        /// One fixed batch reused at every step (the theorem's coherent sums).
        #[default]
        Coherent => "coherent",
        /// A new independent batch at every step.
        Fresh => "fresh",
    }
}

/// Distribution of the entries of the network inputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum InputDist {
    /// iid N(0, 1).
    Gaussian,
    /// iid +-1.
    Rademacher,
    /// iid Student-t with `nu` degrees of freedom (heavy tails; moments of order >= nu do
    /// not exist).
    StudentT {
        /// Degrees of freedom.
        nu: f64,
    },
    /// iid N(shift, 1): a common mean across examples (coherent across inputs).
    MeanShift {
        /// The common mean of every entry.
        shift: f64,
    },
    /// sqrt(0.9) U z + sqrt(0.1) e with U (d x k, entries N(0, 1/k)) fixed per trial,
    /// z ~ N(0, I_k): inputs correlated along k directions.
    LowRank {
        /// Number of shared directions k.
        k: usize,
    },
}

impl fmt::Display for InputDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputDist::Gaussian => write!(f, "gaussian"),
            InputDist::Rademacher => write!(f, "rademacher"),
            InputDist::StudentT { nu } => write!(f, "student-t:{nu}"),
            InputDist::MeanShift { shift } => write!(f, "mean-shift:{shift}"),
            InputDist::LowRank { k } => write!(f, "low-rank:{k}"),
        }
    }
}

impl FromStr for InputDist {
    type Err = String;
    /// `gaussian`, `rademacher`, `student-t:NU`, `mean-shift:MU`, `low-rank:K`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |default: f64| -> Result<f64, String> {
            arg.map_or(Ok(default), |a| {
                a.parse::<f64>()
                    .map_err(|_| format!("input distribution '{s}': '{a}' is not a number"))
            })
        };
        match name {
            "gaussian" => Ok(Self::Gaussian),
            "rademacher" => Ok(Self::Rademacher),
            "student-t" => Ok(Self::StudentT { nu: num(5.0)? }),
            "mean-shift" => Ok(Self::MeanShift { shift: num(1.0)? }),
            "low-rank" => {
                let k = num(8.0)?;
                if k < 1.0 || k.fract() != 0.0 {
                    return Err(format!("input distribution '{s}': k must be a positive integer"));
                }
                Ok(Self::LowRank { k: k as usize })
            }
            _ => Err(format!(
                "unknown input distribution '{s}' (allowed: gaussian, rademacher, student-t:NU, mean-shift:MU, low-rank:K)"
            )),
        }
    }
}

rankstab_records::named_enum! {
    /// Training loss.
    Loss, "loss" {
        /// 1/(2N) sum ||f(x) - T x||^2 with a random linear teacher T.
        #[default]
        Mse => "mse",
        /// Cross-entropy through a random linear readout; labels from a random linear teacher.
        Ce => "ce",
    }
}

/// The full configuration of a `rankstab theory` run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TheoryConfig {
    /// Adapter ranks.
    pub ranks: Vec<usize>,
    /// Width d of every layer (d_in = d_out).
    pub width: usize,
    /// Number of adapted layers L.
    pub layers: usize,
    /// Non-linearity after each layer.
    pub activation: Activation,
    /// RMSNorm on each layer's input.
    pub rmsnorm: bool,
    /// Residual connection around each layer.
    pub residual: bool,
    /// Adapter A initialisation.
    pub init: Init,
    /// Scaling numerator alpha.
    pub alpha: f64,
    /// Scaling rules (`lora`, `rslora`, `constant`, `beta=0.75`; a bare number is a beta).
    pub scalings: Vec<Scaling>,
    /// Optimizers.
    pub optimizers: Vec<Optimizer>,
    /// Learning rate for SGD-family optimizers (rank-independent).
    pub lr_sgd: f64,
    /// Learning rate for Adam-family optimizers (rank-independent).
    pub lr_adam: f64,
    /// Momentum of sgd-momentum.
    pub momentum: f64,
    /// Adam beta1.
    pub adam_beta1: f64,
    /// Adam beta2.
    pub adam_beta2: f64,
    /// Adam epsilon.
    pub adam_eps: f64,
    /// Weight decay (L2 for adam, decoupled for adamw, ignored by SGD).
    pub weight_decay: f64,
    /// Input regimes: coherent, fresh.
    pub inputs: Vec<Reuse>,
    /// Input distribution: gaussian, rademacher, student-t:NU, mean-shift:MU, low-rank:K.
    pub dist: String,
    /// Training batch size N.
    pub batch: usize,
    /// Held-out batch size.
    pub heldout: usize,
    /// Loss.
    pub loss: Loss,
    /// Classes of the cross-entropy readout.
    pub classes: usize,
    /// Optimisation steps (moments are measured at steps 0..=steps).
    pub steps: usize,
    /// Independent trials (seeds) per cell.
    pub trials: usize,
    /// Base seed.
    pub seed: u64,
    /// Moment orders m.
    pub moments: Vec<u32>,
    /// Ignored: verdicts' bands are derived (proofs/verdicts.md). Accepted so that the
    /// configurations of older run directories, which set it, still parse.
    #[serde(skip_serializing)]
    pub tolerance: f64,
    /// Compute ||gamma B A||_F at every step (costs 4 d r^2 per cell and step).
    pub delta_norm: bool,
}

impl Default for TheoryConfig {
    fn default() -> Self {
        Self {
            ranks: (2..=11).map(|k| 1usize << k).collect(),
            width: 4096,
            layers: 1,
            activation: Activation::Identity,
            rmsnorm: false,
            residual: false,
            init: Init::KaimingUniform,
            alpha: 1.0,
            scalings: vec![Scaling::LORA, Scaling::RSLORA, Scaling::CONSTANT],
            optimizers: vec![Optimizer::Sgd, Optimizer::Adam],
            lr_sgd: 1e-3,
            lr_adam: 1e-4,
            momentum: 0.9,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            inputs: vec![Reuse::Coherent, Reuse::Fresh],
            dist: "gaussian".into(),
            batch: 16,
            heldout: 32,
            loss: Loss::Mse,
            classes: 10,
            steps: 3,
            trials: 12,
            seed: 0,
            moments: vec![1, 2, 3, 4],
            tolerance: 0.15,
            delta_norm: false,
        }
    }
}

/// Largest width accepted (memory grows as width^2).
pub const MAX_WIDTH: usize = 65_536;
/// Largest number of layers accepted (each holds a width x width weight).
pub const MAX_LAYERS: usize = 1024;
/// Largest batch, held-out batch and class count accepted (rows held per layer).
pub const MAX_ROWS: usize = 1 << 20;
/// Largest number of trials accepted.
pub const MAX_TRIALS: usize = 100_000;
/// Largest number of steps accepted.
pub const MAX_STEPS: usize = 100_000;

impl TheoryConfig {
    /// Parses a TOML document; unknown keys are errors.
    ///
    /// # Errors
    /// [`TheoryError::Config`] naming the key or value.
    ///
    /// ```
    /// let cfg = rankstab_theory::TheoryConfig::from_toml("width = 64\nranks = [2, 4]").unwrap();
    /// assert_eq!(cfg.width, 64);
    /// assert!(rankstab_theory::TheoryConfig::from_toml("widht = 64").is_err());
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, TheoryError> {
        toml_from_str(text)
    }

    /// The input distribution, parsed.
    ///
    /// # Errors
    /// An unknown or malformed distribution.
    pub fn input_dist(&self) -> Result<InputDist, TheoryError> {
        self.dist.parse().map_err(TheoryError::Invalid)
    }

    /// Learning rate used for `opt`.
    pub fn lr(&self, opt: Optimizer) -> f64 {
        if opt.is_adaptive() {
            self.lr_adam
        } else {
            self.lr_sgd
        }
    }

    /// Checks every field; the error names the field, the value and what is allowed.
    ///
    /// # Errors
    /// [`TheoryError::Invalid`].
    ///
    /// ```
    /// let mut cfg = rankstab_theory::TheoryConfig::default();
    /// cfg.ranks = vec![0];
    /// assert!(cfg.validate().unwrap_err().to_string().contains("rank"));
    /// ```
    pub fn validate(&self) -> Result<(), TheoryError> {
        let bad = |msg: String| Err(TheoryError::Invalid(msg));
        if self.width == 0 || self.width > MAX_WIDTH {
            return bad(format!(
                "width {} is not allowed: use 1..={MAX_WIDTH}",
                self.width
            ));
        }
        if self.ranks.is_empty() {
            return bad(
                "the rank list is empty: give at least two ranks, e.g. --ranks 4,8,16".into(),
            );
        }
        for &r in &self.ranks {
            if r == 0 {
                return bad("rank 0 is not allowed: ranks are integers >= 1".into());
            }
            if r > self.width {
                return bad(format!(
                    "rank {r} exceeds the width {}: ranks must be <= width",
                    self.width
                ));
            }
        }
        let mut sorted = self.ranks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.ranks.len() {
            return bad(format!("ranks {:?} contain duplicates", self.ranks));
        }
        for (name, v, max, why) in [
            (
                "layers",
                self.layers,
                MAX_LAYERS,
                "each layer holds a width x width weight",
            ),
            (
                "batch",
                self.batch,
                MAX_ROWS,
                "a batch is held as batch x width numbers per layer",
            ),
            (
                "heldout",
                self.heldout,
                MAX_ROWS,
                "the held-out batch is held as heldout x width numbers per layer",
            ),
            (
                "trials",
                self.trials,
                MAX_TRIALS,
                "each trial is a unit of work and of replication",
            ),
            (
                "steps",
                self.steps,
                MAX_STEPS,
                "every step is measured and written",
            ),
        ] {
            if v == 0 || v > max {
                return bad(format!(
                    "{name} = {v} is not allowed: use 1..={max} ({why})"
                ));
            }
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad(format!(
                "alpha {} is not allowed: use a finite number > 0",
                self.alpha
            ));
        }
        if self.scalings.is_empty() {
            return bad("the scaling list is empty: use e.g. --scalings lora,rslora".into());
        }
        let mut sorted = self.scalings.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.scalings.len() {
            return bad(format!(
                "scalings {} contain duplicates",
                self.scalings
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        if self.optimizers.is_empty() {
            return bad("the optimizer list is empty: use e.g. --optimizers sgd,adam".into());
        }
        for (name, lr) in [("lr_sgd", self.lr_sgd), ("lr_adam", self.lr_adam)] {
            if !lr.is_finite() || lr <= 0.0 {
                return bad(format!(
                    "learning rate {name} = {lr} is not allowed: use a finite number > 0"
                ));
            }
        }
        for (name, v) in [
            ("momentum", self.momentum),
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!(
                    "{name} = {v} is not allowed: use a number in [0, 1)"
                ));
            }
        }
        if !self.adam_eps.is_finite() || self.adam_eps <= 0.0 {
            return bad(format!(
                "adam_eps = {} is not allowed: use a finite number > 0",
                self.adam_eps
            ));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return bad(format!(
                "weight_decay = {} is not allowed: use a finite number >= 0",
                self.weight_decay
            ));
        }
        if self.inputs.is_empty() {
            return bad("the input regime list is empty: use coherent, fresh or both".into());
        }
        if self.moments.is_empty() {
            return bad("the moment list is empty: use e.g. --moments 1,2,3,4".into());
        }
        for &m in &self.moments {
            if m == 0 || m > 8 {
                return bad(format!("moment order m = {m} is not allowed: use 1..=8"));
            }
        }
        let max_m = *self
            .moments
            .iter()
            .max()
            .expect("moments checked non-empty");
        match self.input_dist()? {
            InputDist::StudentT { nu } => {
                if !nu.is_finite() || nu <= 0.0 {
                    return bad(format!(
                        "student-t nu = {nu} is not allowed: use a finite number > 0"
                    ));
                }
                if nu <= max_m as f64 {
                    return bad(format!(
                        "student-t with nu = {nu} has no moment of order {max_m} (it exists only for m < nu): \
                         use nu > {max_m} or lower --moments"
                    ));
                }
                if nu <= 2.0 {
                    return bad(format!(
                        "student-t with nu = {nu} has infinite variance: use nu > 2"
                    ));
                }
            }
            InputDist::MeanShift { shift } if !shift.is_finite() => {
                return bad(format!(
                    "mean-shift {shift} is not allowed: use a finite number"
                ));
            }
            InputDist::LowRank { k } if k > self.width => {
                return bad(format!("low-rank k = {k} exceeds the width {}", self.width));
            }
            _ => {}
        }
        if self.batch == 0 || self.heldout == 0 {
            return bad(format!(
                "batch {} / heldout {} not allowed: use >= 1",
                self.batch, self.heldout
            ));
        }
        if self.loss == Loss::Ce && !(2..=MAX_ROWS).contains(&self.classes) {
            return bad(format!(
                "classes = {} is not allowed for cross-entropy: use 2..={MAX_ROWS} (the label \
                 teacher and the readout are classes x width each)",
                self.classes
            ));
        }
        Ok(())
    }
}

/// Parses a TOML document into `T`; errors name the line.
pub(crate) fn toml_from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TheoryError> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        TheoryError::Config(match line {
            Some(l) => format!("line {l}: {msg}"),
            None => msg,
        })
    })
}
