//! One LoRA / rsLoRA adapter on libtorch, with PEFT's conventions, and PEFT's adapter
//! files (`save_peft`, `load_peft`). Which modules get adapters is `crate::inject`.
//!
//! An adapter wraps a frozen linear map `W` (out x in) and adds `gamma B A x`, with
//! `A` (r x in) and `B` (out x r), `B` initialised to zero. The scaling `gamma` comes from
//! the one formula of the project (`rankstab_records::scaling_factor`): `lora` is
//! `alpha / r`, `rslora` `alpha / sqrt(r)`, any `beta` gives `alpha * r^-beta`.
//! Merging writes `gamma B A` into `W` after a finite check and keeps the weight it
//! replaced, so unmerging restores `W` exactly (at the cost of one copy of each merged
//! weight while merged; subtracting `gamma B A` again, as PEFT does, is off by rounding).
use crate::TrainError;
use rankstab_records::scaling_factor;
use std::path::Path;
use tch::{nn, Kind, Tensor};

/// How `A` is initialised (B is always zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    KaimingUniform,
    /// PEFT's `init_lora_weights="gaussian"`: N(0, 1/r^2).
    Gaussian,
}

/// The hyper-parameters of one adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// Scaling numerator alpha.
    pub alpha: f64,
    /// Scaling exponent: 1 is LoRA, 0.5 rsLoRA.
    pub beta: f64,
    /// Init of A.
    pub init: LoraInit,
    /// Dropout on the adapter's input (training only).
    pub dropout: f64,
    /// Seed of A's draw from a ChaCha8 stream of its own, so that A depends only on this
    /// seed and not on libtorch's global generator (which other threads may use). `None`:
    /// libtorch's global generator, as `nn::Init`.
    #[serde(default)]
    pub seed: Option<u64>,
}

impl LoraConfig {
    /// gamma_r.
    pub fn scaling(&self) -> f64 {
        scaling_factor(self.alpha, self.beta, self.rank)
    }
}

/// One adapter: trainable `A` and `B`, the scaling, and whether it is merged.
#[derive(Debug)]
pub struct LoraAdapter {
    /// A (r x in).
    pub a: Tensor,
    /// B (out x r).
    pub b: Tensor,
    /// gamma_r.
    pub scaling: f64,
    /// Dropout probability.
    pub dropout: f64,
    /// The base weight as it was before merging (while merged).
    saved: Option<Tensor>,
}

/// Whether an adapter of rank `rank` fits an `out_dim x in_dim` layer: 1..=max(in, out).
///
/// # Errors
/// Rank 0 or larger than max(in, out), with the allowed range.
pub fn check_rank(rank: usize, in_dim: i64, out_dim: i64) -> Result<(), TrainError> {
    let r = rank as i64;
    if r == 0 || r > in_dim.max(out_dim) {
        return Err(TrainError::Invalid(format!(
            "rank {r} is not allowed for a {out_dim} x {in_dim} layer: use 1..={}",
            in_dim.max(out_dim)
        )));
    }
    Ok(())
}

