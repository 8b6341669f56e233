//! `rankstab train`: one instrumented LoRA / rsLoRA fine-tuning run (one sweep cell).
use anyhow::{bail, Result};
use clap::Args;
use rankstab_records::{
    scaling_name, scaling_preset, write_json_atomic, Manifest, RunStatus, SCHEMA_VERSION,
};
use rankstab_train::lora::LoraInit;
use rankstab_train::text::{read_text, TextTokenizer};
use rankstab_train::trainer::{train, Optim, TrainConfig};
use rankstab_train::CausalLm;
use std::path::PathBuf;
use tch::{nn, Kind};

/// Options of `rankstab train`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab train --model path/to/hf-model-dir --data book.txt --rank 16 --scaling rslora --optimizer adamw --steps 50
  rankstab train --model DIR --data book.txt --rank 64 --scaling lora --optimizer sgd --lr 0.1 --steps 20 --out runs/r64

Writes OUT/manifest.json, moments.csv (probes of every adapter), metrics.csv (loss,
perplexity, held-out perplexity, average parameter gradient norm) and OUT/adapters/
(PEFT format: adapter_config.json + adapter_model.safetensors).")]
pub struct TrainArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Plain UTF-8 text to fine-tune on.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Adapter rank.
    #[arg(long)]
    rank: usize,
    /// lora (alpha/r) or rslora (alpha/sqrt r).
    #[arg(long, default_value = "rslora")]
    scaling: String,
    /// Any scaling exponent beta (gamma = alpha r^-beta); overrides --scaling.
    #[arg(long, allow_hyphen_values = true)]
    beta: Option<f64>,
    /// Scaling numerator alpha.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Learning rate (rank-independent). Default 5e-5 (the paper's, HF's default).
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Optimisation steps.
    #[arg(long)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Probe every k steps (0: never).
    #[arg(long, default_value_t = 1)]
    probe_every: usize,
    /// Held-out evaluation every k steps.
    #[arg(long, default_value_t = 10)]
    eval_every: usize,
    /// Adapted modules, comma-separated (default: every attention and MLP linear).
    #[arg(long, value_delimiter = ',')]
    target_modules: Vec<String>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run directory (default runs/train-<time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let beta = match a.beta {
        Some(b) if b.is_finite() => b,
        Some(b) => bail!("--beta {b} is not allowed: use a finite number"),
        None => match scaling_preset(&a.scaling) {
            Some(b) => b,
            None => bail!(
                "--scaling {:?} is not allowed: use lora, rslora or constant (or --beta)",
                a.scaling
            ),
        },
    };
    let optimizer = match a.optimizer.as_str() {
        "adamw" => Optim::Adamw,
        "sgd" => Optim::Sgd,
        o => bail!("--optimizer {o:?} is not allowed: use adamw or sgd"),
    };
    if a.rank == 0 {
        bail!("--rank 0 is not allowed: ranks are integers >= 1");
    }
    if !a.lr.is_finite() || a.lr <= 0.0 {
        bail!("--lr {} is not allowed: use a finite number > 0", a.lr);
    }
    if !a.alpha.is_finite() || a.alpha <= 0.0 {
        bail!(
            "--alpha {} is not allowed: use a finite number > 0",
            a.alpha
        );
    }
    if a.steps == 0 || a.batch == 0 || a.context < 2 {
        bail!(
            "--steps {} / --batch {} / --context {}: use steps >= 1, batch >= 1, context >= 2",
            a.steps,
            a.batch,
            a.context
        );
    }
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "train-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        bail!(
            "{} exists and is not empty: choose another --out",
            out.display()
        );
    }
    let text = read_text(&a.data)?;
    let device = tch::Device::Cpu;
    let mut model = CausalLm::from_dir(&a.model, Kind::Float, device)?;
    let tok_path = a.model.join("tokenizer.json");
    let tok = TextTokenizer::from_file(&tok_path)?;
    tok.check_fits(&tok_path, model.vocab_size())?;
    let ids = tok.encode(&text)?;
    let model_name = a
        .model
        .file_name()
        .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().to_string());
    let cfg = TrainConfig {
        model_name,
        rank: a.rank,
        alpha: a.alpha,
        beta,
        init: LoraInit::KaimingUniform,
        dropout: 0.0,
        optimizer,
        lr: a.lr,
        steps: a.steps,
        batch: a.batch,
        context: a.context,
        probe_every: a.probe_every,
        eval_every: a.eval_every,
        heldout_fraction: 0.1,
        target_modules: a.target_modules.clone(),
        moments: vec![1, 2, 3, 4],
        seed: a.seed,
    };
    // Check the data and the adapters before creating the run directory.
    rankstab_train::trainer::windows(&ids, cfg.context, cfg.heldout_fraction, cfg.seed)?;
    tch::manual_seed(a.seed as i64);
    std::fs::create_dir_all(&out)?;
    let mut manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: "rankstab".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: crate::git_revision(),
        command: "train".into(),
        config: serde_json::json!({ "train": &cfg, "model": a.model, "data": a.data, "scaling": scaling_name(beta) }),
        seeds: vec![a.seed],
        device: format!("cpu ({} threads)", tch::get_num_threads()),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        finished: None,
        status: RunStatus::Running,
    };
    write_json_atomic(&out.join("manifest.json"), &manifest)?;
    let vs = nn::VarStore::new(device);
    let pb = indicatif::ProgressBar::new(a.steps as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} train [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        )
        .expect("valid template"),
    );
    let outcome = match train(&mut model, &vs, &ids, &cfg, &out, |_, loss| {
        pb.inc(1);
        pb.set_message(format!("loss {loss:.4}"));
    }) {
        Ok(o) => o,
        Err(e) => {
            // Nothing usable was written: do not leave a half-written run behind.
            let _ = std::fs::remove_dir_all(&out);
            return Err(e.into());
        }
    };
    pb.finish_and_clear();
    manifest.status = RunStatus::Complete;
    manifest.finished = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    write_json_atomic(&out.join("manifest.json"), &manifest)?;
    if let Some(d) = &outcome.diverged {
        println!("{d}");
    }
    println!(
        "last training loss {:.4}, held-out loss {:.4} (perplexity {:.3})",
        outcome.last_loss,
        outcome.heldout_loss,
        outcome.heldout_loss.exp()
    );
    println!("Run directory: {}", out.display());
    Ok(())
}
