//! `rankstab eval`: token count, mean NLL and perplexity of a model on a text.
use anyhow::{bail, Context, Result};
use clap::Args;
use rankstab_train::text::{evaluate, read_text, TextTokenizer};
use rankstab_train::CausalLm;
use std::path::PathBuf;
use tch::{Device, Kind};

/// Options of `rankstab eval`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  rankstab eval --model path/to/hf-model-dir --text book.txt
  rankstab eval --model path/to/hf-model-dir --text book.txt --context 512 --batch 4 --json

The model directory holds config.json, model.safetensors (or sharded safetensors with
model.safetensors.index.json) and tokenizer.json. Supported: Llama (model_type llama) and
GPT-J (gptj).")]
pub struct EvalArgs {
    /// Hugging Face model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// UTF-8 text file to evaluate on.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Print one JSON object {tokens, nll, perplexity}.
    #[arg(long)]
    json: bool,
}

/// The device asked for, or an error saying why it is not there.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                bail!("--device cuda was asked for, but this libtorch sees no CUDA device (no GPU, no driver, or a CPU-only libtorch): use --device cpu")
            }
        }
        other => bail!("--device {other:?} is not allowed: use cpu or cuda"),
    }
}

fn kind(name: &str) -> Result<Kind> {
    match name {
        "f32" => Ok(Kind::Float),
        "bf16" => Ok(Kind::BFloat16),
        other => bail!("--dtype {other:?} is not allowed: use f32 or bf16"),
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
    let device = device(&a.device)?;
    let kind = kind(&a.dtype)?;
    if a.context < 2 || a.batch == 0 {
        bail!("--context {} / --batch {}: use a context of at least 2 tokens and a batch of at least 1", a.context, a.batch);
    }
    let text = read_text(&a.text)?;
    let model = CausalLm::from_dir(&a.model, kind, device)?;
    let tok_path = a.model.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{}: no tokenizer.json in the model directory", a.model.display());
    }
    let tok = TextTokenizer::from_file(&tok_path)?;
    tok.check_fits(&tok_path, model.vocab_size())?;
    let ids = tok.encode(&text).context("tokenizing the text")?;
    let r = evaluate(&model, &ids, a.context, a.batch, device)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("tokens      {}", r.tokens);
        println!("nll         {:.6}", r.nll);
        println!("perplexity  {:.4}", r.perplexity);
    }
    Ok(())
}