impl LoraAdapter {
    /// Creates `lora_A` and `lora_B` variables under `path` (PEFT's names).
    ///
    /// # Errors
    /// Rank 0 or larger than max(in, out) (PEFT allows ranks above min(in, out), as for
    /// SmolLM2's 576 -> 192 key projection at r = 256; beyond max(in, out) an adapter has
    /// more parameters per factor than the dense matrix it adapts).
    pub fn new(
        path: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        cfg: &LoraConfig,
    ) -> Result<Self, TrainError> {
        check_rank(cfg.rank, in_dim, out_dim)?;
        let r = cfg.rank as i64;
        let a = match (cfg.seed, cfg.init) {
            (Some(seed), init) => {
                use rand::SeedableRng;
                use rand_distr::Distribution;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let n = (r * in_dim) as usize;
                let v: Vec<f32> = match init {
                    LoraInit::KaimingUniform => {
                        let bound = 1.0 / (in_dim as f32).sqrt();
                        let u = rand_distr::Uniform::new(-bound, bound).expect("bound > 0");
                        (0..n).map(|_| u.sample(&mut rng)).collect()
                    }
                    LoraInit::Gaussian => {
                        let g = rand_distr::Normal::new(0.0f32, 1.0 / r as f32).expect("std > 0");
                        (0..n).map(|_| g.sample(&mut rng)).collect()
                    }
                };
                let t = Tensor::from_slice(&v).view([r, in_dim]);
                let a = path.var("lora_A", &[r, in_dim], nn::Init::Const(0.0));
                tch::no_grad(|| a.shallow_clone().copy_(&t));
                a
            }
            (None, LoraInit::KaimingUniform) => {
                let bound = 1.0 / (in_dim as f64).sqrt();
                path.var(
                    "lora_A",
                    &[r, in_dim],
                    nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )
            }
            (None, LoraInit::Gaussian) => path.var(
                "lora_A",
                &[r, in_dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / r as f64,
                },
            ),
        };
        let b = path.var("lora_B", &[out_dim, r], nn::Init::Const(0.0));
        Ok(Self {
            a,
            b,
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
            saved: None,
        })
    }

    /// An adapter from given tensors, e.g. read from a PEFT file: `a` (r x in), `b`
    /// (out x r), unmerged. The tensors are used as they are (kind, device).
    ///
    /// # Errors
    /// Tensors that are not matrices, or whose ranks differ or are 0.
    pub fn from_tensors(
        a: Tensor,
        b: Tensor,
        scaling: f64,
        dropout: f64,
    ) -> Result<Self, TrainError> {
        let (asz, bsz) = (a.size(), b.size());
        if asz.len() != 2 || bsz.len() != 2 || asz[0] != bsz[1] || asz[0] == 0 {
            return Err(TrainError::Invalid(format!(
                "lora_A {asz:?} / lora_B {bsz:?} are not [r, in] and [out, r] with the same rank r >= 1"
            )));
        }
        if !scaling.is_finite() {
            return Err(TrainError::Invalid(format!(
                "scaling {scaling} is not finite"
            )));
        }
        Ok(Self {
            a,
            b,
            scaling,
            dropout,
            saved: None,
        })
    }

    /// The adapter's contribution `gamma B A dropout(x)` for `x` (..., in); `None` while
    /// merged (the base weight already carries it).
    pub fn delta(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        self.down(x, train).map(|(u, _)| self.up(&u))
    }

    /// The first factor applied, `u = dropout(x) A^T` (..., r), and the dropout mask it
    /// drew (true: kept) when dropout is on; `None` while merged. Adapters stay in their
    /// own dtype (f32) when the base model runs in bf16. [`LoraAdapter::delta`] is
    /// `up(down(x))`, so the probes, which look between the two, draw the same masks and
    /// compute the same numbers.
    pub fn down(&self, x: &Tensor, train: bool) -> Option<(Tensor, Option<Tensor>)> {
        if self.saved.is_some() {
            return None;
        }
        let x = x.to_kind(self.a.kind());
        let (x, mask) = if train && self.dropout > 0.0 {
            let (x, mask) = x.native_dropout(self.dropout, true);
            (x, Some(mask))
        } else {
            (x, None)
        };
        Some((x.matmul(&self.a.tr()), mask))
    }

    /// The second factor applied: `gamma u B^T` (..., out), with gamma applied to the
    /// rank-r `u` (r entries a token) rather than to the product (`out` entries a token,
    /// and as many again in the backward pass).
    pub fn up(&self, u: &Tensor) -> Tensor {
        (u * self.scaling).matmul(&self.b.tr())
    }

    /// `y + gamma u B^T` for the base layer's output `y` (..., out): one matrix product
    /// that accumulates into a copy of `y` (GEMM with beta = 1), instead of the product,
    /// then its sum with `y`, each a pass over (tokens, out) in both directions. When `y`
    /// is in another dtype than the adapter (a bf16 base), the product is converted first.
    pub fn add_up(&self, y: &Tensor, u: &Tensor) -> Tensor {
        let shape = y.size();
        let (out, r) = (self.b.size()[0], self.b.size()[1]);
        self.add_up_rows(&y.reshape([-1, out]), &u.reshape([-1, r]))
            .reshape(shape)
    }

