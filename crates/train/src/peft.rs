//! PEFT's `LoraConfig` semantics for the options rankstab reads: which modules an adapter
//! config targets and with which rank and alpha, written as peft 0.21 computes them
//! (`tuners_utils.check_target_module_exists`, `utils.other.get_pattern_key`,
//! `LoraModel._create_and_replace`):
//!
//! - `target_modules` a list: a module is targeted when its full name is in the list or
//!   ends with `.` + an entry; the string `"all-linear"`: every linear layer but the output
//!   head (rankstab's adaptable linears are exactly those); any other string: a regular
//!   expression that must match the module's full name (`re.fullmatch`).
//! - `layers_to_transform` (an index or a list) with `layers_pattern` (a name or a list):
//!   with a list of target modules, only modules of those layers (the first number after
//!   `<pattern>.`, or without a pattern the first number after `.<name>.`).
//! - `rank_pattern`, `alpha_pattern` (dicts): the first key, in the file's order, that
//!   matches the module name as `(.*\.)?KEY$` gives its r / alpha.
//!
//! [`validate_config_file`] checks a config file against all of this before any model is
//! loaded; [`ModuleMatcher`] answers per module.
use crate::lora::PeftAdapterConfig;
use crate::TrainError;
use std::path::Path;

/// `target_modules`: module names (suffixes of the full name), or one string (`"all-linear"`
/// or a regular expression over the full name).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names: a module is targeted when its full name is one of them or ends with `.name`.
    Names(Vec<String>),
    /// `"all-linear"` or a regular expression matched against the full name.
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Names(Vec::new())
    }
}

impl From<Vec<String>> for TargetModules {
    fn from(v: Vec<String>) -> Self {
        TargetModules::Names(v)
    }
}

impl FromIterator<String> for TargetModules {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        TargetModules::Names(iter.into_iter().collect())
    }
}

/// PEFT's spelling of "every linear layer except the output head".
pub const ALL_LINEAR: &str = "all-linear";

/// One index or a list of them (`layers_to_transform`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single value.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A JSON object read in the file's order (PEFT takes the first matching key of
/// `rank_pattern` / `alpha_pattern` in dict order).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OrderedMap<T>(pub Vec<(String, T)>);

impl<T> OrderedMap<T> {
    /// Whether it has no entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: serde::Serialize> serde::Serialize for OrderedMap<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = OrderedMap<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object {pattern: value} or null")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `^(?:re)$` compiled with Python-compatible syntax (fancy-regex: lookarounds and
/// backreferences as in Python's `re`).
fn full_match_regex(re: &str) -> Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| e.to_string())
}

/// PEFT's pattern-key rule: `(.*\.)?KEY$` against the module's full name.
fn pattern_key_regex(key: &str) -> Result<fancy_regex::Regex, String> {
    fancy_regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| e.to_string())
}

fn is_match(re: &fancy_regex::Regex, s: &str) -> bool {
    // A backtracking limit hit counts as no match (PEFT would hang instead).
    re.is_match(s).unwrap_or(false)
}

/// Which modules a config targets, and each one's r and alpha (compiled once).
pub struct ModuleMatcher {
    targets: Targets,
    layers: Option<Vec<i64>>,
    layer_patterns: Vec<fancy_regex::Regex>,
    ranks: Vec<(String, fancy_regex::Regex, usize)>,
    alphas: Vec<(String, fancy_regex::Regex, f64)>,
    r: usize,
    alpha: f64,
}

enum Targets {
    All,
    Names(Vec<String>),
    Regex(fancy_regex::Regex),
}

