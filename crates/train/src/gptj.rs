//! GPT-J as transformers' `GPTJForCausalLM`: one LayerNorm feeding attention and MLP in
//! parallel, rotary embeddings on the first `rotary_dim` features of each head in the
//! interleaved (rotate-every-two) layout, gelu_new MLP, no bias on q/k/v/out, biases on
//! fc_in, fc_out and lm_head. Weight names are exactly the Hugging Face ones.
use crate::linear::Linear;
use crate::llama::{causal_attention, embedding, LayerCache};
use crate::weights::{ConfigJson, Weights};
use crate::TrainError;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The adaptable linear modules of every block, in [`Gptj::linears_mut`]'s order (PEFT's
/// `target_modules` for every attention and MLP linear).
pub const MODULES: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"];

/// Runtime configuration of GPT-J.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width.
    pub n_embd: i64,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: i64,
    /// Head size.
    pub head_dim: i64,
    /// Rotary features per head.
    pub rotary_dim: i64,
    /// MLP width.
    pub n_inner: i64,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Longest context.
    pub n_positions: usize,
}

/// The runtime configuration from a GPT-J `config.json`, every field the model uses
/// checked for its type and range; absent fields take transformers' `GPTJConfig` defaults
/// (GPT-J-6B's shape, rotary_dim 64). Settings rankstab does not implement (another
/// activation, tied embeddings, dropout, rotary over the whole width) are errors naming
/// them.
///
/// # Errors
/// A field of the wrong type or out of range, sizes that do not fit together, an
/// unsupported setting (each named with the file, the field and what is allowed).
pub fn config_from_json(c: &ConfigJson) -> Result<Config, TrainError> {
    use crate::weights::bounds::*;
    if let Some(t) = c.str("model_type")? {
        if t != "gptj" {
            return Err(c.bad("model_type", format!("{t:?}"), "\"gptj\" for a GPT-J model"));
        }
    }
    c.one_of("activation_function", &["gelu_new", "gelu_pytorch_tanh"])?;
    if c.bool("tie_word_embeddings")? == Some(true) {
        return Err(c.bad(
            "tie_word_embeddings",
            true,
            "false: GPT-J's lm_head has its own weight and bias",
        ));
    }
    for p in ["attn_pdrop", "resid_pdrop", "embd_pdrop"] {
        c.float(
            p,
            |x| x == 0.0,
            "0: rankstab implements no dropout in the base model",
        )?;
    }
    let vocab = c.uint("vocab_size", 1, VOCAB)?.unwrap_or(50400);
    let d = c.uint("n_embd", 1, WIDTH)?.unwrap_or(4096);
    let layers = c.uint("n_layer", 1, LAYERS)?.unwrap_or(28);
    let heads = c.uint("n_head", 1, HEADS)?.unwrap_or(16);
    if !d.is_multiple_of(heads) {
        return Err(c.bad("n_embd", d, &format!("a multiple of n_head {heads}")));
    }
    let head_dim = d / heads;
    // transformers' default is 64; null would rotate the whole width, which its GPT-J
    // only computes for one head.
    let rotary_dim = match c.map.get("rotary_dim") {
        None => 64,
        Some(serde_json::Value::Null) => {
            return Err(c.bad(
                "rotary_dim",
                "null",
                "an even number of rotary features per head",
            ))
        }
        Some(_) => c.uint("rotary_dim", 2, HEAD_DIM)?.unwrap_or(64),
    };
    if !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
        return Err(c.bad(
            "rotary_dim",
            rotary_dim,
            &format!("even and at most the head size n_embd / n_head = {head_dim}"),
        ));
    }
    let inner = c.uint("n_inner", 1, WIDTH)?.unwrap_or(4 * d);
    let eps = c
        .float(
            "layer_norm_epsilon",
            |x| x > 0.0 && x < 1.0,
            "a number in (0, 1)",
        )?
        .unwrap_or(1e-5);
    let positions = c.uint("n_positions", 1, POSITIONS)?.unwrap_or(2048);
    Ok(Config {
        vocab_size: vocab as i64,
        n_embd: d as i64,
        n_layer: layers as usize,
        n_head: heads as i64,
        head_dim: head_dim as i64,
        rotary_dim: rotary_dim as i64,
        n_inner: inner as i64,
        eps,
        n_positions: positions as usize,
    })
}

