//! Instrumented LoRA / rsLoRA fine-tuning on a token stream.
//!
//! Adapters go on every linear attention and MLP module (or the named ones); the base
//! weights stay frozen. Every `probe_every` steps, for every adapter, the probes record the
//! same statistics as the theory checker: moments of the adapter output (`fwd`), of the
//! loss gradient at that output (`grad_out`), of the gradient into the adapter's input
//! through the adapter, `(gamma B A)^T v` (`bwd`), and the norms of the gradients of A and
//! B, of `gamma B A` and its stable rank (`param`). Rows go to the run directory's
//! `moments.csv` (source = train) and `metrics.csv`.
//!
//! Longer than 600 lines because the step is one piece: accumulation, the optimizer, the
//! probes (zero leaves around each adapter), the law's step-0/step-1 hooks and the rows all
//! share the step's tensors; what can stand alone already does (`lora`, `inject`, `probe`,
//! `law`, `optim`, `loss`, `checkpoint`, `run`).
use crate::checkpoint;
use crate::data::{collate, heldout_count, shuffle_split, Dataset, Sequence};
use crate::inject::{self, module_and_layer};
use crate::law::Law;
use crate::limits::OutOfRange;
use crate::lora::{save_peft, LoraConfig, LoraInit, PeftAdapterConfig};
use crate::loss::{self, blockwise_backward, masked_loss_sum};
use crate::optim::{check_supported, AdamwParams, AdapterOptimizer};
use crate::probe::{self, delta_norm_and_stable_rank, fro, rows_of, valid_rows, SiteSums};
use crate::{CausalLm, TrainError};
use rankstab_records::{Metric, MetricRow, MomentRow, Optimizer, Scaling, Site, Stat, TableWriter};
use std::path::Path;
use tch::nn;
use tch::{Device, Tensor};

/// Held-out sequences evaluated by default: enough for a perplexity to two or three
/// digits, few enough that a small run is not dominated by its evaluation (the whole
/// held-out split of a book is thousands of sequences). `heldout_max = 0` evaluates all.
pub const DEFAULT_HELDOUT_MAX: usize = 64;

/// Tokens per micro-batch pass the probes read from step 2 on, unless a run says
/// otherwise ([`TrainConfig::probe_tokens`]).
pub const DEFAULT_PROBE_TOKENS: usize = 128;

fn default_probe_tokens() -> usize {
    DEFAULT_PROBE_TOKENS
}

fn default_heldout_max() -> usize {
    DEFAULT_HELDOUT_MAX
}

/// What the trainer reports after each step (for progress lines, bars and event files).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress<'a> {
    /// The step just taken (0-based).
    pub step: usize,
    /// Steps of the run.
    pub steps: usize,
    /// Its training loss.
    pub loss: f64,
    /// Tokens it trained on (the loss tokens of its batch).
    pub tokens: usize,
    /// Seconds it took (forward, backward, update, probes and evaluation).
    pub seconds: f64,
    /// The held-out loss, when the step ended with an evaluation.
    pub heldout: Option<f64>,
    /// The step's rows of metrics.csv.
    pub metrics: &'a [MetricRow],
    /// The step's rows of moments.csv.
    pub moments: &'a [MomentRow],
    /// Where the step's time went.
    pub times: StepTimes,
}

/// Where a step's wall time went, in seconds. On CPU libtorch runs each operation to its
/// end before returning, so the boundaries are exact; on CUDA kernels run asynchronously
/// and a phase's time can show up in the next one (the total stays right).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepTimes {
    /// Batching the step's sequences into tensors.
    pub data: f64,
    /// Forward passes, loss included.
    pub forward: f64,
    /// Backward passes (the probes' reading excluded).
    pub backward: f64,
    /// The probes: the moment passes, the gradient through the adapter, the law's inputs,
    /// the rows of the statistics (gradient norms of A and B, taken at every step; on
    /// probed steps norms and stable ranks of gamma B A, Adam's eps share, the law's rows).
    pub probes: f64,
    /// Clipping and the optimizer's update.
    pub optimizer: f64,
    /// Held-out evaluation.
    pub evaluation: f64,
    /// Appending the rows to the tables, and checkpoints.
    pub records: f64,
}

