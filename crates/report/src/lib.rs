//! Theory-versus-observation reports for rank-stabilized LoRA.
//!
//! Reads any set of run directories (`rankstab theory` and `rankstab train`, the shared
//! record format of `rankstab-records`), fits rank exponents with confidence intervals, judges
//! them by the one rule of `rankstab_theory::predict::verdict` (their laws, rival laws,
//! stability), shows the Monte Carlo beside them, and writes a
//! self-contained `index.html`, a `report.md`, `exponents.csv` and `figures/` (PNG and SVG).
//! Learning-rate transfer studies (`rankstab transfer`) get a section of their own, from
//! their `transfer.json` as written: loss-vs-learning-rate curves, lr* against rank with the
//! law's line, the loss at lr* and the update's effective rank, the exponents of lr*, the
//! published claims, and one sentence per rank exponent on the first screen.
//!
//! The stages are separate modules: [`load`] (files to records, reporting unusable
//! directories), [`analyse`] (pure statistics and figure data), [`figures`] (plotters, in
//! memory), [`render`] (templates); [`build_report`] runs them and writes the files.
//!
//! ```no_run
//! use rankstab_report::{build_report, ReportOptions};
//! let out = build_report(&["runs/theory".into()], std::path::Path::new("reports/x"), &ReportOptions::default()).unwrap();
//! println!("{}", out.index_html.display());
//! ```

pub mod analyse;
mod error;
pub mod figures;
pub mod load;
pub mod render;

pub use analyse::{AnalysisOptions, ExponentRow, Headline, Sentence};
pub use error::ReportError;
pub use load::{RunKind, Skipped};

use error::io_err;
use std::path::{Component, Path, PathBuf};

/// Options of a report.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Analysis settings (step windows, panels).
    pub analysis: AnalysisOptions,
    /// The repository's `proofs/` directory, for relative links (plain names when unknown).
    pub proofs_dir: Option<PathBuf>,
    /// Page title.
    pub title: String,
    /// Revision of the tool writing the report.
    pub git_revision: Option<String>,
    /// Generation time to print (RFC 3339); now when `None`. Fixed in tests and examples so
    /// a committed report does not change when rebuilt.
    pub generated: Option<String>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            analysis: AnalysisOptions::default(),
            proofs_dir: None,
            title: "rankstab report: rank stabilization, theory versus observation".into(),
            git_revision: None,
            generated: None,
        }
    }
}

/// What [`build_report`] wrote.
#[derive(Debug, Clone)]
pub struct ReportOutcome {
    /// `OUT/index.html`.
    pub index_html: PathBuf,
    /// `OUT/report.md`.
    pub report_md: PathBuf,
    /// `OUT/exponents.csv`.
    pub exponents_csv: PathBuf,
    /// Run directories used.
    pub used: Vec<PathBuf>,
    /// Directories not used, with reasons.
    pub skipped: Vec<Skipped>,
    /// Figures written (each as PNG and SVG).
    pub figures: usize,
    /// Exponent rows written.
    pub exponents: usize,
    /// The verdicts in one line per section ("theory RUN: ...", "training: ..." and
    /// "transfer RUN: ..."), the headlines the page shows.
    pub verdicts: Vec<String>,
    /// The verdict in plain sentences (the page's first screen).
    pub headline: Headline,
}

/// The verdict of the runs under `run_dirs` in plain sentences, one per source and setting
/// ("Under AdamW in training gpt-j-mini (5 ranks 4-64, 6 seeds ...): standard LoRA's shrink
/// with rank ...; rsLoRA's are rank-flat ... Rank-stable here: rsLoRA; the theorem's
/// prediction holds for every fit."), from the fits judged as the report judges them.
///
/// # Errors
/// As [`build_report`]'s loading: [`ReportError::NoUsableRuns`], damaged runs, and
/// [`ReportError::SharedSeed`] for runs sharing a seed under different configurations.
pub fn headline(run_dirs: &[PathBuf]) -> Result<Headline, ReportError> {
    let (runs, skipped) = load::load_runs(run_dirs)?;
    Ok(analyse::analyse(&runs, &skipped, &AnalysisOptions::default()).headline)
}

/// Where the report's links to the derivations point, and what to write for them: a path
/// relative to the report when it is written inside the repository that holds `proofs_dir`
/// (nothing copied), else `proofs/` next to the report, filled with the built-in copies.
fn proofs_links(proofs_dir: Option<&Path>, out_abs: &Path) -> (String, String, bool) {
    if let Some(p) = proofs_dir.map(absolute) {
        if p.parent().is_some_and(|repo| out_abs.starts_with(repo)) {
            let rel = relative_to(&p, out_abs);
            return (
                format!("{}/", rel.display()),
                format!("links are relative to this report: {}", rel.display()),
                false,
            );
        }
    }
    (
        "proofs/".into(),
        "a copy of the rankstab repository's proofs/ folder, written next to this report".into(),
        true,
    )
}

