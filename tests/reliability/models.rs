//! Hostile model files and `eval` / `generate` / `train` / `sweep` inputs: configurations
//! with values of the wrong type, out of range or not implemented, devices and FIFOs where
//! files should be, shard indexes pointing outside the model, damaged safetensors and GGUF
//! files, NaN and infinite weights, and models that cannot fit in memory. Every one must
//! end with exit code 2 and one line naming the file, field or value, and leave nothing
//! behind; the untampered fixture must still give its committed perplexity.
use super::harness::*;
#[path = "../../crates/train/tests/common/gguf_writer.rs"]
mod gguf_writer;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::Tensor;

fn fixtures() -> PathBuf {
    root().join("crates/train/tests/fixtures")
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// A copy of a fixture model directory under `tmp/name`.
fn copy_model(tmp: &Path, fixture: &str, name: &str) -> PathBuf {
    let from = fixtures().join(fixture);
    let to = tmp.join(name);
    std::fs::create_dir_all(&to).expect("mkdir");
    for e in std::fs::read_dir(&from).expect("fixture") {
        let e = e.expect("entry");
        if e.file_name() != "reference.safetensors" {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
    to
}

/// A copy of a fixture whose config.json is edited by `edit`.
fn with_config(tmp: &Path, fixture: &str, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = copy_model(tmp, fixture, name);
    let p = dir.join("config.json");
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("config")).expect("json");
    edit(&mut v);
    std::fs::write(&p, v.to_string()).expect("write");
    dir
}

/// A copy of tiny-llama with one tensor changed by `edit`.
fn with_tensor(tmp: &Path, name: &str, tensor: &str, edit: impl Fn(&Tensor) -> Tensor) -> PathBuf {
    let dir = copy_model(tmp, "tiny-llama", name);
    let p = dir.join("model.safetensors");
    let ts = Tensor::read_safetensors(&p).expect("safetensors");
    let ts: Vec<(String, Tensor)> = ts
        .into_iter()
        .map(|(n, t)| {
            let t = if n == tensor { edit(&t) } else { t };
            (n, t)
        })
        .collect();
    Tensor::write_safetensors(&ts, &p).expect("write");
    dir
}

/// `t` with element 0 set to `v`.
fn poke(t: &Tensor, v: f64) -> Tensor {
    let t = t.copy();
    let _ = t.view([-1]).get(0).fill_(v);
    t
}

fn mkfifo(p: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .expect("mkfifo runs")
        .success();
    assert!(ok, "mkfifo {}", p.display());
}

fn symlink_dev_zero(p: &Path) {
    let _ = std::fs::remove_file(p);
    std::os::unix::fs::symlink("/dev/zero", p).expect("symlink");
}

/// The reference text of the PEFT fixture and the NLL transformers computed for the base
/// model on it.
fn reference() -> (String, f64) {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("peft/tiny-llama-rslora/reference.json"))
            .expect("reference"),
    )
    .expect("json");
    (
        r["text"].as_str().expect("text").to_string(),
        r["nll_base"].as_f64().expect("nll_base"),
    )
}

fn eval_case(name: &str, model: &Path, text: &Path, frags: &[&str]) -> Case {
    Case::err(
        name,
        &["eval", "--model", &s(model), "--text", &s(text)],
        frags,
    )
}