impl StepTimes {
    /// The phases in their order: data, forward, backward, probes, optimizer,
    /// evaluation, records.
    pub fn phases(&self) -> [(&'static str, f64); 7] {
        [
            ("data", self.data),
            ("forward", self.forward),
            ("backward", self.backward),
            ("probes", self.probes),
            ("optimizer", self.optimizer),
            ("evaluation", self.evaluation),
            ("records", self.records),
        ]
    }

    /// The sum of the phases.
    pub fn total(&self) -> f64 {
        self.phases().iter().map(|(_, s)| s).sum()
    }

    /// The phase-by-phase mean of `times` (zero when empty).
    pub fn mean(times: &[StepTimes]) -> StepTimes {
        let n = times.len().max(1) as f64;
        let m = |f: fn(&StepTimes) -> f64| times.iter().map(f).sum::<f64>() / n;
        StepTimes {
            data: m(|t| t.data),
            forward: m(|t| t.forward),
            backward: m(|t| t.backward),
            probes: m(|t| t.probes),
            optimizer: m(|t| t.optimizer),
            evaluation: m(|t| t.evaluation),
            records: m(|t| t.records),
        }
    }
}

/// Configuration of one training run (one cell of a sweep).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Model name recorded in rows.
    pub model_name: String,
    /// Adapter rank.
    pub rank: usize,
    /// Scaling numerator.
    pub alpha: f64,
    /// Scaling exponent (1 LoRA, 0.5 rsLoRA).
    pub beta: f64,
    /// A's init.
    pub init: LoraInit,
    /// Adapter dropout.
    pub dropout: f64,
    /// Optimizer (the trainer implements adamw and sgd).
    pub optimizer: Optimizer,
    /// Learning rate.
    pub lr: f64,
    /// Optimisation steps.
    pub steps: usize,
    /// Sequences per optimisation step (the paper: 32).
    pub batch: usize,
    /// Sequences per forward/backward pass; gradients accumulate over
    /// `batch / micro_batch` passes (0: the whole batch at once).
    #[serde(default)]
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// Probe every k steps (0: never).
    pub probe_every: usize,
    /// Tokens of each micro-batch pass whose activations the probes read from step 2 on:
    /// a simple random sample of its real tokens, drawn anew every pass from a stream of
    /// its own (0: every token). Steps 0 and 1 read every token (the exact law's steps).
    /// Default (CLI, sweeps, configs without the field): [`DEFAULT_PROBE_TOKENS`].
    #[serde(default = "default_probe_tokens")]
    pub probe_tokens: usize,
    /// Held-out perplexity after every k-th step (steps k-1, 2k-1, ...) and after the last
    /// one; 0: no held-out rows (the final held-out loss is still measured).
    pub eval_every: usize,
    /// Also evaluate before training (step 0's row measures the initial adapters, with
    /// B = 0 the base model): off by default, as it costs one held-out pass.
    #[serde(default)]
    pub eval_at_start: bool,
    /// Norm and stable rank of gamma B A every k steps (and at the last step) on probed
    /// steps; 0: with the held-out evaluation (`eval_every`).
    #[serde(default)]
    pub norm_every: usize,
    /// Fraction of sequences held out.
    pub heldout_fraction: f64,
    /// Evaluate held-out perplexity on at most this many held-out sequences (0: all;
    /// default [`DEFAULT_HELDOUT_MAX`]).
    #[serde(default = "default_heldout_max")]
    pub heldout_max: usize,
    /// Module names to adapt (empty: every attention and MLP linear).
    pub target_modules: Vec<String>,
    /// Moment orders.
    pub moments: Vec<u32>,
    /// Seed (adapter init, dropout, data order).
    pub seed: u64,
    /// Clip the adapters' global gradient norm to this value (none by default).
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// AdamW's decoupled weight decay (the paper: 0).
    #[serde(default)]
    pub weight_decay: f64,
    /// Write a resumable checkpoint every k steps (0: never).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (less memory, about one more forward pass of time): for large models.
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// The model as the user named it (a directory, a hub-style id, a GGUF file's path):
    /// the saved adapter's `base_model_name_or_path`, which PEFT resolves (default: the
    /// model name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// A PEFT adapter directory whose A and B are the initial values (instead of the
    /// init): its rank, alpha and scaling must be the run's, its modules the run's targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<std::path::PathBuf>,
}

impl TrainConfig {
    /// The scaling rule of `beta`.
    ///
    /// # Errors
    /// A non-finite beta.
    pub fn scaling(&self) -> Result<Scaling, TrainError> {
        Ok(Scaling::from_beta(self.beta)?)
    }

    /// The hyper-parameters of every adapter of the run (each adapter's seed is derived
    /// from [`Self::seed`] and its module path when it is attached).
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            beta: self.beta,
            init: self.init,
            dropout: self.dropout,
            seed: None,
        }
    }

    /// Whether the held-out loss is recorded after `step` (0-based): after every
    /// `eval_every`-th step and after the last one (with `eval_every = 0`, at none: the
    /// final held-out loss is then measured after the loop and not recorded as a row), and
    /// after step 0 with `eval_at_start`.
    pub fn evaluates_after(&self, step: usize) -> bool {
        (self.eval_every > 0 && ((step + 1) % self.eval_every == 0 || step + 1 == self.steps))
            || (self.eval_at_start && step == 0)
    }

    /// Sequences per forward/backward pass.
    pub fn micro(&self) -> usize {
        if self.micro_batch == 0 {
            self.batch
        } else {
            self.micro_batch.min(self.batch)
        }
    }

    /// Checks every value of the run against its bound ([`crate::limits`]), before
    /// anything is loaded, allocated or written: the first value out of range, as its
    /// field (`batch`, `micro_batch`, ...), value and what is allowed.
    ///
    /// # Errors
    /// Rank outside 1..=65536; steps outside 1..=10^6; batch outside 1..=65536; a
    /// micro-batch above the batch or not dividing it; context outside 2..=131072; more
    /// than 2^20 tokens per pass; intervals above 10^6 steps; alpha outside (0, 1e6];
    /// |beta| > 4; a learning rate or clipping norm outside [1e-20, 1e30]; dropout outside
    /// [0, 1); a held-out fraction outside (0, 1); held-out max above 2^24; moment orders
    /// empty, repeated or outside 1..=8; target modules repeated, empty or more than 64; a
    /// seed above 2^53 - 1; weight decay outside [0, 1]. NaN and infinities everywhere.
    pub fn check(&self) -> Result<(), OutOfRange> {
        use crate::limits::{self as l, float, int};
        l::rank("rank", self.rank)?;
        l::steps("steps", self.steps)?;
        int(
            "batch",
            self.batch,
            1,
            l::MAX_BATCH,
            "sequences per step (larger is refused before memory is allocated)",
        )?;
        if self.micro_batch > self.batch {
            return Err(OutOfRange::new(
                "micro_batch",
                self.micro_batch,
                format!(
                    "at most the batch ({}): use a divisor of it, or 0 for the whole batch",
                    self.batch
                ),
            ));
        }
        if !self.batch.is_multiple_of(self.micro()) {
            return Err(OutOfRange::new(
                "micro_batch",
                self.micro_batch,
                format!(
                    "does not divide batch {}: use a divisor (gradients accumulate over batch / micro-batch passes)",
                    self.batch
                ),
            ));
        }
        int(
            "context",
            self.context,
            2,
            l::MAX_CONTEXT,
            "tokens per sequence (no supported model has more positions; attention memory grows with its square)",
        )?;
        if self.micro().saturating_mul(self.context) > l::MAX_TOKENS_PER_PASS {
            return Err(OutOfRange::new(
                "micro_batch",
                self.micro(),
                format!(
                    "{} sequences of {} tokens is {} tokens per pass, more than {} (the logits alone hold a vocabulary row per token): use a smaller --micro-batch or --context",
                    self.micro(),
                    self.context,
                    self.micro().saturating_mul(self.context),
                    l::MAX_TOKENS_PER_PASS
                ),
            ));
        }
        int(
            "probe_tokens",
            self.probe_tokens,
            0,
            l::MAX_TOKENS_PER_PASS,
            "tokens per pass the probes read from step 2 on (0: every token)",
        )?;
        for (field, v) in [
            ("probe_every", self.probe_every),
            ("eval_every", self.eval_every),
            ("norm_every", self.norm_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            l::every(field, v)?;
        }
        float(
            "alpha",
            self.alpha,
            (0.0, true),
            (l::MAX_ALPHA, false),
            "(the scaling numerator; the paper uses 16)",
        )?;
        float(
            "beta",
            self.beta,
            (-l::MAX_ABS_BETA, false),
            (l::MAX_ABS_BETA, false),
            "(alpha r^-beta must stay inside f32 for every rank up to 65536)",
        )?;
        float(
            "lr",
            self.lr,
            (l::MIN_LR, false),
            (l::MAX_LR, false),
            "(outside it the f32 update is zero or overflows)",
        )?;
        if let Some(c) = self.clip_grad_norm {
            float(
                "clip_grad_norm",
                c,
                (l::MIN_LR, false),
                (l::MAX_LR, false),
                "(a gradient norm in f32)",
            )?;
        }
        float(
            "weight_decay",
            self.weight_decay,
            (0.0, false),
            (l::MAX_WEIGHT_DECAY, false),
            "(AdamW's decoupled decay)",
        )?;
        float(
            "dropout",
            self.dropout,
            (0.0, false),
            (1.0, true),
            "(a probability; 1 would drop every input)",
        )?;
        float(
            "heldout_fraction",
            self.heldout_fraction,
            (0.0, true),
            (1.0, true),
            "(a fraction of the sequences; at least one is held out and one trained on)",
        )?;
        int(
            "heldout_max",
            self.heldout_max,
            0,
            l::MAX_HELDOUT,
            "held-out sequences (0: all of them)",
        )?;
        l::distinct(
            "moments",
            &self.moments,
            "each order is recorded once per probe",
        )?;
        if let Some(&m) = self.moments.iter().find(|&&m| m == 0 || m > l::MAX_MOMENT) {
            return Err(OutOfRange::new(
                "moments",
                m,
                format!(
                    "use orders 1..={} (sums of x^k overflow beyond)",
                    l::MAX_MOMENT
                ),
            ));
        }
        if !self.target_modules.is_empty() {
            l::distinct(
                "target_modules",
                &self.target_modules,
                "a module is adapted once",
            )?;
        }
        if self.target_modules.len() > l::MAX_TARGET_MODULES {
            return Err(OutOfRange::new(
                "target_modules",
                format!("({} names)", self.target_modules.len()),
                format!("at most {} module names", l::MAX_TARGET_MODULES),
            ));
        }
        if let Some(m) = self.target_modules.iter().find(|m| m.trim().is_empty()) {
            return Err(OutOfRange::new(
                "target_modules",
                format!("{m:?}"),
                "module names are non-empty (q_proj, down_proj, ...)",
            ));
        }
        l::seed("seed", self.seed)?;
        Ok(())
    }

    /// Checks values a run cannot use: the optimizer, then [`Self::check`] as
    /// `field value: allowed`.
    ///
    /// # Errors
    /// An optimizer the trainer does not implement; every error of [`Self::check`].
    pub fn validate(&self) -> Result<(), TrainError> {
        check_supported(self.optimizer)?;
        self.check()?;
        Ok(())
    }
}

