//! Training data for instrumented LoRA fine-tuning: plain-text corpora and OpenOrca-style
//! instruction rows, cut to the context length, shuffled by seed and split into a training
//! and a held-out set.
//!
//! # Formats
//!
//! - **Text** (`.txt`, `.text`, `.md`; [`DataFormat::Text`]): a UTF-8 corpus for language
//!   modelling. The whole text is tokenized (no special tokens added) and *packed* into
//!   non-overlapping windows of `context + 1` tokens (inputs and shifted targets); a final
//!   shorter remainder is dropped. Every target counts in the loss. This is exactly what
//!   [`crate::trainer::windows`] did, so runs on text keep their numbers.
//! - **Orca** ([`DataFormat::Orca`]): rows with the string fields of OpenOrca,
//!   `system_prompt`, `question` and `response` (other fields, such as `id`, are ignored),
//!   read from
//!   - JSON Lines (`.jsonl`, `.json`): one JSON object per line, blank lines skipped; a
//!     `.json` file whose first character is `[` is read as one JSON array of objects;
//!   - Parquet (`.parquet`, or any Orca file that starts with the `PAR1` magic): the three
//!     columns as strings (`BYTE_ARRAY`, UTF-8), Snappy, gzip, zstd or uncompressed pages.
//!
//!   A line of OpenOrca in JSON Lines:
//!
//!   ```text
//!   {"id": "niv.242684", "system_prompt": "You are an AI assistant.", "question": "Translate to French: \"The cat sleeps.\"", "response": "Le chat dort."}
//!   ```
//!
//! # Instruction rows
//!
//! Each row becomes one sequence: the prompt ([`PROMPT_TEMPLATE`] filled by
//! [`format_prompt`], without its System block when `system_prompt` is empty) and the
//! response, followed by the model's EOS token when [`DataSpec::eos_token`] names one, are
//! tokenized separately and concatenated, then *truncated* to `context + 1` tokens. The loss
//! counts only the positions whose target is a response (or EOS) token. A prompt of
//! `context` tokens or more leaves no room for the response and is an error naming the row,
//! as are missing or non-string fields and empty responses.
//!
//! # Order and split
//!
//! With `max_examples = Some(n)` only the first `n` rows (or text windows) of the file are
//! used. The sequences are shuffled with `ChaCha8Rng::seed_from_u64(seed)`; the last
//! `ceil(n * heldout_fraction)` of them (at least one) are held out.
//!
//! Longer than 600 lines because both formats (text windows and OpenOrca rows, from JSONL
//! and Parquet) share the cutting, shuffling and split, and each bad-input case has its
//! own error naming file, row and field.
use crate::text::TextTokenizer;
use crate::TrainError;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rankstab_records::guard::{open_regular, read_regular_text};
use rankstab_records::RecordsError;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use tch::{Device, Tensor};

/// The prompt of an instruction row; `{system_prompt}` and `{question}` are replaced by the
/// row's fields, and the response follows the final newline. When `system_prompt` is empty
/// (or only whitespace) the `### System:` block is left out, giving
/// [`PROMPT_TEMPLATE_NO_SYSTEM`].
pub const PROMPT_TEMPLATE: &str =
    "### System:\n{system_prompt}\n\n### User:\n{question}\n\n### Assistant:\n";

/// [`PROMPT_TEMPLATE`] without its System block, for rows with an empty `system_prompt`.
pub const PROMPT_TEMPLATE_NO_SYSTEM: &str = "### User:\n{question}\n\n### Assistant:\n";

/// The three string fields of an OpenOrca row, in the order they are checked.
pub const ORCA_FIELDS: [&str; 3] = ["system_prompt", "question", "response"];

/// The largest text file read (1 GiB). A text is read and tokenized whole, and the
/// tokenizer holds tens of bytes per token, so 1 GiB of text already needs tens of GiB of
/// memory; 10,000 steps of 32 sequences of 512 tokens read about 650 MiB. Cut larger texts.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// The largest JSON Lines or Parquet file read (16 GiB): rows are read one by one and only
/// the rows used are kept (`max_examples`), so the bound only refuses a runaway file; the
/// whole of OpenOrca is about 6 GiB as JSON Lines.
pub const MAX_ROWS_BYTES: u64 = 16 << 30;