/// Tampered config.json files of the Llama fixture: wrong types, out-of-range values,
/// settings rankstab does not implement.
#[test]
fn llama_configs_are_validated_not_defaulted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let text = t.join("t.txt");
    std::fs::write(&text, reference().0).expect("write");
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let rows: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "layers 1e12",
            Box::new(|v| v["num_hidden_layers"] = json!(1_000_000_000_000u64)),
            vec!["config.json", "num_hidden_layers", "1000000000000"],
        ),
        (
            "layers 0",
            Box::new(|v| v["num_hidden_layers"] = json!(0)),
            vec!["num_hidden_layers = 0"],
        ),
        (
            "layers as a string",
            Box::new(|v| v["num_hidden_layers"] = json!("2")),
            vec!["num_hidden_layers", "an integer"],
        ),
        (
            "rope_theta abc",
            Box::new(|v| v["rope_theta"] = json!("abc")),
            vec!["rope_theta", "abc"],
        ),
        (
            "rope_parameters.rope_theta abc",
            Box::new(|v| v["rope_parameters"]["rope_theta"] = json!("abc")),
            vec!["rope_parameters.rope_theta", "abc"],
        ),
        (
            "rope_theta 0",
            Box::new(|v| v["rope_parameters"]["rope_theta"] = json!(0.0)),
            vec!["rope_theta", "> 0"],
        ),
        (
            "rope_scaling yarn",
            Box::new(|v| v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0})),
            vec!["rope_scaling.type", "yarn"],
        ),
        (
            "rope_type llama3",
            Box::new(|v| v["rope_parameters"]["rope_type"] = json!("llama3")),
            vec!["rope_parameters.rope_type", "llama3"],
        ),
        (
            "rope factor",
            Box::new(|v| v["rope_parameters"]["factor"] = json!(8.0)),
            vec!["rope_parameters.factor"],
        ),
        (
            "hidden_act gelu",
            Box::new(|v| v["hidden_act"] = json!("gelu")),
            vec!["hidden_act", "gelu", "silu"],
        ),
        (
            "rms_norm_eps -1",
            Box::new(|v| v["rms_norm_eps"] = json!(-1.0)),
            vec!["rms_norm_eps = -1", "(0, 1)"],
        ),
        (
            "rms_norm_eps string",
            Box::new(|v| v["rms_norm_eps"] = json!("1e-5")),
            vec!["rms_norm_eps"],
        ),
        (
            "kv heads not dividing",
            Box::new(|v| v["num_key_value_heads"] = json!(4)),
            vec!["num_key_value_heads = 4", "divisor"],
        ),
        (
            "hidden_size 1e9",
            Box::new(|v| v["hidden_size"] = json!(1_000_000_000u64)),
            vec!["hidden_size"],
        ),
        (
            "vocab_size -5",
            Box::new(|v| v["vocab_size"] = json!(-5)),
            vec!["vocab_size = -5"],
        ),
        (
            "head_dim odd",
            Box::new(|v| v["head_dim"] = json!(7)),
            vec!["head_dim = 7", "even"],
        ),
        (
            "tie_word_embeddings yes",
            Box::new(|v| v["tie_word_embeddings"] = json!("yes")),
            vec!["tie_word_embeddings", "true or false"],
        ),
        (
            "model_type mistral",
            Box::new(|v| v["model_type"] = json!("mistral")),
            vec!["model_type", "mistral"],
        ),
        (
            "attention_dropout",
            Box::new(|v| v["attention_dropout"] = json!(0.1)),
            vec!["attention_dropout"],
        ),
        (
            "max_position_embeddings 0",
            Box::new(|v| v["max_position_embeddings"] = json!(0)),
            vec!["max_position_embeddings"],
        ),
        (
            "config is an array",
            Box::new(|v| *v = json!([1, 2])),
            vec!["config.json", "not a JSON object"],
        ),
    ];
    let mut cases = Vec::new();
    for (i, (name, edit, frags)) in rows.into_iter().enumerate() {
        let dir = with_config(t, "tiny-llama", &format!("m{i}"), edit);
        cases.push(eval_case(name, &dir, &text, &frags));
    }
    // The same refusals from `generate` and (leaving no run directory) `train`.
    let bad = with_config(t, "tiny-llama", "layers", |v| {
        v["num_hidden_layers"] = json!(1e12)
    });
    cases.push(Case::err(
        "generate, layers 1e12",
        &["generate", "--model", &s(&bad), "--prompt", "hi"],
        &["num_hidden_layers"],
    ));
    let out = t.join("run");
    cases.push(
        Case::err(
            "train, rope_theta abc",
            &[
                "train",
                "--model",
                &s(&with_config(t, "tiny-llama", "theta", |v| {
                    v["rope_theta"] = json!("abc")
                })),
                "--data",
                &s(&text),
                "--rank",
                "2",
                "--steps",
                "1",
                "--out",
                &s(&out),
            ],
            &["rope_theta"],
        )
        .leaves_nothing(&[&out]),
    );
    assert!(run_cases(&cases) >= 23);
}

