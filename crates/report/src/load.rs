//! Loading run directories: manifest first (schema version, command), then the tables.
//!
//! A directory that cannot be used is reported with the reason ([`Skipped`]) and the
//! others are still used; [`load_runs`] fails only when nothing is usable. A directory
//! without `manifest.json` whose sub-directories are runs (a sweep, or `runs/audit-<time>/`)
//! stands for those runs.
use crate::error::{io_err, ReportError};
use rankstab_records::{
    files, read_json, read_table, Fit, Manifest, MetricRow, MomentRow, RunStatus, SCHEMA_VERSION,
};
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
}

impl RunKind {
    /// The `source` column value of this kind's rows.
    pub fn source(self) -> &'static str {
        match self {
            RunKind::Theory => "theory",
            RunKind::Train => "train",
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
    /// `metrics.csv` (empty when absent).
    pub metrics: Vec<MetricRow>,
    /// `fits.json`, when present.
    pub fits: Option<Vec<Fit>>,
    /// `checks.json` (theory), when present.
    pub checks: Option<Vec<ClosedFormCheck>>,
    /// Things a reader should know (incomplete run, missing optional files).
    pub notes: Vec<String>,
}

/// A directory that was not used, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    /// The directory.
    pub dir: PathBuf,
    /// Why it was not used (one line).
    pub reason: String,
}

/// Reads one run directory.
///
/// # Errors
/// [`ReportError::Missing`] without `manifest.json` or `moments.csv`,
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
    let kind = match manifest.command.as_str() {
        "theory" => RunKind::Theory,
        "train" => RunKind::Train,
        other => {
            return Err(ReportError::Invalid {
                path: mpath,
                what: format!("command '{other}' is not a run the report reads (theory, train)"),
            })
        }
    };
    let mut notes = Vec::new();
    if manifest.status != RunStatus::Complete {
        notes.push(
            "status 'running': the run is incomplete or was interrupted; its rows so far are used"
                .into(),
        );
    }
    let moments_path = dir.join(files::MOMENTS);
    if !moments_path.is_file() {
        return Err(ReportError::Missing {
            dir: dir.to_path_buf(),
            file: files::MOMENTS,
        });
    }
    let moments: Vec<MomentRow> = read_table(&moments_path)?;
    check_source(
        &moments_path,
        kind,
        moments.iter().map(|r| r.source.as_str()),
    )?;
    let metrics_path = dir.join(files::METRICS);
    let metrics: Vec<MetricRow> = if metrics_path.is_file() {
        read_table(&metrics_path)?
    } else {
        notes.push(format!(
            "no {}: no loss, perplexity or gradient-norm curves from this run",
            files::METRICS
        ));
        Vec::new()
    };
    check_source(
        &metrics_path,
        kind,
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
    if moments.is_empty() {
        notes.push(format!("{} has no rows yet", files::MOMENTS));
    }
    Ok(Run {
        dir: dir.to_path_buf(),
        id: String::new(),
        kind,
        manifest,
        moments,
        metrics,
        fits,
        checks,
        notes,
    })
}

fn check_source<'a>(
    path: &Path,
    kind: RunKind,
    sources: impl Iterator<Item = &'a str>,
) -> Result<(), ReportError> {
    for (i, s) in sources.enumerate() {
        if s != kind.source() {
            return Err(ReportError::Invalid {
                path: path.to_path_buf(),
                what: format!(
                    "data row {} has source '{s}' but manifest.json says command '{}'",
                    i + 1,
                    kind.source()
                ),
            });
        }
    }
    Ok(())
}

/// The run directories a given path stands for: itself when it holds `manifest.json`, else
/// its immediate sub-directories that do (sorted), else itself (to be reported as unusable).
///
/// # Errors
/// The directory cannot be listed.
pub fn expand(dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if dir.join(files::MANIFEST).is_file() || !dir.is_dir() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(files::MANIFEST).is_file())
        .collect();
    subs.sort();
    Ok(if subs.is_empty() {
        vec![dir.to_path_buf()]
    } else {
        subs
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
            Ok(e) => e,
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
}
