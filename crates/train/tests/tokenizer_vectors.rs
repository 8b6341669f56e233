//! Tokenizers against llama.cpp's vocabulary test vectors (`ggml-vocab-*.gguf.inp/.out`
//! from llama.cpp's models/ folder, committed under tests/fixtures/llama-cpp-vocab): the
//! SentencePiece-style Llama vocabulary and GPT-2's byte-level BPE, each built from GGUF
//! metadata, and the same vocabularies as Hugging Face files (Llama 2's tokenizer.json,
//! GPT-2's vocab.json + merges.txt). The vocabularies themselves are fetched into assets/
//! by `scripts/fetch-assets.sh`; each test skips, saying so, when its file is absent.
use rankstab_train::gguf::{tokenizer_json, GgufFile};
use rankstab_train::text::TextTokenizer;
use std::path::{Path, PathBuf};

fn assets() -> PathBuf {
    std::env::var_os("RANKSTAB_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
}

fn present(p: &Path) -> bool {
    if !p.exists() {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-assets.sh to fetch it",
            p.display()
        );
    }
    p.exists()
}

/// (text, expected ids) pairs of llama.cpp's test-tokenizer-0 files.
fn vectors(name: &str) -> Vec<(String, Vec<i64>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-cpp-vocab");
    let inp = std::fs::read_to_string(dir.join(format!("{name}.inp"))).expect("inp");
    let out = std::fs::read_to_string(dir.join(format!("{name}.out"))).expect("out");
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<i64>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("id"))
                .collect()
        })
        .collect();
    // The file ends with a separator, so the split leaves one empty tail.
    assert_eq!(
        texts.len(),
        ids.len() + 1,
        "{name}: inputs and outputs pair up"
    );
    texts
        .into_iter()
        .zip(ids)
        .map(|(t, i)| (t.to_string(), i))
        .collect()
}

fn check(tok: &TextTokenizer, name: &str) {
    let cases = vectors(name);
    assert!(cases.len() > 40);
    let mut failed = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text).expect("encode");
        if &got != want {
            failed.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{name}: {} of {} differ:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
    eprintln!("{name}: all {} test strings match llama.cpp", cases.len());
}

fn from_gguf(path: &Path) -> TextTokenizer {
    let file = GgufFile::open(path).expect("opens");
    let json = tokenizer_json(&file).expect("tokenizer json");
    TextTokenizer::from_json(&json.to_string(), path).expect("tokenizer")
}

#[test]
fn llama_spm_vocab_from_gguf_matches_llama_cpp() {
    let p = assets().join("llama-cpp-vocab/ggml-vocab-llama-spm.gguf");
    if present(&p) {
        check(&from_gguf(&p), "ggml-vocab-llama-spm.gguf");
    }
}

#[test]
fn gpt2_vocab_from_gguf_matches_llama_cpp() {
    let p = assets().join("llama-cpp-vocab/ggml-vocab-gpt-2.gguf");
    if present(&p) {
        check(&from_gguf(&p), "ggml-vocab-gpt-2.gguf");
    }
}

#[test]
fn llama2_tokenizer_json_matches_llama_cpp() {
    let p = assets().join("llama2-tokenizer/tokenizer.json");
    if present(&p) {
        check(
            &TextTokenizer::from_file(&p).expect("tokenizer.json"),
            "ggml-vocab-llama-spm.gguf",
        );
    }
}

#[test]
fn gpt2_vocab_and_merges_match_llama_cpp() {
    let dir = assets().join("gpt2-tokenizer");
    if present(&dir.join("vocab.json")) {
        let tok = rankstab_train::load::tokenizer_from_vocab_merges(
            &dir.join("vocab.json"),
            &dir.join("merges.txt"),
        )
        .expect("bpe files");
        check(&tok, "ggml-vocab-gpt-2.gguf");
    }
}