    /// [`LoraAdapter::add_up`] on flattened rows: `y` (tokens, out), `u` (tokens, r). The
    /// result is a new tensor, not a view, so that it can be changed in place.
    pub fn add_up_rows(&self, y: &Tensor, u: &Tensor) -> Tensor {
        if y.kind() != self.b.kind() || y.device() != self.b.device() {
            return y + self.up(u).to_kind(y.kind());
        }
        y.addmm(&(u * self.scaling), &self.b.tr())
    }

    /// `gamma B A` (out x in).
    pub fn weight_delta(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scaling
    }

    /// Whether the adapter is merged into its base weight.
    pub fn is_merged(&self) -> bool {
        self.saved.is_some()
    }

    /// Adds `gamma B A` to `w` in place, after checking it is finite.
    ///
    /// # Errors
    /// Already merged, a shape mismatch, or a non-finite adapter.
    pub fn merge_into(&mut self, w: &mut Tensor) -> Result<(), TrainError> {
        if self.saved.is_some() {
            return Err(TrainError::Invalid("adapter is already merged".into()));
        }
        let d = tch::no_grad(|| self.weight_delta().to_kind(w.kind()));
        if d.size() != w.size() {
            return Err(TrainError::Invalid(format!(
                "adapter shape {:?} does not match weight {:?}",
                d.size(),
                w.size()
            )));
        }
        let finite = tch::no_grad(|| d.isfinite().all().int64_value(&[])) == 1;
        if !finite {
            return Err(TrainError::Invalid(
                "adapter has non-finite entries: refusing to merge".into(),
            ));
        }
        self.saved = Some(tch::no_grad(|| w.copy()));
        tch::no_grad(|| {
            let _ = w.g_add_(&d);
        });
        Ok(())
    }

    /// Restores `w` to the weight it was before [`Self::merge_into`], exactly.
    ///
    /// # Errors
    /// Not merged, or `w` is not the weight it was merged into (another shape).
    pub fn unmerge_from(&mut self, w: &mut Tensor) -> Result<(), TrainError> {
        let Some(saved) = self.saved.take() else {
            return Err(TrainError::Invalid("adapter is not merged".into()));
        };
        if saved.size() != w.size() {
            let e = format!(
                "unmerge: weight {:?} is not the {:?} weight this adapter was merged into",
                w.size(),
                saved.size()
            );
            self.saved = Some(saved);
            return Err(TrainError::Invalid(e));
        }
        tch::no_grad(|| w.copy_(&saved));
        Ok(())
    }
}

/// PEFT's `adapter_config.json` (the fields rankstab writes and reads).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeftAdapterConfig {
    /// Always "LORA".
    pub peft_type: String,
    /// Always "CAUSAL_LM".
    #[serde(default)]
    pub task_type: String,
    /// Rank.
    pub r: usize,
    /// alpha.
    pub lora_alpha: f64,
    /// Whether the scaling is alpha / sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
    /// Adapted modules: names (q_proj, ...), `"all-linear"`, or a regular expression over
    /// module names ([`crate::peft`] says how each is matched, as PEFT does).
    pub target_modules: crate::peft::TargetModules,
    /// Only modules of these layers (PEFT's `layers_to_transform`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<crate::peft::OneOrMany<i64>>,
    /// The module-list names that precede layer indexes (PEFT's `layers_pattern`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_pattern: Option<crate::peft::OneOrMany<String>>,
    /// Per-module ranks: module pattern -> r (PEFT's `rank_pattern`, first match wins).
    #[serde(default, skip_serializing_if = "crate::peft::OrderedMap::is_empty")]
    pub rank_pattern: crate::peft::OrderedMap<usize>,
    /// Per-module alphas: module pattern -> alpha (PEFT's `alpha_pattern`).
    #[serde(default, skip_serializing_if = "crate::peft::OrderedMap::is_empty")]
    pub alpha_pattern: crate::peft::OrderedMap<f64>,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Base model name or path.
    pub base_model_name_or_path: Option<String>,
    /// "none".
    #[serde(default = "bias_none")]
    pub bias: String,
    /// PEFT's init flag: true (Kaiming-uniform) or "gaussian".
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    /// Not used by rankstab; kept for PEFT.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rankstab's exponent (PEFT ignores unknown keys); present for beta other than 1, 1/2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rankstab_beta: Option<f64>,
    /// rankstab's alpha when `rankstab_beta` is present: `lora_alpha` then holds
    /// `alpha * r^(1 - beta)`, so that PEFT's `lora_alpha / r` is `alpha * r^-beta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rankstab_alpha: Option<f64>,
}

