//! Training data: text windows, OpenOrca rows from JSON Lines and Parquet, bad input, and
//! batching.
//!
//! The tokenizer is `tests/fixtures/data/tokenizer.json`: byte-level BPE (GPT-2 bytes, a
//! few merges, `</s>` as id 266) that decodes every text back exactly, so masked targets can
//! be compared with the response text. Token ids of bytes are the byte values.
use parquet::basic::{Compression, GzipLevel, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use rankstab_train::data::{
    collate, format_prompt, load_dataset, DataFormat, DataSpec, Dataset, Sequence, PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_SYSTEM,
};
use rankstab_train::text::TextTokenizer;
use rankstab_train::TrainError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn byte_tok() -> TextTokenizer {
    TextTokenizer::from_file(&fixtures().join("data/tokenizer.json")).expect("fixture tokenizer")
}

fn llama_tok() -> TextTokenizer {
    TextTokenizer::from_file(&fixtures().join("tiny-llama/tokenizer.json"))
        .expect("tiny-llama tokenizer")
}

fn orca_jsonl() -> PathBuf {
    fixtures().join("data/orca.jsonl")
}

/// (system_prompt, question, response) of the fixture rows, in file order.
fn orca_rows() -> Vec<(String, String, String)> {
    std::fs::read_to_string(orca_jsonl())
        .expect("fixture")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("fixture JSON");
            let s = |k: &str| v[k].as_str().expect("string field").to_string();
            (s("system_prompt"), s("question"), s("response"))
        })
        .collect()
}

fn spec(format: DataFormat, context: usize, fraction: f64, seed: u64) -> DataSpec {
    DataSpec {
        format,
        context,
        heldout_fraction: fraction,
        seed,
        max_examples: None,
        eos_token: Some("</s>".into()),
    }
}

fn orca_spec(seed: u64) -> DataSpec {
    spec(DataFormat::Auto, 512, 0.25, seed)
}

fn all(d: &Dataset) -> Vec<&Sequence> {
    d.train.iter().chain(&d.heldout).collect()
}

/// The message of an `Invalid` error; panics on success or another kind.
fn invalid(r: Result<Dataset, TrainError>) -> String {
    match r {
        Err(TrainError::Invalid(m)) => {
            assert!(!m.contains('\n'), "not one line: {m}");
            m
        }
        Err(e) => panic!("expected TrainError::Invalid, got {e:?}"),
        Ok(_) => panic!("expected an error, got a dataset"),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
    }
}

const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first entering \
a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the \
rightful property of some one or other of their daughters.\n";

#[test]
fn text_windows_equal_trainer_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("corpus.txt");
    std::fs::write(&path, TEXT.repeat(3)).expect("write");
    for tok in [byte_tok(), llama_tok()] {
        let ids = tok.encode(&TEXT.repeat(3)).expect("encode");
        for (context, fraction, seed) in [(12, 0.2, 0), (12, 0.2, 1), (31, 0.0, 7), (5, 0.5, 42)] {
            let (train, held) =
                rankstab_train::trainer::windows(&ids, context, fraction, seed).expect("windows");
            let d = load_dataset(
                &path,
                &tok,
                &spec(DataFormat::Auto, context, fraction, seed),
            )
            .expect("dataset");
            assert_eq!(d.format, DataFormat::Text);
            assert_eq!(d.examples, train.len() + held.len());
            let got: Vec<Vec<i64>> = d.train.iter().map(|s| s.ids.clone()).collect();
            let got_held: Vec<Vec<i64>> = d.heldout.iter().map(|s| s.ids.clone()).collect();
            assert_eq!(got, train, "context {context} seed {seed}");
            assert_eq!(got_held, held, "context {context} seed {seed}");
            assert!(all(&d).iter().all(|s| s.mask == vec![true; context]));
        }
    }
}

