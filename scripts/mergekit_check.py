#!/usr/bin/env python3
"""Compare llmfs's mergekit methods with mergekit 0.1.5 itself, tensor by tensor.

Makes a tiny llama-like base (4 layers, hidden 128, untied lm_head) and three fine-tunes of it in
float16 and bfloat16, runs `mergekit-yaml` and llmfs's `examples/merge_files` on the same configs
(every method, a slerp with gradient and filter parameters, a passthrough frankenmerge, a TIES
with per-model densities, dtype float16/bfloat16/float32, out_dtype) and compares every tensor:
the share of bit-identical elements and the largest distance in ulps of the written dtype.

    /work/venvs/mergekit/bin/python scripts/mergekit_check.py [--bin PATH] [--keep DIR]
    /work/venvs/mergekit/bin/python scripts/mergekit_check.py --llmfs target/release/llmfs

With `--llmfs`, the models are entries of a fresh store and each config (its model paths replaced
by entry names) is registered with `llmfs merge NAME --config FILE` and materialized with `llmfs
export`, which gives the mount's bytes; mergekit then runs with one torch thread (sums over more
than 32768 elements depend on torch's thread count; llmfs reproduces a one-thread run). A few
merges are also loaded with transformers' from_pretrained straight from a mount and their logits
compared with mergekit's output's.

`--bin` defaults to $CARGO_TARGET_DIR (or ./target)/release/examples/merge_files (build it
with `cargo build --release --example merge_files`). Exits non-zero when an exact method has
fewer than 99.9% identical elements or any element more than 1 ulp away. DARE and DELLA draw
random masks (torch's generator in mergekit, a counter-based hash in llmfs): they are compared
bit for bit at density 1 (where no mask is drawn) and, below it, by the kept share of each
task vector and the L1 norm of the merged task vector (rescale matches L1 norms).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import yaml
from safetensors.torch import load_file, save_file

LAYERS, HIDDEN, INTER, VOCAB, HEADS, KV = 4, 128, 256, 512, 4, 2


def llama_config(dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def shapes():
    head = HIDDEN // HEADS
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (HIDDEN,)
        out[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        out[p + "self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        out[p + "self_attn.k_proj.weight"] = (KV * head, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = (KV * head, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        out[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
    return out


def make_models(root):
    """base and ft1..ft3 in float16 and bfloat16: root/{base,ft1,ft2,ft3}-{fp16,bf16}."""
    g = torch.Generator().manual_seed(22)
    base = {}
    for name, shape in shapes().items():
        if name.endswith("norm.weight"):
            base[name] = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            base[name] = 0.02 * torch.randn(shape, generator=g)
    fts = []
    for k in range(3):
        ft = {}
        for name, w in base.items():
            d = 0.004 * (k + 1) * torch.randn(w.shape, generator=g)
            # Some elements untouched (exact zeros in the delta), some large changes.
            keep = torch.rand(w.shape, generator=g) < 0.15
            d[keep] = 0
            big = torch.rand(w.shape, generator=g) < 0.01
            d[big] *= 10
            ft[name] = w + d
        fts.append(ft)
    for tag, dt, name in (("fp16", torch.float16, "float16"), ("bf16", torch.bfloat16, "bfloat16")):
        for mname, sd in [("base", base)] + [(f"ft{i + 1}", f) for i, f in enumerate(fts)]:
            d = os.path.join(root, f"{mname}-{tag}")
            os.makedirs(d, exist_ok=True)
            save_file({k: v.to(dt).contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(llama_config(name), f)


def configs(root):
    """(label, exact, config) for each check."""
    out = []

    def m(name, tag):
        return os.path.join(root, f"{name}-{tag}")

    for tag, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        B, A, C, D = m("base", tag), m("ft1", tag), m("ft2", tag), m("ft3", tag)
        three = lambda params: [{"model": x, "parameters": p} for x, p in zip((A, C, D), params)]
        out += [
            ("linear", True, {"merge_method": "linear", "models": three([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]), "dtype": dtype}),
            ("task_arithmetic", True, {"merge_method": "task_arithmetic", "base_model": B, "models": three([{"weight": 1.0}, {"weight": 0.5}, {"weight": -0.3}]), "parameters": {"lambda": 0.8}, "dtype": dtype}),
            ("ties (per-model densities)", True, {"merge_method": "ties", "base_model": B, "models": [{"model": B}] + three([{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}, {"weight": 0.5, "density": [0.2, 0.9]}]), "dtype": dtype}),
            ("ties rescale int8_mask", True, {"merge_method": "ties", "base_model": B, "models": three([{"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.4}]), "parameters": {"rescale": True, "int8_mask": True, "normalize": False}, "dtype": dtype}),
            ("breadcrumbs", True, {"merge_method": "breadcrumbs", "base_model": B, "models": three([{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}, {"weight": 0.3, "density": 0.9, "gamma": 0.02}]), "dtype": dtype}),
            ("breadcrumbs_ties", True, {"merge_method": "breadcrumbs_ties", "base_model": B, "models": three([{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}, {"weight": 0.3, "density": 0.9}]), "dtype": dtype}),
            ("dare_ties density 1", True, {"merge_method": "dare_ties", "base_model": B, "models": three([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.4}]), "dtype": dtype}),
            ("dare_linear density 1", True, {"merge_method": "dare_linear", "base_model": B, "models": three([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.4}]), "dtype": dtype}),
            ("della density 1", True, {"merge_method": "della", "base_model": B, "models": three([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.4}]), "dtype": dtype}),
            ("della_linear density 1", True, {"merge_method": "della_linear", "base_model": B, "models": three([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.4}]), "dtype": dtype}),
            ("dare_ties density 0.5", False, {"merge_method": "dare_ties", "base_model": B, "models": three([{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.5}, {"weight": 0.4, "density": 0.5}]), "dtype": dtype}),
            ("dare_linear density 0.6", False, {"merge_method": "dare_linear", "base_model": B, "models": three([{"weight": 0.5, "density": 0.6}, {"weight": 0.3, "density": 0.6}, {"weight": 0.4, "density": 0.6}]), "dtype": dtype}),
            ("della density 0.5", False, {"merge_method": "della", "base_model": B, "models": three([{"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {"weight": 0.3, "density": 0.5}, {"weight": 0.4, "density": 0.5}]), "dtype": dtype}),
            ("della_linear density 0.5", False, {"merge_method": "della_linear", "base_model": B, "models": three([{"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {"weight": 0.3, "density": 0.5}, {"weight": 0.4, "density": 0.5}]), "dtype": dtype}),
            ("slerp gradient+filter", True, {"merge_method": "slerp", "base_model": A, "slices": [{"sources": [{"model": A, "layer_range": [0, LAYERS]}, {"model": C, "layer_range": [0, LAYERS]}]}], "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}, "dtype": dtype}),
            ("nuslerp", True, {"merge_method": "nuslerp", "base_model": B, "models": [{"model": A, "parameters": {"weight": 0.6}}, {"model": C, "parameters": {"weight": 0.4}}], "dtype": dtype}),
            ("model_stock", True, {"merge_method": "model_stock", "base_model": B, "models": [{"model": B}, {"model": A}, {"model": C}, {"model": D}], "dtype": dtype}),
            ("passthrough frankenmerge", True, {"merge_method": "passthrough", "slices": [{"sources": [{"model": A, "layer_range": [0, 3]}]}, {"sources": [{"model": C, "layer_range": [1, 4]}]}], "dtype": dtype}),
        ]
    B, A, C, D = m("base", "bf16"), m("ft1", "bf16"), m("ft2", "bf16"), m("ft3", "bf16")
    out += [
        ("ties f32 -> out bf16", True, {"merge_method": "ties", "base_model": B, "models": [{"model": x, "parameters": {"weight": 0.5, "density": 0.6}} for x in (A, C, D)], "dtype": "float32", "out_dtype": "bfloat16"}),
        ("slerp f32", True, {"merge_method": "slerp", "base_model": A, "models": [{"model": A}, {"model": C}], "parameters": {"t": 0.3}, "dtype": "float32"}),
        ("model_stock f32", True, {"merge_method": "model_stock", "base_model": B, "models": [{"model": A}, {"model": C}, {"model": D}], "dtype": "float32"}),
        ("linear no dtype", True, {"merge_method": "linear", "models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": C, "parameters": {"weight": 2.0}}]}),
    ]
    return out


# Known deviations, each with the bound it is held to instead of (99.9 %, 1 ulp):
# - slerp computing in float32 writes float32: torch's CPU sin/acos run SLEEF's vectorized u10
#   routines even on its [1, 1] coefficient tensors, llmfs calls glibc's sinf/acosf; where they
#   differ in the last bit the two coefficients do, and so every element of that tensor (by a
#   few ulp, more where the two terms cancel). In bf16/f16 the rounding hides it.
# - model_stock in float16: one tensor's interpolation factor differs in its last bit (torch's
#   f16 norm/dot accumulation path is not reproduced exactly); bf16 and f32 are identical.
KNOWN = {
    ("slerp f32", "float32"): (90.0, 1 << 12, "SLEEF sin/acos vs glibc: coefficients' last bit"),
    ("model_stock", "float16"): (99.5, 32, "f16 norm/dot accumulation: one tensor's factor"),
}


def ordered(bits, width):
    sign = 1 << (width - 1)
    b = bits.to(torch.int64) & ((1 << width) - 1)
    return torch.where(b & sign != 0, -(b & (sign - 1)), b)


def compare(mk, ours):
    """(identical elements, total, max ulp, missing/extra tensor names)."""
    same = total = 0
    worst = 0
    names = sorted(set(mk) ^ set(ours))
    for k, a in mk.items():
        if k not in ours:
            continue
        b = ours[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            names.append(f"{k}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
            continue
        width = a.element_size() * 8
        ib = {16: torch.int16, 32: torch.int32}[width]
        x, y = ordered(a.contiguous().view(ib), width), ordered(b.contiguous().view(ib), width)
        both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
        d = torch.where(both_nan, 0, (x - y).abs())
        same += int((d == 0).sum())
        total += d.numel()
        worst = max(worst, int(d.max()) if d.numel() else 0)
    return same, total, worst, names


def task_stats(out, base, model_dirs):
    """L1 of out - base over all layer tensors, and the share of elements equal to base."""
    l1 = 0.0
    eq = n = 0
    for k, v in out.items():
        if ".layers." not in k:
            continue
        d = v.float() - base[k].float()
        l1 += float(d.abs().sum())
        eq += int((d == 0).sum())
        n += d.numel()
    return l1, eq / max(n, 1)


def main():
    ap = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(__file__), "..", "target"))
    ap.add_argument("--bin", default=os.path.join(target, "release", "examples", "merge_files"))
    ap.add_argument("--keep", help="work in this directory and keep it")
    ap.add_argument("--only", help="run only the checks whose label contains this")
    ap.add_argument("--chunk", default="4099", help="elements per apply() call in merge_files")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse mergekit's outputs of an earlier run")
    ap.add_argument("--llmfs", help="the llmfs binary: merge entries of a store instead of running merge_files")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="mergekit-check-")
    os.makedirs(root, exist_ok=True)
    mk_bin = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    make_models(root)
    rows = []
    failed = False
    store = os.path.join(root, "store")
    env = dict(os.environ, LLMFS_STORE=store)
    if args.llmfs:
        # One torch thread for mergekit: llmfs reproduces a one-thread run (see the doc).
        env["OMP_NUM_THREADS"] = "1"
        for d in sorted(os.listdir(root)):
            if "-fp16" in d or "-bf16" in d:
                subprocess.run([args.llmfs, "add", d, os.path.join(root, d)], env=env, check=True, capture_output=True)
    merged = []
    for i, (label, exact, cfg) in enumerate(configs(root)):
        if args.only and args.only not in label:
            continue
        dtype = cfg.get("dtype", "(inputs)") + (f"->{cfg['out_dtype']}" if "out_dtype" in cfg else "")
        if "dtype" in cfg and cfg["dtype"] != "float32":
            src = "fp16" if cfg["dtype"] == "float16" else "bf16"
        else:
            src = "bf16"
        cdir = os.path.join(root, f"cfg{i}")
        os.makedirs(cdir, exist_ok=True)
        cpath = os.path.join(cdir, "config.yml")
        with open(cpath, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        mk_out, our_out = os.path.join(cdir, "mergekit"), os.path.join(cdir, "llmfs")
        reuse = args.reuse and os.path.exists(os.path.join(mk_out, "config.json"))
        for d in (our_out,) if reuse else (mk_out, our_out):
            shutil.rmtree(d, ignore_errors=True)
        r = subprocess.CompletedProcess([], 0) if reuse else subprocess.run(
            [mk_bin, cpath, mk_out, "--no-copy-tokenizer", "--quiet", "--random-seed", "0"], capture_output=True, text=True,
            env=env,
        )
        if r.returncode != 0:
            print(f"mergekit failed on {label}:\n{r.stderr[-3000:]}", file=sys.stderr)
            failed = True
            continue
        if args.llmfs:
            # The same config with entry names for model paths.
            text = open(cpath).read().replace(root + os.sep, "")
            epath = os.path.join(cdir, "entries.yml")
            with open(epath, "w") as f:
                f.write(text)
            name = f"merge{i}"
            r = subprocess.run([args.llmfs, "merge", name, "--config", epath, "--seed", "0"], capture_output=True, text=True, env=env)
            if r.returncode == 0:
                r = subprocess.run([args.llmfs, "export", name, our_out], capture_output=True, text=True, env=env)
            merged.append((name, mk_out))
        else:
            r = subprocess.run(
                [args.bin, cpath, our_out, "--seed", "0", "--chunk", args.chunk, "--torch-threads", str(torch.get_num_threads())],
                capture_output=True,
                text=True,
            )
        if r.returncode != 0:
            print(f"merge_files failed on {label}:\n{r.stderr[-3000:]}", file=sys.stderr)
            failed = True
            continue
        mk = {}
        for fn in sorted(os.listdir(mk_out)):
            if fn.endswith(".safetensors"):
                mk.update(load_file(os.path.join(mk_out, fn)))
        ours = {}
        for fn in sorted(os.listdir(our_out)):
            if fn.endswith(".safetensors"):
                ours.update(load_file(os.path.join(our_out, fn)))
        same, total, worst, names = compare(mk, ours)
        with open(os.path.join(mk_out, "config.json")) as f:
            mk_cfg = json.load(f)
        with open(os.path.join(our_out, "config.json")) as f:
            our_cfg = json.load(f)
        cfg_note = ""
        for key in ("num_hidden_layers",):
            if mk_cfg.get(key) != our_cfg.get(key):
                cfg_note += f" {key} {mk_cfg.get(key)} vs {our_cfg.get(key)}"
        pct = 100.0 * same / max(total, 1)
        note = ""
        ok = True
        if names:
            note += f" tensor sets differ: {names[:4]}"
            ok = False
        if cfg_note:
            note += " config:" + cfg_note
            ok = False
        known = KNOWN.get((label, dtype))
        if exact and known:
            min_pct, max_ulp, why = known
            if pct < min_pct or worst > max_ulp:
                ok = False
            elif pct < 99.9 or worst > 1:
                note += f" known: {why}"
        elif exact:
            if pct < 99.9 or worst > 1:
                ok = False
        else:
            base = load_file(os.path.join(cfg["base_model"], "model.safetensors"))
            l1_mk, eq_mk = task_stats(mk, base, None)
            l1_us, eq_us = task_stats(ours, base, None)
            rel = abs(l1_us - l1_mk) / max(l1_mk, 1e-12)
            note += f" random masks: L1(merged-base) {l1_us:.4g} vs {l1_mk:.4g} ({100 * rel:.2f}%), unchanged {100 * eq_us:.2f}% vs {100 * eq_mk:.2f}%"
            if rel > 0.05 or abs(eq_us - eq_mk) > 0.02:
                ok = False
        failed |= not ok
        rows.append((label, dtype, f"{pct:.4f}" if exact else f"({pct:.2f})", str(worst) if exact else "-", "ok" if ok else "FAIL", note))
    w = [max(len(r[i]) for r in rows + [("method", "dtype", "identical %", "max ulp", "", "")]) for i in range(5)]
    print(f"{'method':<{w[0]}}  {'dtype':<{w[1]}}  {'identical %':>{w[2]}}  {'max ulp':>{w[3]}}  result")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]}{r[5]}")
    if args.llmfs and merged:
        failed |= not mounted_logits(args.llmfs, env, root, merged[:3])
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


def mounted_logits(llmfs, env, root, merged):
    """transformers' from_pretrained of a mounted merge gives the logits of mergekit's output."""
    from transformers import AutoModelForCausalLM

    mnt = os.path.join(root, "mnt")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run([llmfs, "mount", mnt], env=env, check=True, capture_output=True)
    ok = True
    try:
        ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11]])
        for name, mk_out in merged:
            with torch.no_grad():
                ours = AutoModelForCausalLM.from_pretrained(os.path.join(mnt, name), dtype=torch.float32)(ids).logits
                theirs = AutoModelForCausalLM.from_pretrained(mk_out, dtype=torch.float32)(ids).logits
            same = torch.equal(ours, theirs)
            diff = (ours - theirs).abs().max().item()
            print(f"from_pretrained(MOUNT/{name}): logits {'identical' if same else f'max |diff| {diff:.3g}'}")
            ok &= diff <= 1e-3
    finally:
        subprocess.run([llmfs, "umount", mnt], env=env, capture_output=True)
    return ok


if __name__ == "__main__":
    main()
