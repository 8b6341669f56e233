//! `rankstab train`: one instrumented LoRA / rsLoRA fine-tuning run (one sweep cell).
use anyhow::{bail, Result};
use clap::Args;
use rankstab_records::{read_json, Manifest, Optimizer, Scaling};
use rankstab_train::data::{check_data_file, load_dataset, DataFormat, DataSpec};
use rankstab_train::device::{DeviceName, Dtype};
use rankstab_train::limits;
use rankstab_train::lora::LoraInit;
use rankstab_train::optim::check_supported;
use rankstab_train::run::{claim_out, discard_failed, load_model, run_dir, ModelSpec, Start};
use rankstab_train::trainer::{differences, TrainConfig};
use std::path::{Path, PathBuf};

/// Options of `rankstab train`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab train --model path/to/hf-model-dir --data book.txt --rank 16 --scaling rslora --optimizer adamw --steps 50
  rankstab train --model DIR --data book.txt --rank 64 --scaling lora --optimizer sgd --lr 0.1 --steps 20 --out runs/r64
  rankstab train --model assets/SmolLM2-135M-Instruct.Q4_1.gguf --data orca.jsonl --rank 16 --steps 100 --batch 32 --micro-batch 4
  rankstab train --model preset:gpt-j-mini --tokenizer assets/gpt2-tokenizer --data book.txt --rank 8 --steps 10

