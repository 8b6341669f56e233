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
                "--dtype".into(),
                "f8".into(),
            ],
            "f32 or bf16",
        ),
        (
            vec![
                "--model".into(),
                m.into(),
                "--text".into(),
                s(&good),
                "--device".into(),
                "tpu".into(),
            ],
            "cpu or cuda",
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
}
