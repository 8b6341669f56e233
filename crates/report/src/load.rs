//! Loading run directories: manifest first (schema version, command), then the tables.
//!
//! A directory that cannot be used is reported with the reason ([`Skipped`]) and the
//! others are still used; [`load_runs`] fails only when nothing is usable.
//!
//! **Finding runs** ([`expand`]). A directory with `manifest.json` is a run directory; what
//! lies inside it (`checkpoint/`, `adapters/`) belongs to the run and is not searched. A
//! directory without one stands for every run directory beneath it, at any depth (a sweep's
//! `cells/<cell>/`, or `runs/audit-<time>/` holding `theory/` and `sweep/cells/*/`); such
//! containers, a sweep's `sweep.json` among them, are not runs and are not reported.
//! Reported as not used, with the reason: a given directory with no run beneath it, a
//! directory beneath that holds run files (`moments.csv`, `metrics.csv`, `fits.json`,
//! `checkpoint/`) or sits in a sweep's `cells/` but has no `manifest.json`, and, in one line
//! per sweep, the cells its `sweep.json` lists that have no directory yet (not started).
//! Hidden directories and symbolic links met on the way down are not followed.
//!
//! **Transfer studies** (`rankstab transfer`, command `transfer`) are runs of their own kind:
//! no `moments.csv`; the report reads their analysis, `transfer.json`
//! ([`rankstab_theory::transfer::analyse::TransferSummary`]). A study without it (still
//! running, or interrupted before its last seed) is not used, and the reason says how many
//! seeds are done.
//!
//! **Status.** A `running` run (a cell still training, or one that was killed) is used with
//! the rows it has so far, and says so in its notes and in the provenance table. A
//! `diverged` run (its loss became non-finite at step k: `manifest.json`'s note, or the
//! `diverged` metric row) is used with its rows before step k, and shows "diverged at step
//! k".
use crate::error::{io_err, ReportError};
use rankstab_records::{
    files, read_json, read_moments, read_table, CoefRow, Fit, Manifest, Metric, MetricRow,
    MomentRow, RunStatus, SCHEMA_VERSION,
};
use rankstab_theory::transfer::analyse::TransferSummary;
use rankstab_theory::ClosedFormCheck;
use std::path::{Path, PathBuf};

/// Which tool wrote a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// `rankstab theory`: synthetic networks, many cells per run.
    Theory,
    /// `rankstab train`: one real-model cell (rank, scaling, seed) per run.
    Train,
    /// `rankstab transfer`: the optimal learning rate across ranks (and widths).
    Transfer,
}

impl RunKind {
    /// The `source` column value of this kind's rows.
    pub fn source(self) -> &'static str {
        match self {
            RunKind::Theory => "theory",
            RunKind::Train => "train",
            RunKind::Transfer => "transfer",
        }
    }
}

/// One loaded run directory.
#[derive(Debug, Clone)]
pub struct Run {
    /// The directory as given.
    pub dir: PathBuf,
    /// Short unique name for tables and figure names.
    pub id: String,
    /// Kind of run.
    pub kind: RunKind,
    /// Its manifest.
    pub manifest: Manifest,
    /// `moments.csv`.
    pub moments: Vec<MomentRow>,
    /// `coefficients.csv` (theory; or the coefficient rows of an older `moments.csv`).
    pub coefficients: Vec<CoefRow>,
    /// `metrics.csv` (empty when absent).
    pub metrics: Vec<MetricRow>,
    /// `fits.json`, when present.
    pub fits: Option<Vec<Fit>>,
    /// `checks.json` (theory), when present.
    pub checks: Option<Vec<ClosedFormCheck>>,
    /// `transfer.json` (transfer studies; always present for them).
    pub transfer: Option<Box<TransferSummary>>,
    /// The step at which a diverged run's loss became non-finite, when known.
    pub diverged_at: Option<u32>,
    /// Things a reader should know (incomplete run, missing optional files).
    pub notes: Vec<String>,
}