/// The shuffle of text windows is pinned: old runs keep their numbers even if
/// `trainer::windows` goes away. Bytes are their own ids in the fixture tokenizer, so the
/// first id of each window names it.
#[test]
fn text_window_order_is_pinned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("letters.text");
    // 42 letters without a merge pair: 8 windows of 5 tokens and 2 left over.
    let text = "abcdefgijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ";
    std::fs::write(&path, text).expect("write");
    let d = load_dataset(&path, &byte_tok(), &spec(DataFormat::Auto, 4, 0.25, 7)).expect("data");
    let first =
        |s: &[Sequence]| -> Vec<char> { s.iter().map(|w| w.ids[0] as u8 as char).collect() };
    assert_eq!(d.examples, 8);
    assert_eq!(first(&d.train), PINNED_TRAIN.chars().collect::<Vec<_>>());
    assert_eq!(first(&d.heldout), PINNED_HELD.chars().collect::<Vec<_>>());
    for w in all(&d) {
        let start = text.find(w.ids[0] as u8 as char).expect("window start");
        let want: Vec<i64> = text.as_bytes()[start..start + 5]
            .iter()
            .map(|&b| i64::from(b))
            .collect();
        assert_eq!(w.ids, want);
    }
}
const PINNED_TRAIN: &str = "aKAlvf";
const PINNED_HELD: &str = "Fq";

#[test]
fn text_max_examples_takes_the_first_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("corpus.md");
    std::fs::write(&path, TEXT.repeat(3)).expect("write");
    let tok = byte_tok();
    let ids = tok.encode(&TEXT.repeat(3)).expect("encode");
    let mut s = spec(DataFormat::Text, 16, 0.2, 3);
    s.max_examples = Some(10);
    let d = load_dataset(&path, &tok, &s).expect("dataset");
    let (train, held) =
        rankstab_train::trainer::windows(&ids[..10 * 17], 16, 0.2, 3).expect("windows");
    assert_eq!(d.examples, 10);
    assert_eq!(
        d.train.iter().map(|s| s.ids.clone()).collect::<Vec<_>>(),
        train
    );
    assert_eq!(
        d.heldout.iter().map(|s| s.ids.clone()).collect::<Vec<_>>(),
        held
    );
}

#[test]
fn template_is_documented_and_filled_verbatim() {
    assert!(PROMPT_TEMPLATE.ends_with(PROMPT_TEMPLATE_NO_SYSTEM));
    assert_eq!(
        format_prompt("S", "Q"),
        PROMPT_TEMPLATE
            .replace("{system_prompt}", "S")
            .replace("{question}", "Q")
    );
    assert_eq!(
        format_prompt(" \n", "Q"),
        PROMPT_TEMPLATE_NO_SYSTEM.replace("{question}", "Q")
    );
    // Placeholders inside the fields are not substituted again.
    assert_eq!(
        format_prompt("{question}", "{system_prompt}"),
        "### System:\n{question}\n\n### User:\n{system_prompt}\n\n### Assistant:\n"
    );
}

