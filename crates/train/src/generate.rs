//! Generation, for sanity checks of real checkpoints and their adapters (e.g.
//! SmolLM2-135M-Instruct answering a question): chat templates rendered with minijinja as
//! transformers renders them with Jinja; greedy decoding or sampling (temperature, top-p,
//! seeded) with a KV cache ([`CausalLm::forward_cached`]: the prompt once, then one token
//! per step), each token handed to a callback as it comes.
use crate::load::Loaded;
use crate::{CausalLm, TrainError};
use tch::{Device, Kind, Tensor};

/// The prompt for one user message: the checkpoint's chat template with
/// `add_generation_prompt`, or the bare text when the checkpoint has no template.
///
/// # Errors
/// A template that does not parse or render (the template's own `raise_exception` too).
pub fn chat_prompt(loaded: &Loaded, user: &str) -> Result<String, TrainError> {
    let Some(template) = &loaded.chat_template else {
        return Ok(user.to_string());
    };
    render_chat(
        template,
        user,
        loaded.bos_token.as_deref(),
        loaded.eos_token.as_deref(),
    )
}

/// Renders a Hugging Face chat template for one user message.
///
/// # Errors
/// A template that does not parse or render.
///
/// ```
/// let t = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
/// let p = rankstab_train::generate::render_chat(t, "hi", None, None).unwrap();
/// assert_eq!(p, "<user>hi<assistant>");
/// ```
pub fn render_chat(
    template: &str,
    user: &str,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<String, TrainError> {
    let bad = |e: minijinja::Error| TrainError::Invalid(format!("chat template: {e}"));
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template).map_err(bad)?;
    let ctx = minijinja::context! {
        messages => vec![minijinja::context! { role => "user", content => user }],
        add_generation_prompt => true,
        bos_token => bos.unwrap_or(""),
        eos_token => eos.unwrap_or(""),
    };
    env.get_template("chat")
        .and_then(|t| t.render(ctx))
        .map_err(bad)
}

