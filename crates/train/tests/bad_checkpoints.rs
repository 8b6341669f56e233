//! Bad checkpoints give one clear error naming the file, tensor or value — never a panic.
use rankstab_train::CausalLm;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// A copy of the tiny Llama with `edit` applied.
fn variant(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join(f), dir.path().join(f)).expect("copy");
    }
    edit(dir.path());
    dir
}

fn load_err(dir: &Path) -> String {
    CausalLm::from_dir(dir, Kind::Float, Device::Cpu)
        .expect_err("must fail")
        .to_string()
}

fn rewrite_tensors(dir: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = dir.join("model.safetensors");
    let mut t = Tensor::read_safetensors(&p).expect("read");
    f(&mut t);
    Tensor::write_safetensors(&t, &p).expect("write");
}

#[test]
fn missing_config_names_the_file() {
    let d = variant(|d| std::fs::remove_file(d.join("config.json")).expect("rm"));
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn malformed_config_names_the_file() {
    let d =
        variant(|d| std::fs::write(d.join("config.json"), "{ \"model_type\": ").expect("write"));
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

#[test]
fn unknown_model_type_lists_the_supported_ones() {
    let d = variant(|d| {
        std::fs::write(d.join("config.json"), r#"{"model_type": "mamba"}"#).expect("write")
    });
    let e = load_err(d.path());
    assert!(e.contains("mamba") && e.contains("llama, gptj"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = variant(|d| {
        rewrite_tensors(d, |t| {
            t.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        })
    });
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let d = variant(|d| {
        rewrite_tensors(d, |t| {
            for (n, v) in t.iter_mut() {
                if n == "model.layers.0.self_attn.k_proj.weight" {
                    *v = Tensor::zeros([24, 48], (Kind::Float, Device::Cpu));
                }
            }
        })
    });
    let e = load_err(d.path());
    assert!(
        e.contains("k_proj.weight") && e.contains("[24, 48]") && e.contains("[16, 48]"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_is_an_error_naming_the_file() {
    let d = variant(|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p).expect("read");
        std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("write");
    });
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn pickle_checkpoint_is_refused_with_advice() {
    let d = variant(|d| {
        std::fs::remove_file(d.join("model.safetensors")).expect("rm");
        std::fs::write(d.join("pytorch_model.bin"), b"not really a pickle").expect("write");
    });
    let e = load_err(d.path());
    assert!(
        e.contains("pickle") && e.contains("safe_serialization=True"),
        "{e}"
    );
}

#[test]
fn bf16_and_f16_checkpoints_load_and_agree_with_f32() {
    let f32_model = CausalLm::from_dir(&tiny(), Kind::Float, Device::Cpu).expect("loads");
    let ids = Tensor::from_slice(&[1i64, 5, 9, 33, 2, 7]).view([1, 6]);
    let want = tch::no_grad(|| f32_model.forward(&ids, false));
    for kind in [Kind::BFloat16, Kind::Half] {
        let d = variant(|d| {
            rewrite_tensors(d, |t| t.iter_mut().for_each(|(_, v)| *v = v.to_kind(kind)))
        });
        let m = CausalLm::from_dir(d.path(), Kind::Float, Device::Cpu).expect("loads");
        let got = tch::no_grad(|| m.forward(&ids, false));
        let diff = (&got - &want).abs().max().double_value(&[]);
        // Only the rounding of the stored weights differs.
        let tol = if kind == Kind::BFloat16 { 0.3 } else { 0.02 };
        assert!(diff < tol, "{kind:?}: {diff}");
    }
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let tok = rankstab_train::text::TextTokenizer::from_file(&tiny().join("tokenizer.json"))
        .expect("tokenizer");
    let e = tok
        .check_fits(&tiny().join("tokenizer.json"), 50)
        .expect_err("97 > 50")
        .to_string();
    assert!(e.contains("does not fit") && e.contains("50 rows"), "{e}");
}

#[test]
fn empty_and_non_utf8_texts_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").expect("write");
    assert!(rankstab_train::text::read_text(&empty)
        .expect_err("empty")
        .to_string()
        .contains("empty"));
    let bin = dir.path().join("bin.txt");
    std::fs::write(&bin, [0x66u8, 0x6f, 0xff, 0xfe]).expect("write");
    let e = rankstab_train::text::read_text(&bin)
        .expect_err("binary")
        .to_string();
    assert!(e.contains("not UTF-8") && e.contains("offset 2"), "{e}");
}
