#!/usr/bin/env python3
"""Generate the PEFT LoRA reference data in tests/data/lora/.

Reference for llmfs's `delta import --format lora`. Uses the tiny BF16 LLaMA in
tests/data/fastchat_delta/base/ (made by scripts/fastchat_delta_check.py; run that first) and the
real PEFT code:

    adapter/            LoRA r=8,  lora_alpha=16, target q_proj,v_proj,down_proj, random A and B
    adapter_rslora/     same targets, r=4, lora_alpha=16, use_rslora=True, random A and B
    merged/             PeftModel.from_pretrained(base, adapter).merge_and_unload(), BF16 safetensors
    merged_rslora/      likewise for adapter_rslora
    merged_f64/         the merged *target* tensors only (the LoRA-touched ones, base names),
                        computed by hand in float64: W + scale * B @ A, scale = alpha / r
    merged_rslora_f64/  likewise, scale = alpha / sqrt(r)
    stats.json          how PEFT's BF16 result compares with roundings of the f64 result
    README.md           versions, key naming, dtypes, PEFT's merge arithmetic

Adapters are saved with `PeftModel.save_pretrained` (adapter_config.json +
adapter_model.safetensors). The merges are done on a freshly loaded base with the adapter loaded
back from disk, i.e. the normal user flow. Seeded and deterministic.

Needs the venv of scripts/fastchat_quant_check.py plus `/tmp/fcq/bin/pip install peft`
(tested: torch 2.15.0, transformers 5.24.0, peft 0.21.2). Offline. Run from the repo root:
    /tmp/fcq/bin/python scripts/lora_check.py
"""

import json
import math
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BASE_DIR = os.path.join(ROOT, "tests", "data", "fastchat_delta", "base")
OUT_DIR = os.path.join(ROOT, "tests", "data", "lora")
SEED = 20240612
TARGETS = ["q_proj", "v_proj", "down_proj"]
PREFIX = "base_model.model."

CASES = [
    # (name, r, alpha, use_rslora, seed offset)
    ("", 8, 16, False, 0),
    ("_rslora", 4, 16, True, 1),
]


def load_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.bfloat16)


def load_st(path):
    with safe_open(path, framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def fresh_dir(d):
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)


def make_adapter(out_dir, r, alpha, rslora, seed):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                     use_rslora=rslora, task_type="CAUSAL_LM")
    model = get_peft_model(load_base(), cfg)  # autocast_adapter_dtype=True: lora weights F32
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif ".lora_B." in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))  # PEFT inits B to 0; randomize
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    # PEFT records the absolute base path; store it repo-relative so the data does not depend on
    # where the checkout lives (the field is informational: merging passes the base model object)
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as fh:
        cfg_json = json.load(fh)
    cfg_json["base_model_name_or_path"] = "tests/data/fastchat_delta/base"
    cfg_json["target_modules"] = sorted(cfg_json["target_modules"])  # PEFT dumps a set: hash order
    with open(cfg_path, "w") as fh:
        json.dump(cfg_json, fh, indent=2, sort_keys=True)
        fh.write("\n")
    # drop the auto-generated model card (large boilerplate, not needed)
    readme = os.path.join(out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)


def merge_with_peft(adapter_dir, out_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(), adapter_dir)
    merged = model.merge_and_unload()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)


def merge_f64(adapter_dir, out_dir, r, alpha, rslora):
    base = load_st(os.path.join(BASE_DIR, "model.safetensors"))
    ad = load_st(os.path.join(adapter_dir, "adapter_model.safetensors"))
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    out = {}
    for k in sorted(ad):
        if not k.endswith(".lora_A.weight"):
            continue
        stem = k[: -len(".lora_A.weight")]
        base_name = stem[len(PREFIX):] + ".weight"
        A = ad[k].double()                         # [r, in]
        B = ad[stem + ".lora_B.weight"].double()   # [out, r]
        W = base[base_name].double()               # [out, in]
        out[base_name] = W + scale * (B @ A)
    fresh_dir(out_dir)
    save_file(out, os.path.join(out_dir, "model.safetensors"),
              # one metadata key: safetensors writes a multi-key metadata map in random order
              metadata={"lora": json.dumps({"r": r, "lora_alpha": alpha, "use_rslora": rslora, "scale": scale},
                                           sort_keys=True)})
    return out, scale


