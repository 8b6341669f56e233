//! `rankstab audit` measures what `rankstab train` measures: a run that starts from a
//! peft-made adapter (`init_adapter`) probes it at step 0, before its first update, on the
//! first batch of its training split; the audit of the same adapter on the same data split
//! must give the same rows (every module, site, statistic and order) to 1e-6 relative.
use rankstab_records::{read_table, MetricRow, MomentRow, Optimizer, RunLock, Site, Stat};
use rankstab_train::audit::{replicates, run_audit, AuditConfig};
use rankstab_train::data::{DataFormat, Dataset, Sequence};
use rankstab_train::lora::LoraInit;
use rankstab_train::run::RunMeta;
use rankstab_train::text::TextTokenizer;
use rankstab_train::trainer::{train, windows, TrainConfig};
use rankstab_train::CausalLm;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first entering \
a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the \
rightful property of some one or other of their daughters.";

fn dataset(context: usize, seed: u64) -> Dataset {
    let tok =
        TextTokenizer::from_file(&fixtures().join("tiny-llama/tokenizer.json")).expect("tokenizer");
    let ids = tok.encode(TEXT).expect("ids");
    let (train, held) = windows(&ids, context, 0.1, seed).expect("windows");
    let seq = |w: Vec<i64>| Sequence {
        mask: vec![true; w.len() - 1],
        ids: w,
    };
    let examples = train.len() + held.len();
    Dataset {
        train: train.into_iter().map(seq).collect(),
        heldout: held.into_iter().map(seq).collect(),
        pad_id: 0,
        format: DataFormat::Text,
        examples,
    }
}

fn model() -> CausalLm {
    CausalLm::from_dir(&fixtures().join("tiny-llama"), Kind::Float, Device::Cpu).expect("loads")
}

/// Rows keyed by everything the two commands share (module, layer, site, stat, m).
fn keyed(rows: &[MomentRow], step: u32) -> BTreeMap<(String, u32, Site, Stat, Option<u32>), f64> {
    rows.iter()
        .filter(|r| r.step == step)
        .map(|r| ((r.module.clone(), r.layer, r.site, r.stat, r.m), r.value))
        .collect()
}

