#!/usr/bin/env python3
"""Generate the FastChat delta-weights reference data in tests/data/fastchat_delta/.

llmfs's `delta import --format fastchat` must produce tensors bit-identical to what FastChat's
`fastchat.model.apply_delta.apply_delta` writes. This script runs the real FastChat code
(`make_delta`, then `apply_delta`) on a tiny seeded LLaMA model and keeps every stage:

    base/     tiny LlamaForCausalLM, random init (+ random RMSNorm gains), BF16 safetensors
    target/   base with every tensor perturbed by N(0, 0.01*std(tensor)) in f32, stored BF16
    delta/    fastchat.model.make_delta.make_delta(base, target, delta)     -> F16 safetensors
    applied/  fastchat.model.apply_delta.apply_delta(base, applied, delta)  -> F16 safetensors

and writes tests/data/fastchat_delta/README.md (versions, provenance, dtypes, FastChat's exact
arithmetic). Everything is seeded; rerunning rewrites the same bytes on the same versions.

It installs nothing. It needs the venv made for scripts/fastchat_quant_check.py (see its
docstring: torch, fschat==0.2.36 --no-deps, transformers accelerate psutil requests safetensors
numpy); tested with torch 2.15.0, transformers 5.24.0, fschat 0.2.36. No network access is
needed: the tokenizer is a tiny in-script BPE `LlamaTokenizer` (transformers 5 has no
sentencepiece-backed LlamaTokenizer; `AutoTokenizer.from_pretrained(path, use_fast=False)`,
which FastChat calls, loads it fine, so FastChat's functions run unmodified).

FastChat quirk: `make_delta` reads the module-global `args.hub_repo_id`, which only exists when
the module runs as __main__; we set `fastchat.model.make_delta.args` to a Namespace with
hub_repo_id=None before calling the function (the code path FastChat's own CLI takes without
--hub-repo-id).

Run from the repository root:
    /tmp/fcq/bin/python scripts/fastchat_delta_check.py
"""

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open

OUT_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "fastchat_delta"))
SEED = 20240611


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def tiny_tokenizer():
    """A ~80-token BPE LlamaTokenizer (transformers 5 API: vocab dict + merges), fully offline."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:!?'-":
        vocab[c] = len(vocab)
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("\u2581", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges)


def save_model(model, tokenizer, path):
    if os.path.exists(path):
        shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def make_base_and_target(base_dir, target_dir):
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(tiny_config())  # transformers' init: N(0, 0.02) linears/embeddings, ones for norms
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # RMSNorm gains init to exactly 1.0 (std 0 -> the perturbation below would be a no-op);
                # make them random so the delta on norms is not trivially zero.
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    model = model.to(torch.bfloat16)
    tok = tiny_tokenizer()
    save_model(model, tok, base_dir)

    gen = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().float()
            noise = torch.randn(w.shape, generator=gen, dtype=torch.float32)
            p.copy_((w + noise * (0.01 * w.std())).to(torch.bfloat16))
    save_model(model, tok, target_dir)


def run_fastchat(base_dir, target_dir, delta_dir, applied_dir):
    import fastchat.model.make_delta as fc_make
    import fastchat.model.apply_delta as fc_apply

    fc_make.args = argparse.Namespace(hub_repo_id=None)  # see module docstring
    for d in (delta_dir, applied_dir):
        if os.path.exists(d):
            shutil.rmtree(d)
    fc_make.make_delta(base_dir, target_dir, delta_dir)
    fc_apply.apply_delta(base_dir, applied_dir, delta_dir)


def load_st(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
    return out


def verify(dirs):
    """Re-derive FastChat's results with plain torch ops from the saved files, bit for bit."""
    base, target, delta, applied = (load_st(dirs[k]) for k in ("base", "target", "delta", "applied"))
    assert set(base) == set(target) == set(delta) == set(applied), "tensor name sets differ"
    stats = {}
    for name in sorted(base):
        b16 = base[name].to(torch.float16)
        d_exp = target[name].to(torch.float16) - b16
        a_exp = b16 + delta[name]
        assert delta[name].dtype == torch.float16 and applied[name].dtype == torch.float16
        assert torch.equal(delta[name].view(torch.int16), d_exp.view(torch.int16)), name
        assert torch.equal(applied[name].view(torch.int16), a_exp.view(torch.int16)), name
        # Cross-check: fp16 add == correctly rounded sum (f64 sum of two f16 is exact; one rounding).
        a_f64 = (b16.double() + delta[name].double()).to(torch.float16)
        assert torch.equal(a_f64.view(torch.int16), a_exp.view(torch.int16)), name
        t16 = target[name].to(torch.float16)
        stats[name] = {
            "shape": list(base[name].shape),
            "delta_subnormal_f16": int(((delta[name] != 0) & (delta[name].abs() < 2.0 ** -14)).sum()),
            "delta_zero": int((delta[name] == 0).sum()),
            "base_bf16_to_f16_inexact": int((b16.float() != base[name].float()).sum()),
            "applied_ne_f16_target": int((applied[name].view(torch.int16) != t16.view(torch.int16)).sum()),
        }
    return stats