/// Every sequence is one fixture row: the unmasked head decodes to the filled template and
/// the masked targets decode to exactly the response followed by `</s>`.
#[test]
fn orca_mask_covers_exactly_the_response() {
    let tok = byte_tok();
    let rows = orca_rows();
    let d = load_dataset(&orca_jsonl(), &tok, &orca_spec(1)).expect("dataset");
    assert_eq!(d.format, DataFormat::Orca);
    assert_eq!(d.examples, rows.len());
    assert_eq!(d.heldout.len(), 2);
    assert_eq!(d.train.len(), rows.len() - 2);
    assert_eq!(d.pad_id, tok.token_id("</s>").expect("eos"));
    let mut seen = vec![false; rows.len()];
    for s in all(&d) {
        assert_eq!(s.mask.len(), s.ids.len() - 1);
        let p = s.mask.iter().position(|&m| m).expect("some loss position") + 1;
        assert!(s.mask[p - 1..].iter().all(|&m| m), "mask is not one block");
        let prompt = tok.decode(&s.ids[..p], true).expect("decode");
        let k = rows
            .iter()
            .position(|(sys, q, _)| format_prompt(sys, q) == prompt)
            .unwrap_or_else(|| panic!("no row has the prompt {prompt:?}"));
        assert!(!seen[k], "row {k} appears twice");
        seen[k] = true;
        let targets: Vec<i64> = s.ids[1..]
            .iter()
            .zip(&s.mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        assert_eq!(
            tok.decode(&targets, true).expect("decode"),
            format!("{}</s>", rows[k].2)
        );
        if rows[k].0.is_empty() {
            assert!(prompt.starts_with("### User:\n"));
        }
    }
    assert!(seen.iter().all(|&x| x));
}

#[test]
fn orca_without_eos_appends_nothing_and_pads_with_zero() {
    let tok = byte_tok();
    let mut s = orca_spec(1);
    s.eos_token = None;
    let d = load_dataset(&orca_jsonl(), &tok, &s).expect("dataset");
    assert_eq!(d.pad_id, 0);
    let with = load_dataset(&orca_jsonl(), &tok, &orca_spec(1)).expect("dataset");
    for (a, b) in all(&d).into_iter().zip(all(&with)) {
        assert_eq!(&a.ids[..], &b.ids[..b.ids.len() - 1]);
        assert_eq!(&a.mask[..], &b.mask[..b.mask.len() - 1]);
    }
}

#[test]
fn orca_truncates_long_responses_to_the_context() {
    let tok = byte_tok();
    let rows = orca_rows();
    let longest_prompt = rows
        .iter()
        .map(|(s, q, _)| tok.encode(&format_prompt(s, q)).expect("encode").len())
        .max()
        .expect("rows");
    let context = longest_prompt + 3;
    let d = load_dataset(
        &orca_jsonl(),
        &tok,
        &spec(DataFormat::Orca, context, 0.25, 1),
    )
    .expect("dataset");
    let mut truncated = 0;
    for s in all(&d) {
        assert!(s.ids.len() <= context + 1);
        let p = s.mask.iter().position(|&m| m).expect("loss position") + 1;
        let prompt = tok.decode(&s.ids[..p], true).expect("decode");
        let (_, _, response) = rows
            .iter()
            .find(|(sys, q, _)| format_prompt(sys, q) == prompt)
            .expect("row");
        let mut full = tok.encode(response).expect("encode");
        full.push(d.pad_id);
        assert_eq!(&s.ids[p..], &full[..s.ids.len() - p]);
        if s.ids.len() - p < full.len() {
            truncated += 1;
            assert_eq!(s.ids.len(), context + 1);
        }
    }
    assert!(truncated > 0, "no response was truncated");
}

#[test]
fn orca_shuffle_is_deterministic_by_seed() {
    let tok = byte_tok();
    let a = load_dataset(&orca_jsonl(), &tok, &orca_spec(5)).expect("dataset");
    let b = load_dataset(&orca_jsonl(), &tok, &orca_spec(5)).expect("dataset");
    let c = load_dataset(&orca_jsonl(), &tok, &orca_spec(6)).expect("dataset");
    assert_eq!(a.train, b.train);
    assert_eq!(a.heldout, b.heldout);
    assert_ne!(a.train, c.train);
    let mut x: Vec<Vec<i64>> = all(&a).iter().map(|s| s.ids.clone()).collect();
    let mut y: Vec<Vec<i64>> = all(&c).iter().map(|s| s.ids.clone()).collect();
    x.sort();
    y.sort();
    assert_eq!(x, y, "another seed must reorder the same rows");
}

#[test]
fn orca_max_examples_takes_the_first_rows() {
    let tok = byte_tok();
    let rows = orca_rows();
    let mut s = orca_spec(1);
    s.max_examples = Some(3);
    let d = load_dataset(&orca_jsonl(), &tok, &s).expect("dataset");
    assert_eq!(d.examples, 3);
    assert_eq!(d.heldout.len(), 1);
    for q in all(&d) {
        let p = q.mask.iter().position(|&m| m).expect("loss position") + 1;
        let prompt = tok.decode(&q.ids[..p], true).expect("decode");
        assert!(rows[..3]
            .iter()
            .any(|(sys, qq, _)| format_prompt(sys, qq) == prompt));
    }
}

// ---------------------------------------------------------------------------------------
// Parquet

enum Col {
    Str(&'static str, Vec<Option<String>>),
    I64(&'static str, Vec<i64>),
}

/// Writes columns (all optional, strings as UTF8) to a Parquet file, `group` rows per row
/// group.
fn write_parquet(path: &Path, cols: &[Col], compression: Compression, group: usize) {
    let fields: Vec<String> = cols
        .iter()
        .map(|c| match c {
            Col::Str(n, _) => format!("optional binary {n} (UTF8);"),
            Col::I64(n, _) => format!("required int64 {n};"),
        })
        .collect();
    let schema = Arc::new(
        parse_message_type(&format!("message schema {{ {} }}", fields.join(" "))).expect("schema"),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let file = std::fs::File::create(path).expect("create");
    let mut w = SerializedFileWriter::new(file, schema, props).expect("writer");
    let n = match &cols[0] {
        Col::Str(_, v) => v.len(),
        Col::I64(_, v) => v.len(),
    };
    let mut start = 0;
    while start < n || (n == 0 && start == 0) {
        let end = (start + group).min(n);
        let mut rg = w.next_row_group().expect("row group");
        let mut k = 0;
        while let Some(mut col) = rg.next_column().expect("column") {
            match &cols[k] {
                Col::Str(_, v) => {
                    let part = &v[start..end];
                    let vals: Vec<ByteArray> = part
                        .iter()
                        .flatten()
                        .map(|s| ByteArray::from(s.as_str()))
                        .collect();
                    let defs: Vec<i16> = part.iter().map(|s| i16::from(s.is_some())).collect();
                    col.typed::<ByteArrayType>()
                        .write_batch(&vals, Some(&defs), None)
                        .expect("write");
                }
                Col::I64(_, v) => {
                    col.typed::<Int64Type>()
                        .write_batch(&v[start..end], None, None)
                        .expect("write");
                }
            }
            col.close().expect("close column");
            k += 1;
        }
        rg.close().expect("close row group");
        if n == 0 {
            break;
        }
        start = end;
    }
    w.close().expect("close file");
}

fn orca_cols(rows: &[(String, String, String)]) -> Vec<Col> {
    let get = |f: fn(&(String, String, String)) -> &String| -> Vec<Option<String>> {
        rows.iter().map(|r| Some(f(r).clone())).collect()
    };
    vec![
        Col::Str(
            "id",
            (0..rows.len()).map(|i| Some(format!("niv.{i}"))).collect(),
        ),
        Col::Str("system_prompt", get(|r| &r.0)),
        Col::Str("question", get(|r| &r.1)),
        Col::Str("response", get(|r| &r.2)),
    ]
}

#[test]
fn parquet_gives_the_same_sequences_as_jsonl() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let json = load_dataset(&orca_jsonl(), &tok, &orca_spec(3)).expect("jsonl");
    for (i, c) in [
        Compression::UNCOMPRESSED,
        Compression::SNAPPY,
        Compression::GZIP(GzipLevel::default()),
        Compression::ZSTD(ZstdLevel::default()),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("orca{i}.parquet"));
        // Three rows per row group: rows run on across groups.
        write_parquet(&path, &orca_cols(&orca_rows()), c, 3);
        let pq = load_dataset(&path, &tok, &orca_spec(3)).expect("parquet");
        assert_eq!(pq.format, DataFormat::Orca);
        assert_eq!(pq.examples, json.examples, "{c:?}");
        assert_eq!(pq.train, json.train, "{c:?}");
        assert_eq!(pq.heldout, json.heldout, "{c:?}");
        // The PAR1 magic is recognised whatever the extension under --format orca.
        let other = dir.path().join(format!("orca{i}.bin"));
        std::fs::copy(&path, &other).expect("copy");
        let d = load_dataset(&other, &tok, &spec(DataFormat::Orca, 512, 0.25, 3)).expect("bin");
        assert_eq!(d.train, json.train);
    }
}

#[test]
fn json_array_gives_the_same_sequences_as_jsonl() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("orca.json");
    let values: Vec<serde_json::Value> = std::fs::read_to_string(orca_jsonl())
        .expect("fixture")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&values).expect("serialize"),
    )
    .expect("write");
    let a = load_dataset(&path, &tok, &orca_spec(2)).expect("json array");
    let b = load_dataset(&orca_jsonl(), &tok, &orca_spec(2)).expect("jsonl");
    assert_eq!(a.train, b.train);
    assert_eq!(a.heldout, b.heldout);
}

