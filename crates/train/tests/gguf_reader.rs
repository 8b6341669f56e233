//! The GGUF reader: every supported quantization against gguf-py's reference dequantizer
//! (fixture written by `scripts/make_fixtures.py`), metadata of every value type, a tiny
//! Llama converted to GGUF the way llama.cpp does (q/k rows permuted) that must give
//! transformers' logits again, and bad files: one clear error each, never a panic.
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

/// A minimal GGUF v3 writer for the tests.
#[derive(Default)]
struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    n_t: u64,
}

impl Writer {
    fn key(&mut self, k: &str, ty: u32) {
        self.kv.extend((k.len() as u64).to_le_bytes());
        self.kv.extend(k.as_bytes());
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn f32(&mut self, k: &str, v: f32) -> &mut Self {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k, 8);
        self.kv.extend((v.len() as u64).to_le_bytes());
        self.kv.extend(v.as_bytes());
        self
    }
    fn strs(&mut self, k: &str, v: &[String]) -> &mut Self {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            self.kv.extend((s.len() as u64).to_le_bytes());
            self.kv.extend(s.as_bytes());
        }
        self
    }
    /// A tensor of raw bytes; `dims` in ggml order (fastest first).
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> &mut Self {
        self.infos.extend((name.len() as u64).to_le_bytes());
        self.infos.extend(name.as_bytes());
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        while !self.data.len().is_multiple_of(32) {
            self.data.push(0);
        }
        self.n_t += 1;
        self
    }
    /// An f32 torch tensor under its shape (reversed into ggml order).
    fn f32_tensor(&mut self, name: &str, t: &Tensor) -> &mut Self {
        let dims: Vec<u64> = t.size().iter().rev().map(|&d| d as u64).collect();
        let v: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32");
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, &dims, 0, &bytes)
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_t.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&self.data);
        out
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).expect("write");
        p
    }
}

/// llama.cpp's `permute` of q/k rows (convert_hf_to_gguf.py).
fn permute(w: &Tensor, heads: i64) -> Tensor {
    let s = w.size();
    w.reshape([heads, 2, s[0] / heads / 2, s[1]])
        .transpose(1, 2)
        .reshape([s[0], s[1]])
}

/// The tiny Llama fixture converted to GGUF as llama.cpp would, with a vocabulary of `n_vocab` tokens.
fn tiny_llama_gguf(n_vocab: usize) -> Writer {
    let dir = fixtures().join("tiny-llama");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("json");
    let u = |k: &str| cfg[k].as_u64().expect(k) as u32;
    let (heads, kv) = (
        i64::from(u("num_attention_heads")),
        i64::from(u("num_key_value_heads")),
    );
    let theta = cfg["rope_theta"]
        .as_f64()
        .or_else(|| cfg["rope_parameters"]["rope_theta"].as_f64())
        .expect("theta");
    let mut w = Writer::default();
    w.str("general.architecture", "llama")
        .u32("llama.block_count", u("num_hidden_layers"))
        .u32("llama.embedding_length", u("hidden_size"))
        .u32("llama.feed_forward_length", u("intermediate_size"))
        .u32("llama.attention.head_count", heads as u32)
        .u32("llama.attention.head_count_kv", kv as u32)
        .u32("llama.context_length", 64)
        .f32("llama.rope.freq_base", theta as f32)
        .f32(
            "llama.attention.layer_norm_rms_epsilon",
            cfg["rms_norm_eps"].as_f64().expect("eps") as f32,
        )
        .str("tokenizer.ggml.model", "gpt2")
        .strs(
            "tokenizer.ggml.tokens",
            &(0..n_vocab).map(|i| format!("t{i}")).collect::<Vec<_>>(),
        )
        .strs("tokenizer.ggml.merges", &[]);
    let tensors = Tensor::read_safetensors(dir.join("model.safetensors")).expect("safetensors");
    for (name, t) in &tensors {
        let g = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down");
        let t = if g.ends_with("attn_q.weight") {
            permute(t, heads)
        } else if g.ends_with("attn_k.weight") {
            permute(t, kv)
        } else {
            t.shallow_clone()
        };
        w.f32_tensor(&g, &t);
    }
    w
}

#[test]
fn tiny_llama_through_gguf_gives_transformers_logits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tiny_llama_gguf(97).write(tmp.path(), "tiny.gguf");
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
    let path = tiny_llama_gguf(120).write(tmp.path(), "tiny.gguf");
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
