//! Test fixtures: synthetic *training* run directories in the shared record format, one
//! directory per cell (model, rank, scaling, seed) as `rankstab train` writes them, with
//! known rank exponents, so the report's merging, fitting and figures can be checked before
//! real training runs exist. Values follow the Adam laws of proofs/ exactly, times a
//! deterministic per-seed factor shared across ranks and a small per-rank wobble.
#![allow(dead_code)]
use rankstab_records::{
    files, write_json_atomic, Manifest, MetricRow, MomentRow, RunStatus, TableWriter,
    SCHEMA_VERSION,
};
use std::path::{Path, PathBuf};

pub const MODEL: &str = "tiny-llama";
// Widths large against the ranks, so the input gradient sits at its incoherent limit.
pub const MODULES: [(&str, u32); 3] = [("q_proj", 2048), ("v_proj", 2048), ("down_proj", 4096)];
pub const LAYERS: u32 = 2;
pub const RANKS: [u32; 4] = [4, 8, 16, 32];
pub const SEEDS: [u64; 2] = [0, 1];
pub const STEPS: [u32; 5] = [0, 10, 20, 30, 40];

/// A small theory run written by the checker into `dir/theory` (width 64, ranks 4 to 32,
/// 3 trials, 2 steps) with moments of the orders `moments`; returns its directory.
pub fn write_theory_run(dir: &Path, moments: Vec<u32>) -> PathBuf {
    let cfg = rankstab_theory::TheoryConfig {
        width: 64,
        ranks: vec![4, 8, 16, 32],
        trials: 3,
        steps: 2,
        batch: 4,
        heldout: 8,
        moments,
        ..Default::default()
    };
    let out = dir.join("theory");
    rankstab_theory::run(
        &cfg,
        &out,
        &rankstab_theory::RunOptions::default(),
        &rankstab_theory::NoProgress,
    )
    .expect("theory run");
    out
}

/// Expected AdamW exponent of each (site, stat) for scaling exponent beta (second moments).
pub fn expected(site: &str, stat: &str, beta: f64) -> f64 {
    match (site, stat) {
        ("fwd", "abs") => 2.0 * (1.0 - beta), // coherent limit m (1 - beta)
        ("bwd", "abs") => 2.0 * (0.5 - beta), // incoherent: m (1/2 - beta)
        ("param", "grad_norm_b") | ("param", "grad_norm_a") => 0.5 - beta,
        _ => 0.0,
    }
}

fn factor(seed: u64, rank: u32, step: u32) -> f64 {
    let s = seed as f64;
    (1.0 + 0.1 * (s * 1.7 + f64::from(step) * 0.01).sin())
        * (1.0 + 0.01 * (f64::from(rank) * 0.9 + s).cos())
}

/// Writes one training cell; returns its directory.
pub fn write_train_cell(root: &Path, rank: u32, scaling: &str, beta: f64, seed: u64) -> PathBuf {
    let dir = root.join(format!("{MODEL}-r{rank}-{scaling}-s{seed}"));
    write_train_run(&dir, rank, scaling, beta, seed, RunStatus::Complete, None);
    dir
}