/// The fields in which two configurations differ, as `field: old -> new` (in field order;
/// empty when they are equal).
pub fn differences(old: &TrainConfig, new: &TrainConfig) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return vec!["(unreadable configuration)".into()];
    };
    let mut out = Vec::new();
    for (k, v) in &b {
        let was = a.get(k).unwrap_or(&serde_json::Value::Null);
        if was != v {
            out.push(format!("{k}: {was} -> {v}"));
        }
    }
    for (k, v) in &a {
        if !b.contains_key(k) {
            out.push(format!("{k}: {v} -> (none)"));
        }
    }
    out
}

/// Token windows of `context + 1` tokens (inputs and shifted targets), shuffled by seed,
/// split into training and held-out sets.
///
/// # Errors
/// Too little text for one training and one held-out window.
pub fn windows(
    ids: &[i64],
    context: usize,
    heldout_fraction: f64,
    seed: u64,
) -> Result<(Vec<Vec<i64>>, Vec<Vec<i64>>), TrainError> {
    let w: Vec<Vec<i64>> = ids.chunks_exact(context + 1).map(<[i64]>::to_vec).collect();
    let n_held = heldout_count(w.len(), heldout_fraction);
    if w.len() < n_held + 1 {
        return Err(TrainError::Invalid(format!(
            "the text gives {} window(s) of {} tokens: need at least {} (shorter --context or more text)",
            w.len(),
            context + 1,
            n_held + 1
        )));
    }
    Ok(shuffle_split(w, n_held, seed))
}

/// What a resumable checkpoint holds besides its tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct CheckpointState {
    /// The configuration that wrote it (a resume must use the same).
    config: TrainConfig,
    /// The first step still to run; the data position follows from it (step s trains on
    /// sequences s * batch .. (s + 1) * batch of the shuffled training set, modulo its
    /// length), and dropout is seeded per step.
    next_step: usize,
    /// Optimizer steps taken.
    optimizer_steps: u64,
    /// Byte lengths of moments.csv and metrics.csv when it was written: rows after that
    /// are from steps that will run again.
    moments_len: u64,
    metrics_len: u64,
}

/// What a finished run measured.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Held-out loss at the end (NaN when the run diverged).
    pub heldout_loss: f64,
    /// Training loss of the last step.
    pub last_loss: f64,
    /// "diverged at step k" when the loss became non-finite.
    pub diverged: Option<String>,
    /// The step the run resumed from, when it continued a checkpoint.
    pub resumed_from: Option<usize>,
}

/// The run's two tables.
struct Tables {
    moments: TableWriter<MomentRow>,
    metrics: TableWriter<MetricRow>,
}

impl Tables {
    fn open(out: &Path) -> Result<Self, TrainError> {
        Ok(Self {
            moments: TableWriter::open(&out.join("moments.csv"))?,
            metrics: TableWriter::open(&out.join("metrics.csv"))?,
        })
    }
}

/// The columns every row of a run shares, and the rows made from them.
struct RowMaker<'a> {
    cfg: &'a TrainConfig,
    scaling: Scaling,
    width: u32,
}

