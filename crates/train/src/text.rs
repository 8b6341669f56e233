//! Tokenizers (`tokenizer.json`) and text evaluation: token count, mean NLL, perplexity.
use crate::{CausalLm, TrainError};
use std::path::Path;
use tch::{Device, Tensor};

/// Parses the text of a `tokenizer.json`. The text must be JSON first (serde_json's
/// error, with line and column): tokenizers 0.23 panics on some malformed JSON (its
/// decoders' untagged helper unwraps), and any panic left in the library is turned into
/// an error here rather than ending the process.
fn parse_tokenizer(json: &str) -> Result<tokenizers::Tokenizer, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(json).map_err(|e| format!("not JSON ({e})"))?;
    match std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>()) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the tokenizers library could not read it (it panicked)".into()),
    }
}

/// A Hugging Face tokenizer checked against a model's embedding.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    ///
    /// # Errors
    /// Missing or malformed file (named).
    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        let text =
            rankstab_records::guard::read_regular_text(path, crate::weights::MAX_TOKENIZER_BYTES)?;
        let inner = parse_tokenizer(&text).map_err(|e| TrainError::Config {
            path: path.to_path_buf(),
            message: format!("not a tokenizer.json: {e}"),
        })?;
        Ok(Self { inner })
    }

    /// A tokenizer from the text of a `tokenizer.json` (e.g. one built from GGUF metadata
    /// by [`crate::gguf::tokenizer_json`]); `origin` names where it came from in errors.
    ///
    /// # Errors
    /// Malformed JSON or an unknown component (named).
    pub fn from_json(json: &str, origin: &Path) -> Result<Self, TrainError> {
        let inner = parse_tokenizer(json).map_err(|e| TrainError::Config {
            path: origin.to_path_buf(),
            message: format!("not a valid tokenizer: {e}"),
        })?;
        Ok(Self { inner })
    }

    /// Text of token ids; special tokens are kept when `keep_special`.
    ///
    /// # Errors
    /// An id outside the vocabulary.
    pub fn decode(&self, ids: &[i64], keep_special: bool) -> Result<String, TrainError> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| {
                u32::try_from(i).map_err(|_| {
                    TrainError::Invalid(format!("token id {i} is not a vocabulary id"))
                })
            })
            .collect::<Result<_, _>>()?;
        self.inner
            .decode(&ids, !keep_special)
            .map_err(|e| TrainError::Invalid(format!("decoding failed: {e}")))
    }

    /// The id of a token string (including added and special tokens).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Checks that every id the tokenizer can produce has a row in the embedding.
    ///
    /// # Errors
    /// A vocabulary larger than the embedding (both sizes named).
    pub fn check_fits(&self, path: &Path, embedding_rows: i64) -> Result<(), TrainError> {
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0) as i64;
        if max_id >= embedding_rows {
            return Err(TrainError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "the tokenizer's vocabulary ({} tokens, largest id {max_id}) does not fit the model's embedding of {embedding_rows} rows",
                    self.vocab_size()
                ),
            });
        }
        Ok(())
    }

    /// Token ids of `text` (no special tokens added).
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TrainError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TrainError::Invalid(format!("tokenizing failed: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }
}

/// Largest text `eval` reads: 1 GiB of text is ~250 M tokens, hours of evaluation on
/// one accelerator; the token ids alone take 8 bytes a token (2 GiB). A larger file is
/// refused before it is read rather than filling memory.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Reads a UTF-8 text file that is not empty: a regular file of at most
/// [`MAX_TEXT_BYTES`] (a device such as /dev/zero or a FIFO is refused unopened).
///
/// # Errors
/// Unreadable, too large, not a regular file, empty or non-UTF-8 files (named).
pub fn read_text(path: &Path) -> Result<String, TrainError> {
    let text = rankstab_records::guard::read_regular_text(path, MAX_TEXT_BYTES)?;
    if text.trim().is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: the text is empty",
            path.display()
        )));
    }
    Ok(text)
}