/// Writes one training run directory `dir` with the given manifest status and note (every
/// step of [`STEPS`] is written whatever the status: the report must cut a diverged run).
pub fn write_train_run(
    dir: &Path,
    rank: u32,
    scaling: &str,
    beta: f64,
    seed: u64,
    status: RunStatus,
    note: Option<&str>,
) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: "rankstab".into(),
        tool_version: "0.1.0".into(),
        git_revision: Some("0123456789abcdef".into()),
        command: "train".into(),
        config: serde_json::json!({"model": MODEL, "rank": rank, "scaling": scaling, "optimizer": "adamw", "lr": 5e-5, "seed": seed}),
        seeds: vec![seed],
        device: "cpu (2 threads)".into(),
        created: "2024-01-01T00:00:00Z".into(),
        finished: (status != RunStatus::Running).then(|| "2024-01-01T00:01:00Z".into()),
        status,
        note: note.map(str::to_string),
    };
    write_json_atomic(&dir.join(files::MANIFEST), &manifest).expect("manifest");
    let base = MomentRow {
        source: "train".into(),
        model: MODEL.into(),
        rank,
        alpha: 16.0,
        scaling: scaling.parse().expect("scaling"),
        beta,
        optimizer: "adamw".parse().expect("optimizer"),
        inputs: "chatterbot-corpus".into(),
        dist: "text".into(),
        seed,
        ..Default::default()
    };
    let r = f64::from(rank);
    let mut rows = Vec::new();
    for (mi, (module, width)) in MODULES.iter().enumerate() {
        for layer in 0..LAYERS {
            let scale = 1.0 + 0.5 * mi as f64 + 0.25 * f64::from(layer);
            for &step in &STEPS {
                let f = factor(seed, rank, step) * scale;
                let mut push = |site: &str, stat: &str, m: Option<u32>, value: f64| {
                    rows.push(MomentRow {
                        module: (*module).into(),
                        layer,
                        width: *width,
                        step,
                        site: site.parse().expect("site"),
                        stat: stat.parse().expect("stat"),
                        m,
                        value,
                        ..base.clone()
                    });
                };
                // B = 0 at step 0: adapter output and input gradient are exactly zero there.
                let live = if step == 0 { 0.0 } else { 1.0 };
                push(
                    "fwd",
                    "abs",
                    Some(2),
                    live * 1e-4 * f * r.powf(expected("fwd", "abs", beta)),
                );
                push(
                    "bwd",
                    "abs",
                    Some(2),
                    live * 1e-6 * f * r.powf(expected("bwd", "abs", beta)),
                );
                push("grad_out", "abs", Some(2), 1e-3 * f);
                push(
                    "param",
                    "grad_norm_b",
                    None,
                    1e-2 * f * r.powf(expected("param", "grad_norm_b", beta)),
                );
                push(
                    "param",
                    "grad_norm_a",
                    None,
                    live * 1e-3 * f * r.powf(expected("param", "grad_norm_a", beta)),
                );
            }
        }
    }
    TableWriter::<MomentRow>::open(&dir.join(files::MOMENTS))
        .expect("open")
        .append(&rows)
        .expect("append");
    let mut metrics = Vec::new();
    for &step in &STEPS {
        let s = f64::from(step);
        let ppl = 2.0 + 3.0 * (-s / 20.0).exp()
            - 0.02 * (r.ln()) * (0.5 / beta).min(1.0) * (1.0 - (-s / 20.0).exp());
        for (metric, value) in [
            ("loss", ppl.ln() + 0.01),
            ("heldout_loss", ppl.ln()),
            ("heldout_perplexity", ppl),
            (
                "grad_norm_avg",
                1e-2 * factor(seed, rank, step) * r.powf(0.5 - beta) * (1.0 + (-s / 10.0).exp()),
            ),
            ("lr", 5e-5),
        ] {
            metrics.push(MetricRow {
                source: "train".into(),
                model: MODEL.into(),
                rank,
                scaling: scaling.parse().expect("scaling"),
                beta,
                optimizer: "adamw".parse().expect("optimizer"),
                inputs: "chatterbot-corpus".into(),
                seed,
                step,
                metric: metric.parse().expect("metric"),
                value,
            });
        }
    }
    TableWriter::<MetricRow>::open(&dir.join(files::METRICS))
        .expect("open")
        .append(&metrics)
        .expect("append");
}

/// A sweep: every rank x {lora, rslora} x seed, one directory each, under `root`.
pub fn write_train_sweep(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (scaling, beta) in [("lora", 1.0), ("rslora", 0.5)] {
        for &rank in &RANKS {
            for &seed in &SEEDS {
                dirs.push(write_train_cell(root, rank, scaling, beta, seed));
            }
        }
    }
    dirs
}

/// A directory as `make audit` leaves it: `theory/` is up to the caller; `sweep/` holds
/// `sweep.json` listing the sweep's cells plus one that has not started, and
/// `cells/<name>/` for the others, each with a `checkpoint/` folder; one more cell is still
/// running and one diverged at step 25 (rank 64, lora, seeds 1 and 0). A `logs/` folder
/// holds no run. Returns the cell directories written.
pub fn write_audit_sweep(root: &Path) -> Vec<PathBuf> {
    let sweep = root.join("sweep");
    let cells = sweep.join("cells");
    let mut names = Vec::new();
    let mut dirs = Vec::new();
    for (scaling, beta) in [("lora", 1.0), ("rslora", 0.5)] {
        for &rank in &RANKS {
            for &seed in &SEEDS {
                let name = format!("{:03}-{MODEL}-r{rank}-{scaling}-adamw-s{seed}", names.len());
                let dir = cells.join(&name);
                write_train_run(&dir, rank, scaling, beta, seed, RunStatus::Complete, None);
                names.push(name);
                dirs.push(dir);
            }
        }
    }
    for (seed, status, note) in [
        (0, RunStatus::Diverged, Some("diverged at step 25")),
        (1, RunStatus::Running, None),
    ] {
        let name = format!("{:03}-{MODEL}-r64-lora-adamw-s{seed}", names.len());
        let dir = cells.join(&name);
        write_train_run(&dir, 64, "lora", 1.0, seed, status, note);
        names.push(name);
        dirs.push(dir);
    }
    names.push(format!("{:03}-{MODEL}-r128-lora-adamw-s0", names.len()));
    for dir in &dirs {
        let ck = dir.join("checkpoint");
        std::fs::create_dir_all(ck.join("optimizer")).expect("mkdir");
        std::fs::write(ck.join("state.json"), "{}").expect("write");
    }
    std::fs::create_dir_all(root.join("logs")).expect("mkdir");
    std::fs::write(root.join("logs/audit.log"), "log\n").expect("write");
    let cells_json: Vec<serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| serde_json::json!({"index": i, "name": n}))
        .collect();
    write_json_atomic(
        &sweep.join("sweep.json"),
        &serde_json::json!({"schema_version": SCHEMA_VERSION, "config": {}, "cells": cells_json}),
    )
    .expect("sweep.json");
    dirs
}
