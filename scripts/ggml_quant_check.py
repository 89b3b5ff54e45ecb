#!/usr/bin/env python3
"""llmfs's ggml quantizers (src/codec/ggml) against ggml's own C code, byte for byte.

Loads a libggml-base built by scripts/build_libggml.sh through ctypes, quantizes many rows with
`ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL)` and with llmfs (the
`ggml_quant` example), and compares the bytes; then decodes ggml's blocks with ggml's
`type_traits.to_float` and with llmfs's `dequantize_rows` and compares the f32 bits. Q8_0, Q4_0
(and the other types gguf-py can quantize) are also compared with gguf-py's numpy quantizer.
Prints a table and exits non-zero on any difference.

    LIB=$(scripts/build_libggml.sh /tmp/ggml)
    cargo build --release --example ggml_quant
    python3 scripts/ggml_quant_check.py --lib "$LIB" --bin target/release/examples/ggml_quant

Needs numpy; gguf (pip, 0.19) for the gguf-py column (skipped, with a line, without it).
"""

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import numpy as np

# ggml_type numbers (ggml.h) of the types llmfs writes.
TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
         "q4_K": 12, "q5_K": 13, "q6_K": 14, "bf16": 30}
K_TYPES = {"q4_K", "q5_K", "q6_K"}
# Row widths: llama-sized rows, and widths that are not a multiple of 256 (llama-quant.cpp then
# falls back from Q4_K/Q6_K to Q5_0/Q8_0): only the 32-block types take those.
WIDTHS_K = [256, 512, 4096, 8192]
WIDTHS_32 = [32, 96, 480, 1376, 2880]
ELEMS_PER_CASE = 1 << 16