def compare(merged_dir, f64, adapter_dir, scale):
    """PEFT's BF16 result vs (a) torch re-run of PEFT's ops, (b) roundings of the f64 merge."""
    peft = load_st(os.path.join(merged_dir, "model.safetensors"))
    base = load_st(os.path.join(BASE_DIR, "model.safetensors"))
    ad = load_st(os.path.join(adapter_dir, "adapter_model.safetensors"))
    st = {"untouched_identical_to_base": True, "tensors": {}}
    for k in peft:
        if k not in f64:
            st["untouched_identical_to_base"] &= torch.equal(peft[k].view(torch.int16), base[k].view(torch.int16))
            assert peft[k].dtype == torch.bfloat16
    for k in sorted(f64):
        stem = PREFIX + k[: -len(".weight")]
        A, B = ad[stem + ".lora_A.weight"], ad[stem + ".lora_B.weight"]
        rerun = base[k].clone()
        rerun += (B @ A) * scale  # exactly PEFT's get_delta_weight + merge for F32 adapters
        p = peft[k].view(torch.int16)
        via_f32 = (base[k].float() + (f64[k] - base[k].double()).float()).to(torch.bfloat16)
        st["tensors"][k] = {
            "n": p.numel(),
            "peft_eq_torch_rerun": bool(torch.equal(p, rerun.view(torch.int16))),
            # bf16_rne(f64 merged) directly (f64 -> f32 -> bf16 could double-round; done in one step here)
            "ne_bf16_of_f64_sum": int((p != f64_to_bf16(f64[k]).view(torch.int16)).sum()),
            # PEFT's shape of arithmetic, delta from f64: bf16_rne(f32(W) +f32 f32(delta_f64))
            "ne_bf16_of_f32W_plus_f32delta64": int((p != via_f32.view(torch.int16)).sum()),
            "max_abs_peft_minus_f64": float((peft[k].double() - f64[k]).abs().max()),
            "max_abs_delta": float((f64[k] - base[k].double()).abs().max()),
        }
    return st


def f64_to_bf16(x):
    """Round-to-nearest-even f64 -> bf16 in one step (x.to(bfloat16) may go through f32 and
    double-round). Valid for finite values in the bf16 normal range (true for all data here)."""
    bits = x.contiguous().view(torch.int64)
    lsb = (bits >> 45) & 1
    rounded = ((bits + ((1 << 44) - 1) + lsb) >> 45) << 45
    return rounded.view(torch.float64).float().to(torch.bfloat16)  # both casts exact