/// The largest `.json` array read (1 GiB): it is parsed whole, and its values take several
/// times its size in memory (JSON Lines have no such bound).
pub const MAX_JSON_ARRAY_BYTES: u64 = 1 << 30;

rankstab_records::named_enum! {
    /// How a data file is read (`--format`, a sweep's `format`): `auto`, `text` or `orca`.
    DataFormat, "format" {
        /// From the extension: `.txt`, `.text`, `.md`: Text; `.jsonl`, `.json`: Orca JSON
        /// Lines; `.parquet`: Orca Parquet; anything else is an error naming the extension.
        #[default]
        Auto => "auto",
        /// A UTF-8 corpus packed into windows of `context + 1` tokens.
        Text => "text",
        /// OpenOrca rows (`system_prompt`, `question`, `response`) from JSON Lines or Parquet.
        Orca => "orca",
    }
}

impl DataFormat {
    /// The format `path` is read as: `self` unless it is [`DataFormat::Auto`], which is
    /// resolved from the extension (case-insensitive).
    ///
    /// ```
    /// use rankstab_train::data::DataFormat;
    /// use std::path::Path;
    /// assert_eq!(DataFormat::Auto.resolve(Path::new("a.jsonl")).unwrap(), DataFormat::Orca);
    /// assert_eq!(DataFormat::Auto.resolve(Path::new("a.TXT")).unwrap(), DataFormat::Text);
    /// assert_eq!(DataFormat::Text.resolve(Path::new("a.csv")).unwrap(), DataFormat::Text);
    /// assert!(DataFormat::Auto.resolve(Path::new("a.csv")).is_err());
    /// ```
    ///
    /// # Errors
    /// `Auto` with an unknown or missing extension (named, with the known ones).
    pub fn resolve(self, path: &Path) -> Result<DataFormat, TrainError> {
        if self != DataFormat::Auto {
            return Ok(self);
        }
        let ext = extension(path);
        match ext.as_str() {
            "txt" | "text" | "md" => Ok(DataFormat::Text),
            "jsonl" | "json" | "parquet" => Ok(DataFormat::Orca),
            _ => Err(TrainError::Invalid(format!(
                "{}: unknown data file extension {} (known: .txt, .text, .md for text; .jsonl, .json, .parquet for OpenOrca rows); name the format with --format text or --format orca",
                path.display(),
                if ext.is_empty() {
                    "(none)".to_string()
                } else {
                    format!("\".{ext}\"")
                }
            ))),
        }
    }
}

/// What to read and how to cut it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataSpec {
    /// File format ([`DataFormat::Auto`]: from the extension).
    pub format: DataFormat,
    /// Tokens of input per sequence; sequences hold at most `context + 1` ids.
    pub context: usize,
    /// Fraction of the sequences held out, in `[0, 1)` (at least one is held out).
    pub heldout_fraction: f64,
    /// Seed of the shuffle.
    pub seed: u64,
    /// Only the first N rows (or text windows) of the file, before shuffling.
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// The model's end-of-sequence token (e.g. `"</s>"`), appended to every response and
    /// used for padding; `None`: nothing appended, padding with id 0.
    #[serde(default)]
    pub eos_token: Option<String>,
}

/// One training sequence: `ids` has at most context + 1 tokens; `mask[i]` (len
/// `ids.len() - 1`) is true when predicting `ids[i+1]` from `ids[..=i]` counts in the loss.
/// Sequences made by [`load_dataset`] have at least two ids and one true mask entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<i64>,
    /// Loss mask over the targets `ids[1..]`.
    pub mask: Vec<bool>,
}

/// Training and held-out sequences of a data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Training sequences, shuffled.
    pub train: Vec<Sequence>,
    /// Held-out sequences.
    pub heldout: Vec<Sequence>,
    /// Id used to pad batches ([`collate`]): the EOS id if known, else 0.
    pub pad_id: i64,
    /// The format the file was read as (never [`DataFormat::Auto`]).
    pub format: DataFormat,
    /// Rows or windows before the split.
    pub examples: usize,
}