#[test]
fn gptj_configs_are_validated_not_defaulted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let text = t.join("t.txt");
    std::fs::write(&text, "some words").expect("write");
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let rows: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "activation relu",
            Box::new(|v| v["activation_function"] = json!("relu")),
            vec!["activation_function", "relu"],
        ),
        (
            "rotary_dim odd",
            Box::new(|v| v["rotary_dim"] = json!(7)),
            vec!["rotary_dim = 7"],
        ),
        (
            "rotary_dim null",
            Box::new(|v| v["rotary_dim"] = json!(null)),
            vec!["rotary_dim"],
        ),
        (
            "layer_norm_epsilon 0",
            Box::new(|v| v["layer_norm_epsilon"] = json!(0.0)),
            vec!["layer_norm_epsilon"],
        ),
        (
            "tied embeddings",
            Box::new(|v| v["tie_word_embeddings"] = json!(true)),
            vec!["tie_word_embeddings"],
        ),
        (
            "n_layer 1e12",
            Box::new(|v| v["n_layer"] = json!(1e12)),
            vec!["n_layer"],
        ),
        (
            "n_embd not divisible",
            Box::new(|v| v["n_head"] = json!(5)),
            vec!["n_embd", "n_head"],
        ),
        (
            "resid_pdrop",
            Box::new(|v| v["resid_pdrop"] = json!(0.1)),
            vec!["resid_pdrop"],
        ),
    ];
    let mut cases = Vec::new();
    for (i, (name, edit, frags)) in rows.into_iter().enumerate() {
        let dir = with_config(t, "tiny-gptj", &format!("g{i}"), edit);
        cases.push(eval_case(name, &dir, &text, &frags));
    }
    assert_eq!(run_cases(&cases), 8);
}

