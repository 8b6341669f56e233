//! The one-command GPU check (`make gpu-check`): on a CUDA machine, in a few minutes,
//!
//! 1. CPU vs CUDA logits of the tiny Llama and GPT-J fixtures: f32 within 1e-4 (absolute);
//!    bf16 on the GPU against f32 on the CPU within 3% of the logits' largest magnitude
//!    (bf16 keeps 8 significant bits: ~0.4% per rounding, a few roundings per layer);
//! 2. CPU vs CUDA probe rows of 4 training steps of the tiny Llama (f32, rank 4 on every
//!    linear, AdamW, probes every step): every moment within 1e-3 relative (1e-9 absolute
//!    floor), the same rows in the same order;
//! 3. a short timed run at the paper's largest shape: Llama-2-7B's architecture with random
//!    weights in bf16, rank 2048 on every linear, activation checkpointing, batch 32 in
//!    micro-batches (RANKSTAB_GPU_MICRO, default 4), context 512, 3 steps (the first one a
//!    warm-up): tokens/s, model FLOP utilisation against the bf16 GEMM peak measured in the
//!    same run, peak GPU memory (nvidia-smi's, the CUDA context included).
//!
//! Prints one table; exits 1 when a parity check fails, 2 when there is no CUDA device.
//! RANKSTAB_GPU_SKIP_7B=1 leaves out part 3.
use rankstab_records::{read_table, MomentRow, Optimizer};
use rankstab_train::data::{DataFormat, Dataset, Sequence};
use rankstab_train::device::DeviceName;
use rankstab_train::lora::LoraInit;
use rankstab_train::trainer::{train, TrainConfig};
use rankstab_train::CausalLm;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// One line of the table: what, measured, bound, pass (None: a figure, not a check).
type Row = (String, String, String, Option<bool>);

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double).to_device(Device::Cpu)
        - b.to_kind(Kind::Double).to_device(Device::Cpu))
    .abs()
    .max()
    .double_value(&[])
}

fn logits(dir: &Path, kind: Kind, device: Device, ids: &Tensor) -> Tensor {
    let m = CausalLm::from_dir(dir, kind, device).expect("the fixture loads");
    tch::no_grad(|| m.forward(&ids.to_device(device), false))
}

fn parity_logits(gpu: Device, rows: &mut Vec<Row>) {
    for name in ["tiny-llama", "tiny-gptj"] {
        let dir = fixture(name);
        let vocab = CausalLm::from_dir(&dir, Kind::Float, Device::Cpu)
            .expect("loads")
            .vocab_size();
        let ids = Tensor::arange(64, (Kind::Int64, Device::Cpu))
            .remainder(vocab)
            .view([2, 32]);
        let cpu = logits(&dir, Kind::Float, Device::Cpu, &ids);
        let f32_gpu = logits(&dir, Kind::Float, gpu, &ids);
        let d = max_abs_diff(&cpu, &f32_gpu);
        rows.push((
            format!("{name} logits f32, CPU vs CUDA (max |diff|)"),
            format!("{d:.2e}"),
            "<= 1e-4".into(),
            Some(d <= 1e-4),
        ));
        let bf16 = logits(&dir, Kind::BFloat16, gpu, &ids);
        let scale = cpu.abs().max().double_value(&[]);
        let rel = max_abs_diff(&cpu, &bf16) / scale.max(f64::MIN_POSITIVE);
        rows.push((
            format!("{name} logits bf16 CUDA vs f32 CPU (max |diff| / max |logit|)"),
            format!("{rel:.2e}"),
            "<= 3e-2".into(),
            Some(rel <= 3e-2),
        ));
    }
}

fn tiny_config(steps: usize) -> TrainConfig {
    TrainConfig {
        model_name: "tiny-llama".into(),
        rank: 4,
        alpha: 8.0,
        beta: 0.5,
        init: LoraInit::KaimingUniform,
        dropout: 0.0,
        optimizer: Optimizer::Adamw,
        lr: 1e-2,
        steps,
        batch: 4,
        context: 16,
        probe_every: 1,
        probe_tokens: 0,
        eval_every: 0,
        eval_at_start: false,
        heldout_fraction: 0.2,
        heldout_max: 0,
        norm_every: 0,
        target_modules: vec![],
        moments: vec![1, 2, 3, 4],
        seed: 0,
        micro_batch: 0,
        clip_grad_norm: None,
        weight_decay: 0.0,
        checkpoint_every: 0,
        activation_checkpointing: false,
        base_model: None,
        init_adapter: None,
    }
}

