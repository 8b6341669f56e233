//! One LoRA training step of SmolLM2-135M (from its GGUF file, f32, CPU) against
//! transformers + peft on the same file: adapters of rank 16 on every attention and MLP
//! linear (q, k, v, o, gate, up, down), AdamW at lr 5e-5, the same batch, context, thread
//! count and number of timed steps, each side in its own processes.
//! Our side runs as `rankstab train` does (`run::load_model`, `data::load_dataset`,
//! `run::run_dir` into a temporary run directory), in two configurations: probes off
//! (probe_every = 0, eval_every = 0) and probes on every adapter at every step
//! (probe_every = 1), which gives the probe overhead. They and transformers + peft
//! alternate, RANKSTAB_BENCH_REPS processes each (default 2; ours re-run this binary with
//! `--rankstab-child`; theirs right after our probes-off process), so that a slow spell
//! of the machine falls on all of them, and their timed steps are pooled; the step-time
//! ratio of each repetition's two back-to-back processes is printed beside the pooled
//! one. Each repetition also runs probes every second step (probe_every = 2),
//! where each probed step is compared with the unprobed steps on either side of it: the
//! paired overhead, which a slow spell of a shared machine (minutes long, and landing on
//! one process rather than the other) does not bias. Prints the table, where our step time
//! goes (data, forward, backward, probes, optimizer, evaluation, records: the trainer's
//! [`StepTimes`]), the model FLOP utilisation against libtorch's f32 GEMM peak measured
//! in the same process, and the ratios with their targets, and writes them to
//! target/rankstab-bench/train_step.json (with a `summary` list that
//! `scripts/bench_summary.py` prints).
//!
//! `cargo bench -p rankstab-train --bench train_step`
//! Environment: RANKSTAB_ASSETS (default: assets/ at the repository root),
//! RANKSTAB_BENCH_BATCH (4), RANKSTAB_BENCH_CONTEXT (128), RANKSTAB_BENCH_RANK (16),
//! RANKSTAB_BENCH_STEPS (5 timed steps), RANKSTAB_BENCH_THREADS (all cores),
//! RANKSTAB_BENCH_REPS (2), RANKSTAB_BENCH_NORM_EVERY (the probes' norm and stable rank
//! of gamma B A every k steps; unset: the library's default, which without held-out
//! evaluations is the last step), RANKSTAB_PYTHON (python3) and RANKSTAB_PYTHONPATH
//! (where torch, transformers, peft and gguf are installed). Skips, saying why, without
//! the model or the text; measures only the Rust side without the Python packages.
//!
//! On a shared machine, other processes on the same cores slow libtorch's OpenMP threads
//! by far more than their share: run it on an idle machine. The JSON records the load
//! average, and the minimum step time next to the median.
//!
//! Step time: the wall time between the ends of consecutive steps (the progress callback,
//! called after each step's optimizer update and table rows), so model loading, the
//! warm-up steps and the final held-out evaluation and adapter saving are excluded; the
//! median over the timed steps. Our side has two warm-up steps ([`WARMUP`]: the first-step
//! law's own memory at steps 0 and 1 is not the probes'), transformers + peft one. Peak
//! memory: the process's peak resident set from the end of the warm-up steps to the end
//! of the last step, the peak being reset there (`/proc/self/clear_refs`, after glibc's
//! `malloc_trim` returns the freed heap), as on the Python side; the memory ratio uses the
//! probes-off run.
mod common;
use common::{
    assets, cores, env_usize, median, missing, parse_output, smoke, status_mb, write_result,
    Python, Run,
};
use rankstab_records::Optimizer;
use rankstab_train::data::{load_dataset, DataFormat, DataSpec};
use rankstab_train::llama::MODULES as TARGETS;
use rankstab_train::lora::LoraInit;
use rankstab_train::run::{load_model, run_dir, ModelSpec, RunMeta};
use rankstab_train::trainer::{StepTimes, TrainConfig};
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind};

