"""PEFT parity fixtures of crates/train/tests/fixtures/peft (and the reverse check).

Run by hand (not by CI), from anywhere. Python 3.11; everything goes into /tmp:
    python3 -m pip install --target /tmp/peftenv torch==2.11.0 transformers==5.23.0 safetensors==0.8.0 peft==0.21.2
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/peftenv python3 scripts/make_peft_fixtures.py
(PyPI's torch 2.11.0 is the CUDA 13 build with its CUDA wheels, about 5 GB in /tmp; it runs
on CPU. About 2 minutes to install, seconds to run.)

Forward direction (writes the fixtures). For the tiny random models of
scripts/make_fixtures.py (tiny-llama, tiny-gptj) and for LoRA and rsLoRA, it wraps the model
with peft's LoraConfig(r=8, lora_alpha=16, use_rslora=..., every linear attention and MLP
module), keeps PEFT's Kaiming-uniform lora_A, draws lora_B from a seeded normal (PEFT's
B = 0 would make the test vacuous), and writes fixtures/peft/<model>-<lora|rslora>/:
    adapter_config.json, adapter_model.safetensors   PEFT's save_pretrained (README.md dropped)
    reference.safetensors   input_ids (the base fixture's), logits of the PeftModel,
                            merged_logits of merge_and_unload()
    reference.json          a short text, its token ids (tiny-llama's tokenizer.json) and the
                            PeftModel's / base model's mean next-token NLL on it in one window
crates/train/tests/peft_parity.rs and tests/cli_eval.rs check rankstab against these.

Ranks and LoraConfig options (also written by the default run; `--ranks` writes only these).
For tiny-llama, rsLoRA adapters made by peft at three ranks on every linear but lm_head,
each naming its modules another way, and a fourth with per-module ranks and alphas:
    tiny-llama-r2-all-linear   r=2, target_modules="all-linear"
    tiny-llama-r4-regex        r=4, target_modules=a regular expression over full names
    tiny-llama-r8-list         r=8, target_modules=the seven module names
    tiny-llama-patterns        LoRA r=4, lora_alpha=8, target_modules=[q_proj, v_proj, down_proj],
                               layers_to_transform=[1], rank_pattern, alpha_pattern
lora_B seeded nonzero as above; adapter_config.json as peft saved it (peft writes the list it
expanded "all-linear" to), and reference.json: the target_modules asked for, and for every
module peft adapted its r, lora_alpha and scaling as peft's layers hold them; reference.safetensors:
the base fixture's input_ids and the PeftModel's logits. crates/train/tests/peft_options.rs
checks rankstab's reading of each option against these, and tests/cli_audit.rs audits them.

Reverse direction (checks adapters that rankstab wrote; writes nothing):
    RANKSTAB_PEFT_EXPORT=/tmp/rankstab-peft cargo test -p rankstab-train --test peft_parity export_rankstab_adapters -- --ignored
        (rankstab attaches its own adapters, r = 4, alpha = 8, LoRA, rsLoRA and beta = 0.75,
         with random B, saves them with save_peft into /tmp/rankstab-peft/<model>-beta<beta>/
         and writes its logits for the base fixture's input ids to rankstab_logits.safetensors)
    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/peftenv python3 scripts/make_peft_fixtures.py --check /tmp/rankstab-peft
loads each with PeftModel.from_pretrained on the base fixture and compares PEFT's logits with
rankstab's. A beta other than 1 or 1/2 has no PEFT equivalent (PEFT ignores rankstab_beta):
the script reports those as expected mismatches.
"""
import json
import math
import os
import shutil
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPTJForCausalLM, LlamaForCausalLM

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "train", "tests", "fixtures")
OUT = os.path.join(FIX, "peft")

MODELS = {
    "tiny-llama": (LlamaForCausalLM, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "tiny-gptj": (GPTJForCausalLM, ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]),
}
R, ALPHA = 8, 16
# Standard deviation of the random lora_B: the adapter then moves the logits by O(1).
B_STD = 0.3

