//! A minimal GGUF v3 writer shared by the tests that need GGUF files (the reader's tests,
//! the parser fuzzing, the CLI's reliability cases): metadata of the common types, tensors
//! of raw bytes, and the tiny Llama fixture converted to GGUF as llama.cpp converts it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A minimal GGUF v3 writer for the tests.
#[derive(Default)]
pub struct Writer {
    pub kv: Vec<u8>,
    pub n_kv: u64,
    pub infos: Vec<u8>,
    pub data: Vec<u8>,
    pub n_t: u64,
}

impl Writer {
    pub fn key(&mut self, k: &str, ty: u32) {
        self.kv.extend((k.len() as u64).to_le_bytes());
        self.kv.extend(k.as_bytes());
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    pub fn u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
        self
    }
    pub fn f32(&mut self, k: &str, v: f32) -> &mut Self {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
        self
    }
    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k, 8);
        self.kv.extend((v.len() as u64).to_le_bytes());
        self.kv.extend(v.as_bytes());
        self
    }
    pub fn strs(&mut self, k: &str, v: &[String]) -> &mut Self {
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
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> &mut Self {
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
    pub fn f32_tensor(&mut self, name: &str, t: &Tensor) -> &mut Self {
        let dims: Vec<u64> = t.size().iter().rev().map(|&d| d as u64).collect();
        let v: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32");
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, &dims, 0, &bytes)
    }
    pub fn bytes(&self) -> Vec<u8> {
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
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).expect("write");
        p
    }
}

/// llama.cpp's `permute` of q/k rows (convert_hf_to_gguf.py).
pub fn permute(w: &Tensor, heads: i64) -> Tensor {
    let s = w.size();
    w.reshape([heads, 2, s[0] / heads / 2, s[1]])
        .transpose(1, 2)
        .reshape([s[0], s[1]])
}

/// The tiny Llama fixture converted to GGUF as llama.cpp would, with a vocabulary of `n_vocab` tokens.
pub fn tiny_llama_gguf(fixtures: &Path, n_vocab: usize) -> Writer {
    tiny_llama_gguf_edit(fixtures, n_vocab, &[], |_| {}, |_, t| t)
}

/// [`tiny_llama_gguf`] with the metadata keys in `skip` left out, `extra` writing more
/// metadata (e.g. a damaged value of a skipped key), and `tensor` changing each tensor
/// (given its GGUF name) before it is written.
pub fn tiny_llama_gguf_edit(
    fixtures: &Path,
    n_vocab: usize,
    skip: &[&str],
    extra: impl FnOnce(&mut Writer),
    tensor: impl Fn(&str, Tensor) -> Tensor,
) -> Writer {
    let dir = fixtures.join("tiny-llama");
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
    let keep = |k: &str| !skip.contains(&k);
    let eps = cfg["rms_norm_eps"].as_f64().expect("eps") as f32;
    for (k, v) in [
        ("llama.block_count", u("num_hidden_layers")),
        ("llama.embedding_length", u("hidden_size")),
        ("llama.feed_forward_length", u("intermediate_size")),
        ("llama.attention.head_count", heads as u32),
        ("llama.attention.head_count_kv", kv as u32),
        ("llama.context_length", 64),
    ] {
        if keep(k) {
            w.u32(k, v);
        }
    }
    if keep("general.architecture") {
        w.str("general.architecture", "llama");
    }
    if keep("llama.rope.freq_base") {
        w.f32("llama.rope.freq_base", theta as f32);
    }
    if keep("llama.attention.layer_norm_rms_epsilon") {
        w.f32("llama.attention.layer_norm_rms_epsilon", eps);
    }
    w.str("tokenizer.ggml.model", "gpt2")
        .strs(
            "tokenizer.ggml.tokens",
            &(0..n_vocab).map(|i| format!("t{i}")).collect::<Vec<_>>(),
        )
        .strs("tokenizer.ggml.merges", &[]);
    extra(&mut w);
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
        let t = tensor(&g, t.shallow_clone());
        let t = if g.ends_with("attn_q.weight") {
            permute(&t, heads)
        } else if g.ends_with("attn_k.weight") {
            permute(&t, kv)
        } else {
            t.shallow_clone()
        };
        w.f32_tensor(&g, &t);
    }
    w
}

impl Writer {
    /// A metadata value of any type: `ty` the GGUF type id, `raw` its encoding.
    pub fn raw(&mut self, k: &str, ty: u32, raw: &[u8]) -> &mut Self {
        self.key(k, ty);
        self.kv.extend(raw);
        self
    }
    /// Sets the data offset of tensor `name` in the directory (for damaged files).
    pub fn set_offset(&mut self, name: &str, offset: u64) -> &mut Self {
        let mut at = 0;
        while at < self.infos.len() {
            let n = u64::from_le_bytes(self.infos[at..at + 8].try_into().expect("8")) as usize;
            let this = &self.infos[at + 8..at + 8 + n];
            let nd = u32::from_le_bytes(self.infos[at + 8 + n..at + 12 + n].try_into().expect("4"))
                as usize;
            let off_at = at + 12 + n + 8 * nd + 4;
            if this == name.as_bytes() {
                self.infos[off_at..off_at + 8].copy_from_slice(&offset.to_le_bytes());
                return self;
            }
            at = off_at + 8;
        }
        panic!("no tensor {name}");
    }
    /// The data offset of tensor `name`.
    pub fn offset_of(&self, name: &str) -> u64 {
        let mut at = 0;
        while at < self.infos.len() {
            let n = u64::from_le_bytes(self.infos[at..at + 8].try_into().expect("8")) as usize;
            let this = &self.infos[at + 8..at + 8 + n];
            let nd = u32::from_le_bytes(self.infos[at + 8 + n..at + 12 + n].try_into().expect("4"))
                as usize;
            let off_at = at + 12 + n + 8 * nd + 4;
            if this == name.as_bytes() {
                return u64::from_le_bytes(self.infos[off_at..off_at + 8].try_into().expect("8"));
            }
            at = off_at + 8;
        }
        panic!("no tensor {name}");
    }
    /// A uint64 value.
    pub fn u64(&mut self, k: &str, v: u64) -> &mut Self {
        self.raw(k, 10, &v.to_le_bytes())
    }
}