impl ModuleMatcher {
    /// Compiles the matching rules of `cfg` (read from `path`, named in errors).
    ///
    /// # Errors
    /// A regular expression (target_modules, layers_pattern, a rank_pattern or alpha_pattern
    /// key) that does not compile, naming the field and the key.
    pub fn new(path: &Path, cfg: &PeftAdapterConfig) -> Result<Self, TrainError> {
        use crate::weights::field_error;
        let targets = match &cfg.target_modules {
            TargetModules::Pattern(p) if p.eq_ignore_ascii_case(ALL_LINEAR) => Targets::All,
            TargetModules::Pattern(p) => Targets::Regex(full_match_regex(p).map_err(|e| {
                field_error(
                    path,
                    "target_modules",
                    format!("{p:?}"),
                    &format!("a string is a Python regular expression over module names ({e}), or \"all-linear\""),
                )
            })?),
            TargetModules::Names(n) => Targets::Names(n.clone()),
        };
        let mut layer_patterns = Vec::new();
        for p in cfg
            .layers_pattern
            .as_ref()
            .map(OneOrMany::to_vec)
            .unwrap_or_default()
        {
            // PEFT: (?:^|.*?\.){pattern}\.(\d+)\. — the first index after the pattern.
            let re =
                fancy_regex::Regex::new(&format!(r"^(?:.*?\.)?(?:{p})\.(\d+)\.")).map_err(|e| {
                    field_error(
                        path,
                        "layers_pattern",
                        format!("{p:?}"),
                        &format!("a module-name pattern such as \"layers\" or \"h\" ({e})"),
                    )
                })?;
            layer_patterns.push(re);
        }
        let compile = |field: &str, k: &str| {
            pattern_key_regex(k).map_err(|e| {
                field_error(
                    path,
                    &format!("{field} key"),
                    format!("{k:?}"),
                    &format!("keys are regular expressions matched as (.*\\.)?KEY$ against module names ({e})"),
                )
            })
        };
        let mut ranks = Vec::new();
        for (k, r) in &cfg.rank_pattern.0 {
            ranks.push((k.clone(), compile("rank_pattern", k)?, *r));
        }
        let mut alphas = Vec::new();
        for (k, a) in &cfg.alpha_pattern.0 {
            alphas.push((k.clone(), compile("alpha_pattern", k)?, *a));
        }
        Ok(Self {
            targets,
            layers: cfg
                .layers_to_transform
                .as_ref()
                .map(OneOrMany::to_vec)
                .filter(|v| !v.is_empty()),
            layer_patterns,
            ranks,
            alphas,
            r: cfg.r,
            alpha: cfg.lora_alpha,
        })
    }

    /// Whether the config targets the linear layer `name` (its full module name).
    pub fn targets(&self, name: &str) -> bool {
        let names = match &self.targets {
            Targets::Regex(re) => return is_match(re, name),
            Targets::All => None,
            Targets::Names(n) => Some(n),
        };
        let found = match names {
            None => true,
            Some(n) => n
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
        };
        let Some(layers) = &self.layers else {
            return found;
        };
        if !found {
            return false;
        }
        let index = if self.layer_patterns.is_empty() {
            layer_index_default(name)
        } else {
            self.layer_patterns.iter().find_map(|re| {
                re.captures(name)
                    .ok()
                    .flatten()
                    .and_then(|c| c.get(1))
                    .and_then(|m| m.as_str().parse::<i64>().ok())
            })
        };
        index.is_some_and(|i| layers.contains(&i))
    }

    /// The rank and alpha of module `name`: the first `rank_pattern` / `alpha_pattern` key,
    /// in the file's order, that matches it, else `r` / `lora_alpha`.
    pub fn rank_alpha(&self, name: &str) -> (usize, f64) {
        let r = first_match(&self.ranks, name).unwrap_or(self.r);
        let a = first_match(&self.alphas, name).unwrap_or(self.alpha);
        (r, a)
    }

    /// Whether the targets are names (the only form whose every entry must exist).
    pub fn names(&self) -> Option<&[String]> {
        match &self.targets {
            Targets::Names(n) => Some(n),
            _ => None,
        }
    }
}

/// The value of the first entry whose pattern matches `name` (PEFT's `get_pattern_key`).
fn first_match<T: Copy>(entries: &[(String, fancy_regex::Regex, T)], name: &str) -> Option<T> {
    entries
        .iter()
        .find(|(_, re, _)| is_match(re, name))
        .map(|e| e.2)
}

/// PEFT's default layer index: `re.match(r".*?\.[^.]*\.(\d+)\.", name)` — lazy, so the
/// first `.<name>.<digits>.` (the layer, not an expert index nested inside it).
fn layer_index_default(name: &str) -> Option<i64> {
    let parts: Vec<&str> = name.split('.').collect();
    // parts[i] is the number; parts[i - 1] a name; something before it and after it.
    (2..parts.len().saturating_sub(1))
        .find(|&i| !parts[i].is_empty() && parts[i].bytes().all(|b| b.is_ascii_digit()))
        .and_then(|i| parts[i].parse().ok())
}