fn bias_none() -> String {
    "none".into()
}

impl PeftAdapterConfig {
    /// The scaling exponent: `rankstab_beta` when present, else 1/2 with `use_rslora`, else 1.
    pub fn beta(&self) -> f64 {
        match self.rankstab_beta {
            Some(b) => b,
            None if self.use_rslora => 0.5,
            None => 1.0,
        }
    }

    /// gamma_r as PEFT computes it: `lora_alpha / sqrt(r)` with `use_rslora`, else
    /// `lora_alpha / r` (for any other beta, `lora_alpha` is written as
    /// `alpha * r^(1 - beta)`, see [`Self::for_scaling`]). Files written before
    /// `rankstab_alpha` existed carry the plain alpha: `lora_alpha * r^-rankstab_beta`.
    pub fn scaling(&self) -> f64 {
        self.scaling_at(self.r, self.lora_alpha)
    }

    /// gamma of a module of rank `r` and alpha `alpha` (from `rank_pattern` /
    /// `alpha_pattern`, or the config's own): `alpha / sqrt(r)` with `use_rslora`, else
    /// `alpha / r`, as PEFT's `update_layer` computes it.
    pub fn scaling_at(&self, r: usize, alpha: f64) -> f64 {
        let rf = r as f64;
        match (self.rankstab_beta, self.rankstab_alpha) {
            (Some(b), None) => scaling_factor(alpha, b, r),
            _ if self.use_rslora => alpha / rf.sqrt(),
            _ => alpha / rf,
        }
    }

    /// The alpha that rows record for a module of PEFT alpha `alpha`: rankstab's own alpha
    /// when the file carries it (`rankstab_alpha`), else `alpha`.
    pub fn row_alpha(&self, alpha: f64) -> f64 {
        self.rankstab_alpha.unwrap_or(alpha)
    }

    /// The configuration PEFT needs for `gamma = alpha * r^-beta`: `use_rslora` for
    /// beta = 1/2, plain LoRA for beta = 1, and for any other beta plain LoRA with
    /// `lora_alpha = alpha * r^(1 - beta)` (and rankstab's own alpha and beta recorded), so
    /// that `PeftModel.from_pretrained` computes the same scaling.
    pub fn for_scaling(r: usize, alpha: f64, beta: f64) -> Self {
        let generic = beta != 0.5 && beta != 1.0;
        Self {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r,
            lora_alpha: if generic {
                alpha * (r as f64).powf(1.0 - beta)
            } else {
                alpha
            },
            use_rslora: beta == 0.5,
            target_modules: Default::default(),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            lora_dropout: 0.0,
            base_model_name_or_path: None,
            bias: "none".into(),
            init_lora_weights: serde_json::Value::Bool(true),
            fan_in_fan_out: false,
            rankstab_beta: generic.then_some(beta),
            rankstab_alpha: generic.then_some(alpha),
        }
    }
}

