//! Randomly initialised models of a given shape — the paper's Llama-2-7B and GPT-J-6B
//! presets for accelerator runs where the weights are not available, and small shapes for
//! tests. Weights are created under their Hugging Face names and go through the same
//! loader as a checkpoint, so names and shapes cannot drift from the real thing.
//! Initialisation follows transformers' `_init_weights`: normal(0, 0.02) for matrices and
//! embeddings, ones for norm gains, zeros for biases.
use crate::gptj::{self, Gptj};
use crate::llama::{self, Llama};
use crate::weights::Weights;
use crate::{CausalLm, TrainError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// transformers' default `initializer_range`.
pub const INIT_STD: f64 = 0.02;

/// (Hugging Face name, shape) of every tensor of a Llama model.
pub fn llama_shapes(c: &llama::Config) -> Vec<(String, Vec<i64>)> {
    let (d, f, hd, h, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.head_dim,
        c.num_heads,
        c.num_kv_heads,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, o: i64, inp: i64, bias: bool| {
            out.push((format!("{p}.{name}.weight"), vec![o, inp]));
            if bias {
                out.push((format!("{p}.{name}.bias"), vec![o]));
            }
        };
        lin("self_attn.q_proj", h * hd, d, c.attention_bias);
        lin("self_attn.k_proj", kv * hd, d, c.attention_bias);
        lin("self_attn.v_proj", kv * hd, d, c.attention_bias);
        lin("self_attn.o_proj", d, h * hd, c.attention_bias);
        lin("mlp.gate_proj", f, d, c.mlp_bias);
        lin("mlp.up_proj", f, d, c.mlp_bias);
        lin("mlp.down_proj", d, f, c.mlp_bias);
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
    }
    out
}

/// (Hugging Face name, shape) of every tensor of a GPT-J model.
pub fn gptj_shapes(c: &gptj::Config) -> Vec<(String, Vec<i64>)> {
    let (d, f) = (c.n_embd, c.n_inner);
    let mut out = vec![("transformer.wte.weight".to_string(), vec![c.vocab_size, d])];
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        for n in ["ln_1.weight", "ln_1.bias"] {
            out.push((format!("{p}.{n}"), vec![d]));
        }
        for n in ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"] {
            out.push((format!("{p}.{n}.weight"), vec![d, d]));
        }
        out.push((format!("{p}.mlp.fc_in.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.fc_in.bias"), vec![f]));
        out.push((format!("{p}.mlp.fc_out.weight"), vec![d, f]));
        out.push((format!("{p}.mlp.fc_out.bias"), vec![d]));
    }
    out.push(("transformer.ln_f.weight".to_string(), vec![d]));
    out.push(("transformer.ln_f.bias".to_string(), vec![d]));
    out.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
    out.push(("lm_head.bias".to_string(), vec![c.vocab_size]));
    out
}

/// Number of parameters of a shape list.
pub fn parameter_count(shapes: &[(String, Vec<i64>)]) -> i64 {
    shapes.iter().map(|(_, s)| s.iter().product::<i64>()).sum()
}

fn init(
    shapes: Vec<(String, Vec<i64>)>,
    kind: Kind,
    device: Device,
    seed: i64,
) -> BTreeMap<String, Tensor> {
    tch::manual_seed(seed);
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let norm_gain = shape.len() == 1
                && (name.contains("norm") || name.contains("ln_"))
                && name.ends_with(".weight");
            let t = if norm_gain {
                Tensor::ones(shape.as_slice(), (kind, device))
            } else if shape.len() == 1 {
                Tensor::zeros(shape.as_slice(), (kind, device))
            } else {
                Tensor::randn(shape.as_slice(), (kind, device)) * INIT_STD
            };
            (name, t)
        })
        .collect()
}

/// A model shape: the runtime configuration of one of the architectures.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A Llama model.
    Llama(llama::Config),
    /// A GPT-J model.
    Gptj(gptj::Config),
}