impl Run {
    /// The run's state in words: "complete", "running", "diverged at step k".
    pub fn status_text(&self) -> String {
        match (self.manifest.status, self.diverged_at) {
            (RunStatus::Complete, _) => "complete".into(),
            (RunStatus::Running, _) => "running".into(),
            (RunStatus::Diverged, Some(k)) => format!("diverged at step {k}"),
            (RunStatus::Diverged, None) => "diverged (step not recorded)".into(),
        }
    }
}

/// A directory that was not used, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    /// The directory.
    pub dir: PathBuf,
    /// Why it was not used (one line).
    pub reason: String,
}

/// The training cell a run measures: one key per (model, optimizer, scaling, inputs,
/// rank, seed) in its moments, with its learning rate.
fn cells_of(run: &Run) -> std::collections::BTreeSet<String> {
    let lr = crate::analyse::run_lr(run).unwrap_or_default();
    run.moments
        .iter()
        .map(|r| {
            format!(
                "{} {} {} (lr {lr}, {}) r={} seed {}",
                r.model, r.optimizer, r.scaling, r.inputs, r.rank, r.seed
            )
        })
        .collect()
}

/// Configuration fields that do not change a run's numbers (where it was written, how often
/// it checkpointed).
const NEUTRAL_FIELDS: [&str; 2] = ["/run/sweep", "/train/checkpoint_every"];

/// The leaves of a JSON value as (pointer, value) pairs.
fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                leaves(x, format!("{at}/{k}"), out);
            }
        }
        x => out.push((at, x.to_string())),
    }
}

/// Refuses training runs that share a cell (model, optimizer, scaling, learning rate, data,
/// rank and seed) but were run under different configurations: their rows would be
/// averaged as one seed. Runs of identical configurations (the same cell run twice) are
/// deterministic repeats and are kept.
///
/// # Errors
/// [`ReportError::SharedSeed`] naming both directories and the differing fields.
pub fn check_shared_seeds(runs: &[Run]) -> Result<(), ReportError> {
    let train: Vec<(&Run, std::collections::BTreeSet<String>)> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Train)
        .map(|r| (r, cells_of(r)))
        .collect();
    for (i, (a, ca)) in train.iter().enumerate() {
        for (b, cb) in &train[i + 1..] {
            let Some(cell) = ca.intersection(cb).next() else {
                continue;
            };
            let (mut la, mut lb) = (Vec::new(), Vec::new());
            leaves(&a.manifest.config, String::new(), &mut la);
            leaves(&b.manifest.config, String::new(), &mut lb);
            let ma: std::collections::BTreeMap<_, _> = la.into_iter().collect();
            let mb: std::collections::BTreeMap<_, _> = lb.into_iter().collect();
            let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            let differ: Vec<String> = keys
                .into_iter()
                .filter(|k| !NEUTRAL_FIELDS.contains(&k.as_str()))
                .filter(|k| ma.get(*k) != mb.get(*k))
                .map(|k| {
                    let show = |m: &std::collections::BTreeMap<String, String>| {
                        m.get(k).cloned().unwrap_or_else(|| "absent".into())
                    };
                    format!(
                        "{} ({} vs {})",
                        k.trim_start_matches('/'),
                        show(&ma),
                        show(&mb)
                    )
                })
                .collect();
            if !differ.is_empty() {
                return Err(ReportError::SharedSeed {
                    first: a.dir.clone(),
                    second: b.dir.clone(),
                    cell: cell.clone(),
                    fields: differ.join(", "),
                });
            }
        }
    }
    Ok(())
}

