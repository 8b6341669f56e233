//! `rankstab`: one command-line tool for the rank-stabilisation checks.
//!
//! Argument parsing, config files, progress and printing live here; the science lives in
//! the library crates. Every error ends the process with one line and exit code 2.
mod audit_cmd;
mod eval_cmd;
mod interrupt;
mod progress;
mod report_cmd;
mod slurm;
mod sweep_cmd;
mod tensorboard;
mod theory_cmd;
mod train_cmd;
mod transfer_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Verification and analysis tools for rank-stabilized LoRA (rsLoRA).
#[derive(Parser, Debug)]
#[command(name = "rankstab", version = VERSION, about, long_about = None, after_help = "\
Examples:
  rankstab theory                                  # the default check (~2 min on 2 cores)
  rankstab theory --width 256 --ranks 4,16,64 --trials 4 --out runs/small
  rankstab theory --config theory.toml --optimizers adamw --scalings rslora,0.75
  rankstab eval --model path/to/hf-model-dir --text book.txt --json
  rankstab sweep --out runs/sweep                  # the default sweep of make audit (~5 min)
  rankstab report runs/sweep runs/theory --out reports/mine
  rankstab audit --model DIR --adapters peft/r8 peft/r32 peft/r128 --data book.txt
  rankstab transfer                                # lr* across ranks (~30 s on 2 cores)

Logs go to stderr; set RUST_LOG=debug for more.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Monte Carlo check of Theorem 3.2 on synthetic networks: moments across ranks,
    /// fitted rank exponents with confidence intervals, verdicts against the prediction.
    Theory(Box<theory_cmd::TheoryArgs>),
    /// Token count, mean NLL and perplexity of a Llama or GPT-J model on a text.
    Eval(eval_cmd::EvalArgs),
    /// Greedy generation from a Llama or GPT-J model (chat template when it has one).
    Generate(eval_cmd::GenerateArgs),
    /// Theory versus observation: figures, tables and verdicts from run directories.
    Report(report_cmd::ReportArgs),
    /// One instrumented LoRA / rsLoRA fine-tuning run of a Llama or GPT-J model on a text.
    Train(Box<train_cmd::TrainArgs>),
    /// A rank sweep: models x ranks x scalings x optimizers x seeds, one run directory per
    /// cell; finished cells are skipped, killed ones resume.
    Sweep(sweep_cmd::SweepArgs),
    /// The training probes' statistics of PEFT / TRL / rankstab adapters (any ranks, any
    /// checkpoints) on a fixed data sample, and the rank exponents across them.
    Audit(Box<audit_cmd::AuditArgs>),
    /// Does the learning rate transfer across ranks? Optimal learning rates per rank on
    /// synthetic networks, their exponent against the one-step law and published claims.
    Transfer(Box<transfer_cmd::TransferArgs>),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    // The commands that run models on libtorch.
    let torch = matches!(
        cli.command,
        Command::Train(_)
            | Command::Sweep(_)
            | Command::Eval(_)
            | Command::Generate(_)
            | Command::Audit(_)
    );
    if torch {
        passive_openmp();
    }
    interrupt::install();
    // Before libtorch starts its threads: subnormal gradients make CPU training many times
    // slower (see rankstab_train::device::flush_denormals).
    if torch {
        rankstab_train::device::flush_denormals();
    }
    let result = match cli.command {
        Command::Theory(args) => theory_cmd::run(*args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Train(args) => train_cmd::run(*args),
        Command::Sweep(args) => sweep_cmd::run(args),
        Command::Generate(args) => eval_cmd::run_generate(args),
        Command::Report(args) => report_cmd::run(args),
        Command::Audit(args) => audit_cmd::run(*args),
        Command::Transfer(args) => transfer_cmd::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if stopped(&e) => {
            eprintln!("rankstab: {}", one_line(&e));
            ExitCode::from(interrupt::EXIT_STOPPED)
        }
        Err(e) => {
            eprintln!("rankstab: error: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// Whether `e` is a training run stopped on a signal with a checkpoint.
fn stopped(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<rankstab_train::TrainError>(),
            Some(rankstab_train::TrainError::Stopped { .. })
        )
    })
}

/// Runs libtorch's OpenMP threads with `OMP_WAIT_POLICY=PASSIVE` unless the user set a
/// policy: idle threads then sleep instead of spinning. On a machine where anything else
/// runs (a build, another run), spinning threads take the cores from the ones with work
/// and a training step gets several times slower (measured: 3 to 4 times on 2 cores beside
/// a build; see the README's "Threads" under "Training and sweeps"). libgomp reads the variable when it is loaded,
/// before `main`, so the process re-executes itself once with it set (same pid, same
/// arguments); if that fails it goes on as it is.
fn passive_openmp() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    tracing::debug!("could not re-execute with OMP_WAIT_POLICY=PASSIVE: {err}");
}