/// The PEFT options that change what an adapter computes and that rankstab does not
/// implement, as they are set in the config's JSON (`bias` other than "none" included).
fn unsupported_options(v: &serde_json::Value) -> Vec<String> {
    let set = |k: &str| match v.get(k) {
        None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    let mut what: Vec<String> = [
        "use_dora",
        "lora_bias",
        "fan_in_fan_out",
        "modules_to_save",
        "layer_replication",
        "target_parameters",
        "exclude_modules",
        "megatron_config",
        "use_qalora",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "use_bdlora",
        "arrow_config",
        "kasa_config",
        "velora_config",
        "monteclora_config",
    ]
    .into_iter()
    .filter(|k| set(k))
    .map(str::to_string)
    .collect();
    match v.get("bias") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) if s == "none" => {}
        Some(b) => what.push(format!("bias {b}")),
    }
    if let Some(t) = v
        .get("peft_type")
        .and_then(|t| t.as_str())
        .filter(|t| *t != "LORA")
    {
        what.push(format!("peft_type {t:?}"));
    }
    what
}

/// Reads and checks an `adapter_config.json` before any model is loaded: PEFT options
/// rankstab does not implement are refused (DoRA, biases, modules_to_save, ...), every field
/// it reads has the right type and range (`target_modules` a list of names, `"all-linear"`
/// or a regular expression that compiles; `layers_to_transform` integers; `layers_pattern`
/// names; `rank_pattern` ranks and `alpha_pattern` alphas), each error one line naming the
/// file, the field, the value and what is allowed.
///
/// # Errors
/// As above; an unreadable or malformed file.
pub fn validate_config_file(cfg_path: &Path) -> Result<PeftAdapterConfig, TrainError> {
    use crate::weights::field_error;
    let text =
        rankstab_records::guard::read_regular_text(cfg_path, crate::weights::MAX_CONFIG_BYTES)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| TrainError::Json {
        path: cfg_path.to_path_buf(),
        source,
    })?;
    if !v.is_object() {
        return Err(TrainError::Config {
            path: cfg_path.to_path_buf(),
            message: "is not a JSON object (PEFT's adapter_config.json)".into(),
        });
    }
    let unsupported = unsupported_options(&v);
    if !unsupported.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: uses PEFT options rankstab does not support: {} (plain LoRA / rsLoRA adapters only)",
            cfg_path.display(),
            unsupported.join(", ")
        )));
    }
    // Field by field, so that a wrong type names its field.
    let field = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let shape_of =
        |k: &str, allowed: &str| -> TrainError { field_error(cfg_path, k, field(k), allowed) };
    match field("target_modules") {
        serde_json::Value::String(s) if !s.is_empty() => {}
        serde_json::Value::Array(a)
            if !a.is_empty() && a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty())) => {}
        _ => {
            return Err(shape_of(
                "target_modules",
                "a non-empty list of module names, \"all-linear\", or a regular expression over module names",
            ))
        }
    }
    match field("layers_to_transform") {
        serde_json::Value::Null => {}
        serde_json::Value::Number(n) if n.as_u64().is_some_and(|n| n < 1 << 20) => {}
        serde_json::Value::Array(a)
            if a.iter().all(|x| x.as_u64().is_some_and(|n| n < 1 << 20)) => {}
        _ => {
            return Err(shape_of(
                "layers_to_transform",
                "a layer index or a list of layer indexes (integers from 0)",
            ))
        }
    }
    match field("layers_pattern") {
        serde_json::Value::Null => {}
        serde_json::Value::String(s) if !s.is_empty() => {}
        serde_json::Value::Array(a)
            if a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty())) => {}
        _ => {
            return Err(shape_of(
                "layers_pattern",
                "a module-list name (\"layers\", \"h\") or a list of them",
            ))
        }
    }
    if !field("layers_pattern").is_null() && field("layers_to_transform").is_null() {
        return Err(shape_of(
            "layers_pattern",
            "only with layers_to_transform, as in PEFT",
        ));
    }
    if field("target_modules").is_string() && !field("layers_to_transform").is_null() {
        return Err(shape_of(
            "layers_to_transform",
            "not with a string target_modules, as in PEFT: use a list of module names",
        ));
    }
    for (k, what) in [
        ("rank_pattern", "ranks (integers from 1 to 1048576)"),
        (
            "alpha_pattern",
            "alphas (finite numbers of magnitude at most 1e6)",
        ),
    ] {
        match field(k) {
            serde_json::Value::Null => {}
            serde_json::Value::Object(m) => {
                for (key, val) in &m {
                    let ok = if k == "rank_pattern" {
                        val.as_u64().is_some_and(|r| (1..=1 << 20).contains(&r))
                    } else {
                        val.as_f64().is_some_and(|a| {
                            a.is_finite() && a.abs() <= crate::lora::MAX_ADAPTER_ALPHA
                        })
                    };
                    if !ok {
                        return Err(field_error(
                            cfg_path,
                            &format!("{k}[{key:?}]"),
                            val,
                            &format!("values are {what}"),
                        ));
                    }
                }
            }
            _ => {
                return Err(shape_of(
                    k,
                    &format!("an object {{module pattern: value}} of {what}"),
                ))
            }
        }
    }
    // From the text, not the Value: a Value's object is sorted, and rank_pattern and
    // alpha_pattern keys keep the file's order (PEFT takes the first that matches).
    let cfg: PeftAdapterConfig =
        serde_json::from_str(&text).map_err(|source| TrainError::Json {
            path: cfg_path.to_path_buf(),
            source,
        })?;
    if cfg.rankstab_beta.is_some() && !(cfg.rank_pattern.is_empty() && cfg.alpha_pattern.is_empty())
    {
        return Err(shape_of(
            "rank_pattern",
            "not with rankstab_beta: rankstab writes one rank and alpha per adapter",
        ));
    }
    crate::lora::check_adapter_numbers(cfg_path, &cfg)?;
    ModuleMatcher::new(cfg_path, &cfg)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> (tempfile::TempDir, Result<PeftAdapterConfig, TrainError>) {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("adapter_config.json");
        std::fs::write(&p, json).expect("write");
        let r = validate_config_file(&p);
        (d, r)
    }

    const BASE: &str = r#""peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,"use_rslora":false,"lora_dropout":0.0,"base_model_name_or_path":null,"bias":"none","init_lora_weights":true"#;

    fn with(extra: &str) -> String {
        format!("{{{BASE},{extra}}}")
    }

    fn matcher(extra: &str) -> ModuleMatcher {
        let (d, c) = config(&with(extra));
        let c = c.unwrap_or_else(|e| panic!("{extra}: {e}"));
        ModuleMatcher::new(&d.path().join("adapter_config.json"), &c).expect("compiles")
    }

    #[test]
    fn list_all_linear_and_regex_targets_follow_peft() {
        let m = matcher(r#""target_modules":["q_proj","mlp.down_proj"]"#);
        assert!(m.targets("model.layers.0.self_attn.q_proj"));
        assert!(m.targets("model.layers.3.mlp.down_proj"));
        assert!(!m.targets("model.layers.3.self_attn.k_proj"));
        assert!(
            !m.targets("model.layers.3.mlp.xq_proj"),
            "a suffix after a dot only"
        );
        let m = matcher(r#""target_modules":"ALL-LINEAR""#);
        assert!(
            m.targets("model.layers.0.self_attn.q_proj") && m.targets("transformer.h.1.mlp.fc_in")
        );
        let m = matcher(r#""target_modules":".*\\.(q|v)_proj""#);
        assert!(m.targets("model.layers.0.self_attn.q_proj"));
        assert!(m.targets("model.layers.1.self_attn.v_proj"));
        assert!(!m.targets("model.layers.1.self_attn.k_proj"));
        // Full match: a regex that matches only a part of the name does not target it.
        let m = matcher(r#""target_modules":"q_proj""#);
        assert!(!m.targets("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn layers_to_transform_and_layers_pattern() {
        let m = matcher(r#""target_modules":["q_proj"],"layers_to_transform":1"#);
        assert!(!m.targets("model.layers.0.self_attn.q_proj"));
        assert!(m.targets("model.layers.1.self_attn.q_proj"));
        let m = matcher(
            r#""target_modules":["q_proj","fc_in"],"layers_to_transform":[0,2],"layers_pattern":["layers","h"]"#,
        );
        assert!(m.targets("model.layers.2.self_attn.q_proj"));
        assert!(m.targets("transformer.h.0.mlp.fc_in"));
        assert!(!m.targets("transformer.h.1.mlp.fc_in"));
        let m = matcher(
            r#""target_modules":["q_proj"],"layers_to_transform":[0],"layers_pattern":"blocks""#,
        );
        assert!(
            !m.targets("model.layers.0.self_attn.q_proj"),
            "no .blocks.N. in the name"
        );
        assert_eq!(
            layer_index_default("model.layers.12.self_attn.q_proj"),
            Some(12)
        );
        assert_eq!(
            layer_index_default("model.layers.1.experts.3.w1"),
            Some(1),
            "the first index"
        );
        assert_eq!(layer_index_default("q_proj"), None);
    }

    #[test]
    fn rank_and_alpha_patterns_take_the_first_matching_key() {
        let m = matcher(
            r#""target_modules":["q_proj","v_proj"],"rank_pattern":{"v_proj":2,"model.layers.1.self_attn.q_proj":8,"q_proj":6},"alpha_pattern":{"layers.0.self_attn.q_proj":3}"#,
        );
        assert_eq!(m.rank_alpha("model.layers.0.self_attn.v_proj"), (2, 8.0));
        assert_eq!(m.rank_alpha("model.layers.1.self_attn.q_proj"), (8, 8.0));
        assert_eq!(m.rank_alpha("model.layers.0.self_attn.q_proj"), (6, 3.0));
        assert_eq!(m.rank_alpha("model.layers.0.mlp.up_proj"), (4, 8.0));
        // The first key in the file's order wins, even when a later one is more specific.
        let m = matcher(
            r#""target_modules":["q_proj"],"rank_pattern":{"q_proj":6,"model.layers.1.self_attn.q_proj":8}"#,
        );
        assert_eq!(m.rank_alpha("model.layers.1.self_attn.q_proj").0, 6);
        // "proj" is not a suffix after a dot: no match.
        let m = matcher(r#""target_modules":["q_proj"],"rank_pattern":{"proj":2}"#);
        assert_eq!(m.rank_alpha("model.layers.0.self_attn.q_proj").0, 4);
    }

    #[test]
    fn bad_configs_are_one_line_errors_naming_the_field() {
        for (extra, field) in [
            (r#""target_modules":[]"#, "target_modules"),
            (r#""target_modules":7"#, "target_modules"),
            (r#""target_modules":"(unclosed""#, "target_modules"),
            (
                r#""target_modules":["q_proj"],"layers_to_transform":"0""#,
                "layers_to_transform",
            ),
            (
                r#""target_modules":["q_proj"],"layers_to_transform":[-1]"#,
                "layers_to_transform",
            ),
            (
                r#""target_modules":["q_proj"],"layers_pattern":"layers""#,
                "layers_pattern",
            ),
            (
                r#""target_modules":"all-linear","layers_to_transform":[0]"#,
                "layers_to_transform",
            ),
            (
                r#""target_modules":["q_proj"],"rank_pattern":{"q_proj":0}"#,
                "rank_pattern[\"q_proj\"]",
            ),
            (
                r#""target_modules":["q_proj"],"rank_pattern":[1]"#,
                "rank_pattern",
            ),
            (
                r#""target_modules":["q_proj"],"alpha_pattern":{"q_proj":"x"}"#,
                "alpha_pattern[\"q_proj\"]",
            ),
            (
                r#""target_modules":["q_proj"],"rank_pattern":{"(":2}"#,
                "rank_pattern key",
            ),
            (r#""target_modules":["q_proj"],"use_dora":true"#, "use_dora"),
            (r#""target_modules":["q_proj"],"bias":"all""#, "bias"),
        ] {
            let (_d, r) = config(&with(extra));
            let e = r.expect_err(extra).to_string();
            assert!(
                e.contains(field) && e.contains("adapter_config.json") && !e.contains('\n'),
                "{extra}: {e}"
            );
        }
    }
}
