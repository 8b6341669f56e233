//! PEFT LoraConfig options against peft itself: adapters peft made for the tiny Llama
//! fixture (`scripts/make_peft_fixtures.py --ranks`) with `target_modules="all-linear"`, a
//! regular expression, a list, and `layers_to_transform` + `rank_pattern` +
//! `alpha_pattern`. rankstab must adapt exactly the modules peft adapted, each with peft's
//! r, alpha and scaling (reference.json), and give peft's logits; bad configs are refused
//! with one line before any model is loaded.
use rankstab_train::inject::{attach_peft, check_peft};
use rankstab_train::CausalLm;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("json")
}

fn base_model() -> CausalLm {
    CausalLm::from_dir(&fixtures().join("tiny-llama"), Kind::Float, Device::Cpu).expect("loads")
}

/// peft's modules of a fixture: path -> (r, lora_alpha, scaling).
fn peft_modules(dir: &Path) -> BTreeMap<String, (usize, f64, f64)> {
    let r = json(&dir.join("reference.json"));
    r["modules"]
        .as_object()
        .expect("modules")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (
                    v["r"].as_u64().expect("r") as usize,
                    v["lora_alpha"].as_f64().expect("alpha"),
                    v["scaling"].as_f64().expect("scaling"),
                ),
            )
        })
        .collect()
}

/// Attaches `dir` and checks modules, ranks, alphas, scalings and logits against peft's.
fn check_against_peft(dir: &Path, reference: &Path) {
    let want = peft_modules(reference);
    let mut model = base_model();
    let att = attach_peft(&mut model, dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let got: BTreeMap<String, (usize, f64, f64)> = att
        .modules
        .iter()
        .map(|m| (m.path.clone(), (m.r, m.alpha, m.scaling)))
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{}: the modules peft adapted",
        dir.display()
    );
    for (p, (r, a, s)) in &want {
        let (gr, ga, gs) = got[p];
        assert_eq!(gr, *r, "{p}: r");
        assert!((ga - a).abs() < 1e-12, "{p}: alpha {ga} vs peft {a}");
        assert!(
            (gs - s).abs() < 1e-12 * s.abs().max(1.0),
            "{p}: scaling {gs} vs peft {s}"
        );
    }
    let refs: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(reference.join("reference.safetensors"))
            .expect("reference")
            .into_iter()
            .collect();
    let logits = tch::no_grad(|| model.forward(&refs["input_ids"], false));
    let diff = (logits - &refs["logits"]).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "{}: max |logit - peft| {diff}", dir.display());
}

#[test]
fn regex_list_and_patterns_match_peft_modules_ranks_scalings_and_logits() {
    for tag in [
        "tiny-llama-r4-regex",
        "tiny-llama-r8-list",
        "tiny-llama-patterns",
    ] {
        let d = fixtures().join("peft").join(tag);
        check_against_peft(&d, &d);
    }
    // The patterns fixture really has several ranks and scalings.
    let m = peft_modules(&fixtures().join("peft/tiny-llama-patterns"));
    let ranks: std::collections::BTreeSet<usize> = m.values().map(|v| v.0).collect();
    assert!(ranks.len() >= 3, "{ranks:?}");
    assert!(
        m.keys().all(|k| k.contains("layers.1.")),
        "layers_to_transform = [1]"
    );
}

/// peft saves the list it expanded "all-linear" to; the same adapter with the config saying
/// "all-linear" (as a TRL or hand-written config does) adapts the same modules: every linear
/// but lm_head.
#[test]
fn all_linear_is_every_linear_but_the_head() {
    let src = fixtures().join("peft/tiny-llama-r2-all-linear");
    let asked = json(&src.join("reference.json"))["asked"]["target_modules"].clone();
    assert_eq!(asked, "all-linear");
    check_against_peft(&src, &src);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .expect("copy");
    let mut cfg = json(&src.join("adapter_config.json"));
    cfg["target_modules"] = "all-linear".into();
    std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).expect("write");
    check_against_peft(tmp.path(), &src);
    assert!(peft_modules(&src).keys().all(|k| !k.contains("lm_head")));
    assert_eq!(peft_modules(&src).len(), 14);
}

/// Bad configs: one line naming the file and the field, found by `check_peft` (which runs
/// before any model is loaded).
#[test]
fn bad_configs_are_refused_before_loading_the_model() {
    let src = fixtures().join("peft/tiny-llama-patterns");
    for (field, value, named) in [
        (
            "target_modules",
            serde_json::json!("(unclosed"),
            "target_modules",
        ),
        (
            "layers_to_transform",
            serde_json::json!(["one"]),
            "layers_to_transform",
        ),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 0}),
            "rank_pattern",
        ),
        (
            "alpha_pattern",
            serde_json::json!({"q_proj": "big"}),
            "alpha_pattern",
        ),
        ("use_dora", serde_json::json!(true), "use_dora"),
        ("bias", serde_json::json!("lora_only"), "bias"),
        ("r", serde_json::json!(0), "r"),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            tmp.path().join("adapter_model.safetensors"),
        )
        .expect("copy");
        let mut cfg = json(&src.join("adapter_config.json"));
        cfg[field] = value;
        std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).expect("write");
        let e = check_peft(tmp.path()).expect_err(field).to_string();
        assert!(
            e.contains(named) && e.contains("adapter_config.json") && !e.contains('\n'),
            "{field}: {e}"
        );
    }
    check_peft(&src).expect("the fixture itself is valid");
}