#[test]
fn parquet_bad_input_is_named() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = orca_rows();
    let load = |p: &Path| load_dataset(p, &tok, &orca_spec(1));

    // A missing column.
    let p = dir.path().join("nocol.parquet");
    let mut cols = orca_cols(&rows);
    cols.pop();
    write_parquet(&p, &cols, Compression::SNAPPY, 100);
    assert_mentions(
        &invalid(load(&p)),
        &["nocol.parquet", "row 1", "`response`", "missing"],
    );

    // A null value in the fifth row (second row group).
    let p = dir.path().join("null.parquet");
    let mut cols = orca_cols(&rows);
    if let Col::Str(_, v) = &mut cols[2] {
        v[4] = None;
    }
    write_parquet(&p, &cols, Compression::SNAPPY, 3);
    assert_mentions(
        &invalid(load(&p)),
        &["null.parquet", "row 5", "`question`", "not a string"],
    );

    // A column that is not a string.
    let p = dir.path().join("int.parquet");
    let mut cols = orca_cols(&rows);
    cols[3] = Col::I64("response", (0..rows.len() as i64).collect());
    write_parquet(&p, &cols, Compression::SNAPPY, 100);
    assert_mentions(
        &invalid(load(&p)),
        &["int.parquet", "`response`", "not a string", "INT64"],
    );

    // No rows.
    let p = dir.path().join("empty.parquet");
    write_parquet(&p, &orca_cols(&[]), Compression::SNAPPY, 100);
    assert_mentions(&invalid(load(&p)), &["empty.parquet", "no rows"]);

    // Not Parquet, and a Parquet file cut short.
    let p = dir.path().join("garbage.parquet");
    std::fs::write(&p, b"this is not parquet at all").expect("write");
    assert_mentions(
        &invalid(load(&p)),
        &["garbage.parquet", "not a readable Parquet file"],
    );
    let good = dir.path().join("good.parquet");
    write_parquet(&good, &orca_cols(&rows), Compression::SNAPPY, 3);
    let bytes = std::fs::read(&good).expect("read");
    let p = dir.path().join("cut.parquet");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).expect("write");
    assert_mentions(&invalid(load(&p)), &["cut.parquet", "Parquet"]);
    let p = dir.path().join("zero.parquet");
    std::fs::write(&p, b"").expect("write");
    assert_mentions(&invalid(load(&p)), &["zero.parquet", "Parquet"]);
}

