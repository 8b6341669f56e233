//! `rankstab audit`: the training probes' statistics of PEFT / TRL / rankstab adapters on a
//! fixed data sample, and the rank exponents across them (the science is
//! `rankstab_train::audit`; the fits and verdicts are the report's).
use anyhow::{bail, Result};
use clap::Args;
use rankstab_records::Optimizer;
use rankstab_train::audit::{replicates, run_audit, AuditConfig, AuditOutcome};
use rankstab_train::data::{check_data_file, load_dataset, DataFormat, DataSpec};
use rankstab_train::device::{DeviceName, Dtype};
use rankstab_train::run::{load_model, ModelSpec};
use std::path::{Path, PathBuf};

/// Options of `rankstab audit`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab audit --model path/to/hf-model-dir --adapters out/r8 out/r16 out/r64 --data book.txt
  rankstab audit --model DIR --adapters trl-run/ --data orca.jsonl --batch 8 --batches 4 --out runs/audit-1
  rankstab audit --model DIR --adapters runs/r4/adapters runs/r16/adapters --data book.txt --json

Each --adapters DIR is a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors: peft's save_pretrained, TRL, or rankstab's RUN/adapters), or a
trainer's output directory of checkpoint-STEP folders (one adapter at several steps). The
base model is loaded once; every adapter is attached in turn (PEFT's target_modules,
layers_to_transform, rank_pattern and alpha_pattern) and the same data sample -- the first
--batches x --batch training sequences of --data, cut and split as `rankstab train --seed S`
does -- runs forward and backward with no optimizer step, adapter dropout off. Rows are the
training probes' (moments m=1..4 at fwd, grad_out, bwd; gradient norms of A and B; norm and
stable rank of gamma B A) with source=audit, the module's rank and alpha, the config's
scaling, step = the checkpoint's (0 otherwise), seed = the replicate index: --replicate plus
the number of earlier adapters (in the order given) with the same rank, scaling, alpha and
step. The held-out loss of the split's held-out sequences is in metrics.csv.

Writes OUT/manifest.json, moments.csv, metrics.csv (a run directory `rankstab report`
reads), prints a line per adapter and the rank exponents fitted across the adapters' ranks,
judged as the report judges training runs. Progress on stderr.")]
pub struct AuditArgs {
    /// Base model: a Hugging Face model directory or a GGUF file.
    #[arg(long, value_name = "PATH")]
    model: String,
    /// PEFT adapter directories, or directories of checkpoint-STEP adapter folders.
    #[arg(long, required = true, num_args = 1.., value_name = "DIR")]
    adapters: Vec<PathBuf>,
    /// The data sample's file: plain text (.txt) or OpenOrca-schema rows (.jsonl, .parquet).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// How to read --data: auto (by extension), text or orca.
    #[arg(long, default_value = "auto")]
    format: DataFormat,
    /// Sequences per batch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 4)]
    batch: usize,
    /// Sequences per forward/backward pass (default: --batch).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    micro_batch: usize,
    /// Tokens per sequence.
    #[arg(long, allow_negative_numbers = true, default_value_t = 128)]
    context: usize,
    /// Batches in the sample.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    batches: usize,
    /// Seed of the data split (as rankstab train's --seed).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    /// First replicate index (the rows' seed column).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    replicate: u64,
    /// Held-out loss over at most N held-out sequences (0: all).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    heldout_max: usize,
    /// The optimizer that trained the adapters (recorded in rows; the report groups by it).
    #[arg(long, default_value = "adamw")]
    optimizer: Optimizer,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceName,
    /// Base model dtype: f32 or bf16 (adapters in f32).
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
    /// Run directory (default runs/audit-<time>); absent or empty.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// One JSON object per line (per adapter, then per exponent) instead of text.
    #[arg(long)]
    json: bool,
    /// Refuse to start when the up-front memory estimate exceeds SIZE (e.g. 16G, 512M;
    /// default: the machine's available memory).
    #[arg(long, value_name = "SIZE", value_parser = rankstab_records::guard::parse_memory)]
    max_memory: Option<u64>,
}