/// One kind of adaptable linear module of a block: its name (PEFT's target module) and
/// its widths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleWidths {
    /// Module name (q_proj, ..., fc_out).
    pub name: &'static str,
    /// in_features.
    pub in_features: i64,
    /// out_features.
    pub out_features: i64,
}

impl Shape {
    /// Every adaptable linear module of a block, in [`llama::MODULES`] / [`gptj::MODULES`]
    /// order, with its (in, out) widths (the same in every block).
    pub fn modules(&self) -> Vec<ModuleWidths> {
        let m = |name, in_features, out_features| ModuleWidths {
            name,
            in_features,
            out_features,
        };
        match self {
            Shape::Llama(c) => {
                let (d, f) = (c.hidden_size, c.intermediate_size);
                let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                vec![
                    m("q_proj", d, q),
                    m("k_proj", d, kv),
                    m("v_proj", d, kv),
                    m("o_proj", q, d),
                    m("gate_proj", d, f),
                    m("up_proj", d, f),
                    m("down_proj", f, d),
                ]
            }
            Shape::Gptj(c) => {
                let (d, f) = (c.n_embd, c.n_inner);
                vec![
                    m("q_proj", d, d),
                    m("k_proj", d, d),
                    m("v_proj", d, d),
                    m("out_proj", d, d),
                    m("fc_in", d, f),
                    m("fc_out", f, d),
                ]
            }
        }
    }

    /// Number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            Shape::Llama(c) => c.num_layers,
            Shape::Gptj(c) => c.n_layer,
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        match self {
            Shape::Llama(c) => c.vocab_size,
            Shape::Gptj(c) => c.vocab_size,
        }
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> i64 {
        match self {
            Shape::Llama(c) => c.hidden_size,
            Shape::Gptj(c) => c.n_embd,
        }
    }

    /// Number of parameters ([`parameter_count`] of [`Self::tensors`]).
    pub fn parameters(&self) -> i64 {
        parameter_count(&self.tensors())
    }

    /// (Hugging Face name, shape) of every tensor ([`llama_shapes`], [`gptj_shapes`]).
    pub fn tensors(&self) -> Vec<(String, Vec<i64>)> {
        match self {
            Shape::Llama(c) => llama_shapes(c),
            Shape::Gptj(c) => gptj_shapes(c),
        }
    }
}

/// A model of shape `shape` with random weights (seeded), in `kind` on `device`, built by
/// the architecture's checkpoint loader.
///
/// # Errors
/// Only if the shape list and the loader disagree (a bug), reported like a checkpoint error.
pub fn model(shape: Shape, kind: Kind, device: Device, seed: i64) -> Result<CausalLm, TrainError> {
    let tensors = init(shape.tensors(), kind, device, seed);
    let source = match shape {
        Shape::Llama(_) => "<random llama>",
        Shape::Gptj(_) => "<random gptj>",
    };
    let mut w = Weights::from_tensors(PathBuf::from(source), tensors, kind, device);
    Ok(match shape {
        Shape::Llama(c) => CausalLm::Llama(Llama::load(c, &mut w)?),
        Shape::Gptj(c) => CausalLm::Gptj(Gptj::load(c, &mut w)?),
    })
}

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 4] = ["llama-2-7b", "gpt-j-6b", "llama-2-mini", "gpt-j-mini"];

/// A small GPT-J of the real architecture and vocabulary (50400, GPT-2 BPE): 4 blocks of
/// width 256, 4 heads of 64 with rotary over the first 16 dimensions (GPT-J-6B: 64 of
/// 256), MLP 1024. About 27 M parameters, most of them in the embedding and head.
pub fn gptj_mini() -> gptj::Config {
    gptj::Config {
        n_embd: 256,
        n_layer: 4,
        n_head: 4,
        head_dim: 64,
        rotary_dim: 16,
        n_inner: 1024,
        ..gptj::Config::gptj_6b()
    }
}