/// Reads `run_dirs`, analyses them and writes the report into `out` (created if needed;
/// files of an earlier report there are replaced).
///
/// # Errors
/// [`ReportError::NoUsableRuns`] when none of the directories can be used (the others are
/// listed in [`ReportOutcome::skipped`]); I/O, plotting or template errors.
/// A report is never written into a run directory (or a sweep's), nor inside one of the
/// directories it reads: its files would mix with the run's and be read as part of it.
fn refuse_run_dir_as_out(run_dirs: &[PathBuf], out: &Path) -> Result<(), ReportError> {
    let out_abs = absolute(out);
    for dir in out_abs.ancestors() {
        for marker in [rankstab_records::files::MANIFEST, "sweep.json"] {
            if dir.join(marker).is_file() {
                return Err(ReportError::Invalid {
                    path: out.to_path_buf(),
                    what: format!(
                        "is inside the run directory {} (it holds {marker}): choose a --out outside every run directory",
                        dir.display()
                    ),
                });
            }
        }
    }
    for run in run_dirs {
        let run_abs = absolute(run);
        if out_abs.starts_with(&run_abs) {
            return Err(ReportError::Invalid {
                path: out.to_path_buf(),
                what: format!(
                    "is inside {}, which the report reads: choose a --out outside the run directories",
                    run.display()
                ),
            });
        }
    }
    Ok(())
}

pub fn build_report(
    run_dirs: &[PathBuf],
    out: &Path,
    opts: &ReportOptions,
) -> Result<ReportOutcome, ReportError> {
    refuse_run_dir_as_out(run_dirs, out)?;
    let (runs, skipped) = load::load_runs(run_dirs)?;
    let analysis = analyse::analyse(&runs, &skipped, &opts.analysis);
    let figures: Vec<figures::Figure> = analysis
        .plots
        .iter()
        .map(figures::draw)
        .collect::<Result<_, _>>()?;

    std::fs::create_dir_all(out.join("figures")).map_err(io_err(out))?;
    let out_abs = absolute(out);
    let (proofs_href, proofs_where, copy_proofs) =
        proofs_links(opts.proofs_dir.as_deref(), &out_abs);
    if copy_proofs {
        std::fs::create_dir_all(out.join("proofs")).map_err(io_err(out))?;
        for (file, text) in render::PROOF_TEXTS {
            write(&out.join("proofs").join(file), text.as_bytes())?;
        }
    }
    let meta = render::PageMeta {
        title: opts.title.clone(),
        generated: opts.generated.clone().unwrap_or_else(|| {
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        }),
        tool: format!("rankstab {}", env!("CARGO_PKG_VERSION")),
        git_revision: opts
            .git_revision
            .clone()
            .unwrap_or_else(|| "unknown".into()),
        inputs: run_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        proofs_href,
        proofs_where,
    };
    for f in &figures {
        write(&out.join("figures").join(format!("{}.png", f.name)), &f.png)?;
        write(
            &out.join("figures").join(format!("{}.svg", f.name)),
            f.svg.as_bytes(),
        )?;
    }
    let rows: Vec<&ExponentRow> = analysis
        .theory
        .iter()
        .flat_map(|s| s.rows.iter())
        .chain(analysis.train.iter().flat_map(|t| t.rows.iter()))
        .collect();
    let exponents_csv = out.join("exponents.csv");
    write_csv(&exponents_csv, &rows)?;
    let html = render::html(&meta, &analysis, &figures)?;
    let md = render::markdown(&meta, &analysis, &figures)?;
    let index_html = out.join("index.html");
    let report_md = out.join("report.md");
    write(&index_html, html.as_bytes())?;
    write(&report_md, md.as_bytes())?;
    Ok(ReportOutcome {
        index_html,
        report_md,
        exponents_csv,
        used: runs.iter().map(|r| r.dir.clone()).collect(),
        skipped,
        figures: figures.len(),
        exponents: rows.len(),
        verdicts: analysis
            .theory
            .iter()
            .map(|t| format!("theory {}: {}", t.run, t.headline))
            .chain(
                analysis
                    .train
                    .iter()
                    .map(|t| format!("training ({} runs): {}", t.runs, t.headline)),
            )
            .chain(
                analysis
                    .transfer
                    .iter()
                    .map(|t| format!("transfer {}: {}", t.run, t.headline)),
            )
            .collect(),
        headline: analysis.headline,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    std::fs::write(path, bytes).map_err(io_err(path))
}

fn write_csv(path: &Path, rows: &[&ExponentRow]) -> Result<(), ReportError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r).map_err(|e| ReportError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    if rows.is_empty() {
        w.write_record([
            "source", "model", "module", "layer", "window", "site", "stat", "m", "slope",
        ])
        .map_err(|e| ReportError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    let bytes = w.into_inner().map_err(|e| ReportError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    write(path, &bytes)
}

fn absolute(p: &Path) -> PathBuf {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|c| c.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    // Lexical normalisation (the output directory may not exist yet).
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// `target` relative to the directory `base` (both absolute and normalised).
///
/// ```
/// use std::path::Path;
/// let rel = rankstab_report::relative_to(Path::new("/repo/proofs"), Path::new("/repo/reports/2024"));
/// assert_eq!(rel, Path::new("../../proofs"));
/// ```
pub fn relative_to(target: &Path, base: &Path) -> PathBuf {
    let t: Vec<Component> = target.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}
