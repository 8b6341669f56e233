//! Provenance of each run ([`RunInfo`]: where, what, by which tool, with which seeds) and the
//! few facts read from a run's manifest: its learning rate and its theory configuration.
use super::row::fmt_ranks;
use crate::load::{Run, RunKind};
use rankstab_records::{Optimizer, Scaling};
use rankstab_theory::TheoryConfig;
use serde::Serialize;
use std::collections::BTreeSet;

/// Provenance of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Short id.
    pub id: String,
    /// Directory as given.
    pub dir: String,
    /// theory or train.
    pub kind: RunKind,
    /// One-line description (model, rank, scaling, ... or width, ranks, trials).
    pub summary: String,
    /// complete, running, or "diverged at step k".
    pub status: String,
    /// Schema version.
    pub schema_version: u32,
    /// rankstab version that wrote it.
    pub tool_version: String,
    /// Source revision, when known.
    pub git_revision: String,
    /// Device.
    pub device: String,
    /// Created (RFC 3339).
    pub created: String,
    /// Finished (RFC 3339), when complete.
    pub finished: String,
    /// Seeds.
    pub seeds: String,
    /// The full configuration, pretty JSON.
    pub config_json: String,
    /// Rows in moments.csv.
    pub moment_rows: usize,
    /// Rows in metrics.csv.
    pub metric_rows: usize,
    /// What the run's tables hold, in words ("120 moments, 40 metrics"; a transfer study:
    /// its lr* cells and training runs).
    pub rows: String,
    /// Notes (incomplete, missing optional files).
    pub notes: Vec<String>,
}

/// The provenance of `run`.
pub(super) fn run_info(run: &Run) -> RunInfo {
    let m = &run.manifest;
    RunInfo {
        id: run.id.clone(),
        dir: run.dir.display().to_string(),
        kind: run.kind,
        summary: summary(run),
        status: run.status_text(),
        schema_version: m.schema_version,
        tool_version: format!("{} {}", m.tool, m.tool_version),
        git_revision: m.git_revision.clone().unwrap_or_else(|| "unknown".into()),
        device: m.device.clone(),
        created: m.created.clone(),
        finished: m.finished.clone().unwrap_or_default(),
        seeds: m
            .seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        config_json: serde_json::to_string_pretty(&m.config).unwrap_or_default(),
        moment_rows: run.moments.len(),
        metric_rows: run.metrics.len(),
        rows: match &run.transfer {
            Some(t) => format!(
                "{} lr* cells, {} training runs",
                t.cells.len(),
                t.cells.iter().map(|c| u64::from(c.runs)).sum::<u64>()
            ),
            None => format!(
                "{} moments, {} metrics",
                run.moments.len(),
                run.metrics.len()
            ),
        },
        notes: run.notes.clone(),
    }
}

/// A training cell as the one-line summary names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Cell {
    model: String,
    rank: u32,
    scaling: Scaling,
    optimizer: Optimizer,
}

/// One line on what the run is: the theory grid, or the training cells and data.
pub(super) fn summary(run: &Run) -> String {
    let cfg = &run.manifest.config;
    match run.kind {
        RunKind::Theory => {
            let ranks: BTreeSet<u32> = run
                .moments
                .iter()
                .map(|r| r.rank)
                .filter(|&r| r > 0)
                .collect();
            format!(
                "theory: width {}, ranks {}, {} trials, optimizers {}, scalings {}, inputs {}",
                cfg.get("width").map_or("?".into(), |v| v.to_string()),
                fmt_ranks(&ranks.into_iter().collect::<Vec<_>>()),
                run.manifest.seeds.len(),
                json_list(cfg.get("optimizers")),
                json_list(cfg.get("scalings")),
                json_list(cfg.get("inputs")),
            )
        }
        RunKind::Transfer => super::transfer::summary(run),
        RunKind::Train => {
            let cells: BTreeSet<Cell> = run
                .moments
                .iter()
                .map(|r| Cell {
                    model: r.model.clone(),
                    rank: r.rank,
                    scaling: r.scaling,
                    optimizer: r.optimizer,
                })
                .collect();
            let cells: Vec<String> = cells
                .into_iter()
                .map(|c| {
                    format!(
                        "{}, rank {}, {}, {}",
                        c.model, c.rank, c.scaling, c.optimizer
                    )
                })
                .collect();
            let lr = run_lr(run).map(|l| format!(", lr {l}")).unwrap_or_default();
            format!(
                "train: {}{lr}, data {}",
                if cells.is_empty() {
                    "no rows".into()
                } else {
                    cells.join("; ")
                },
                run.moments.first().map_or("?", |r| r.inputs.as_str())
            )
        }
    }
}

fn json_list(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Some(x) => x.to_string(),
        None => "?".into(),
    }
}

/// Learning rate recorded in a run's config (`lr` or `learning_rate`, at the top or in the
/// `train` object that `rankstab train` and `sweep` write), as text.
pub(crate) fn run_lr(run: &Run) -> Option<String> {
    let c = &run.manifest.config;
    [Some(c), c.get("train")]
        .into_iter()
        .flatten()
        .flat_map(|c| [c.get("lr"), c.get("learning_rate")])
        .flatten()
        .find(|v| !v.is_null())
        .map(|v| v.to_string())
}

/// The configuration of a theory run, when its manifest holds a readable one.
pub(super) fn theory_config(run: &Run) -> Option<TheoryConfig> {
    serde_json::from_value(run.manifest.config.clone()).ok()
}