/// Devices, FIFOs, oversized files and shard indexes pointing outside the model.
#[test]
fn reads_are_bounded_and_confined() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let text = t.join("t.txt");
    std::fs::write(&text, reference().0).expect("write");
    let mut cases = Vec::new();

    let d = copy_model(t, "tiny-llama", "cfg-fifo");
    std::fs::remove_file(d.join("config.json")).expect("rm");
    mkfifo(&d.join("config.json"));
    cases.push(eval_case(
        "config.json is a FIFO",
        &d,
        &text,
        &["config.json", "not a regular file"],
    ));

    let d = copy_model(t, "tiny-llama", "cfg-zero");
    symlink_dev_zero(&d.join("config.json"));
    cases.push(eval_case(
        "config.json is /dev/zero",
        &d,
        &text,
        &["config.json", "not a regular file"],
    ));

    let d = copy_model(t, "tiny-llama", "cfg-big");
    std::fs::write(d.join("config.json"), vec![b' '; 17 << 20]).expect("write");
    cases.push(eval_case(
        "config.json of 17 MiB",
        &d,
        &text,
        &["config.json", "more than"],
    ));

    let d = copy_model(t, "tiny-llama", "cfg-bad");
    std::fs::write(d.join("config.json"), "{not json").expect("write");
    cases.push(eval_case(
        "config.json not JSON",
        &d,
        &text,
        &["config.json", "not valid JSON"],
    ));

    let d = copy_model(t, "tiny-llama", "st-zero");
    symlink_dev_zero(&d.join("model.safetensors"));
    cases.push(eval_case(
        "model.safetensors is /dev/zero",
        &d,
        &text,
        &["model.safetensors", "not a regular file"],
    ));

    let d = copy_model(t, "tiny-llama", "st-fifo");
    std::fs::remove_file(d.join("model.safetensors")).expect("rm");
    mkfifo(&d.join("model.safetensors"));
    cases.push(eval_case(
        "model.safetensors is a FIFO",
        &d,
        &text,
        &["model.safetensors", "not a regular file"],
    ));

    let d = copy_model(t, "tiny-llama", "st-cut");
    let b = std::fs::read(d.join("model.safetensors")).expect("read");
    std::fs::write(d.join("model.safetensors"), &b[..b.len() / 2]).expect("write");
    cases.push(eval_case(
        "truncated safetensors",
        &d,
        &text,
        &["model.safetensors", "outside the file"],
    ));

    let d = copy_model(t, "tiny-llama", "st-header");
    let mut b = std::fs::read(d.join("model.safetensors")).expect("read");
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(d.join("model.safetensors"), &b).expect("write");
    cases.push(eval_case(
        "safetensors header length 2^64-1",
        &d,
        &text,
        &["model.safetensors", "header of"],
    ));

    let d = copy_model(t, "tiny-llama", "st-overlap");
    let b = std::fs::read(d.join("model.safetensors")).expect("read");
    let n = u64::from_le_bytes(b[..8].try_into().expect("8")) as usize;
    let mut h: Value = serde_json::from_slice(&b[8..8 + n]).expect("header");
    // Two tensors of the same size: the second's data made the first's.
    h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] =
        h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
    let mut hb = h.to_string().into_bytes();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend(&hb);
    out.extend(&b[8 + n..]);
    std::fs::write(d.join("model.safetensors"), &out).expect("write");
    cases.push(eval_case(
        "overlapping safetensors tensors",
        &d,
        &text,
        &["model.safetensors", "overlap"],
    ));

    // Sharded checkpoints whose index points outside the model directory.
    for (name, target, frag) in [
        (
            "index to ../outside",
            "../outside/x.safetensors",
            "../outside/x.safetensors",
        ),
        ("index to /etc/passwd", "/etc/passwd", "/etc/passwd"),
    ] {
        let d = copy_model(t, "tiny-llama", &name.replace([' ', '/', '.'], "_"));
        std::fs::create_dir_all(t.join("outside")).expect("mkdir");
        std::fs::rename(d.join("model.safetensors"), t.join("outside/x.safetensors"))
            .expect("move");
        std::fs::write(
            d.join("model.safetensors.index.json"),
            json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": target}})
                .to_string(),
        )
        .expect("write");
        cases.push(eval_case(name, &d, &text, &[frag, "outside"]));
    }
    let d = copy_model(t, "tiny-llama", "index-number");
    std::fs::remove_file(d.join("model.safetensors")).expect("rm");
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": 7}}"#,
    )
    .expect("write");
    cases.push(eval_case(
        "index entry not a file name",
        &d,
        &text,
        &["model.safetensors.index.json", "weight_map"],
    ));

    let d = copy_model(t, "tiny-llama", "tok-zero");
    symlink_dev_zero(&d.join("tokenizer.json"));
    cases.push(eval_case(
        "tokenizer.json is /dev/zero",
        &d,
        &text,
        &["tokenizer.json", "not a regular file"],
    ));

    let d = copy_model(t, "tiny-llama", "tok-fifo");
    std::fs::remove_file(d.join("tokenizer.json")).expect("rm");
    mkfifo(&d.join("tokenizer.json"));
    cases.push(eval_case(
        "tokenizer.json is a FIFO",
        &d,
        &text,
        &["tokenizer.json", "not a regular file"],
    ));

    let d = copy_model(t, "tiny-llama", "tok-bad");
    std::fs::write(
        d.join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": 3}}"#,
    )
    .expect("write");
    cases.push(eval_case(
        "tokenizer.json malformed",
        &d,
        &text,
        &["tokenizer.json", "not a tokenizer.json"],
    ));

    let d = copy_model(t, "tiny-llama", "tokcfg-fifo");
    mkfifo(&d.join("tokenizer_config.json"));
    cases.push(eval_case(
        "tokenizer_config.json is a FIFO",
        &d,
        &text,
        &["tokenizer_config.json", "not a regular file"],
    ));

    let d = copy_model(t, "tiny-llama", "gencfg-zero");
    symlink_dev_zero(&d.join("generation_config.json"));
    cases.push(eval_case(
        "generation_config.json is /dev/zero",
        &d,
        &text,
        &["generation_config.json", "not a regular file"],
    ));

    let good = tiny_llama();
    let zero = t.join("zero.txt");
    symlink_dev_zero(&zero);
    cases.push(eval_case(
        "--text is /dev/zero",
        &good,
        &zero,
        &["zero.txt", "not a regular file"],
    ));
    let fifo = t.join("fifo.txt");
    mkfifo(&fifo);
    cases.push(eval_case(
        "--text is a FIFO",
        &good,
        &fifo,
        &["fifo.txt", "not a regular file"],
    ));
    let gz = t.join("zero.gguf");
    symlink_dev_zero(&gz);
    cases.push(eval_case(
        "--model is /dev/zero",
        &gz,
        &text,
        &["zero.gguf", "not a regular file"],
    ));
    assert!(run_cases(&cases) >= 20);
}