Data: .txt is plain text (packed into windows of --context tokens); .jsonl and .parquet
rows have OpenOrca's fields system_prompt, question, response (loss on the response only).
With --checkpoint-every K a killed run resumes when the same command is run again.
--init-adapter DIR continues a PEFT adapter (same rank, alpha and scaling; its modules the
run's --target-modules): its A and B replace the init.

Writes OUT/manifest.json, moments.csv (probes of every adapter), metrics.csv (loss,
perplexity, held-out perplexity, average parameter gradient norm) and OUT/adapters/
(PEFT format: adapter_config.json + adapter_model.safetensors).")]
pub struct TrainArgs {
    /// A Hugging Face model directory, a GGUF file, or preset:NAME (random weights of
    /// llama-2-7b, gpt-j-6b, llama-2-mini or gpt-j-mini; needs --tokenizer).
    #[arg(long, value_name = "PATH")]
    model: String,
    /// Tokenizer for a preset model: tokenizer.json, or a directory with it or with
    /// vocab.json + merges.txt.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Training data: plain UTF-8 text (.txt) or OpenOrca-schema rows (.jsonl, .parquet).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// How to read --data: auto (by extension), text or orca.
    #[arg(long, default_value = "auto")]
    format: DataFormat,
    /// Use only the first N rows of an instruction dataset.
    #[arg(long, allow_negative_numbers = true)]
    max_examples: Option<usize>,
    /// Adapter rank.
    #[arg(long, allow_negative_numbers = true)]
    rank: usize,
    /// lora (alpha/r), rslora (alpha/sqrt r), constant, or beta=B (alpha r^-B).
    #[arg(long, default_value = "rslora")]
    scaling: Scaling,
    /// Any scaling exponent beta (gamma = alpha r^-beta); overrides --scaling.
    #[arg(long, allow_hyphen_values = true)]
    beta: Option<f64>,
    /// Scaling numerator alpha.
    #[arg(long, allow_negative_numbers = true, default_value_t = 16.0)]
    alpha: f64,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: Optimizer,
    /// Learning rate (rank-independent). Default 5e-5 (the paper's, HF's default).
    #[arg(long, allow_negative_numbers = true, default_value_t = 5e-5)]
    lr: f64,
    /// Optimisation steps.
    #[arg(long, allow_negative_numbers = true)]
    steps: usize,
    /// Sequences per optimisation step.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4)]
    batch: usize,
    /// Sequences per forward/backward pass (gradient accumulation; default: --batch).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    micro_batch: usize,
    /// Tokens per sequence.
    #[arg(long, allow_negative_numbers = true, default_value_t = 128)]
    context: usize,
    /// Clip the adapters' global gradient norm.
    #[arg(long, allow_negative_numbers = true)]
    clip_grad_norm: Option<f64>,
    /// Adapter dropout.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    dropout: f64,
    /// Probe every k steps (0: never).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    probe_every: usize,
    /// Tokens of each micro-batch the probes read from step 2 on, a random sample of its
    /// real tokens drawn anew every pass (0: every token; steps 0 and 1 read every token)
    #[arg(long, allow_negative_numbers = true, default_value_t = rankstab_train::trainer::DEFAULT_PROBE_TOKENS)]
    probe_tokens: usize,
    /// Held-out evaluation after every k-th step and after the last one (0: only the final
    /// held-out loss, printed at the end).
    #[arg(long, allow_negative_numbers = true, default_value_t = 10)]
    eval_every: usize,
    /// Also evaluate before the first update (one more held-out pass).
    #[arg(long)]
    eval_at_start: bool,
    /// Evaluate held-out perplexity on at most N held-out sequences (0: all of them,
    /// which for a book is thousands of windows and minutes per evaluation on a CPU).
    #[arg(long, allow_negative_numbers = true, default_value_t = rankstab_train::trainer::DEFAULT_HELDOUT_MAX)]
    heldout_max: usize,
    /// Fraction of the data's sequences held out for evaluation (never trained on).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.1)]
    heldout_fraction: f64,
    /// Write a resumable checkpoint every k steps (0: never).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    checkpoint_every: usize,
    /// Recompute block activations in the backward pass (less memory).
    #[arg(long)]
    activation_checkpointing: bool,
    /// Adapted modules, comma-separated (default: every attention and MLP linear).
    #[arg(long, value_delimiter = ',')]
    target_modules: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceName,
    /// Base model dtype: f32 or bf16 (adapters stay f32).
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
    /// Seed.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    /// Continue from a PEFT adapter directory: its A and B are the initial values instead
    /// of the init (its rank, alpha and scaling must be the run's).
    #[arg(long, value_name = "DIR")]
    init_adapter: Option<PathBuf>,
    /// Run directory (default runs/train-<time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Refuse to start when the up-front memory estimate exceeds SIZE (e.g. 16G, 512M;
    /// default: the machine's available memory).
    #[arg(long, value_name = "SIZE", value_parser = rankstab_records::guard::parse_memory)]
    max_memory: Option<u64>,
    /// Print JSON lines on stdout instead of text: one `{"event":"step",...}` per step and a
    /// final `{"event":"train",...}` (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

/// The model `--model` names: a path, or `preset:NAME` with `--tokenizer`.
fn model_spec(a: &TrainArgs) -> Result<ModelSpec> {
    Ok(match a.model.strip_prefix("preset:") {
        Some(p) => ModelSpec {
            name: p.to_string(),
            preset: Some(p.to_string()),
            tokenizer: Some(
                a.tokenizer
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("--model preset:{p} needs --tokenizer PATH"))?,
            ),
            ..ModelSpec::default()
        },
        None => {
            let path = PathBuf::from(&a.model);
            ModelSpec {
                name: path
                    .file_stem()
                    .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().to_string()),
                path: Some(path),
                ..ModelSpec::default()
            }
        }
    })
}