/// The prompt of an instruction row: [`PROMPT_TEMPLATE`] (or
/// [`PROMPT_TEMPLATE_NO_SYSTEM`] when `system_prompt` is blank) with the fields put in. The
/// fields are inserted verbatim, so braces in them are kept.
///
/// ```
/// use rankstab_train::data::format_prompt;
/// assert_eq!(
///     format_prompt("Be brief.", "2+2?"),
///     "### System:\nBe brief.\n\n### User:\n2+2?\n\n### Assistant:\n"
/// );
/// assert_eq!(format_prompt("", "2+2?"), "### User:\n2+2?\n\n### Assistant:\n");
/// ```
pub fn format_prompt(system_prompt: &str, question: &str) -> String {
    let template = if system_prompt.trim().is_empty() {
        PROMPT_TEMPLATE_NO_SYSTEM
    } else {
        PROMPT_TEMPLATE
    };
    let mut out = String::with_capacity(template.len() + system_prompt.len() + question.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{system_prompt}") {
            out.push_str(system_prompt);
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{question}") {
            out.push_str(question);
            rest = t;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Reads, tokenizes, cuts, shuffles and splits a data file (see the module documentation).
///
/// # Errors
/// One-line messages naming the file and, for rows, the row (1-based) and field: an
/// unreadable file, an unknown extension, non-UTF-8 text, malformed JSON (with its line),
/// a missing, null or non-string field, an empty response, a prompt that fills the context
/// (with its token count), an unreadable or truncated Parquet file, an empty dataset, too
/// few rows or windows for a training and a held-out set, an EOS token the tokenizer does
/// not know, a context of 0 or a held-out fraction outside `[0, 1)`.
pub fn load_dataset(
    path: &Path,
    tok: &TextTokenizer,
    spec: &DataSpec,
) -> Result<Dataset, TrainError> {
    if spec.context == 0 || spec.context == usize::MAX {
        return Err(TrainError::Invalid(format!(
            "context {}: use a context of at least 1 token",
            spec.context
        )));
    }
    if !(spec.heldout_fraction.is_finite() && (0.0..1.0).contains(&spec.heldout_fraction)) {
        return Err(TrainError::Invalid(format!(
            "held-out fraction {}: use a value in [0, 1)",
            spec.heldout_fraction
        )));
    }
    if spec.max_examples == Some(0) {
        return Err(TrainError::Invalid(
            "max examples 0: use at least 2 (one to train on, one held out)".into(),
        ));
    }
    let eos_id = match &spec.eos_token {
        Some(name) => Some(tok.token_id(name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "the EOS token {name:?} is not in the tokenizer's vocabulary"
            ))
        })?),
        None => None,
    };
    let format = spec.format.resolve(path)?;
    let limit = spec.max_examples.unwrap_or(usize::MAX);
    let (seqs, what) = match format {
        DataFormat::Text => (text_windows(path, tok, spec.context, limit)?, "window"),
        _ => (
            orca_sequences(path, Some(tok), spec.context, eos_id, limit)?.out,
            "row",
        ),
    };
    let examples = seqs.len();
    if examples == 0 && what == "row" {
        return Err(TrainError::Invalid(format!(
            "{}: the dataset has no rows",
            path.display()
        )));
    }
    let n_held = heldout_count(examples, spec.heldout_fraction);
    if examples < n_held + 1 {
        let msg = if what == "window" {
            format!(
                "{}: the text gives {examples} window(s) of {} tokens: need at least {} (shorter --context or more text)",
                path.display(),
                spec.context + 1,
                n_held + 1
            )
        } else {
            format!(
                "{}: the dataset has {examples} row(s): need at least {} (one or more to train on, {n_held} held out)",
                path.display(),
                n_held + 1
            )
        };
        return Err(TrainError::Invalid(msg));
    }
    let (train, heldout) = shuffle_split(seqs, n_held, spec.seed);
    Ok(Dataset {
        train,
        heldout,
        pad_id: eos_id.unwrap_or(0),
        format,
        examples,
    })
}

