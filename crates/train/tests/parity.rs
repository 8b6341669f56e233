//! Parity with transformers: tiny random models saved by `scripts/make_fixtures.py` and
//! their reference logits for fixed input ids. f32, tolerance 1e-4 absolute.
use rankstab_train::llama::Llama;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn reference(dir: &Path) -> (Tensor, Tensor) {
    let t = Tensor::read_safetensors(dir.join("reference.safetensors")).expect("reference");
    let get = |n: &str| t.iter().find(|(k, _)| k == n).map(|(_, v)| v.shallow_clone()).expect("tensor present");
    (get("input_ids"), get("logits"))
}

#[test]
fn tiny_llama_gqa_tied_matches_transformers() {
    let dir = fixture("tiny-llama");
    let model = Llama::from_dir(&dir, Kind::Float, Device::Cpu).expect("loads");
    assert!(model.lm_head.is_none(), "tied embeddings");
    assert_eq!((model.config.num_heads, model.config.num_kv_heads), (6, 2));
    assert_eq!(model.config.rope_theta, 500.0, "rope_theta from rope_parameters");
    let (ids, want) = reference(&dir);
    let got = tch::no_grad(|| model.forward(&ids, false));
    assert_eq!(got.size(), want.size());
    let diff = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    assert!(scale > 1.0, "reference logits too small to test anything ({scale})");
    eprintln!("{}: max |logit difference| {diff:.3e}", dir.display());
    assert!(diff < 1e-4, "max |logit difference| {diff}");
}

#[test]
fn tiny_gptj_partial_rotary_matches_transformers() {
    let dir = fixture("tiny-gptj");
    let model = rankstab_train::gptj::Gptj::from_dir(&dir, Kind::Float, Device::Cpu).expect("loads");
    assert!(model.config.rotary_dim < model.config.head_dim, "partial rotary");
    let (ids, want) = reference(&dir);
    let got = tch::no_grad(|| model.forward(&ids, false));
    assert_eq!(got.size(), want.size());
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(want.abs().max().double_value(&[]) > 1.0);
    eprintln!("{}: max |logit difference| {diff:.3e}", dir.display());
    assert!(diff < 1e-4, "max |logit difference| {diff}");
}
