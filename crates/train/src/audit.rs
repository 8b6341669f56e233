//! `rankstab audit`: the training probes' statistics of adapters trained anywhere (PEFT,
//! TRL, rankstab), measured on one fixed data sample without an optimizer step.
//!
//! The base model is loaded once; each adapter (each step of a trainer's `checkpoint-*`
//! folders) is attached in turn ([`crate::inject::attach_peft`], PEFT's rules per module),
//! and the sample — the first `batches x batch` training sequences of the data file, cut
//! and split exactly as `rankstab train --seed S` cuts and splits it — goes through the
//! trainer's own forward and backward pass ([`crate::trainer::forward_backward`]) with the
//! probes on; the rows are the trainer's ([`crate::trainer::adapter_rows`]): moments
//! m = 1..4 (abs and raw) at `fwd`, `grad_out`, `bwd`, the gradient norms of A and B (of
//! the mean loss over the sample's batches), the norm and stable rank of `gamma B A`.
//! Adapter dropout is off (the statistics of the adapter itself). Rows have `source =
//! audit`, the module's own rank and alpha, the config's scaling exponent (1 LoRA, 1/2
//! rsLoRA), `step` the checkpoint's step (0 for a plain adapter directory) and `seed` the
//! replicate index ([`replicates`]). The held-out loss of the split's held-out sequences is
//! a metric row. The run directory reads in `rankstab report` as a training sweep does.
use crate::data::Dataset;
use crate::inject::{self, AttachedModule};
use crate::probe::{self, SiteSums};
use crate::run::RunMeta;
use crate::trainer::{adapter_rows, forward_backward, TrainConfig};
use crate::{CausalLm, TrainError};
use rankstab_records::{
    write_json_atomic, Manifest, Metric, MetricRow, MomentRow, Optimizer, RunLock, RunStatus,
    Scaling, TableWriter, SCHEMA_VERSION,
};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// The `source` of audit rows and the manifest's `command`.
pub const SOURCE: &str = "audit";

/// How an audit measures (the same for every adapter).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditConfig {
    /// Model name in rows.
    pub model_name: String,
    /// Sequences per batch.
    pub batch: usize,
    /// Sequences per forward/backward pass (0: the whole batch).
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub context: usize,
    /// Batches in the sample.
    pub batches: usize,
    /// Seed of the data split (as `rankstab train --seed`).
    pub seed: u64,
    /// Fraction of the sequences held out (as `rankstab train`: 0.1).
    pub heldout_fraction: f64,
    /// Held-out loss over at most this many held-out sequences (0: all).
    pub heldout_max: usize,
    /// The optimizer that trained the adapters (recorded in rows: the report groups by it).
    pub optimizer: Optimizer,
    /// The first replicate index ([`replicates`]).
    pub replicate: u64,
    /// Moment orders.
    pub moments: Vec<u32>,
}

impl AuditConfig {
    /// The trainer's configuration that runs the same passes: `steps` = batches, no
    /// optimizer step is ever taken with it.
    pub fn pass_config(&self) -> TrainConfig {
        TrainConfig {
            model_name: self.model_name.clone(),
            rank: 1,
            alpha: 1.0,
            beta: 1.0,
            init: crate::lora::LoraInit::KaimingUniform,
            dropout: 0.0,
            optimizer: self.optimizer,
            lr: 1e-3,
            steps: self.batches,
            batch: self.batch,
            micro_batch: self.micro_batch,
            context: self.context,
            probe_every: 1,
            probe_tokens: 0,
            eval_every: 0,
            eval_at_start: false,
            norm_every: 0,
            heldout_fraction: self.heldout_fraction,
            heldout_max: self.heldout_max,
            target_modules: Vec::new(),
            moments: self.moments.clone(),
            seed: self.seed,
            clip_grad_norm: None,
            weight_decay: 0.0,
            checkpoint_every: 0,
            activation_checkpointing: false,
            base_model: None,
            init_adapter: None,
        }
    }

    /// Checks every value against the trainer's bounds (the field named).
    ///
    /// # Errors
    /// As [`TrainConfig::check`] for batch, micro_batch, context, moments and seed;
    /// `batches` (as `steps`) outside 1..=10^6.
    pub fn check(&self) -> Result<(), crate::limits::OutOfRange> {
        self.pass_config().check().map_err(|mut e| {
            if e.field == "steps" {
                e.field = "batches".into();
            }
            e
        })
    }
}