pub fn run(a: AuditArgs) -> Result<()> {
    let path = PathBuf::from(&a.model);
    let spec = ModelSpec {
        name: path
            .file_stem()
            .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().to_string()),
        path: Some(path),
        ..ModelSpec::default()
    };
    let cfg = AuditConfig {
        model_name: spec.name.clone(),
        batch: a.batch,
        micro_batch: a.micro_batch,
        context: a.context,
        batches: a.batches,
        seed: a.seed,
        heldout_fraction: 0.1,
        heldout_max: a.heldout_max,
        optimizer: a.optimizer,
        replicate: a.replicate,
        moments: vec![1, 2, 3, 4],
    };
    cfg.check().map_err(|e| e.as_flag())?;
    rankstab_train::limits::seed("replicate", a.replicate).map_err(|e| e.as_flag())?;
    // Every adapter config before the model is loaded.
    let adapters = replicates(&a.adapters, a.replicate)?;
    let shape = rankstab_train::load::inspect_spec(&spec)?;
    let sizes = rankstab_train::memory::TrainSizes {
        rank: adapters.iter().map(|x| x.r).max().unwrap_or(1),
        target_modules: Vec::new(),
        optimizer: Optimizer::Sgd,
        micro_batch: cfg.pass_config().micro(),
        context: cfg.context,
        activation_checkpointing: false,
    };
    rankstab_train::memory::check(
        &format!("auditing adapters of {}", a.model),
        rankstab_train::memory::train_bytes(&shape, a.dtype.kind(), &sizes),
        a.max_memory,
    )?;
    check_data_file(&a.data, a.format, None)?;
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "audit-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    // An audit that holds the lock is in use, whatever it has written so far.
    rankstab_records::guard::refuse_if_held(&out)?;
    if out.exists() && !(out.is_dir() && rankstab_records::guard::is_empty_dir(&out)?) {
        bail!(
            "--out {}: exists and is not an empty directory: an audit writes a new run directory (choose another --out)",
            out.display()
        );
    }
    let lock = rankstab_records::RunLock::exclusive(&out)?;
    crate::interrupt::running(&out, "rankstab audit");
    let result = audit_locked(&a, &spec, &cfg, &adapters, &out, &lock);
    if result.is_err() {
        // Nothing partial is left: the directory was absent or empty.
        drop(lock);
        let _ = std::fs::remove_dir_all(&out);
    }
    result
}

/// `rankstab audit` once its run directory is locked.
fn audit_locked(
    a: &AuditArgs,
    spec: &ModelSpec,
    cfg: &AuditConfig,
    adapters: &[rankstab_train::audit::AuditAdapter],
    out: &Path,
    lock: &rankstab_records::RunLock,
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
            max_examples: None,
            eos_token: lm.eos_token.clone(),
        },
    )?;
    let meta = crate::run_meta(
        device,
        serde_json::json!({ "model": a.model, "data": a.data, "dtype": a.dtype }),
    );
    let n = adapters.len();
    let mut i = 0;
    let outcomes = run_audit(&mut lm.model, &data, cfg, adapters, out, &meta, lock, |o| {
        i += 1;
        eprintln!("audit {i}/{n}: {}", o.adapter.dir.display());
    })?;
    for o in &outcomes {
        print_outcome(o, a.json)?;
    }
    print_exponents(out, a.json)?;
    // The verdict in sentences, as the report's first screen says it.
    let headline = crate::verdict_of(out);
    if a.json {
        let verdict = headline.map(|h| h.sentences).unwrap_or_default();
        crate::json_line(&serde_json::json!({
            "event": "audit", "run_dir": out, "adapters": outcomes.len(), "verdict": verdict,
        }));
    } else {
        println!("Run directory: {}", out.display());
        if let Some(h) = headline {
            crate::print_headline(&h);
        }
    }
    Ok(())
}

fn print_outcome(o: &AuditOutcome, json: bool) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(o)?;
        v["event"] = "adapter".into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{}  step {}  r {}  beta {}  alpha {}  seed {}  modules {}  loss {:.4}  held-out {:.4}  grad norm {:.4e}  |gamma BA| {:.4e}",
            o.adapter.dir.display(),
            o.adapter.step,
            o.adapter.r,
            o.adapter.beta,
            o.adapter.alpha,
            o.adapter.seed,
            o.modules,
            o.loss,
            o.heldout_loss,
            o.grad_norm,
            o.delta_norm
        );
    }
    Ok(())
}

/// The rank exponents of the audit, fitted and judged by the report's training section
/// (the same path `rankstab report` takes): its rows pooled over layers, of absolute
/// moments and norms, at every step window (step 0 included: the page leaves it out because
/// a training run's B is zero there, an audited adapter's is not).
fn print_exponents(out: &Path, json: bool) -> Result<()> {
    let run = rankstab_report::load::load_run(out)?;
    let analysis = rankstab_report::analyse::analyse(
        std::slice::from_ref(&run),
        &[],
        &rankstab_report::AnalysisOptions::default(),
    );
    use rankstab_records::{Layer, Site, Stat};
    let rows: Vec<_> = analysis
        .train
        .map(|t| t.rows)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.layer == Layer::All && (r.stat == Stat::Abs || r.site == Site::Param))
        .collect();
    if rows.is_empty() {
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "note", "note": "no rank exponents: the adapters need at least two ranks of one scaling"})
            );
        } else {
            println!("rank exponents: none (the adapters need at least two ranks of one scaling)");
        }
        return Ok(());
    }
    if !json {
        println!("rank exponents (slope of log E[stat] against log r, 95% interval):");
    }
    for r in rows {
        if json {
            let mut v = serde_json::to_value(&r)?;
            v["event"] = "exponent".into();
            println!("{}", serde_json::to_string(&v)?);
        } else {
            println!(
                "  {:<10} {:<8} {:<9} {:<9} m={} {:<10} ranks {:<12} slope {:+.3} [{:+.3}, {:+.3}]  {}  {}",
                r.module,
                r.scaling,
                r.site,
                r.stat,
                r.m,
                r.window,
                r.ranks,
                r.slope,
                r.ci_low,
                r.ci_high,
                r.verdict,
                r.outcome
            );
        }
    }
    Ok(())
}
