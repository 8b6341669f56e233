//! Speed and memory of the checker, measured side by side in one run (ratios, not times:
//! the machines are noisy).
//!
//! 1. The best f32 GEMM rate this machine reaches in this run: matrixmultiply on one core,
//!    on all cores (independent products, the way the checker uses cores), and NumPy's
//!    (OpenBLAS, all cores) when the pinned Python packages are installed.
//! 2. The checker's achieved GFLOP/s on its default configuration (width 4096, ranks
//!    4..2048, SGD and Adam, three scalings, coherent and fresh inputs) over that rate,
//!    timed after one untimed trial (pools, page faults, the exact law's tables).
//! 3. Time per trial against a plain NumPy implementation of the same cells.
//! 4. Peak memory (VmHWM) of one trial at width 4096, rank 2048, in a child process.
//! 5. The roofline: a STREAM triad's memory bandwidth on all cores, the checker's
//!    arithmetic intensity (`trial_flops / trial_bytes`, the model in `run.rs`), the bound
//!    `min(GEMM peak, intensity x bandwidth)` and the achieved rate over it at the default
//!    batch (target >= 0.7); and the achieved rate over GEMM peak at training batch 64
//!    (target >= 0.7), where the products are no longer rank-16 updates.
//!
//! Every figure goes to `target/rankstab-bench/theory_speed.json`, with a `summary` list
//! of (name, value, target, op, met) that `scripts/bench_summary.py` prints.
//!
//! Run: `cargo bench -p rankstab-theory --bench theory_speed` (or `make bench`).
//! `RANKSTAB_BENCH_TRIALS` sets the trials timed (default 2); `RANKSTAB_BENCH_BATCH=N,M`
//! the training and held-out batch sizes of the default run (default 16,32);
//! `RANKSTAB_BENCH_BATCH_LARGE=N,M` those of the large-batch run (default 64,32).
// The allocator `rankstab` runs with (jemalloc: rankstab-train links it into the CLI), so
// that the checker is timed as users run it.
use tikv_jemalloc_sys as _;

use ndarray::Array2;
use rankstab_theory::{trial_bytes, trial_flops, trial_rows, TheoryConfig, TrialSeconds};
use rayon::prelude::*;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn sgemm_rate(threads: usize) -> f64 {
    let n = 2048;
    let a = Array2::<f32>::from_shape_fn((n, n), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
    let b = a.t().to_owned();
    let run = || {
        let c = a.dot(&b);
        std::hint::black_box(c[[0, 0]]);
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    pool.install(|| (0..threads).into_par_iter().for_each(|_| run()));
    let reps = 3;
    let t0 = Instant::now();
    pool.install(|| (0..threads * reps).into_par_iter().for_each(|_| run()));
    (threads * reps) as f64 * 2.0 * (n as f64).powi(3) / t0.elapsed().as_secs_f64() / 1e9
}

/// STREAM triad `a[i] = b[i] + s c[i]` on `threads` workers, 64 MiB per array per worker
/// (far beyond any cache), best of 5 repetitions; bytes counted as STREAM does (two reads
/// and one write per entry, 12 bytes), in GB/s.
fn stream_triad_gbs(threads: usize) -> f64 {
    let per = 16 << 20;
    let n = per * threads;
    let (mut a, mut b, mut c) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    // First touch by the workers that use the pages.
    a.par_chunks_mut(per)
        .zip(b.par_chunks_mut(per))
        .zip(c.par_chunks_mut(per))
        .for_each(|((a, b), c)| {
            for (i, ((x, y), z)) in a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut()).enumerate() {
                *x = 0.0;
                *y = (i % 7) as f32;
                *z = (i % 5) as f32;
            }
        });
    let s = 3.0f32;
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        a.par_chunks_mut(per)
            .zip(b.par_chunks(per))
            .zip(c.par_chunks(per))
            .for_each(|((a, b), c)| {
                for ((x, &y), &z) in a.iter_mut().zip(b).zip(c) {
                    *x = y + s * z;
                }
            });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(a[n / 2]);
        best = best.max(12.0 * n as f64 / dt / 1e9);
    }
    best
}