/// One adapter to measure: a PEFT directory, at a step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditAdapter {
    /// The adapter directory (adapter_config.json + adapter_model.safetensors).
    pub dir: PathBuf,
    /// The step (a `checkpoint-STEP` folder's number; 0 otherwise).
    pub step: u32,
    /// The replicate index (`seed` in rows).
    pub seed: u64,
    /// Rank of the config.
    pub r: usize,
    /// Scaling exponent of the config.
    pub beta: f64,
    /// Alpha of the config (rankstab's own alpha when recorded).
    pub alpha: f64,
}

/// The adapters that `dir` holds: itself when it is a PEFT adapter directory, else every
/// `checkpoint-STEP` folder in it that is one (step = STEP), sorted by step.
///
/// # Errors
/// A directory that is neither (naming it), a `checkpoint-*` name whose suffix is not a
/// step number.
pub fn expand_dir(dir: &Path) -> Result<Vec<(PathBuf, u32)>, TrainError> {
    if dir.join("adapter_config.json").exists() {
        return Ok(vec![(dir.to_path_buf(), 0)]);
    }
    let entries = std::fs::read_dir(dir).map_err(TrainError::io(dir))?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(TrainError::io(dir))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(step) = name.strip_prefix("checkpoint-") else {
            continue;
        };
        let p = e.path();
        if !p.join("adapter_config.json").exists() {
            continue;
        }
        let step: u32 = step.parse().map_err(|_| {
            TrainError::Invalid(format!(
                "{}: a checkpoint folder is named checkpoint-STEP with STEP a number from 0 to {}",
                p.display(),
                u32::MAX
            ))
        })?;
        out.push((p, step));
    }
    if out.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: neither a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) nor a directory of checkpoint-STEP adapter folders",
            dir.display()
        )));
    }
    out.sort_by_key(|(_, s)| *s);
    Ok(out)
}

/// The audit's adapters from the directories given, every config checked before any
/// model is loaded ([`inject::check_peft`]); `seed` is the replicate index: `first` plus
/// the number of earlier adapters (in the order given) with the same rank, scaling
/// exponent, alpha and step, so that no two adapters share a row key and replicates of one
/// setting are paired across ranks by their order.
///
/// # Errors
/// Every error of [`expand_dir`] and [`inject::check_peft`]; the same adapter directory
/// twice.
pub fn replicates(dirs: &[PathBuf], first: u64) -> Result<Vec<AuditAdapter>, TrainError> {
    let mut out: Vec<AuditAdapter> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for d in dirs {
        for (dir, step) in expand_dir(d)? {
            let canon = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            if !seen.insert(canon) {
                return Err(TrainError::Invalid(format!(
                    "{}: the same adapter is given twice",
                    dir.display()
                )));
            }
            let c = inject::check_peft(&dir)?;
            let (r, beta, alpha) = (c.r, c.beta(), c.row_alpha(c.lora_alpha));
            let earlier = out
                .iter()
                .filter(|a| a.r == r && a.beta == beta && a.alpha == alpha && a.step == step)
                .count() as u64;
            out.push(AuditAdapter {
                dir,
                step,
                seed: first.saturating_add(earlier),
                r,
                beta,
                alpha,
            });
        }
    }
    Ok(out)
}

/// What one adapter measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditOutcome {
    /// The adapter.
    pub adapter: AuditAdapter,
    /// Adapted modules.
    pub modules: usize,
    /// The config's scaling gamma.
    pub scaling: f64,
    /// Mean loss per token over the sample (training mode, as the trainer's loss).
    pub loss: f64,
    /// Held-out loss per token.
    pub heldout_loss: f64,
    /// The adapters' global gradient norm (of the mean loss over the sample's batches).
    pub grad_norm: f64,
    /// Mean over modules of ||gamma B A||.
    pub delta_norm: f64,
}

/// Measures one attached adapter set: the sample's passes with the probes on, the rows,
/// the held-out loss. Gradients of the adapters are those of the mean loss over the
/// batches (accumulated, then divided by their number).
fn measure(
    model: &mut CausalLm,
    data: &Dataset,
    cfg: &AuditConfig,
    base: impl Fn(&str) -> MomentRow,
    device: Device,
) -> Result<(Vec<MomentRow>, f64, f64, f64), TrainError> {
    let pass = cfg.pass_config();
    probe::capture(model, true);
    let mut sums: Vec<[SiteSums; 3]> = Vec::new();
    let mut loss = 0.0;
    for k in 0..cfg.batches {
        let (lv, s, _) = forward_backward(model, data, &pass, k, true, device, None);
        if !lv.is_finite() {
            probe::capture(model, false);
            return Err(TrainError::Invalid(format!(
                "the loss of batch {k} of the sample is {lv}: the adapter makes the model's output non-finite"
            )));
        }
        loss += lv / cfg.batches as f64;
        for (i, site) in s.iter().enumerate() {
            if sums.len() <= i {
                sums.push(Default::default());
            }
            for (acc, part) in sums[i].iter_mut().zip(site) {
                acc.merge(part);
            }
        }
    }
    probe::capture(model, false);
    if cfg.batches > 1 {
        let scale = 1.0 / cfg.batches as f64;
        for (_, ad) in inject::adapters(model) {
            tch::no_grad(|| {
                let _ = ad.a.grad().g_mul_scalar_(scale);
                let _ = ad.b.grad().g_mul_scalar_(scale);
            });
        }
    }
    let (rows, grad_sq, _) = adapter_rows(model, &cfg.moments, base, &sums, true, true);
    let heldout = crate::loss::heldout_loss(model, data, cfg.heldout_max, pass.micro(), device);
    Ok((rows, loss, heldout, grad_sq.sqrt()))
}

