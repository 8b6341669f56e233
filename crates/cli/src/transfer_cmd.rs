//! `rankstab transfer`.
use anyhow::{bail, Result};
use clap::Args;
use rankstab_records::{Optimizer, Scaling};
use rankstab_theory::transfer::analyse::{Exponent, TransferSummary};
use rankstab_theory::transfer::{LrGrid, TransferConfig};
use rankstab_theory::{AdapterInit, Init, Reuse};
use std::path::PathBuf;

/// Options of `rankstab transfer`. Every option overrides the config file's value.
#[derive(Args, Debug, Default)]
#[command(after_help = "\
Examples:
  rankstab transfer
      the default study: SGD and Adam x LoRA and rsLoRA, PEFT's init, ranks 2..64 at
      width 128, widths 64..256 at rank 8, 25 learning rates, 200 steps, 6 seeds
  rankstab transfer --optimizers adam --adapter-init a,b --lr-ratio 1,16 --out runs/plus
  rankstab transfer --ranks 4,16,64 --lrs 1e-3:1e3:25 --steps 400 --seeds 8
  rankstab transfer --config transfer.toml

Config file (TOML): any field of the run's manifest.json 'config', e.g.
  ranks = [2, 8, 32]
  widths = []
  lrs_adam = \"1e-4:1e0:17\"

Writes OUT/manifest.json, transfer_runs.csv, transfer_steps.csv, transfer.json.
Running the same command again resumes an interrupted study.")]
pub struct TransferArgs {
    /// TOML config file (unknown keys are errors).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Optimizers: sgd, sgd-momentum, adam, adamw.
    #[arg(long, value_delimiter = ',', value_name = "OPT,...")]
    optimizers: Option<Vec<Optimizer>>,
    /// Scalings: lora, rslora, constant, beta=B (a bare number is a beta too).
    #[arg(long, value_delimiter = ',', value_name = "S,...")]
    scalings: Option<Vec<Scaling>>,
    /// Ranks of the rank study.
    #[arg(long, value_delimiter = ',', value_name = "R,...")]
    ranks: Option<Vec<usize>>,
    /// Width of the rank study.
    #[arg(long, value_name = "N")]
    width: Option<usize>,
    /// Widths of the width study ('' for none).
    #[arg(long, value_delimiter = ',', value_name = "D,...")]
    widths: Option<Vec<String>>,
    /// Rank of the width study.
    #[arg(long, value_name = "R")]
    width_rank: Option<usize>,
    /// Training batch size.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Held-out batch size (the loss that locates lr*).
    #[arg(long, value_name = "N")]
    heldout: Option<usize>,
    /// Input regime: fresh (a new batch every step) or coherent (one batch reused).
    #[arg(long)]
    inputs: Option<Reuse>,
    /// Input distribution: gaussian, rademacher, student-t:NU, mean-shift:MU, low-rank:K.
    #[arg(long)]
    dist: Option<String>,
    /// Distribution of the random factor: kaiming-uniform (PEFT), gaussian, peft-gaussian.
    #[arg(long)]
    init: Option<Init>,
    /// Which factor starts random: a (A random, B zero: PEFT), b (B random, A zero).
    #[arg(long, value_delimiter = ',', value_name = "a|b,...")]
    adapter_init: Option<Vec<AdapterInit>>,
    /// Ratios lr_B / lr_A (1 = LoRA, > 1 = LoRA+); the grid's lr is A's.
    #[arg(long, value_delimiter = ',', value_name = "X,...")]
    lr_ratio: Option<Vec<f64>>,
    /// Scaling numerator alpha.
    #[arg(long)]
    alpha: Option<f64>,
    /// Learning-rate grid for every optimizer: LO:HI:N, N log-spaced values.
    #[arg(long, value_name = "LO:HI:N")]
    lrs: Option<LrGrid>,
    /// Grid of the SGD family.
    #[arg(long, value_name = "LO:HI:N")]
    lrs_sgd: Option<LrGrid>,
    /// Grid of the Adam family.
    #[arg(long, value_name = "LO:HI:N")]
    lrs_adam: Option<LrGrid>,
    /// Optimisation steps per run.
    #[arg(long)]
    steps: Option<usize>,
    /// Seeds (independent trials).
    #[arg(long)]
    seeds: Option<usize>,
    /// Base seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Bootstrap resamples of the seeds.
    #[arg(long)]
    bootstrap: Option<usize>,
    /// A run is diverged once its training loss exceeds this multiple of the initial one.
    #[arg(long)]
    divergence: Option<f64>,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Refuse the run if its memory estimate exceeds SIZE (e.g. 4G).
    #[arg(long, value_name = "SIZE", value_parser = rankstab_records::guard::parse_memory)]
    max_memory: Option<u64>,
    /// Run directory (default runs/transfer-<time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print one JSON object (transfer.json and the verdict sentences) instead of tables.
    #[arg(long)]
    json: bool,
}

