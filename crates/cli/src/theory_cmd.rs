//! `rankstab theory`.
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rankstab_records::{Fit, Optimizer, Outcome, Rival, Scaling};
use rankstab_theory::{Activation, Init, Loss, Reuse, RunOptions, TheoryConfig};
use std::path::PathBuf;

/// Options of `rankstab theory`. Every option overrides the config file's value.
#[derive(Args, Debug, Default)]
#[command(after_help = "\
Examples:
  rankstab theory
      the default: ranks 4..2048, width 4096, SGD and Adam, lora/rslora/constant,
      coherent and fresh inputs; about 2 minutes on 2 cores
  rankstab theory --width 512 --ranks 4,8,16,32,64,128 --trials 8 --out runs/w512
  rankstab theory --optimizers sgd --betas 0.25,0.5,0.75 --dist mean-shift:1
  rankstab theory --config my.toml --steps 10

Config file (TOML): any field of the run's manifest.json 'config', e.g.
  width = 1024
  ranks = [4, 16, 64, 256]
  optimizers = [\"sgd\", \"adamw\"]
  dist = \"student-t:6\"

Writes OUT/manifest.json, moments.csv, metrics.csv, summary.csv, fits.json, checks.json.
Running the same command again resumes an interrupted run.")]
pub struct TheoryArgs {
    /// TOML config file (unknown keys are errors).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Adapter ranks.
    #[arg(long, value_delimiter = ',', value_name = "R,...")]
    ranks: Option<Vec<usize>>,
    /// Width d of every layer.
    #[arg(long, value_name = "N")]
    width: Option<usize>,
    /// Number of adapted layers.
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// Non-linearity: identity, relu, gelu.
    #[arg(long)]
    activation: Option<Activation>,
    /// RMSNorm before each layer.
    #[arg(long)]
    rmsnorm: bool,
    /// Residual connection around each layer.
    #[arg(long)]
    residual: bool,
    /// Init of A: kaiming-uniform (PEFT default), gaussian, peft-gaussian (std 1/r).
    #[arg(long)]
    init: Option<Init>,
    /// Scaling numerator alpha.
    #[arg(long)]
    alpha: Option<f64>,
    /// Optimizers: sgd, sgd-momentum, adam, adamw.
    #[arg(long, value_delimiter = ',', value_name = "OPT,...")]
    optimizers: Option<Vec<Optimizer>>,
    /// Scalings: lora, rslora, constant, beta=B (a bare number is a beta too).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "betas",
        value_name = "S,..."
    )]
    scalings: Option<Vec<Scaling>>,
    /// Scaling exponents beta (gamma_r = alpha r^-beta).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        value_name = "B,..."
    )]
    betas: Option<Vec<f64>>,
    /// Input regimes: coherent (one batch reused), fresh (new batch every step).
    #[arg(long, value_delimiter = ',', value_name = "REGIME,...")]
    inputs: Option<Vec<Reuse>>,
    /// Input distribution: gaussian, rademacher, student-t:NU, mean-shift:MU, low-rank:K.
    #[arg(long)]
    dist: Option<String>,
    /// Training batch size.
    #[arg(long)]
    batch: Option<usize>,
    /// Held-out batch size.
    #[arg(long)]
    heldout: Option<usize>,
    /// Loss: mse (random linear teacher) or ce (cross-entropy through a readout).
    #[arg(long)]
    loss: Option<Loss>,
    /// Optimisation steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Independent trials (seeds) per cell.
    #[arg(long)]
    trials: Option<usize>,
    /// Base seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Moment orders m.
    #[arg(long, value_delimiter = ',', value_name = "M,...")]
    moments: Option<Vec<u32>>,
    /// Learning rate for every optimizer (overrides --lr-sgd and --lr-adam).
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// Learning rate of SGD-family optimizers.
    #[arg(long, allow_hyphen_values = true)]
    lr_sgd: Option<f64>,
    /// Learning rate of Adam-family optimizers.
    #[arg(long, allow_hyphen_values = true)]
    lr_adam: Option<f64>,
    /// Weight decay (L2 for adam, decoupled for adamw; SGD ignores it).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Momentum of sgd-momentum.
    #[arg(long)]
    momentum: Option<f64>,
    /// Adam beta1.
    #[arg(long)]
    adam_beta1: Option<f64>,
    /// Adam beta2.
    #[arg(long)]
    adam_beta2: Option<f64>,
    /// Adam epsilon.
    #[arg(long)]
    adam_eps: Option<f64>,
    /// Classes of the cross-entropy readout (--loss ce).
    #[arg(long)]
    classes: Option<usize>,
    /// Also compute ||gamma B A||_F at every step (costs 4 d r^2 per cell and step: at width
    /// 4096 and rank 2048 more than everything else together).
    #[arg(long)]
    delta_norm: bool,
    /// Worker threads (default: all cores; 1..=1024). Results do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Refuse the run if its up-front memory estimate exceeds SIZE (e.g. 16G, 512M);
    /// default: this machine's available memory.
    #[arg(long, value_name = "SIZE", value_parser = rankstab_records::guard::parse_memory)]
    max_memory: Option<u64>,
    /// Run directory (default runs/theory-<time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print fits of every step, not only the last.
    #[arg(long)]
    all_steps: bool,
    /// Print fits.json to stdout instead of the table.
    #[arg(long)]
    json: bool,
}