/// Damaged bytes anywhere in a Parquet file give an error or a dataset, never a panic.
#[test]
fn damaged_parquet_never_panics() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.parquet");
    write_parquet(&good, &orca_cols(&orca_rows()), Compression::SNAPPY, 3);
    let bytes = std::fs::read(&good).expect("read");
    let p = dir.path().join("damaged.parquet");
    let mut errors = std::collections::BTreeSet::new();
    for i in (4..bytes.len() - 4).step_by(3) {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        std::fs::write(&p, &b).expect("write");
        match load_dataset(&p, &tok, &orca_spec(1)) {
            Ok(_) => {}
            Err(TrainError::Invalid(m)) => {
                assert!(!m.contains('\n') && m.contains("damaged.parquet"), "{m}");
                errors.insert(m);
            }
            Err(e) => panic!("byte {i}: unexpected error {e:?}"),
        }
    }
    assert!(errors.len() > 1, "{errors:?}");
    for m in errors.iter().filter(|m| m.contains(": row ")).take(12) {
        eprintln!("{m}");
    }
}

// ---------------------------------------------------------------------------------------
// Bad input: JSON Lines, text, spec

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

const GOOD: &str = r#"{"system_prompt": "", "question": "Q?", "response": "A."}"#;

#[test]
fn jsonl_bad_rows_are_named() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let load = |p: &Path| load_dataset(p, &tok, &orca_spec(1));

    let p = write(
        d,
        "missing.jsonl",
        &format!("{GOOD}\n{GOOD}\n{{\"system_prompt\": \"\", \"response\": \"A\"}}\n"),
    );
    assert_mentions(
        &invalid(load(&p)),
        &["missing.jsonl", "row 3", "`question`", "missing"],
    );

    // Blank lines do not count as rows; the line is named too.
    let p = write(
        d,
        "blank.jsonl",
        &format!("{GOOD}\n\n{{\"system_prompt\": \"\", \"question\": \"Q\"}}\n"),
    );
    assert_mentions(
        &invalid(load(&p)),
        &["blank.jsonl", "row 2 (line 3)", "`response`"],
    );

    let p = write(
        d,
        "number.jsonl",
        &format!("{GOOD}\n{{\"system_prompt\": \"\", \"question\": \"Q\", \"response\": 42}}\n"),
    );
    assert_mentions(
        &invalid(load(&p)),
        &[
            "number.jsonl",
            "row 2",
            "`response`",
            "not a string",
            "number",
        ],
    );

    let p = write(
        d,
        "null.jsonl",
        &format!("{{\"system_prompt\": null, \"question\": \"Q\", \"response\": \"A\"}}\n{GOOD}\n"),
    );
    assert_mentions(
        &invalid(load(&p)),
        &[
            "null.jsonl",
            "row 1",
            "`system_prompt`",
            "not a string",
            "null",
        ],
    );

    let p = write(
        d,
        "malformed.jsonl",
        &format!("{GOOD}\n{GOOD}\n{GOOD}\n{{\"question\": \"Q\",\n"),
    );
    assert_mentions(
        &invalid(load(&p)),
        &["malformed.jsonl", "line 4", "malformed JSON"],
    );

    let p = write(d, "scalar.jsonl", &format!("{GOOD}\n\"just a string\"\n"));
    assert_mentions(
        &invalid(load(&p)),
        &["scalar.jsonl", "row 2", "JSON object"],
    );

    let p = write(
        d,
        "noresponse.jsonl",
        &format!(
            "{GOOD}\n{{\"system_prompt\": \"\", \"question\": \"Q\", \"response\": \"  \"}}\n"
        ),
    );
    assert_mentions(
        &invalid(load(&p)),
        &["noresponse.jsonl", "row 2", "`response`", "empty"],
    );

    let p = d.join("latin1.jsonl");
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"{\"system_prompt\": \"caf\xe9\"}\n");
    std::fs::write(&p, bytes).expect("write");
    assert_mentions(&invalid(load(&p)), &["latin1.jsonl", "line 2", "UTF-8"]);

    let p = write(
        d,
        "array.json",
        "[{\"system_prompt\": \"\", \"question\": \"Q\"}]",
    );
    assert_mentions(&invalid(load(&p)), &["array.json", "row 1", "`response`"]);
}