# Short enough for one window of the tiny models (64 positions).
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."


def load_base(name):
    cls, _ = MODELS[name]
    return cls.from_pretrained(os.path.join(FIX, name), dtype=torch.float32, attn_implementation="eager").eval()


def base_ids(name):
    return load_file(os.path.join(FIX, name, "reference.safetensors"))["input_ids"]


def nll(model, ids):
    """Mean next-token NLL of one window (B=1), as rankstab eval computes it."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def make(name, rslora, seed):
    _, targets = MODELS[name]
    tag = f"{name}-{'rslora' if rslora else 'lora'}"
    d = os.path.join(OUT, tag)
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load_base(name), cfg).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    n_b = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(B_STD * torch.randn(p.shape, generator=g))
                n_b += 1
    want_scaling = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    for m in model.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling:
            assert abs(m.scaling["default"] - want_scaling) < 1e-12, (m.scaling, want_scaling)
    # A machine-independent base model name (PEFT records the path it was loaded from).
    model.peft_config["default"].base_model_name_or_path = name
    model.save_pretrained(d, safe_serialization=True)
    readme = os.path.join(d, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    # PEFT writes target_modules in set order (which changes with PYTHONHASHSEED): sorted,
    # in PEFT's own JSON layout, the fixture is the same byte for byte on every run.
    cfg_path = os.path.join(d, "adapter_config.json")
    saved = json.load(open(cfg_path))
    saved["target_modules"] = sorted(saved["target_modules"])
    with open(cfg_path, "w") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True))

    ids = base_ids(name)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    base_ref = load_file(os.path.join(FIX, name, "reference.safetensors"))["logits"]
    moved = (logits - base_ref).abs().max().item()
    assert moved > 0.1, f"{tag}: the adapter hardly changes the logits ({moved})"

    out = {"name": tag, "base_model": name, "r": R, "lora_alpha": ALPHA, "use_rslora": rslora,
           "scaling": want_scaling, "b_std": B_STD, "seed": seed,
           "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                        "transformers": __import__("transformers").__version__}}
    if name == "tiny-llama":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(FIX, name, "tokenizer.json"))
        text_ids = tok.encode(TEXT, add_special_tokens=False).ids
        t = torch.tensor([text_ids], dtype=torch.int64)
        out.update({"text": TEXT, "text_ids": text_ids, "nll": nll(model, t), "nll_base": nll(load_base(name), t)})

    # The unmerged PeftModel, checked again after save / load through PEFT itself.
    back = PeftModel.from_pretrained(load_base(name), d).eval()
    with torch.no_grad():
        back_logits = back(input_ids=ids).logits.float()
    assert torch.equal(back_logits, logits), f"{tag}: PEFT's own round trip changed the logits"

    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits.float().contiguous()
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits, "merged_logits": merged_logits},
              os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"{tag}: {n_b} lora_B set, scaling {want_scaling:.6f}, max |logit change| by the adapter {moved:.3f}, "
          f"max |merged - unmerged| {(merged_logits - logits).abs().max().item():.2e}"
          + (f", NLL {out['nll']:.6f} (base {out['nll_base']:.6f})" if "nll" in out else ""), file=sys.stderr)


RANK_CONFIGS = [
    ("tiny-llama-r2-all-linear", dict(r=2, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
    ("tiny-llama-r4-regex", dict(r=4, lora_alpha=16, use_rslora=True,
                                 target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj")),
    ("tiny-llama-r8-list", dict(r=8, lora_alpha=16, use_rslora=True,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    ("tiny-llama-patterns", dict(r=4, lora_alpha=8, use_rslora=False, target_modules=["q_proj", "v_proj", "down_proj"],
                                 layers_to_transform=[1], layers_pattern="layers",
                                 rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
                                 alpha_pattern={"q_proj": 4})),
]


def make_ranked(tag, kwargs, seed):
    """One adapter of RANK_CONFIGS: peft's files, its per-module r / alpha / scaling, logits."""
    name = "tiny-llama"
    d = os.path.join(OUT, tag)
    shutil.rmtree(d, ignore_errors=True)
    torch.manual_seed(seed)
    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kwargs)
    model = get_peft_model(load_base(name), cfg).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(B_STD * torch.randn(p.shape, generator=g))
    modules = {}
    for n, m in model.base_model.model.named_modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict) and "default" in m.scaling:
            modules[n] = {"r": m.r["default"], "lora_alpha": m.lora_alpha["default"], "scaling": m.scaling["default"]}
    assert modules, tag
    model.peft_config["default"].base_model_name_or_path = name
    model.save_pretrained(d, safe_serialization=True)
    readme = os.path.join(d, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cfg_path = os.path.join(d, "adapter_config.json")
    saved = json.load(open(cfg_path))
    if isinstance(saved["target_modules"], list):
        saved["target_modules"] = sorted(saved["target_modules"])
    with open(cfg_path, "w") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=False))
    ids = base_ids(name)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    back = PeftModel.from_pretrained(load_base(name), d).eval()
    with torch.no_grad():
        back_logits = back(input_ids=ids).logits.float()
    assert torch.equal(back_logits, logits), f"{tag}: PEFT's own round trip changed the logits"
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits}, os.path.join(d, "reference.safetensors"))
    out = {"name": tag, "base_model": name, "asked": {k: v for k, v in kwargs.items()}, "seed": seed, "b_std": B_STD,
           "modules": modules,
           "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                        "transformers": __import__("transformers").__version__}}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{tag}: {len(modules)} modules, ranks {sorted({m['r'] for m in modules.values()})}, "
          f"scalings {sorted({round(m['scaling'], 6) for m in modules.values()})}", file=sys.stderr)


