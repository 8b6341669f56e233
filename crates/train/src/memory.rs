//! Up-front memory estimates, checked before anything large is allocated: loading a model
//! (its weights in the compute dtype; a GGUF file dequantised to it), evaluating it (weights
//! and the activations of one forward pass) and training it (weights, LoRA adapters of rank
//! r on the target modules, their gradients and optimizer state, the activations kept for
//! the backward pass through every block, and the logits). The shapes come from
//! [`crate::load::inspect`] (config.json or the GGUF header, no weights), so a model
//! that cannot fit is refused in milliseconds with the estimate in the message
//! ([`check`]: `rankstab_records::guard::check_memory`, against `--max-memory` or the
//! machine's available memory).
//!
//! The estimates count the tensors that are alive at the peak, in the dtype they are held
//! in; they leave out libtorch's own working buffers and allocator slack, which add a few
//! hundred MiB ([`OVERHEAD`]), and the tokenizer and data (small next to any model).
use crate::random::Shape;
use crate::TrainError;
use tch::Kind;

/// Fixed cost of a process that runs libtorch (its libraries, thread pools and allocator),
/// counted once in every estimate.
pub const OVERHEAD: u64 = 256 << 20;

/// Bytes of one element of `kind` (the model's compute dtype: f32 or bf16).
pub fn bytes_of(kind: Kind) -> u64 {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        Kind::Int8 | Kind::Uint8 | Kind::Bool => 1,
        _ => 4,
    }
}

/// The largest tensor of a shape, in elements (the embedding or the head, usually).
fn largest_tensor(shape: &Shape) -> u64 {
    shape
        .tensors()
        .iter()
        .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>())
        .max()
        .unwrap_or(0)
}

/// Memory to load a model of `shape` in `kind`: every weight in `kind`, plus the largest
/// tensor twice more in f32 while it is read and converted (a GGUF tensor is dequantised to
/// f32 before conversion; a safetensors tensor is read raw, then converted).
pub fn load_bytes(shape: &Shape, kind: Kind) -> u64 {
    let params = shape.parameters().max(0) as u64;
    params
        .saturating_mul(bytes_of(kind))
        .saturating_add(largest_tensor(shape).saturating_mul(8))
        .saturating_add(OVERHEAD)
}

/// Widths that set the activations of one block: (width, MLP width, query heads,
/// key/value width).
fn block_widths(shape: &Shape) -> (u64, u64, u64, u64) {
    match shape {
        Shape::Llama(c) => (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.num_heads as u64,
            (c.num_kv_heads * c.head_dim) as u64,
        ),
        Shape::Gptj(c) => (
            c.n_embd as u64,
            c.n_inner as u64,
            c.n_head as u64,
            c.n_embd as u64,
        ),
    }
}

/// Elements of the activations one block keeps for its backward pass for `tokens` tokens
/// of sequences of `context`: its input and norm outputs, q, k and v, the attention output
/// and its projection, the MLP's inputs and outputs (Llama: gate, up, their product), and
/// the attention probabilities when the attention kernel materialises them (counted, as
/// the CPU path may).
fn block_activations(shape: &Shape, tokens: u64, context: u64) -> u64 {
    let (d, f, heads, kv) = block_widths(shape);
    let per_token = match shape {
        Shape::Llama(_) => 4 * d + d + 2 * kv + d + 4 * f,
        Shape::Gptj(_) => 3 * d + 3 * d + d + 2 * f,
    };
    tokens
        .saturating_mul(per_token)
        .saturating_add(tokens.saturating_mul(heads).saturating_mul(context))
}

/// Bytes of the logits of `tokens` tokens and what the loss makes of them: the logits in
/// `kind`, their f32 copy, the log-softmax and its gradient (f32).
fn logits_bytes(shape: &Shape, kind: Kind, tokens: u64, train: bool) -> u64 {
    let v = shape.vocab_size().max(0) as u64;
    let n = tokens.saturating_mul(v);
    let f32_copies = if train { 3 } else { 2 };
    n.saturating_mul(bytes_of(kind) + 4 * f32_copies)
}