/// How many of `n` examples are held out: `ceil(n * fraction)`, at least one.
pub fn heldout_count(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).ceil() as usize).max(1)
}

/// Shuffles `items` by `seed` (ChaCha8) and splits off the last `n_held` as the held-out
/// set: (training, held-out). The one shuffle of every dataset, so that text windows keep
/// their order whichever function cut them.
pub fn shuffle_split<T>(mut items: Vec<T>, n_held: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    items.shuffle(&mut rng);
    let held = items.split_off(items.len() - n_held.min(items.len()));
    (items, held)
}

/// Pads a batch to its longest sequence: (ids [B, T+1] i64, mask [B, T] f32 with 0 on
/// padding and non-loss positions). Padding goes at the end of each row; an empty batch
/// gives shapes [0, 1] and [0, 0].
pub fn collate(seqs: &[&Sequence], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let width = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0).max(1);
    let t = width - 1;
    let mut ids = Vec::with_capacity(seqs.len() * width);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend_from_slice(&s.ids);
        ids.resize(ids.len() + width - s.ids.len(), pad_id);
        let targets = s.ids.len().saturating_sub(1);
        mask.extend((0..t).map(|i| {
            if i < targets && s.mask.get(i).copied().unwrap_or(false) {
                1f32
            } else {
                0f32
            }
        }));
    }
    let b = seqs.len() as i64;
    (
        Tensor::from_slice(&ids)
            .view([b, width as i64])
            .to_device(device),
        Tensor::from_slice(&mask)
            .view([b, t as i64])
            .to_device(device),
    )
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The first `limit` non-overlapping windows of `context + 1` tokens of the text.
fn text_windows(
    path: &Path,
    tok: &TextTokenizer,
    context: usize,
    limit: usize,
) -> Result<Vec<Sequence>, TrainError> {
    let text = read_data_text(path)?;
    let ids = tok.encode(&text)?;
    Ok(ids
        .chunks_exact(context + 1)
        .take(limit)
        .map(|w| Sequence {
            ids: w.to_vec(),
            mask: vec![true; context],
        })
        .collect())
}

/// A refusal of the guarded reader as this crate's error: I/O errors stay I/O errors
/// (naming the file), refusals become one-line `Invalid` messages naming the file.
fn guard_error(e: RecordsError) -> TrainError {
    match e {
        RecordsError::Io { path, source } => TrainError::Io { path, source },
        RecordsError::Invalid { path, msg } => {
            TrainError::Invalid(format!("{}: {msg}", path.display()))
        }
        other => TrainError::Records(other),
    }
}

/// A text data file: a regular file of at most [`MAX_TEXT_BYTES`], UTF-8 (a byte-order
/// mark is dropped), with some text other than white space.
///
/// # Errors
/// Not a regular file (a directory, FIFO, device), too large, not UTF-8 (with the byte
/// offset), empty or only white space; each naming the file.
pub fn read_data_text(path: &Path) -> Result<String, TrainError> {
    let text = read_regular_text(path, MAX_TEXT_BYTES).map_err(guard_error)?;
    if text.trim().is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: the text is empty ({}): give a text to train on",
            path.display(),
            if text.is_empty() {
                "0 bytes".to_string()
            } else {
                format!("{} bytes of white space", text.len())
            }
        )));
    }
    Ok(text)
}

/// Checks a data file without a tokenizer, before a sweep writes anything: a regular,
/// non-empty file of its format (resolved as [`DataFormat::resolve`] does) whose text is
/// UTF-8 with something in it, or whose first `max_examples` rows (all when `None`) are
/// OpenOrca rows (objects with the three string fields, a non-empty response), at least
/// two of them. Returns the format and the number of rows (0 for text).
///
/// What needs the model's tokenizer (enough windows of the context, prompts that fit) is
/// checked when the data is loaded.
///
/// # Errors
/// Every error of [`load_dataset`] that does not need the tokenizer.
pub fn check_data_file(
    path: &Path,
    format: DataFormat,
    max_examples: Option<usize>,
) -> Result<(DataFormat, usize), TrainError> {
    let format = format.resolve(path)?;
    if format == DataFormat::Text {
        read_data_text(path)?;
        return Ok((format, 0));
    }
    let limit = max_examples.unwrap_or(usize::MAX);
    let rows = orca_sequences(path, None, 0, None, limit)?.count;
    if rows == 0 {
        return Err(TrainError::Invalid(format!(
            "{}: the dataset has no rows",
            path.display()
        )));
    }
    if rows < 2 {
        return Err(TrainError::Invalid(format!(
            "{}: the dataset has {rows} row(s): need at least 2 (one or more to train on, one held out)",
            path.display()
        )));
    }
    Ok((format, rows))
}