/// NaN and infinite weights (model and adapter), and finite weights that overflow to
/// non-finite logits.
#[test]
fn non_finite_numbers_are_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let text = t.join("t.txt");
    std::fs::write(&text, reference().0).expect("write");
    let mut cases = Vec::new();
    let d = with_tensor(t, "nan", "model.layers.1.mlp.down_proj.weight", |x| {
        poke(x, f64::NAN)
    });
    cases.push(eval_case(
        "a NaN weight",
        &d,
        &text,
        &["model.layers.1.mlp.down_proj.weight", "NaN or infinite"],
    ));
    let d = with_tensor(t, "inf", "model.embed_tokens.weight", |x| {
        poke(x, f64::INFINITY)
    });
    cases.push(eval_case(
        "an infinite weight",
        &d,
        &text,
        &["model.embed_tokens.weight", "NaN or infinite"],
    ));
    cases.push(Case::err(
        "generate with a NaN weight",
        &["generate", "--model", &s(&d), "--prompt", "hi"],
        &["model.embed_tokens.weight", "NaN or infinite"],
    ));
    // Finite weights whose logits overflow: the final norm's gain at 3e38.
    let d = with_tensor(t, "overflow", "model.norm.weight", |x| x.ones_like() * 3e38);
    cases.push(eval_case(
        "logits overflow to infinity",
        &d,
        &text,
        &["NaN or infinite at token position 0", "no perplexity"],
    ));
    cases.push(Case::err(
        "generate, logits overflow",
        &[
            "generate",
            "--model",
            &s(&d),
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ],
        &["NaN or infinite at token position"],
    ));

    // Adapters.
    let good = fixtures().join("tiny-llama");
    let adapter = |name: &str, edit: &dyn Fn(&Path)| {
        let dir = t.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(
                fixtures().join("peft/tiny-llama-rslora").join(f),
                dir.join(f),
            )
            .expect("copy");
        }
        edit(&dir);
        dir
    };
    let set_cfg = |dir: &Path, k: &str, v: Value| {
        let p = dir.join("adapter_config.json");
        let mut c: Value =
            serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
        c[k] = v;
        std::fs::write(&p, c.to_string()).expect("write");
    };
    let eval_adapter = |name: &str, a: &Path, frags: &[&str]| {
        Case::err(
            name,
            &[
                "eval",
                "--model",
                &s(&good),
                "--text",
                &s(&text),
                "--adapter",
                &s(a),
            ],
            frags,
        )
    };
    let a = adapter("alpha-huge", &|d| set_cfg(d, "lora_alpha", json!(1e308)));
    cases.push(eval_adapter(
        "lora_alpha 1e308",
        &a,
        &["adapter_config.json", "lora_alpha"],
    ));
    let a = adapter("alpha-big", &|d| set_cfg(d, "lora_alpha", json!(1e7)));
    cases.push(eval_adapter("lora_alpha 1e7", &a, &["lora_alpha", "1e6"]));
    let a = adapter("dropout", &|d| set_cfg(d, "lora_dropout", json!(1.5)));
    cases.push(eval_adapter("lora_dropout 1.5", &a, &["lora_dropout"]));
    let a = adapter("inf-weight", &|d| {
        let p = d.join("adapter_model.safetensors");
        let ts: Vec<(String, Tensor)> = Tensor::read_safetensors(&p)
            .expect("read")
            .into_iter()
            .enumerate()
            .map(|(i, (n, x))| (n, if i == 0 { poke(&x, f64::INFINITY) } else { x }))
            .collect();
        Tensor::write_safetensors(&ts, &p).expect("write");
    });
    cases.push(eval_adapter(
        "an infinite adapter weight",
        &a,
        &["adapter_model.safetensors", "NaN or infinite"],
    ));
    let a = adapter("cfg-fifo", &|d| {
        std::fs::remove_file(d.join("adapter_config.json")).expect("rm");
        mkfifo(&d.join("adapter_config.json"));
    });
    cases.push(eval_adapter(
        "adapter_config.json is a FIFO",
        &a,
        &["adapter_config.json", "not a regular file"],
    ));
    let a = adapter("st-zero", &|d| {
        symlink_dev_zero(&d.join("adapter_model.safetensors"))
    });
    cases.push(eval_adapter(
        "adapter weights are /dev/zero",
        &a,
        &["adapter_model.safetensors", "not a regular file"],
    ));
    assert!(run_cases(&cases) >= 10);
}

