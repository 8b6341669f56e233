//! Greedy generation, for sanity checks of real checkpoints (e.g. SmolLM2-135M-Instruct
//! answering a question): chat templates rendered with minijinja as transformers renders
//! them with Jinja, and greedy decoding by re-running the whole sequence each step (no KV
//! cache: the models stay immutable and cache-free, and short answers are cheap).
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

/// Greedy continuation of `prompt` ids: at most `max_tokens` new ids, stopping after any id
/// in `stop`. Returns the new ids (the stop id included when reached).
///
/// # Errors
/// An empty prompt.
pub fn greedy(
    model: &CausalLm,
    prompt: &[i64],
    max_tokens: usize,
    stop: &[i64],
    device: Device,
) -> Result<Vec<i64>, TrainError> {
    if prompt.is_empty() {
        return Err(TrainError::Invalid("the prompt has no tokens".into()));
    }
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    tch::no_grad(|| -> Result<(), TrainError> {
        for _ in 0..max_tokens {
            let t = Tensor::from_slice(&ids)
                .view([1, ids.len() as i64])
                .to_device(device);
            let logits = model
                .forward(&t, false)
                .select(1, ids.len() as i64 - 1)
                .to_kind(Kind::Float);
            if logits.isfinite().all().int64_value(&[]) == 0 {
                return Err(TrainError::Invalid(format!(
                    "the model's logits are NaN or infinite at token position {} (new token {}): the weights or their metadata are damaged",
                    ids.len() - 1,
                    out.len() + 1
                )));
            }
            let next = logits.argmax(-1, false).int64_value(&[0]);
            ids.push(next);
            out.push(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(())
    })?;
    Ok(out)
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
