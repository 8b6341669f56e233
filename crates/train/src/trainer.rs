//! Instrumented LoRA / rsLoRA fine-tuning on a token stream.
//!
//! Adapters go on every linear attention and MLP module (or the named ones); the base
//! weights stay frozen. Every `probe_every` steps, for every adapter, the probes record the
//! same statistics as the theory checker: moments of the adapter output (`fwd`), of the
//! loss gradient at that output (`grad_out`), of the gradient into the adapter's input
//! through the adapter, `(gamma B A)^T v` (`bwd`), and the norms of the gradients of A and
//! B, of `gamma B A` and its stable rank (`param`). Rows go to the run directory's
//! `moments.csv` (source = train) and `metrics.csv`.
use crate::data::{collate, heldout_count, shuffle_split, Dataset, Sequence};
use crate::lora::{check_rank, save_peft, LoraAdapter, LoraConfig, LoraInit, PeftAdapterConfig};
use crate::optim::{check_supported, AdamwParams, AdapterOptimizer};
use crate::probe::{delta_norm_and_stable_rank, fro, moments};
use crate::{CausalLm, TrainError};
use rankstab_records::{Metric, MetricRow, MomentRow, Optimizer, Scaling, Site, Stat, TableWriter};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn;
use tch::{Device, Kind, Tensor};

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
    /// Held-out perplexity every k steps (and at the end).
    pub eval_every: usize,
    /// Norm and stable rank of gamma B A every k steps (and at the last step) on probed
    /// steps; 0: with the held-out evaluation (`eval_every`).
    #[serde(default)]
    pub norm_every: usize,
    /// Fraction of sequences held out.
    pub heldout_fraction: f64,
    /// Evaluate held-out perplexity on at most this many held-out sequences (0: all).
    #[serde(default)]
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
}

impl TrainConfig {
    /// The scaling rule of `beta`.
    ///
    /// # Errors
    /// A non-finite beta.
    pub fn scaling(&self) -> Result<Scaling, TrainError> {
        Scaling::from_beta(self.beta).map_err(|e| TrainError::Invalid(e.to_string()))
    }

    /// Sequences per forward/backward pass.
    pub fn micro(&self) -> usize {
        if self.micro_batch == 0 {
            self.batch
        } else {
            self.micro_batch.min(self.batch)
        }
    }