/// Attaches the adapter in `dir` with trainable f32 A and B and no dropout (after removing
/// any attached before): the modules with their ranks, alphas and scalings.
fn attach_for_audit(
    model: &mut CausalLm,
    dir: &Path,
) -> Result<(crate::lora::PeftAdapterConfig, Vec<AttachedModule>), TrainError> {
    inject::detach_all(model);
    let att = inject::attach_peft(model, dir)?;
    for (_, lin) in model.linears_mut() {
        if let Some(ad) = lin.adapter.as_mut() {
            ad.a = ad.a.to_kind(Kind::Float).detach().set_requires_grad(true);
            ad.b = ad.b.to_kind(Kind::Float).detach().set_requires_grad(true);
            ad.dropout = 0.0;
        }
    }
    Ok((att.config, att.modules))
}

/// Runs the audit of `adapters` into the locked run directory `out` (manifest.json with its
/// table sizes, moments.csv, metrics.csv), calling `progress` after each adapter.
///
/// # Errors
/// A failing adapter (named), a non-finite loss, I/O; a lock of another directory.
#[allow(clippy::too_many_arguments)]
pub fn run_audit(
    model: &mut CausalLm,
    data: &Dataset,
    cfg: &AuditConfig,
    adapters: &[AuditAdapter],
    out: &Path,
    meta: &RunMeta,
    lock: &RunLock,
    mut progress: impl FnMut(&AuditOutcome),
) -> Result<Vec<AuditOutcome>, TrainError> {
    if lock.dir() != out {
        return Err(TrainError::Invalid(format!(
            "{}: the run directory is not the one locked ({})",
            out.display(),
            lock.dir().display()
        )));
    }
    cfg.check()?;
    if data.train.is_empty() || data.heldout.is_empty() {
        return Err(TrainError::Invalid(
            "the data sample needs at least one training and one held-out sequence".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let device = model.device();
    let width = model.hidden_size() as u32;
    let mut run = meta.extra.clone();
    if let Some(obj) = run.as_object_mut() {
        obj.insert("modules".into(), module_widths(model));
    }
    let mut manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        tool: "rankstab".into(),
        tool_version: meta.tool_version.clone(),
        git_revision: meta.git_revision.clone(),
        command: SOURCE.into(),
        config: serde_json::json!({ "audit": cfg, "adapters": adapters, "run": run }),
        seeds: {
            let mut s: Vec<u64> = adapters.iter().map(|a| a.seed).collect();
            s.sort_unstable();
            s.dedup();
            s
        },
        device: meta.device.clone(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        finished: None,
        status: RunStatus::Running,
        note: None,
        tables: Default::default(),
    };
    write_json_atomic(&out.join("manifest.json"), &manifest)?;
    let mut moments: TableWriter<MomentRow> = TableWriter::open(&out.join("moments.csv"))?;
    let mut metrics: TableWriter<MetricRow> = TableWriter::open(&out.join("metrics.csv"))?;
    moments.clear()?;
    metrics.clear()?;
    let mut outcomes = Vec::new();
    for ad in adapters {
        let (pc, modules) =
            attach_for_audit(model, &ad.dir).map_err(|e| e.within(ad.dir.display().to_string()))?;
        let scaling = Scaling::from_beta(ad.beta)?;
        let by_path: std::collections::BTreeMap<&str, &AttachedModule> =
            modules.iter().map(|m| (m.path.as_str(), m)).collect();
        let base = |path: &str| {
            let (module, layer) = inject::module_and_layer(path);
            let m = by_path.get(path);
            MomentRow {
                source: SOURCE.into(),
                model: cfg.model_name.clone(),
                module,
                layer,
                rank: m.map_or(ad.r, |m| m.r) as u32,
                alpha: pc.row_alpha(m.map_or(pc.lora_alpha, |m| m.alpha)),
                scaling,
                beta: ad.beta,
                optimizer: cfg.optimizer,
                inputs: "text".into(),
                dist: "text".into(),
                width,
                seed: ad.seed,
                step: ad.step,
                ..Default::default()
            }
        };
        let (rows, loss, heldout, grad_norm) = measure(model, data, cfg, base, device)
            .map_err(|e| e.within(ad.dir.display().to_string()))?;
        let deltas: Vec<f64> = rows
            .iter()
            .filter(|r| r.stat == rankstab_records::Stat::DeltaNorm)
            .map(|r| r.value)
            .collect();
        let metric = |metric: Metric, value: f64| MetricRow {
            source: SOURCE.into(),
            model: cfg.model_name.clone(),
            rank: ad.r as u32,
            scaling,
            beta: ad.beta,
            optimizer: cfg.optimizer,
            inputs: "text".into(),
            seed: ad.seed,
            step: ad.step,
            metric,
            value,
        };
        moments.append(&rows)?;
        metrics.append(&[
            metric(Metric::Loss, loss),
            metric(Metric::HeldoutLoss, heldout),
            metric(Metric::HeldoutPerplexity, heldout.exp()),
            metric(Metric::GradNorm, grad_norm),
        ])?;
        let o = AuditOutcome {
            adapter: ad.clone(),
            modules: modules.len(),
            scaling: pc.scaling(),
            loss,
            heldout_loss: heldout,
            grad_norm,
            delta_norm: deltas.iter().sum::<f64>() / deltas.len().max(1) as f64,
        };
        progress(&o);
        outcomes.push(o);
    }
    inject::detach_all(model);
    manifest.status = RunStatus::Complete;
    manifest.finished = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    manifest.tables = rankstab_records::table_sizes(out)?;
    write_json_atomic(&out.join("manifest.json"), &manifest)?;
    Ok(outcomes)
}

/// `{module: [in_features, out_features]}` of every adaptable linear (what the report
/// needs to know how far the ranks reach).
fn module_widths(model: &mut CausalLm) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (path, lin) in model.linears_mut() {
        let (module, _) = inject::module_and_layer(&path);
        let (o, i) = lin.dims();
        map.entry(module)
            .or_insert_with(|| serde_json::json!([i, o]));
    }
    serde_json::Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_adapter(dir: &Path, r: usize, alpha: f64, rslora: bool) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let mut c =
            crate::lora::PeftAdapterConfig::for_scaling(r, alpha, if rslora { 0.5 } else { 1.0 });
        c.target_modules = vec!["q_proj".to_string()].into();
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string(&c).expect("json"),
        )
        .expect("write");
        std::fs::write(dir.join("adapter_model.safetensors"), b"").expect("write");
    }

    #[test]
    fn checkpoint_folders_are_steps_and_replicates_are_counted_per_setting() {
        let d = tempfile::tempdir().expect("tempdir");
        let run = d.path().join("trainer");
        write_adapter(&run.join("checkpoint-20"), 4, 8.0, true);
        write_adapter(&run.join("checkpoint-5"), 4, 8.0, true);
        std::fs::create_dir_all(run.join("runs")).expect("mkdir");
        write_adapter(&d.path().join("a"), 4, 8.0, true);
        write_adapter(&d.path().join("b"), 4, 8.0, true);
        write_adapter(&d.path().join("c"), 8, 8.0, true);
        let dirs = [
            run.clone(),
            d.path().join("a"),
            d.path().join("b"),
            d.path().join("c"),
        ];
        let got = replicates(&dirs, 3).expect("valid");
        let summary: Vec<(u32, u64, usize)> = got.iter().map(|a| (a.step, a.seed, a.r)).collect();
        assert_eq!(
            summary,
            [(5, 3, 4), (20, 3, 4), (0, 3, 4), (0, 4, 4), (0, 3, 8)]
        );
        assert!(got[0].dir.ends_with("checkpoint-5"));
        let e = replicates(&[d.path().join("a"), d.path().join("a")], 0).expect_err("twice");
        assert!(e.to_string().contains("given twice"), "{e}");
        let e = expand_dir(&run.join("runs"))
            .expect_err("empty")
            .to_string();
        assert!(e.contains("neither a PEFT adapter directory"), "{e}");
        write_adapter(&run.join("checkpoint-x"), 4, 8.0, true);
        let e = expand_dir(&run).expect_err("bad step").to_string();
        assert!(e.contains("checkpoint-STEP"), "{e}");
    }
}