impl RowMaker<'_> {
    fn metric(&self, step: usize, metric: Metric, value: f64) -> MetricRow {
        let cfg = self.cfg;
        MetricRow {
            source: "train".into(),
            model: cfg.model_name.clone(),
            rank: cfg.rank as u32,
            scaling: self.scaling,
            beta: cfg.beta,
            optimizer: cfg.optimizer,
            inputs: "text".into(),
            seed: cfg.seed,
            step: step as u32,
            metric,
            value,
        }
    }

    /// A moment row of the adapter at `path` without its site, statistic and value.
    fn moment(&self, step: usize, path: &str) -> MomentRow {
        let cfg = self.cfg;
        let (module, layer) = module_and_layer(path);
        MomentRow {
            source: "train".into(),
            model: cfg.model_name.clone(),
            module,
            layer,
            rank: cfg.rank as u32,
            alpha: cfg.alpha,
            scaling: self.scaling,
            beta: cfg.beta,
            optimizer: cfg.optimizer,
            inputs: "text".into(),
            dist: "text".into(),
            width: self.width,
            seed: cfg.seed,
            step: step as u32,
            ..Default::default()
        }
    }
}

/// The optimizer of every attached adapter's A and B, in the model's order.
fn optimizer(model: &mut CausalLm, cfg: &TrainConfig) -> Result<AdapterOptimizer, TrainError> {
    let params: Vec<Tensor> = inject::adapters(model)
        .into_iter()
        .flat_map(|(_, a)| [a.a.shallow_clone(), a.b.shallow_clone()])
        .collect();
    let adam = AdamwParams {
        weight_decay: cfg.weight_decay,
        ..AdamwParams::default()
    };
    AdapterOptimizer::new(cfg.optimizer, cfg.lr, adam, params)
}

/// Continues the checkpoint in `out`, if there is one (adapters, optimizer state, tables
/// cut back to its rows), or clears the tables; returns the step it resumes from.
fn resume(
    out: &Path,
    cfg: &TrainConfig,
    opt: &mut AdapterOptimizer,
    tables: &mut Tables,
    law: &mut Option<Law>,
) -> Result<Option<usize>, TrainError> {
    let Some((state, tensors)) = checkpoint::load::<CheckpointState>(out)? else {
        tables.moments.clear()?;
        tables.metrics.clear()?;
        return Ok(None);
    };
    if state.config != *cfg {
        return Err(TrainError::Invalid(format!(
            "{}: the checkpoint there was written by another configuration ({}); choose another --out",
            checkpoint::dir(out).display(),
            differences(&state.config, cfg).join(", ")
        )));
    }
    for (i, p) in opt.params().iter().enumerate() {
        let mut p = p.shallow_clone();
        checkpoint::restore(&tensors, "adapter tensor", &format!("p.{i}"), &mut p)?;
    }
    opt.load_state(&tensors, state.optimizer_steps)?;
    if let Some(law) = law {
        law.restore(&tensors);
    }
    tables.moments.truncate(state.moments_len)?;
    tables.metrics.truncate(state.metrics_len)?;
    Ok(Some(state.next_step))
}

/// Writes the checkpoint after `step` (adapters, optimizer state, table lengths).
fn save_checkpoint(
    out: &Path,
    cfg: &TrainConfig,
    step: usize,
    opt: &AdapterOptimizer,
    tables: &Tables,
    law: Option<&Law>,
) -> Result<(), TrainError> {
    let (mut tensors, optimizer_steps) = opt.state();
    // Step 0's gradient directions, for the law rows of step 1.
    if let (Some(law), 0) = (law, step) {
        tensors.extend(law.state());
    }
    for (i, p) in opt.params().iter().enumerate() {
        tensors.push((format!("p.{i}"), p.detach()));
    }
    let state = CheckpointState {
        config: cfg.clone(),
        next_step: step + 1,
        optimizer_steps,
        moments_len: tables.moments.len()?,
        metrics_len: tables.metrics.len()?,
    };
    checkpoint::save(out, &state, &tensors)
}

/// The training sequences of step `step` (the batch cycles through the training split).
fn step_sequences<'d>(data: &'d Dataset, cfg: &TrainConfig, step: usize) -> Vec<&'d Sequence> {
    let n_train = data.train.len();
    (0..cfg.batch)
        .map(|k| &data.train[(step * cfg.batch + k) % n_train])
        .collect()
}

/// The loss tokens of step `step`'s batch.
fn step_tokens(data: &Dataset, cfg: &TrainConfig, step: usize) -> usize {
    step_sequences(data, cfg, step)
        .iter()
        .map(|s| s.mask.iter().filter(|&&m| m).count())
        .sum()
}

/// The highest moment order the probes sum.
fn max_moment(cfg: &TrainConfig) -> u32 {
    cfg.moments.iter().copied().max().unwrap_or(4)
}

/// The forward and backward passes of step `step` over its micro-batches: the loss (its
/// gradients accumulated into the adapters; the passes stop at a non-finite loss) and,
/// when probing, the moment sums of every adapter at `fwd`, `grad_out` and `bwd`.
pub(crate) fn forward_backward(
    model: &mut CausalLm,
    data: &Dataset,
    cfg: &TrainConfig,
    step: usize,
    probing: bool,
    device: Device,
    mut law: Option<&mut Law>,
) -> (f64, Vec<[SiteSums; 3]>, StepTimes) {
    let max_m = max_moment(cfg);
    let mut times = StepTimes::default();
    let clock = std::time::Instant::now;
    let seqs = step_sequences(data, cfg, step);
    let total_tokens = step_tokens(data, cfg, step);
    let n_adapters = model
        .linears_mut()
        .iter()
        .filter(|(_, l)| l.adapter.is_some())
        .count();
    let mut sums: Vec<[SiteSums; 3]> = Vec::new();
    if probing {
        sums.resize_with(n_adapters, Default::default);
    }
    let mut lv = 0.0;
    for (k, chunk) in seqs.chunks(cfg.micro()).enumerate() {
        let t = clock();
        let (ids, mask) = collate(chunk, data.pad_id, device);
        // The rows the probes read: every real token at steps 0 and 1 (the exact law's
        // steps), else a sample of `probe_tokens` of them.
        let rows = if probing {
            let keep = if step <= 1 { 0 } else { cfg.probe_tokens };
            let seed = probe::sample_seed(cfg.seed, step, k);
            probe::probe_rows(&valid_rows(chunk), keep, seed, device)
        } else {
            None
        };
        times.data += t.elapsed().as_secs_f64();
        if probing {
            probe::prepare(model, rows.as_ref(), law.is_some() && step <= 1);
        }
        tch::manual_seed(
            (cfg.seed as i64)
                .wrapping_mul(1_000_003)
                .wrapping_add((step * 1000 + k) as i64),
        );
        let scale = 1.0 / total_tokens.max(1) as f64;
        let mut probes_s = 0.0;
        let mut read = |m: &mut CausalLm| {
            let t = clock();
            read_probes(m, &mut sums, max_m, step, law.as_deref_mut());
            probes_s += t.elapsed().as_secs_f64();
        };
        let t = clock();
        let (l, forward_s) = if cfg.activation_checkpointing || probing {
            // Block by block, so that the probes read each block's gradients as soon as
            // the backward pass has been through it.
            let seed = cfg.activation_checkpointing.then(|| {
                (cfg.seed as i64)
                    .wrapping_mul(7919)
                    .wrapping_add((step * 1000 + k) as i64 * 1000)
            });
            blockwise_backward(model, &ids, &mask, scale, seed, &mut read)
        } else {
            let loss = masked_loss_sum(model, &ids, &mask, true) * scale;
            let l = loss.double_value(&[]);
            let forward_s = t.elapsed().as_secs_f64();
            if l.is_finite() {
                loss.backward();
            }
            (l, forward_s)
        };
        times.forward += forward_s;
        times.probes += probes_s;
        times.backward += t.elapsed().as_secs_f64() - forward_s - probes_s;
        lv += l;
        if !l.is_finite() {
            break;
        }
    }
    (lv, sums, times)
}

