//! `rankstab eval`: token count, mean NLL and perplexity of a model on a text;
//! `rankstab generate`: a greedy answer to a prompt (chat template applied when the model
//! has one). Models are Hugging Face directories or llama-architecture GGUF files.
use anyhow::{bail, Context, Result};
use clap::Args;
use rankstab_train::device::{DeviceName, Dtype};
use rankstab_train::memory;
use rankstab_train::text::{evaluate_strided, read_text};
use std::path::{Path, PathBuf};

/// Options of `rankstab eval`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab eval --model path/to/hf-model-dir --text book.txt
  rankstab eval --model path/to/hf-model-dir --text book.txt --context 512 --batch 4 --json
  rankstab eval --model path/to/hf-model-dir --text book.txt --context 1024 --stride 512
  rankstab eval --model assets/SmolLM2-135M-Instruct.Q4_1.gguf --text assets/texts/moby-dick.txt
  rankstab eval --model path/to/hf-model-dir --text book.txt --adapter runs/train-1/adapters

The model is a directory with config.json, model.safetensors (or sharded safetensors with
model.safetensors.index.json) and tokenizer.json (or GPT-2-style vocab.json + merges.txt),
or a GGUF file of the llama architecture (weights dequantized to --dtype, tokenizer from
its metadata). Supported: Llama (model_type llama) and GPT-J (gptj).

