"""Regenerates the parity fixtures of crates/train/tests/fixtures with transformers.

Run by hand (not by CI); it needs torch, transformers and safetensors, e.g.
    pip install --target /tmp/fxenv torch==2.11.0 transformers==5.23.0 safetensors==0.8.0 peft==0.21.2
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/fxenv python3 scripts/make_fixtures.py
Each fixture directory holds a tiny random model as transformers saves it (config.json,
model.safetensors) and reference.safetensors with fixed input ids and the reference logits.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "train", "tests", "fixtures")


def save(model, name, vocab):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 11), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file({"input_ids": ids.to(torch.int64), "logits": logits.contiguous()}, os.path.join(d, "reference.safetensors"))
    print(name, "logits", tuple(logits.shape), "max |logit|", logits.abs().max().item(), file=sys.stderr)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500.0,
        attn_implementation="eager", initializer_range=0.25,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Non-trivial norm gains, so a missing gain would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    save(model, "tiny-llama", cfg.vocab_size)


TEXT = """It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife. However little known the feelings or views of such a man
may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property of some one or other of
their daughters."""


def tiny_tokenizer(name, vocab):
    """A character-level BPE tokenizer small enough for the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() <= vocab
    tok.save(os.path.join(OUT, name, "tokenizer.json"))
    ids = tok.encode(TEXT).ids
    print(name, "tokenizer", tok.get_vocab_size(), "tokens of TEXT:", len(ids), file=sys.stderr)


def tiny_gptj():
    torch.manual_seed(0)
    cfg = GPTJConfig(
        vocab_size=101, n_embd=48, n_layer=2, n_head=4, rotary_dim=6, n_inner=96,
        n_positions=64, layer_norm_epsilon=1e-5, initializer_range=0.25,
        attn_implementation="eager",
    )
    model = GPTJForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    save(model, "tiny-gptj", cfg.vocab_size)


if __name__ == "__main__":
    torch.set_num_threads(1)
    tiny_llama()
    tiny_tokenizer("tiny-llama", 97)
    tiny_gptj()