def main():
    import peft
    import transformers

    if not os.path.exists(os.path.join(BASE_DIR, "model.safetensors")):
        sys.exit("run scripts/fastchat_delta_check.py first (needs tests/data/fastchat_delta/base)")
    os.makedirs(OUT_DIR, exist_ok=True)
    stats = {}
    for suffix, r, alpha, rslora, off in CASES:
        adir = os.path.join(OUT_DIR, "adapter" + suffix)
        mdir = os.path.join(OUT_DIR, "merged" + suffix)
        fdir = os.path.join(OUT_DIR, "merged" + suffix + "_f64")
        make_adapter(adir, r, alpha, rslora, SEED + off)
        merge_with_peft(adir, mdir)
        f64, scale = merge_f64(adir, fdir, r, alpha, rslora)
        stats["adapter" + suffix] = {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "scale": scale,
                                     **compare(mdir, f64, adir, scale)}
    with open(os.path.join(OUT_DIR, "stats.json"), "w") as fh:
        json.dump(stats, fh, indent=1, sort_keys=True)

    def files(d):
        rows = []
        for f in sorted(os.listdir(os.path.join(OUT_DIR, d))):
            p = os.path.join(OUT_DIR, d, f)
            info = ""
            if f.endswith(".safetensors"):
                with safe_open(p, framework="pt") as h:
                    ks = list(h.keys())
                    info = f"{len(ks)} tensors, dtype " + ", ".join(sorted({str(h.get_slice(k).get_dtype()) for k in ks}))
            rows.append(f"| `{d}/{f}` | {os.path.getsize(p)} | {info} |")
        return rows

    rows = []
    for d in ("adapter", "adapter_rslora", "merged", "merged_rslora", "merged_f64", "merged_rslora_f64"):
        rows += files(d)
    with safe_open(os.path.join(OUT_DIR, "adapter", "adapter_model.safetensors"), framework="pt") as h:
        keys = "\n".join(f"    {k}  {list(h.get_slice(k).get_shape())}  {h.get_slice(k).get_dtype()}" for k in sorted(h.keys()))
    summ = []
    for name, s in stats.items():
        t = s["tensors"].values()
        summ.append(f"* `{name}` (scale {s['scale']}): PEFT == torch re-run on all tensors: "
                    f"{all(x['peft_eq_torch_rerun'] for x in t)}; untouched tensors identical to base: "
                    f"{s['untouched_identical_to_base']}; BF16 values differing from bf16_rne(f64 merge): "
                    f"{sum(x['ne_bf16_of_f64_sum'] for x in t)} of {sum(x['n'] for x in t)}; differing from "
                    f"bf16_rne(f32(W) + f32(delta_f64)): {sum(x['ne_bf16_of_f32W_plus_f32delta64'] for x in t)}; "
                    f"max |PEFT − f64| = {max(x['max_abs_peft_minus_f64'] for x in t):.3g} "
                    f"(max |delta| = {max(x['max_abs_delta'] for x in t):.3g})")
    with open(os.path.join(OUT_DIR, "README.md"), "w") as fh:
        fh.write(README.format(python=sys.version.split()[0], torch=torch.__version__,
                               transformers=transformers.__version__, peft=peft.__version__, seed=SEED,
                               files="\n".join(rows), keys=keys, summary="\n".join(summ)))
    print("\n".join(summ))


