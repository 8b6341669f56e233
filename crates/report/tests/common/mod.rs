//! Test fixtures: synthetic *training* run directories in the shared record format, one
//! directory per cell (model, rank, scaling, seed, learning rate) as `rankstab train` writes
//! them, with known rank exponents, so the report's merging, fitting, judging and figures can
//! be checked before real training runs exist. Values follow the Adam laws of proofs/
//! exactly, times a deterministic per-seed factor shared across ranks and a small per-rank
//! wobble (standing for the adapter's random init). At step 1 the runs also write the exact
//! law's rows (`stat = law`) as the trainer does: the measured rows' expectation (the same
//! values without the wobble), or that times `r^offset` to make a wrong law.
#![allow(dead_code)]
use rankstab_records::{
    files, write_json_atomic, Manifest, MetricRow, MomentRow, RunStatus, TableWriter,
    SCHEMA_VERSION,
};
use std::path::{Path, PathBuf};

pub const MODEL: &str = "tiny-llama";
/// The hidden size the trainer records as every row's width.
pub const HIDDEN: u32 = 128;
/// Adapted modules with their (in, out) shapes as `config.run.modules` records them:
/// d = min(in, out) is 128, 128 and 256, so that ranks up to 32 reach d/8 (down_proj's d is
/// known from the config only: its rows record the hidden size).
pub const MODULES: [(&str, [u32; 2]); 3] = [
    ("q_proj", [128, 128]),
    ("v_proj", [128, 128]),
    ("down_proj", [512, 256]),
];
pub const LAYERS: u32 = 2;
pub const RANKS: [u32; 5] = [2, 4, 8, 16, 32];
pub const SEEDS: [u64; 3] = [0, 1, 2];
pub const STEPS: [u32; 6] = [0, 1, 10, 20, 30, 40];
pub const LR: f64 = 5e-5;

/// What a synthetic sweep holds.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// Ranks.
    pub ranks: Vec<u32>,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Learning rates (one cell per rank, scaling, seed and learning rate).
    pub lrs: Vec<f64>,
    /// Slope added to the law rows' rank dependence (0: the law rows are the measured rows'
    /// expectation); `None`: no law rows (runs written before the trainer recorded them).
    pub law_offset: Option<f64>,
    /// `config.run.model`: a path for pretrained weights, `preset:NAME` for random ones.
    pub model: String,
}

impl Default for Sweep {
    /// Judgeable: 3 seeds, 5 ranks reaching d/8, law rows equal to the expectation; random
    /// weights (a preset), one learning rate.
    fn default() -> Self {
        Sweep {
            ranks: RANKS.to_vec(),
            seeds: SEEDS.to_vec(),
            lrs: vec![LR],
            law_offset: Some(0.0),
            model: format!("preset:{MODEL}"),
        }
    }
}

/// One training cell.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub rank: u32,
    pub scaling: &'static str,
    pub beta: f64,
    pub seed: u64,
    pub lr: f64,
}

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

/// The per-seed factor, shared across ranks (the run's data).
fn seed_factor(seed: u64, step: u32) -> f64 {
    1.0 + 0.1 * (seed as f64 * 1.7 + f64::from(step) * 0.01).sin()
}

/// The per-rank wobble of one seed (the adapter's random init): 1 in expectation.
fn wobble(seed: u64, rank: u32) -> f64 {
    1.0 + 0.01 * (f64::from(rank) * 0.9 + seed as f64).cos()
}

fn factor(seed: u64, rank: u32, step: u32) -> f64 {
    seed_factor(seed, step) * wobble(seed, rank)
}

/// Writes one training cell of the default sweep; returns its directory.
pub fn write_train_cell(
    root: &Path,
    rank: u32,
    scaling: &'static str,
    beta: f64,
    seed: u64,
) -> PathBuf {
    let cell = Cell {
        rank,
        scaling,
        beta,
        seed,
        lr: LR,
    };
    let dir = root.join(format!("{MODEL}-r{rank}-{scaling}-s{seed}"));
    write_train_run(&dir, cell, &Sweep::default(), RunStatus::Complete, None);
    dir
}

