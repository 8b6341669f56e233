//! SmolLM2-135M-Instruct from its GGUF file (Q4_1 / Q8_0 / F32) against transformers' own
//! GGUF loader: dequantized tensors, logits at a few positions of a chat prompt (1e-3),
//! tokenizer ids, and the greedy answer. The reference numbers come from
//! `scripts/make_fixtures.py`; the 98 MB model itself is fetched by
//! `scripts/fetch-assets.sh` into `assets/`, and these tests skip (saying so) without it.
use rankstab_train::gguf::GgufFile;
use rankstab_train::load;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn asset() -> Option<PathBuf> {
    let root = std::env::var_os("RANKSTAB_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let p = root.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-assets.sh to fetch it",
            p.display()
        );
        None
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2")
}

struct Reference {
    tensors: Vec<(String, Tensor)>,
    json: serde_json::Value,
}

impl Reference {
    fn load() -> Self {
        let tensors = Tensor::read_safetensors(fixture().join("reference.safetensors"))
            .expect("reference.safetensors");
        let text =
            std::fs::read_to_string(fixture().join("reference.json")).expect("reference.json");
        Self {
            tensors,
            json: serde_json::from_str(&text).expect("json"),
        }
    }

    fn get(&self, name: &str) -> Tensor {
        self.tensors
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.shallow_clone())
            .unwrap_or_else(|| panic!("{name} in fixture"))
    }

    fn ids(&self, name: &str) -> Vec<i64> {
        Vec::<i64>::try_from(self.get(name).flatten(0, -1)).expect("int64")
    }
}

#[test]
fn dequantized_tensors_match_transformers() {
    let Some(path) = asset() else { return };
    let r = Reference::load();
    let file = GgufFile::open(&path).expect("opens");
    let cfg = file.llama_config().expect("config");
    assert_eq!(
        (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads
        ),
        (30, 576, 9, 3)
    );
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 100_000.0);
    let ours = file.hf_tensors(&cfg).expect("dequantizes");
    // Every tensor: sum and sum of squares in f64.
    let names: Vec<String> = r.json["moment_names"]
        .as_array()
        .expect("names")
        .iter()
        .map(|v| v.as_str().expect("str").to_string())
        .collect();
    assert_eq!(names.len(), ours.len(), "tensor count");
    let moments = r.get("moments");
    for (i, n) in names.iter().enumerate() {
        let t = ours
            .get(n)
            .unwrap_or_else(|| panic!("{n} missing from our tensors"))
            .to_kind(Kind::Double);
        let (s, q) = (
            t.sum(Kind::Double).double_value(&[]),
            t.square().sum(Kind::Double).double_value(&[]),
        );
        let (ws, wq) = (
            moments.double_value(&[i as i64, 0]),
            moments.double_value(&[i as i64, 1]),
        );
        assert!(
            (s - ws).abs() <= 1e-6 * (1.0 + wq.sqrt() * 10.0),
            "{n}: sum {s} vs {ws}"
        );
        assert!(
            (q - wq).abs() <= 1e-6 * wq.max(1e-12),
            "{n}: sum of squares {q} vs {wq}"
        );
    }
    // Whole rows, where a wrong q/k row order or a wrong nibble order would show.
    let mut worst = 0f64;
    for (k, _) in r.tensors.iter().filter(|(k, _)| k.starts_with("rows/")) {
        let n = &k["rows/".len()..];
        let rows = r.get(k);
        let want = r.get(&format!("values/{n}"));
        let t = &ours[n];
        let t = if t.dim() == 1 {
            t.unsqueeze(0)
        } else {
            t.shallow_clone()
        };
        let got = t.index_select(0, &rows);
        let d = (&got - &want).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{n}: rows differ by {d}");
        worst = worst.max(d);
    }
    eprintln!("dequantized rows: max |difference| {worst:.3e}");
}

#[test]
fn logits_and_greedy_answer_match_transformers() {
    let Some(path) = asset() else { return };
    let r = Reference::load();
    let loaded = load::load(&path, Kind::Float, Device::Cpu).expect("loads");
    // The prompt: our chat template rendering and tokenizer give transformers' ids.
    let prompt = rankstab_train::generate::chat_prompt(&loaded, "What is the capital of France?")
        .expect("template");
    assert_eq!(prompt, r.json["prompt"].as_str().expect("prompt"));
    let ids = loaded.tokenizer.encode(&prompt).expect("ids");
    assert_eq!(ids, r.ids("input_ids"));
    let t = Tensor::from_slice(&ids).view([1, ids.len() as i64]);
    let logits = tch::no_grad(|| loaded.model.forward(&t, false)).squeeze_dim(0);
    let pos = r.get("positions");
    let voc = r.get("vocab_ids");
    let got = logits.index_select(0, &pos).index_select(1, &voc);
    let want = r.get("logits");
    let d = (&got - &want).abs().max().double_value(&[]);
    eprintln!(
        "SmolLM2 logits at {} positions x {} ids: max |difference| {d:.3e}",
        pos.size()[0],
        voc.size()[0]
    );
    assert!(want.abs().max().double_value(&[]) > 1.0);
    assert!(d < 1e-3, "max |logit difference| {d}");
    // Greedy answer: the same ids as transformers' generate, and it says Paris.
    let want_ids = r.ids("generated");
    let new = rankstab_train::generate::greedy(
        &loaded.model,
        &ids,
        want_ids.len(),
        &loaded.eos_ids,
        Device::Cpu,
    )
    .expect("greedy");
    assert_eq!(new, want_ids);
    let text = loaded.tokenizer.decode(&new, false).expect("decode");
    eprintln!("SmolLM2 answers: {text:?}");
    assert!(text.contains("Paris"), "{text}");
    // The one-call path `rankstab generate` uses: template, greedy, decode, stop at <|im_end|>.
    let answer = rankstab_train::generate::answer(
        &loaded,
        "What is the capital of France?",
        30,
        Device::Cpu,
    )
    .expect("answer");
    assert_eq!(answer, "The capital of France is Paris.");
}

#[test]
fn tokenizer_from_gguf_metadata_matches_transformers() {
    let Some(path) = asset() else { return };
    let r = Reference::load();
    let file = GgufFile::open(&path).expect("opens");
    let json = rankstab_train::gguf::tokenizer_json(&file).expect("tokenizer json");
    let tok = rankstab_train::text::TextTokenizer::from_json(&json.to_string(), &path)
        .expect("tokenizer");
    let cases = r.json["tokenizer_cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let want: Vec<i64> = c["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_i64().expect("id"))
            .collect();
        assert_eq!(tok.encode(text).expect("encode"), want, "{text:?}");
        assert_eq!(
            tok.decode(&want, true).expect("decode"),
            text,
            "round trip of {text:?}"
        );
    }
}