def file_dtypes(d):
    rows = []
    for f in sorted(os.listdir(d)):
        p = os.path.join(d, f)
        if f.endswith(".safetensors"):
            with safe_open(p, framework="pt") as h:
                dts = sorted({str(h.get_slice(k).get_dtype()) for k in h.keys()})
                n = len(list(h.keys()))
            rows.append(f"| `{os.path.basename(d)}/{f}` | {os.path.getsize(p)} | {n} tensors, dtype {', '.join(dts)} |")
        else:
            rows.append(f"| `{os.path.basename(d)}/{f}` | {os.path.getsize(p)} | |")
    return rows


def main():
    import transformers
    import fastchat

    os.makedirs(OUT_DIR, exist_ok=True)
    dirs = {k: os.path.join(OUT_DIR, k) for k in ("base", "target", "delta", "applied")}
    make_base_and_target(dirs["base"], dirs["target"])
    run_fastchat(dirs["base"], dirs["target"], dirs["delta"], dirs["applied"])
    for d in dirs.values():
        for f in os.listdir(d):
            assert not f.endswith(".bin"), f"unexpected pickle file {d}/{f}"
    stats = verify(dirs)
    with open(os.path.join(OUT_DIR, "stats.json"), "w") as fh:
        json.dump(stats, fh, indent=1, sort_keys=True)
    tot = {k: sum(s[k] for s in stats.values()) for k in next(iter(stats.values())) if k != "shape"}
    rows = []
    for k in ("base", "target", "delta", "applied"):
        rows += file_dtypes(dirs[k])
    readme = README.format(
        torch=torch.__version__, transformers=transformers.__version__, fschat=fastchat.__version__,
        python=sys.version.split()[0], seed=SEED, files="\n".join(rows), **tot,
        ntensors=len(stats),
    )
    with open(os.path.join(OUT_DIR, "README.md"), "w") as fh:
        fh.write(readme)
    print("wrote", OUT_DIR, tot)