#[test]
fn empty_and_tiny_datasets_are_errors() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let load = |p: &Path| load_dataset(p, &tok, &orca_spec(1));
    let p = write(d, "empty.jsonl", "");
    assert_mentions(&invalid(load(&p)), &["empty.jsonl", "no rows"]);
    let p = write(d, "blank.jsonl", "\n  \n\n");
    assert_mentions(&invalid(load(&p)), &["blank.jsonl", "no rows"]);
    let p = write(d, "one.jsonl", &format!("{GOOD}\n"));
    assert_mentions(
        &invalid(load(&p)),
        &["one.jsonl", "1 row", "need at least 2"],
    );
    let p = write(d, "empty.txt", " \n");
    assert_mentions(&invalid(load(&p)), &["empty.txt", "empty"]);
    let p = write(d, "short.txt", "a short text");
    assert_mentions(
        &invalid(load_dataset(&p, &tok, &spec(DataFormat::Auto, 8, 0.1, 0))),
        &[
            "short.txt",
            "1 window(s) of 9 tokens",
            "need at least 2",
            "--context",
        ],
    );
}

#[test]
fn a_context_shorter_than_the_prompt_is_named() {
    let tok = byte_tok();
    let rows = orca_rows();
    let p = tok
        .encode(&format_prompt(&rows[0].0, &rows[0].1))
        .expect("encode")
        .len();
    for context in [10, p] {
        let msg = invalid(load_dataset(
            &orca_jsonl(),
            &tok,
            &spec(DataFormat::Orca, context, 0.25, 1),
        ));
        assert_mentions(
            &msg,
            &[
                "orca.jsonl",
                "row 1",
                &format!("prompt is {p} tokens"),
                &format!("context of {context} tokens"),
                "larger --context",
            ],
        );
    }
    // One token more than the longest prompt leaves room for two response targets (a
    // sequence holds context + 1 ids).
    let longest = rows[..2]
        .iter()
        .map(|(a, b, _)| tok.encode(&format_prompt(a, b)).expect("encode").len())
        .max()
        .expect("rows");
    let mut s = spec(DataFormat::Orca, longest + 1, 0.25, 1);
    s.max_examples = Some(2);
    let d = load_dataset(&orca_jsonl(), &tok, &s).expect("dataset");
    let targets: Vec<usize> = all(&d)
        .iter()
        .map(|q| q.mask.iter().filter(|&&m| m).count())
        .collect();
    assert!(targets.iter().all(|&n| n >= 1), "{targets:?}");
    assert!(targets.contains(&2), "{targets:?}");
}