/// Reads one run directory.
///
/// # Errors
/// [`ReportError::Missing`] without `manifest.json` or `moments.csv` (a transfer study:
/// `transfer.json`),
/// [`ReportError::Schema`] for another schema version, [`ReportError::Invalid`] for a command
/// the report does not read or rows whose `source` contradicts the manifest, and parse errors
/// naming the file (and line).
pub fn load_run(dir: &Path) -> Result<Run, ReportError> {
    if !dir.is_dir() {
        let what = if dir.exists() {
            "not a directory"
        } else {
            "no such directory"
        };
        return Err(ReportError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, what),
        });
    }
    let mpath = dir.join(files::MANIFEST);
    if !mpath.is_file() {
        return Err(ReportError::Missing {
            dir: dir.to_path_buf(),
            file: files::MANIFEST,
        });
    }
    // The version first, from the raw JSON: another version may not even parse as Manifest.
    let raw: serde_json::Value = read_json(&mpath)?;
    let found = raw
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ReportError::Invalid {
            path: mpath.clone(),
            what: "no numeric schema_version".into(),
        })?;
    if found != u64::from(SCHEMA_VERSION) {
        return Err(ReportError::Schema {
            path: mpath,
            found,
            expected: SCHEMA_VERSION,
        });
    }
    let manifest: Manifest =
        serde_json::from_value(raw).map_err(|source| rankstab_records::RecordsError::Json {
            path: mpath.clone(),
            source,
        })?;
    // An audit (`rankstab audit`: adapters trained anywhere, measured by the trainer's
    // probes) is read as a training run; its rows say source "audit".
    let (kind, source) = match manifest.command.as_str() {
        "theory" => (RunKind::Theory, "theory"),
        "train" => (RunKind::Train, "train"),
        "audit" => (RunKind::Train, "audit"),
        "transfer" => (RunKind::Transfer, "transfer"),
        other => {
            return Err(ReportError::Invalid {
                path: mpath,
                what: format!(
                "command '{other}' is not a run the report reads (theory, train, audit, transfer)"
            ),
            })
        }
    };
    // Damage (a table that is not as it was at completion, duplicate rows) is an error of
    // its own: `load_runs` refuses such a run instead of leaving it out.
    let damaged = |dir: &Path| {
        let dir = dir.to_path_buf();
        move |e: rankstab_records::RecordsError| match e {
            rankstab_records::RecordsError::Invalid { .. } => {
                ReportError::Damaged { dir, source: e }
            }
            other => ReportError::Records(other),
        }
    };
    rankstab_records::verify_tables(dir, &manifest).map_err(damaged(dir))?;
    if kind == RunKind::Transfer {
        return load_transfer(dir, manifest);
    }
    let mut notes = Vec::new();
    let moments_path = dir.join(files::MOMENTS);
    if manifest.status == RunStatus::Running && !moments_path.is_file() {
        return Err(ReportError::Invalid {
            path: dir.to_path_buf(),
            what: format!(
                "status 'running' and no {} yet: nothing to use so far",
                files::MOMENTS
            ),
        });
    }
    if !moments_path.is_file() {
        return Err(ReportError::Missing {
            dir: dir.to_path_buf(),
            file: files::MOMENTS,
        });
    }
    let (mut moments, coefficients) = read_moments(&moments_path).map_err(damaged(dir))?;
    check_source(
        &moments_path,
        source,
        moments.iter().map(|r| r.source.as_str()),
    )?;
    let metrics_path = dir.join(files::METRICS);
    let mut metrics: Vec<MetricRow> = if metrics_path.is_file() {
        read_table(&metrics_path).map_err(damaged(dir))?
    } else {
        notes.push(format!(
            "no {}: no loss, perplexity or gradient-norm curves from this run",
            files::METRICS
        ));
        Vec::new()
    };
    check_source(
        &metrics_path,
        source,
        metrics.iter().map(|r| r.source.as_str()),
    )?;
    let fits_path = dir.join(files::FITS);
    let fits: Option<Vec<Fit>> = if fits_path.is_file() {
        Some(read_json(&fits_path)?)
    } else {
        None
    };
    let checks_path = dir.join(rankstab_theory::CHECKS);
    let checks: Option<Vec<ClosedFormCheck>> = if kind == RunKind::Theory && checks_path.is_file() {
        Some(read_json(&checks_path)?)
    } else {
        None
    };
    if kind == RunKind::Theory && fits.is_none() {
        notes.push(format!(
            "no {}: exponents are fitted here from {}",
            files::FITS,
            files::MOMENTS
        ));
    }
    let mut diverged_at = None;
    match manifest.status {
        RunStatus::Complete => {}
        RunStatus::Running => notes.push(
            "status 'running': the run is still going or was interrupted; its rows so far are used"
                .into(),
        ),
        RunStatus::Diverged => {
            // The step from the manifest's note ("diverged at step k"), else from the
            // trainer's `diverged` metric row.
            diverged_at = manifest
                .note
                .as_deref()
                .and_then(|n| n.rsplit("step ").next())
                .and_then(|k| k.trim().parse::<u32>().ok())
                .or_else(|| {
                    metrics
                        .iter()
                        .filter(|r| r.metric == Metric::Diverged)
                        .map(|r| r.step)
                        .min()
                });
            match diverged_at {
                Some(k) => {
                    let before = moments.len();
                    moments.retain(|r| r.step < k);
                    metrics.retain(|r| r.step < k || r.metric == Metric::Diverged);
                    notes.push(format!(
                        "diverged at step {k}: its rows before step {k} are used{}",
                        if before > moments.len() {
                            format!(" ({} later rows left out)", before - moments.len())
                        } else {
                            String::new()
                        }
                    ));
                }
                None => notes
                    .push("diverged (the step is not recorded): every row it wrote is used".into()),
            }
        }
    }
    if moments.is_empty() {
        notes.push(format!("{} has no rows yet", files::MOMENTS));
    }
    Ok(Run {
        coefficients,
        dir: dir.to_path_buf(),
        id: String::new(),
        kind,
        manifest,
        moments,
        metrics,
        fits,
        checks,
        transfer: None,
        diverged_at,
        notes,
    })
}

