//! `rankstab report`.
use anyhow::{bail, Context, Result};
use clap::Args;
use rankstab_report::{build_report, AnalysisOptions, ReportOptions};
use std::path::{Path, PathBuf};

/// Options of `rankstab report`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab report runs/audit-20240101-120000/theory
  rankstab report runs/theory runs/sweep/cell-*/ --out reports/sweep
  rankstab report runs/sweep                     # a directory of run directories

Reads theory and training run directories (manifest.json, moments.csv, metrics.csv, fits.json),
merges training cells, fits rank exponents with 95% intervals, judges them against their laws and
rival laws (three outcomes, bands derived from the ranks and the laws' errors, no tolerance to
set), shows the Monte Carlo beside them, and writes OUT/index.html (self-contained), OUT/report.md,
OUT/exponents.csv and OUT/figures/ (PNG and SVG). Directories it cannot use are listed with the
reason; it fails only when none is usable.")]
pub struct ReportArgs {
    /// Run directories (or directories holding run directories).
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Output directory [default: reports/<time>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Step windows (after step 0) for training exponents.
    #[arg(long, default_value_t = 3)]
    windows: usize,
    /// Most panels (steps) per moment-vs-rank figure.
    #[arg(long, default_value_t = 4)]
    max_panels: usize,
    /// Page title.
    #[arg(long)]
    title: Option<String>,
    /// Generation time printed in the report (RFC 3339) instead of now, for reproducible reports.
    #[arg(long, value_name = "TIME", hide = true)]
    generated: Option<String>,
    /// Print one JSON line {"event":"report", index_html, report_md, used, not_used,
    /// figures, exponents, verdict} instead of text.
    #[arg(long)]
    json: bool,
}

/// The repository's proofs/ folder: from the current directory upwards, then from the
/// executable's location upwards (target/release/rankstab sits inside the repository).
fn find_proofs() -> Option<PathBuf> {
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf)),
    ];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let p = dir.join("proofs");
            if p.join("README.md").is_file() && p.join("finite-rank.md").is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs `rankstab report`.
pub fn run(args: ReportArgs) -> Result<()> {
    if args.windows == 0 || args.max_panels == 0 {
        bail!("--windows and --max-panels must be at least 1");
    }
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("reports").join(chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string())
    });
    let mut opts = ReportOptions {
        analysis: AnalysisOptions {
            windows: args.windows,
            max_panels: args.max_panels,
        },
        proofs_dir: find_proofs(),
        git_revision: crate::git_revision(),
        generated: args.generated,
        ..ReportOptions::default()
    };
    if let Some(t) = args.title {
        opts.title = t;
    }
    let outcome = build_report(&args.runs, &out, &opts)
        .with_context(|| format!("report into {}", out.display()))?;
    for s in &outcome.skipped {
        eprintln!("rankstab: not used: {}: {}", s.dir.display(), s.reason);
    }
    if args.json {
        crate::json_line(&serde_json::json!({
            "event": "report",
            "index_html": outcome.index_html,
            "report_md": outcome.report_md,
            "used": outcome.used.len(),
            "not_used": outcome.skipped.len(),
            "figures": outcome.figures,
            "exponents": outcome.exponents,
            "verdict": outcome.headline.sentences,
        }));
        return Ok(());
    }
    println!(
        "Report: {} run director{} used, {} not used, {} figures, {} exponents.",
        outcome.used.len(),
        if outcome.used.len() == 1 { "y" } else { "ies" },
        outcome.skipped.len(),
        outcome.figures,
        outcome.exponents
    );
    for v in &outcome.verdicts {
        println!("Verdicts, {v}.");
    }
    crate::print_headline(&outcome.headline);
    println!("Markdown: {}", outcome.report_md.display());
    println!("{}", outcome.index_html.display());
    Ok(())
}