#[test]
fn bad_files_and_specs_are_errors() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "rows.csv", "a,b\n");
    assert_mentions(
        &invalid(load_dataset(&p, &tok, &orca_spec(1))),
        &["rows.csv", "\".csv\"", "unknown", "--format"],
    );
    let p = write(dir.path(), "README", "text");
    assert_mentions(
        &invalid(load_dataset(&p, &tok, &orca_spec(1))),
        &["README", "(none)"],
    );
    match load_dataset(&dir.path().join("absent.jsonl"), &tok, &orca_spec(1)) {
        Err(e @ TrainError::Io { .. }) => assert!(e.to_string().contains("absent.jsonl")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let mut s = orca_spec(1);
    s.eos_token = Some("<|nonexistent|>".into());
    assert_mentions(
        &invalid(load_dataset(&orca_jsonl(), &tok, &s)),
        &["<|nonexistent|>", "EOS"],
    );
    for f in [1.0, -0.1, f64::NAN] {
        let s = spec(DataFormat::Auto, 512, f, 1);
        assert_mentions(
            &invalid(load_dataset(&orca_jsonl(), &tok, &s)),
            &["held-out"],
        );
    }
    let s = spec(DataFormat::Auto, 0, 0.1, 1);
    assert_mentions(
        &invalid(load_dataset(&orca_jsonl(), &tok, &s)),
        &["context 0"],
    );
    let mut s = orca_spec(1);
    s.max_examples = Some(0);
    assert_mentions(
        &invalid(load_dataset(&orca_jsonl(), &tok, &s)),
        &["max examples 0"],
    );
}

#[test]
fn spec_round_trips_through_json() {
    let s = orca_spec(9);
    let j = serde_json::to_string(&s).expect("serialize");
    assert!(j.contains("\"format\":\"auto\""), "{j}");
    let back: DataSpec = serde_json::from_str(&j).expect("deserialize");
    assert_eq!(back, s);
    let old: DataSpec =
        serde_json::from_str(r#"{"format":"text","context":8,"heldout_fraction":0.1,"seed":1}"#)
            .expect("without optional fields");
    assert_eq!(old.max_examples, None);
    assert_eq!(old.eos_token, None);
}

// ---------------------------------------------------------------------------------------
// Batching

#[test]
fn collate_pads_to_the_longest_and_masks_padding() {
    let a = Sequence {
        ids: vec![1, 2, 3, 4, 5],
        mask: vec![false, false, true, true],
    };
    let b = Sequence {
        ids: vec![6, 7, 8],
        mask: vec![true, true],
    };
    let c = Sequence {
        ids: vec![9, 10, 11, 12],
        mask: vec![false, true, false],
    };
    let (ids, mask) = collate(&[&a, &b, &c], 99, Device::Cpu);
    assert_eq!(ids.size(), vec![3, 5]);
    assert_eq!(mask.size(), vec![3, 4]);
    assert_eq!(ids.kind(), Kind::Int64);
    assert_eq!(mask.kind(), Kind::Float);
    let ids: Vec<i64> = Vec::try_from(ids.flatten(0, 1)).expect("ids");
    let mask: Vec<f32> = Vec::try_from(mask.flatten(0, 1)).expect("mask");
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 6, 7, 8, 99, 99, 9, 10, 11, 12, 99]);
    assert_eq!(mask, vec![0., 0., 1., 1., 1., 1., 0., 0., 0., 1., 0., 0.]);

    let (ids, mask) = collate(&[&b], 0, Device::Cpu);
    assert_eq!(ids.size(), vec![1, 3]);
    assert_eq!(mask.size(), vec![1, 2]);
    let (ids, mask) = collate(&[], 0, Device::Cpu);
    assert_eq!(ids.size(), vec![0, 1]);
    assert_eq!(mask.size(), vec![0, 0]);
}

#[test]
fn collate_of_loaded_orca_batches() {
    let tok = byte_tok();
    let d = load_dataset(&orca_jsonl(), &tok, &orca_spec(1)).expect("dataset");
    let refs: Vec<&Sequence> = d.train.iter().collect();
    let (ids, mask) = collate(&refs, d.pad_id, Device::Cpu);
    let longest = refs.iter().map(|s| s.ids.len()).max().expect("rows") as i64;
    assert_eq!(ids.size(), vec![refs.len() as i64, longest]);
    let total: f64 = mask.sum(Kind::Double).double_value(&[]);
    let want: usize = refs
        .iter()
        .map(|s| s.mask.iter().filter(|&&m| m).count())
        .sum();
    assert_eq!(total as usize, want);
}

// ---------------------------------------------------------------------------------------
// Hostile files: only regular files of bounded size, byte-order marks, checks without a
// tokenizer.