/// Memory to evaluate a model of `shape` in `kind` on `batch` windows of `context` tokens:
/// the weights, one block's activations at a time (no gradients are kept) and the logits.
pub fn eval_bytes(shape: &Shape, kind: Kind, batch: usize, context: usize) -> u64 {
    let tokens = (batch as u64).saturating_mul(context as u64);
    let weights = (shape.parameters().max(0) as u64).saturating_mul(bytes_of(kind));
    let block = block_activations(shape, tokens, context as u64).saturating_mul(bytes_of(kind));
    let logits = logits_bytes(shape, kind, tokens, false);
    weights
        .saturating_add(block.max(logits))
        .saturating_add(OVERHEAD)
}

/// What a training run adds to a model: the adapters and how they are trained.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSizes {
    /// Adapter rank.
    pub rank: usize,
    /// Adapted modules (empty: every module of [`Shape::modules`]).
    pub target_modules: Vec<String>,
    /// Adam(W) keeps two moments per adapter parameter, SGD with momentum one, SGD none.
    pub optimizer: rankstab_records::Optimizer,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// Whether block activations are recomputed in the backward pass.
    pub activation_checkpointing: bool,
}

/// Number of adapter parameters (A and B of every targeted module of every block).
pub fn adapter_parameters(shape: &Shape, rank: usize, target_modules: &[String]) -> u64 {
    let per_block: u64 = shape
        .modules()
        .iter()
        .filter(|m| target_modules.is_empty() || target_modules.iter().any(|t| t == m.name))
        .map(|m| (rank as u64).saturating_mul((m.in_features + m.out_features) as u64))
        .sum();
    per_block.saturating_mul(shape.num_layers() as u64)
}

/// Memory to train LoRA adapters on a model of `shape` in `kind`: the weights; the
/// adapters (f32) with their gradients and, for AdamW, two moments; the activations of
/// every block kept for the backward pass (with activation checkpointing: every block's
/// input and one block's activations) plus each adapter's `A x`; the logits and the loss's
/// f32 copies and gradient; or, when larger, a held-out pass ([`crate::loss::eval_batch`]).
pub fn train_bytes(shape: &Shape, kind: Kind, t: &TrainSizes) -> u64 {
    let tokens = (t.micro_batch as u64).saturating_mul(t.context as u64);
    let weights = (shape.parameters().max(0) as u64).saturating_mul(bytes_of(kind));
    // Values and gradients, plus two moments (Adam, AdamW) or one momentum buffer.
    let states: u64 = match t.optimizer {
        rankstab_records::Optimizer::Adam | rankstab_records::Optimizer::Adamw => 4,
        rankstab_records::Optimizer::SgdMomentum => 3,
        _ => 2,
    };
    let adapters = adapter_parameters(shape, t.rank, &t.target_modules)
        .saturating_mul(4)
        .saturating_mul(states);
    let layers = shape.num_layers() as u64;
    let block = block_activations(shape, tokens, t.context as u64).saturating_mul(bytes_of(kind));
    let n_targets = shape
        .modules()
        .iter()
        .filter(|m| t.target_modules.is_empty() || t.target_modules.iter().any(|x| x == m.name))
        .count() as u64;
    let lora_acts = tokens
        .saturating_mul(t.rank as u64)
        .saturating_mul(n_targets)
        .saturating_mul(4);
    let kept = if t.activation_checkpointing {
        let d = shape.hidden_size().max(0) as u64;
        tokens
            .saturating_mul(d)
            .saturating_mul(bytes_of(kind))
            .saturating_mul(layers)
            .saturating_add(block.saturating_add(lora_acts))
    } else {
        block.saturating_add(lora_acts).saturating_mul(layers)
    };
    let training = kept.saturating_add(logits_bytes(shape, kind, tokens, true));
    // The held-out passes (no gradients) run wider than the micro-batch.
    let eval_tokens =
        (crate::loss::eval_batch(t.micro_batch, t.context) as u64).saturating_mul(t.context as u64);
    let evaluation = block_activations(shape, eval_tokens, t.context as u64)
        .saturating_mul(bytes_of(kind))
        .max(logits_bytes(shape, kind, eval_tokens, false));
    weights
        .saturating_add(adapters)
        .saturating_add(training.max(evaluation))
        .saturating_add(OVERHEAD)
}

/// Refuses `estimate` bytes for `what` when it exceeds `max` (`--max-memory`) or, without
/// it, the machine's available memory; the message gives the estimate and the limit.
///
/// # Errors
/// [`TrainError::Invalid`] with rankstab_records::guard::check_memory's message.
pub fn check(what: &str, estimate: u64, max: Option<u64>) -> Result<(), TrainError> {
    rankstab_records::guard::check_memory(what, estimate, max).map_err(TrainError::Invalid)
}