/// GGUF files with damaged headers or metadata, written by the tests' writer.
#[test]
fn gguf_headers_and_metadata_are_checked() {
    use gguf_writer::{tiny_llama_gguf, tiny_llama_gguf_edit, Writer};
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let text = t.join("t.txt");
    std::fs::write(&text, "t1 t2 t3").expect("write");
    let fx = fixtures();
    let mut cases = Vec::new();
    let add = |cases: &mut Vec<Case>, name: &str, w: &Writer, frags: &[&str]| {
        let p = w.write(t, &format!("{}.gguf", name.replace([' ', '/', '='], "_")));
        cases.push(eval_case(name, &p, &text, frags));
    };
    let edit = |skip: &[&str], extra: &dyn Fn(&mut Writer)| {
        tiny_llama_gguf_edit(&fx, 97, skip, extra, |_, x| x)
    };
    add(
        &mut cases,
        "block_count 1e9",
        &edit(&["llama.block_count"], &|w| {
            w.u64("llama.block_count", 1_000_000_000);
        }),
        &["llama.block_count", "1000000000"],
    );
    add(
        &mut cases,
        "block_count 0",
        &edit(&["llama.block_count"], &|w| {
            w.u32("llama.block_count", 0);
        }),
        &["llama.block_count = 0"],
    );
    add(
        &mut cases,
        "block_count 1 of 2 blocks",
        &edit(&["llama.block_count"], &|w| {
            w.u32("llama.block_count", 1);
        }),
        &["blk.1", "llama.block_count = 1"],
    );
    add(
        &mut cases,
        "block_count 3 of 2 blocks",
        &edit(&["llama.block_count"], &|w| {
            w.u32("llama.block_count", 3);
        }),
        &["block 2 has no tensors"],
    );
    add(
        &mut cases,
        "block_count a string",
        &edit(&["llama.block_count"], &|w| {
            w.str("llama.block_count", "two");
        }),
        &["llama.block_count", "two"],
    );
    add(
        &mut cases,
        "rms eps -1",
        &edit(&["llama.attention.layer_norm_rms_epsilon"], &|w| {
            w.f32("llama.attention.layer_norm_rms_epsilon", -1.0);
        }),
        &["layer_norm_rms_epsilon = -1"],
    );
    add(
        &mut cases,
        "freq_base 0",
        &edit(&["llama.rope.freq_base"], &|w| {
            w.f32("llama.rope.freq_base", 0.0);
        }),
        &["llama.rope.freq_base = 0"],
    );
    add(
        &mut cases,
        "freq_base a string",
        &edit(&["llama.rope.freq_base"], &|w| {
            w.str("llama.rope.freq_base", "abc");
        }),
        &["llama.rope.freq_base", "abc"],
    );
    add(
        &mut cases,
        "freq_base NaN",
        &edit(&["llama.rope.freq_base"], &|w| {
            w.f32("llama.rope.freq_base", f32::NAN);
        }),
        &["llama.rope.freq_base = NaN"],
    );
    add(
        &mut cases,
        "rope scaling yarn",
        &edit(&[], &|w| {
            w.str("llama.rope.scaling.type", "yarn");
        }),
        &["llama.rope.scaling.type", "yarn"],
    );
    add(
        &mut cases,
        "partial rotary",
        &edit(&[], &|w| {
            w.u32("llama.rope.dimension_count", 4);
        }),
        &["llama.rope.dimension_count = 4"],
    );
    add(
        &mut cases,
        "experts",
        &edit(&[], &|w| {
            w.u32("llama.expert_count", 8);
        }),
        &["llama.expert_count = 8"],
    );
    add(
        &mut cases,
        "alignment 3",
        &edit(&[], &|w| {
            w.u32("general.alignment", 3);
        }),
        &["general.alignment"],
    );
    add(
        &mut cases,
        "heads 1e6",
        &edit(&["llama.attention.head_count"], &|w| {
            w.u32("llama.attention.head_count", 1_000_000);
        }),
        &["llama.attention.head_count"],
    );
    add(
        &mut cases,
        "kv heads not dividing",
        &edit(&["llama.attention.head_count_kv"], &|w| {
            w.u32("llama.attention.head_count_kv", 4);
        }),
        &["head_count_kv = 4"],
    );
    add(
        &mut cases,
        "architecture falcon",
        &edit(&["general.architecture"], &|w| {
            w.str("general.architecture", "falcon");
        }),
        &["falcon"],
    );
    let mut w = tiny_llama_gguf(&fx, 97);
    let o = w.offset_of("blk.0.attn_q.weight");
    w.set_offset("blk.0.attn_q.weight", o + 4);
    add(
        &mut cases,
        "misaligned tensor data",
        &w,
        &["blk.0.attn_q.weight", "alignment"],
    );
    let mut w = tiny_llama_gguf(&fx, 97);
    let o = w.offset_of("blk.0.attn_k.weight");
    w.set_offset("blk.0.attn_q.weight", o);
    add(&mut cases, "overlapping tensor data", &w, &["overlap"]);
    let mut w = tiny_llama_gguf(&fx, 97);
    w.set_offset("blk.0.attn_q.weight", 1 << 40);
    add(
        &mut cases,
        "tensor data past the end",
        &w,
        &["blk.0.attn_q.weight", "truncated"],
    );
    let w = tiny_llama_gguf_edit(
        &fx,
        97,
        &[],
        |_| {},
        |n, x| {
            if n == "blk.1.ffn_up.weight" {
                poke(&x, f64::NAN)
            } else {
                x
            }
        },
    );
    add(
        &mut cases,
        "NaN weight in a GGUF",
        &w,
        &["model.layers.1.mlp.up_proj.weight", "NaN or infinite"],
    );
    // Counts far beyond the file: no allocation, an error.
    let mut b = tiny_llama_gguf(&fx, 97).bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = t.join("count.gguf");
    std::fs::write(&p, &b).expect("write");
    cases.push(eval_case(
        "tensor count 2^64-1",
        &p,
        &text,
        &["count.gguf", "corrupt"],
    ));
    let mut b = tiny_llama_gguf(&fx, 97).bytes();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let p = t.join("kv.gguf");
    std::fs::write(&p, &b).expect("write");
    cases.push(eval_case(
        "metadata count 2^40",
        &p,
        &text,
        &["kv.gguf", "corrupt"],
    ));
    let mut w = Writer::default();
    w.str("general.architecture", "llama");
    w.raw("tokenizer.ggml.tokens", 9, &{
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend(u64::MAX.to_le_bytes());
        v
    });
    add(
        &mut cases,
        "array length 2^64-1",
        &w,
        &["truncated or corrupt"],
    );
    assert!(run_cases(&cases) >= 20);
}