/// Saves adapters as PEFT does: `adapter_config.json` and `adapter_model.safetensors`
/// with keys `base_model.model.<module path>.lora_A.weight` ([r, in]) and `...lora_B.weight`
/// ([out, r]).
///
/// # Errors
/// I/O or libtorch errors.
pub fn save_peft(
    dir: &Path,
    cfg: &PeftAdapterConfig,
    adapters: &[(String, &LoraAdapter)],
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    let cfg_path = dir.join("adapter_config.json");
    let json = serde_json::to_string_pretty(cfg).map_err(|source| TrainError::Json {
        path: cfg_path.clone(),
        source,
    })?;
    std::fs::write(&cfg_path, json).map_err(TrainError::io(&cfg_path))?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (path, ad) in adapters {
        named.push((
            format!("base_model.model.{path}.lora_A.weight"),
            ad.a.detach().to_kind(Kind::Float).contiguous(),
        ));
        named.push((
            format!("base_model.model.{path}.lora_B.weight"),
            ad.b.detach().to_kind(Kind::Float).contiguous(),
        ));
    }
    let file = dir.join("adapter_model.safetensors");
    Tensor::write_safetensors(&named, &file)
        .map_err(TrainError::torch(format!("writing {}", file.display())))
}

/// Reads a PEFT adapter directory: its config and the (A, B) pair of every module path.
///
/// # Errors
/// Missing files, malformed JSON, missing or mis-shaped tensors (named).
#[allow(clippy::type_complexity)]
pub fn load_peft(
    dir: &Path,
) -> Result<(PeftAdapterConfig, Vec<(String, Tensor, Tensor)>), TrainError> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg = crate::peft::validate_config_file(&cfg_path)?;
    let matcher = crate::peft::ModuleMatcher::new(&cfg_path, &cfg)?;
    let file = dir.join("adapter_model.safetensors");
    let tensors = crate::weights::read_safetensors(&file, crate::weights::MAX_WEIGHT_FILE_BYTES)?;
    for (name, t) in &tensors {
        if let Err(bad) = crate::weights::check_finite(t) {
            return Err(TrainError::Invalid(format!(
                "{}: tensor {name} holds {bad} NaN or infinite value(s): a damaged adapter (only finite weights are loaded)",
                file.display()
            )));
        }
    }
    let mut a_map = std::collections::BTreeMap::new();
    let mut b_map = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        let stripped = name
            .strip_prefix("base_model.model.")
            .unwrap_or(&name)
            .to_string();
        if let Some(p) = stripped.strip_suffix(".lora_A.weight") {
            a_map.insert(p.to_string(), t);
        } else if let Some(p) = stripped.strip_suffix(".lora_B.weight") {
            b_map.insert(p.to_string(), t);
        } else {
            return Err(TrainError::Invalid(format!(
                "{}: unexpected tensor {name}",
                file.display()
            )));
        }
    }
    let mut out = Vec::new();
    for (p, a) in a_map {
        let b = b_map.remove(&p).ok_or_else(|| {
            TrainError::Invalid(format!("{}: {p}.lora_B.weight is missing", file.display()))
        })?;
        let (asz, bsz) = (a.size(), b.size());
        let r = matcher.rank_alpha(&p).0 as i64;
        if asz.len() != 2 || bsz.len() != 2 || asz[0] != r || bsz[1] != r {
            return Err(TrainError::Invalid(format!(
                "{}: {p}: lora_A {asz:?} / lora_B {bsz:?} do not have rank r = {r} ([r, in] and [out, r]; r and rank_pattern of adapter_config.json)",
                file.display(),
            )));
        }
        out.push((p, a, b));
    }
    if let Some(p) = b_map.keys().next() {
        return Err(TrainError::Invalid(format!(
            "{}: {p}.lora_A.weight is missing",
            file.display()
        )));
    }
    Ok((cfg, out))
}

/// Largest |alpha| and |gamma_r| accepted from an adapter file: the paper's alphas are
/// 8..64, and a scaling beyond 1e6 multiplies the adapter's output into overflow.
pub const MAX_ADAPTER_ALPHA: f64 = 1e6;