/// The model FLOPs of one training step of `lm` at `tokens` tokens in sequences of
/// `context`, counted as the work the step needs (not what an implementation spends):
/// forward, 2 flops per weight of every linear (the head included) per token, and causal
/// attention, 2 T^2 (heads x head_dim) per sequence and layer (half of the full score
/// matrix, as a causal kernel skips the rest); backward through the frozen base, the same
/// again for the inputs' gradients (no weight gradients) and twice the attention; the
/// adapters, 2 r (in + out) per token forward and twice that backward (the gradients of
/// A, B and the input).
pub fn train_step_flops(lm: &mut crate::CausalLm, tokens: f64, context: f64) -> f64 {
    let head = (lm.vocab_size() * lm.hidden_size()) as f64;
    let mut weights = head;
    let mut adapters = 0.0;
    let mut attention = 0.0;
    for (path, lin) in lm.linears_mut() {
        let (out, inp) = lin.dims();
        weights += (out * inp) as f64;
        if let Some(ad) = &lin.adapter {
            adapters += 2.0 * ad.a.size()[0] as f64 * (out + inp) as f64;
        }
        if path.ends_with("q_proj") {
            attention += 2.0 * context * out as f64;
        }
    }
    let forward = 2.0 * weights * tokens + attention * tokens + adapters * tokens;
    forward + (2.0 * weights * tokens + 2.0 * attention * tokens) + 2.0 * adapters * tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{gptj_mini, llama2_mini, preset_shape};
    use tch::Device;

    /// What glibc's own arenas hold (in use, and mapped for large blocks).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_bytes() -> usize {
        #[allow(unsafe_code)]
        // SAFETY: mallinfo2 only reads glibc's arena statistics; it takes no pointers.
        let m = unsafe { libc::mallinfo2() };
        m.uordblks + m.hblkhd
    }

    /// jemalloc, not glibc, serves libtorch's tensors and Rust's heap: 64 MB of each leave
    /// glibc's arenas as they were (with glibc's malloc both would add 64 MB there); and
    /// jemalloc accepts the purge of all its arenas (a debug assertion there).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn jemalloc_serves_libtorch_and_rust_allocations() {
        assert_eq!(super::ALLOCATOR, "jemalloc");
        let before = glibc_bytes();
        let t = tch::Tensor::ones([16 << 20], (tch::Kind::Float, tch::Device::Cpu));
        let v = vec![1u8; 64 << 20];
        let during = glibc_bytes();
        assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), (16 << 20) as f64);
        assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
        assert!(
            during < before + (8 << 20),
            "glibc's arenas grew from {before} to {during} bytes"
        );
        drop((t, v));
        super::release_free_heap();
    }

    /// A guard sets jemalloc's decay to "never" in the defaults and in every initialised
    /// arena, nested guards keep it, and the last one restores what it found.
    #[test]
    #[cfg(not(target_env = "msvc"))]
    fn keeping_freed_pages_sets_and_restores_the_decay() {
        use super::decay::read_isize;
        // Other tests of this binary may hold a guard (training); only the nesting is
        // checked while one could.
        let outer = KeepFreedPages::new();
        for name in [
            "arenas.dirty_decay_ms",
            "arenas.muzzy_decay_ms",
            "arena.0.dirty_decay_ms",
            "arena.0.muzzy_decay_ms",
        ] {
            assert_eq!(read_isize(name), Some(-1), "{name}");
        }
        let inner = KeepFreedPages::new();
        drop(inner);
        assert_eq!(read_isize("arenas.dirty_decay_ms"), Some(-1));
        let (holders, found) = *KEEP_FREED.lock().expect("lock");
        drop(outer);
        if holders == 1 {
            let (dirty, muzzy) = found.expect("jemalloc's defaults were read");
            assert!(dirty >= 0 && muzzy >= 0, "{dirty} {muzzy}");
            assert_eq!(read_isize("arenas.dirty_decay_ms"), Some(dirty));
            assert_eq!(read_isize("arena.0.dirty_decay_ms"), Some(dirty));
            assert_eq!(read_isize("arenas.muzzy_decay_ms"), Some(muzzy));
        }
    }

    /// The step's FLOPs by hand for llama-2-mini without and with adapters on every
    /// linear: 4 W T + 3 A T (A = 2 C d per layer) for the frozen base, 6 r (in+out) T more
    /// for rank r adapters.
    #[test]
    fn a_train_steps_flops_are_counted_as_documented() {
        let c = llama2_mini();
        let mut m =
            crate::random::preset("llama-2-mini", Kind::Float, Device::Cpu, 0).expect("builds");
        let (h, i, l) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            c.num_layers as f64,
        );
        let w = l * (4.0 * h * h + 3.0 * h * i) + c.vocab_size as f64 * h;
        let (t, ctx) = (64.0, 16.0);
        let att = l * 2.0 * ctx * h;
        let base = 4.0 * w * t + 3.0 * att * t;
        let got = train_step_flops(&mut m, t, ctx);
        assert!((got - base).abs() <= 1e-9 * base, "{got} vs {base}");
        let cfg = crate::lora::LoraConfig {
            rank: 8,
            alpha: 16.0,
            beta: 0.5,
            init: crate::lora::LoraInit::KaimingUniform,
            dropout: 0.0,
            seed: Some(0),
        };
        let vs = tch::nn::VarStore::new(Device::Cpu);
        crate::inject::attach(&mut m, &vs, &cfg, &[], 0).expect("attach");
        let ad = 8.0 * l * (4.0 * 2.0 * h + 3.0 * (h + i));
        let got = train_step_flops(&mut m, t, ctx);
        assert!((got - base - 6.0 * ad * t).abs() <= 1e-9 * base, "{got}");
    }

    /// Resident memory of this process (Linux), in bytes.
    fn rss() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    /// The parameter count behind every estimate is the built model's.
    #[test]
    fn parameter_counts_are_the_loaded_models() {
        for name in ["llama-2-mini", "gpt-j-mini"] {
            let shape = preset_shape(name).expect("preset");
            let mut m = crate::random::preset(name, Kind::Float, Device::Cpu, 0).expect("builds");
            let built: i64 = match &m {
                crate::CausalLm::Llama(l) => {
                    let mut n = l.embed_tokens.numel() as i64 + l.norm.weight.numel() as i64;
                    n += l.lm_head.as_ref().map_or(0, |h| h.numel() as i64);
                    for b in &l.layers {
                        n += (b.input_layernorm.weight.numel()
                            + b.post_attention_layernorm.weight.numel())
                            as i64;
                    }
                    n
                }
                crate::CausalLm::Gptj(g) => {
                    let mut n = (g.wte.numel()
                        + g.ln_f.weight.numel()
                        + g.ln_f.bias.numel()
                        + g.lm_head.weight.numel()
                        + g.lm_head.bias.as_ref().map_or(0, |b| b.numel()))
                        as i64;
                    for b in &g.h {
                        n += (b.ln_1.weight.numel() + b.ln_1.bias.numel()) as i64;
                    }
                    n
                }
            };
            let linears: i64 = m
                .linears_mut()
                .into_iter()
                .map(|(_, l)| (l.weight.numel() + l.bias.as_ref().map_or(0, |b| b.numel())) as i64)
                .sum();
            assert_eq!(built + linears, shape.parameters(), "{name}");
        }
        assert_eq!(
            Shape::Llama(llama2_mini()).parameters(),
            preset_shape("llama-2-mini").expect("preset").parameters()
        );
        assert!(Shape::Gptj(gptj_mini()).parameters() > 20_000_000);
    }

    /// Loading estimate against the resident memory a preset really adds (within a factor
    /// of two, after the fixed overhead). Measured in a child process of this test binary,
    /// alone, so that other tests' threads do not move the process's resident memory.
    #[test]
    fn load_estimate_is_within_a_factor_two_of_the_real_growth() {
        const CHILD: &str = "RANKSTAB_MEMORY_TEST_CHILD";
        let name = "memory::tests::load_estimate_is_within_a_factor_two_of_the_real_growth";
        if std::env::var_os(CHILD).is_some() {
            // libtorch's own start-up (thread pools, allocator) before the measurement.
            let _ = tch::Tensor::ones([4, 4], (Kind::Float, Device::Cpu))
                .matmul(&tch::Tensor::ones([4, 4], (Kind::Float, Device::Cpu)));
            let before = rss().expect("rss");
            let m =
                crate::random::preset("llama-2-mini", Kind::Float, Device::Cpu, 0).expect("builds");
            let after = rss().expect("rss");
            drop(m);
            println!("GREW {}", after.saturating_sub(before));
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let grew: u64 = text
            .lines()
            .find_map(|l| l.split("GREW ").nth(1))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no measurement: {text}"));
        let shape = preset_shape("llama-2-mini").expect("preset");
        let est = load_bytes(&shape, Kind::Float) - OVERHEAD;
        assert!(
            grew * 2 >= est && grew <= est * 2,
            "estimate {est} bytes, resident memory grew by {grew}"
        );
    }

    #[test]
    fn estimates_grow_with_what_they_count() {
        let s = preset_shape("llama-2-7b").expect("preset");
        // 6.74e9 parameters: ~25 GiB in f32, ~12.5 GiB in bf16.
        let f = load_bytes(&s, Kind::Float);
        let b = load_bytes(&s, Kind::BFloat16);
        assert!(f > 25 << 30 && f < 28 << 30, "{f}");
        assert!(b > 12 << 30 && b < 15 << 30, "{b}");
        assert!(eval_bytes(&s, Kind::Float, 4, 512) > eval_bytes(&s, Kind::Float, 1, 512));
        let t = |opt, rank| TrainSizes {
            rank,
            target_modules: vec![],
            optimizer: opt,
            micro_batch: 4,
            context: 512,
            activation_checkpointing: false,
        };
        use rankstab_records::Optimizer::{Adamw, Sgd};
        assert!(
            train_bytes(&s, Kind::Float, &t(Adamw, 64)) > train_bytes(&s, Kind::Float, &t(Sgd, 64))
        );
        assert!(
            train_bytes(&s, Kind::Float, &t(Adamw, 2048))
                > train_bytes(&s, Kind::Float, &t(Adamw, 4))
        );
        // Rank 2048 on every module of Llama-2-7B: 2048 * (7 modules' in + out) * 32 blocks.
        let per_block = 2048 * (4 * (4096 + 4096) + 3 * (4096 + 11008));
        assert_eq!(adapter_parameters(&s, 2048, &[]), per_block * 32);
        let e = check("loading llama-2-7b", f, Some(24 << 30))
            .expect_err("too big")
            .to_string();
        assert!(e.contains("GiB") && e.contains("--max-memory"), "{e}");
    }
}