/// Models that cannot fit are refused before loading, with the estimate; nothing is left.
#[test]
fn memory_is_estimated_before_loading() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let text = t.join("t.txt");
    std::fs::write(&text, reference().0).expect("write");
    let good = s(&fixtures().join("tiny-llama"));
    let tok = s(&root().join("assets/llama2-tokenizer"));
    let out = t.join("run");
    let sweep_out = t.join("sweep");
    let toml = |name: &str, body: &str| {
        let p = t.join(name);
        std::fs::write(
            &p,
            format!(
                "data = {:?}\nsteps = 1\nbatch = 1\nmicro_batch = 1\ncontext = 8\n{body}",
                s(&text)
            ),
        )
        .expect("write");
        s(&p)
    };
    let big = toml("big.toml", &format!("ranks = [8]\n[[models]]\nname = \"l7b\"\npreset = \"llama-2-7b\"\ntokenizer = {tok:?}\n"));
    let rank = toml(
        "rank.toml",
        &format!("ranks = [4, 60000]\n[[models]]\nname = \"tiny\"\npath = {good:?}\n"),
    );
    let module = toml("module.toml", &format!("ranks = [4]\n[[models]]\nname = \"tiny\"\npath = {good:?}\ntarget_modules = [\"fc_in\"]\n"));
    let bad_cfg = with_config(t, "tiny-llama", "layers", |v| {
        v["num_hidden_layers"] = json!(1e12)
    });
    let bad = toml(
        "bad.toml",
        &format!(
            "ranks = [4]\n[[models]]\nname = \"bad\"\npath = {:?}\n",
            s(&bad_cfg)
        ),
    );
    let cases = vec![
        Case::err(
            "eval over --max-memory",
            &[
                "eval",
                "--model",
                &good,
                "--text",
                &s(&text),
                "--max-memory",
                "1M",
            ],
            &["needs about", "1.0 MiB", "--max-memory"],
        ),
        Case::err(
            "generate over --max-memory",
            &[
                "generate",
                "--model",
                &good,
                "--prompt",
                "hi",
                "--max-memory",
                "1M",
            ],
            &["needs about", "--max-memory"],
        ),
        Case::err(
            "a bad --max-memory",
            &[
                "eval",
                "--model",
                &good,
                "--text",
                &s(&text),
                "--max-memory",
                "lots",
            ],
            &["--max-memory", "lots"],
        ),
        Case::err(
            "train llama-2-7b in 24G",
            &[
                "train",
                "--model",
                "preset:llama-2-7b",
                "--tokenizer",
                &tok,
                "--data",
                &s(&text),
                "--rank",
                "8",
                "--steps",
                "1",
                "--max-memory",
                "24G",
                "--out",
                &s(&out),
            ],
            &[
                "training preset:llama-2-7b",
                "needs about",
                "GiB",
                "24.0 GiB",
            ],
        )
        .leaves_nothing(&[&out]),
        Case::err(
            "sweep with llama-2-7b in 24G",
            &[
                "sweep",
                "--config",
                &big,
                "--out",
                &s(&sweep_out),
                "--max-memory",
                "24G",
            ],
            &["l7b", "needs about", "24.0 GiB"],
        )
        .leaves_nothing(&[&sweep_out]),
        Case::err(
            "sweep rank beyond the widths",
            &["sweep", "--config", &rank, "--out", &s(&sweep_out)],
            &["tiny", "rank 60000", "q_proj"],
        )
        .leaves_nothing(&[&sweep_out]),
        Case::err(
            "sweep target module missing",
            &["sweep", "--config", &module, "--out", &s(&sweep_out)],
            &["fc_in", "does not exist"],
        )
        .leaves_nothing(&[&sweep_out]),
        Case::err(
            "sweep with a bad config.json",
            &["sweep", "--config", &bad, "--out", &s(&sweep_out)],
            &["bad", "num_hidden_layers"],
        )
        .leaves_nothing(&[&sweep_out]),
    ];
    assert_eq!(run_cases(&cases), 8);
}