README = """# FastChat delta-weights reference data

Generated by `scripts/fastchat_delta_check.py` (run `/tmp/fcq/bin/python scripts/fastchat_delta_check.py`
from the repository root; venv as described in `scripts/fastchat_quant_check.py`). Seed {seed}.

Versions: python {python}, torch {torch}, transformers {transformers}, fschat {fschat}; CPU only.

## Directories

* `base/` — `LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
  num_attention_heads=4, num_key_value_heads=4, vocab_size=256, max_position_embeddings=128,
  tie_word_embeddings=False))` after `torch.manual_seed({seed})`; transformers' own random init
  (N(0, 0.02) for linears and embeddings). The RMSNorm gains (`*norm.weight`), which transformers
  initialises to exactly 1.0, are set to `1 + 0.1*N(0,1)` (generator seed {seed}+1) so that they
  get a non-zero perturbation too. Cast to bfloat16, `save_pretrained(safe_serialization=True)`.
  Tokenizer: an ~80-token BPE `LlamaTokenizer` built in the script (transformers 5 API), saved
  with `save_pretrained` (tokenizer.json + tokenizer_config.json); it loads offline with
  `AutoTokenizer.from_pretrained(path, use_fast=False)`, which is what FastChat calls.
* `target/` — for every tensor of base: `w = base.float(); w + N(0,1)*(0.01*w.std())` in float32
  (generator seed {seed}+2, tensors in `named_parameters()` order), rounded to bfloat16, saved
  like base.
* `delta/` — `fastchat.model.make_delta.make_delta("base", "target", "delta")`, unmodified
  FastChat code, except that the module-global `args` (which `make_delta` reads as
  `args.hub_repo_id` but which only exists under `__main__`) is set to
  `Namespace(hub_repo_id=None)`. transformers 5 `save_pretrained` writes safetensors directly,
  so no .bin → safetensors conversion was needed.
* `applied/` — `fastchat.model.apply_delta.apply_delta("base", "applied", "delta")`, unmodified.
* `stats.json` — per tensor: shape, how many delta values are f16 subnormals / zeros, how many
  base bf16 values are not exact in f16 (they land in the f16 subnormal range), and how many
  applied values differ from `f16(target)`.
  Totals: delta_subnormal_f16={delta_subnormal_f16}, delta_zero={delta_zero},
  base_bf16_to_f16_inexact={base_bf16_to_f16_inexact}, applied_ne_f16_target={applied_ne_f16_target}
  (over {ntensors} tensors).

The script re-derives `delta` and `applied` from the saved files with plain torch ops and asserts
bit equality, so the contract below is verified, not just read off the source.

## Files

| file | bytes | contents |
|---|---|---|
{files}

Tensor names (all four dirs, same set): `model.embed_tokens.weight`, `lm_head.weight`,
`model.norm.weight`, and per layer `model.layers.N.{{input_layernorm,post_attention_layernorm}}.weight`,
`model.layers.N.self_attn.{{q,k,v,o}}_proj.weight`, `model.layers.N.mlp.{{gate,up,down}}_proj.weight`.
No rotary `inv_freq` buffers (non-persistent in transformers 5).

## What FastChat does (fschat 0.2.36 source in the venv)

`fastchat/model/make_delta.py`:
* l.181-188: `base` and `target` loaded with `AutoModelForCausalLM.from_pretrained(path,
  torch_dtype=torch.float16, low_cpu_mem_usage=True)` — i.e. each stored bf16 value is cast to
  f16 (round to nearest even; values below 2^-14 become f16 subnormals and may lose bits, those of
  magnitude ≤ 2^-25 round to ±0).
* l.192-194: for every tensor name of `target.state_dict()` (asserting it exists in base):
  `param.data -= base.state_dict()[name]` — an in-place f16 − f16 subtraction.
* l.201-202: `target.save_pretrained(delta_path)` (f16) and the target tokenizer.

`fastchat/model/apply_delta.py` (`apply_delta`, l.125-144; the `--low-cpu-mem` variant l.70-122
only handles `pytorch_model-*.bin` shards and does `state_dict[name] += delta[name]` in the file dtype):
* l.127: tokenizer from the *delta* dir (`use_fast=False`); l.128-130: delta loaded with
  `torch_dtype=torch.float16`; l.133-135: base loaded with `torch_dtype=torch.float16`
  (bf16 → f16 cast as above).
* l.138-140: for **every** tensor in `base.state_dict()` (embeddings, lm_head, norms, all
  projections; asserting the name exists in the delta): `param.data += delta.state_dict()[name]`
  — in-place f16 + f16 add. On CPU torch computes it as f32(a) + f32(b) rounded to f32 then to
  f16; since f32 has ≥ 2·11+2 bits, that double rounding is innocuous, so the result equals the
  correctly rounded (round-to-nearest-even) f16 sum of the two f16 values. Delta tensors that the
  base lacks are ignored; base tensors the delta lacks make it fail.
* l.143-144: `base.save_pretrained(target)` — output dtype **f16** (not the base's bf16), plus the
  delta's tokenizer (the config is the base's, saved with dtype float16).

So llmfs's contract: `applied = f16_rne( f16(base) + f16(delta) )` element-wise for every tensor,
where `f16(base)` is bf16→f16 round-to-nearest-even (IEEE, with subnormals, no flush-to-zero),
the delta is already f16, and the output is stored as F16. Note `applied` is generally *not*
`f16(target)` (see `applied_ne_f16_target`): make_delta's subtraction rounds.
"""

if __name__ == "__main__":
    main()
