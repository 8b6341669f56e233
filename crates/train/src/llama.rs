//! The Llama 2 family as transformers' `LlamaForCausalLM`: RMSNorm, rotary embeddings in
//! the rotate-half layout, grouped-query attention, SwiGLU MLP, tied or untied embeddings.
//! Weight names are exactly the Hugging Face ones.
use crate::linear::Linear;
use crate::weights::{ConfigJson, Weights};
use crate::TrainError;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The adaptable linear modules of every block, in [`Llama::linears_mut`]'s order (PEFT's
/// `target_modules` for every attention and MLP linear).
pub const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Runtime configuration of a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads.
    pub num_kv_heads: i64,
    /// Head size.
    pub head_dim: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
    /// Bias on attention projections.
    pub attention_bias: bool,
    /// Bias on MLP projections.
    pub mlp_bias: bool,
    /// Longest context.
    pub max_position_embeddings: usize,
}

/// The runtime configuration from a Llama `config.json` (transformers 4.x or 5.x), every
/// field the model uses checked for its type and range; absent fields take
/// transformers' `LlamaConfig` defaults. Settings rankstab does not implement (RoPE
/// scaling of any kind, an activation other than SiLU, attention dropout) are errors
/// naming them.
///
/// # Errors
/// A field of the wrong type or out of range, sizes that do not fit together, an
/// unsupported setting (each named with the file, the field and what is allowed).
pub fn config_from_json(c: &ConfigJson) -> Result<Config, TrainError> {
    use crate::weights::bounds::*;
    if let Some(t) = c.str("model_type")? {
        if t != "llama" {
            return Err(c.bad(
                "model_type",
                format!("{t:?}"),
                "\"llama\" for a Llama model",
            ));
        }
    }
    c.one_of("hidden_act", &["silu", "swish"])?;
    let vocab = c.uint("vocab_size", 1, VOCAB)?.unwrap_or(32000);
    let hidden = c.uint("hidden_size", 1, WIDTH)?.unwrap_or(4096);
    let ffn = c.uint("intermediate_size", 1, WIDTH)?.unwrap_or(11008);
    let layers = c.uint("num_hidden_layers", 1, LAYERS)?.unwrap_or(32);
    let heads = c.uint("num_attention_heads", 1, HEADS)?.unwrap_or(32);
    let kv = c.uint("num_key_value_heads", 1, HEADS)?.unwrap_or(heads);
    if !heads.is_multiple_of(kv) {
        return Err(c.bad(
            "num_key_value_heads",
            kv,
            &format!("a divisor of num_attention_heads {heads}"),
        ));
    }
    let head_dim = match c.uint("head_dim", 2, HEAD_DIM)? {
        Some(h) => h,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(c.bad(
                "hidden_size",
                hidden,
                &format!("a multiple of num_attention_heads {heads} when head_dim is not given"),
            ))
        }
    };
    if !head_dim.is_multiple_of(2) || heads * head_dim > WIDTH {
        return Err(c.bad(
            "head_dim",
            head_dim,
            &format!("even, and heads x head_dim at most {WIDTH}"),
        ));
    }
    let eps = c
        .float("rms_norm_eps", |x| x > 0.0 && x < 1.0, "a number in (0, 1)")?
        .unwrap_or(1e-6);
    let positive = |x: f64| x > 0.0;
    let mut rope_theta = c.float("rope_theta", positive, "a finite number > 0")?;
    // transformers 5 writes {rope_type, rope_theta} as rope_parameters; 4.x as rope_theta
    // and rope_scaling (null or {"rope_type": "default"} for plain RoPE).
    for field in ["rope_parameters", "rope_scaling"] {
        let Some(v) = c.get(field) else { continue };
        let serde_json::Value::Object(m) = v else {
            return Err(c.bad(field, v, "an object or null"));
        };
        // The type first: it names what is not implemented better than its parameters.
        for k in ["rope_type", "type"] {
            if let Some(x) = m.get(k).filter(|x| x.as_str() != Some("default")) {
                return Err(c.bad(
                    &format!("{field}.{k}"),
                    x,
                    "only \"default\": rankstab implements plain RoPE, no scaling (linear, dynamic, yarn, llama3, ...)",
                ));
            }
        }
        for (k, x) in m {
            match k.as_str() {
                "rope_type" | "type" => {}
                "rope_theta" => {
                    let t = x.as_f64().filter(|t| t.is_finite() && *t > 0.0).ok_or_else(|| {
                        c.bad(&format!("{field}.rope_theta"), x, "a finite number > 0")
                    })?;
                    rope_theta.get_or_insert(t);
                }
                _ => {
                    return Err(c.bad(
                        &format!("{field}.{k}"),
                        x,
                        "not supported: rankstab implements plain RoPE (rope_type \"default\" and rope_theta only)",
                    ))
                }
            }
        }
    }
    c.float(
        "attention_dropout",
        |x| x == 0.0,
        "0: rankstab implements no attention dropout",
    )?;
    let max_pos = c
        .uint("max_position_embeddings", 1, POSITIONS)?
        .unwrap_or(2048);
    Ok(Config {
        vocab_size: vocab as i64,
        hidden_size: hidden as i64,
        intermediate_size: ffn as i64,
        num_layers: layers as usize,
        num_heads: heads as i64,
        num_kv_heads: kv as i64,
        head_dim: head_dim as i64,
        rms_norm_eps: eps,
        rope_theta: rope_theta.unwrap_or(10_000.0),
        tie_word_embeddings: c.bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: c.bool("attention_bias")?.unwrap_or(false),
        mlp_bias: c.bool("mlp_bias")?.unwrap_or(false),
        max_position_embeddings: max_pos as usize,
    })
}