/// Controls: the untampered fixture is accepted and gives the NLL transformers computed
/// for it (peft fixture's `nll_base`), with and without a generous --max-memory; the tiny
/// Llama converted to GGUF loads.
#[test]
fn untampered_models_are_accepted_with_their_numbers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (text, want) = reference();
    let p = tmp.path().join("t.txt");
    std::fs::write(&p, text).expect("write");
    for extra in [&[][..], &["--max-memory", "64G"][..]] {
        let mut cmd = bin();
        cmd.args([
            "eval",
            "--model",
            &s(&fixtures().join("tiny-llama")),
            "--text",
            &s(&p),
            "--context",
            "64",
            "--json",
        ]);
        cmd.args(extra);
        let o = run_limited(cmd, std::time::Duration::from_secs(120));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).expect("json");
        let nll = v["nll"].as_f64().expect("nll");
        assert!((nll - want).abs() < 1e-4, "nll {nll}, transformers {want}");
    }
    let g = gguf_writer::tiny_llama_gguf(&fixtures(), 97).write(tmp.path(), "tiny.gguf");
    let m = rankstab_train_shape(&g);
    assert!(m.contains("num_layers: 2"), "{m}");
}

/// The shape `inspect` reads from a GGUF header (through the library, as the CLI does).
fn rankstab_train_shape(p: &Path) -> String {
    format!("{:?}", rankstab_train::load::inspect(p).expect("inspects"))
}