/// The rest of a transfer study's directory: its analysis, `transfer.json`.
fn load_transfer(dir: &Path, manifest: Manifest) -> Result<Run, ReportError> {
    use rankstab_theory::transfer::SUMMARY;
    let status = match manifest.status {
        RunStatus::Complete => "complete",
        RunStatus::Running => "running",
        RunStatus::Diverged => "diverged",
    };
    let path = dir.join(SUMMARY);
    if !path.is_file() {
        if manifest.status == RunStatus::Complete {
            return Err(ReportError::Missing {
                dir: dir.to_path_buf(),
                file: SUMMARY,
            });
        }
        // progress.json lists the seeds done (a private file of the study: read leniently).
        let done = read_json::<serde_json::Value>(&dir.join("progress.json"))
            .ok()
            .and_then(|p| p.get("done")?.as_array().map(Vec::len))
            .unwrap_or(0);
        return Err(ReportError::Invalid {
            path: dir.to_path_buf(),
            what: format!(
                "transfer study unfinished (status '{status}', {done} of {} seeds done): no {SUMMARY} yet; \
                 resume it with the same rankstab transfer command",
                manifest.seeds.len()
            ),
        });
    }
    let summary: TransferSummary = read_json(&path)?;
    let mut notes = Vec::new();
    if manifest.status != RunStatus::Complete {
        notes.push(format!(
            "status '{status}' although {SUMMARY} exists: its analysis is used as written"
        ));
    }
    if summary.cells.is_empty() {
        notes.push(format!("{SUMMARY} has no lr* cells"));
    }
    Ok(Run {
        dir: dir.to_path_buf(),
        id: String::new(),
        kind: RunKind::Transfer,
        manifest,
        moments: Vec::new(),
        coefficients: Vec::new(),
        metrics: Vec::new(),
        fits: None,
        checks: None,
        transfer: Some(Box::new(summary)),
        diverged_at: None,
        notes,
    })
}

fn check_source<'a>(
    path: &Path,
    source: &str,
    sources: impl Iterator<Item = &'a str>,
) -> Result<(), ReportError> {
    for (i, s) in sources.enumerate() {
        if s != source {
            return Err(ReportError::Invalid {
                path: path.to_path_buf(),
                what: format!(
                    "data row {} has source '{s}' but manifest.json says command '{source}'",
                    i + 1,
                ),
            });
        }
    }
    Ok(())
}