/// The fields of one instruction row.
struct OrcaRow {
    system_prompt: String,
    question: String,
    response: String,
}

/// Turns rows into sequences, stopping after `limit`.
/// Without a tokenizer it only checks and counts the rows ([`check_data_file`]).
struct OrcaBuilder<'a> {
    path: &'a Path,
    tok: Option<&'a TextTokenizer>,
    context: usize,
    eos_id: Option<i64>,
    limit: usize,
    out: Vec<Sequence>,
    count: usize,
}

impl OrcaBuilder<'_> {
    fn full(&self) -> bool {
        self.count >= self.limit
    }

    fn push(&mut self, row: &OrcaRow, label: &str) -> Result<(), TrainError> {
        let path = self.path.display();
        if row.response.trim().is_empty() {
            return Err(TrainError::Invalid(format!(
                "{path}: {label}: field `response` is empty"
            )));
        }
        self.count += 1;
        let Some(tok) = self.tok else {
            return Ok(());
        };
        let prompt = tok
            .encode(&format_prompt(&row.system_prompt, &row.question))
            .map_err(|e| e.within(format!("{path}: {label}")))?;
        let mut response = tok
            .encode(&row.response)
            .map_err(|e| e.within(format!("{path}: {label}")))?;
        if let Some(eos) = self.eos_id {
            response.push(eos);
        }
        let p = prompt.len();
        if p >= self.context {
            return Err(TrainError::Invalid(format!(
                "{path}: {label}: the prompt is {p} tokens, which leaves no room for the response in a context of {} tokens (use a larger --context, above {p})",
                self.context
            )));
        }
        let mut ids = prompt;
        ids.extend(response);
        ids.truncate(self.context + 1);
        let mask = (1..ids.len()).map(|j| j >= p).collect();
        self.out.push(Sequence { ids, mask });
        Ok(())
    }
}

/// Sequences of the first `limit` rows of a JSON Lines, JSON array or Parquet file (only
/// checked and counted without a tokenizer). The file must be a regular file of at most
/// [`MAX_ROWS_BYTES`] ([`MAX_JSON_ARRAY_BYTES`] for a JSON array), and not empty.
fn orca_sequences<'a>(
    path: &'a Path,
    tok: Option<&'a TextTokenizer>,
    context: usize,
    eos_id: Option<i64>,
    limit: usize,
) -> Result<OrcaBuilder<'a>, TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut b = OrcaBuilder {
        path,
        tok,
        context,
        eos_id,
        limit,
        out: Vec::new(),
        count: 0,
    };
    let (file, len) = open_regular(path, MAX_ROWS_BYTES).map_err(guard_error)?;
    if len == 0 {
        return Err(TrainError::Invalid(format!(
            "{}: the file is empty (0 bytes){}: the dataset has no rows",
            path.display(),
            if extension(path) == "parquet" {
                ", not a readable Parquet file"
            } else {
                ""
            }
        )));
    }
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let head = reader.fill_buf().map_err(io)?;
    let head = head.strip_prefix(BOM).unwrap_or(head);
    let parquet = head.starts_with(b"PAR1") || extension(path) == "parquet";
    let array = head
        .iter()
        .find(|c| !c.is_ascii_whitespace())
        .is_some_and(|&c| c == b'[');
    if parquet {
        drop(reader);
        read_parquet(&mut b)?;
    } else if array {
        drop(reader);
        read_json_array(&mut b)?;
    } else {
        read_jsonl(reader, &mut b)?;
    }
    Ok(b)
}