--adapter takes a PEFT-format LoRA / rsLoRA adapter directory (adapter_config.json +
adapter_model.safetensors), as `rankstab train` writes into RUN/adapters or peft's
save_pretrained writes; it is attached (unmerged, PEFT's scaling) before evaluating. An
adapter made for another base model (base_model_name_or_path) only gives a warning.")]
pub struct EvalArgs {
    /// Hugging Face model directory or GGUF file.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// UTF-8 text file to evaluate on.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Sliding windows: a window of --context tokens every S tokens, each scoring the
    /// tokens no earlier window scored (the transformers documentation's "Perplexity of
    /// fixed-length models"); every predicted token then has at least context - S tokens
    /// of context. Default: the context (non-overlapping windows).
    #[arg(long, value_name = "S")]
    stride: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// cpu or cuda (cuda:N for another GPU).
    #[arg(long, default_value = "cpu")]
    device: DeviceName,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
    /// Print one JSON object {tokens, nll, perplexity}.
    #[arg(long)]
    json: bool,
    /// PEFT-format adapter directory (adapter_config.json + adapter_model.safetensors) to
    /// attach before evaluating.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Refuse to start when the up-front memory estimate exceeds SIZE (e.g. 16G, 512M;
    /// default: the machine's available memory).
    #[arg(long, value_name = "SIZE", value_parser = rankstab_records::guard::parse_memory)]
    max_memory: Option<u64>,
}

pub fn run(a: EvalArgs) -> Result<()> {
    // CUDA is loaded here, at run time (one binary serves machines with and without
    // it); an error says why it is not there.
    let device = a.device.device()?;
    let kind = a.dtype.kind();
    if a.context < 2 || a.batch == 0 {
        bail!("--context {} / --batch {}: use a context of at least 2 tokens and a batch of at least 1", a.context, a.batch);
    }
    let stride = a.stride.unwrap_or(a.context);
    if stride == 0 || stride > a.context {
        bail!(
            "--stride {stride}: use a stride from 1 to --context ({}); a larger one would skip tokens",
            a.context
        );
    }
    // The model's shape from its configuration alone: a model that cannot fit is refused
    // before a byte of its weights is read.
    let shape = rankstab_train::load::inspect(&a.model)?;
    let text_len = std::fs::metadata(&a.text).map(|m| m.len()).unwrap_or(0);
    // The text, its tokens (8 bytes each, about one per 4 bytes of text) and the model.
    let estimate = memory::eval_bytes(&shape, kind, a.batch, a.context)
        .saturating_add(text_len.saturating_mul(3));
    memory::check(
        &format!(
            "evaluating {} (batch {} x context {})",
            a.model.display(),
            a.batch,
            a.context
        ),
        estimate,
        a.max_memory,
    )?;
    // The adapter's files and config before the model is loaded.
    if let Some(dir) = &a.adapter {
        rankstab_train::inject::check_peft(dir)?;
    }
    let text = read_text(&a.text)?;
    let mut loaded = rankstab_train::load::load(&a.model, kind, device)?;
    if let Some(dir) = &a.adapter {
        let att = rankstab_train::inject::attach_peft(&mut loaded.model, dir)?;
        if let Some(warning) =
            base_model_mismatch(&a.model, att.config.base_model_name_or_path.as_deref())
        {
            eprintln!("rankstab: warning: {}: {warning}", dir.display());
        }
        tracing::info!(
            "attached {} adapters from {} (r = {}, scaling {})",
            att.paths.len(),
            dir.display(),
            att.config.r,
            att.scaling
        );
    }
    let ids = loaded
        .tokenizer
        .encode(&text)
        .context("tokenizing the text")?;
    let r = evaluate_strided(&loaded.model, &ids, a.context, stride, a.batch, device)?;
    if a.json {
        let mut v = serde_json::to_value(r)?;
        v["event"] = "eval".into();
        v["context"] = a.context.into();
        v["stride"] = stride.into();
        crate::json_line(&v);
    } else {
        println!("tokens      {}", r.tokens);
        println!("nll         {:.6}", r.nll);
        println!("perplexity  {:.4}", r.perplexity);
    }
    Ok(())
}

/// A warning when the adapter names a base model other than `model`: the last path
/// component of `base_model_name_or_path` (a hub id such as `meta-llama/Llama-2-7b-hf` or
/// a path) against the model directory's or file's name. No name, no warning.
fn base_model_mismatch(model: &Path, base: Option<&str>) -> Option<String> {
    let base = base?.trim().trim_end_matches(['/', '\\']);
    if base.is_empty() {
        return None;
    }
    let last = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let want = last(Path::new(base));
    let have = last(&std::path::absolute(model).unwrap_or_else(|_| model.to_path_buf()));
    let stem = model
        .file_stem()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    (want != have && want != stem).then(|| {
        format!(
            "the adapter was made for base model {base:?}, not {}: evaluating anyway",
            model.display()
        )
    })
}

/// Options of `rankstab generate`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab generate --model assets/SmolLM2-135M-Instruct.Q4_1.gguf --prompt 'What is the capital of France?'
  rankstab generate --model path/to/hf-model-dir --prompt 'Once upon a time' --max-tokens 40
  rankstab generate --model DIR --prompt 'Write a haiku' --temperature 0.8 --top-p 0.95 --seed 3

--adapter attaches a PEFT-format LoRA / rsLoRA adapter directory first (as for eval).

Greedy decoding by default; --temperature T > 0 samples (with --top-p, seeded by --seed: the
same seed gives the same text). A KV cache keeps each new token one position of work, and
the text is printed as it comes. When the model has a chat template (GGUF metadata tokenizer.chat_template,
or chat_template in tokenizer_config.json) the prompt is sent as one user message with the
generation prompt; otherwise the text is continued as is. Prints the new text only.")]
pub struct GenerateArgs {
    /// Hugging Face model directory or GGUF file.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The prompt (a user message for chat models).
    #[arg(long)]
    prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling: draw from the most likely tokens holding this much probability.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object {prompt, answer, tokens, seconds} at the end instead of
    /// streaming the text.
    #[arg(long)]
    json: bool,
    /// cpu or cuda (cuda:N for another GPU).
    #[arg(long, default_value = "cpu")]
    device: DeviceName,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
    /// PEFT-format adapter directory (adapter_config.json + adapter_model.safetensors) to
    /// attach before generating.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Refuse to start when the up-front memory estimate exceeds SIZE (e.g. 16G, 512M;
    /// default: the machine's available memory).
    #[arg(long, value_name = "SIZE", value_parser = rankstab_records::guard::parse_memory)]
    max_memory: Option<u64>,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let device = a.device.device()?;
    let kind = a.dtype.kind();
    if a.prompt.is_empty() || a.max_tokens == 0 {
        bail!("--prompt must not be empty and --max-tokens must be at least 1");
    }
    let shape = rankstab_train::load::inspect(&a.model)?;
    // The prompt has at most one token per byte, plus the chat template's few hundred.
    let tokens = a
        .prompt
        .len()
        .saturating_add(a.max_tokens)
        .saturating_add(512);
    memory::check(
        &format!("generating with {}", a.model.display()),
        memory::eval_bytes(&shape, kind, 1, tokens),
        a.max_memory,
    )?;
    let sampling = rankstab_train::generate::Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.check().map_err(|e| anyhow::anyhow!("--{e}"))?;
    if let Some(dir) = &a.adapter {
        rankstab_train::inject::check_peft(dir)?;
    }
    let mut loaded = rankstab_train::load::load(&a.model, kind, device)?;
    if let Some(dir) = &a.adapter {
        let att = rankstab_train::inject::attach_peft(&mut loaded.model, dir)?;
        if let Some(warning) =
            base_model_mismatch(&a.model, att.config.base_model_name_or_path.as_deref())
        {
            eprintln!("rankstab: warning: {}: {warning}", dir.display());
        }
    }
    let t0 = std::time::Instant::now();
    let mut pieces = 0usize;
    let mut stdout = std::io::stdout();
    let answer = rankstab_train::generate::answer_streaming(
        &loaded,
        &a.prompt,
        a.max_tokens,
        &sampling,
        device,
        |piece| {
            pieces += 1;
            if !a.json {
                use std::io::Write;
                // The first piece without the template's leading whitespace.
                let piece = if pieces == 1 {
                    piece.trim_start()
                } else {
                    piece
                };
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        },
    )?;
    if a.json {
        crate::json_line(&serde_json::json!({
            "event": "generate",
            "prompt": a.prompt,
            "answer": answer.trim(),
            "seconds": t0.elapsed().as_secs_f64(),
        }));
    } else {
        println!();
    }
    Ok(())
}