/// The config file (or defaults) with the command-line overrides applied.
pub fn resolve_config(a: &TransferArgs) -> Result<TransferConfig> {
    let mut c = crate::theory_cmd::read_config(a.config.as_deref(), TransferConfig::from_toml)?;
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { c.$f = v; } )* };
    }
    set!(
        optimizers, scalings, ranks, width, width_rank, batch, heldout, inputs, dist, init, alpha,
        lrs_sgd, lrs_adam, steps, seeds, seed, bootstrap, divergence
    );
    if let Some(v) = &a.adapter_init {
        c.adapter_inits = v.clone();
    }
    if let Some(v) = &a.lr_ratio {
        c.lr_ratios = v.clone();
    }
    if a.lrs.is_some() {
        c.lrs = a.lrs;
    }
    if let Some(w) = &a.widths {
        c.widths = w
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("--widths: '{s}' is not a width (a positive integer)")
                })
            })
            .collect::<Result<_>>()?;
    }
    c.validate()?;
    Ok(c)
}

pub fn run(a: TransferArgs) -> Result<()> {
    let cfg = resolve_config(&a)?;
    let (out, opts) =
        crate::theory_cmd::study_setup("transfer", a.threads, a.out.as_deref(), a.max_memory)?;
    let progress = crate::theory_cmd::Bar::new(
        "{spinner} transfer [{elapsed_precise}] {bar:30} {pos}/{len} runs ({eta}) {msg}",
        Some("transfer"),
    );
    let t0 = std::time::Instant::now();
    crate::interrupt::running(&out, "rankstab transfer");
    let outcome = rankstab_theory::transfer::run(&cfg, &out, &opts, &progress)?;
    progress.bar.finish_and_clear();
    let Some(summary) = outcome.summary else {
        bail!(
            "{}: the study is not complete; run the same command again to resume",
            out.display()
        );
    };
    let sentences = verdict_sentences(&summary);
    if a.json {
        crate::json_line(&serde_json::json!({
            "event": "transfer", "run_dir": out, "transfer": summary, "verdict": sentences,
        }));
        return Ok(());
    }
    print_study(&summary);
    println!(
        "\n(lr* from the final held-out loss, a parabola in ln lr around the grid minimum; intervals: \
         {} bootstrap resamples of {} seeds, exponents with t({}) at 90%; outcomes by the rule of \
         proofs/verdicts.md against the one-step law of proofs/lr-transfer.md)",
        summary.bootstrap,
        summary.seeds,
        summary.seeds.saturating_sub(1)
    );
    println!(
        "Run directory: {} ({:.1} s)",
        outcome.dir.display(),
        t0.elapsed().as_secs_f64()
    );
    println!();
    for s in &sentences {
        println!("{s}");
    }
    Ok(())
}

/// A study's lr* table, exponents and findings (`transfer`, and `sweep` with `lrs`).
pub(crate) fn print_study(s: &TransferSummary) {
    print_cells(s);
    print_exponents(s);
    print_findings(s);
}