/// The numbers of an adapter config that change what it computes: a rank of 1..=2^20,
/// finite alphas and betas of sane size, a dropout in [0, 1), a finite scaling.
pub(crate) fn check_adapter_numbers(path: &Path, c: &PeftAdapterConfig) -> Result<(), TrainError> {
    use crate::weights::field_error;
    if c.r == 0 || c.r > 1 << 20 {
        return Err(field_error(path, "r", c.r, "an integer from 1 to 1048576"));
    }
    let alpha_ok = |a: f64| a.is_finite() && a.abs() <= MAX_ADAPTER_ALPHA;
    let allowed = format!("a finite number of magnitude at most {MAX_ADAPTER_ALPHA:e}");
    if !alpha_ok(c.lora_alpha) {
        return Err(field_error(path, "lora_alpha", c.lora_alpha, &allowed));
    }
    if let Some(a) = c.rankstab_alpha.filter(|&a| !alpha_ok(a)) {
        return Err(field_error(path, "rankstab_alpha", a, &allowed));
    }
    if let Some(b) = c
        .rankstab_beta
        .filter(|b| !(b.is_finite() && b.abs() <= 16.0))
    {
        return Err(field_error(
            path,
            "rankstab_beta",
            b,
            "a finite number in [-16, 16]",
        ));
    }
    if !(c.lora_dropout.is_finite() && (0.0..1.0).contains(&c.lora_dropout)) {
        return Err(field_error(
            path,
            "lora_dropout",
            c.lora_dropout,
            "a number in [0, 1)",
        ));
    }
    let g = c.scaling();
    if !alpha_ok(g) {
        return Err(field_error(
            path,
            "the scaling (lora_alpha, r, use_rslora, rankstab_beta)",
            g,
            &allowed,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    fn cfg(rank: usize, beta: f64) -> LoraConfig {
        LoraConfig {
            rank,
            alpha: 16.0,
            beta,
            init: LoraInit::KaimingUniform,
            dropout: 0.0,
            seed: None,
        }
    }

    #[test]
    fn scaling_is_alpha_over_r_or_sqrt_r() {
        assert_eq!(cfg(8, 1.0).scaling(), 2.0);
        assert_eq!(cfg(64, 0.5).scaling(), 2.0);
    }

    #[test]
    fn init_follows_peft_and_the_adapter_starts_at_zero() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let ad = LoraAdapter::new(&(vs.root() / "q_proj"), 64, 32, &cfg(4, 0.5)).expect("valid");
        assert_eq!(ad.a.size(), vec![4, 64]);
        assert_eq!(ad.b.size(), vec![32, 4]);
        let bound = 1.0 / 8.0;
        assert!(ad.a.abs().max().double_value(&[]) <= bound);
        // Uniform(-b, b) has variance b^2 / 3.
        let var =
            ad.a.pow_tensor_scalar(2)
                .mean(Kind::Float)
                .double_value(&[]);
        assert!(
            (var / (bound * bound / 3.0) - 1.0).abs() < 0.2,
            "variance {var}"
        );
        assert_eq!(ad.b.abs().sum(Kind::Float).double_value(&[]), 0.0);
        let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
        let d = ad.delta(&x, true).expect("not merged");
        assert_eq!(d.size(), vec![3, 32]);
        assert_eq!(d.abs().sum(Kind::Float).double_value(&[]), 0.0);
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(
            names.contains(&"q_proj.lora_A".to_string())
                && names.contains(&"q_proj.lora_B".to_string()),
            "{names:?}"
        );
    }

    /// With a seed, A comes from its own stream: equal for equal seeds whatever libtorch's
    /// global generator does, different for another seed, and PEFT's distribution
    /// (U(-1/sqrt(in), 1/sqrt(in)): variance 1/(3 in)).
    #[test]
    fn seeded_init_is_reproducible_and_kaiming_uniform() {
        let vs = nn::VarStore::new(Device::Cpu);
        let seeded = |seed| LoraConfig {
            seed: Some(seed),
            ..cfg(32, 0.5)
        };
        let a1 = LoraAdapter::new(&(vs.root() / "x"), 256, 64, &seeded(7))
            .expect("valid")
            .a;
        tch::manual_seed(123);
        let a2 = LoraAdapter::new(&(vs.root() / "y"), 256, 64, &seeded(7))
            .expect("valid")
            .a;
        let a3 = LoraAdapter::new(&(vs.root() / "z"), 256, 64, &seeded(8))
            .expect("valid")
            .a;
        assert!(a1.equal(&a2) && !a1.equal(&a3));
        let bound = 1.0 / 16.0;
        assert!(a1.abs().max().double_value(&[]) <= bound);
        let var = a1.square().mean(Kind::Double).double_value(&[]);
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn rank_zero_or_too_large_is_refused() {
        let vs = nn::VarStore::new(Device::Cpu);
        assert!(LoraAdapter::new(&vs.root(), 8, 8, &cfg(0, 1.0)).is_err());
        // Above min(in, out) is allowed (as in PEFT), above max(in, out) is not.
        assert!(LoraAdapter::new(&vs.root(), 8, 6, &cfg(7, 1.0)).is_ok());
        let e = LoraAdapter::new(&vs.root(), 8, 6, &cfg(9, 1.0)).expect_err("too large");
        assert!(e.to_string().contains("1..=8"), "{e}");
    }

    #[test]
    fn merge_equals_adapter_forward_and_unmerge_restores_the_weight() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut ad = LoraAdapter::new(&vs.root(), 16, 12, &cfg(4, 0.5)).expect("valid");
        tch::no_grad(|| {
            ad.b.copy_(&Tensor::randn([12, 4], (Kind::Float, Device::Cpu)));
        });
        let w0 = Tensor::randn([12, 16], (Kind::Float, Device::Cpu));
        let mut w = w0.copy();
        let x = Tensor::randn([5, 16], (Kind::Float, Device::Cpu));
        let unmerged = x.matmul(&w.tr()) + ad.delta(&x, false).expect("not merged");
        ad.merge_into(&mut w).expect("finite");
        assert!(ad.delta(&x, false).is_none());
        let merged = x.matmul(&w.tr());
        assert!((merged - &unmerged).abs().max().double_value(&[]) < 1e-5);
        assert!(ad.merge_into(&mut w).is_err(), "double merge");
        assert!(!w.equal(&w0));
        ad.unmerge_from(&mut w).expect("merged");
        assert!(w.equal(&w0), "unmerge restores the weight exactly");
        assert!(ad.unmerge_from(&mut w).is_err(), "double unmerge");
    }

    #[test]
    fn non_finite_adapter_is_not_merged() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut ad = LoraAdapter::new(&vs.root(), 4, 4, &cfg(2, 1.0)).expect("valid");
        tch::no_grad(|| {
            let _ = ad.b.fill_(f64::NAN);
        });
        let mut w = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
        let e = ad.merge_into(&mut w).expect_err("NaN");
        assert!(e.to_string().contains("non-finite"));
        assert_eq!(
            w.abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "weight untouched"
        );
    }

    #[test]
    fn peft_files_round_trip_with_peft_names_and_shapes() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut q = LoraAdapter::new(&(vs.root() / "q"), 8, 6, &cfg(3, 0.5)).expect("valid");
        let v = LoraAdapter::new(&(vs.root() / "v"), 8, 6, &cfg(3, 0.5)).expect("valid");
        tch::no_grad(|| {
            q.b.copy_(&Tensor::randn([6, 3], (Kind::Float, Device::Cpu)));
        });
        let pc = PeftAdapterConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: 3,
            lora_alpha: 16.0,
            use_rslora: true,
            target_modules: vec!["q_proj".to_string(), "v_proj".to_string()].into(),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            lora_dropout: 0.0,
            base_model_name_or_path: Some("tiny".into()),
            bias: "none".into(),
            init_lora_weights: serde_json::Value::Bool(true),
            fan_in_fan_out: false,
            rankstab_beta: None,
            rankstab_alpha: None,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = [
            ("model.layers.0.self_attn.q_proj".to_string(), &q),
            ("model.layers.0.self_attn.v_proj".to_string(), &v),
        ];
        save_peft(dir.path(), &pc, &paths).expect("saved");
        let raw =
            Tensor::read_safetensors(dir.path().join("adapter_model.safetensors")).expect("read");
        let names: Vec<&str> = raw.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            "{names:?}"
        );
        let (back_cfg, back) = load_peft(dir.path()).expect("loaded");
        assert_eq!(back_cfg, pc);
        assert_eq!(back.len(), 2);
        let (p, a, b) = &back[0];
        assert_eq!(p, "model.layers.0.self_attn.q_proj");
        assert_eq!(a.size(), vec![3, 8]);
        assert_eq!(b.size(), vec![6, 3]);
        assert_eq!((a - &q.a).abs().max().double_value(&[]), 0.0);
        assert_eq!((b - &q.b).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn peft_config_scaling_and_adapters_from_tensors() {
        let mut pc: PeftAdapterConfig = serde_json::from_str(
            r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,"use_rslora":false,
               "target_modules":["q_proj"],"lora_dropout":0.0,"base_model_name_or_path":null,"bias":"none",
               "init_lora_weights":true}"#,
        )
        .expect("PEFT's integer lora_alpha reads as a number");
        assert_eq!((pc.beta(), pc.scaling()), (1.0, 2.0));
        pc.use_rslora = true;
        assert_eq!((pc.beta(), pc.scaling()), (0.5, 16.0 / 8f64.sqrt()));
        pc.rankstab_beta = Some(0.75);
        assert_eq!(pc.beta(), 0.75);
        assert!((pc.scaling() - 16.0 * 8f64.powf(-0.75)).abs() < 1e-12);
        // What rankstab writes for beta = 0.75: PEFT's lora_alpha / r gives alpha r^-beta.
        let w = PeftAdapterConfig::for_scaling(8, 16.0, 0.75);
        assert!(!w.use_rslora && (w.lora_alpha / 8.0 - 16.0 * 8f64.powf(-0.75)).abs() < 1e-12);
        assert!((w.scaling() - 16.0 * 8f64.powf(-0.75)).abs() < 1e-12);
        assert_eq!(w.beta(), 0.75);
        for (beta, rs) in [(0.5, true), (1.0, false)] {
            let w = PeftAdapterConfig::for_scaling(8, 16.0, beta);
            assert_eq!(
                (w.use_rslora, w.lora_alpha, w.rankstab_beta),
                (rs, 16.0, None)
            );
            assert!((w.scaling() - scaling_factor(16.0, beta, 8)).abs() < 1e-12);
        }
        let z = |r: i64, c: i64| Tensor::zeros([r, c], (Kind::Float, Device::Cpu));
        let ad = LoraAdapter::from_tensors(z(2, 5), z(3, 2), 1.5, 0.0).expect("fits");
        assert!(!ad.is_merged());
        assert_eq!(ad.weight_delta().size(), vec![3, 5]);
        assert!(LoraAdapter::from_tensors(z(2, 5), z(3, 4), 1.0, 0.0).is_err());
        assert!(LoraAdapter::from_tensors(z(0, 5), z(3, 0), 1.0, 0.0).is_err());
        assert!(LoraAdapter::from_tensors(z(2, 5), z(3, 2), f64::NAN, 0.0).is_err());
    }

    #[test]
    fn loading_names_the_missing_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("adapter_config.json"),
            r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":2,"lora_alpha":4,"use_rslora":false,
               "target_modules":["q_proj"],"lora_dropout":0.0,"base_model_name_or_path":null,"bias":"none",
               "init_lora_weights":true}"#,
        )
        .expect("write");
        let a = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(
            &[("base_model.model.m.q_proj.lora_A.weight", &a)],
            dir.path().join("adapter_model.safetensors"),
        )
        .expect("write");
        let e = load_peft(dir.path()).expect_err("B missing");
        assert!(
            e.to_string().contains("m.q_proj.lora_B.weight is missing"),
            "{e}"
        );
    }
}