/// The synthetic studies' config file (`theory`, `transfer`) parsed by `parse`, or the
/// defaults when none is given; errors name the file.
pub(crate) fn read_config<T: Default>(
    path: Option<&std::path::Path>,
    parse: impl FnOnce(&str) -> Result<T, rankstab_theory::TheoryError>,
) -> Result<T> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read config file {}", p.display()))?;
    parse(&text).with_context(|| format!("config file {}", p.display()))
}

/// What the synthetic studies (`theory`, `transfer`) check and set up before they run:
/// `--threads` within 1..=1024, the run directory (default `runs/<command>-<time>`) and the
/// run options.
pub(crate) fn study_setup(
    command: &str,
    threads: Option<usize>,
    out: Option<&std::path::Path>,
    max_memory: Option<u64>,
) -> Result<(PathBuf, RunOptions)> {
    if let Some(t) = threads.filter(|t| !(1..=1024).contains(t)) {
        bail!("--threads {t} is not allowed: use 1..=1024 (one worker per core is fastest)");
    }
    let out = out.map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from("runs").join(format!(
            "{command}-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    let opts = RunOptions {
        threads,
        git_revision: crate::git_revision(),
        max_trials_this_run: None,
        max_memory,
    };
    Ok((out, opts))
}

/// The config file (or defaults) with the command-line overrides applied.
pub fn resolve_config(a: &TheoryArgs) -> Result<TheoryConfig> {
    let mut c = read_config(a.config.as_deref(), TheoryConfig::from_toml)?;
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { c.$f = v; } )* };
    }
    set!(
        ranks,
        width,
        layers,
        activation,
        init,
        alpha,
        optimizers,
        scalings,
        inputs,
        dist,
        batch,
        heldout,
        loss,
        classes,
        steps,
        trials,
        seed,
        moments,
        lr_sgd,
        lr_adam,
        weight_decay,
        momentum,
        adam_beta1,
        adam_beta2,
        adam_eps
    );
    if let Some(b) = &a.betas {
        c.scalings = b
            .iter()
            .map(|&b| Scaling::from_beta(b))
            .collect::<Result<_, _>>()
            .context("--betas")?;
    }
    if let Some(lr) = a.lr {
        c.lr_sgd = lr;
        c.lr_adam = lr;
    }
    c.rmsnorm |= a.rmsnorm;
    c.residual |= a.residual;
    c.delta_norm |= a.delta_norm;
    c.validate()?;
    Ok(c)
}

/// The progress of the synthetic studies (`theory`, `transfer`): a bar on a terminal;
/// off a terminal, when `lines` names the command, a line per message instead.
pub(crate) struct Bar {
    pub(crate) bar: ProgressBar,
    pub(crate) lines: Option<&'static str>,
}

impl Bar {
    /// A bar whose line reads `template` (indicatif's syntax).
    pub(crate) fn new(template: &str, lines: Option<&'static str>) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
        Bar { bar, lines }
    }
}

impl rankstab_theory::Progress for Bar {
    fn start(&self, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(0);
    }
    fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
    fn message(&self, msg: &str) {
        tracing::info!("{msg}");
        self.bar.set_message(msg.to_string());
        if let Some(what) = self.lines {
            if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprintln!(
                    "{what}: {msg} ({}/{} done, {:.0} s)",
                    self.bar.position(),
                    self.bar.length().unwrap_or(0),
                    self.bar.elapsed().as_secs_f64()
                );
            }
        }
    }
}