#[test]
fn byte_order_marks_are_dropped_from_text_and_rows() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let plain = write(d, "plain.jsonl", &format!("{GOOD}\n{GOOD}\n{GOOD}\n"));
    let bom = write(
        d,
        "bom.jsonl",
        &format!("\u{feff}{GOOD}\n{GOOD}\n\u{feff}{GOOD}\n"),
    );
    let a = load_dataset(&plain, &tok, &orca_spec(1)).expect("plain");
    let b = load_dataset(&bom, &tok, &orca_spec(1)).expect("a BOM is not malformed JSON");
    assert_eq!(all(&a), all(&b));
    let arr = write(d, "bom.json", &format!("\u{feff}[{GOOD}, {GOOD}]"));
    assert_eq!(
        load_dataset(&arr, &tok, &orca_spec(1))
            .expect("array")
            .examples,
        2
    );
    let t = write(d, "plain.txt", TEXT);
    let tb = write(d, "bom.txt", &format!("\u{feff}{TEXT}"));
    let s = spec(DataFormat::Auto, 12, 0.2, 0);
    let x = load_dataset(&t, &tok, &s).expect("text");
    let y = load_dataset(&tb, &tok, &s).expect("text with a BOM");
    assert_eq!(all(&x), all(&y));
}

#[test]
fn devices_fifos_and_directories_are_refused_by_name() {
    let tok = byte_tok();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fifo = d.join("fifo.jsonl");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    let folder = d.join("folder.txt");
    std::fs::create_dir(&folder).expect("mkdir");
    for (path, format, want) in [
        (fifo.clone(), DataFormat::Auto, "regular file"),
        (folder.clone(), DataFormat::Auto, "directory"),
        (PathBuf::from("/dev/zero"), DataFormat::Text, "regular file"),
        (PathBuf::from("/dev/zero"), DataFormat::Orca, "regular file"),
    ] {
        let shown = path.display().to_string();
        let msg = invalid(load_dataset(&path, &tok, &spec(format, 12, 0.2, 0)));
        assert_mentions(&msg, &[&shown, want]);
        let msg = rankstab_train::data::check_data_file(&path, format, None)
            .expect_err("refused")
            .to_string();
        assert_mentions(&msg, &[&shown, want]);
    }
    let empty = write(d, "e.txt", "");
    assert_mentions(
        &invalid(load_dataset(
            &empty,
            &tok,
            &spec(DataFormat::Auto, 12, 0.2, 0),
        )),
        &["e.txt", "empty", "0 bytes"],
    );
    let latin = d.join("l.txt");
    std::fs::write(&latin, b"ab\xffcd").expect("write");
    assert_mentions(
        &invalid(load_dataset(
            &latin,
            &tok,
            &spec(DataFormat::Auto, 12, 0.2, 0),
        )),
        &["l.txt", "UTF-8", "offset 2"],
    );
}

#[test]
fn data_files_are_checked_without_a_tokenizer() {
    use rankstab_train::data::check_data_file;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let rows = write(d, "r.jsonl", &format!("{GOOD}\n\n{GOOD}\n{GOOD}\n"));
    assert_eq!(
        check_data_file(&rows, DataFormat::Auto, None).expect("rows"),
        (DataFormat::Orca, 3)
    );
    assert_eq!(
        check_data_file(&rows, DataFormat::Auto, Some(2))
            .expect("two rows")
            .1,
        2
    );
    let t = write(d, "t.txt", TEXT);
    assert_eq!(
        check_data_file(&t, DataFormat::Auto, None).expect("text").0,
        DataFormat::Text
    );
    for (name, text, want) in [
        ("empty.jsonl", String::new(), "no rows"),
        ("blank.jsonl", "\n \n".to_string(), "no rows"),
        ("one.jsonl", format!("{GOOD}\n"), "need at least 2"),
        (
            "bad.jsonl",
            format!("{GOOD}\n{{\"question\": 1}}\n"),
            "row 2",
        ),
        ("broken.jsonl", format!("{GOOD}\n{{\n"), "line 2"),
        ("blank.txt", " \n ".to_string(), "empty"),
        ("x.csv", "a,b".to_string(), "\".csv\""),
    ] {
        let p = write(d, name, &text);
        let msg = check_data_file(&p, DataFormat::Auto, None)
            .expect_err(name)
            .to_string();
        assert_mentions(&msg, &[name, want]);
    }
    let msg = check_data_file(&d.join("absent.txt"), DataFormat::Auto, None)
        .expect_err("absent")
        .to_string();
    assert_mentions(&msg, &["absent.txt"]);
}