    /// Checks values a run cannot use.
    ///
    /// # Errors
    /// Rank 0, steps 0, batch 0, a batch that micro-batches do not divide, context < 2,
    /// a non-finite or non-positive learning rate or alpha, moment orders outside 1..=8,
    /// a clipping norm that is not finite and positive.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        check_supported(self.optimizer)?;
        if self.rank == 0 {
            return bad("rank 0 is not allowed: ranks are integers >= 1".into());
        }
        if self.steps == 0 || self.batch == 0 || self.context < 2 {
            return bad(format!(
                "steps {} / batch {} / context {}: use steps >= 1, batch >= 1, context >= 2",
                self.steps, self.batch, self.context
            ));
        }
        if self.batch % self.micro() != 0 {
            return bad(format!(
                "micro-batch {} does not divide batch {}: use a divisor",
                self.micro(),
                self.batch
            ));
        }
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return bad(format!(
                "lr {} is not allowed: use a finite number > 0",
                self.lr
            ));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 || !self.beta.is_finite() {
            return bad(format!(
                "alpha {} / beta {}: use a finite alpha > 0 and a finite beta",
                self.alpha, self.beta
            ));
        }
        if let Some(m) = self.moments.iter().find(|&&m| m == 0 || m > 8) {
            return bad(format!("moment order {m} is not allowed: use 1..=8"));
        }
        if let Some(c) = self.clip_grad_norm {
            if !c.is_finite() || c <= 0.0 {
                return bad(format!(
                    "clip-grad-norm {c} is not allowed: use a finite number > 0"
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) || !(0.0..1.0).contains(&self.heldout_fraction) {
            return bad(format!(
                "dropout {} / held-out fraction {}: use values in [0, 1)",
                self.dropout, self.heldout_fraction
            ));
        }
        Ok(())
    }
}

/// Module name (last path part) and layer index of a Hugging Face module path.
///
/// ```
/// assert_eq!(rankstab_train::trainer::module_and_layer("model.layers.3.self_attn.q_proj"), ("q_proj".to_string(), 3));
/// assert_eq!(rankstab_train::trainer::module_and_layer("transformer.h.11.mlp.fc_in"), ("fc_in".to_string(), 11));
/// ```
pub fn module_and_layer(path: &str) -> (String, u32) {
    let parts: Vec<&str> = path.split('.').collect();
    let layer = parts
        .iter()
        .find_map(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    (parts.last().copied().unwrap_or_default().to_string(), layer)
}

/// The seed of one adapter's A: FNV-1a of the module path, mixed with the run's seed.
fn adapter_seed(seed: u64, path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in path.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The module paths `cfg` adapts, checked without creating any adapter: every named
/// target module exists, and the rank fits every targeted layer.
///
/// # Errors
/// Unknown target module names (the available ones listed), a rank that does not fit
/// (the layer named).
pub fn targets(model: &mut CausalLm, cfg: &TrainConfig) -> Result<Vec<String>, TrainError> {
    let mut available: Vec<String> = model
        .linears_mut()
        .into_iter()
        .map(|(p, _)| module_and_layer(&p).0)
        .collect();
    available.sort();
    available.dedup();
    for t in &cfg.target_modules {
        if !available.contains(t) {
            return Err(TrainError::Invalid(format!(
                "target module {t:?} does not exist in this model (available: {})",
                available.join(", ")
            )));
        }
    }
    let mut paths = Vec::new();
    for (path, lin) in model.linears_mut() {
        let (module, _) = module_and_layer(&path);
        if !cfg.target_modules.is_empty() && !cfg.target_modules.contains(&module) {
            continue;
        }
        let (out, inp) = lin.dims();
        check_rank(cfg.rank, inp, out).map_err(|e| TrainError::Invalid(format!("{path}: {e}")))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Attaches adapters to the model's linears; returns the adapted module paths.
///
/// # Errors
/// Unknown target module names (the available ones listed), a rank that does not fit.
pub fn attach(
    model: &mut CausalLm,
    vs: &nn::VarStore,
    cfg: &TrainConfig,
) -> Result<Vec<String>, TrainError> {
    let lora = LoraConfig {
        rank: cfg.rank,
        alpha: cfg.alpha,
        beta: cfg.beta,
        init: cfg.init,
        dropout: cfg.dropout,
        seed: None,
    };
    let paths = targets(model, cfg)?;
    for (_, lin) in model.linears_mut() {
        lin.adapter = None;
        lin.capture = None;
    }
    for (path, lin) in model.linears_mut() {
        if !paths.contains(&path) {
            continue;
        }
        let vpath = path.split('.').fold(vs.root(), |p, part| p / part);
        let (out, inp) = lin.dims();
        // A's draw depends on the run's seed and the module's path only.
        let lora = LoraConfig {
            seed: Some(adapter_seed(cfg.seed, &path)),
            ..lora.clone()
        };
        let ad = LoraAdapter::new(&vpath, inp, out, &lora)
            .map_err(|e| TrainError::Invalid(format!("{path}: {e}")))?;
        lin.adapter = Some(ad);
        lin.capture = Some(RefCell::new(None));
    }
    Ok(paths)
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

/// Sum of the next-token losses at the masked positions, from logits (B, T, V), targets
/// (B, T) and mask (B, T).
fn nll_sum(logits: &Tensor, tgt: &Tensor, mask: &Tensor) -> Tensor {
    let v = logits.size()[2];
    let nll = logits
        .to_kind(Kind::Float)
        .reshape([-1, v])
        .log_softmax(-1, Kind::Float)
        .gather(1, &tgt.reshape([-1, 1]), false)
        .neg()
        .reshape([-1]);
    (nll * mask.reshape([-1])).sum(Kind::Float)
}

/// Sum of the next-token losses at the masked positions of `ids` (B, T+1) (a sum, so that
/// micro-batches add up).
fn masked_loss_sum(model: &CausalLm, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
    let t = ids.size()[1];
    let logits = model.forward(&ids.narrow(1, 0, t - 1), train);
    nll_sum(&logits, &ids.narrow(1, 1, t - 1), mask)
}

/// Forward and backward of `scale * masked_loss_sum` with activation checkpointing: the
/// forward pass keeps only each block's input; the backward pass recomputes one block at
/// a time and back-propagates through it with the surrogate `sum(y * dL/dy)`, which
/// accumulates the same gradients into the adapters (and the probes) as one backward
/// through the whole graph. Dropout is seeded per block so the recomputation draws the
/// same masks. Returns the loss (nothing is back-propagated when it is not finite).
fn checkpointed_backward(
    model: &CausalLm,
    ids: &Tensor,
    mask: &Tensor,
    scale: f64,
    seed: i64,
) -> f64 {
    let t = ids.size()[1];
    let n = model.num_layers();
    let mut hs = Vec::with_capacity(n + 1);
    hs.push(tch::no_grad(|| model.embed(&ids.narrow(1, 0, t - 1))));
    for i in 0..n {
        tch::manual_seed(seed.wrapping_add(i as i64));
        let y = tch::no_grad(|| model.block(i, &hs[i], true));
        hs.push(y);
    }
    let top = hs[n].detach().set_requires_grad(true);
    let loss = nll_sum(&model.head(&top, true), &ids.narrow(1, 1, t - 1), mask) * scale;
    let l = loss.double_value(&[]);
    if !l.is_finite() {
        return l;
    }
    loss.backward();
    let mut g = top.grad();
    drop(loss);
    for i in (0..n).rev() {
        let x = hs[i].detach().set_requires_grad(i > 0);
        tch::manual_seed(seed.wrapping_add(i as i64));
        let y = model.block(i, &x, true);
        (y * &g).sum(Kind::Float).backward();
        if i > 0 {
            g = x.grad();
        }
        hs.truncate(i + 1);
    }
    l
}

/// Rows (b * T + t) of the flattened (B * T, features) activations that are real tokens
/// (not padding), or `None` when every position is real.
fn valid_rows(seqs: &[&Sequence], device: Device) -> Option<Tensor> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1) - 1;
    if seqs.iter().all(|s| s.ids.len() - 1 == t) {
        return None;
    }
    let idx: Vec<i64> = seqs
        .iter()
        .enumerate()
        .flat_map(|(b, s)| (0..s.ids.len() - 1).map(move |i| (b * t + i) as i64))
        .collect();
    Some(Tensor::from_slice(&idx).to_device(device))
}

fn rows_of(t: &Tensor, valid: Option<&Tensor>) -> Tensor {
    let f = t.size().last().copied().unwrap_or(1);
    let flat = t.reshape([-1, f]);
    match valid {
        Some(idx) => flat.index_select(0, idx),
        None => flat,
    }
}

/// Moment sums of one adapter over the micro-batches of a step: for each site, element
/// count and count-weighted absolute and raw moments.
#[derive(Default)]
struct SiteSums {
    n: f64,
    abs: Vec<f64>,
    raw: Vec<f64>,
}

impl SiteSums {
    fn add(&mut self, t: &Tensor, max_m: u32) {
        let n = t.numel() as f64;
        if n == 0.0 {
            return;
        }
        let (a, r) = moments(t, max_m);
        if self.abs.is_empty() {
            self.abs = vec![0.0; a.len()];
            self.raw = vec![0.0; r.len()];
        }
        for (s, v) in self.abs.iter_mut().zip(&a) {
            *s += n * v;
        }
        for (s, v) in self.raw.iter_mut().zip(&r) {
            *s += n * v;
        }
        self.n += n;
    }
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

const CHECKPOINT: &str = "checkpoint";

/// A loaded checkpoint: its state and its tensors by name.
type Checkpoint = (CheckpointState, HashMap<String, Tensor>);

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join(CHECKPOINT)
}

/// Writes the checkpoint atomically: into `checkpoint.tmp/`, then renamed over the old one
/// (kept as `checkpoint.old/` for the instant between the two renames).
fn save_checkpoint(
    out: &Path,
    state: &CheckpointState,
    tensors: &[(String, Tensor)],
) -> Result<(), TrainError> {
    let dir = checkpoint_dir(out);
    let tmp = out.join("checkpoint.tmp");
    let old = out.join("checkpoint.old");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Tensor::write_safetensors(tensors, tmp.join("tensors.safetensors")).map_err(|source| {
        TrainError::Torch {
            context: format!("writing {}", tmp.display()),
            source,
        }
    })?;
    rankstab_records::write_json_atomic(&tmp.join("state.json"), state)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(&dir, &old).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&tmp))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

fn load_checkpoint(out: &Path) -> Result<Option<Checkpoint>, TrainError> {
    let mut dir = checkpoint_dir(out);
    if !dir.join("state.json").exists() {
        // Killed between the two renames of save_checkpoint.
        dir = out.join("checkpoint.old");
        if !dir.join("state.json").exists() {
            return Ok(None);
        }
    }
    let state: CheckpointState = rankstab_records::read_json(&dir.join("state.json"))
        .map_err(|e| TrainError::Invalid(format!("checkpoint: {e}")))?;
    let path = dir.join("tensors.safetensors");
    let tensors = Tensor::read_safetensors(&path)
        .map_err(|source| TrainError::Torch {
            context: format!("reading {}", path.display()),
            source,
        })?
        .into_iter()
        .collect();
    Ok(Some((state, tensors)))
}

fn remove_checkpoints(out: &Path) {
    for d in [CHECKPOINT, "checkpoint.tmp", "checkpoint.old"] {
        let _ = std::fs::remove_dir_all(out.join(d));
    }
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

fn set_capture(model: &mut CausalLm, on: bool) {
    for (_, lin) in model.linears_mut() {
        if lin.adapter.is_some() {
            lin.capture = on.then(|| RefCell::new(None));
        }
    }
}

/// Mean held-out loss per loss token, over the first `max` held-out sequences (0: all).
fn heldout_loss(
    model: &mut CausalLm,
    data: &Dataset,
    max: usize,
    micro: usize,
    device: Device,
) -> f64 {
    set_capture(model, false);
    let (mut s, mut n) = (0.0, 0.0);
    let held = if max == 0 {
        &data.heldout[..]
    } else {
        &data.heldout[..max.min(data.heldout.len())]
    };
    tch::no_grad(|| {
        for chunk in held.chunks(micro.max(1)) {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            let (ids, mask) = collate(&refs, data.pad_id, device);
            s += masked_loss_sum(model, &ids, &mask, false).double_value(&[]);
            n += mask.sum(Kind::Float).double_value(&[]);
        }
    });
    s / n.max(1.0)
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
#[allow(clippy::too_many_lines)]
pub fn train(
    model: &mut CausalLm,
    vs: &nn::VarStore,
    data: &Dataset,
    cfg: &TrainConfig,
    out: &Path,
    mut progress: impl FnMut(usize, f64),
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    if data.train.is_empty() || data.heldout.is_empty() {
        return Err(TrainError::Invalid(
            "the dataset needs at least one training and one held-out sequence".into(),
        ));
    }
    let device = vs.device();
    let paths = attach(model, vs, cfg)?;
    let params: Vec<Tensor> = model
        .linears_mut()
        .into_iter()
        .filter_map(|(_, l)| {
            l.adapter
                .as_ref()
                .map(|a| [a.a.shallow_clone(), a.b.shallow_clone()])
        })
        .flatten()
        .collect();
    let adam = AdamwParams {
        weight_decay: cfg.weight_decay,
        ..AdamwParams::default()
    };
    let mut opt = AdapterOptimizer::new(cfg.optimizer, cfg.lr, adam, params)?;
    let rec = |e: rankstab_records::RecordsError| TrainError::Invalid(e.to_string());
    let mut mw = TableWriter::<MomentRow>::open(&out.join("moments.csv")).map_err(rec)?;
    let mut tw = TableWriter::<MetricRow>::open(&out.join("metrics.csv")).map_err(rec)?;
    let mut start = 0;
    let mut resumed_from = None;
    match load_checkpoint(out)? {
        Some((state, tensors)) => {
            if state.config != *cfg {
                return Err(TrainError::Invalid(format!(
                    "{}: the checkpoint there was written by another configuration; use a new output directory",
                    checkpoint_dir(out).display()
                )));
            }
            for (i, p) in opt.params().iter().enumerate() {
                let name = format!("p.{i}");
                let src = tensors.get(&name).ok_or_else(|| {
                    TrainError::Invalid(format!("checkpoint: adapter tensor {name} is missing"))
                })?;
                if src.size() != p.size() {
                    return Err(TrainError::Invalid(format!(
                        "checkpoint: adapter tensor {name} has shape {:?}, expected {:?}",
                        src.size(),
                        p.size()
                    )));
                }
                let mut p = p.shallow_clone();
                tch::no_grad(|| p.copy_(src));
            }
            opt.load_state(&tensors, state.optimizer_steps)?;
            mw.truncate(state.moments_len).map_err(rec)?;
            tw.truncate(state.metrics_len).map_err(rec)?;
            start = state.next_step;
            resumed_from = Some(start);
        }
        None => {
            mw.clear().map_err(rec)?;
            tw.clear().map_err(rec)?;
        }
    }
    let width = match model {
        CausalLm::Llama(m) => m.config.hidden_size,
        CausalLm::Gptj(m) => m.config.n_embd,
    } as u32;
    let scaling = cfg.scaling()?;
    let metric = |step: usize, metric: Metric, value: f64| MetricRow {
        source: "train".into(),
        model: cfg.model_name.clone(),
        rank: cfg.rank as u32,
        scaling,
        beta: cfg.beta,
        optimizer: cfg.optimizer,
        inputs: "text".into(),
        seed: cfg.seed,
        step: step as u32,
        metric,
        value,
    };
    let max_m = cfg.moments.iter().copied().max().unwrap_or(4);
    let micro = cfg.micro();
    let mut last_loss = f64::NAN;
    let mut final_heldout = None;
    let t0 = std::time::Instant::now();
    let n_train = data.train.len();
    for step in start..cfg.steps {
        let seqs: Vec<&Sequence> = (0..cfg.batch)
            .map(|k| &data.train[(step * cfg.batch + k) % n_train])
            .collect();
        let total_tokens: usize = seqs
            .iter()
            .map(|s| s.mask.iter().filter(|&&m| m).count())
            .sum();
        let probing = cfg.probe_every > 0 && step % cfg.probe_every == 0;
        set_capture(model, probing);
        opt.zero_grad();
        let mut sums: Vec<[SiteSums; 3]> = Vec::new();
        let mut lv = 0.0;
        for (k, chunk) in seqs.chunks(micro).enumerate() {
            let (ids, mask) = collate(chunk, data.pad_id, device);
            tch::manual_seed(
                (cfg.seed as i64)
                    .wrapping_mul(1_000_003)
                    .wrapping_add((step * 1000 + k) as i64),
            );
            let scale = 1.0 / total_tokens.max(1) as f64;
            let l = if cfg.activation_checkpointing {
                let seed = (cfg.seed as i64)
                    .wrapping_mul(7919)
                    .wrapping_add((step * 1000 + k) as i64 * 1000);
                checkpointed_backward(model, &ids, &mask, scale, seed)
            } else {
                let loss = masked_loss_sum(model, &ids, &mask, true) * scale;
                let l = loss.double_value(&[]);
                if l.is_finite() {
                    loss.backward();
                }
                l
            };
            lv += l;
            if !l.is_finite() {
                break;
            }
            if !probing {
                continue;
            }
            let valid = valid_rows(chunk, device);
            let mut i = 0;
            for (_, lin) in model.linears_mut() {
                if lin.adapter.is_none() {
                    continue;
                }
                let cap = lin.capture.as_ref().and_then(|c| c.borrow_mut().take());
                let Some(cap) = cap else { continue };
                if sums.len() <= i {
                    sums.push(Default::default());
                }
                let v = cap.probe.grad();
                let bwd = cap.probe_in.grad();
                for (s, t) in sums[i].iter_mut().zip([&cap.output, &v, &bwd]) {
                    s.add(&rows_of(t, valid.as_ref()), max_m);
                }
                i += 1;
            }
        }
        if !lv.is_finite() {
            let msg = format!("diverged at step {step}");
            tw.append(&[metric(step, Metric::Diverged, 1.0)])
                .map_err(rec)?;
            remove_checkpoints(out);
            return Ok(TrainOutcome {
                heldout_loss: f64::NAN,
                last_loss: lv,
                diverged: Some(msg),
                resumed_from,
            });
        }
        // ||gamma B A|| and its stable rank (QR of B and A^T, costly at high rank) at
        // intervals: every `norm_every` steps (default: with the held-out evaluation) and
        // at the last step.
        let norm_every = if cfg.norm_every > 0 {
            cfg.norm_every
        } else {
            cfg.eval_every
        };
        let norms_now = step + 1 == cfg.steps || (norm_every > 0 && step % norm_every == 0);
        let mut rows = Vec::new();
        let mut grad_sq = 0.0;
        let mut n_params = 0usize;
        let mut i = 0;
        for (path, lin) in model.linears_mut() {
            let Some(ad) = &lin.adapter else { continue };
            let (na, nb) = (fro(&ad.a.grad()), fro(&ad.b.grad()));
            grad_sq += na * na + nb * nb;
            n_params += 2;
            if !probing || i >= sums.len() {
                continue;
            }
            let (module, layer) = module_and_layer(&path);
            let base = MomentRow {
                source: "train".into(),
                model: cfg.model_name.clone(),
                module,
                layer,
                rank: cfg.rank as u32,
                alpha: cfg.alpha,
                scaling,
                beta: cfg.beta,
                optimizer: cfg.optimizer,
                inputs: "text".into(),
                dist: "text".into(),
                width,
                seed: cfg.seed,
                step: step as u32,
                ..Default::default()
            };
            for (site, s) in [Site::Fwd, Site::GradOut, Site::Bwd]
                .into_iter()
                .zip(&sums[i])
            {
                for &m in &cfg.moments {
                    let k = m as usize - 1;
                    for (stat, v) in [(Stat::Abs, &s.abs), (Stat::Raw, &s.raw)] {
                        rows.push(MomentRow {
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
                rows.push(MomentRow {
                    site: Site::Param,
                    stat,
                    value,
                    ..base.clone()
                });
            }
            i += 1;
        }
        // The global gradient norm over every A and B: the sum of the squares just taken.
        let grad_norm = grad_sq.sqrt();
        if let Some(c) = cfg.clip_grad_norm {
            opt.clip_grad_norm(c);
        }
        opt.step();
        last_loss = lv;
        let mut mrows = vec![
            metric(step, Metric::Loss, lv),
            metric(step, Metric::Perplexity, lv.exp()),
            metric(
                step,
                Metric::GradNormAvg,
                (grad_sq / n_params.max(1) as f64).sqrt(),
            ),
            metric(step, Metric::GradNorm, grad_norm),
            metric(step, Metric::Lr, cfg.lr),
            metric(step, Metric::Seconds, t0.elapsed().as_secs_f64()),
        ];
        if cfg.eval_every > 0 && (step % cfg.eval_every == 0 || step + 1 == cfg.steps) {
            let h = heldout_loss(model, data, cfg.heldout_max, micro, device);
            mrows.push(metric(step, Metric::HeldoutLoss, h));
            mrows.push(metric(step, Metric::HeldoutPerplexity, h.exp()));
            if step + 1 == cfg.steps {
                final_heldout = Some(h);
            }
        }
        mw.append(&rows).map_err(rec)?;
        tw.append(&mrows).map_err(rec)?;
        if cfg.checkpoint_every > 0
            && (step + 1) % cfg.checkpoint_every == 0
            && step + 1 < cfg.steps
        {
            let (mut tensors, optimizer_steps) = opt.state();
            for (i, p) in opt.params().iter().enumerate() {
                tensors.push((format!("p.{i}"), p.detach()));
            }
            let state = CheckpointState {
                config: cfg.clone(),
                next_step: step + 1,
                optimizer_steps,
                moments_len: mw.len().map_err(rec)?,
                metrics_len: tw.len().map_err(rec)?,
            };
            save_checkpoint(out, &state, &tensors)?;
        }
        progress(step, lv);
    }
    set_capture(model, false);
    // The last step's evaluation already measured the final adapters.
    let h = match final_heldout {
        Some(h) => h,
        None => heldout_loss(model, data, cfg.heldout_max, micro, device),
    };
    let mut adapters = Vec::new();
    let linears = model.linears_mut();
    for (path, lin) in &linears {
        if let Some(ad) = &lin.adapter {
            adapters.push((path.clone(), ad));
        }
    }
    let mut targets: Vec<String> = paths.iter().map(|p| module_and_layer(p).0).collect();
    targets.sort();
    targets.dedup();
    let pc = PeftAdapterConfig {
        target_modules: targets,
        lora_dropout: cfg.dropout,
        base_model_name_or_path: Some(cfg.model_name.clone()),
        init_lora_weights: match cfg.init {
            LoraInit::KaimingUniform => serde_json::Value::Bool(true),
            LoraInit::Gaussian => serde_json::Value::String("gaussian".into()),
        },
        ..PeftAdapterConfig::for_scaling(cfg.rank, cfg.alpha, cfg.beta)
    };
    save_peft(&out.join("adapters"), &pc, &adapters)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    remove_checkpoints(out);
    Ok(TrainOutcome {
        heldout_loss: h,
        last_loss,
        diverged: None,
        resumed_from,
    })
}
