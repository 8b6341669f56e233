//! Bounded fuzzing of the parsers of untrusted model files: proptest mutates the bytes
//! (and, for JSON, the values) of committed fixtures and of small GGUF files written by the
//! test writer, and every mutated input must give `Ok` or an `Err`: no panic, no abort, and
//! no single allocation larger than a small multiple of the file (a count or length read
//! from the file must never size an allocation by itself).
//!
//! Targets and cases (a fixed number each, so the whole file runs in well under a minute in
//! a debug build): the GGUF reader (header, metadata, tensor directory, llama config,
//! tokenizer, dequantisation), the safetensors reader (header and data ranges), tokenizer.json
//! loading, and config.json parsing (Llama and GPT-J).
#![allow(unsafe_code)] // the allocation-size tracker below is a GlobalAlloc
#[path = "common/gguf_writer.rs"]
mod gguf_writer;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rankstab_train::gguf::GgufFile;
use rankstab_train::weights::{parse_safetensors_header, read_safetensors, ConfigJson};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

/// The system allocator, recording the largest single allocation of each thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|m| {
        if size > m.get() {
            m.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches a const-initialised thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|m| m.set(0));
    f();
    LARGEST.with(Cell::get)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One mutation of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite one byte.
    Byte(usize, u8),
    /// Overwrite 8 bytes with an interesting little-endian integer (a length or count).
    Word(usize, u64),
    /// Cut the file at a fraction of its length (per mille).
    Truncate(u16),
    /// Flip one bit.
    Flip(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let words = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1 << 32),
        Just(1 << 40),
        Just(1_000_000_000_000),
        Just(0xffff_ffff),
        any::<u64>(),
    ];
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        3 => (any::<usize>(), words).prop_map(|(i, w)| Mutation::Word(i, w)),
        1 => (0u16..1000).prop_map(Mutation::Truncate),
        2 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
    ]
}

/// Applies mutations; positions are taken modulo `focus` (the part worth mutating, e.g. a
/// header) or the length.
fn mutate(bytes: &[u8], muts: &[Mutation], focus: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in muts {
        if b.is_empty() {
            break;
        }
        let span = focus.min(b.len()).max(1);
        match *m {
            Mutation::Byte(i, v) => b[i % span] = v,
            Mutation::Flip(i, bit) => b[i % span] ^= 1 << bit,
            Mutation::Word(i, w) => {
                let at = (i % span).min(b.len().saturating_sub(8));
                let n = 8.min(b.len() - at);
                b[at..at + n].copy_from_slice(&w.to_le_bytes()[..n]);
            }
            Mutation::Truncate(pm) => {
                let keep = b.len() * usize::from(pm) / 1000;
                b.truncate(keep);
            }
        }
    }
    b
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// The whole model path of a GGUF file: header, config, tokenizer, tensors.
fn load_gguf(p: &Path) {
    if let Ok(f) = GgufFile::open(p) {
        if let Ok(c) = f.llama_config() {
            assert!(c.num_layers >= 1 && c.rms_norm_eps > 0.0 && c.rope_theta > 0.0);
            let _ = f.hf_tensors(&c);
        }
        if let Ok(j) = rankstab_train::gguf::tokenizer_json(&f) {
            let _ = rankstab_train::text::TextTokenizer::from_json(&j.to_string(), p);
        }
        for t in f.tensors.iter().take(4) {
            let _ = f.read_f32(t);
        }
    }
}

#[test]
fn gguf_reader_survives_mutations() {
    let tmp = tempfile::tempdir().expect("tmp");
    let seeds = [
        read(&fixtures().join("quants/quants.gguf")),
        gguf_writer::tiny_llama_gguf(&fixtures(), 97).bytes(),
    ];
    // The metadata and tensor directory come first: most mutations go there.
    let p = tmp.path().join("m.gguf");
    let mut r = runner(1500);
    r.run(
        &(
            0..seeds.len(),
            prop::collection::vec(mutation(), 1..6),
            any::<bool>(),
        ),
        |(s, muts, header_only)| {
            let focus = if header_only { 4096 } else { usize::MAX };
            let bytes = mutate(&seeds[s], &muts, focus);
            std::fs::write(&p, &bytes).expect("write");
            let most = largest_allocation(|| load_gguf(&p));
            // Dequantised f32 of the largest tensor (Q4: 6.4 x its bytes) is the largest
            // legitimate allocation.
            prop_assert!(
                most <= 8 * bytes.len() + (1 << 20),
                "a {} byte file made a {most} byte allocation",
                bytes.len()
            );
            Ok(())
        },
    )
    .expect("no input breaks the GGUF reader");
}

#[test]
fn safetensors_reader_survives_mutations() {
    let tmp = tempfile::tempdir().expect("tmp");
    let seeds: Vec<Vec<u8>> = [
        "tiny-llama/model.safetensors",
        "tiny-gptj/model.safetensors",
        "peft/tiny-llama-lora/adapter_model.safetensors",
    ]
    .iter()
    .map(|f| read(&fixtures().join(f)))
    .collect();
    let p = tmp.path().join("m.safetensors");
    let mut r = runner(1500);
    r.run(
        &(0..seeds.len(), prop::collection::vec(mutation(), 1..5)),
        |(s, muts)| {
            let seed = &seeds[s];
            let n = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")) as usize;
            // Mostly the length and the JSON header.
            let bytes = mutate(seed, &muts, 8 + n + 16);
            std::fs::write(&p, &bytes).expect("write");
            let most = largest_allocation(|| {
                if let Ok(ts) = read_safetensors(&p, 1 << 30) {
                    for (_, t) in ts {
                        assert!(t.numel() * t.kind().elt_size_in_bytes() <= bytes.len());
                    }
                }
            });
            prop_assert!(
                most <= 2 * bytes.len() + (1 << 20),
                "a {} byte file made a {most} byte allocation",
                bytes.len()
            );
            // The header parser alone, on a header claiming any data length.
            if bytes.len() > 8 {
                let end = (8 + n).min(bytes.len());
                let _ = parse_safetensors_header(&p, &bytes[8..end], (bytes.len() - end) as u64);
            }
            Ok(())
        },
    )
    .expect("no input breaks the safetensors reader");
}

/// A JSON value mutation: replace one scalar (chosen by its index in a walk) by another.
fn replacement() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        Just(json!(null)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e308)),
        Just(json!(1_000_000_000_000u64)),
        Just(json!(u64::MAX)),
        Just(json!("abc")),
        Just(json!([])),
        Just(json!({})),
        Just(json!(true)),
        Just(json!(0.5)),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(
            |f| serde_json::Number::from_f64(f).map_or(json!(0), serde_json::Value::Number)
        ),
    ]
}