/// Probe overhead target: probes on every adapter at every step cost at most 5% of the
/// step time...
const PROBE_TARGET: f64 = 0.05;
/// ... and at most 5% of the peak memory during the steps.
const PROBE_MEMORY_TARGET: f64 = 0.05;
/// Untimed steps before the timed ones on our side: the first two, where the probes'
/// exact first-step law (`law.rs`) keeps step 0's gradient directions and step 1's
/// inputs (its own cost, at those two steps only, not the probes' steady state).
const WARMUP: usize = 2;
/// Step time over transformers + peft's.
const STEP_TARGET: f64 = 0.75;
/// Peak memory during the steps over transformers + peft's.
const MEMORY_TARGET: f64 = 0.8;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measure {
    #[serde(flatten)]
    run: Run,
    rank: usize,
    steps: usize,
    #[serde(default)]
    min_s: f64,
    step_times_s: Vec<f64>,
    peak_rss_train_mb: f64,
    #[serde(default)]
    trainable_params: i64,
    #[serde(default)]
    last_loss: f64,
    /// Mean seconds per timed step in each phase (our side only).
    #[serde(default)]
    phases: Option<StepTimes>,
    /// Model FLOPs per step (our side only; see `rankstab_train::memory::train_step_flops`).
    #[serde(default)]
    model_flops: f64,
    /// The best f32 GEMM rate of libtorch in this process, GFLOP/s (our side only).
    #[serde(default)]
    gemm_gflops: f64,
}

/// libtorch's best f32 GEMM rate on this process's threads: n^3 products, best of 5
/// after a warm-up, in GFLOP/s.
fn gemm_gflops(n: i64) -> f64 {
    let a = tch::Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let b = tch::Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let _ = a.matmul(&b);
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let c = a.matmul(&b);
            let s = t.elapsed().as_secs_f64();
            std::hint::black_box(c.numel());
            2.0 * (n as f64).powi(3) / s / 1e9
        })
        .fold(0.0, f64::max)
}

#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    context: usize,
    rank: usize,
    steps: usize,
    threads: usize,
}

/// Timed steps of one of our runs: `sh.steps`, and for the paired run (probes every
/// second step) `2 sh.steps + 1`, so that it has `sh.steps` probed steps between unprobed
/// ones (with [`WARMUP`] even, the timed steps alternate probed, unprobed, ..., unprobed).
fn timed_steps(sh: Shape, probe_every: usize) -> usize {
    if probe_every == 2 {
        2 * sh.steps + 1
    } else {
        sh.steps
    }
}

/// The probe overhead of each probed step of the paired run (probes every second step):
/// its time over the mean of the unprobed steps on either side, minus one. Steps seconds
/// apart share the machine's slow spells, which separate processes minutes apart do not.
fn paired_overheads(times: &[f64]) -> Vec<f64> {
    (0..times.len())
        .step_by(2)
        .filter_map(|j| {
            let beside: Vec<f64> = [j.checked_sub(1), Some(j + 1)]
                .into_iter()
                .flatten()
                .filter_map(|i| times.get(i).copied())
                .collect();
            (!beside.is_empty())
                .then(|| times[j] / (beside.iter().sum::<f64>() / beside.len() as f64) - 1.0)
        })
        .collect()
}