/// The process's malloc: jemalloc (`tikv-jemalloc-sys`, unprefixed and overriding, so that
/// libtorch's, MKL's and the C++ runtime's allocations go through it as well as Rust's), in
/// every binary that links this crate. With glibc's malloc a training step maps every
/// tensor above its mmap threshold afresh, and its first touch faults and zeroes the pages
/// again (12% of a SmolLM2-135M step's samples under `perf` were the kernel's page
/// clearing), and its arenas' fragmentation added a fifth to the peak resident memory
/// (2.16-2.34 GB against 1.67-1.76 GB, the train-step benchmark's shape; see the README's
/// performance section).
#[cfg(not(target_env = "msvc"))]
pub const ALLOCATOR: &str = "jemalloc";
/// The process's malloc (the system's on MSVC targets).
#[cfg(target_env = "msvc")]
pub const ALLOCATOR: &str = "system";

/// While one is alive, jemalloc keeps the pages the process frees for reuse instead of
/// returning them to the operating system over the next seconds (its dirty and muzzy decay
/// set to -1, "never", in every arena and for arenas made later). A training step frees
/// and allocates the same sizes every step (activations, logits, gradients); with the
/// default decay (10 s) jemalloc returned part of them between steps and the next step
/// faulted and zeroed them again: on the train-step benchmark's shape about 230,000 page
/// faults and 0.5 CPU-seconds of kernel time a step, against 6,000 and 0.03 s with the
/// pages kept (README, Benchmarks). The price is that the resident set stays at the
/// step's peak between steps (about a tenth more than the peak reached with the decay on),
/// which it reaches again at every step anyway.
///
/// [`train`](crate::train) holds one for its loop. Guards nest (a counter): the first
/// sets the decay, the last dropped restores the times it found, which in jemalloc purges
/// the unused pages at once. [`release_free_heap`] still purges while one is alive.
/// Does nothing where jemalloc is not the allocator.
#[must_use = "the pages are kept only while the guard lives"]
pub struct KeepFreedPages(());

