//! Instrumented LoRA / rsLoRA fine-tuning on a token stream.
//!
//! Adapters go on every linear attention and MLP module (or the named ones); the base
//! weights stay frozen. Every `probe_every` steps, for every adapter, the probes record the
//! same statistics as the theory checker: moments of the adapter output (`fwd`), of the
//! loss gradient at that output (`grad_out`), of the gradient into the adapter's input
//! through the adapter, `(gamma B A)^T v` (`bwd`), and the norms of the gradients of A and
//! B, of `gamma B A` and its stable rank (`param`). Rows go to the run directory's
//! `moments.csv` (source = train) and `metrics.csv`.
use crate::lora::{save_peft, LoraAdapter, LoraConfig, LoraInit, PeftAdapterConfig};
use crate::probe::{delta_norm_and_stable_rank, fro, moments};
use crate::{CausalLm, TrainError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rankstab_records::{scaling_name, MetricRow, MomentRow, TableWriter};
use std::cell::RefCell;
use std::path::Path;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Optimizers of the training tool; the learning rate does not depend on rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optim {
    /// AdamW, betas 0.9 / 0.999, no weight decay (the paper's defaults).
    Adamw,
    /// Plain SGD.
    Sgd,
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
    /// Optimizer.
    pub optimizer: Optim,
    /// Learning rate.
    pub lr: f64,
    /// Optimisation steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// Probe every k steps (0: never).
    pub probe_every: usize,
    /// Held-out perplexity every k steps (and at the end).
    pub eval_every: usize,
    /// Fraction of sequences held out.
    pub heldout_fraction: f64,
    /// Module names to adapt (empty: every attention and MLP linear).
    pub target_modules: Vec<String>,
    /// Moment orders.
    pub moments: Vec<u32>,
    /// Seed (adapter init, dropout, data order).
    pub seed: u64,
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
    };
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
        let vpath = path.split('.').fold(vs.root(), |p, part| p / part);
        let (out, inp) = lin.dims();
        let ad = LoraAdapter::new(&vpath, inp, out, &lora)
            .map_err(|e| TrainError::Invalid(format!("{path}: {e}")))?;
        lin.adapter = Some(ad);
        lin.capture = Some(RefCell::new(None));
        paths.push(path);
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
    let mut w: Vec<Vec<i64>> = ids.chunks_exact(context + 1).map(<[i64]>::to_vec).collect();
    let n_held = ((w.len() as f64 * heldout_fraction).ceil() as usize).max(1);
    if w.len() < n_held + 1 {
        return Err(TrainError::Invalid(format!(
            "the text gives {} window(s) of {} tokens: need at least {} (shorter --context or more text)",
            w.len(),
            context + 1,
            n_held + 1
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    w.shuffle(&mut rng);
    let held = w.split_off(w.len() - n_held);
    Ok((w, held))
}

fn batch_tensor(ws: &[Vec<i64>], device: Device) -> Tensor {
    let t = ws[0].len() as i64;
    let flat: Vec<i64> = ws.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .view([ws.len() as i64, t])
        .to_device(device)
}

fn loss_of(model: &CausalLm, x: &Tensor, train: bool) -> Tensor {
    let t = x.size()[1];
    let inp = x.narrow(1, 0, t - 1);
    let tgt = x.narrow(1, 1, t - 1);
    let logits = model.forward(&inp, train).to_kind(Kind::Float);
    let v = logits.size()[2];
    logits
        .reshape([-1, v])
        .cross_entropy_for_logits(&tgt.reshape([-1]))
}

/// What a finished run measured.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Held-out loss at the end.
    pub heldout_loss: f64,
    /// Training loss of the last step.
    pub last_loss: f64,
    /// "diverged at step k" when the loss became non-finite.
    pub diverged: Option<String>,
}

/// Trains the attached adapters and writes rows to `out` (moments.csv, metrics.csv) and
/// the PEFT adapter to `out/adapters`.
///
/// # Errors
/// I/O, libtorch errors, too little data.
#[allow(clippy::too_many_lines)]
pub fn train(
    model: &mut CausalLm,
    vs: &nn::VarStore,
    ids: &[i64],
    cfg: &TrainConfig,
    out: &Path,
    mut progress: impl FnMut(usize, f64),
) -> Result<TrainOutcome, TrainError> {
    let device = vs.device();
    let (train_w, held_w) = windows(ids, cfg.context, cfg.heldout_fraction, cfg.seed)?;
    let paths = attach(model, vs, cfg)?;
    let torch = |context: &str| {
        let context = context.to_string();
        move |source| TrainError::Torch { context, source }
    };
    let mut opt = match cfg.optimizer {
        Optim::Adamw => nn::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            wd: 0.0,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(vs, cfg.lr),
        Optim::Sgd => nn::Sgd::default().build(vs, cfg.lr),
    }
    .map_err(torch("building the optimizer"))?;
    let mut mw = TableWriter::<MomentRow>::open(&out.join("moments.csv"))
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut tw = TableWriter::<MetricRow>::open(&out.join("metrics.csv"))
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let width = match model {
        CausalLm::Llama(m) => m.config.hidden_size,
        CausalLm::Gptj(m) => m.config.n_embd,
    } as u32;
    let scaling = scaling_name(cfg.beta);
    let opt_name = match cfg.optimizer {
        Optim::Adamw => "adamw",
        Optim::Sgd => "sgd",
    };
    let metric = |step: usize, metric: &str, value: f64| MetricRow {
        source: "train".into(),
        model: cfg.model_name.clone(),
        rank: cfg.rank as u32,
        scaling: scaling.clone(),
        beta: cfg.beta,
        optimizer: opt_name.into(),
        inputs: "text".into(),
        seed: cfg.seed,
        step: step as u32,
        metric: metric.into(),
        value,
    };
    let heldout_loss = |model: &CausalLm| -> f64 {
        tch::no_grad(|| {
            let mut s = 0.0;
            for chunk in held_w.chunks(cfg.batch.max(1)) {
                s += loss_of(model, &batch_tensor(chunk, device), false).double_value(&[])
                    * chunk.len() as f64;
            }
            s / held_w.len() as f64
        })
    };
    let max_m = cfg.moments.iter().copied().max().unwrap_or(4);
    let mut last_loss = f64::NAN;
    let mut diverged = None;
    let t0 = std::time::Instant::now();
    for step in 0..cfg.steps {
        let start = (step * cfg.batch) % train_w.len();
        let chunk: Vec<Vec<i64>> = (0..cfg.batch)
            .map(|k| train_w[(start + k) % train_w.len()].clone())
            .collect();
        let x = batch_tensor(&chunk, device);
        tch::manual_seed(cfg.seed as i64 ^ step as i64);
        let loss = loss_of(model, &x, true);
        let lv = loss.double_value(&[]);
        if !lv.is_finite() {
            diverged = Some(format!("diverged at step {step}"));
            tw.append(&[metric(step, "diverged", 1.0)])
                .map_err(|e| TrainError::Invalid(e.to_string()))?;
            break;
        }
        opt.zero_grad();
        loss.backward();
        let probing = cfg.probe_every > 0 && step % cfg.probe_every == 0;
        let mut rows = Vec::new();
        let mut grad_sq = 0.0;
        let mut n_params = 0usize;
        for (path, lin) in model.linears_mut() {
            let Some(ad) = &lin.adapter else { continue };
            let (ga, gb) = (ad.a.grad(), ad.b.grad());
            let (na, nb) = (fro(&ga), fro(&gb));
            grad_sq += na * na + nb * nb;
            n_params += 2;
            let cap = lin.capture.as_ref().and_then(|c| c.borrow_mut().take());
            if !probing {
                continue;
            }
            let Some(cap) = cap else { continue };
            let (module, layer) = module_and_layer(&path);
            let base = MomentRow {
                source: "train".into(),
                model: cfg.model_name.clone(),
                module,
                layer,
                rank: cfg.rank as u32,
                alpha: cfg.alpha,
                scaling: scaling.clone(),
                beta: cfg.beta,
                optimizer: opt_name.into(),
                inputs: "text".into(),
                dist: "text".into(),
                width,
                seed: cfg.seed,
                step: step as u32,
                ..Default::default()
            };
            let v = cap.probe.grad();
            let bwd = tch::no_grad(|| v.matmul(&ad.b).matmul(&ad.a) * ad.scaling);
            for (site, t) in [("fwd", &cap.output), ("grad_out", &v), ("bwd", &bwd)] {
                let (abs, raw) = moments(t, max_m);
                for &m in &cfg.moments {
                    let k = m as usize - 1;
                    rows.push(MomentRow {
                        site: site.into(),
                        stat: "abs".into(),
                        m: Some(m),
                        value: abs[k],
                        ..base.clone()
                    });
                    rows.push(MomentRow {
                        site: site.into(),
                        stat: "raw".into(),
                        m: Some(m),
                        value: raw[k],
                        ..base.clone()
                    });
                }
            }
            let (dn, sr) = delta_norm_and_stable_rank(&ad.b, &ad.a, ad.scaling);
            for (stat, value) in [
                ("grad_norm_a", na),
                ("grad_norm_b", nb),
                ("delta_norm", dn),
                ("stable_rank", sr),
            ] {
                rows.push(MomentRow {
                    site: "param".into(),
                    stat: stat.into(),
                    value,
                    ..base.clone()
                });
            }
        }
        opt.step();
        last_loss = lv;
        let mut mrows = vec![
            metric(step, "loss", lv),
            metric(step, "perplexity", lv.exp()),
            metric(
                step,
                "grad_norm_avg",
                (grad_sq / n_params.max(1) as f64).sqrt(),
            ),
            metric(step, "lr", cfg.lr),
            metric(step, "seconds", t0.elapsed().as_secs_f64()),
        ];
        if cfg.eval_every > 0 && (step % cfg.eval_every == 0 || step + 1 == cfg.steps) {
            let h = heldout_loss(model);
            mrows.push(metric(step, "heldout_loss", h));
            mrows.push(metric(step, "heldout_perplexity", h.exp()));
        }
        mw.append(&rows)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        tw.append(&mrows)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        progress(step, lv);
    }
    let h = heldout_loss(model);
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
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        r: cfg.rank,
        lora_alpha: cfg.alpha,
        use_rslora: cfg.beta == 0.5,
        target_modules: targets,
        lora_dropout: cfg.dropout,
        base_model_name_or_path: Some(cfg.model_name.clone()),
        bias: "none".into(),
        init_lora_weights: match cfg.init {
            LoraInit::KaimingUniform => serde_json::Value::Bool(true),
            LoraInit::Gaussian => serde_json::Value::String("gaussian".into()),
        },
        fan_in_fan_out: false,
        rankstab_beta: (cfg.beta != 0.5 && cfg.beta != 1.0).then_some(cfg.beta),
    };
    save_peft(&out.join("adapters"), &pc, &adapters)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(TrainOutcome {
        heldout_loss: h,
        last_loss,
        diverged,
    })
}
