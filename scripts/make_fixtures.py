"""Regenerates the parity fixtures of crates/train/tests/fixtures with transformers.

Run by hand (not by CI); it needs torch, transformers and safetensors, e.g.
    pip install --target /tmp/fxenv torch==2.11.0 transformers==5.23.0 safetensors==0.8.0 peft==0.21.2
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/fxenv python3 scripts/make_fixtures.py
Each fixture directory holds a tiny random model as transformers saves it (config.json,
model.safetensors) and reference.safetensors with fixed input ids and the reference logits.

The GGUF fixtures also need gguf-py (`pip install --target /tmp/fxenv gguf==0.19.0`):
  quants/    a small GGUF with one tensor of every quantization the Rust reader supports and
             gguf-py's dequantized values (K-quants: random blocks, as gguf-py cannot
             quantize them), plus one metadata value of every GGUF type;
  smollm2/   transformers' GGUF loader on assets/SmolLM2-135M-Instruct.Q4_1.gguf (run
             scripts/fetch-assets.sh first): moments of every dequantized tensor, a few
             whole rows, logits at a few positions of a chat prompt, the greedy answer, and
             tokenizer ids of a few strings. Only those few numbers are kept.
"""
import json
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


def quants():
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize, dequantize
    from safetensors.numpy import save_file
    d = os.path.join(OUT, "quants")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(os.path.join(d, "quants.gguf"), "llama")
    # One metadata value of every GGUF type, for the reader's own test.
    w.add_uint8("test.u8", 200); w.add_int8("test.i8", -5); w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000); w.add_uint32("test.u32", 4000000000); w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.25); w.add_bool("test.bool", True); w.add_string("test.str", "grüß")
    w.add_uint64("test.u64", 2**40); w.add_int64("test.i64", -2**40); w.add_float64("test.f64", -1.5)
    w.add_array("test.arr", ["a", "bc"])
    expected = {}
    for qt in [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K]:
        x = rng.standard_normal((3, 512)).astype(np.float32)
        if qt in (Q.Q4_K, Q.Q6_K):
            # gguf-py dequantizes but does not quantize K-quants: random blocks with sane scales.
            block, nbytes = gguf.GGML_QUANT_SIZES[qt]
            raw = rng.integers(0, 256, size=(3, 512 // block * nbytes), dtype=np.uint8)
            blocks = raw.reshape(-1, nbytes)
            scale = np.array([0.01], dtype=np.float16).view(np.uint8)
            if qt == Q.Q4_K:
                blocks[:, 0:2] = scale
                blocks[:, 2:4] = np.array([0.003], dtype=np.float16).view(np.uint8)
            else:
                blocks[:, 208:210] = scale
        elif qt == Q.F32:
            raw = x
        else:
            raw = quantize(x, qt)
        w.add_tensor(f"t.{qt.name.lower()}", raw, raw_dtype=qt)
        expected[f"t.{qt.name.lower()}"] = np.ascontiguousarray(dequantize(raw, qt).astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    save_file(expected, os.path.join(d, "expected.safetensors"))
    print("quants:", {k: v.shape for k, v in expected.items()}, file=sys.stderr)


ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.exists(os.path.join(ASSETS, SMOL)):
        print("skipping SmolLM2: run scripts/fetch-assets.sh first", file=sys.stderr)
        return
    tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=SMOL)
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=SMOL, dtype=torch.float32).eval()
    d = os.path.join(OUT, "smollm2")
    os.makedirs(d, exist_ok=True)
    out = {}
    # Dequantized tensors: moments of every tensor, and full rows of a few (rows across
    # head boundaries of q/k, where llama.cpp's permutation shows).
    sd = model.state_dict()
    names = sorted(n for n in sd if n != "lm_head.weight")
    out["moment_names_len"] = torch.tensor([len(names)])
    mom = torch.stack([torch.stack([sd[n].double().sum(), sd[n].double().square().sum()]) for n in names])
    out["moments"] = mom
    rows = {
        "model.embed_tokens.weight": [0, 1, 2, 198, 4649, 49151],
        "model.layers.0.self_attn.q_proj.weight": [0, 1, 2, 31, 32, 33, 63, 64, 65, 575],
        "model.layers.0.self_attn.k_proj.weight": [0, 1, 31, 32, 63, 64, 191],
        "model.layers.29.self_attn.q_proj.weight": [0, 1, 32, 100, 500],
        "model.layers.29.self_attn.k_proj.weight": [0, 1, 32, 100, 190],
        "model.layers.0.self_attn.v_proj.weight": [0, 1, 191],
        "model.layers.0.mlp.down_proj.weight": [0, 575],
        "model.layers.0.mlp.gate_proj.weight": [0, 1535],
        "model.layers.5.input_layernorm.weight": [0],
    }
    for n, r in rows.items():
        t = sd[n]
        if t.dim() == 1:
            t = t.unsqueeze(0)
        out[f"rows/{n}"] = torch.tensor(r, dtype=torch.int64)
        out[f"values/{n}"] = t[r].float().contiguous()
    # Logits at a few positions of the chat prompt.
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    T = ids.shape[1]
    positions = torch.tensor([0, 7, 20, T - 2, T - 1])
    fixed = torch.tensor([0, 1, 2, 198, 1000, 49151])
    top = logits[positions].topk(8, dim=-1).indices.flatten()
    vocab_ids = torch.unique(torch.cat([fixed, top]))
    out["input_ids"] = ids.to(torch.int64).contiguous()
    out["positions"] = positions.to(torch.int64)
    out["vocab_ids"] = vocab_ids.to(torch.int64)
    out["logits"] = logits[positions][:, vocab_ids].contiguous()
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    out["generated"] = gen[0, T:].to(torch.int64).contiguous()
    save_file(out, os.path.join(d, "reference.safetensors"))
    texts = [
        prompt,
        "Hello world! It's 2024, and 12345 apples cost $3.50.",
        "  leading spaces\tand\ttabs\n\nnew lines  ",
        "Ünïcödé façade — naïve café 東京 🙂",
        "<|im_start|>user\nhi<|im_end|>",
        "def f(x):\n    return x ** 2  # square",
    ]
    cases = [{"text": s, "ids": tok(s).input_ids} for s in texts]
    json.dump({"moment_names": names, "prompt": prompt, "generated_text": tok.decode(out["generated"]), "tokenizer_cases": cases},
              open(os.path.join(d, "reference.json"), "w"), indent=1, ensure_ascii=False)
    print("smollm2: logits", tuple(out["logits"].shape), "generated", repr(tok.decode(out["generated"])), file=sys.stderr)


if __name__ == "__main__":
    torch.set_num_threads(1)
    tiny_llama()
    tiny_tokenizer("tiny-llama", 97)
    tiny_gptj()
    quants()
    torch.set_num_threads(2)
    smollm2()
