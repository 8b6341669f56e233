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

/// Summed next-token NLL of windows `ids` (B, T) at the positions `scored` marks (B, T-1:
/// `scored[b][j]` scores the prediction of token j+1 of window b), and their number.
/// `starts[b]` is the text position of window b's first token (for the error message).
///
/// # Errors
/// A NaN or infinite loss (non-finite logits), naming the first token position where it
/// occurs.
fn window_nll(
    model: &CausalLm,
    ids: &Tensor,
    scored: &Tensor,
    starts: &[usize],
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
    let scored = scored.reshape([-1]);
    let bad = losses.isfinite().logical_not().logical_and(&scored);
    if bad.any().int64_value(&[]) != 0 {
        let i = bad
            .to_kind(tch::Kind::Int64)
            .argmax(None, false)
            .int64_value(&[]) as usize;
        let (row, col) = (i / (t as usize - 1), i % (t as usize - 1));
        let pos = starts[row] + col;
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
    let n = scored.sum(tch::Kind::Int64).int64_value(&[]);
    let sum = losses
        .to_kind(tch::Kind::Double)
        .masked_select(&scored)
        .sum(tch::Kind::Double)
        .double_value(&[]);
    Ok((sum, n))
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
/// `batch` windows at a time: [`evaluate_strided`] with `stride = context` (the first
/// token of each window is not predicted).
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
    evaluate_strided(model, ids, context, context, batch, device)
}

/// One evaluation window: text positions `begin..end`, scoring the predictions of tokens
/// `score_from..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First token of the window.
    pub begin: usize,
    /// One past its last token.
    pub end: usize,
    /// First token whose prediction is scored in this window.
    pub score_from: usize,
}

/// The sliding windows of the transformers documentation's recipe ("Perplexity of
/// fixed-length models"): windows of `context` tokens starting every `stride` tokens, the
/// last one ending at the text's end; each scores the tokens that no earlier window
/// scored, so every token after the first is predicted exactly once, with up to
/// `context - stride` tokens of context carried over from before the window's scored
/// part. `stride = context` gives non-overlapping windows.
pub fn sliding_windows(n: usize, context: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + context).min(n);
        let score_from = prev_end.max(begin + 1);
        if end >= begin + 2 && score_from < end {
            out.push(Window {
                begin,
                end,
                score_from,
            });
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// Evaluates next-token NLL over `ids` with [`sliding_windows`] of `context` tokens every
/// `stride` tokens, `batch` full windows per forward pass (a final shorter window on its
/// own). The NLL is the mean over every scored token (each scored once; the
/// documentation's loop weights each window's mean by one token fewer than it scores,
/// which differs from this in the fourth digit or later).
///
/// # Errors
/// Fewer than two tokens, context < 2, stride outside 1..=context, batch 0.
pub fn evaluate_strided(
    model: &CausalLm,
    ids: &[i64],
    context: usize,
    stride: usize,
    batch: usize,
    device: Device,
) -> Result<EvalResult, TrainError> {
    if context < 2 || batch == 0 {
        return Err(TrainError::Invalid(format!(
            "context {context} / batch {batch}: use context >= 2 and batch >= 1"
        )));
    }
    if stride == 0 || stride > context {
        return Err(TrainError::Invalid(format!(
            "stride {stride}: use a stride from 1 to the context ({context}); a larger one would skip tokens"
        )));
    }
    if ids.len() < 2 {
        return Err(TrainError::Invalid(format!(
            "the text has {} token(s): at least 2 are needed",
            ids.len()
        )));
    }
    let windows = sliding_windows(ids.len(), context, stride);
    let (full, rest): (Vec<Window>, Vec<Window>) = windows
        .into_iter()
        .partition(|w| w.end - w.begin == context);
    let mut total = 0.0f64;
    let mut count = 0i64;
    let mut pass = |group: &[Window]| -> Result<(), TrainError> {
        let len = group[0].end - group[0].begin;
        let flat: Vec<i64> = group
            .iter()
            .flat_map(|w| ids[w.begin..w.end].iter().copied())
            .collect();
        // scored[b][j]: the prediction of token begin + j + 1.
        let mask: Vec<bool> = group
            .iter()
            .flat_map(|w| (w.begin + 1..w.end).map(move |p| p >= w.score_from))
            .collect();
        let t = Tensor::from_slice(&flat)
            .view([group.len() as i64, len as i64])
            .to_device(device);
        let scored = Tensor::from_slice(&mask)
            .view([group.len() as i64, len as i64 - 1])
            .to_device(device);
        let starts: Vec<usize> = group.iter().map(|w| w.begin).collect();
        let (sum, n) = window_nll(model, &t, &scored, &starts)?;
        total += sum;
        count += n;
        Ok(())
    };
    tch::no_grad(|| -> Result<(), TrainError> {
        for group in full.chunks(batch) {
            pass(group)?;
        }
        for w in &rest {
            pass(std::slice::from_ref(w))?;
        }
        Ok(())
    })?;
    let nll = total / count.max(1) as f64;
    Ok(EvalResult {
        tokens: count,
        nll,
        perplexity: nll.exp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every token after the first is scored exactly once (with stride = context, all but
    /// each window's first), by a window that contains it and at most `context` tokens; each window after the first carries
    /// `context - stride` tokens of earlier context (except where the text ends).
    #[test]
    fn sliding_windows_score_every_token_once() {
        for n in [2, 3, 7, 50, 101] {
            for context in [2, 3, 8, 16, 200] {
                for stride in 1..=context.min(9) {
                    let ws = sliding_windows(n, context, stride);
                    let mut hits = vec![0; n];
                    for w in &ws {
                        assert!(w.end - w.begin <= context && w.begin < w.score_from);
                        for h in &mut hits[w.score_from..w.end] {
                            *h += 1;
                        }
                    }
                    // Non-overlapping windows (stride = context) cannot predict their
                    // first token; overlapping ones predict every token after the first.
                    let want =
                        |p: usize| usize::from(p > 0 && (stride < context || p % context != 0));
                    assert!(
                        hits.iter().enumerate().all(|(p, &h)| h == want(p)),
                        "n {n} context {context} stride {stride}: {ws:?}"
                    );
                    for w in ws.iter().skip(1) {
                        if w.end - w.begin == context {
                            assert_eq!(w.score_from - w.begin, (context - stride).max(1));
                        }
                    }
                }
            }
        }
    }

    /// stride = context gives the non-overlapping windows of `chunks(context)`, scoring all
    /// but each window's first token; a text shorter than the context is one window.
    #[test]
    fn a_stride_of_the_context_is_the_plain_chunking() {
        let ws = sliding_windows(10, 4, 4);
        let want = [(0, 4, 1), (4, 8, 5), (8, 10, 9)];
        assert_eq!(ws.len(), want.len());
        for (w, (b, e, s)) in ws.iter().zip(want) {
            assert_eq!((w.begin, w.end, w.score_from), (b, e, s));
        }
        assert_eq!(
            sliding_windows(5, 16, 8),
            vec![Window {
                begin: 0,
                end: 5,
                score_from: 1
            }]
        );
        // The recipe's example: windows of 8 every 4 tokens over 14 tokens.
        let ws: Vec<(usize, usize, usize)> = sliding_windows(14, 8, 4)
            .iter()
            .map(|w| (w.begin, w.end, w.score_from))
            .collect();
        assert_eq!(ws, vec![(0, 8, 1), (4, 12, 8), (8, 14, 12)]);
    }
}