/// Reads the probes the backward pass has been through (their output's gradient is
/// there) into `sums` (one entry per adapter, in the model's order): the moment sums of
/// the adapter's output, of the loss gradient there and of the gradient through the
/// adapter into its input, at the capture's rows only (the real tokens, or a sample of
/// them), each formed and read once by the fused moment pass, the passes of all the
/// adapters read here run together ([`SiteSums::of_many`]); at steps 0 and 1 the law's
/// inputs. Each capture is dropped once read. The adapters' factors must be those of the
/// forward pass (read before the optimizer's step).
fn read_probes(
    model: &mut CausalLm,
    sums: &mut [[SiteSums; 3]],
    max_m: u32,
    step: usize,
    mut law: Option<&mut Law>,
) {
    let adapted = model
        .linears_mut()
        .into_iter()
        .filter(|(_, l)| l.adapter.is_some());
    let mut read = Vec::new();
    let mut jobs = Vec::new();
    for (i, (_, lin)) in adapted.enumerate() {
        let (Some(slot), Some(ad)) = (lin.capture.as_ref(), lin.adapter.as_ref()) else {
            continue;
        };
        let ready = slot
            .borrow()
            .cap
            .as_ref()
            .is_some_and(|c| c.probe.grad().defined());
        let Some(cap) = ready.then(|| slot.borrow_mut().cap.take()).flatten() else {
            continue;
        };
        // The output's leaf holds the probed rows only.
        let v = cap.v();
        jobs.extend(cap.jobs(ad, &v));
        if let (Some(law), Some(x)) = (law.as_deref_mut(), &cap.input) {
            let x = rows_of(x, cap.rows.as_ref());
            match step {
                0 => law.record_step0(i, &x, &v),
                1 => law.record_step1(i, &x),
                _ => {}
            }
        }
        read.push(i);
    }
    let mut got = SiteSums::of_many(&jobs, max_m).into_iter();
    for i in read {
        for s in sums[i].iter_mut() {
            s.merge(&got.next().expect("three sums an adapter"));
        }
    }
}

/// The probe rows of a step (moments of every adapter at its three sites, its gradient
/// norms, and on `norms_now` steps the norm and stable rank of `gamma B A`) when probing,
/// and the sum of squares and count of the adapters' gradient norms (always).
pub(crate) fn adapter_rows(
    model: &mut CausalLm,
    moments: &[u32],
    base: impl Fn(&str) -> MomentRow,
    sums: &[[SiteSums; 3]],
    probing: bool,
    norms_now: bool,
) -> (Vec<MomentRow>, f64, usize) {
    let mut out = Vec::new();
    let mut grad_sq = 0.0;
    let mut n_params = 0usize;
    for (i, (path, ad)) in inject::adapters(model).into_iter().enumerate() {
        let (na, nb) = (fro(&ad.a.grad()), fro(&ad.b.grad()));
        grad_sq += na * na + nb * nb;
        n_params += 2;
        if !probing || i >= sums.len() {
            continue;
        }
        let base = base(&path);
        for (site, s) in [Site::Fwd, Site::GradOut, Site::Bwd]
            .into_iter()
            .zip(&sums[i])
        {
            for &m in moments {
                let k = m as usize - 1;
                for (stat, v) in [(Stat::Abs, &s.abs), (Stat::Raw, &s.raw)] {
                    out.push(MomentRow {
                        site,
                        stat,
                        m: Some(m),
                        value: v[k] / s.n,
                        ..base.clone()
                    });
                }
            }
        }
        let mut stats = vec![(Stat::GradNormA, na), (Stat::GradNormB, nb)];
        if norms_now {
            let (dn, sr) = delta_norm_and_stable_rank(&ad.b, &ad.a, ad.scaling);
            stats.extend([(Stat::DeltaNorm, dn), (Stat::StableRank, sr)]);
        }
        for (stat, value) in stats {
            out.push(MomentRow {
                site: Site::Param,
                stat,
                value,
                ..base.clone()
            });
        }
    }
    (out, grad_sq, n_params)
}

/// Adam's regime after the update that leads to `step`: per adapter, the share of A's and
/// of B's coordinates in the eps-dominated regime (`eps_share_a`, `eps_share_b`).
fn eps_share_rows(
    model: &mut CausalLm,
    rows: &RowMaker<'_>,
    step: usize,
    opt: &AdapterOptimizer,
) -> Vec<MomentRow> {
    let Some(shares) = opt.eps_shares() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // The optimizer's parameters are every adapter's A then B, in the model's order.
    for ((path, _), ab) in inject::adapters(model).into_iter().zip(shares.chunks(2)) {
        for (stat, value) in [(Stat::EpsShareA, ab[0]), (Stat::EpsShareB, ab[1])] {
            out.push(MomentRow {
                site: Site::Param,
                stat,
                value,
                ..rows.moment(step, &path)
            });
        }
    }
    out
}