/// Files whose presence marks a directory as (meant to be) a run directory.
const RUN_FILES: [&str; 6] = [
    files::MOMENTS,
    files::METRICS,
    files::FITS,
    "checkpoint",
    rankstab_theory::transfer::RUNS,
    rankstab_theory::transfer::SUMMARY,
];
/// The manifest of a sweep: a container of cells, not a run itself.
const SWEEP_MANIFEST: &str = "sweep.json";
/// How deep below a given directory runs are looked for.
const MAX_DEPTH: usize = 8;

/// The run directories a given path stands for (see the module docs): itself when it holds
/// `manifest.json` or is not a directory (to be reported by [`load_run`]), else every run
/// directory beneath it, sorted; with the directories beneath that look like runs but
/// cannot be used, and why. A given directory with no run beneath it is returned as the
/// one "run", so that [`load_run`] names what is missing.
///
/// # Errors
/// The given directory cannot be listed.
pub fn expand(dir: &Path) -> Result<(Vec<PathBuf>, Vec<Skipped>), ReportError> {
    if dir.join(files::MANIFEST).is_file() || !dir.is_dir() {
        return Ok((vec![dir.to_path_buf()], Vec::new()));
    }
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    walk(dir, 0, &mut runs, &mut skipped)?;
    if runs.is_empty() && skipped.is_empty() {
        runs.push(dir.to_path_buf());
    }
    Ok((runs, skipped))
}

