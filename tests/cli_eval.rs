//! End-to-end tests of `rankstab eval` on the tiny Llama fixture.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/tests/fixtures/tiny-llama")
}

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rankstab"))
        .arg("eval")
        .args(args)
        .output()
        .expect("runs")
}

#[test]
fn eval_prints_tokens_nll_perplexity_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "It is a truth universally acknowledged, that a single man in possession of a good fortune.").expect("write");
    let m = model();
    let o = eval(&[
        "--model",
        m.to_str().expect("utf8"),
        "--text",
        text.to_str().expect("utf8"),
        "--context",
        "8",
        "--batch",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let tokens = v["tokens"].as_i64().expect("tokens");
    let nll = v["nll"].as_f64().expect("nll");
    let ppl = v["perplexity"].as_f64().expect("perplexity");
    assert!(tokens > 10);
    assert!(nll.is_finite() && nll > 0.0);
    assert!((ppl / nll.exp() - 1.0).abs() < 1e-9);
    // A random 97-token model is near-uniform: perplexity within a few times the vocabulary.
    assert!(ppl > 10.0 && ppl < 2000.0, "{ppl}");
}

/// `--stride`: overlapping windows give every predicted token more context; the default
/// (stride = context) is the plain chunking; a stride outside 1..=context is refused.
#[test]
fn eval_stride_slides_the_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.").expect("write");
    let m = model();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            m.to_str().expect("utf8"),
            "--text",
            text.to_str().expect("utf8"),
            "--context",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        eval(&args)
    };
    let tokens = |o: &Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        v["tokens"].as_i64().expect("tokens")
    };
    let plain = tokens(&run(&[]));
    let same = tokens(&run(&["--stride", "8"]));
    let sliding = tokens(&run(&["--stride", "3"]));
    assert_eq!(plain, same);
    // Sliding windows predict every token after the first; chunks skip each window's first.
    assert!(sliding > plain, "{sliding} vs {plain}");
    for bad in ["0", "9"] {
        let o = run(&["--stride", bad]);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--stride") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
}

#[test]
fn eval_bad_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "some words to read").expect("write");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").expect("write");
    let binary = dir.path().join("bin.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00]).expect("write");
    let pickle = dir.path().join("pickle-model");
    std::fs::create_dir(&pickle).expect("mkdir");
    std::fs::copy(model().join("config.json"), pickle.join("config.json")).expect("copy");
    std::fs::write(pickle.join("pytorch_model.bin"), b"x").expect("write");
    let m = model();
    let m = m.to_str().expect("utf8");
    let s = |p: &Path| p.to_str().expect("utf8").to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--model".into(), m.into(), "--text".into(), s(&empty)],
            "empty",
        ),
        (
            vec!["--model".into(), m.into(), "--text".into(), s(&binary)],
            "not UTF-8",
        ),
        (
            vec![
                "--model".into(),
                s(&dir.path().join("nope")),
                "--text".into(),
                s(&good),
            ],
            "not a model directory",
        ),
        (
            vec!["--model".into(), s(&pickle), "--text".into(), s(&good)],
            "pickle",
        ),
        (
            vec![
                "--model".into(),
                m.into(),
                "--text".into(),
                s(&good),
                "--context".into(),
                "1".into(),
            ],
            "context",
        ),
    ];
    for (args, needle) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = eval(&refs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Values of typed flags are refused by the argument parser (clap's error, whose first
    // line names the flag, the value and the allowed ones), with exit code 2.
    for (flag, value, needle) in [
        ("--dtype", "f8", "unknown dtype 'f8' (allowed: f32, bf16)"),
        (
            "--device",
            "tpu",
            "unknown device 'tpu' (allowed: cpu, cuda, cuda:N, auto)",
        ),
    ] {
        let o = eval(&["--model", m, "--text", &s(&good), flag, value]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains(flag) && first.contains(needle),
            "{flag}: {err}"
        );
    }
}

fn peft_fixture(tag: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../train/tests/fixtures/peft")
        .join(tag)
}

fn eval_json(args: &[&str]) -> (serde_json::Value, String) {
    let o = eval(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{args:?}: {err}");
    (serde_json::from_slice(&o.stdout).expect("json"), err)
}

/// The tiny Llama with a PEFT rsLoRA adapter (scripts/make_peft_fixtures.py) gives the
/// NLL that transformers + peft computed for the same text, and not the base model's.
#[test]
fn eval_with_a_peft_adapter_matches_peft() {
    let adapter = peft_fixture("tiny-llama-rslora");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("reference.json")).expect("reference.json"),
    )
    .expect("json");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, reference["text"].as_str().expect("text")).expect("write");
    let n_ids = reference["text_ids"].as_array().expect("ids").len() as i64;
    let m = model();
    let (m, t, a) = (
        m.to_str().expect("utf8"),
        text.to_str().expect("utf8"),
        adapter.to_str().expect("utf8"),
    );
    let base_args = ["--model", m, "--text", t, "--context", "64", "--json"];
    let (base, _) = eval_json(&base_args);
    let mut with = base_args.to_vec();
    with.extend(["--adapter", a]);
    let (adapted, err) = eval_json(&with);
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(
        adapted["tokens"].as_i64(),
        Some(n_ids - 1),
        "one window of the whole text"
    );
    assert_eq!(base["tokens"], adapted["tokens"]);
    let (nll, nll_base) = (
        adapted["nll"].as_f64().expect("nll"),
        base["nll"].as_f64().expect("nll"),
    );
    let (want, want_base) = (
        reference["nll"].as_f64().expect("nll"),
        reference["nll_base"].as_f64().expect("nll_base"),
    );
    eprintln!("NLL with adapter {nll:.7} (peft {want:.7}), without {nll_base:.7} (transformers {want_base:.7})");
    assert!((nll - want).abs() < 1e-4, "{nll} vs peft's {want}");
    assert!(
        (nll_base - want_base).abs() < 1e-4,
        "{nll_base} vs {want_base}"
    );
    assert!((nll - nll_base).abs() > 0.1, "the adapter changes the NLL");
}

