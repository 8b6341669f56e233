//! The GGUF reader: every supported quantization against gguf-py's reference dequantizer
//! (fixture written by `scripts/make_fixtures.py`), metadata of every value type, a tiny
//! Llama converted to GGUF the way llama.cpp does (q/k rows permuted) that must give
//! transformers' logits again, and bad files: one clear error each, never a panic.
#[path = "common/gguf_writer.rs"]
mod gguf_writer;
use gguf_writer::{tiny_llama_gguf, Writer};
use rankstab_train::gguf::{GgufFile, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn every_quantization_matches_gguf_py() {
    let dir = fixtures().join("quants");
    let file = GgufFile::open(&dir.join("quants.gguf")).expect("opens");
    let expected = Tensor::read_safetensors(dir.join("expected.safetensors")).expect("expected");
    assert_eq!(expected.len(), 10);
    for (name, want) in &expected {
        let info = file
            .info(name)
            .unwrap_or_else(|| panic!("{name} in the GGUF"));
        let got = file.read_f32(info).expect("dequantizes");
        assert_eq!(got.size(), want.size(), "{name}");
        let d = (&got - want).abs().max().double_value(&[]);
        assert!(
            d <= 1e-6 * (1.0 + want.abs().max().double_value(&[])),
            "{name}: max |difference| {d}"
        );
        assert!(
            want.abs().max().double_value(&[]) > 0.01,
            "{name}: fixture is degenerate"
        );
    }
}

#[test]
fn metadata_of_every_type_is_read() {
    let file = GgufFile::open(&fixtures().join("quants/quants.gguf")).expect("opens");
    assert_eq!(file.version, 3);
    let g = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    assert_eq!(g("test.u8"), Value::U8(200));
    assert_eq!(g("test.i8"), Value::I8(-5));
    assert_eq!(g("test.u16"), Value::U16(60000));
    assert_eq!(g("test.i16"), Value::I16(-30000));
    assert_eq!(g("test.u32"), Value::U32(4_000_000_000));
    assert_eq!(g("test.i32"), Value::I32(-2_000_000_000));
    assert_eq!(g("test.f32"), Value::F32(0.25));
    assert_eq!(g("test.bool"), Value::Bool(true));
    assert_eq!(g("test.str"), Value::String("grüß".into()));
    assert_eq!(g("test.u64"), Value::U64(1 << 40));
    assert_eq!(g("test.i64"), Value::I64(-(1 << 40)));
    assert_eq!(g("test.f64"), Value::F64(-1.5));
    assert_eq!(
        g("test.arr"),
        Value::Array(vec![Value::String("a".into()), Value::String("bc".into())])
    );
    assert_eq!(g("general.architecture").as_str(), Some("llama"));
}

#[test]
fn tiny_llama_through_gguf_gives_transformers_logits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_llama_gguf(&fixtures(), 97).write(tmp.path(), "tiny.gguf");
    let model = rankstab_train::gguf::load_llama(&path, Kind::Float, Device::Cpu).expect("loads");
    assert_eq!((model.config.num_heads, model.config.num_kv_heads), (6, 2));
    assert!(model.config.tie_word_embeddings);
    let r = Tensor::read_safetensors(fixtures().join("tiny-llama/reference.safetensors"))
        .expect("reference");
    let get = |n: &str| {
        r.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.shallow_clone())
            .expect("tensor")
    };
    let got = tch::no_grad(|| model.forward(&get("input_ids"), false));
    let d = (&got - get("logits")).abs().max().double_value(&[]);
    eprintln!("tiny Llama via GGUF: max |logit difference| {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

fn err_of(path: &Path) -> String {
    let e = rankstab_train::load::load(path, Kind::Float, Device::Cpu)
        .expect_err("must fail")
        .to_string();
    assert!(!e.is_empty() && !e.contains('\n'), "one line: {e:?}");
    e
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_llama_gguf(&fixtures(), 120).write(tmp.path(), "tiny.gguf");
    let e = err_of(&path);
    assert!(e.contains("does not fit") && e.contains("97"), "{e}");
}

#[test]
fn truncated_gguf_names_the_tensor() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bytes = std::fs::read(fixtures().join("quants/quants.gguf")).expect("read");
    let p = tmp.path().join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).expect("write");
    let e = GgufFile::open(&p).expect_err("truncated").to_string();
    assert!(
        e.contains("truncated") && e.contains("t.q6_k") && e.contains("cut.gguf"),
        "{e}"
    );
    // Cut inside the metadata.
    std::fs::write(&p, &bytes[..200]).expect("write");
    let e = GgufFile::open(&p).expect_err("truncated").to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn unsupported_quantization_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut w = Writer::default();
    w.str("general.architecture", "llama")
        .tensor("blk.0.attn_q.weight", &[256, 1], 10, &[0u8; 84]);
    let p = w.write(tmp.path(), "q2k.gguf");
    let e = GgufFile::open(&p).expect_err("unsupported").to_string();
    assert!(
        e.contains("Q2_K") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
}

#[test]
fn corrupt_headers_are_errors_not_panics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let p = tmp.path().join("x.gguf");
    // Not GGUF at all.
    std::fs::write(&p, b"GGML0000").expect("write");
    assert!(GgufFile::open(&p)
        .expect_err("magic")
        .to_string()
        .contains("not a GGUF"));
    // Unknown version.
    let mut b = Writer::default().bytes();
    b[4] = 9;
    std::fs::write(&p, &b).expect("write");
    assert!(GgufFile::open(&p)
        .expect_err("version")
        .to_string()
        .contains("version 9"));
    // A string length far beyond the file: no giant allocation, an error.
    let mut w = Writer::default();
    w.str("k", "v");
    let mut b = w.bytes();
    let at = 24 + 8 + 1 + 4; // header, key length, key, type: the value's length
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).expect("write");
    assert!(GgufFile::open(&p)
        .expect_err("length")
        .to_string()
        .contains("truncated or corrupt"));
    // Dimensions whose product overflows: an error, not an overflow panic.
    let mut w = Writer::default();
    w.tensor("big", &[1 << 62, 1 << 62], 0, &[0u8; 4]);
    let p3 = w.write(tmp.path(), "big.gguf");
    let e = GgufFile::open(&p3).expect_err("overflow").to_string();
    assert!(e.contains("big"), "{e}");
    // Another architecture.
    let mut w = Writer::default();
    w.str("general.architecture", "falcon");
    let p2 = w.write(tmp.path(), "falcon.gguf");
    let e = err_of(&p2);
    assert!(e.contains("falcon"), "{e}");
}

#[test]
fn pickle_files_are_refused_with_advice() {
    let tmp = tempfile::tempdir().expect("tmp");
    let p = tmp.path().join("pytorch_model.bin");
    std::fs::write(&p, b"PK\x03\x04 not really a zip").expect("write");
    let e = err_of(&p);
    assert!(e.contains("pickle") && e.contains("save_pretrained"), "{e}");
}