fn replace_nth(v: &mut serde_json::Value, n: &mut usize, with: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => m.values_mut().any(|x| replace_nth(x, n, with)),
        serde_json::Value::Array(a) => a.iter_mut().any(|x| replace_nth(x, n, with)),
        _ => {
            if *n == 0 {
                *v = with.clone();
                true
            } else {
                *n -= 1;
                false
            }
        }
    }
}

/// Mutated JSON text: byte mutations, or value replacements (which keep it parseable).
fn json_case(
    seed: &str,
    by_value: bool,
    muts: &[Mutation],
    values: &[(usize, serde_json::Value)],
) -> Vec<u8> {
    if by_value {
        let mut v: serde_json::Value = serde_json::from_str(seed).expect("seed is JSON");
        for (i, with) in values {
            let mut n = *i;
            replace_nth(&mut v, &mut n, with);
        }
        v.to_string().into_bytes()
    } else {
        mutate(seed.as_bytes(), muts, usize::MAX)
    }
}

#[test]
fn tokenizer_json_loading_survives_mutations() {
    let tmp = tempfile::tempdir().expect("tmp");
    let seeds: Vec<String> = ["tiny-llama/tokenizer.json", "data/tokenizer.json"]
        .iter()
        .map(|f| String::from_utf8(read(&fixtures().join(f))).expect("utf-8"))
        .collect();
    let p = tmp.path().join("tokenizer.json");
    let mut r = runner(1500);
    r.run(
        &(
            0..seeds.len(),
            any::<bool>(),
            prop::collection::vec(mutation(), 1..4),
            prop::collection::vec((0usize..400, replacement()), 1..4),
        ),
        |(s, by_value, muts, values)| {
            let bytes = json_case(&seeds[s], by_value, &muts, &values);
            std::fs::write(&p, &bytes).expect("write");
            if let Ok(t) = rankstab_train::text::TextTokenizer::from_file(&p) {
                let _ = t.encode("Call me Ishmael. 1234 <|endoftext|> ünïcödé");
                let _ = t.decode(&[0, 1, 2, 3], true);
                let _ = t.check_fits(&p, 97);
            }
            Ok(())
        },
    )
    .expect("no input breaks tokenizer loading");
}

#[test]
fn config_json_parsing_survives_mutations() {
    let seeds: Vec<String> = ["tiny-llama/config.json", "tiny-gptj/config.json"]
        .iter()
        .map(|f| String::from_utf8(read(&fixtures().join(f))).expect("utf-8"))
        .collect();
    let p = Path::new("config.json");
    let mut r = runner(4000);
    r.run(
        &(
            0..seeds.len(),
            any::<bool>(),
            prop::collection::vec(mutation(), 1..4),
            prop::collection::vec((0usize..30, replacement()), 1..4),
        ),
        |(s, by_value, muts, values)| {
            let bytes = json_case(&seeds[s], by_value, &muts, &values);
            let Ok(text) = std::str::from_utf8(&bytes) else {
                return Ok(());
            };
            let Ok(c) = ConfigJson::parse(p, text) else {
                return Ok(());
            };
            // Whatever is accepted is in range.
            if let Ok(l) = rankstab_train::llama::config_from_json(&c) {
                prop_assert!(l.num_layers >= 1 && l.num_layers <= 4096);
                prop_assert!(l.rms_norm_eps > 0.0 && l.rms_norm_eps < 1.0);
                prop_assert!(l.rope_theta.is_finite() && l.rope_theta > 0.0);
                prop_assert!(l.num_heads % l.num_kv_heads == 0 && l.head_dim % 2 == 0);
            }
            if let Ok(g) = rankstab_train::gptj::config_from_json(&c) {
                prop_assert!(g.n_layer >= 1 && g.eps > 0.0 && g.eps < 1.0);
                prop_assert!(g.rotary_dim <= g.head_dim && g.n_embd % g.n_head == 0);
            }
            Ok(())
        },
    )
    .expect("no input breaks config parsing");
}