/// How each new token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely token); otherwise the logits are divided by it before the
    /// softmax.
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of most likely tokens whose
    /// probability reaches `top_p` (1: all tokens).
    pub top_p: f64,
    /// Seed of the draws (the same seed, prompt and model give the same text).
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };

    /// Checks the values.
    ///
    /// # Errors
    /// A temperature that is negative, above 100 or not finite; a top-p outside (0, 1].
    pub fn check(&self) -> Result<(), TrainError> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(TrainError::Invalid(format!(
                "temperature {}: use a number from 0 (greedy) to 100",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(TrainError::Invalid(format!(
                "top-p {}: use a number in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The token chosen from `logits` (one position): the argmax when greedy, else a draw from
/// the tempered, nucleus-truncated softmax with `rng`.
pub fn choose(logits: &[f32], s: &Sampling, rng: &mut impl rand::Rng) -> i64 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            })
            .0 as i64
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / s.temperature).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    // Most likely first; ties by token id, so the order is deterministic.
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, q) in &p {
        kept += 1;
        mass += q / z;
        if mass >= s.top_p {
            break;
        }
    }
    let p = &p[..kept];
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut u = rng.random::<f64>() * total;
    for &(i, q) in p {
        if u < q {
            return i as i64;
        }
        u -= q;
    }
    p[kept - 1].0 as i64
}

/// Continuation of `prompt` ids: at most `max_tokens` new ids chosen by `sampling`,
/// stopping after any id in `stop`; each new id is passed to `on_token` as it is chosen.
/// Returns the new ids (the stop id included when reached).
///
/// # Errors
/// An empty prompt, bad sampling values, non-finite logits.
pub fn generate(
    model: &CausalLm,
    prompt: &[i64],
    max_tokens: usize,
    stop: &[i64],
    sampling: &Sampling,
    device: Device,
    mut on_token: impl FnMut(i64),
) -> Result<Vec<i64>, TrainError> {
    use rand::SeedableRng;
    if prompt.is_empty() {
        return Err(TrainError::Invalid("the prompt has no tokens".into()));
    }
    sampling.check()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    tch::no_grad(|| -> Result<(), TrainError> {
        let mut input = prompt.to_vec();
        for _ in 0..max_tokens {
            let t = Tensor::from_slice(&input)
                .view([1, input.len() as i64])
                .to_device(device);
            let logits = model
                .forward_cached(&t, &mut cache)
                .select(1, input.len() as i64 - 1)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
                .reshape([-1]);
            let logits: Vec<f32> = Vec::<f32>::try_from(&logits)
                .map_err(|e| TrainError::Invalid(format!("reading the logits: {e}")))?;
            if logits.iter().any(|v| !v.is_finite()) {
                return Err(TrainError::Invalid(format!(
                    "the model's logits are NaN or infinite at token position {} (new token {}): the weights or their metadata are damaged",
                    prompt.len() + out.len() - 1,
                    out.len() + 1
                )));
            }
            let next = choose(&logits, sampling, &mut rng);
            out.push(next);
            on_token(next);
            if stop.contains(&next) {
                break;
            }
            input = vec![next];
        }
        Ok(())
    })?;
    Ok(out)
}

/// Greedy continuation of `prompt` ids ([`generate`] with [`Sampling::GREEDY`]).
///
/// # Errors
/// See [`generate`].
pub fn greedy(
    model: &CausalLm,
    prompt: &[i64],
    max_tokens: usize,
    stop: &[i64],
    device: Device,
) -> Result<Vec<i64>, TrainError> {
    generate(
        model,
        prompt,
        max_tokens,
        stop,
        &Sampling::GREEDY,
        device,
        |_| {},
    )
}

/// Greedy answer of a loaded model to one user message (chat template applied), as text
/// without special tokens.
///
/// # Errors
/// See [`chat_prompt`], [`greedy`], tokenizer errors.
pub fn answer(
    loaded: &Loaded,
    user: &str,
    max_tokens: usize,
    device: Device,
) -> Result<String, TrainError> {
    let prompt = chat_prompt(loaded, user)?;
    let ids = loaded.tokenizer.encode(&prompt)?;
    let new = greedy(&loaded.model, &ids, max_tokens, &loaded.eos_ids, device)?;
    loaded.tokenizer.decode(&new, false)
}

/// The answer of a loaded model to one user message (chat template applied) with
/// `sampling`, handing the text to `on_text` piece by piece as tokens come (a piece ends
/// before an incomplete UTF-8 character, which waits for its next token); returns the
/// whole text without special tokens.
///
/// # Errors
/// See [`chat_prompt`], [`generate`], tokenizer errors.
pub fn answer_streaming(
    loaded: &Loaded,
    user: &str,
    max_tokens: usize,
    sampling: &Sampling,
    device: Device,
    mut on_text: impl FnMut(&str),
) -> Result<String, TrainError> {
    let prompt = chat_prompt(loaded, user)?;
    let ids = loaded.tokenizer.encode(&prompt)?;
    let mut new = Vec::new();
    let mut shown = 0usize;
    let mut failed = None;
    generate(
        &loaded.model,
        &ids,
        max_tokens,
        &loaded.eos_ids,
        sampling,
        device,
        |id| {
            new.push(id);
            match loaded.tokenizer.decode(&new, false) {
                Ok(text) => {
                    let stable = text.trim_end_matches('\u{FFFD}');
                    if stable.len() > shown && text.is_char_boundary(shown) {
                        on_text(&stable[shown..]);
                        shown = stable.len();
                    }
                }
                Err(e) => failed = Some(e),
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    let text = loaded.tokenizer.decode(&new, false)?;
    if text.len() > shown && text.is_char_boundary(shown) {
        on_text(&text[shown..]);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(seed)
    }

    /// Greedy is the argmax; a tiny top-p keeps only the most likely token; sampling at
    /// temperature 1 draws each token with its softmax probability (frequencies over 40000
    /// draws within 4 standard errors); top-p 0.7 never draws outside the nucleus.
    #[test]
    fn choices_follow_the_tempered_truncated_softmax() {
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        let mut r = rng(1);
        assert_eq!(choose(&logits, &Sampling::GREEDY, &mut r), 2);
        let tiny = Sampling {
            temperature: 1.0,
            top_p: 1e-9,
            seed: 0,
        };
        assert!((0..100).all(|_| choose(&logits, &tiny, &mut r) == 2));
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let full = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        };
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[choose(&logits, &full, &mut r) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            let se = (p * (1.0 - p) / n as f64).sqrt();
            let f = c as f64 / n as f64;
            assert!((f - p).abs() < 4.0 * se, "token {i}: {f} vs {p}");
        }
        // Probabilities 0.09, 0.24, 0.64, 0.03...: the 0.7 nucleus is tokens 2 and 1.
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 0.7,
            seed: 0,
        };
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[choose(&logits, &nucleus, &mut r) as usize] = true;
        }
        assert_eq!(seen, [false, true, true, false]);
        // A high temperature flattens: token 0 is drawn far more often than at 1.
        let hot = Sampling {
            temperature: 10.0,
            top_p: 1.0,
            seed: 0,
        };
        let zeros = (0..4000)
            .filter(|_| choose(&logits, &hot, &mut r) == 0)
            .count();
        assert!(zeros > 800, "{zeros}");
    }

    #[test]
    fn bad_sampling_values_are_refused() {
        for (t, p) in [
            (-1.0, 1.0),
            (f64::NAN, 1.0),
            (101.0, 1.0),
            (1.0, 0.0),
            (1.0, 1.5),
        ] {
            let s = Sampling {
                temperature: t,
                top_p: p,
                seed: 0,
            };
            assert!(s.check().is_err(), "{t} {p}");
        }
        assert!(Sampling::GREEDY.check().is_ok());
    }
}