/// The longest JSON Lines line read (64 MiB): one row; a longer line is refused before it
/// is held in memory.
pub const MAX_LINE_BYTES: u64 = 64 << 20;

/// UTF-8's byte-order mark, which some editors put at the start of a file (dropped).
const BOM: &[u8] = b"\xef\xbb\xbf";

/// The three fields of a JSON row.
fn json_row(path: &Path, label: &str, value: serde_json::Value) -> Result<OrcaRow, TrainError> {
    let serde_json::Value::Object(mut obj) = value else {
        return Err(TrainError::Invalid(format!(
            "{}: {label}: expected a JSON object with the fields {}, found {}",
            path.display(),
            ORCA_FIELDS.join(", "),
            crate::weights::kind_of(&value)
        )));
    };
    let mut take = |name: &str| match obj.remove(name) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(TrainError::Invalid(format!(
            "{}: {label}: field `{name}` is not a string (found {})",
            path.display(),
            crate::weights::kind_of(&other)
        ))),
        None => Err(TrainError::Invalid(format!(
            "{}: {label}: missing field `{name}`",
            path.display()
        ))),
    };
    Ok(OrcaRow {
        system_prompt: take("system_prompt")?,
        question: take("question")?,
        response: take("response")?,
    })
}

/// serde_json's message without its " at line L column C" suffix.
fn json_message(e: &serde_json::Error) -> String {
    let m = e.to_string();
    match m.rfind(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m,
    }
}

fn read_jsonl(mut reader: impl BufRead, b: &mut OrcaBuilder<'_>) -> Result<(), TrainError> {
    let path = b.path;
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    let mut row = 0usize;
    while !b.full() {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| TrainError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if n as u64 > MAX_LINE_BYTES {
            return Err(TrainError::Invalid(format!(
                "{}: line {line_no}: longer than {} MiB: one row is at most that long (OpenOrca's rows are a few KiB)",
                path.display(),
                MAX_LINE_BYTES >> 20
            )));
        }
        let bytes = buf.strip_prefix(BOM).unwrap_or(&buf);
        let line = std::str::from_utf8(bytes).map_err(|e| {
            TrainError::Invalid(format!(
                "{}: line {line_no}: not UTF-8 text (invalid byte at column {})",
                path.display(),
                e.valid_up_to() + 1
            ))
        })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        row += 1;
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            TrainError::Invalid(format!(
                "{}: line {line_no}: malformed JSON at column {}: {}",
                path.display(),
                e.column(),
                json_message(&e)
            ))
        })?;
        let label = if row == line_no {
            format!("row {row}")
        } else {
            format!("row {row} (line {line_no})")
        };
        let r = json_row(path, &label, value)?;
        b.push(&r, &label)?;
    }
    Ok(())
}

fn read_json_array(b: &mut OrcaBuilder<'_>) -> Result<(), TrainError> {
    let path = b.path;
    let text = read_regular_text(path, MAX_JSON_ARRAY_BYTES).map_err(guard_error)?;
    let values: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        TrainError::Invalid(format!(
            "{}: line {}: malformed JSON at column {}: {} (a .json file must be one array of row objects, or JSON Lines)",
            path.display(),
            e.line(),
            e.column(),
            json_message(&e)
        ))
    })?;
    for (i, value) in values.into_iter().enumerate() {
        if b.full() {
            break;
        }
        let label = format!("row {}", i + 1);
        let r = json_row(path, &label, value)?;
        b.push(&r, &label)?;
    }
    Ok(())
}