/// (holders, decay times found by the first holder: dirty, muzzy).
static KEEP_FREED: std::sync::Mutex<(usize, Option<(isize, isize)>)> =
    std::sync::Mutex::new((0, None));

impl KeepFreedPages {
    /// Keeps freed pages until the last guard is dropped.
    pub fn new() -> Self {
        let mut g = KEEP_FREED.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 == 0 {
            g.1 = decay::set(-1, -1);
        }
        g.0 += 1;
        KeepFreedPages(())
    }
}

impl Default for KeepFreedPages {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeepFreedPages {
    fn drop(&mut self) {
        let mut g = KEEP_FREED.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if g.0 == 0 {
            if let Some((dirty, muzzy)) = g.1.take() {
                decay::set(dirty, muzzy);
            }
        }
    }
}

/// jemalloc's decay times, through `mallctl`.
mod decay {
    /// Sets the dirty and muzzy decay (ms; -1: never) of every arena and of arenas made
    /// later; returns the defaults it replaced (None where jemalloc is not the allocator or
    /// refuses).
    #[cfg(not(target_env = "msvc"))]
    pub(super) fn set(dirty: isize, muzzy: isize) -> Option<(isize, isize)> {
        let old_dirty = write_isize("arenas.dirty_decay_ms", dirty)?;
        let old_muzzy = write_isize("arenas.muzzy_decay_ms", muzzy)?;
        for i in 0..read_u32("arenas.narenas").unwrap_or(0) {
            // Arenas not yet initialised refuse; they take the defaults above when made.
            let _ = write_isize(&format!("arena.{i}.dirty_decay_ms"), dirty);
            let _ = write_isize(&format!("arena.{i}.muzzy_decay_ms"), muzzy);
        }
        Some((old_dirty, old_muzzy))
    }

