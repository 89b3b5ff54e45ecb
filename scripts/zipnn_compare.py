#!/usr/bin/env python3
"""Compare llmfs's lossless delta with ZipNN's delta compression on the same bf16 pairs.

Why: ZipNN (Hershcovitch et al. 2024, `pip install zipnn`) is the published lossless
compressor for model weights and their XOR deltas (byte grouping + Huffman/zstd). llmfs's
lossless delta should be clearly smaller (target: >= 1.2x smaller than ZipNN).

Both compress the same pairs: `cargo run --release --example delta_ratio -- --dump DIR` writes
DIR/base.bin and DIR/target_k{K}.bin (raw little-endian bf16, base = demo::random_tensor,
target = bf16(base + N(0, k*std))) and DIR/llmfs.json (llmfs's stored sizes per target and
zstd level). This script XORs each target with the base through ZipNN's own delta API
(`delta_compressed_type="byte"`, which XORs and then compresses as `bytearray_dtype`), checks
that ZipNN decompresses back to the target, and prints both ratios (raw / stored).

    python3 -m venv /tmp/zvenv && /tmp/zvenv/bin/pip install zipnn numpy
    cargo run --release --example delta_ratio -- --dump /tmp/dpair
    /tmp/zvenv/bin/python scripts/zipnn_compare.py /tmp/dpair
"""

import json
import sys
import time
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    d = Path(sys.argv[1])
    try:
        import zipnn
    except ImportError as e:
        print(f"zipnn is not installed ({e}); pip install zipnn")
        return 1
    version = getattr(zipnn, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("zipnn")
    info = json.loads((d / "llmfs.json").read_text())
    base = (d / "base.bin").read_bytes()
    targets = sorted({r["target"] for r in info["results"]})
    print(f"ZipNN {version}; {info['n']} bf16 elements per tensor (seed {info['seed']})")
    print(f"{'target':<8} {'ZipNN (xor)':>12} {'ZipNN lvl':>9} | {'llmfs lvl':>9} {'llmfs':>8} | {'llmfs/ZipNN':>11}")
    worst = None
    for name in targets:
        target = (d / f"target_{name}.bin").read_bytes()
        assert len(target) == len(base)
        best_zipnn = None
        for zlevel in (3, 9):
            z = zipnn.ZipNN(
                method="AUTO",
                input_format="byte",
                bytearray_dtype="bfloat16",
                delta_compressed_type="byte",
                zstd_level=zlevel,
            )
            t0 = time.time()
            comp = z.compress(target, delta_second_data=base)
            dt = time.time() - t0
            back = zipnn.ZipNN(
                method="AUTO", input_format="byte", bytearray_dtype="bfloat16", delta_compressed_type="byte"
            ).decompress(comp, delta_second_data=base)
            assert bytes(back) == target, "ZipNN did not give back the target"
            ratio = len(target) / len(comp)
            if best_zipnn is None or ratio > best_zipnn[0]:
                best_zipnn = (ratio, zlevel, dt)
        for r in sorted((r for r in info["results"] if r["target"] == name), key=lambda r: r["level"]):
            rel = r["ratio"] / best_zipnn[0]
            worst = rel if worst is None else min(worst, rel)
            print(
                f"{name:<8} {best_zipnn[0]:>12.3f} {best_zipnn[1]:>9} | {r['level']:>9} {r['ratio']:>8.3f} | {rel:>10.3f}x"
            )
    print(f"llmfs is at least {worst:.3f}x smaller than ZipNN's best level on these pairs (target >= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