/// The L2 cache of one core in bytes, from sysfs (1 MiB when it cannot be read).
fn l2_bytes() -> f64 {
    let read = || -> Option<f64> {
        for i in 0..8 {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
            if level.trim() != "2" {
                continue;
            }
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            let size = size.trim();
            let (num, mult) = match size.strip_suffix('K') {
                Some(k) => (k, 1024.0),
                None => match size.strip_suffix('M') {
                    Some(m) => (m, 1024.0 * 1024.0),
                    None => (size, 1.0),
                },
            };
            return num.parse::<f64>().ok().map(|v| v * mult);
        }
        None
    };
    read().unwrap_or(1024.0 * 1024.0)
}

/// (mean, best) seconds per trial of `cfg` over `trials` trials and where the best trial's
/// time went, after one untimed trial:
/// the first trial of a process also builds the exact law's tables for its ranks (Adam's
/// fill as cells ask), a cost a run pays once for all its trials (about 3.5 s at the
/// default). The ratios use the best trial, as the GEMM and STREAM figures use their best
/// repetitions: on a shared machine the slower trials measure the neighbours.
fn time_checker(cfg: &TheoryConfig, trials: usize) -> (f64, f64, TrialSeconds) {
    trial_rows(cfg, trials).expect("valid config");
    let mut total = 0.0;
    let mut best = f64::INFINITY;
    let mut split = TrialSeconds::default();
    for t in 0..trials {
        let t0 = Instant::now();
        let rows = trial_rows(cfg, t).expect("valid config");
        let dt = t0.elapsed().as_secs_f64();
        total += dt;
        if dt < best {
            best = dt;
            split = rows.seconds;
        }
    }
    (total / trials as f64, best, split)
}