/// A small Llama of the real architecture and vocabulary (32000, the Llama 2 tokenizer):
/// 4 blocks of width 256, 4 heads of 64, MLP 688.
pub fn llama2_mini() -> llama::Config {
    llama::Config {
        hidden_size: 256,
        intermediate_size: 688,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 64,
        ..llama::Config::llama2_7b()
    }
}

/// Model shapes by name, randomly initialised: the paper's `llama-2-7b` and `gpt-j-6b`
/// (about 13.5 GB in bf16 each: for accelerator machines) and the small `llama-2-mini`
/// and `gpt-j-mini` ([`llama2_mini`], [`gptj_mini`]) for CPU sweeps.
///
/// # Errors
/// An unknown name.
pub fn preset(name: &str, kind: Kind, device: Device, seed: i64) -> Result<CausalLm, TrainError> {
    model(preset_shape(name)?, kind, device, seed)
}

/// The shape of a preset ([`PRESETS`]), without building it.
///
/// # Errors
/// An unknown name.
pub fn preset_shape(name: &str) -> Result<Shape, TrainError> {
    Ok(match name {
        "llama-2-mini" => Shape::Llama(llama2_mini()),
        "gpt-j-mini" => Shape::Gptj(gptj_mini()),
        "llama-2-7b" => Shape::Llama(llama::Config::llama2_7b()),
        "gpt-j-6b" => Shape::Gptj(gptj::Config::gptj_6b()),
        other => {
            return Err(TrainError::Invalid(format!(
                "preset {other:?} is not known (known: {})",
                PRESETS.join(", ")
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The presets have the parameter counts of transformers' models of the same shape
    /// (`LlamaForCausalLM` of Llama-2-7B's config; `GPTJForCausalLM(GPTJConfig())`, whose
    /// defaults are GPT-J-6B's), counted there on the meta device.
    #[test]
    fn presets_have_the_real_parameter_counts() {
        assert_eq!(
            parameter_count(&llama_shapes(&llama::Config::llama2_7b())),
            6_738_415_616
        );
        assert_eq!(
            parameter_count(&gptj_shapes(&gptj::Config::gptj_6b())),
            6_050_882_784
        );
    }

    #[test]
    fn small_random_models_build_and_run() {
        // Tiny shapes, with tied embeddings and grouped-query attention.
        let c = llama::Config {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
            tie_word_embeddings: true,
            ..llama2_mini()
        };
        let m = model(Shape::Llama(c), Kind::Float, Device::Cpu, 1).expect("builds");
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        assert_eq!(m.forward(&ids, false).size(), [1, 4, 50]);
        assert!(matches!(&m, CausalLm::Llama(l) if l.lm_head.is_none()));
        let g = gptj::Config {
            vocab_size: 60,
            n_embd: 32,
            n_layer: 2,
            head_dim: 8,
            rotary_dim: 4,
            n_inner: 64,
            ..gptj_mini()
        };
        let m = model(Shape::Gptj(g), Kind::Float, Device::Cpu, 1).expect("builds");
        let y = m.forward(&ids, false);
        assert_eq!(y.size(), [1, 4, 60]);
        // Random init: logits are small but not all equal.
        let s = y.std(false).double_value(&[]);
        assert!(s > 1e-4 && s < 1.0, "{s}");
        assert!(preset("llama-3", Kind::Float, Device::Cpu, 0).is_err());
    }

    /// `llama::MODULES` and `gptj::MODULES` name every block's linears in order.
    #[test]
    fn module_lists_follow_the_models() {
        for (name, modules) in [
            ("llama-2-mini", &llama::MODULES[..]),
            ("gpt-j-mini", &gptj::MODULES[..]),
        ] {
            let mut m = preset(name, Kind::Float, Device::Cpu, 0).expect("builds");
            let first: Vec<String> = m
                .linears_mut()
                .into_iter()
                .take(modules.len())
                .map(|(p, _)| crate::inject::module_and_layer(&p).0)
                .collect();
            assert_eq!(first, modules, "{name}");
            assert_eq!(m.linears_mut().len(), 4 * modules.len(), "{name}");
        }
    }
}