/// Writes one training run directory `dir` with the given manifest status and note (every
/// step of [`STEPS`] is written whatever the status: the report must cut a diverged run).
pub fn write_train_run(
    dir: &Path,
    cell: Cell,
    sweep: &Sweep,
    status: RunStatus,
    note: Option<&str>,
) {
    let Cell {
        rank,
        scaling,
        beta,
        seed,
        lr,
    } = cell;
    std::fs::create_dir_all(dir).expect("mkdir");
    let modules: serde_json::Map<String, serde_json::Value> = MODULES
        .iter()
        .map(|(name, shape)| ((*name).to_string(), serde_json::json!(shape)))
        .collect();
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: "rankstab".into(),
        tool_version: "0.1.0".into(),
        git_revision: Some("0123456789abcdef".into()),
        command: "train".into(),
        config: serde_json::json!({
            "model": MODEL, "rank": rank, "scaling": scaling, "optimizer": "adamw", "lr": lr, "seed": seed,
            "run": {"model": sweep.model, "modules": modules},
        }),
        seeds: vec![seed],
        device: "cpu (2 threads)".into(),
        created: "2024-01-01T00:00:00Z".into(),
        finished: (status != RunStatus::Running).then(|| "2024-01-01T00:01:00Z".into()),
        status,
        note: note.map(str::to_string),
        tables: Default::default(),
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
        width: HIDDEN,
        seed,
        ..Default::default()
    };
    let r = f64::from(rank);
    let mut rows = Vec::new();
    for (mi, (module, _)) in MODULES.iter().enumerate() {
        for layer in 0..LAYERS {
            let scale = 1.0 + 0.5 * mi as f64 + 0.25 * f64::from(layer);
            for &step in &STEPS {
                let f = factor(seed, rank, step) * scale;
                let mut push = |site: &str, stat: &str, m: Option<u32>, value: f64| {
                    rows.push(MomentRow {
                        module: (*module).into(),
                        layer,
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
                if let (1, Some(offset)) = (step, sweep.law_offset) {
                    // The exact first-step law given the run's data: E over the init.
                    let expectation = 1e-4 * seed_factor(seed, step) * scale;
                    push(
                        "fwd",
                        "law",
                        Some(2),
                        expectation * r.powf(expected("fwd", "abs", beta) + offset),
                    );
                }
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
            ("lr", lr),
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

/// A sweep: every rank x {lora, rslora} x seed x learning rate of `sweep`, one directory
/// each, under `root`.
pub fn write_sweep(root: &Path, sweep: &Sweep) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (scaling, beta) in [("lora", 1.0), ("rslora", 0.5)] {
        for &rank in &sweep.ranks {
            for &seed in &sweep.seeds {
                for &lr in &sweep.lrs {
                    let lr_part = if sweep.lrs.len() > 1 {
                        format!("-lr{lr}")
                    } else {
                        String::new()
                    };
                    let dir = root.join(format!("{MODEL}-r{rank}-{scaling}-s{seed}{lr_part}"));
                    let cell = Cell {
                        rank,
                        scaling,
                        beta,
                        seed,
                        lr,
                    };
                    write_train_run(&dir, cell, sweep, RunStatus::Complete, None);
                    dirs.push(dir);
                }
            }
        }
    }
    dirs
}

/// The default sweep ([`Sweep::default`]: judgeable, law rows equal to the expectation).
pub fn write_train_sweep(root: &Path) -> Vec<PathBuf> {
    write_sweep(root, &Sweep::default())
}

/// A directory as `make audit` leaves it: `theory/` is up to the caller; `sweep/` holds
/// `sweep.json` listing the sweep's cells plus one that has not started, and
/// `cells/<name>/` for the others (the default sweep's), each with a `checkpoint/` folder;
/// one more cell is still running and one diverged at step 25 (rank 64, lora, seeds 1 and 0). A `logs/` folder
/// holds no run. Returns the cell directories written.
pub fn write_audit_sweep(root: &Path) -> Vec<PathBuf> {
    let sweep = root.join("sweep");
    let cells = sweep.join("cells");
    let mut names = Vec::new();
    let mut dirs = Vec::new();
    let sweep_spec = Sweep::default();
    let cell = |rank, scaling, beta, seed| Cell {
        rank,
        scaling,
        beta,
        seed,
        lr: LR,
    };
    for (scaling, beta) in [("lora", 1.0), ("rslora", 0.5)] {
        for &rank in &RANKS {
            for &seed in &SEEDS {
                let name = format!("{:03}-{MODEL}-r{rank}-{scaling}-adamw-s{seed}", names.len());
                let dir = cells.join(&name);
                let c = cell(rank, scaling, beta, seed);
                write_train_run(&dir, c, &sweep_spec, RunStatus::Complete, None);
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
        write_train_run(&dir, cell(64, "lora", 1.0, seed), &sweep_spec, status, note);
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