    #[cfg(target_env = "msvc")]
    pub(super) fn set(_dirty: isize, _muzzy: isize) -> Option<(isize, isize)> {
        None
    }

    /// Reads a `ssize_t` control (tests).
    #[cfg(all(test, not(target_env = "msvc")))]
    pub(super) fn read_isize(name: &str) -> Option<isize> {
        ctl::<isize>(name, None)
    }

    #[cfg(not(target_env = "msvc"))]
    fn write_isize(name: &str, new: isize) -> Option<isize> {
        ctl(name, Some(new))
    }

    #[cfg(not(target_env = "msvc"))]
    fn read_u32(name: &str) -> Option<u32> {
        ctl::<u32>(name, None)
    }

    /// The control `name`'s value, after writing `new` when given (None when jemalloc
    /// refuses). `T` must be the control's C type: `isize` for `ssize_t`, `u32` for
    /// `unsigned`.
    #[cfg(not(target_env = "msvc"))]
    fn ctl<T: Copy + Default>(name: &str, new: Option<T>) -> Option<T> {
        let name = std::ffi::CString::new(name).ok()?;
        let mut old = T::default();
        let mut len = std::mem::size_of::<T>();
        let mut new = new;
        let (new_ptr, new_len) = match new.as_mut() {
            Some(v) => ((v as *mut T).cast(), std::mem::size_of::<T>()),
            None => (std::ptr::null_mut(), 0),
        };
        #[allow(unsafe_code)]
        // SAFETY: the name is NUL-terminated; `old` (and `new` when given) are values of
        // the control's C type with their sizes passed, as mallctl reads and writes them.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut old as *mut T).cast(),
                &mut len,
                new_ptr,
                new_len,
            )
        };
        (rc == 0).then_some(old)
    }
}

/// Returns the allocator's free pages to the operating system, after a large, one-off
/// release (the first-step law's buffers), so that the process's resident memory does not
/// stay at its high-water mark for the rest of the run: jemalloc purges the dirty pages of
/// all its arenas (it would otherwise return them over the next seconds), and glibc's
/// `malloc_trim` trims whatever glibc's own arenas hold.
pub fn release_free_heap() {
    #[cfg(not(target_env = "msvc"))]
    #[allow(unsafe_code)]
    // SAFETY: `arena.<MALLCTL_ARENAS_ALL>.purge` takes and returns no value (null old and
    // new pointers, length 0); the name is a NUL-terminated static string.
    unsafe {
        /// jemalloc 5's `MALLCTL_ARENAS_ALL`: the index that names every arena.
        const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
        let rc = tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
        debug_assert_eq!(rc, 0, "jemalloc's arena.4096.purge");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only walks and trims glibc's own arenas; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