/// The exact law's rows of step 1 ([`crate::law`]), one per adapter and moment order.
fn law_rows(
    model: &mut CausalLm,
    rows: &RowMaker<'_>,
    cfg: &TrainConfig,
    law: &Law,
) -> Vec<MomentRow> {
    let adapters: Vec<(String, i64, f64)> = inject::adapters(model)
        .into_iter()
        .map(|(path, ad)| (path, ad.a.size()[1], ad.scaling))
        .collect();
    let gamma = adapters.first().map_or(f64::NAN, |a| a.2);
    law.rows(
        cfg,
        gamma,
        |i| rows.moment(1, &adapters[i].0),
        |i| adapters[i].1,
    )
}

/// Checks that the PEFT adapter in `dir` can continue a run of `cfg` without loading it:
/// the same rank, alpha and scaling exponent, one rank and alpha for every module. The
/// first difference named as `field: adapter -> run`.
///
/// # Errors
/// An unreadable or unsupported adapter directory, or a difference.
pub fn check_init_adapter(cfg: &TrainConfig, dir: &Path) -> Result<PeftAdapterConfig, TrainError> {
    let pc = inject::check_peft(dir)?;
    let cfg_path = dir.join("adapter_config.json");
    let mut diff = Vec::new();
    if !(pc.rank_pattern.is_empty() && pc.alpha_pattern.is_empty()) {
        diff.push(
            "rank_pattern / alpha_pattern: per-module ranks or alphas -> one for every module"
                .to_string(),
        );
    }
    if pc.r != cfg.rank {
        diff.push(format!("rank: {} -> {}", pc.r, cfg.rank));
    }
    let alpha = pc.row_alpha(pc.lora_alpha);
    if (alpha - cfg.alpha).abs() > 1e-9 * cfg.alpha.abs().max(1.0) {
        diff.push(format!("alpha: {alpha} -> {}", cfg.alpha));
    }
    if (pc.beta() - cfg.beta).abs() > 1e-12 {
        diff.push(format!("beta (scaling): {} -> {}", pc.beta(), cfg.beta));
    }
    let want = rankstab_records::scaling_factor(cfg.alpha, cfg.beta, cfg.rank);
    if diff.is_empty() && (pc.scaling() - want).abs() > 1e-9 * want.abs().max(1.0) {
        diff.push(format!("scaling: {} -> {want}", pc.scaling()));
    }
    if !diff.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: the adapter differs from the run ({}): --init-adapter continues an adapter of the same rank, alpha and scaling",
            cfg_path.display(),
            diff.join(", ")
        )));
    }
    Ok(pc)
}

/// Copies A and B of the PEFT adapter in `dir` into the freshly attached adapters (the
/// run's variables), after [`check_init_adapter`]: the file must hold exactly the run's
/// adapted modules.
fn init_from_adapter(
    model: &mut CausalLm,
    cfg: &TrainConfig,
    dir: &Path,
) -> Result<(), TrainError> {
    check_init_adapter(cfg, dir)?;
    let file = dir.join("adapter_model.safetensors");
    let (_, tensors) = crate::lora::load_peft(dir)?;
    let mut by_path: std::collections::BTreeMap<String, (Tensor, Tensor)> =
        tensors.into_iter().map(|(p, a, b)| (p, (a, b))).collect();
    let attached: Vec<String> = inject::adapters(model)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    if let Some(p) = attached.iter().find(|p| !by_path.contains_key(*p)) {
        return Err(TrainError::Invalid(format!(
            "{}: has no lora_A / lora_B for {p}, which the run adapts (--target-modules)",
            file.display()
        )));
    }
    if let Some(p) = by_path.keys().find(|p| !attached.contains(p)) {
        return Err(TrainError::Invalid(format!(
            "{}: adapts {p}, which the run does not (--target-modules)",
            file.display()
        )));
    }
    for (path, lin) in model.linears_mut() {
        let (Some(ad), Some((a, b))) = (lin.adapter.as_mut(), by_path.remove(&path)) else {
            continue;
        };
        for (name, dst, src) in [("lora_A", &ad.a, a), ("lora_B", &ad.b, b)] {
            if dst.size() != src.size() {
                return Err(TrainError::Invalid(format!(
                    "{}: {path}.{name} has shape {:?}, the run's adapter {:?}",
                    file.display(),
                    src.size(),
                    dst.size()
                )));
            }
            tch::no_grad(|| {
                dst.shallow_clone()
                    .copy_(&src.to_kind(dst.kind()).to_device(dst.device()))
            });
        }
    }
    Ok(())
}

/// Saves the adapters in PEFT's format to `out/adapters`.
fn save_adapters(
    model: &mut CausalLm,
    cfg: &TrainConfig,
    paths: &[String],
    out: &Path,
) -> Result<(), TrainError> {
    let mut targets: Vec<String> = paths.iter().map(|p| module_and_layer(p).0).collect();
    targets.sort();
    targets.dedup();
    let pc = PeftAdapterConfig {
        target_modules: targets.into(),
        lora_dropout: cfg.dropout,
        base_model_name_or_path: Some(
            cfg.base_model
                .clone()
                .unwrap_or_else(|| cfg.model_name.clone()),
        ),
        init_lora_weights: match cfg.init {
            LoraInit::KaimingUniform => serde_json::Value::Bool(true),
            LoraInit::Gaussian => serde_json::Value::String("gaussian".into()),
        },
        ..PeftAdapterConfig::for_scaling(cfg.rank, cfg.alpha, cfg.beta)
    };
    save_peft(&out.join("adapters"), &pc, &inject::adapters(model))
}