/// Help and version print as clap prints them; a usage error is one line on stderr (the
/// first line of clap's message, which names the flag, the value and what is allowed), exit
/// code 2.
fn clap_exit(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let text = e.render().to_string();
    // clap's message up to its usage block, on one line (a missing argument is named on
    // the line after "the following required arguments were not provided:").
    let body: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = body.join(" ");
    let line = line.trim_start_matches("error: ");
    eprintln!(
        "rankstab: error: {}",
        if line.is_empty() {
            "invalid arguments"
        } else {
            line
        }
    );
    ExitCode::from(2)
}

/// The error and its causes on one line, without repeating a cause that the message
/// already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The git revision this binary was built from (baked in by build.rs; "-modified" when
/// its sources differed from that commit), None when it was built outside a checkout.
pub(crate) fn git_revision() -> Option<String> {
    let r = env!("RANKSTAB_GIT_REVISION");
    (r != "unknown").then(|| r.to_string())
}

/// Prints one JSON object on one line of stdout (`--json` output: one object per line, each
/// with an `event` field saying what it is; see the README's "Machine-readable output").
pub(crate) fn json_line(v: &serde_json::Value) {
    println!("{v}");
}

/// `rankstab --version`: the crate version and the revision it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("RANKSTAB_GIT_REVISION"),
    ")"
);

/// "cpu (N threads)", or "cuda:N" with the CUDA_VISIBLE_DEVICES a scheduler set.
pub(crate) fn device_description(device: tch::Device) -> String {
    match device {
        // A scheduler's GPU: which physical one it is.
        tch::Device::Cuda(i) => match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if !v.is_empty() => format!("cuda:{i} (CUDA_VISIBLE_DEVICES={v})"),
            _ => format!("cuda:{i}"),
        },
        _ => format!("cpu ({} threads)", tch::get_num_threads()),
    }
}

/// The verdict of the runs under `dir` as the report judges them, or None with a warning
/// on stderr when it cannot be had.
pub(crate) fn verdict_of(dir: &std::path::Path) -> Option<rankstab_report::Headline> {
    rankstab_report::headline(&[dir.to_path_buf()])
        .map_err(|e| eprintln!("rankstab: no verdict sentences: {e}"))
        .ok()
}

/// What every run directory's manifest records about the binary and the device.
pub(crate) fn run_meta(
    device: tch::Device,
    extra: serde_json::Value,
) -> rankstab_train::run::RunMeta {
    rankstab_train::run::RunMeta {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: git_revision(),
        device: device_description(device),
        extra,
    }
}

/// The verdict in plain sentences, one per source and setting, at the end of `theory`,
/// `sweep` and `report` (the one screen a user reads).
pub(crate) fn print_headline(h: &rankstab_report::Headline) {
    if h.sentences.is_empty() {
        return;
    }
    println!("\nVerdict (is it rank-stable?):");
    for s in &h.sentences {
        let tag = match s.outcome {
            rankstab_records::Outcome::Agrees => "AGREES",
            rankstab_records::Outcome::Disagrees => "DISAGREES",
            rankstab_records::Outcome::Inconclusive => "INCONCLUSIVE",
        };
        println!("* [{} {tag}] {}", s.source, s.text);
    }
}