fn read_parquet(b: &mut OrcaBuilder<'_>) -> Result<(), TrainError> {
    use parquet::basic::Type as Physical;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::schema::types::Type;

    let path = b.path;
    let shown = path.display();
    let (file, _) = open_regular(path, MAX_ROWS_BYTES).map_err(guard_error)?;
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        let e = e.to_string();
        let e = one_line(&e);
        TrainError::Invalid(match e.split_once("Disabled feature at compile time: ") {
            Some((_, codec)) => format!(
                "{shown}: {what}: the file is compressed with {codec}, which this build does not read (rewrite it with Snappy, gzip, zstd or no compression)"
            ),
            None => format!("{shown}: {what} (truncated or corrupt?): {e}"),
        })
    };
    let reader = guarded(|| SerializedFileReader::new(file))
        .map_err(|e| corrupt("not a readable Parquet file", &e))?
        .map_err(|e| corrupt("not a readable Parquet file", &e))?;
    let meta = reader.metadata().file_metadata();
    if meta.num_rows() <= 0 {
        return Err(TrainError::Invalid(format!(
            "{shown}: the dataset has no rows"
        )));
    }
    let root = meta.schema();
    let columns: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
    let mut projected = Vec::with_capacity(ORCA_FIELDS.len());
    for name in ORCA_FIELDS {
        let Some(f) = root.get_fields().iter().find(|f| f.name() == name) else {
            return Err(TrainError::Invalid(format!(
                "{shown}: row 1: missing field `{name}` (the file's columns: {})",
                columns.join(", ")
            )));
        };
        if !f.is_primitive() || f.get_physical_type() != Physical::BYTE_ARRAY {
            let kind = if f.is_primitive() {
                f.get_physical_type().to_string()
            } else {
                "a group".to_string()
            };
            return Err(TrainError::Invalid(format!(
                "{shown}: row 1: field `{name}` is not a string (the column is {kind})"
            )));
        }
        projected.push(f.clone());
    }
    let projection = Type::group_type_builder(root.name())
        .with_fields(projected)
        .build()
        .map_err(|e| TrainError::Invalid(format!("{shown}: cannot select the columns: {e}")))?;
    let mut rows = guarded(|| reader.get_row_iter(Some(projection)))
        .map_err(|e| corrupt("cannot read Parquet rows", &e))?
        .map_err(|e| corrupt("cannot read Parquet rows", &e))?;
    let mut i = 0usize;
    while !b.full() {
        i += 1;
        let label = format!("row {i}");
        let what = format!("{label}: cannot read Parquet data");
        let Some(row) = guarded(|| rows.next()).map_err(|e| corrupt(&what, &e))? else {
            break;
        };
        let row = row.map_err(|e| corrupt(&what, &e))?;
        let mut fields: [Option<String>; 3] = [None, None, None];
        for (name, value) in row.get_column_iter() {
            let Some(k) = ORCA_FIELDS.iter().position(|f| f == name) else {
                continue;
            };
            let s = match value {
                Field::Str(s) => s.clone(),
                Field::Bytes(bytes) => match std::str::from_utf8(bytes.data()) {
                    Ok(s) => s.to_string(),
                    Err(_) => {
                        return Err(TrainError::Invalid(format!(
                            "{shown}: {label}: field `{name}` is not a string (binary that is not UTF-8)"
                        )))
                    }
                },
                Field::Null => {
                    return Err(TrainError::Invalid(format!(
                        "{shown}: {label}: field `{name}` is not a string (found null)"
                    )))
                }
                other => {
                    return Err(TrainError::Invalid(format!(
                        "{shown}: {label}: field `{name}` is not a string (found {other})"
                    )))
                }
            };
            fields[k] = Some(s);
        }
        let [system_prompt, question, response] = fields;
        let missing = |v: Option<String>, name: &str| {
            v.ok_or_else(|| {
                TrainError::Invalid(format!("{shown}: {label}: missing field `{name}`"))
            })
        };
        let r = OrcaRow {
            system_prompt: missing(system_prompt, "system_prompt")?,
            question: missing(question, "question")?,
            response: missing(response, "response")?,
        };
        b.push(&r, &label)?;
    }
    Ok(())
}

/// The first line of a message, for one-line errors.
fn one_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default().trim_end()
}

thread_local! {
    /// Set while [`guarded`] runs Parquet code on this thread: its panics are not printed.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into an error carrying the panic's message.
///
/// The Parquet row reader asserts on some kinds of damaged data (e.g. a definition level
/// above the column's maximum) instead of returning an error; a damaged file must give a
/// clear error, not a crash. The first call wraps the process's panic hook so that panics
/// inside `guarded` on this thread are not printed; every other panic is reported by the
/// previous hook as before.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the Parquet reader failed".to_string())
    })
}