#[test]
fn eval_with_an_adapter_for_another_base_model_only_warns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).expect("mkdir");
    let src = peft_fixture("tiny-llama-lora");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .expect("copy");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("adapter_config.json")).expect("read"),
    )
    .expect("json");
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf".into();
    std::fs::write(adapter.join("adapter_config.json"), cfg.to_string()).expect("write");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "some words to read").expect("write");
    let m = model();
    let (v, err) = eval_json(&[
        "--model",
        m.to_str().expect("utf8"),
        "--text",
        text.to_str().expect("utf8"),
        "--adapter",
        adapter.to_str().expect("utf8"),
        "--json",
    ]);
    assert!(v["nll"].as_f64().expect("nll").is_finite());
    assert!(
        err.contains("warning") && err.contains("meta-llama/Llama-2-7b-hf"),
        "{err}"
    );
}

#[test]
fn eval_with_a_bad_adapter_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "some words to read").expect("write");
    let src = peft_fixture("tiny-llama-lora");
    let no_weights = dir.path().join("no-weights");
    std::fs::create_dir(&no_weights).expect("mkdir");
    std::fs::copy(
        src.join("adapter_config.json"),
        no_weights.join("adapter_config.json"),
    )
    .expect("copy");
    let no_config = dir.path().join("no-config");
    std::fs::create_dir(&no_config).expect("mkdir");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        no_config.join("adapter_model.safetensors"),
    )
    .expect("copy");
    // The Llama adapter with r = 4 in its config: every tensor is mis-shaped for it.
    let bad_rank = dir.path().join("bad-rank");
    std::fs::create_dir(&bad_rank).expect("mkdir");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        bad_rank.join("adapter_model.safetensors"),
    )
    .expect("copy");
    let cfg = std::fs::read_to_string(src.join("adapter_config.json")).expect("read");
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    cfg["r"] = 4.into();
    std::fs::write(bad_rank.join("adapter_config.json"), cfg.to_string()).expect("write");
    // One tensor whose shape does not fit its layer.
    let bad_shape = dir.path().join("bad-shape");
    std::fs::create_dir(&bad_shape).expect("mkdir");
    std::fs::copy(
        src.join("adapter_config.json"),
        bad_shape.join("adapter_config.json"),
    )
    .expect("copy");
    let key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    let tensors: Vec<(String, tch::Tensor)> =
        tch::Tensor::read_safetensors(src.join("adapter_model.safetensors"))
            .expect("read")
            .into_iter()
            .map(|(k, t)| {
                let t = if k == key { t.narrow(0, 0, 50) } else { t };
                (k, t)
            })
            .collect();
    tch::Tensor::write_safetensors(&tensors, bad_shape.join("adapter_model.safetensors"))
        .expect("write");
    let m = model();
    let s = |p: &Path| p.to_str().expect("utf8").to_string();
    let shape_msg = format!("{key} has shape [50, 8], expected [80, 8]");
    let cases: Vec<(PathBuf, &str)> = vec![
        (bad_shape, &shape_msg),
        (dir.path().join("nope"), "no such directory"),
        (no_weights, "no adapter_model.safetensors"),
        (no_config, "no adapter_config.json"),
        (
            peft_fixture("tiny-gptj-lora"),
            "does not exist in this model",
        ),
        (bad_rank, "rank r = 4"),
    ];
    for (adapter, needle) in cases {
        let args = [
            "--model".to_string(),
            s(&m),
            "--text".into(),
            s(&text),
            "--adapter".into(),
            s(&adapter),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = eval(&refs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{adapter:?}: {err}");
        assert!(err.contains(needle), "{adapter:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{adapter:?}: {err}");
    }
}

/// `generate`: the streamed text equals the `--json` answer; sampling with a seed is
/// reproducible and differs from greedy for some seed; bad sampling values are one line.
#[test]
fn generate_streams_and_samples_reproducibly() {
    let m = model();
    let run = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rankstab"));
        c.args([
            "generate",
            "--model",
            m.to_str().expect("utf8"),
            "--prompt",
            "It is a truth",
            "--max-tokens",
            "12",
        ]);
        c.args(extra);
        c.output().expect("runs")
    };
    let text = |o: &Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let answer = |o: &Output| {
        let v: serde_json::Value = serde_json::from_str(&text(o)).expect("json");
        assert_eq!(v["event"], "generate");
        v["answer"].as_str().expect("answer").to_string()
    };
    let greedy = answer(&run(&["--json"]));
    assert_eq!(text(&run(&[])).trim(), greedy);
    let s1 = answer(&run(&["--json", "--temperature", "1.5", "--seed", "1"]));
    assert_eq!(
        s1,
        answer(&run(&["--json", "--temperature", "1.5", "--seed", "1"]))
    );
    let differs = (1..6).any(|seed| {
        answer(&run(&[
            "--json",
            "--temperature",
            "1.5",
            "--seed",
            &seed.to_string(),
        ])) != greedy
    });
    assert!(differs, "sampling never left the greedy answer");
    for bad in [["--temperature", "-1"], ["--top-p", "0"]] {
        let o = run(&bad);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(bad[0]) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
}