impl Config {
    /// Llama-2-7B's shape (random initialisation, for accelerator runs).
    pub fn llama2_7b() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            max_position_embeddings: 4096,
        }
    }
}

/// RMSNorm with a learned gain (computed in f32 as transformers does).
#[derive(Debug)]
pub struct RmsNorm {
    /// Gain.
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let var = x32.square().mean_dim(-1, true, Kind::Float);
        let y = x32 * (var + self.eps).rsqrt();
        y.to_kind(kind) * &self.weight
    }
}

/// Self-attention with grouped-query heads and rotary embeddings.
#[derive(Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
}

/// SwiGLU MLP.
#[derive(Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

/// One decoder layer.
#[derive(Debug)]
pub struct Block {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
}

/// `LlamaForCausalLM`.
#[derive(Debug)]
pub struct Llama {
    /// Runtime configuration.
    pub config: Config,
    /// Token embeddings (vocab x hidden).
    pub embed_tokens: Tensor,
    /// Decoder layers.
    pub layers: Vec<Block>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output projection (None when tied to the embeddings).
    pub lm_head: Option<Tensor>,
}

/// cos and sin tables (T x head_dim) in HF's rotate-half layout.
pub(crate) fn rope_tables(theta: f64, head_dim: i64, t: i64, device: Device) -> (Tensor, Tensor) {
    let half = head_dim / 2;
    let inv = Tensor::arange(half, (Kind::Float, device)) * (2.0 / head_dim as f64);
    let inv_freq = (inv * -(theta.ln())).exp();
    let pos = Tensor::arange(t, (Kind::Float, device));
    let freqs = pos.outer(&inv_freq);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// Causal attention of q (B, H, T, hd) over k, v (B, KVH, T, hd), where KVH divides H
/// (grouped-query heads are shared without copying k and v). libtorch's fused
/// scaled-dot-product attention, as transformers' default "sdpa" attention uses: it
/// accumulates the softmax in f32 and never materialises the T x T scores on CPU, which
/// keeps long contexts at transformers' speed and memory.
pub(crate) fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let gqa = q.size()[1] != k.size()[1];
    let (tq, tk) = (q.size()[2], k.size()[2]);
    if tq == tk {
        return Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, None, gqa);
    }
    // Queries at the last tq of tk positions (a KV cache): query i sees keys 0..=tk-tq+i.
    // (libtorch's is_causal aligns the mask top-left, which is wrong here.)
    let mask = Tensor::ones([tq, tk], (Kind::Bool, q.device())).tril(tk - tq);
    Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, None, gqa)
}

/// Keys and values of one block for the positions already processed (B, KVH, T, hd).
#[derive(Debug, Default)]
pub struct LayerCache {
    /// Keys, after the rotary embedding.
    pub k: Option<Tensor>,
    /// Values.
    pub v: Option<Tensor>,
}