impl Config {
    /// GPT-J-6B's shape (random initialisation, for accelerator runs).
    pub fn gptj_6b() -> Self {
        Self {
            vocab_size: 50400,
            n_embd: 4096,
            n_layer: 28,
            n_head: 16,
            head_dim: 256,
            rotary_dim: 64,
            n_inner: 16384,
            eps: 1e-5,
            n_positions: 2048,
        }
    }
}

/// LayerNorm with gain and bias.
#[derive(Debug)]
pub struct LayerNorm {
    /// Gain.
    pub weight: Tensor,
    /// Bias.
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let n = *x.size().last().expect("non-scalar");
        x.layer_norm([n], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// Attention projections.
#[derive(Debug)]
pub struct Attention {
    /// Query.
    pub q_proj: Linear,
    /// Key.
    pub k_proj: Linear,
    /// Value.
    pub v_proj: Linear,
    /// Output.
    pub out_proj: Linear,
}

/// MLP.
#[derive(Debug)]
pub struct Mlp {
    /// In.
    pub fc_in: Linear,
    /// Out.
    pub fc_out: Linear,
}

/// One block: attention and MLP in parallel on one LayerNorm.
#[derive(Debug)]
pub struct Block {
    /// The shared LayerNorm.
    pub ln_1: LayerNorm,
    /// Attention.
    pub attn: Attention,
    /// MLP.
    pub mlp: Mlp,
}

/// `GPTJForCausalLM`.
#[derive(Debug)]
pub struct Gptj {
    /// Runtime configuration.
    pub config: Config,
    /// Token embeddings.
    pub wte: Tensor,
    /// Blocks.
    pub h: Vec<Block>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
    /// Output projection with bias.
    pub lm_head: Linear,
}

/// sin and cos (T x rotary_dim) with each frequency repeated twice (interleaved layout).
fn rope_interleaved(rotary_dim: i64, t: i64, device: Device) -> (Tensor, Tensor) {
    let inv =
        Tensor::arange_start_step(0, rotary_dim, 2, (Kind::Float, device)) / rotary_dim as f64;
    let inv_freq = (inv * -(10_000f64.ln())).exp();
    let pos = Tensor::arange(t, (Kind::Float, device));
    let freqs = pos.outer(&inv_freq); // T x rot/2
    let dup = |z: Tensor| {
        z.unsqueeze(-1)
            .expand([t, rotary_dim / 2, 2], false)
            .reshape([t, rotary_dim])
    };
    (dup(freqs.sin()), dup(freqs.cos()))
}

/// (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...).
fn rotate_every_two(x: &Tensor) -> Tensor {
    let mut shape = x.size();
    let last = *shape.last().expect("non-scalar");
    let pairs = x.reshape([-1, last / 2, 2]);
    let x1 = pairs.select(-1, 0);
    let x2 = pairs.select(-1, 1);
    let out = Tensor::stack(&[&x2.neg(), &x1], -1);
    *shape.last_mut().expect("non-scalar") = last;
    out.reshape(shape.as_slice())
}

fn apply_rotary(x: &Tensor, rot: i64, sin: &Tensor, cos: &Tensor) -> Tensor {
    // x: (B, H, T, hd); rotate the first `rot` features.
    let hd = *x.size().last().expect("non-scalar");
    let xr = x.narrow(-1, 0, rot);
    let rotated = &xr * cos + rotate_every_two(&xr) * sin;
    if rot == hd {
        rotated
    } else {
        Tensor::cat(&[&rotated, &x.narrow(-1, rot, hd - rot)], -1)
    }
}

fn layer_norm(w: &mut Weights, name: &str, d: i64, eps: f64) -> Result<LayerNorm, TrainError> {
    Ok(LayerNorm {
        weight: w.take(&format!("{name}.weight"), &[d])?,
        bias: w.take(&format!("{name}.bias"), &[d])?,
        eps,
    })
}

impl Gptj {
    /// Builds the model from checkpoint tensors.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (named, with both shapes).
    pub fn load(config: Config, w: &mut Weights) -> Result<Self, TrainError> {
        let (d, f) = (config.n_embd, config.n_inner);
        let wte = w.take("transformer.wte.weight", &[config.vocab_size, d])?;
        let mut h = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("transformer.h.{i}");
            h.push(Block {
                ln_1: layer_norm(w, &format!("{p}.ln_1"), d, config.eps)?,
                attn: Attention {
                    q_proj: w.linear(&format!("{p}.attn.q_proj"), d, d, false)?,
                    k_proj: w.linear(&format!("{p}.attn.k_proj"), d, d, false)?,
                    v_proj: w.linear(&format!("{p}.attn.v_proj"), d, d, false)?,
                    out_proj: w.linear(&format!("{p}.attn.out_proj"), d, d, false)?,
                },
                mlp: Mlp {
                    fc_in: w.linear(&format!("{p}.mlp.fc_in"), f, d, true)?,
                    fc_out: w.linear(&format!("{p}.mlp.fc_out"), d, f, true)?,
                },
            });
        }
        let ln_f = layer_norm(w, "transformer.ln_f", d, config.eps)?;
        let lm_head = w.linear("lm_head", config.vocab_size, d, true)?;
        Ok(Self {
            config,
            wte,
            h,
            ln_f,
            lm_head,
        })
    }

    /// Loads a Hugging Face model directory (config.json + safetensors).
    ///
    /// # Errors
    /// See [`Weights::from_dir`], [`config_from_json`], [`Gptj::load`].
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self, TrainError> {
        crate::weights::load_dir(dir, kind, device, config_from_json, Self::load)
    }

    /// Every adaptable linear layer with its Hugging Face module path.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.h.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            out.push((format!("{p}.attn.q_proj"), &mut b.attn.q_proj));
            out.push((format!("{p}.attn.k_proj"), &mut b.attn.k_proj));
            out.push((format!("{p}.attn.v_proj"), &mut b.attn.v_proj));
            out.push((format!("{p}.attn.out_proj"), &mut b.attn.out_proj));
            out.push((format!("{p}.mlp.fc_in"), &mut b.mlp.fc_in));
            out.push((format!("{p}.mlp.fc_out"), &mut b.mlp.fc_out));
        }
        out
    }

    /// Logits (B, T, vocab) for token ids (B, T).
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        let mut x = self.embed(ids);
        for i in 0..self.h.len() {
            x = self.block(i, &x, train);
        }
        self.head(&x, train)
    }

    /// Token embeddings (B, T, d) of ids (B, T).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        embedding(&self.wte, ids)
    }

    /// Block `i` (attention and MLP in parallel on one LayerNorm) on hidden states (B, T, d).
    pub fn block(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        self.block_cached(i, x, train, None)
    }

    /// Block `i` on the hidden states (B, T, d) of the T positions after those in `cache`
    /// (which then holds them too).
    pub fn block_cached(
        &self,
        i: usize,
        x: &Tensor,
        train: bool,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let blk = &self.h[i];
        let (b, t) = (x.size()[0], x.size()[1]);
        let c = &self.config;
        let (h, hd) = (c.n_head, c.head_dim);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (sin, cos) = rope_interleaved(c.rotary_dim, past + t, x.device());
        let (sin, cos) = (
            sin.narrow(0, past, t).to_kind(x.kind()),
            cos.narrow(0, past, t).to_kind(x.kind()),
        );
        let y = blk.ln_1.forward(x);
        let split = |z: Tensor| z.view([b, t, h, hd]).transpose(1, 2);
        let q = apply_rotary(
            &split(blk.attn.q_proj.forward(&y, train)),
            c.rotary_dim,
            &sin,
            &cos,
        );
        let k = apply_rotary(
            &split(blk.attn.k_proj.forward(&y, train)),
            c.rotary_dim,
            &sin,
            &cos,
        );
        let v = split(blk.attn.v_proj.forward(&y, train));
        let (k, v) = match cache {
            Some(cache) => cache.extend(k, v),
            None => (k, v),
        };
        let a = causal_attention(&q, &k, &v)
            .transpose(1, 2)
            .reshape([b, t, h * hd]);
        let a = blk.attn.out_proj.forward(&a, train);
        let m = blk
            .mlp
            .fc_out
            .forward(&blk.mlp.fc_in.forward(&y, train).gelu("tanh"), train);
        x + a + m
    }

    /// Final LayerNorm and language-model head: logits (B, T, vocab).
    pub fn head(&self, x: &Tensor, train: bool) -> Tensor {
        self.lm_head.forward(&self.ln_f.forward(x), train)
    }
}