/// The run's configuration from the flags (`--beta` overrides `--scaling`).
fn train_config(a: &TrainArgs, model_name: String) -> Result<TrainConfig> {
    let scaling = match a.beta {
        Some(b) => Scaling::from_beta(b)
            .map_err(|_| anyhow::anyhow!("--beta {b} is not allowed: use a finite number"))?,
        None => a.scaling,
    };
    Ok(TrainConfig {
        model_name,
        rank: a.rank,
        alpha: a.alpha,
        beta: scaling.beta(),
        init: LoraInit::KaimingUniform,
        dropout: a.dropout,
        optimizer: a.optimizer,
        lr: a.lr,
        steps: a.steps,
        batch: a.batch,
        micro_batch: a.micro_batch,
        context: a.context,
        probe_every: a.probe_every,
        probe_tokens: a.probe_tokens,
        eval_every: a.eval_every,
        eval_at_start: a.eval_at_start,
        heldout_fraction: a.heldout_fraction,
        heldout_max: a.heldout_max,
        norm_every: 0,
        target_modules: a.target_modules.clone(),
        moments: vec![1, 2, 3, 4],
        seed: a.seed,
        clip_grad_norm: a.clip_grad_norm,
        weight_decay: 0.0,
        checkpoint_every: a.checkpoint_every,
        activation_checkpointing: a.activation_checkpointing,
        base_model: (!a.model.starts_with("preset:")).then(|| a.model.clone()),
        init_adapter: a.init_adapter.clone(),
    })
}

/// Checks every flag against its bound ([`rankstab_train::limits`]) before anything is
/// loaded, allocated or written; an error names the flag, the value and what is allowed.
fn check_flags(a: &TrainArgs, cfg: &TrainConfig) -> Result<()> {
    check_supported(cfg.optimizer)?;
    cfg.check().map_err(|mut e| {
        // The exponent comes from --scaling unless --beta gave it.
        if e.field == "beta" && a.beta.is_none() {
            e.field = "scaling".into();
            e.value = a.scaling.to_string();
        }
        e.as_flag()
    })?;
    limits::max_examples("max_examples", a.max_examples).map_err(|e| e.as_flag())?;
    Ok(())
}

/// Refuses to resume a run of another configuration in `out`: one line naming the
/// fields that differ (the run's manifest records the configuration and the model, data
/// and dtype it was started with).
fn check_resume(out: &Path, cfg: &TrainConfig, extra: &serde_json::Value) -> Result<()> {
    let path = out.join("manifest.json");
    let m: Manifest = read_json(&path)?;
    let mut diff = match serde_json::from_value::<TrainConfig>(m.config["train"].clone()) {
        Ok(old) => differences(&old, cfg),
        Err(e) => vec![format!("its configuration is unreadable ({e})")],
    };
    for key in ["model", "data", "dtype"] {
        let old = &m.config["run"][key];
        if *old != extra[key] {
            diff.push(format!("{key}: {old} -> {}", extra[key]));
        }
    }
    if !diff.is_empty() {
        bail!(
            "--out {} holds an unfinished run of another configuration ({}): choose another --out, or repeat that run's command to resume it",
            out.display(),
            diff.join(", ")
        );
    }
    Ok(())
}

pub fn run(a: TrainArgs) -> Result<()> {
    let spec = model_spec(&a)?;
    let cfg = train_config(&a, spec.name.clone())?;
    check_flags(&a, &cfg)?;
    // The initial adapter's files, config, rank, alpha and scaling before the model.
    if let Some(dir) = &cfg.init_adapter {
        rankstab_train::trainer::check_init_adapter(&cfg, dir)?;
    }
    // The model's shape from its configuration alone: a run that cannot fit is refused
    // before the run directory is made or a weight is read.
    let shape = rankstab_train::load::inspect_spec(&spec)?;
    let sizes = rankstab_train::memory::TrainSizes {
        rank: cfg.rank,
        target_modules: cfg.target_modules.clone(),
        optimizer: cfg.optimizer,
        micro_batch: cfg.micro(),
        context: cfg.context,
        activation_checkpointing: cfg.activation_checkpointing,
    };
    rankstab_train::memory::check(
        &format!("training {} at rank {}", a.model, cfg.rank),
        rankstab_train::memory::train_bytes(&shape, a.dtype.kind(), &sizes),
        a.max_memory,
    )?;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "train-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {}: is a file, not a directory: a run directory is absent, empty, or holds an unfinished run of the same command",
            out.display()
        );
    }
    let extra = serde_json::json!({ "model": a.model, "data": a.data, "dtype": a.dtype });
    // The data file before the run directory: a regular, non-empty file that parses in its
    // format.
    check_data_file(&a.data, a.format, a.max_examples)?;
    let (start, lock) = claim_out(&out)?;
    if start == Start::Resume {
        check_resume(&out, &cfg, &extra)?;
        eprintln!("resuming the run in {}", out.display());
    }
    crate::interrupt::running(&out, "rankstab train");
    // With checkpoints the run can resume: a signal then stops it after its step with one.
    crate::interrupt::checkpoint_on_signal(a.checkpoint_every > 0);
    let result = train_locked(&a, &spec, &cfg, &out, &lock, extra);
    if result.is_err() && start == Start::New {
        // A new run that failed wrote nothing usable: do not leave it behind.
        discard_failed(&out);
    }
    result
}