/// Collects the run directories beneath `dir` (which has no manifest).
fn walk(
    dir: &Path,
    depth: usize,
    runs: &mut Vec<PathBuf>,
    skipped: &mut Vec<Skipped>,
) -> Result<(), ReportError> {
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        // file_type() does not follow links: a link to a run elsewhere is given explicitly.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    subs.sort();
    let in_cells = dir.file_name().is_some_and(|n| n == "cells")
        && dir
            .parent()
            .is_some_and(|p| p.join(SWEEP_MANIFEST).is_file());
    for sub in subs {
        if sub.join(files::MANIFEST).is_file() {
            runs.push(sub);
            continue;
        }
        let (before_runs, before_skipped) = (runs.len(), skipped.len());
        if depth + 1 < MAX_DEPTH {
            if let Err(e) = walk(&sub, depth + 1, runs, skipped) {
                skipped.push(Skipped {
                    dir: sub.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        }
        let found_nothing = runs.len() == before_runs && skipped.len() == before_skipped;
        if found_nothing {
            if let Some(f) = RUN_FILES.iter().find(|f| sub.join(f).exists()) {
                skipped.push(Skipped {
                    dir: sub,
                    reason: format!(
                        "has {f} but no {} (not a complete run directory)",
                        files::MANIFEST
                    ),
                });
            } else if in_cells {
                skipped.push(Skipped {
                    dir: sub,
                    reason: format!("sweep cell without {}: not started yet", files::MANIFEST),
                });
            } else {
                tracing::debug!("{}: no run directory beneath it", sub.display());
            }
        }
    }
    if let Some(s) = unstarted_cells(dir) {
        skipped.push(s);
    }
    Ok(())
}

/// One line for the cells a sweep's `sweep.json` lists that have no directory yet.
fn unstarted_cells(dir: &Path) -> Option<Skipped> {
    let path = dir.join(SWEEP_MANIFEST);
    if !path.is_file() {
        return None;
    }
    let sweep: serde_json::Value = match read_json(&path) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!("{e}");
            return None;
        }
    };
    let names: Vec<&str> = sweep
        .get("cells")?
        .as_array()?
        .iter()
        .filter_map(|c| c.get("name")?.as_str())
        .collect();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !dir.join("cells").join(n).exists())
        .collect();
    if missing.is_empty() {
        return None;
    }
    const SHOWN: usize = 4;
    let more = missing.len().saturating_sub(SHOWN);
    Some(Skipped {
        dir: dir.join("cells"),
        reason: format!(
            "{} of the {} cells in {SWEEP_MANIFEST} not started yet (no directory): {}{}",
            missing.len(),
            names.len(),
            missing[..missing.len().min(SHOWN)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
    })
}

/// Loads every usable run among `dirs` (each expanded by [`expand`]); the unusable ones are
/// returned with their reasons.
///
/// # Errors
/// [`ReportError::NoUsableRuns`] when no directory can be used (the message lists why).
pub fn load_runs(dirs: &[PathBuf]) -> Result<(Vec<Run>, Vec<Skipped>), ReportError> {
    let mut runs: Vec<Run> = Vec::new();
    let mut skipped = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for given in dirs {
        let expanded = match expand(given) {
            Ok((runs, not_runs)) => {
                skipped.extend(not_runs);
                runs
            }
            Err(e) => {
                skipped.push(Skipped {
                    dir: given.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        for dir in expanded {
            let canon = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if seen.contains(&canon) {
                skipped.push(Skipped {
                    dir: dir.clone(),
                    reason: "given more than once; used once".into(),
                });
                continue;
            }
            seen.push(canon);
            match load_run(&dir) {
                Ok(run) => runs.push(run),
                Err(e @ ReportError::Damaged { .. }) => return Err(e),
                Err(e) => {
                    tracing::debug!("not using {}: {e}", dir.display());
                    skipped.push(Skipped {
                        dir,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    if runs.is_empty() {
        let reasons = skipped
            .iter()
            .map(|s| s.reason.clone())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ReportError::NoUsableRuns {
            given: dirs.len(),
            reasons,
        });
    }
    assign_ids(&mut runs);
    check_shared_seeds(&runs)?;
    Ok((runs, skipped))
}

/// Short unique ids: the directory name, prefixed by its parent's when names repeat, and
/// numbered as a last resort.
fn assign_ids(runs: &mut [Run]) {
    let name = |p: &Path, depth: usize| -> String {
        let parts: Vec<String> = p
            .components()
            .rev()
            .take(depth)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        parts.into_iter().rev().collect::<Vec<_>>().join("/")
    };
    let mut ids: Vec<String> = runs.iter().map(|r| name(&r.dir, 1)).collect();
    let dup = |ids: &[String], i: usize| ids.iter().filter(|x| **x == ids[i]).count() > 1;
    if (0..ids.len()).any(|i| dup(&ids, i)) {
        ids = runs.iter().map(|r| name(&r.dir, 2)).collect();
    }
    for i in 0..ids.len() {
        if dup(&ids, i) {
            ids[i] = format!("{}#{}", ids[i], i + 1);
        }
    }
    for (run, id) in runs.iter_mut().zip(ids) {
        run.id = id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankstab_records::{write_json_atomic, TableWriter};

    fn manifest(command: &str, version: u32) -> Manifest {
        Manifest {
            schema_version: version,
            tool: "rankstab".into(),
            tool_version: "0.1.0".into(),
            git_revision: None,
            command: command.into(),
            config: serde_json::json!({}),
            seeds: vec![1],
            device: "cpu".into(),
            created: "2024-01-01T00:00:00Z".into(),
            finished: None,
            status: RunStatus::Complete,
            note: None,
            tables: Default::default(),
        }
    }

    fn write_run(dir: &Path, command: &str, version: u32, source: &str) {
        std::fs::create_dir_all(dir).expect("mkdir");
        write_json_atomic(&dir.join(files::MANIFEST), &manifest(command, version))
            .expect("manifest");
        let mut w = TableWriter::<MomentRow>::open(&dir.join(files::MOMENTS)).expect("open");
        w.append(&[MomentRow {
            source: source.into(),
            rank: 4,
            value: 1.0,
            ..Default::default()
        }])
        .expect("append");
    }

    #[test]
    fn a_good_train_run_loads() {
        let d = tempfile::tempdir().expect("tempdir");
        write_run(d.path(), "train", SCHEMA_VERSION, "train");
        let run = load_run(d.path()).expect("loads");
        assert_eq!(run.kind, RunKind::Train);
        assert_eq!(run.moments.len(), 1);
        assert!(
            run.notes.iter().any(|n| n.contains("metrics.csv")),
            "{:?}",
            run.notes
        );
    }

    #[test]
    fn schema_mismatch_names_the_manifest() {
        let d = tempfile::tempdir().expect("tempdir");
        write_run(d.path(), "train", SCHEMA_VERSION + 1, "train");
        let err = load_run(d.path()).expect_err("must fail");
        assert!(
            matches!(err, ReportError::Schema { found, .. } if found == u64::from(SCHEMA_VERSION) + 1),
            "{err}"
        );
        assert!(err.to_string().contains("manifest.json"), "{err}");
    }

    #[test]
    fn schema_mismatch_is_found_even_when_fields_changed() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            d.path().join("manifest.json"),
            r#"{"schema_version": 7, "brand_new": true}"#,
        )
        .expect("write");
        let err = load_run(d.path()).expect_err("must fail");
        assert!(matches!(err, ReportError::Schema { found: 7, .. }), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let err = load_run(d.path()).expect_err("no manifest");
        assert!(err.to_string().contains("manifest.json"), "{err}");
        write_json_atomic(
            &d.path().join(files::MANIFEST),
            &manifest("theory", SCHEMA_VERSION),
        )
        .expect("manifest");
        let err = load_run(d.path()).expect_err("no moments");
        assert!(
            matches!(
                err,
                ReportError::Missing {
                    file: "moments.csv",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn malformed_rows_name_the_file_and_line() {
        let d = tempfile::tempdir().expect("tempdir");
        write_run(d.path(), "train", SCHEMA_VERSION, "train");
        let p = d.path().join(files::MOMENTS);
        let mut text = std::fs::read_to_string(&p).expect("read");
        text.push_str(
            "train,m,q_proj,0,NOT_A_RANK,1,lora,1,adamw,text,text,64,0,1,fwd,abs,2,0.5\n",
        );
        std::fs::write(&p, text).expect("write");
        let err = load_run(d.path()).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("moments.csv"), "{msg}");
        assert!(msg.contains("line 3") || msg.contains("record 2"), "{msg}");
    }

    #[test]
    fn malformed_manifest_and_wrong_header_name_the_file() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("manifest.json"), "{ not json").expect("write");
        let err = load_run(d.path()).expect_err("bad json");
        assert!(err.to_string().contains("manifest.json"), "{err}");
        write_run(d.path(), "train", SCHEMA_VERSION, "train");
        std::fs::write(d.path().join(files::METRICS), "a,b\n1,2\n").expect("write");
        let err = load_run(d.path()).expect_err("bad header");
        assert!(err.to_string().contains("metrics.csv"), "{err}");
    }

    #[test]
    fn rows_contradicting_the_manifest_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        write_run(d.path(), "train", SCHEMA_VERSION, "theory");
        let err = load_run(d.path()).expect_err("must fail");
        assert!(
            err.to_string().contains("moments.csv") && err.to_string().contains("row 1"),
            "{err}"
        );
    }

    #[test]
    fn unusable_dirs_are_skipped_with_reasons_and_good_ones_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        let good = d.path().join("good");
        let bad = d.path().join("bad");
        write_run(&good, "train", SCHEMA_VERSION, "train");
        write_run(&bad, "sweep", SCHEMA_VERSION, "train");
        let nowhere = d.path().join("nowhere");
        let (runs, skipped) = load_runs(&[good.clone(), bad, nowhere, good]).expect("one usable");
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].id, "good");
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(
            skipped[0].reason.contains("command 'sweep'"),
            "{:?}",
            skipped[0]
        );
        assert!(skipped[1].reason.contains("nowhere"), "{:?}", skipped[1]);
        assert!(
            skipped[2].reason.contains("more than once"),
            "{:?}",
            skipped[2]
        );
    }

    #[test]
    fn nothing_usable_is_an_error_listing_reasons() {
        let d = tempfile::tempdir().expect("tempdir");
        let err = load_runs(&[d.path().join("a")]).expect_err("must fail");
        assert!(matches!(err, ReportError::NoUsableRuns { given: 1, .. }));
        assert!(err.to_string().contains("no such directory"), "{err}");
    }

    #[test]
    fn a_sweep_directory_expands_to_its_runs_with_unique_ids() {
        let d = tempfile::tempdir().expect("tempdir");
        write_run(&d.path().join("a/cell"), "train", SCHEMA_VERSION, "train");
        write_run(&d.path().join("b/cell"), "train", SCHEMA_VERSION, "train");
        let (runs, _) = load_runs(&[d.path().join("a"), d.path().join("b")]).expect("loads");
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a/cell", "b/cell"]);
    }

    #[test]
    fn nested_runs_are_found_and_only_run_like_leftovers_are_reported() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path();
        write_run(&root.join("theory"), "theory", SCHEMA_VERSION, "theory");
        write_run(&root.join("a/b/c/cell"), "train", SCHEMA_VERSION, "train");
        // Inside a run: not searched (a nested manifest there is part of the run).
        write_run(
            &root.join("a/b/c/cell/checkpoint/x"),
            "train",
            SCHEMA_VERSION,
            "train",
        );
        // Hidden, plain, and run-like folders without a manifest.
        write_run(&root.join(".hidden/cell"), "train", SCHEMA_VERSION, "train");
        std::fs::create_dir_all(root.join("logs/old")).expect("mkdir");
        std::fs::create_dir_all(root.join("half")).expect("mkdir");
        std::fs::write(root.join("half").join(files::MOMENTS), "x\n").expect("write");
        // A running run that has written no rows yet.
        let early = root.join("early");
        std::fs::create_dir_all(&early).expect("mkdir");
        let mut m = manifest("train", SCHEMA_VERSION);
        m.status = RunStatus::Running;
        write_json_atomic(&early.join(files::MANIFEST), &m).expect("manifest");

        let (runs, skipped) = expand(root).expect("lists");
        let rel: Vec<PathBuf> = runs
            .iter()
            .map(|p| p.strip_prefix(root).expect("inside").to_path_buf())
            .collect();
        assert_eq!(
            rel,
            [
                Path::new("a/b/c/cell"),
                Path::new("early"),
                Path::new("theory")
            ]
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].dir, root.join("half"));
        assert!(skipped[0]
            .reason
            .contains("moments.csv but no manifest.json"));
        let (loaded, skipped) = load_runs(&[root.to_path_buf()]).expect("loads");
        assert_eq!(loaded.len(), 2);
        let early_reason = &skipped
            .iter()
            .find(|s| s.dir == early)
            .expect("early")
            .reason;
        assert!(early_reason.contains("running") && early_reason.contains("no moments.csv"));
    }

    #[test]
    fn a_diverged_run_keeps_its_rows_before_the_step() {
        let d = tempfile::tempdir().expect("tempdir");
        write_run(d.path(), "train", SCHEMA_VERSION, "train");
        let mut w = TableWriter::<MomentRow>::open(&d.path().join(files::MOMENTS)).expect("open");
        w.append(&[MomentRow {
            source: "train".into(),
            rank: 4,
            step: 7,
            value: f64::NAN,
            ..Default::default()
        }])
        .expect("append");
        let mut m = manifest("train", SCHEMA_VERSION);
        m.status = RunStatus::Diverged;
        m.note = Some("diverged at step 7".into());
        write_json_atomic(&d.path().join(files::MANIFEST), &m).expect("manifest");
        let run = load_run(d.path()).expect("loads");
        assert_eq!(run.diverged_at, Some(7));
        assert_eq!(run.moments.len(), 1);
        assert_eq!(run.status_text(), "diverged at step 7");
        assert!(
            run.notes
                .iter()
                .any(|n| n.contains("1 later rows left out")),
            "{:?}",
            run.notes
        );
        // Without a note, the trainer's `diverged` metric row gives the step.
        m.note = None;
        write_json_atomic(&d.path().join(files::MANIFEST), &m).expect("manifest");
        TableWriter::<MetricRow>::open(&d.path().join(files::METRICS))
            .expect("open")
            .append(&[MetricRow {
                source: "train".into(),
                step: 7,
                metric: Metric::Diverged,
                value: 1.0,
                ..Default::default()
            }])
            .expect("append");
        assert_eq!(load_run(d.path()).expect("loads").diverged_at, Some(7));
    }
}