#[test]
fn audit_rows_equal_the_trainers_step_zero_probes_of_the_same_adapter() {
    let adapter = fixtures().join("peft/tiny-llama-r8-list");
    let (context, batch, seed) = (16, 3, 5);
    let tc = TrainConfig {
        model_name: "tiny-llama".into(),
        rank: 8,
        alpha: 16.0,
        beta: 0.5,
        init: LoraInit::KaimingUniform,
        dropout: 0.0,
        optimizer: Optimizer::Sgd,
        lr: 1e-3,
        steps: 1,
        batch,
        micro_batch: 0,
        context,
        probe_every: 1,
        probe_tokens: 0,
        eval_every: 1,
        eval_at_start: false,
        norm_every: 0,
        heldout_fraction: 0.1,
        heldout_max: 0,
        target_modules: vec![],
        moments: vec![1, 2, 3, 4],
        seed,
        clip_grad_norm: None,
        weight_decay: 0.0,
        checkpoint_every: 0,
        activation_checkpointing: false,
        base_model: None,
        init_adapter: Some(adapter.clone()),
    };
    let data = dataset(context, seed);
    let tdir = tempfile::tempdir().expect("tempdir");
    let mut m = model();
    let vs = nn::VarStore::new(Device::Cpu);
    train(&mut m, &vs, &data, &tc, tdir.path(), |_| {}).expect("trains");
    let trained: Vec<MomentRow> = read_table(&tdir.path().join("moments.csv")).expect("moments");

    let adir = tempfile::tempdir().expect("tempdir");
    let out = adir.path().join("audit");
    let ac = AuditConfig {
        model_name: "tiny-llama".into(),
        batch,
        micro_batch: 0,
        context,
        batches: 1,
        seed,
        heldout_fraction: 0.1,
        heldout_max: 0,
        optimizer: Optimizer::Sgd,
        replicate: 0,
        moments: vec![1, 2, 3, 4],
    };
    let adapters = replicates(std::slice::from_ref(&adapter), 0).expect("valid");
    let lock = RunLock::exclusive(&out).expect("lock");
    let meta = RunMeta {
        tool_version: "test".into(),
        git_revision: None,
        device: "cpu".into(),
        extra: serde_json::json!({}),
    };
    let mut m = model();
    let outcomes =
        run_audit(&mut m, &data, &ac, &adapters, &out, &meta, &lock, |_| {}).expect("audits");
    let audited: Vec<MomentRow> = read_table(&out.join("moments.csv")).expect("moments");

    let (t, a) = (keyed(&trained, 0), keyed(&audited, 0));
    assert_eq!(
        a.len(),
        14 * (3 * 4 * 2 + 4),
        "14 modules: 24 moments, 4 norms each"
    );
    let mut nonzero = 0;
    for (k, av) in &a {
        let tv = t.get(k).unwrap_or_else(|| panic!("{k:?}: no training row"));
        let scale = av.abs().max(tv.abs());
        assert!(
            (av - tv).abs() <= 1e-6 * scale || scale == 0.0,
            "{k:?}: audit {av} vs train {tv}"
        );
        nonzero += usize::from(*av != 0.0);
    }
    // B is not zero: fwd and bwd moments are measured, not vacuous zeros.
    assert!(nonzero > a.len() * 3 / 4, "{nonzero} of {}", a.len());
    assert!(audited
        .iter()
        .all(|r| r.source == "audit" && r.rank == 8 && r.step == 0 && r.seed == 0));
    // The sample's loss is the trainer's step-0 loss.
    let tm: Vec<MetricRow> = read_table(&tdir.path().join("metrics.csv")).expect("metrics");
    let tloss = tm
        .iter()
        .find(|r| r.step == 0 && r.metric.as_str() == "loss")
        .expect("loss")
        .value;
    assert!(
        (outcomes[0].loss - tloss).abs() < 1e-6 * tloss,
        "{} vs {tloss}",
        outcomes[0].loss
    );
    assert!(outcomes[0].heldout_loss.is_finite());
    let manifest: rankstab_records::Manifest =
        rankstab_records::read_json(&out.join("manifest.json")).expect("manifest");
    assert_eq!(manifest.command, "audit");
    rankstab_records::verify_tables(&out, &manifest).expect("recorded sizes match");
}

/// An adapter of another rank or scaling is refused for `init_adapter`, naming the field.
#[test]
fn init_adapter_must_match_rank_alpha_and_scaling() {
    let adapter = fixtures().join("peft/tiny-llama-r8-list");
    let mut tc = TrainConfig {
        model_name: "tiny-llama".into(),
        rank: 4,
        alpha: 16.0,
        beta: 0.5,
        init: LoraInit::KaimingUniform,
        dropout: 0.0,
        optimizer: Optimizer::Sgd,
        lr: 1e-3,
        steps: 1,
        batch: 2,
        micro_batch: 0,
        context: 16,
        probe_every: 1,
        probe_tokens: 0,
        eval_every: 1,
        eval_at_start: false,
        norm_every: 0,
        heldout_fraction: 0.1,
        heldout_max: 0,
        target_modules: vec![],
        moments: vec![1, 2, 3, 4],
        seed: 0,
        clip_grad_norm: None,
        weight_decay: 0.0,
        checkpoint_every: 0,
        activation_checkpointing: false,
        base_model: None,
        init_adapter: Some(adapter.clone()),
    };
    let e = rankstab_train::trainer::check_init_adapter(&tc, &adapter)
        .expect_err("rank")
        .to_string();
    assert!(e.contains("rank: 8 -> 4") && !e.contains('\n'), "{e}");
    tc.rank = 8;
    tc.beta = 1.0;
    let e = rankstab_train::trainer::check_init_adapter(&tc, &adapter)
        .expect_err("beta")
        .to_string();
    assert!(e.contains("beta (scaling): 0.5 -> 1"), "{e}");
    tc.beta = 0.5;
    rankstab_train::trainer::check_init_adapter(&tc, &adapter).expect("matches");
}