/// Sequences of `n` token ids drawn from a fixed stream (the data do not matter here).
fn synthetic(n_train: usize, context: usize, vocab: i64) -> Dataset {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut seq = || {
        let ids: Vec<i64> = (0..=context)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % vocab as u64) as i64
            })
            .collect();
        Sequence {
            mask: vec![true; context],
            ids,
        }
    };
    let train: Vec<Sequence> = (0..n_train).map(|_| seq()).collect();
    let heldout = vec![seq(), seq()];
    Dataset {
        examples: train.len() + heldout.len(),
        train,
        heldout,
        pad_id: 0,
        format: DataFormat::Text,
    }
}

fn probe_rows(device: Device, cfg: &TrainConfig, data: &Dataset) -> Vec<MomentRow> {
    let dir = tempfile::tempdir().expect("tempdir");
    tch::manual_seed(cfg.seed as i64);
    let mut m = CausalLm::from_dir(&fixture("tiny-llama"), Kind::Float, device).expect("loads");
    let vs = nn::VarStore::new(device);
    train(&mut m, &vs, data, cfg, dir.path(), |_| {}).expect("trains");
    read_table(&dir.path().join("moments.csv")).expect("moments.csv")
}

fn parity_probes(gpu: Device, rows: &mut Vec<Row>) {
    let cfg = tiny_config(4);
    let vocab = CausalLm::from_dir(&fixture("tiny-llama"), Kind::Float, Device::Cpu)
        .expect("loads")
        .vocab_size();
    let data = synthetic(16, cfg.context, vocab);
    let (a, b) = (
        probe_rows(Device::Cpu, &cfg, &data),
        probe_rows(gpu, &cfg, &data),
    );
    let same_rows = a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| {
            (x.step, x.layer, &x.module, x.site, x.stat, x.m)
                == (y.step, y.layer, &y.module, y.site, y.stat, y.m)
        });
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x.value - y.value).abs() / (x.value.abs().max(y.value.abs()) + 1e-9))
        .fold(0.0, f64::max);
    rows.push((
        format!(
            "probe rows, 4 steps, CPU vs CUDA ({} rows; max relative diff)",
            a.len()
        ),
        format!(
            "{worst:.2e}{}",
            if same_rows { "" } else { " (rows differ)" }
        ),
        "<= 1e-3".into(),
        Some(same_rows && worst <= 1e-3),
    ));
}

/// nvidia-smi's memory in use on CUDA device `index` (MiB), sampled every 100 ms while `f`
/// runs: the peak. nvidia-smi numbers GPUs physically: CUDA_VISIBLE_DEVICES maps ours.
fn with_peak_memory<T>(index: usize, f: impl FnOnce() -> T) -> (T, Option<f64>) {
    let id = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').nth(index).map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| index.to_string());
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak: Option<f64> = None;
        while !s.load(Ordering::Relaxed) {
            let o = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.used",
                    "--format=csv,noheader,nounits",
                    &format!("--id={id}"),
                ])
                .output();
            match o.ok().and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            }) {
                Some(v) => peak = Some(peak.map_or(v, |p: f64| p.max(v))),
                None => return None,
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        peak
    });
    let out = f();
    stop.store(true, Ordering::Relaxed);
    (out, sampler.join().ok().flatten())
}

/// The best bf16 GEMM rate of this GPU (8192^3 products, best of 10), TFLOP/s.
fn bf16_peak(gpu: Device, index: usize) -> f64 {
    let n = 8192i64;
    let a = Tensor::randn([n, n], (Kind::BFloat16, gpu));
    let b = Tensor::randn([n, n], (Kind::BFloat16, gpu));
    let _ = a.matmul(&b);
    tch::Cuda::synchronize(index as i64);
    (0..10)
        .map(|_| {
            let t = Instant::now();
            let c = a.matmul(&b);
            tch::Cuda::synchronize(index as i64);
            let s = t.elapsed().as_secs_f64();
            drop(c);
            2.0 * (n as f64).powi(3) / s / 1e12
        })
        .fold(0.0, f64::max)
}