/// One of our runs (probes off, on, or every second step): what
/// `--rankstab-child PROBE_EVERY` runs.
fn rust_run(gguf: &Path, text: &Path, sh: Shape, probe_every: usize) -> Result<Measure, String> {
    tch::set_num_threads(sh.threads as i32);
    let err = |e: rankstab_train::TrainError| e.to_string();
    let t0 = Instant::now();
    // Built from JSON, so that fields the library adds later (with serde defaults) take
    // their defaults here too, as in a sweep file.
    let spec: ModelSpec = serde_json::from_value(serde_json::json!({
        "name": "smollm2-135m",
        "path": gguf,
    }))
    .map_err(|e| format!("model spec: {e}"))?;
    let mut lm = load_model(&spec, Kind::Float, Device::Cpu).map_err(err)?;
    let mut cfg = serde_json::json!({
        "model_name": spec.name,
        "rank": sh.rank,
        // PEFT's LoraConfig(r, lora_alpha=16): gamma = alpha / r (beta 1); the scaling
        // does not change the cost.
        "alpha": 16.0,
        "beta": 1.0,
        "init": LoraInit::KaimingUniform,
        "dropout": 0.0,
        "optimizer": Optimizer::Adamw,
        "lr": 5e-5,
        "steps": timed_steps(sh, probe_every) + WARMUP,
        "batch": sh.batch,
        "micro_batch": 0,
        "context": sh.context,
        "probe_every": probe_every,
        "eval_every": 0,
        "heldout_fraction": 0.1,
        // The final held-out evaluation is not timed; keep it short.
        "heldout_max": sh.batch,
        "target_modules": TARGETS,
        "moments": [1, 2, 3, 4],
        "seed": 0,
        "clip_grad_norm": null,
        "weight_decay": 0.0,
        "checkpoint_every": 0,
        "activation_checkpointing": false,
    });
    // Norm and stable rank of gamma B A every k probed steps (the library's default
    // without it: with the held-out evaluation, here only at the last step).
    if let Some(k) = std::env::var("RANKSTAB_BENCH_NORM_EVERY")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        cfg["norm_every"] = k.into();
    }
    let cfg: TrainConfig = serde_json::from_value(cfg).map_err(|e| format!("train config: {e}"))?;
    cfg.validate().map_err(err)?;
    let data = load_dataset(
        text,
        &lm.tokenizer,
        &DataSpec {
            format: DataFormat::Auto,
            context: cfg.context,
            heldout_fraction: cfg.heldout_fraction,
            seed: cfg.seed,
            max_examples: None,
            eos_token: lm.eos_token.clone(),
        },
    )
    .map_err(err)?;
    let load_s = t0.elapsed().as_secs_f64();
    let tmp = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let meta = RunMeta {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: None,
        device: "cpu".into(),
        extra: serde_json::json!({ "bench": "train_step" }),
    };
    let name = match probe_every {
        0 => "rankstab",
        1 => "rankstab+probes",
        _ => "rankstab+probes/2",
    };
    let gemm = gemm_gflops(if smoke() { 128 } else { 2048 });
    let mut ends: Vec<Instant> = Vec::with_capacity(sh.steps + 1);
    let mut phases: Vec<StepTimes> = Vec::new();
    let mut rss_loaded = f64::NAN;
    let mut peak = f64::NAN;
    let last = timed_steps(sh, probe_every) + WARMUP - 1;
    let run_out = tmp.path().join(name);
    let lock = rankstab_records::RunLock::exclusive(&run_out).expect("lock the run directory");
    let outcome = run_dir(&mut lm.model, &data, &cfg, &run_out, &meta, &lock, |p| {
        let step = p.step;
        ends.push(Instant::now());
        if step >= WARMUP {
            phases.push(p.times);
        }
        if step + 1 == WARMUP {
            // After the warm-up steps: return the heap's free pages (as the Python side
            // does) and reset the peak resident set.
            rankstab_train::memory::release_free_heap();
            rss_loaded = status_mb("VmRSS");
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        } else if step == last {
            peak = status_mb("VmHWM");
        }
    })
    .map_err(err)?;
    if let Some(d) = outcome.diverged {
        return Err(format!("{name}: {d}"));
    }
    let times: Vec<f64> = ends[WARMUP - 1..]
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let med = median(times.clone());
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let phases = StepTimes::mean(&phases);
    let flops = rankstab_train::memory::train_step_flops(
        &mut lm.model,
        (sh.batch * (sh.context)) as f64,
        sh.context as f64,
    );
    let trainable: i64 = lm
        .model
        .linears_mut()
        .iter()
        .filter_map(|(_, l)| l.adapter.as_ref().map(|a| a.a.numel() + a.b.numel()))
        .map(|n| n as i64)
        .sum();
    Ok(Measure {
        run: Run::new(
            name,
            (sh.batch, sh.context),
            sh.threads,
            load_s,
            med,
            rss_loaded,
        ),
        rank: sh.rank,
        steps: sh.steps,
        min_s: min,
        step_times_s: times,
        peak_rss_train_mb: peak,
        trainable_params: trainable,
        last_loss: outcome.last_loss,
        phases: Some(phases),
        model_flops: flops,
        gemm_gflops: gemm,
    })
}