def bf16_round(x):
    """Round f32 to bf16 (nearest even) and back: what a bf16 checkpoint's weights look like."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def distributions(rng, n):
    """name -> n f32 values."""
    d = {}
    d["normal"] = rng.standard_normal(n) * 0.02
    d["heavy_t2"] = rng.standard_t(2, n) * 0.01
    d["uniform"] = rng.uniform(-1, 1, n)
    d["zero"] = np.zeros(n)
    d["neg_zero"] = -np.zeros(n)
    d["constant"] = np.full(n, 0.37)
    d["neg_constant"] = np.full(n, -1.5)
    d["tiny_1e-30"] = rng.standard_normal(n) * 1e-30
    d["small_1e-6"] = rng.standard_normal(n) * 1e-6
    d["huge_3e4"] = rng.standard_normal(n) * 3e4
    d["huge_1e30"] = rng.standard_normal(n) * 1e30
    out = rng.standard_normal(n) * 0.02
    idx = np.arange(0, n, 32) + rng.integers(0, 32, n // 32)
    out[idx] = rng.choice([-1, 1], len(idx)) * rng.uniform(1, 20, len(idx))
    d["outlier_per_block"] = out
    sparse = rng.standard_normal(n) * 0.05
    sparse[rng.random(n) < 0.9] = 0
    d["sparse_90"] = sparse
    pos = np.abs(rng.standard_normal(n)) * 0.1 + 0.5
    d["all_positive"] = pos
    d["all_negative"] = -pos
    # A model-like tensor: bf16-rounded, per-row scales varying, a few channels large.
    ml = rng.standard_normal(n) * 0.02 * np.repeat(rng.uniform(0.5, 2, n // 256 + 1), 256)[:n]
    ml[rng.integers(0, n, n // 500)] *= 30
    d["model_bf16"] = bf16_round(ml)
    d["ints_small"] = rng.integers(-8, 8, n).astype(np.float64)
    # Not what a checkpoint holds, but ggml gives such blocks bytes too (x86-64's casts).
    nf = rng.standard_normal(n) * 0.02
    for v in (np.inf, -np.inf, np.nan):
        nf[rng.integers(0, n, max(1, n // 400))] = v
    d["nonfinite"] = nf
    return {k: v.astype(np.float32) for k, v in d.items()}


class Ggml:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                 ctypes.c_void_p]
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

        class Traits(ctypes.Structure):
            _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                        ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                        ("is_quantized", ctypes.c_bool), ("to_float", to_float),
                        ("from_float_ref", ctypes.c_void_p)]

        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    def quantize(self, ty, x, n_per_row):
        t = TYPES[ty]
        self.lib.ggml_quantize_init(t)
        rows = x.size // n_per_row
        out = np.zeros(rows * self.lib.ggml_row_size(t, n_per_row), np.uint8)
        x = np.ascontiguousarray(x, np.float32)
        n = self.lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, n_per_row, None)
        assert n == out.size, (ty, n, out.size)
        return out

    def dequantize(self, ty, q, n):
        traits = self.lib.ggml_get_type_traits(TYPES[ty]).contents
        out = np.zeros(n, np.float32)
        if ty == "f32":
            return q.view(np.float32).copy()
        traits.to_float(q.ctypes.data, out.ctypes.data, n)
        return out


def llmfs(binary, op, ty, n_per_row, data, tmp):
    src = os.path.join(tmp, "in.bin")
    dst = os.path.join(tmp, "out.bin")
    data.tofile(src)
    subprocess.run([binary, op, ty, str(n_per_row), src, dst], check=True)
    return np.fromfile(dst, np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=os.environ.get("LLMFS_GGML_LIB"), help="libggml-base.so")
    ap.add_argument("--bin", required=True, help="the ggml_quant example binary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    if not args.lib:
        sys.exit("--lib or LLMFS_GGML_LIB: the libggml-base.so of scripts/build_libggml.sh")
    ggml = Ggml(args.lib)
    try:
        import gguf
        from gguf import quants as gq
        gguf_version = getattr(getattr(gguf, "metadata", None), "__version__", None)
        try:
            from importlib.metadata import version
            gguf_version = version("gguf")
        except Exception:
            pass
    except ImportError:
        gq = None
        print("gguf-py is not installed: its column is skipped (pip install gguf==0.19.0)")

    rng = np.random.default_rng(args.seed)
    failures = []
    notes = {}  # (type, distribution) -> rows where gguf-py differs from ggml itself
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for ty in args.types.split(","):
            widths = WIDTHS_K if ty in K_TYPES else WIDTHS_K + WIDTHS_32
            stats = {"rows": 0, "same": 0, "blocks": 0, "same_blocks": 0, "deq_same": 0,
                     "deq_n": 0, "gguf_rows": 0, "gguf_same": 0}
            for width in widths:
                rows_per = max(1, ELEMS_PER_CASE // width)
                dists = distributions(rng, rows_per * width)
                names = list(dists)
                data = np.concatenate([dists[k] for k in names])
                ref = ggml.quantize(ty, data, width)
                ours = llmfs(args.bin, "quantize", ty, width, data, tmp)
                row_bytes = ggml.lib.ggml_row_size(TYPES[ty], width)
                blk = ggml.lib.ggml_get_type_traits(TYPES[ty]).contents
                bsize = blk.type_size
                if ours.size != ref.size:
                    failures.append(f"{ty} width {width}: {ours.size} bytes, ggml {ref.size}")
                    continue
                r_rows = ref.reshape(-1, row_bytes)
                o_rows = ours.reshape(-1, row_bytes)
                same_row = (r_rows == o_rows).all(axis=1)
                same_blk = (ref.reshape(-1, bsize) == ours.reshape(-1, bsize)).all(axis=1)
                stats["rows"] += len(same_row)
                stats["same"] += int(same_row.sum())
                stats["blocks"] += len(same_blk)
                stats["same_blocks"] += int(same_blk.sum())
                for i, name in enumerate(names):
                    bad = ~same_row[i * rows_per:(i + 1) * rows_per]
                    if bad.any():
                        failures.append(f"{ty} width {width} {name}: {int(bad.sum())}/{rows_per} rows differ")
                # Decoding: ggml's blocks through ggml's to_float and llmfs's dequantize_rows.
                deq_ref = ggml.dequantize(ty, ref, data.size)
                deq_ours = llmfs(args.bin, "dequantize", ty, width, ref, tmp).view(np.float32)
                same = deq_ref.view(np.uint32) == deq_ours.view(np.uint32)
                # NaN decodes (an f16 scale that overflowed to inf times a zero code) compare as NaN.
                same |= np.isnan(deq_ref) & np.isnan(deq_ours)
                stats["deq_n"] += same.size
                stats["deq_same"] += int(same.sum())
                if not same.all():
                    failures.append(f"{ty} width {width}: dequantize differs at {int((~same).sum())} elements")
                if gq is not None and ty in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16", "f16"):
                    qt = getattr(gq.GGMLQuantizationType, ty.upper())
                    try:
                        with np.errstate(all="ignore"):
                            g = gq.quantize(data.reshape(-1, width), qt).reshape(-1).view(np.uint8)
                    except (NotImplementedError, gq.QuantError):
                        g = None
                    if g is not None:
                        g_rows = g.reshape(-1, row_bytes)
                        same_g = (g_rows == o_rows).all(axis=1)
                        g_is_ggml = (g_rows == r_rows).all(axis=1)
                        stats["gguf_rows"] += len(same_g)
                        stats["gguf_same"] += int(same_g.sum())
                        for i, name in enumerate(names):
                            sl = slice(i * rows_per, (i + 1) * rows_per)
                            bad = ~same_g[sl]
                            if not bad.any():
                                continue
                            # ggml is the reference: where gguf-py differs from ggml itself it is
                            # a note; where it agrees with ggml and not with llmfs, a failure.
                            if (bad & g_is_ggml[sl]).any():
                                failures.append(f"{ty} width {width} {name}: rows differ from gguf-py, which agrees with ggml")
                            else:
                                notes[ty, name] = notes.get((ty, name), 0) + int(bad.sum())
            rows_out.append((ty, stats))

    print(f"ggml: {args.lib}; gguf-py: {gguf_version if gq else 'not installed'}; "
          f"{len(distributions(np.random.default_rng(0), 32))} distributions per width")
    print("| type | rows | identical bytes vs ggml (rows %) | blocks % | dequantize bit-identical % | gguf-py rows identical % |")
    print("|---|---|---|---|---|---|")
    for ty, s in rows_out:
        pct = lambda a, b: f"{100.0 * a / b:.4g}" if b else "-"
        print(f"| {ty} | {s['rows']} | {pct(s['same'], s['rows'])} | {pct(s['same_blocks'], s['blocks'])} "
              f"| {pct(s['deq_same'], s['deq_n'])} | {pct(s['gguf_same'], s['gguf_rows'])} |")
    for ty in dict.fromkeys(t for t, _ in notes):
        what = ", ".join(f"{name} ({n} rows)" for (t, name), n in notes.items() if t == ty)
        print(f"note: gguf-py's {ty} differs from ggml itself (and so from llmfs) on: {what}")
    if failures:
        print(f"{len(failures)} differences:")
        for f in failures[:50]:
            print("  " + f)
        sys.exit(1)
    print("all identical")


if __name__ == "__main__":
    main()