fn paper_shape(gpu: Device, index: usize, rows: &mut Vec<Row>) {
    let micro: usize = std::env::var("RANKSTAB_GPU_MICRO")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let (batch, context, rank, steps) = (32usize, 512usize, 2048usize, 3usize);
    let peak = bf16_peak(gpu, index);
    rows.push((
        "bf16 GEMM peak of this GPU (8192^3)".into(),
        format!("{peak:.1} TFLOP/s"),
        String::new(),
        None,
    ));
    let cfg = TrainConfig {
        model_name: "llama-2-7b".into(),
        rank,
        alpha: 16.0,
        batch,
        micro_batch: micro,
        context,
        steps,
        activation_checkpointing: true,
        probe_every: 1,
        probe_tokens: 0,
        eval_every: 0,
        heldout_max: 1,
        lr: 1e-4,
        ..tiny_config(steps)
    };
    let (result, mem) = with_peak_memory(index, || -> Result<(f64, f64), String> {
        let mut m = rankstab_train::random::preset("llama-2-7b", Kind::BFloat16, gpu, 0)
            .map_err(|e| e.to_string())?;
        let vocab = m.vocab_size();
        let data = synthetic(batch * steps, context, vocab);
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let vs = nn::VarStore::new(gpu);
        let mut times = Vec::new();
        train(&mut m, &vs, &data, &cfg, dir.path(), |p| {
            times.push(p.seconds)
        })
        .map_err(|e| e.to_string())?;
        let flops = rankstab_train::memory::train_step_flops(
            &mut m,
            (batch * context) as f64,
            context as f64,
        );
        // Steps after the first (a warm-up), the median of what is left.
        let mut t: Vec<f64> = times.into_iter().skip(1).collect();
        t.sort_by(f64::total_cmp);
        let s = t.get(t.len() / 2).copied().ok_or("no timed step")?;
        Ok((s, flops))
    });
    match result {
        Ok((s, flops)) => {
            rows.push((
                format!("Llama-2-7B bf16, r {rank} on every linear, ckpt, batch {batch} ({micro}/micro), ctx {context}: s/step"),
                format!("{s:.2}"),
                String::new(),
                None,
            ));
            rows.push((
                "  tokens/s".into(),
                format!("{:.0}", (batch * context) as f64 / s),
                String::new(),
                None,
            ));
            rows.push((
                "  model FLOP utilisation (model FLOPs / s / bf16 peak)".into(),
                format!(
                    "{:.2} ({:.1} TFLOP per step)",
                    flops / s / (peak * 1e12),
                    flops / 1e12
                ),
                String::new(),
                None,
            ));
        }
        Err(e) => rows.push((
            "Llama-2-7B timed run".into(),
            format!("did not run: {e}"),
            String::new(),
            None,
        )),
    }
    rows.push((
        "  peak GPU memory (nvidia-smi, CUDA context included)".into(),
        mem.map_or("n/a (no nvidia-smi)".into(), |m| {
            format!("{:.1} GiB", m / 1024.0)
        }),
        String::new(),
        None,
    ));
}

fn main() -> std::process::ExitCode {
    let gpu = match DeviceName::Cuda(None).device() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu-check: no CUDA device, nothing to check: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let index = match gpu {
        Device::Cuda(i) => i,
        _ => 0,
    };
    let t0 = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    parity_logits(gpu, &mut rows);
    parity_probes(gpu, &mut rows);
    if std::env::var("RANKSTAB_GPU_SKIP_7B").as_deref() != Ok("1") {
        paper_shape(gpu, index, &mut rows);
    }
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    println!(
        "{:<w$}  {:<28}  {:<10}  result",
        "check", "measured", "bound"
    );
    for (what, got, bound, pass) in &rows {
        let r = match pass {
            Some(true) => "ok",
            Some(false) => "FAIL",
            None => "",
        };
        println!("{what:<w$}  {got:<28}  {bound:<10}  {r}");
    }
    let failed = rows.iter().filter(|r| r.3 == Some(false)).count();
    println!(
        "gpu-check: {} parity check(s), {failed} failed; {:.0} s on cuda:{index}",
        rows.iter().filter(|r| r.3.is_some()).count(),
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
