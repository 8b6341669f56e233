//! Speed and memory of the checker, measured side by side in one run (ratios, not times:
//! the machines are noisy).
//!
//! 1. The best f32 GEMM rate this machine reaches in this run: matrixmultiply on one core,
//!    on all cores (independent products, the way the checker uses cores), and NumPy's
//!    (OpenBLAS, all cores) when the pinned Python packages are installed.
//! 2. The checker's achieved GFLOP/s on its default configuration (width 4096, ranks
//!    4..2048, SGD and Adam, three scalings, coherent and fresh inputs) over that rate.
//! 3. Time per trial against a plain NumPy implementation of the same cells.
//! 4. Peak memory (VmHWM) of one trial at width 4096, rank 2048, in a child process.
//!
//! Run: `cargo bench -p rankstab-theory --bench theory_speed` (or `make bench`).
//! `RANKSTAB_BENCH_TRIALS` sets the trials timed (default 2); `RANKSTAB_BENCH_BATCH=N,M`
//! the training and held-out batch sizes (default 16,32).
use ndarray::Array2;
use rankstab_theory::{trial_flops, trial_rows, TheoryConfig};
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
        assert!(trial_flops(&cfg) > 0.0 && !rows.is_empty());
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
    println!("rankstab theory benchmark ({threads} threads, {trials} trials of the default configuration)");

    let mm1 = sgemm_rate(1);
    let mm_all = sgemm_rate(threads);
    println!("f32 GEMM 2048^3, matrixmultiply, 1 core:        {mm1:7.1} GFLOP/s");
    println!("f32 GEMM 2048^3, matrixmultiply, {threads} cores:       {mm_all:7.1} GFLOP/s");

    let mut cfg = TheoryConfig {
        trials,
        ..Default::default()
    };
    // RANKSTAB_BENCH_BATCH=N,M times training batch N and held-out batch M instead.
    if let Some((n, m)) = std::env::var("RANKSTAB_BENCH_BATCH").ok().and_then(|s| {
        let (a, b) = s.split_once(',')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }) {
        cfg.batch = n;
        cfg.heldout = m;
        println!("(training batch {n}, held-out batch {m})");
    }
    // Warm-up (page faults, pools) on a small configuration.
    trial_rows(
        &TheoryConfig {
            width: 512,
            ranks: vec![4, 64],
            ..Default::default()
        },
        0,
    )
    .expect("valid");
    let t0 = Instant::now();
    for t in 0..trials {
        trial_rows(&cfg, t).expect("valid config");
    }
    let ours = t0.elapsed().as_secs_f64() / trials as f64;
    let flops = trial_flops(&cfg);
    let achieved = flops / ours / 1e9;

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
    let best = [mm1, mm_all, np_gemm.unwrap_or(0.0)]
        .into_iter()
        .fold(0.0, f64::max);
    println!("checker, default configuration:                 {achieved:7.1} GFLOP/s ({:.2} s per trial, {:.1} GFLOP)", ours, flops / 1e9);
    println!(
        "RATIO achieved / best f32 GEMM rate:            {:7.2}   (target >= 0.7)",
        achieved / best
    );
    if let Some(np) = numpy.as_ref().and_then(|v| v["seconds_per_trial"].as_f64()) {
        println!("NumPy implementation of the same cells:         {np:7.2} s per trial");
        println!("RATIO NumPy time / rankstab time:               {:7.2}   (target > 1: rankstab faster)", np / ours);
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
}