impl LayerCache {
    /// Positions already cached.
    pub fn len(&self) -> i64 {
        self.k.as_ref().map_or(0, |k| k.size()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.k.is_none()
    }

    /// Appends new keys and values; returns all of them.
    pub(crate) fn extend(&mut self, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let cat = |old: &Option<Tensor>, new: Tensor| match old {
            Some(o) => Tensor::cat(&[o, &new], 2),
            None => new,
        };
        let (k, v) = (cat(&self.k, k), cat(&self.v, v));
        self.k = Some(k.shallow_clone());
        self.v = Some(v.shallow_clone());
        (k, v)
    }
}

/// Rows of the embedding `table` (vocab, d) for token ids (B, T): (B, T, d).
pub(crate) fn embedding(table: &Tensor, ids: &Tensor) -> Tensor {
    table
        .index_select(0, &ids.flatten(0, -1))
        .view([ids.size()[0], ids.size()[1], -1])
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cfg: &Config,
        cos: &Tensor,
        sin: &Tensor,
        train: bool,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (h, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let q = self
            .q_proj
            .forward(x, train)
            .view([b, t, h, hd])
            .transpose(1, 2);
        let k = self
            .k_proj
            .forward(x, train)
            .view([b, t, kvh, hd])
            .transpose(1, 2);
        let v = self
            .v_proj
            .forward(x, train)
            .view([b, t, kvh, hd])
            .transpose(1, 2);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let (k, v) = match cache {
            Some(c) => c.extend(k, v),
            None => (k, v),
        };
        let y = causal_attention(&q, &k, &v)
            .transpose(1, 2)
            .reshape([b, t, h * hd]);
        self.o_proj.forward(&y, train)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let g = self.gate_proj.forward(x, train).silu();
        self.down_proj
            .forward(&(g * self.up_proj.forward(x, train)), train)
    }
}

impl Llama {
    /// Builds the model from checkpoint tensors.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (named, with both shapes).
    pub fn load(config: Config, w: &mut Weights) -> Result<Self, TrainError> {
        let (d, f, hd) = (
            config.hidden_size,
            config.intermediate_size,
            config.head_dim,
        );
        let (h, kvh) = (config.num_heads, config.num_kv_heads);
        let embed_tokens = w.take("model.embed_tokens.weight", &[config.vocab_size, d])?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            let ab = config.attention_bias;
            let mb = config.mlp_bias;
            layers.push(Block {
                input_layernorm: RmsNorm {
                    weight: w.take(&format!("{p}.input_layernorm.weight"), &[d])?,
                    eps: config.rms_norm_eps,
                },
                self_attn: Attention {
                    q_proj: w.linear(&format!("{p}.self_attn.q_proj"), h * hd, d, ab)?,
                    k_proj: w.linear(&format!("{p}.self_attn.k_proj"), kvh * hd, d, ab)?,
                    v_proj: w.linear(&format!("{p}.self_attn.v_proj"), kvh * hd, d, ab)?,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), d, h * hd, ab)?,
                },
                post_attention_layernorm: RmsNorm {
                    weight: w.take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                    eps: config.rms_norm_eps,
                },
                mlp: Mlp {
                    gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), f, d, mb)?,
                    up_proj: w.linear(&format!("{p}.mlp.up_proj"), f, d, mb)?,
                    down_proj: w.linear(&format!("{p}.mlp.down_proj"), d, f, mb)?,
                },
            });
        }
        let norm = RmsNorm {
            weight: w.take("model.norm.weight", &[d])?,
            eps: config.rms_norm_eps,
        };
        let lm_head = if config.tie_word_embeddings && !w.contains("lm_head.weight") {
            None
        } else {
            Some(w.take("lm_head.weight", &[config.vocab_size, d])?)
        };
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Loads a Hugging Face model directory (config.json + safetensors).
    ///
    /// # Errors
    /// See [`Weights::from_dir`], [`config_from_json`], [`Llama::load`].
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self, TrainError> {
        crate::weights::load_dir(dir, kind, device, config_from_json, Self::load)
    }

    /// Every adaptable linear layer with its Hugging Face module path.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut b.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut b.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    /// Logits (B, T, vocab) for token ids (B, T).
    pub fn forward(&self, ids: &Tensor, train: bool) -> Tensor {
        let mut x = self.embed(ids);
        for i in 0..self.layers.len() {
            x = self.block(i, &x, train);
        }
        self.head(&x)
    }

    /// Token embeddings (B, T, d) of ids (B, T).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        embedding(&self.embed_tokens, ids)
    }

    /// Decoder block `i` on hidden states (B, T, d).
    pub fn block(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        self.block_cached(i, x, train, None)
    }

    /// Decoder block `i` on the hidden states (B, T, d) of the T positions after those in
    /// `cache` (which then holds them too).
    pub fn block_cached(
        &self,
        i: usize,
        x: &Tensor,
        train: bool,
        cache: Option<&mut LayerCache>,
    ) -> Tensor {
        let b = &self.layers[i];
        let t = x.size()[1];
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (cos, sin) = rope_tables(
            self.config.rope_theta,
            self.config.head_dim,
            past + t,
            x.device(),
        );
        let (cos, sin) = (
            cos.narrow(0, past, t).to_kind(x.kind()),
            sin.narrow(0, past, t).to_kind(x.kind()),
        );
        let h = b.self_attn.forward(
            &b.input_layernorm.forward(x),
            &self.config,
            &cos,
            &sin,
            train,
            cache,
        );
        let x = x + h;
        let h = b
            .mlp
            .forward(&b.post_attention_layernorm.forward(&x), train);
        x + h
    }

    /// Final norm and language-model head: logits (B, T, vocab).
    pub fn head(&self, x: &Tensor) -> Tensor {
        let x = self.norm.forward(x);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        x.matmul(&head.tr())
    }
}