/// Trains the attached adapters and writes rows to `out` (moments.csv, metrics.csv) and
/// the PEFT adapter to `out/adapters`.
///
/// With `checkpoint_every > 0` it writes `out/checkpoint/` (adapters, optimizer state, the
/// next step and the table lengths) every k steps; called again on the same `out` with
/// the same configuration it resumes there, cutting rows written after the checkpoint, and
/// ends with the numbers of an uninterrupted run. Without a checkpoint it starts over.
///
/// # Errors
/// I/O, libtorch errors, too little data, a checkpoint written by another configuration.
pub fn train(
    model: &mut CausalLm,
    vs: &nn::VarStore,
    data: &Dataset,
    cfg: &TrainConfig,
    out: &Path,
    mut progress: impl FnMut(&StepProgress<'_>),
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    if data.train.is_empty() || data.heldout.is_empty() {
        return Err(TrainError::Invalid(
            "the dataset needs at least one training and one held-out sequence".into(),
        ));
    }
    // Each step reuses the pages the step before freed (see `KeepFreedPages`).
    let _pages = crate::memory::KeepFreedPages::new();
    let device = vs.device();
    let paths = inject::attach(model, vs, &cfg.lora(), &cfg.target_modules, cfg.seed)?;
    if let Some(dir) = &cfg.init_adapter {
        init_from_adapter(model, cfg, dir)?;
    }
    let mut opt = optimizer(model, cfg)?;
    let mut tables = Tables::open(out)?;
    let mut law = Law::new(cfg);
    let resumed_from = resume(out, cfg, &mut opt, &mut tables, &mut law)?;
    let rows = RowMaker {
        cfg,
        scaling: cfg.scaling()?,
        // The model's hidden size, whichever module the row is about.
        width: model.hidden_size() as u32,
    };
    // ||gamma B A|| and its stable rank (QR of B and A^T, costly at high rank) at
    // intervals: every `norm_every` steps (default: with the held-out evaluation) and
    // at the last step.
    let norm_every = if cfg.norm_every > 0 {
        cfg.norm_every
    } else {
        cfg.eval_every
    };
    let mut last_loss = f64::NAN;
    let mut final_heldout = None;
    let t0 = std::time::Instant::now();
    for step in resumed_from.unwrap_or(0)..cfg.steps {
        let t_step = std::time::Instant::now();
        let probing = cfg.probe_every > 0 && step % cfg.probe_every == 0;
        probe::capture(model, probing);
        opt.zero_grad();
        let (lv, sums, mut times) =
            forward_backward(model, data, cfg, step, probing, device, law.as_mut());
        let clock = std::time::Instant::now;
        if !lv.is_finite() {
            tables
                .metrics
                .append(&[rows.metric(step, Metric::Diverged, 1.0)])?;
            checkpoint::remove(out);
            return Ok(TrainOutcome {
                heldout_loss: f64::NAN,
                last_loss: lv,
                diverged: Some(format!("diverged at step {step}")),
                resumed_from,
            });
        }
        let norms_now = step + 1 == cfg.steps || (norm_every > 0 && step % norm_every == 0);
        let t = clock();
        let (mut mrows, grad_sq, n_params) = adapter_rows(
            model,
            &cfg.moments,
            |p| rows.moment(step, p),
            &sums,
            probing,
            norms_now,
        );
        if let (Some(l), 1) = (&law, step) {
            mrows.extend(law_rows(model, &rows, cfg, l));
            // Its rows are written: free step 0's directions and step 1's inputs (a few
            // hundred MB on a real model) before the steps that follow.
            law = None;
            crate::memory::release_free_heap();
        }
        times.probes += t.elapsed().as_secs_f64();
        let t = clock();
        // The global gradient norm over every A and B: the sum of the squares just taken.
        let grad_norm = grad_sq.sqrt();
        if let Some(c) = cfg.clip_grad_norm {
            opt.clip_grad_norm(c);
        }
        opt.step();
        times.optimizer += t.elapsed().as_secs_f64();
        let t = clock();
        if probing {
            mrows.extend(eps_share_rows(model, &rows, step + 1, &opt));
        }
        times.probes += t.elapsed().as_secs_f64();
        last_loss = lv;
        let mut metrics = vec![
            rows.metric(step, Metric::Loss, lv),
            rows.metric(step, Metric::Perplexity, lv.exp()),
            rows.metric(
                step,
                Metric::GradNormAvg,
                (grad_sq / n_params.max(1) as f64).sqrt(),
            ),
            rows.metric(step, Metric::GradNorm, grad_norm),
            rows.metric(step, Metric::Lr, cfg.lr),
            rows.metric(step, Metric::Seconds, t0.elapsed().as_secs_f64()),
        ];
        let mut heldout = None;
        let t = clock();
        if cfg.evaluates_after(step) {
            let h = loss::heldout_loss(model, data, cfg.heldout_max, cfg.micro(), device);
            metrics.push(rows.metric(step, Metric::HeldoutLoss, h));
            metrics.push(rows.metric(step, Metric::HeldoutPerplexity, h.exp()));
            if step + 1 == cfg.steps {
                final_heldout = Some(h);
            }
            heldout = Some(h);
        }
        times.evaluation += t.elapsed().as_secs_f64();
        let t = clock();
        tables.moments.append(&mrows)?;
        tables.metrics.append(&metrics)?;
        // A stop request (a scheduler's SIGTERM): checkpoint here and return, unless this
        // was the last step (then the run finishes normally).
        let stopping = crate::stop::requested() && step + 1 < cfg.steps;
        let periodic = cfg.checkpoint_every > 0
            && (step + 1) % cfg.checkpoint_every == 0
            && step + 1 < cfg.steps;
        if periodic || stopping {
            save_checkpoint(out, cfg, step, &opt, &tables, law.as_ref())?;
        }
        times.records += t.elapsed().as_secs_f64();
        progress(&StepProgress {
            step,
            steps: cfg.steps,
            loss: lv,
            tokens: step_tokens(data, cfg, step),
            seconds: t_step.elapsed().as_secs_f64(),
            heldout,
            metrics: &metrics,
            moments: &mrows,
            times,
        });
        if stopping {
            probe::capture(model, false);
            return Err(TrainError::Stopped {
                step,
                dir: out.to_path_buf(),
            });
        }
    }
    probe::capture(model, false);
    // The last step's evaluation already measured the final adapters.
    let heldout_loss = match final_heldout {
        Some(h) => h,
        None => loss::heldout_loss(model, data, cfg.heldout_max, cfg.micro(), device),
    };
    save_adapters(model, cfg, &paths, out)?;
    checkpoint::remove(out);
    Ok(TrainOutcome {
        heldout_loss,
        last_loss,
        diverged: None,
        resumed_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        TrainConfig {
            model_name: "m".into(),
            rank: 4,
            alpha: 16.0,
            beta: 0.5,
            init: LoraInit::KaimingUniform,
            dropout: 0.0,
            optimizer: Optimizer::Adamw,
            lr: 5e-5,
            steps: 10,
            batch: 4,
            micro_batch: 0,
            context: 32,
            probe_every: 1,
            probe_tokens: 0,
            eval_every: 10,
            eval_at_start: false,
            norm_every: 0,
            heldout_fraction: 0.1,
            heldout_max: 0,
            target_modules: vec![],
            moments: vec![1, 2, 3, 4],
            seed: 0,
            clip_grad_norm: None,
            weight_decay: 0.0,
            checkpoint_every: 0,
            activation_checkpointing: false,
            base_model: None,
            init_adapter: None,
        }
    }

    /// Every bound: the value just inside is accepted, the one just outside (and NaN, and
    /// 2^32 + 1) refused naming the field.
    #[test]
    fn every_field_is_bounded_and_named() {
        cfg().validate().expect("the base configuration");
        type Edit = fn(&mut TrainConfig);
        let ok: Vec<(&str, Edit)> = vec![
            ("rank", |c| c.rank = 65_536),
            ("steps", |c| c.steps = 1_000_000),
            ("batch", |c| {
                c.batch = 65_536;
                c.micro_batch = 8;
            }),
            ("context", |c| {
                c.context = 131_072;
                c.batch = 8;
            }),
            ("alpha", |c| c.alpha = 1e6),
            ("beta", |c| c.beta = -4.0),
            ("lr", |c| c.lr = 1e30),
            ("lr", |c| c.lr = 1e-20),
            ("dropout", |c| c.dropout = 0.999),
            ("heldout_fraction", |c| c.heldout_fraction = 0.999),
            ("heldout_max", |c| c.heldout_max = 1 << 24),
            ("moments", |c| c.moments = vec![8, 1]),
            ("seed", |c| c.seed = (1 << 53) - 1),
            ("checkpoint_every", |c| c.checkpoint_every = 1_000_000),
        ];
        for (field, edit) in ok {
            let mut c = cfg();
            edit(&mut c);
            c.validate().unwrap_or_else(|e| panic!("{field}: {e}"));
        }
        let refused: Vec<(&str, Edit)> = vec![
            ("rank", |c| c.rank = 0),
            ("rank", |c| c.rank = 65_537),
            ("steps", |c| c.steps = 0),
            ("steps", |c| c.steps = 4_294_967_297),
            ("batch", |c| c.batch = 0),
            ("batch", |c| c.batch = 4_294_967_297),
            ("micro_batch", |c| c.micro_batch = 5),
            ("micro_batch", |c| c.micro_batch = 3),
            ("micro_batch", |c| {
                c.batch = 64;
                c.context = 32_768;
            }),
            ("context", |c| c.context = 1),
            ("context", |c| c.context = 131_073),
            ("context", |c| c.context = usize::MAX),
            ("alpha", |c| c.alpha = 0.0),
            ("alpha", |c| c.alpha = f64::NAN),
            ("alpha", |c| c.alpha = 1.1e6),
            ("beta", |c| c.beta = 4.5),
            ("beta", |c| c.beta = f64::INFINITY),
            ("lr", |c| c.lr = 0.0),
            ("lr", |c| c.lr = f64::NAN),
            ("lr", |c| c.lr = 2e30),
            ("clip_grad_norm", |c| c.clip_grad_norm = Some(0.0)),
            ("clip_grad_norm", |c| c.clip_grad_norm = Some(f64::INFINITY)),
            ("weight_decay", |c| c.weight_decay = -0.1),
            ("dropout", |c| c.dropout = 1.0),
            ("dropout", |c| c.dropout = f64::NAN),
            ("heldout_fraction", |c| c.heldout_fraction = 0.0),
            ("heldout_fraction", |c| c.heldout_fraction = 1.0),
            ("heldout_max", |c| c.heldout_max = 4_294_967_297),
            ("probe_every", |c| c.probe_every = 4_294_967_297),
            ("eval_every", |c| c.eval_every = 1_000_001),
            ("norm_every", |c| c.norm_every = 1_000_001),
            ("checkpoint_every", |c| c.checkpoint_every = 1_000_001),
            ("moments", |c| c.moments = vec![]),
            ("moments", |c| c.moments = vec![2, 2]),
            ("moments", |c| c.moments = vec![0]),
            ("moments", |c| c.moments = vec![9]),
            ("target_modules", |c| {
                c.target_modules = vec!["q_proj".into(), "q_proj".into()]
            }),
            ("target_modules", |c| c.target_modules = vec![String::new()]),
            ("seed", |c| c.seed = 1 << 53),
        ];
        for (field, edit) in refused {
            let mut c = cfg();
            edit(&mut c);
            let e = c.check().expect_err(field);
            assert_eq!(e.field, field, "{e}");
            let msg = c.validate().expect_err(field).to_string();
            assert!(msg.starts_with(field) && !msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn step_times_add_up_and_average_phase_by_phase() {
        let a = StepTimes {
            data: 1.0,
            forward: 2.0,
            backward: 3.0,
            probes: 4.0,
            optimizer: 5.0,
            evaluation: 6.0,
            records: 7.0,
        };
        assert_eq!(a.total(), 28.0);
        let b = StepTimes {
            forward: 4.0,
            ..Default::default()
        };
        let m = StepTimes::mean(&[a, b]);
        assert_eq!((m.data, m.forward, m.records), (0.5, 3.0, 3.5));
        assert_eq!(StepTimes::mean(&[]), StepTimes::default());
    }

    /// The exact first-step law assumes the init (B = 0): a run continuing an adapter has no
    /// law rows.
    #[test]
    fn the_law_does_not_apply_to_a_continued_adapter() {
        let mut c = cfg();
        assert!(Law::new(&c).is_some());
        c.init_adapter = Some("adapters".into());
        assert!(Law::new(&c).is_none());
    }

    #[test]
    fn differences_name_each_changed_field() {
        let a = cfg();
        assert!(differences(&a, &a).is_empty());
        let mut b = cfg();
        b.rank = 8;
        b.lr = 1e-3;
        let d = differences(&a, &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.contains(&"rank: 4 -> 8".to_string()), "{d:?}");
        assert!(d.iter().any(|x| x.starts_with("lr: ")), "{d:?}");
    }
}