def check(root):
    """Loads adapters written by rankstab (see the module docstring) with PEFT."""
    worst = 0.0
    found = 0
    for tag in sorted(os.listdir(root)):
        d = os.path.join(root, tag)
        if not os.path.exists(os.path.join(d, "adapter_config.json")):
            continue
        found += 1
        cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        name = cfg["base_model_name_or_path"]
        ref = load_file(os.path.join(d, "rankstab_logits.safetensors"))
        model = PeftModel.from_pretrained(load_base(name), d).eval()
        with torch.no_grad():
            logits = model(input_ids=ref["input_ids"]).logits.float()
        diff = (logits - ref["logits"]).abs().max().item()
        beta = cfg.get("rankstab_beta")
        if beta is not None:
            print(f"{tag}: beta {beta} has no PEFT equivalent (PEFT uses alpha/{'sqrt(r)' if cfg['use_rslora'] else 'r'}): "
                  f"max |PEFT - rankstab| {diff:.3e} (a mismatch is expected)", file=sys.stderr)
            continue
        worst = max(worst, diff)
        ok = diff < 1e-4
        print(f"{tag}: r={cfg['r']} lora_alpha={cfg['lora_alpha']} use_rslora={cfg['use_rslora']}: "
              f"max |PEFT - rankstab| logit {diff:.3e} {'OK' if ok else 'FAIL'}", file=sys.stderr)
        if not ok:
            sys.exit(1)
    if found == 0:
        sys.exit(f"no adapter directories under {root}")
    print(f"all rankstab adapters load in PEFT with the same logits (max difference {worst:.3e})", file=sys.stderr)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
    elif len(sys.argv) in (1, 2) and sys.argv[1:] in ([], ["--ranks"]):
        os.makedirs(OUT, exist_ok=True)
        if sys.argv[1:] != ["--ranks"]:
            for i, (name, rslora) in enumerate([("tiny-llama", False), ("tiny-llama", True),
                                                ("tiny-gptj", False), ("tiny-gptj", True)]):
                make(name, rslora, seed=10 + i)
        for i, (tag, kwargs) in enumerate(RANK_CONFIGS):
            make_ranked(tag, kwargs, seed=30 + i)
    else:
        sys.exit("usage: make_peft_fixtures.py [--ranks | --check DIR]")
