//! Parity with Hugging Face PEFT: adapters saved by peft's `save_pretrained` on the tiny
//! fixture models (`scripts/make_peft_fixtures.py`: r = 8, lora_alpha = 16, LoRA and
//! rsLoRA, every linear attention and MLP module, random non-zero B) are attached with
//! `inject::attach_peft`; logits match the PeftModel's and the merged model's within 1e-4,
//! unmerging restores the base weights, and `save_peft` writes back PEFT's file.
use rankstab_train::gptj::MODULES as GPTJ;
use rankstab_train::inject::attach_peft;
use rankstab_train::linear::Linear;
use rankstab_train::llama::MODULES as LLAMA;
use rankstab_train::lora::{save_peft, LoraAdapter};
use rankstab_train::CausalLm;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("json")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn base_model(name: &str) -> CausalLm {
    CausalLm::from_dir(&fixtures().join(name), Kind::Float, Device::Cpu).expect("base model loads")
}

fn string_set(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// One fixture: forward, merged forward, unmerge, save_peft round trip.
fn check(tag: &str, base: &str, rslora: bool, modules: &[&str]) {
    let dir = fixtures().join("peft").join(tag);
    let mut model = base_model(base);
    let w0: Vec<Tensor> = model
        .linears_mut()
        .into_iter()
        .map(|(_, l)| l.weight.copy())
        .collect();
    let att = attach_peft(&mut model, &dir).expect("attaches");
    let cfg = &att.config;
    assert_eq!((cfg.r, cfg.lora_alpha, cfg.use_rslora), (8, 16.0, rslora));
    let gamma = if rslora { 16.0 / 8f64.sqrt() } else { 2.0 };
    assert!((att.scaling - gamma).abs() < 1e-12, "{}", att.scaling);
    let n_layers = 2;
    assert_eq!(att.paths.len(), modules.len() * n_layers, "{:?}", att.paths);
    for (_, lin) in model.linears_mut() {
        let ad = lin.adapter.as_ref().expect("every linear is adapted");
        assert_eq!(ad.scaling, att.scaling);
        assert!(ad.b.abs().max().double_value(&[]) > 0.0, "B is not zero");
    }

    // Unmerged forward against the PeftModel.
    let r = tensors(&dir.join("reference.safetensors"));
    let ids = &r["input_ids"];
    let base_ref = tensors(&fixtures().join(base).join("reference.safetensors"));
    assert!(
        ids.equal(&base_ref["input_ids"]),
        "same ids as the base fixture"
    );
    let got = tch::no_grad(|| model.forward(ids, false));
    let diff = max_diff(&got, &r["logits"]);
    let moved = max_diff(&r["logits"], &base_ref["logits"]);
    eprintln!(
        "{tag}: max |logit - PEFT| {diff:.3e} (the adapter moves logits by up to {moved:.2})"
    );
    assert!(
        moved > 1.0,
        "the adapter hardly changes the logits ({moved}): a vacuous test"
    );
    assert!(diff < TOL, "{tag}: max |logit difference| {diff}");

    // Merged into the base weights, against merge_and_unload().
    for (path, lin) in model.linears_mut() {
        let Linear {
            weight, adapter, ..
        } = lin;
        let ad = adapter.as_mut().expect("adapted");
        ad.merge_into(weight)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(ad.is_merged());
    }
    let merged = tch::no_grad(|| model.forward(ids, false));
    let mdiff = max_diff(&merged, &r["merged_logits"]);
    eprintln!("{tag}: merged: max |logit - PEFT merge_and_unload| {mdiff:.3e}");
    assert!(mdiff < TOL, "{tag}: merged max |logit difference| {mdiff}");

    // Unmerged again: the base weights come back bit for bit (the adapter keeps the weight
    // it replaced) and the logits are the unmerged ones.
    for ((path, lin), w) in model.linears_mut().into_iter().zip(&w0) {
        let Linear {
            weight, adapter, ..
        } = lin;
        let ad = adapter.as_mut().expect("adapted");
        ad.unmerge_from(weight)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(!ad.is_merged());
        assert!(
            weight.equal(w),
            "{path}: unmerge did not restore the weight exactly"
        );
    }
    let again = tch::no_grad(|| model.forward(ids, false));
    let adiff = max_diff(&again, &got);
    eprintln!("{tag}: unmerged again: max |logit - before merging| {adiff:.3e}");
    assert!(adiff < TOL, "{adiff}");

    // save_peft writes back PEFT's file: keys, shapes, kinds, values; and its config.
    let out = tempfile::tempdir().expect("tempdir");
    save_peft(
        out.path(),
        cfg,
        &rankstab_train::inject::adapters(&mut model),
    )
    .expect("saves");
    let theirs = tensors(&dir.join("adapter_model.safetensors"));
    let ours = tensors(&out.path().join("adapter_model.safetensors"));
    assert_eq!(
        theirs.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>(),
        "key sets"
    );
    for (k, t) in &theirs {
        let o = &ours[k];
        assert_eq!((o.size(), o.kind()), (t.size(), t.kind()), "{k}");
        assert_eq!(t.kind(), Kind::Float, "{k}");
        assert!(o.equal(t), "{k}: values differ");
    }
    let pj = json(&dir.join("adapter_config.json"));
    let oj = json(&out.path().join("adapter_config.json"));
    assert_eq!(oj["r"].as_u64(), pj["r"].as_u64());
    assert_eq!(oj["lora_alpha"].as_f64(), pj["lora_alpha"].as_f64());
    assert_eq!(oj["use_rslora"].as_bool(), pj["use_rslora"].as_bool());
    assert_eq!(oj["peft_type"], pj["peft_type"]);
    assert_eq!(
        string_set(&oj["target_modules"]),
        string_set(&pj["target_modules"])
    );
    let want: BTreeSet<String> = modules.iter().map(|s| (*s).to_string()).collect();
    assert_eq!(string_set(&pj["target_modules"]), want);
}

#[test]
fn tiny_llama_lora_matches_peft() {
    check("tiny-llama-lora", "tiny-llama", false, &LLAMA);
}

#[test]
fn tiny_llama_rslora_matches_peft() {
    check("tiny-llama-rslora", "tiny-llama", true, &LLAMA);
}

#[test]
fn tiny_gptj_lora_matches_peft() {
    check("tiny-gptj-lora", "tiny-gptj", false, &GPTJ);
}

#[test]
fn tiny_gptj_rslora_matches_peft() {
    check("tiny-gptj-rslora", "tiny-gptj", true, &GPTJ);
}

/// A copy of a PEFT fixture directory to break.
fn copy_fixture(tag: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("peft").join(tag).join(f),
            tmp.path().join(f),
        )
        .expect("copy");
    }
    tmp
}