/// A law's exponent, or "-" where no law predicts one.
fn law_f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "-".into()
    }
}

fn opt_f(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$e}"))
}

fn scaling_name(beta: f64) -> String {
    Scaling::from_beta(beta).map_or(format!("beta={beta}"), |s| s.to_string())
}

fn print_cells(s: &TransferSummary) {
    println!(
        "{:<5} {:<6} {:<9} {:>4} {:>5} {:>5} {:>5}  {:>9} {:>21} {:>9} {:>9} {:>7} {:>7} {:>6}",
        "axis",
        "opt",
        "scaling",
        "init",
        "ratio",
        "width",
        "rank",
        "lr*",
        "90% CI",
        "law lr*",
        "loss*",
        "eff.rk",
        "st.rk",
        "div"
    );
    for c in &s.cells {
        let lr = match (&c.edge, c.lr_opt) {
            (Some(e), _) => e.clone(),
            (None, v) => opt_f(v, 2),
        };
        println!(
            "{:<5} {:<6} {:<9} {:>4} {:>5} {:>5} {:>5}  {:>9} [{:>9},{:>9}] {:>9} {:>9} {:>7} {:>7} {:>3}/{}",
            c.axis.to_string(),
            c.optimizer.to_string(),
            scaling_name(c.beta),
            c.init.to_string(),
            c.lr_ratio,
            c.width,
            c.rank,
            lr,
            opt_f(c.lr_opt_ci_low, 2),
            opt_f(c.lr_opt_ci_high, 2),
            opt_f(c.predicted_lr, 2),
            opt_f(c.loss_at_opt, 3),
            c.effective_rank.map_or("-".into(), |v| format!("{v:.1}")),
            c.stable_rank.map_or("-".into(), |v| format!("{v:.1}")),
            c.diverged_runs,
            c.runs
        );
    }
}

fn interval(e: &Exponent) -> String {
    match (e.slope, e.ci_low, e.ci_high) {
        (Some(s), Some(l), Some(h)) => format!("{s:>6.2} [{l:>6.2},{h:>6.2}]"),
        (Some(s), _, _) => format!("{s:>6.2} [    -,     -]"),
        _ => "     -                 ".into(),
    }
}

fn print_exponents(s: &TransferSummary) {
    println!(
        "\nExponent c of lr* ~ r^c (axis rank) and ~ d^c (axis width); law = the long-horizon law, 1-step = the one-step law:\n{:<5} {:<6} {:<9} {:>4} {:>5}  {:<23} {:>6} {:>6} {:>6}  {:<12} {:<12} {:<12} reason",
        "axis", "opt", "scaling", "init", "ratio", "c [90% CI]", "law", "1-step", "band", "vs law", "vs 1-step", "vs c = 0"
    );
    for e in &s.exponents {
        println!(
            "{:<5} {:<6} {:<9} {:>4} {:>5}  {:<23} {:>6} {:>6} {:>6.2}  {:<12} {:<12} {:<12} {}",
            e.axis.to_string(),
            e.optimizer.to_string(),
            scaling_name(e.beta),
            e.init.to_string(),
            e.lr_ratio,
            interval(e),
            law_f(e.predicted),
            law_f(e.first_step),
            e.band,
            e.outcome.to_string(),
            e.first_step_outcome.to_string(),
            e.flat.to_string(),
            e.reason
        );
    }
}

fn print_findings(s: &TransferSummary) {
    println!("\nPublished claims:");
    for f in &s.findings {
        println!(
            "- [{}] {} ({}) on {}: {}",
            f.verdict, f.claim, f.source, f.setting, f.rests_on
        );
    }
}

/// The study in a few sentences, the same as the report's first screen: per rank
/// exponent of lr*, the measurement, the long-horizon law and whether c = 0 holds.
pub fn verdict_sentences(s: &TransferSummary) -> Vec<String> {
    rankstab_report::analyse::transfer_sentences(s)
        .into_iter()
        .map(|x| x.text)
        .collect()
}
