//! Forward throughput (tokens/s) and peak memory of SmolLM2-135M (from its GGUF file, f32,
//! CPU) against transformers on the same file, batch, context, thread count and number of
//! repetitions, run one after the other in separate processes; prints both and the ratios
//! and writes them to target/rankstab-bench/forward.json.
//!
//! `cargo bench -p rankstab-train --bench forward`
//! Environment: RANKSTAB_ASSETS (default: assets/ at the repository root),
//! RANKSTAB_BENCH_BATCH (1), RANKSTAB_BENCH_CONTEXT (256), RANKSTAB_BENCH_REPS (5),
//! RANKSTAB_BENCH_THREADS (all cores), RANKSTAB_PYTHON (python3) and RANKSTAB_PYTHONPATH
//! (where torch, transformers and gguf are installed). Skips, saying why, without the
//! model; measures only the Rust side without the Python packages.
//!
//! Peak memory is the process's peak resident set during the timed forward passes, the
//! peak being reset after loading (`/proc/self/clear_refs`), so loaders' temporary buffers
//! do not count; both processes hold the same f32 weights.
mod common;
use common::{
    assets, cores, env_usize, median, missing, smoke, status_mb, write_result, Python, Run,
};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measure {
    #[serde(flatten)]
    run: Run,
    peak_rss_forward_mb: f64,
}

/// What both sides run: `reps` forward passes of `batch` x `context` tokens on `threads`.
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    context: usize,
    reps: usize,
    threads: usize,
}

fn rust_side(path: &Path, sh: Shape) -> Result<Measure, String> {
    tch::set_num_threads(sh.threads as i32);
    let t0 = Instant::now();
    let model = rankstab_train::gguf::load_llama(path, Kind::Float, Device::Cpu)
        .map_err(|e| e.to_string())?;
    let load_s = t0.elapsed().as_secs_f64();
    tch::manual_seed(0);
    let ids = Tensor::randint(
        model.config.vocab_size,
        [sh.batch as i64, sh.context as i64],
        (Kind::Int64, Device::Cpu),
    );
    let mut times = Vec::with_capacity(sh.reps);
    let (rss_loaded, peak) = tch::no_grad(|| {
        let _ = model.forward(&ids, false); // warm-up
        let rss_loaded = status_mb("VmRSS");
        // Reset the peak resident set: from here on it measures the forward passes.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        for _ in 0..sh.reps {
            let t = Instant::now();
            let y = model.forward(&ids, false);
            drop(y);
            times.push(t.elapsed().as_secs_f64());
        }
        (rss_loaded, status_mb("VmHWM"))
    });
    let med = median(times);
    Ok(Measure {
        run: Run::new(
            "rankstab (tch)",
            (sh.batch, sh.context),
            sh.threads,
            load_s,
            med,
            rss_loaded,
        ),
        peak_rss_forward_mb: peak,
    })
}

fn python_side(path: &Path, sh: Shape) -> Result<Measure, String> {
    let mut args = vec![path.display().to_string()];
    args.extend([sh.batch, sh.context, sh.reps, sh.threads].map(|v| v.to_string()));
    Python::from_env().run(
        "forward_transformers.py",
        &["torch", "transformers", "gguf"],
        &args,
    )
}

fn print(m: &Measure) {
    println!(
        "{:<16} {:>10.1} tokens/s  median {:>7.3} s/forward  RSS loaded {:>7.0} MB  peak during forward {:>7.0} MB  (load {:.1} s)",
        m.run.implementation, m.run.tokens_per_s, m.run.median_s, m.run.rss_loaded_mb, m.peak_rss_forward_mb, m.run.load_s
    );
}

fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): then a smoke run, one
    // short forward pass on our side only, proves the benchmark works without timing it.
    let smoke = smoke();
    let path = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if missing("forward", &[&path]) {
        return;
    }
    let sh = Shape {
        batch: env_usize("RANKSTAB_BENCH_BATCH", 1),
        context: if smoke {
            16
        } else {
            env_usize("RANKSTAB_BENCH_CONTEXT", 256)
        },
        reps: if smoke {
            1
        } else {
            env_usize("RANKSTAB_BENCH_REPS", 5).max(1)
        },
        threads: env_usize("RANKSTAB_BENCH_THREADS", cores()),
    };
    println!(
        "SmolLM2-135M f32 CPU forward: batch {}, context {}, {} repetitions, {} threads",
        sh.batch, sh.context, sh.reps, sh.threads
    );
    let ours = match rust_side(&path, sh) {
        Ok(m) => m,
        Err(e) => {
            println!("forward: FAILED to load {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    print(&ours);
    if smoke {
        println!("forward: smoke run only (cargo test); measure with `cargo bench -p rankstab-train --bench forward`");
        return;
    }
    let theirs = match python_side(&path, sh) {
        Ok(m) => {
            print(&m);
            println!(
                "ratio rankstab / transformers: throughput {:.2}x, peak memory during forward {:.2}x, resident after load {:.2}x",
                ours.run.tokens_per_s / m.run.tokens_per_s,
                ours.peak_rss_forward_mb / m.peak_rss_forward_mb,
                ours.run.rss_loaded_mb / m.run.rss_loaded_mb
            );
            Some(m)
        }
        Err(e) => {
            println!("transformers side SKIPPED: {e}");
            None
        }
    };
    write_result(
        "forward",
        &serde_json::json!({ "rankstab": ours, "transformers": theirs }),
    );
}