/// Our side, in a fresh process per configuration (this binary again), so that one run's
/// memory cannot count in the other's peak.
fn rust_side(sh: Shape, probe_every: usize, smoke: bool) -> Result<Measure, String> {
    let exe = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
    let mut cmd = Command::new(exe);
    if !smoke {
        cmd.arg("--bench");
    }
    let out = cmd
        .arg("--rankstab-child")
        .arg(probe_every.to_string())
        .env("RANKSTAB_BENCH_BATCH", sh.batch.to_string())
        .env("RANKSTAB_BENCH_CONTEXT", sh.context.to_string())
        .env("RANKSTAB_BENCH_RANK", sh.rank.to_string())
        .env("RANKSTAB_BENCH_STEPS", sh.steps.to_string())
        .env("RANKSTAB_BENCH_THREADS", sh.threads.to_string())
        .output()
        .map_err(|e| format!("this binary: {e}"))?;
    parse_output(
        &format!("the rankstab run (probe_every {probe_every})"),
        &out,
    )
}

fn python_side(gguf: &Path, text: &Path, sh: Shape) -> Result<Measure, String> {
    let mut args = vec![gguf.display().to_string(), text.display().to_string()];
    args.extend([sh.batch, sh.context, sh.rank, sh.steps, sh.threads].map(|v| v.to_string()));
    Python::from_env().run(
        "train_step_transformers.py",
        &["torch", "transformers", "peft", "gguf"],
        &args,
    )
}

fn print(m: &Measure) {
    println!(
        "{:<18} {:>7.1} tokens/s  median {:>7.3} s/step (min {:.3})  peak RSS during steps {:>6.0} MB  RSS after warm-up {:>6.0} MB  (load {:.1} s, {} trainable, loss {:.3})",
        m.run.implementation,
        m.run.tokens_per_s,
        m.run.median_s,
        m.min_s,
        m.peak_rss_train_mb,
        m.run.rss_loaded_mb,
        m.run.load_s,
        m.trainable_params,
        m.last_loss
    );
}

/// The measurements of one configuration over several processes, pooled: every timed
/// step's time (median and minimum recomputed), the largest peak, the mean phases.
fn pooled(ms: Vec<Measure>) -> Measure {
    let phases: Vec<StepTimes> = ms.iter().filter_map(|m| m.phases).collect();
    let mut it = ms.into_iter();
    let mut first = it.next().expect("at least one measurement");
    for m in it {
        first.step_times_s.extend(&m.step_times_s);
        first.peak_rss_train_mb = first.peak_rss_train_mb.max(m.peak_rss_train_mb);
        first.gemm_gflops = first.gemm_gflops.max(m.gemm_gflops);
    }
    first.phases = (!phases.is_empty()).then(|| StepTimes::mean(&phases));
    first.run.median_s = median(first.step_times_s.clone());
    first.run.tokens_per_s = (first.run.batch * first.run.context) as f64 / first.run.median_s;
    first.min_s = first
        .step_times_s
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    first
}

/// Where the step time goes, probes off and on: mean seconds per timed step per phase.
fn print_phases(off: &Measure, on: &Measure) {
    let (Some(a), Some(b)) = (off.phases, on.phases) else {
        return;
    };
    println!("{:<12} {:>12} {:>12}", "phase", "probes off", "probes on");
    for ((name, x), (_, y)) in a.phases().into_iter().zip(b.phases()) {
        println!("{name:<12} {x:>10.3} s {y:>10.3} s");
    }
    println!(
        "{:<12} {:>10.3} s {:>10.3} s",
        "total",
        a.total(),
        b.total()
    );
}

fn verdict(value: f64, target: f64) -> &'static str {
    if value <= target {
        "met"
    } else {
        "NOT met"
    }
}

