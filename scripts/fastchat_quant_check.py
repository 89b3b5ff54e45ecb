#!/usr/bin/env python3
"""Generate the FastChat quantization reference cases in tests/data/fastchat_quant/.

llmfs's group-wise quantizer (src/codec/quant/) must dequantize to values bit-identical to
FastChat's `decompress(compress(t, config), config)` run by torch on the CPU. This script runs
the real FastChat code on small seeded tensors and saves, per case, the input and FastChat's
output as a safetensors file, plus manifest.json describing every case. tests/fastchat_quant.rs
replays them with llmfs's codec and compares bit patterns, without Python or torch.

It installs nothing. It needs (tested with these):
    python3 -m venv /tmp/fcq
    /tmp/fcq/bin/pip install torch            # the CPU part is all that runs; the default wheel
                                              # pulls CUDA libraries, `import torch` needs them
    /tmp/fcq/bin/pip install fschat==0.2.36 --no-deps
    /tmp/fcq/bin/pip install transformers accelerate psutil requests safetensors numpy
    (or, with torch and transformers installed system-wide: pip install fschat==0.2.36 --no-deps
    accelerate psutil)
        # fastchat.model.compression imports transformers/accelerate/huggingface_hub at the top,
        # and fastchat.model's __init__ imports model_adapter (psutil, requests).
Run from the repository root:
    /tmp/fcq/bin/python scripts/fastchat_quant_check.py            # regenerate the cases
    /tmp/fcq/bin/python scripts/fastchat_quant_check.py --probe    # print torch's NaN casts
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

from fastchat.model.compression import CompressionConfig, compress, decompress

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "fastchat_quant")

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def probe():
    """What torch does where C++ leaves it undefined: NaN cast to int8/uint8, and the
    degenerate groups end to end."""
    print("torch", torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())
    for name, dt in DTYPES.items():
        for sign in (1.0, -1.0):
            for n in (1, 7, 8, 16, 33, 1000):
                x = torch.full((n,), sign * float("nan"), dtype=dt)
                print(name, "nan sign", sign, "n", n,
                      "int8", sorted(set(x.to(torch.int8).tolist())),
                      "uint8", sorted(set(x.to(torch.uint8).tolist())))
        for sym in (True, False):
            cfg = CompressionConfig(num_bits=8, group_size=4, group_dim=1, symmetric=sym, enabled=True)
            for row in ([0.0] * 4, [-0.0] * 4, [0.5] * 4, [-0.5] * 4, [1e-5, -2e-5, 0.0, 3e-6]):
                t = torch.tensor([row], dtype=dt)
                packed = compress(t, cfg)
                out = decompress(packed, cfg)
                bits = out.view(torch.int16 if dt != torch.float32 else torch.int32).tolist()
                print(name, "sym" if sym else "asym", row, "->", packed[0].tolist(),
                      "scale", packed[-2 if sym else -2].tolist(), "out", out.tolist(), "bits", bits)


def make_input(seed, rows, cols, dtype, special):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float32)
    tiny = {"f16": 1e-5, "bf16": 1e-39, "f32": 1e-39}[special["dtype"]]
    large = {"f16": 1e4, "bf16": 1e30, "f32": 1e30}[special["dtype"]]
    if special.get("rows", True) and rows >= 8:
        x[0] = 0.0                       # all-zero row: 0 * inf in both modes
        x[1] = 0.375                     # constant row: mx == mn (asymmetric) where unpadded
        x[2] *= large                    # large magnitudes
        x[3] *= 1e-3                     # small: f16's B / amax overflows to inf
        x[4] *= tiny                     # tiny: 1 / amax overflows to inf (subnormals)
        x[5] = -0.0                      # negative zeros
        x[6, : cols // 2] = 0.0          # a zero first half: all-zero groups next to live ones
        x[7] = torch.round(x[7] * 4) / 4  # ties for round-half-even
    return x.to(dtype)


def cases():
    out = []
    seed = 0
    for dname in DTYPES:
        for bits in (8, 4):
            for sym in (True, False):
                # The main case: 600 is not a multiple of the group size, so the last group of
                # every row is padded.
                gs = 256 if bits == 8 else 128
                out.append(dict(dtype=dname, bits=bits, symmetric=sym, rows=16, cols=600, group_size=gs))
                # Odd group size: 4-bit nibbles straddle groups and rows.
                out.append(dict(dtype=dname, bits=bits, symmetric=sym, rows=9, cols=40, group_size=7))
        # Group size 1, a group larger than the row, and a single group in the whole tensor
        # (scale has one element: torch's scalar fast paths).
        for sym in (True, False):
            out.append(dict(dtype=dname, bits=8, symmetric=sym, rows=8, cols=5, group_size=1))
            out.append(dict(dtype=dname, bits=4, symmetric=sym, rows=8, cols=50, group_size=64))
            out.append(dict(dtype=dname, bits=8, symmetric=sym, rows=1, cols=30, group_size=32, special_rows=False))
            out.append(dict(dtype=dname, bits=4, symmetric=sym, rows=1, cols=32, group_size=32, special_rows=False))
    # Rows shorter than FastChat's default group (128 columns at group size 256: one padded
    # group per row) and rows that are not a multiple of it (300 = 256 + a padded 44). Appended
    # after the cases above so their seeds, and their files, stay as they were.
    for dname in DTYPES:
        for bits in (8, 4):
            for sym in (True, False):
                for cols in (128, 300):
                    out.append(dict(dtype=dname, bits=bits, symmetric=sym, rows=8, cols=cols, group_size=256))
    for c in out:
        seed += 1
        c["seed"] = seed
        c["name"] = "{dtype}_{b}b_{s}_{rows}x{cols}_g{group_size}".format(
            b=c["bits"], s="sym" if c["symmetric"] else "asym", **c)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help="print torch's behaviour on degenerate groups")
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args()
    if args.probe:
        probe()
        return
    os.makedirs(args.out, exist_ok=True)
    manifest = {
        "generator": "scripts/fastchat_quant_check.py",
        "fastchat": "fschat 0.2.36 fastchat.model.compression.compress/decompress",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": [],
    }
    torch.set_num_threads(1)
    for c in cases():
        dtype = DTYPES[c["dtype"]]
        x = make_input(c["seed"], c["rows"], c["cols"], dtype,
                       {"dtype": c["dtype"], "rows": c.get("special_rows", True)})
        cfg = CompressionConfig(num_bits=c["bits"], group_size=c["group_size"], group_dim=1,
                                symmetric=c["symmetric"], enabled=True)
        y = decompress(compress(x, cfg), cfg)
        assert y.shape == x.shape and y.dtype == x.dtype
        nans = int(torch.isnan(y).sum())
        if nans:
            sys.exit(f"case {c['name']}: FastChat produced {nans} NaN; pick other magnitudes")
        fname = c["name"] + ".safetensors"
        save_file({"input": x.contiguous(), "expected": y.contiguous()}, os.path.join(args.out, fname))
        entry = {k: c[k] for k in ("name", "dtype", "rows", "cols", "bits", "group_size", "symmetric", "seed")}
        entry["file"] = fname
        manifest["cases"].append(entry)
        print(f"{c['name']}: max |y - x| = {float((y.float() - x.float()).abs().max()):.3g}")
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"{len(manifest['cases'])} cases written to {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