/// `rankstab train` once its run directory is locked.
fn train_locked(
    a: &TrainArgs,
    spec: &ModelSpec,
    cfg: &TrainConfig,
    out: &std::path::Path,
    lock: &rankstab_records::RunLock,
    extra: serde_json::Value,
) -> Result<()> {
    let device = a.device.device()?;
    let mut lm = load_model(spec, a.dtype.kind(), device)?;
    let data = load_dataset(
        &a.data,
        &lm.tokenizer,
        &DataSpec {
            format: a.format,
            context: cfg.context,
            heldout_fraction: cfg.heldout_fraction,
            seed: cfg.seed,
            max_examples: a.max_examples,
            eos_token: lm.eos_token.clone(),
        },
    )?;
    // Check the adapters fit before creating the run directory (without allocating them).
    rankstab_train::inject::targets(&mut lm.model, &cfg.target_modules, cfg.rank)?;
    let meta = crate::run_meta(device, extra);
    let mut progress = crate::progress::Progress::new("train", a.steps as u64);
    let mut first = true;
    let mut events = crate::tensorboard::EventWriter::create(out);
    let outcome = run_dir(&mut lm.model, &data, cfg, out, &meta, lock, |p| {
        if first {
            // A resumed run starts past its checkpoint.
            progress.skip(p.step as u64);
            first = false;
        }
        progress.step("", p);
        events.step(p);
        if a.json {
            crate::json_line(&step_json(p));
        }
    })?;
    progress.finish();
    if a.json {
        crate::json_line(&serde_json::json!({
            "event": "train",
            "run_dir": out,
            "status": if outcome.diverged.is_some() { "diverged" } else { "complete" },
            "note": outcome.diverged,
            "resumed_from": outcome.resumed_from,
            "last_loss": finite(outcome.last_loss),
            "heldout_loss": finite(outcome.heldout_loss),
            "heldout_perplexity": finite(outcome.heldout_loss.exp()),
        }));
        return Ok(());
    }
    if let Some(s) = outcome.resumed_from {
        println!("resumed from step {s}");
    }
    if let Some(d) = &outcome.diverged {
        println!("{d}");
    } else {
        println!(
            "last training loss {:.4}, held-out loss {:.4} (perplexity {:.3})",
            outcome.last_loss,
            outcome.heldout_loss,
            outcome.heldout_loss.exp()
        );
    }
    println!("Run directory: {}", out.display());
    Ok(())
}

/// A number for JSON: null when NaN or infinite (JSON has no such numbers).
pub(crate) fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// One step as a JSON object (`--json` of `train` and `sweep`).
pub(crate) fn step_json(p: &rankstab_train::trainer::StepProgress<'_>) -> serde_json::Value {
    serde_json::json!({
        "event": "step",
        "step": p.step,
        "steps": p.steps,
        "loss": finite(p.loss),
        "tokens": p.tokens,
        "seconds": p.seconds,
        "tokens_per_second": p.tokens as f64 / p.seconds.max(1e-9),
        "heldout_loss": p.heldout.and_then(finite),
    })
}