fn main() {
    // `cargo test --all-targets` runs this too (without `--bench`): then a smoke run, two
    // tiny steps per configuration on our side only, proves the benchmark works without
    // timing it (and without Python).
    let smoke = smoke();
    let root = assets();
    let gguf = root.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = root.join("texts/moby-dick.txt");
    if missing("train_step", &[&gguf, &text]) {
        return;
    }
    let sh = Shape {
        batch: if smoke {
            1
        } else {
            env_usize("RANKSTAB_BENCH_BATCH", 4).max(1)
        },
        context: if smoke {
            16
        } else {
            env_usize("RANKSTAB_BENCH_CONTEXT", 128).max(2)
        },
        rank: env_usize("RANKSTAB_BENCH_RANK", 16).max(1),
        steps: if smoke {
            1
        } else {
            env_usize("RANKSTAB_BENCH_STEPS", 5).max(1)
        },
        // The smoke run uses one thread: tests may run beside it, and libtorch's OpenMP
        // threads slow down by an order of magnitude on oversubscribed cores.
        threads: env_usize("RANKSTAB_BENCH_THREADS", if smoke { 1 } else { cores() }).max(1),
    };
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rankstab-child") {
        // A measuring process started below: one run, one JSON line.
        let probe_every = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(0);
        match rust_run(&gguf, &text, sh, probe_every) {
            Ok(m) => println!("{}", serde_json::to_string(&m).unwrap_or_default()),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "SmolLM2-135M f32 CPU LoRA training step: batch {}, context {}, rank {} on {}, AdamW lr 5e-5, {WARMUP} warm-up + {} timed steps, {} threads; our malloc: {} (transformers + peft: the Python process's, glibc's)",
        sh.batch,
        sh.context,
        sh.rank,
        TARGETS.join(","),
        sh.steps,
        sh.threads,
        rankstab_train::memory::ALLOCATOR
    );
    println!("load average: {}", load_start.trim());
    // Our configurations and transformers + peft alternate, `reps` processes each (ours
    // probes off, theirs right after it, then ours probes on and every second step), so
    // that a slow spell of the machine falls on all of them; their timed steps are pooled.
    let reps = if smoke {
        1
    } else {
        env_usize("RANKSTAB_BENCH_REPS", 2).max(1)
    };
    let mut offs = Vec::new();
    let mut ons = Vec::new();
    let mut theirs_all = Vec::new();
    let mut theirs_err = None;
    let mut paired = Vec::new();
    for _ in 0..reps {
        let off = rust_side(sh, 0, smoke);
        if !smoke && theirs_err.is_none() && off.is_ok() {
            match python_side(&gguf, &text, sh) {
                Ok(m) => theirs_all.push(m),
                Err(e) => theirs_err = Some(e),
            }
        }
        let run = || -> Result<_, String> {
            Ok((off?, rust_side(sh, 1, smoke)?, rust_side(sh, 2, smoke)?))
        };
        match run() {
            Ok((off, on, every2)) => {
                offs.push(off);
                ons.push(on);
                paired.extend(paired_overheads(&every2.step_times_s));
            }
            Err(e) => {
                println!("train_step: FAILED: {e}");
                std::process::exit(1);
            }
        }
    }
    // Our step time over theirs in each repetition (the two processes back to back).
    let rep_ratios: Vec<f64> = offs
        .iter()
        .zip(&theirs_all)
        .map(|(o, t)| o.run.median_s / t.run.median_s)
        .collect();
    let (off, on) = (pooled(offs), pooled(ons));
    print(&off);
    print(&on);
    let probe_overhead = on.run.median_s / off.run.median_s - 1.0;
    let probe_overhead_min = on.min_s / off.min_s - 1.0;
    let probe_memory = on.peak_rss_train_mb / off.peak_rss_train_mb - 1.0;
    println!(
        "probe overhead (probes on every adapter every step): {:+.1}% (target <= {:.0}%: {}; from the fastest steps {:+.1}%), peak memory {:+.1}% (target <= {:.0}%: {})",
        probe_overhead * 100.0,
        PROBE_TARGET * 100.0,
        verdict(probe_overhead, PROBE_TARGET),
        probe_overhead_min * 100.0,
        probe_memory * 100.0,
        PROBE_MEMORY_TARGET * 100.0,
        verdict(probe_memory, PROBE_MEMORY_TARGET),
    );
    let paired_median = median(paired.clone());
    let paired_min = paired.iter().copied().fold(f64::INFINITY, f64::min);
    let paired_max = paired.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "probe overhead, paired in one process (probes every second step; each probed step over the unprobed steps beside it): median {:+.1}% over {} probed steps (range {:+.1}% to {:+.1}%; target <= {:.0}%: {})",
        paired_median * 100.0,
        paired.len(),
        paired_min * 100.0,
        paired_max * 100.0,
        PROBE_TARGET * 100.0,
        verdict(paired_median, PROBE_TARGET),
    );
    print_phases(&off, &on);
    let mfu = off.model_flops / off.run.median_s / (off.gemm_gflops * 1e9);
    println!(
        "model FLOP utilisation (probes off): {:.1} GFLOP per step / {:.3} s = {:.1} GFLOP/s, {:.2} of libtorch's f32 GEMM peak in this run ({:.1} GFLOP/s)",
        off.model_flops / 1e9,
        off.run.median_s,
        off.model_flops / off.run.median_s / 1e9,
        mfu,
        off.gemm_gflops
    );
    if smoke {
        println!("train_step: smoke run only (cargo test); measure with `cargo bench -p rankstab-train --bench train_step`");
        return;
    }
    let theirs = match theirs_err {
        None if !theirs_all.is_empty() => {
            let m = pooled(theirs_all);
            print(&m);
            Some(m)
        }
        None => None,
        Some(e) => {
            println!("transformers side SKIPPED: {e}");
            None
        }
    };
    let ratios = theirs.as_ref().map(|m| {
        let time = off.run.median_s / m.run.median_s;
        let mem = off.peak_rss_train_mb / m.peak_rss_train_mb;
        let time_min = off.min_s / m.min_s;
        let time_probes = on.run.median_s / m.run.median_s;
        println!(
            "ratio rankstab / transformers+peft: step time {time:.2}x (target <= {STEP_TARGET}: {}; fastest steps {time_min:.2}x; in each repetition, back to back: {}), peak memory during steps {mem:.2}x (target <= {MEMORY_TARGET}: {}); with probes on: step time {time_probes:.2}x",
            verdict(time, STEP_TARGET),
            rep_ratios.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", "),
            verdict(mem, MEMORY_TARGET)
        );
        serde_json::json!({
            "step_time": time,
            "step_time_target": STEP_TARGET,
            "step_time_target_met": time <= STEP_TARGET,
            "step_time_fastest_steps": time_min,
            "step_time_per_repetition": rep_ratios,
            "peak_memory": mem,
            "peak_memory_target": MEMORY_TARGET,
            "peak_memory_target_met": mem <= MEMORY_TARGET,
            "step_time_probes_on": time_probes,
        })
    });
    let row = |name: &str, value: f64, target: Option<f64>, op: &str| {
        serde_json::json!({
            "name": name,
            "value": value,
            "target": target,
            "op": op,
            "met": target.map(|t| if op == ">=" { value >= t } else { value <= t }),
        })
    };
    let mut summary = vec![
        row(
            "probe overhead, step time (median)",
            probe_overhead,
            Some(PROBE_TARGET),
            "<=",
        ),
        row(
            "probe overhead, step time (fastest steps)",
            probe_overhead_min,
            Some(PROBE_TARGET),
            "<=",
        ),
        row(
            "probe overhead, step time (paired steps, median)",
            paired_median,
            Some(PROBE_TARGET),
            "<=",
        ),
        row(
            "probe overhead, peak memory",
            probe_memory,
            Some(PROBE_MEMORY_TARGET),
            "<=",
        ),
        row("model FLOP utilisation (of f32 GEMM peak)", mfu, None, ">="),
    ];
    if let Some(r) = &ratios {
        summary.push(row(
            "step time / transformers+peft (median)",
            r["step_time"].as_f64().unwrap_or(f64::NAN),
            Some(STEP_TARGET),
            "<=",
        ));
        summary.push(row(
            "step time / transformers+peft (fastest steps)",
            r["step_time_fastest_steps"].as_f64().unwrap_or(f64::NAN),
            Some(STEP_TARGET),
            "<=",
        ));
        summary.push(row(
            "peak memory / transformers+peft",
            r["peak_memory"].as_f64().unwrap_or(f64::NAN),
            Some(MEMORY_TARGET),
            "<=",
        ));
    }
    write_result(
        "train_step",
        &serde_json::json!({
            "rankstab": off,
            "rankstab_probes": on,
            "transformers": theirs,
            "probe_overhead": probe_overhead,
            "probe_overhead_target": PROBE_TARGET,
            "probe_overhead_target_met": probe_overhead <= PROBE_TARGET,
            "probe_overhead_fastest_steps": probe_overhead_min,
            "probe_overhead_paired": paired,
            "probe_overhead_paired_median": paired_median,
            "probe_peak_memory": probe_memory,
            "probe_peak_memory_target": PROBE_MEMORY_TARGET,
            "model_flop_utilisation": mfu,
            "repetitions": reps,
            "summary": summary,
            "ratios_rankstab_over_transformers": ratios,
            "load_average_start": load_start.trim(),
            "load_average_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        }),
    );
}