fn batch_env(name: &str) -> Option<(usize, usize)> {
    let s = std::env::var(name).ok()?;
    let (a, b) = s.split_once(',')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// One row of the JSON summary (printed by scripts/bench_summary.py).
fn row(name: &str, value: f64, target: f64, op: &str, unit: &str) -> serde_json::Value {
    let met = if op == ">=" {
        value >= target
    } else {
        value <= target
    };
    serde_json::json!({"name": name, "value": value, "target": target, "op": op, "met": met, "unit": unit})
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn vm_hwm_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: a smoke run only.
    if !std::env::args().any(|a| a == "--bench")
        && std::env::var("RANKSTAB_BENCH_MEMORY_CHILD").is_err()
    {
        let cfg = TheoryConfig {
            width: 64,
            ranks: vec![4, 16],
            trials: 1,
            ..Default::default()
        };
        let rows = trial_rows(&cfg, 0).expect("valid config").moments;
        assert!(trial_flops(&cfg) > 0.0 && trial_bytes(&cfg, 1e6) > 0.0 && !rows.is_empty());
        println!("theory_speed: smoke run ok (use `cargo bench` to measure)");
        return;
    }
    if std::env::var("RANKSTAB_BENCH_MEMORY_CHILD").is_ok() {
        // Child: one trial at width 4096 with only rank 2048 cells, then report VmHWM.
        let cfg = TheoryConfig {
            ranks: vec![2048],
            trials: 1,
            ..Default::default()
        };
        let rows = trial_rows(&cfg, 0).expect("valid config").moments;
        std::hint::black_box(rows.len());
        println!("{}", vm_hwm_mb().unwrap_or(f64::NAN));
        return;
    }
    let threads = rayon::current_num_threads();
    let trials: usize = std::env::var("RANKSTAB_BENCH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("rankstab theory benchmark ({threads} threads, {trials} trials of the default configuration; load {})", load_start.trim());

    let mm1 = sgemm_rate(1);
    let mm_all = sgemm_rate(threads);
    println!("f32 GEMM 2048^3, matrixmultiply, 1 core:        {mm1:7.1} GFLOP/s");
    println!("f32 GEMM 2048^3, matrixmultiply, {threads} cores:       {mm_all:7.1} GFLOP/s");
    let bandwidth = stream_triad_gbs(threads);
    println!("STREAM triad, {threads} cores (12 bytes per entry):   {bandwidth:7.1} GB/s");
    let cache = l2_bytes();

    let mut cfg = TheoryConfig {
        trials,
        ..Default::default()
    };
    // RANKSTAB_BENCH_BATCH=N,M times training batch N and held-out batch M instead.
    if let Some((n, m)) = batch_env("RANKSTAB_BENCH_BATCH") {
        cfg.batch = n;
        cfg.heldout = m;
    }
    let (n_large, m_large) = batch_env("RANKSTAB_BENCH_BATCH_LARGE").unwrap_or((64, 32));
    let large = TheoryConfig {
        batch: n_large,
        heldout: m_large,
        ..cfg.clone()
    };
    // The all-core GEMM rate is measured again after each checker timing, the bandwidth
    // after both, and the best of each is kept: a neighbour's load during one measurement
    // would otherwise lower the peak or the bound and flatter the ratios.
    let (mean, ours, split) = time_checker(&cfg, trials);
    let mm_after = sgemm_rate(threads);
    let (mean_large, ours_large, split_large) = time_checker(&large, trials);
    let mm_after_large = sgemm_rate(threads);
    println!("f32 GEMM 2048^3, matrixmultiply, {threads} cores, after the checker: {mm_after:.1} and {mm_after_large:.1} GFLOP/s");
    let gemm_samples = [mm_all, mm_after, mm_after_large];
    let spread =
        mm_all.max(mm_after).max(mm_after_large) / mm_all.min(mm_after).min(mm_after_large);
    if spread > 1.2 {
        println!("(the GEMM samples differ by {:.0}%: the machine's load changed during the run; the ratios are not reliable, rerun on a quiet machine)", (spread - 1.0) * 100.0);
    }
    let mm_all = mm_all.max(mm_after).max(mm_after_large);
    // The same for the bandwidth: a loaded sample would lower the bound.
    let bw_after = stream_triad_gbs(threads);
    println!("STREAM triad, {threads} cores, after the checker:    {bw_after:7.1} GB/s");
    let bandwidth = bandwidth.max(bw_after);
    let flops = trial_flops(&cfg);
    let achieved = flops / ours / 1e9;
    let flops_large = trial_flops(&large);
    let achieved_large = flops_large / ours_large / 1e9;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let pydeps = root.join(".deps/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/numpy_baseline.py");
    let numpy = if pydeps.join("numpy").exists() {
        let cfg_json = serde_json::to_string(&cfg).expect("config serialises");
        let out = Command::new("python3")
            .arg(&script)
            .arg(cfg_json)
            .arg("1")
            .env("PYTHONPATH", &pydeps)
            .output()
            .expect("python3 runs");
        if out.status.success() {
            serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
        } else {
            eprintln!(
                "numpy baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            None
        }
    } else {
        println!("(NumPy baseline skipped: run `bash scripts/setup.sh --python`)");
        None
    };
    let np_gemm = numpy
        .as_ref()
        .and_then(|v| v["numpy_sgemm_gflops"].as_f64());
    if let Some(g) = np_gemm {
        println!("f32 GEMM 2048^3, NumPy (OpenBLAS), {threads} cores:    {g:7.1} GFLOP/s");
    }
    let peak_gemm = [mm1, mm_all, np_gemm.unwrap_or(0.0)]
        .into_iter()
        .fold(0.0, f64::max);
    let roofline = |flops: f64, bytes: f64, achieved: f64| {
        let intensity = flops / bytes;
        let bound = peak_gemm.min(intensity * bandwidth);
        serde_json::json!({
            "flops": flops,
            "bytes": bytes,
            "intensity_flop_per_byte": intensity,
            "bound_gflops": bound,
            "achieved_gflops": achieved,
            "achieved_over_bound": achieved / bound,
            "achieved_over_gemm_peak": achieved / peak_gemm,
        })
    };
    let bytes = trial_bytes(&cfg, cache);
    let bytes_large = trial_bytes(&large, cache);
    let mut r_default = roofline(flops, bytes, achieved);
    let mut r_large = roofline(flops_large, bytes_large, achieved_large);
    for (r, c, secs, mean, split) in [
        (&mut r_default, &cfg, ours, mean, split),
        (&mut r_large, &large, ours_large, mean_large, split_large),
    ] {
        r["batch"] = c.batch.into();
        r["heldout"] = c.heldout.into();
        r["seconds_per_trial"] = secs.into();
        r["seconds_per_trial_mean"] = mean.into();
        r["best_trial_seconds"] = serde_json::json!({
            "data": split.data,
            "cells": split.cells,
            "law": split.law,
        });
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let ratio_bound = f(&r_default, "achieved_over_bound");
    let ratio_large = f(&r_large, "achieved_over_gemm_peak");
    println!("best f32 GEMM rate (peak):                      {peak_gemm:7.1} GFLOP/s");
    for (label, r) in [("default batch", &r_default), ("large batch  ", &r_large)] {
        println!(
            "checker, {label} (N={}, held-out {}):     {:7.1} GFLOP/s ({:.2} s best trial, {:.2} mean, {:.1} GFLOP, {:.1} GB moved)",
            r["batch"], r["heldout"], f(r, "achieved_gflops"), f(r, "seconds_per_trial"), f(r, "seconds_per_trial_mean"), f(r, "flops") / 1e9, f(r, "bytes") / 1e9
        );
        println!(
            "  intensity {:.2} FLOP/byte (L2 {:.0} KiB), roofline bound min({peak_gemm:.1}, {:.2} x {bandwidth:.1}) = {:.1} GFLOP/s",
            f(r, "intensity_flop_per_byte"), cache / 1024.0, f(r, "intensity_flop_per_byte"), f(r, "bound_gflops")
        );
        println!(
            "  achieved / bound {:.2}, achieved / GEMM peak {:.2}",
            f(r, "achieved_over_bound"),
            f(r, "achieved_over_gemm_peak")
        );
        let split = &r["best_trial_seconds"];
        println!(
            "  the best trial: {:.2} s drawing data, {:.2} s in the cells (products, steps, moments), {:.2} s in the exact law's rows",
            f(split, "data"), f(split, "cells"), f(split, "law")
        );
    }
    println!(
        "RATIO achieved / roofline bound, default batch: {ratio_bound:7.2}   (target >= 0.7: {})",
        verdict(ratio_bound >= 0.7)
    );
    println!(
        "RATIO achieved / GEMM peak, batch {n_large}:          {ratio_large:7.2}   (target >= 0.7: {})",
        verdict(ratio_large >= 0.7)
    );
    let mut summary = vec![
        row(
            "checker achieved / roofline bound, default batch",
            ratio_bound,
            0.7,
            ">=",
            "",
        ),
        row(
            &format!("checker achieved / GEMM peak, batch {n_large}"),
            ratio_large,
            0.7,
            ">=",
            "",
        ),
    ];
    let np_secs = numpy.as_ref().and_then(|v| v["seconds_per_trial"].as_f64());
    if let Some(np) = np_secs {
        println!("NumPy implementation of the same cells:         {np:7.2} s per trial");
        // Against the mean trial (NumPy's is one trial).
        println!("RATIO NumPy time / rankstab time:               {:7.2}   (target > 1: rankstab faster)", np / mean);
        summary.push(row(
            "NumPy time / rankstab mean time",
            np / mean,
            1.0,
            ">=",
            "",
        ));
    }
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .env("RANKSTAB_BENCH_MEMORY_CHILD", "1")
        .output()
        .expect("child runs");
    let peak: f64 = String::from_utf8_lossy(&child.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    println!(
        "peak memory, one trial at width 4096, rank 2048: {peak:7.0} MB     (target < 2048 MB)"
    );
    summary.push(row(
        "peak memory, one trial at width 4096, rank 2048",
        peak,
        2048.0,
        "<=",
        "MB",
    ));
    let out = root
        .canonicalize()
        .unwrap_or(root.clone())
        .join("target/rankstab-bench");
    let json = serde_json::json!({
        "bench": "theory_speed",
        "threads": threads,
        "trials": trials,
        "gemm_gflops": {
            "matrixmultiply_1_core": mm1,
            "matrixmultiply_all_cores": mm_all,
            "matrixmultiply_all_cores_samples": gemm_samples,
            "samples_spread": spread,
            "numpy": np_gemm,
            "peak": peak_gemm,
        },
        "stream_triad_gbs": bandwidth,
        "l2_cache_bytes": cache,
        "default_batch": r_default,
        "large_batch": r_large,
        "numpy_seconds_per_trial": np_secs,
        "peak_memory_mb": peak,
        "summary": summary,
        "load_average_start": load_start.trim(),
        "load_average_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    if std::fs::create_dir_all(&out).is_ok() {
        let path = out.join("theory_speed.json");
        match std::fs::write(
            &path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        ) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("{}: {e}", path.display()),
        }
    }
}