/// Mean next-token NLL of windows `ids` (B, T) whose first token is token `first` of the
/// text, windows `stride` tokens apart, and the number of predicted tokens.
///
/// # Errors
/// A NaN or infinite loss (non-finite logits), naming the first token position where it
/// occurs.
fn window_nll(
    model: &CausalLm,
    ids: &Tensor,
    first: usize,
    stride: usize,
) -> Result<(f64, i64), TrainError> {
    let t = ids.size()[1];
    let logits = model
        .forward(ids, false)
        .narrow(1, 0, t - 1)
        .to_kind(tch::Kind::Float);
    let v = logits.size()[2];
    let targets = ids.narrow(1, 1, t - 1).reshape([-1]);
    let losses = logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(
        &targets,
        None,
        tch::Reduction::None,
        -100,
        0.0,
    );
    let bad = losses.isfinite().logical_not();
    if bad.any().int64_value(&[]) != 0 {
        let i = bad
            .to_kind(tch::Kind::Int64)
            .argmax(None, false)
            .int64_value(&[]) as usize;
        let (row, col) = (i / (t as usize - 1), i % (t as usize - 1));
        let pos = first + row * stride + col;
        let logits_bad = logits
            .reshape([-1, v])
            .get(i as i64)
            .isfinite()
            .logical_not()
            .any()
            .int64_value(&[])
            != 0;
        let what = if logits_bad { "logits" } else { "loss" };
        return Err(TrainError::Invalid(format!(
            "the model's {what} is NaN or infinite at token position {pos} (predicting token {}): the weights or their metadata are damaged; no perplexity is reported",
            pos + 1
        )));
    }
    let n = losses.numel() as i64;
    Ok((losses.mean(tch::Kind::Float).double_value(&[]), n))
}

/// Result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalResult {
    /// Predicted tokens.
    pub tokens: i64,
    /// Mean negative log-likelihood per predicted token (nats).
    pub nll: f64,
    /// exp(nll).
    pub perplexity: f64,
}

/// Evaluates next-token NLL over `ids` in non-overlapping windows of `context` tokens,
/// `batch` windows at a time (a final shorter window is evaluated on its own).
///
/// # Errors
/// Fewer than two tokens, context < 2, batch 0.
pub fn evaluate(
    model: &CausalLm,
    ids: &[i64],
    context: usize,
    batch: usize,
    device: Device,
) -> Result<EvalResult, TrainError> {
    if context < 2 || batch == 0 {
        return Err(TrainError::Invalid(format!(
            "context {context} / batch {batch}: use context >= 2 and batch >= 1"
        )));
    }
    if ids.len() < 2 {
        return Err(TrainError::Invalid(format!(
            "the text has {} token(s): at least 2 are needed",
            ids.len()
        )));
    }
    let windows: Vec<&[i64]> = ids.chunks(context).filter(|w| w.len() >= 2).collect();
    let (full, rest): (Vec<&[i64]>, Vec<&[i64]>) =
        windows.into_iter().partition(|w| w.len() == context);
    let mut total = 0.0f64;
    let mut count = 0i64;
    tch::no_grad(|| -> Result<(), TrainError> {
        for (g, group) in full.chunks(batch).enumerate() {
            let flat: Vec<i64> = group.iter().flat_map(|w| w.iter().copied()).collect();
            let t = Tensor::from_slice(&flat)
                .view([group.len() as i64, context as i64])
                .to_device(device);
            let (nll, n) = window_nll(model, &t, g * batch * context, context)?;
            total += nll * n as f64;
            count += n;
        }
        for w in rest {
            let t = Tensor::from_slice(w)
                .view([1, w.len() as i64])
                .to_device(device);
            let (nll, n) = window_nll(model, &t, full.len() * context, context)?;
            total += nll * n as f64;
            count += n;
        }
        Ok(())
    })?;
    let nll = total / count as f64;
    Ok(EvalResult {
        tokens: count,
        nll,
        perplexity: nll.exp(),
    })
}