pub fn run(a: TheoryArgs) -> Result<()> {
    let cfg = resolve_config(&a)?;
    let (out, opts) = study_setup("theory", a.threads, a.out.as_deref(), a.max_memory)?;
    let progress = Bar::new(
        "{spinner} theory [{elapsed_precise}] {bar:30} {pos}/{len} cells ({eta}) {msg}",
        None,
    );
    let t0 = std::time::Instant::now();
    crate::interrupt::running(&out, "rankstab theory");
    let outcome = rankstab_theory::run(&cfg, &out, &opts, &progress)?;
    progress.bar.finish_and_clear();
    if a.json {
        // One JSON object on one line (every command's --json).
        let verdict = crate::verdict_of(&outcome.dir)
            .map(|h| h.sentences)
            .unwrap_or_default();
        crate::json_line(&serde_json::json!({
            "event": "theory", "run_dir": out, "fits": outcome.fits, "verdict": verdict,
        }));
        return Ok(());
    }
    print_table(&outcome.fits, cfg.steps as u32, a.all_steps);
    print_discrimination(&outcome.fits, cfg.steps as u32);
    let t = rankstab_theory::predict::verdict::tally(&outcome.fits);
    println!(
        "\n{} fits, {} with a law; {}.",
        t.fits,
        t.predicted,
        t.headline()
    );
    println!(
        "(the table's intervals are 95% intervals of the slope over trials; outcomes come from 90% intervals of the \
         paired difference from the law, Benjamini-Hochberg at 5% over the run's fits, and bands from the moment \
         order, the fitted ranks and the law's known error: proofs/verdicts.md)"
    );
    if !outcome.checks.is_empty() {
        let (distinct, within) = rankstab_theory::distinct_checks(&outcome.checks);
        let worst = outcome
            .checks
            .iter()
            .map(|c| c.rel_diff.abs())
            .fold(0.0, f64::max);
        println!(
            "Exact first-step SGD moment: Monte Carlo within the 95% interval of the closed form in {within} of {distinct} \
             distinct checks ({} cells; gamma cancels and held-out inputs are shared; largest relative difference {:.1}%).",
            outcome.checks.len(),
            100.0 * worst
        );
    }
    println!(
        "Run directory: {} ({:.1} s)",
        outcome.dir.display(),
        t0.elapsed().as_secs_f64()
    );
    // The same sentences as the report's first screen, from the run as the report judges it.
    if let Some(h) = crate::verdict_of(&outcome.dir) {
        crate::print_headline(&h);
    }
    Ok(())
}

/// The site as the table shows it: with the layer when it is not the first.
fn site_at(f: &Fit) -> String {
    if f.layer > 0 {
        format!("{}@{}", f.site, f.layer)
    } else {
        f.site.to_string()
    }
}

/// The fits of the last step (or every step): slope, the law's slope and band, the
/// outcome, the stability verdict and the distinct rivals rejected.
fn print_table(fits: &[Fit], last: u32, all_steps: bool) {
    println!(
        "{:<12} {:<9} {:<9} {:<12} {:<11} {:>1} {:>4} {:>7} {:>17} {:>7} {:>6}  {:<12} {:<12} rivals rejected",
        "optimizer", "scaling", "inputs", "site", "stat", "m", "step", "slope", "95% CI", "law", "band", "outcome",
        "verdict"
    );
    for f in fits.iter().filter(|f| all_steps || f.step == last) {
        let rejected: Vec<String> = f
            .rivals
            .iter()
            .filter(|r| r.distinct && r.rejected)
            .map(|r| r.rival.to_string())
            .collect();
        println!(
            "{:<12} {:<9} {:<9} {:<12} {:<11} {:>1} {:>4} {:>7.3} [{:>7.3},{:>7.3}] {:>7.3} {:>6.3}  {:<12} {:<12} {}",
            f.optimizer,
            f.scaling,
            f.inputs,
            site_at(f),
            f.stat,
            f.m,
            f.step,
            f.slope,
            f.ci_low,
            f.ci_high,
            f.predicted,
            f.band,
            f.outcome,
            f.verdict,
            if rejected.is_empty() { "-".to_string() } else { rejected.join(",") }
        );
    }
}

/// Per setting (optimizer, scaling, inputs, site) at the last step: which rival laws the
/// data rule out, and which they do not (over every statistic and order of the setting).
fn print_discrimination(fits: &[Fit], last: u32) {
    type Key = (
        rankstab_records::Optimizer,
        rankstab_records::Scaling,
        String,
        String,
    );
    let mut by: std::collections::BTreeMap<
        Key,
        (
            usize,
            usize,
            std::collections::BTreeMap<Rival, (usize, usize)>,
        ),
    > = std::collections::BTreeMap::new();
    for f in fits.iter().filter(|f| f.step == last && f.layer == 0) {
        let e = by
            .entry((f.optimizer, f.scaling, f.inputs.clone(), f.site.to_string()))
            .or_default();
        e.0 += 1;
        e.1 += usize::from(f.outcome == Outcome::Agrees);
        for r in f.rivals.iter().filter(|r| r.distinct) {
            let c = e.2.entry(r.rival).or_default();
            c.0 += 1;
            c.1 += usize::from(r.rejected);
        }
    }
    println!("\nWhat the data rule out (last step, layer 0; per setting: rival rejected in k of n fits where it differs from the law):");
    println!(
        "{:<12} {:<9} {:<9} {:<12} {:>9}  rivals",
        "optimizer", "scaling", "inputs", "site", "agree"
    );
    for ((opt, scaling, inputs, site), (n, agree, rivals)) in &by {
        let parts: Vec<String> = rivals
            .iter()
            .map(|(r, (n, k))| format!("{r} {k}/{n}"))
            .collect();
        println!(
            "{:<12} {:<9} {:<9} {:<12} {:>9}  {}",
            opt,
            scaling,
            inputs,
            site,
            format!("{agree}/{n}"),
            if parts.is_empty() {
                "no distinct rival".into()
            } else {
                parts.join(", ")
            }
        );
    }
}