README = """# PEFT LoRA reference data

Generated by `scripts/lora_check.py` (`/tmp/fcq/bin/python scripts/lora_check.py` from the
repository root, after `scripts/fastchat_delta_check.py`). Seed {seed}.
Versions: python {python}, torch {torch}, transformers {transformers}, peft {peft}; CPU only.

Base model: `tests/data/fastchat_delta/base/` (tiny LLaMA, BF16, 2 layers, hidden 64,
intermediate 128; see that README). Not copied here.

## Directories

* `adapter/` — `get_peft_model(base_bf16, LoraConfig(r=8, lora_alpha=16,
  target_modules=["q_proj","v_proj","down_proj"], lora_dropout=0, bias="none",
  task_type="CAUSAL_LM"))`; then every `lora_A` set to `0.05*N(0,1)` and every `lora_B` to
  `0.02*N(0,1)` (one generator, seed {seed}, parameters in sorted-name order), and
  `model.save_pretrained(...)` (adapter_config.json + adapter_model.safetensors; PEFT's generated
  README.md model card deleted; `base_model_name_or_path` in adapter_config.json rewritten from
  the absolute path PEFT records to the repo-relative `tests/data/fastchat_delta/base`, and
  `target_modules`, which PEFT writes in set (hash) order, sorted).
* `adapter_rslora/` — same with `r=4, lora_alpha=16, use_rslora=True`, seed {seed}+1.
* `merged/`, `merged_rslora/` — fresh BF16 base, `PeftModel.from_pretrained(base, adapter_dir)`,
  `.merge_and_unload()`, `save_pretrained(safe_serialization=True)`. Full model (all 21 tensors,
  BF16); non-target tensors are bit-identical to the base.
* `merged_f64/`, `merged_rslora_f64/` — **only the 6 LoRA-targeted tensors** (q_proj, v_proj,
  down_proj of both layers), under the base's names, as F64:
  `W_f64 + scale * (B_f64 @ A_f64)` with `W` the BF16 base value, `A`, `B` the F32 adapter
  values, `scale = 16/8 = 2.0` resp. `16/sqrt(4) = 8.0` (also in the safetensors metadata key `lora`,
  a JSON string).
  The untouched tensors are left out to stay small (they equal the base exactly).
* `stats.json` — per target tensor, how PEFT's BF16 output compares with: a torch re-run of
  PEFT's ops (`W_bf16 += (B @ A) * scale`), `bf16_rne(f64 merge)`, and
  `bf16_rne(f32(W) + f32(f64 delta))`.

{summary}

## Files

| file | bytes | contents |
|---|---|---|
{files}

## Key naming

`adapter_model.safetensors` keys (adapter name "default" is stripped on save):

{keys}

Mapping to base tensor names: strip the `base_model.model.` prefix and replace
`.lora_A.weight` / `.lora_B.weight` with `.weight`, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` →
`model.layers.0.self_attn.q_proj.weight`. Shapes: `lora_A` is `[r, in_features]`, `lora_B` is
`[out_features, r]`, base `W` is `[out_features, in_features]` (nn.Linear layout), so
`delta = B @ A` has W's shape. `adapter_config.json` gives `r`, `lora_alpha`, `use_rslora`,
`target_modules`, `fan_in_fan_out` (false here: LLaMA uses nn.Linear; it is only true for GPT-2
style `Conv1D` weights stored `[in, out]`, where PEFT transposes `B @ A` before adding — see
below), `bias` ("none": no bias terms in the adapter), `use_dora` (false), and
`modules_to_save` (null: no full tensors in the adapter), `rank_pattern` / `alpha_pattern`
(empty here; when non-empty they override r / lora_alpha per module-name pattern, so the scale
is per module), `lora_bias` (false).

## PEFT's merge arithmetic (peft {peft})

* Adapter dtype: `get_peft_model` and `PeftModel.from_pretrained` default to
  `autocast_adapter_dtype=True`, which upcasts fp16/bf16 LoRA parameters to **float32**
  (`peft/tuners/tuners_utils.py` `cast_adapter_dtype`, l.2705-2745). So with a BF16 base the
  LoRA weights are F32, and they are saved as F32.
* Scale: `peft/tuners/lora/layer.py` l.278-281 (`update_layer`): `scaling = lora_alpha /
  math.sqrt(r)` if `use_rslora` else `lora_alpha / r` (Python float).
* `merge_and_unload` (`tuners_utils.py` l.742, default `safe_merge=False`) →
  `_unload_and_optionally_merge` (l.679-740; `target.merge(...)` at l.713) →
  `Linear.merge(safe_merge=False)` (`lora/layer.py` l.952-1019), vanilla-LoRA branch l.1006-1008:
  `delta_weight = self.get_delta_weight(adapter); base_layer.weight.data += delta_weight`.
* `get_delta_weight` (`lora/layer.py` l.1044-1072): `cast_to_fp32` only when the LoRA weights
  are fp16/bf16 on CPU (not the case here, they are F32);
  `output = transpose(B @ A, fan_in_fan_out) * scaling` — matmul of F32 `B [out,r]` by
  F32 `A [r,in]` in F32 (CPU BLAS), then multiplied by the scalar in F32; `transpose` is a no-op
  for `fan_in_fan_out=False` (`peft/utils/other.py` l.1311-1317).
* The add: `W_bf16 += delta_f32` in place. torch promotes to F32: each element is
  `bf16_rne(f32(W) + delta)` — F32 add (one rounding to F32), then round-to-nearest-even to
  BF16. The merged weight stays BF16 (the base dtype).
* `safe_merge=True` (l.974-980) instead does `orig_weight += delta_weight.to(orig_dtype)`, i.e.
  rounds the delta to BF16 *before* adding — a different result; merge_and_unload's default is
  `safe_merge=False`.

Because F32 BLAS summation order is implementation-defined, an independent implementation can
reproduce PEFT's BF16 output only up to rare 1-ulp differences (counted above); compare against
`merged_f64/` with a tolerance, or against `merged/` allowing those few ulp flips.
"""

if __name__ == "__main__":
    main()