fn attach_err(base: &str, dir: &Path) -> String {
    let mut model = base_model(base);
    let e = attach_peft(&mut model, dir)
        .expect_err("refused")
        .to_string();
    for (p, l) in model.linears_mut() {
        assert!(l.adapter.is_none(), "{p}: nothing is attached on error");
    }
    e
}

#[test]
fn bad_adapter_directories_are_refused_with_the_reason() {
    // Missing files.
    let d = copy_fixture("tiny-llama-lora");
    std::fs::remove_file(d.path().join("adapter_model.safetensors")).expect("rm");
    let e = attach_err("tiny-llama", d.path());
    assert!(e.contains("no adapter_model.safetensors"), "{e}");
    let d = copy_fixture("tiny-llama-lora");
    std::fs::remove_file(d.path().join("adapter_config.json")).expect("rm");
    let e = attach_err("tiny-llama", d.path());
    assert!(e.contains("no adapter_config.json"), "{e}");
    let e = attach_err("tiny-llama", &d.path().join("nope"));
    assert!(e.contains("no such directory"), "{e}");

    // A GPT-J adapter on Llama: target modules the model lacks.
    let e = attach_err("tiny-llama", &fixtures().join("peft/tiny-gptj-lora"));
    assert!(
        e.contains("target module \"") && e.contains("does not exist in this model"),
        "{e}"
    );

    // A module path the model lacks (layer 7 of a 2-layer model).
    let d = copy_fixture("tiny-llama-lora");
    let mut t = tensors(&d.path().join("adapter_model.safetensors"));
    let a = t
        .remove("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        .expect("present");
    let b = t
        .remove("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
        .expect("present");
    t.insert(
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight".into(),
        a,
    );
    t.insert(
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight".into(),
        b,
    );
    let named: Vec<(String, Tensor)> = t.into_iter().collect();
    Tensor::write_safetensors(&named, d.path().join("adapter_model.safetensors")).expect("write");
    let e = attach_err("tiny-llama", d.path());
    assert!(
        e.contains("model.layers.7.self_attn.q_proj") && e.contains("does not exist"),
        "{e}"
    );

    // A shape that does not fit its layer: named, with both shapes.
    let d = copy_fixture("tiny-llama-lora");
    let mut t = tensors(&d.path().join("adapter_model.safetensors"));
    let k = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight";
    t.insert(k.into(), Tensor::zeros([8, 48], (Kind::Float, Device::Cpu)));
    let named: Vec<(String, Tensor)> = t.into_iter().collect();
    Tensor::write_safetensors(&named, d.path().join("adapter_model.safetensors")).expect("write");
    let e = attach_err("tiny-llama", d.path());
    assert!(
        e.contains(k) && e.contains("[8, 48]") && e.contains("expected [8, 80]"),
        "{e}"
    );

    // PEFT options rankstab does not implement.
    let d = copy_fixture("tiny-llama-lora");
    let mut c = json(&d.path().join("adapter_config.json"));
    c["use_dora"] = serde_json::Value::Bool(true);
    std::fs::write(d.path().join("adapter_config.json"), c.to_string()).expect("write");
    let e = attach_err("tiny-llama", d.path());
    assert!(e.contains("use_dora"), "{e}");
}

/// The reverse direction, run by hand (see scripts/make_peft_fixtures.py): rankstab's own
/// adapters (its Kaiming-uniform A, a random B) for LoRA, rsLoRA and beta = 0.75, saved
/// with save_peft, with rankstab's logits, into `$RANKSTAB_PEFT_EXPORT/<name>/`, for the
/// script's `--check` to load with PeftModel.from_pretrained.
#[test]
#[ignore = "writes files for scripts/make_peft_fixtures.py --check; needs RANKSTAB_PEFT_EXPORT"]
fn export_rankstab_adapters() {
    use rankstab_train::lora::{LoraConfig, LoraInit, PeftAdapterConfig};
    let root = PathBuf::from(std::env::var("RANKSTAB_PEFT_EXPORT").expect("RANKSTAB_PEFT_EXPORT"));
    for (i, (base, beta)) in [
        ("tiny-llama", 1.0),
        ("tiny-llama", 0.5),
        ("tiny-llama", 0.75),
        ("tiny-gptj", 1.0),
        ("tiny-gptj", 0.5),
    ]
    .into_iter()
    .enumerate()
    {
        tch::manual_seed(100 + i as i64);
        let mut model = base_model(base);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let lc = LoraConfig {
            rank: 4,
            alpha: 8.0,
            beta,
            init: LoraInit::KaimingUniform,
            dropout: 0.0,
            seed: None,
        };
        let mut targets = BTreeSet::new();
        for (path, lin) in model.linears_mut() {
            let vpath = path.split('.').fold(vs.root(), |p, part| p / part);
            let (out, inp) = lin.dims();
            let mut ad = LoraAdapter::new(&vpath, inp, out, &lc).expect("fits");
            tch::no_grad(|| {
                ad.b.copy_(&(Tensor::randn([out, 4], (Kind::Float, Device::Cpu)) * 0.3));
            });
            lin.adapter = Some(ad);
            targets.insert(rankstab_train::inject::module_and_layer(&path).0);
        }
        let pc = PeftAdapterConfig {
            target_modules: targets.into_iter().collect(),
            base_model_name_or_path: Some(base.into()),
            ..PeftAdapterConfig::for_scaling(4, 8.0, beta)
        };
        let dir = root.join(format!("{base}-beta{beta}"));
        save_peft(&dir, &pc, &rankstab_train::inject::adapters(&mut model)).expect("saves");
        let ids = tensors(&fixtures().join(base).join("reference.safetensors"))["input_ids"]
            .shallow_clone();
        let logits = tch::no_grad(|| model.forward(&ids, false));
        Tensor::write_safetensors(
            &[("input_ids", &ids), ("logits", &logits)],
            dir.join("rankstab_logits.safetensors"),
        )
        .expect("write");
        eprintln!("wrote {}", dir.display());
    }
}
