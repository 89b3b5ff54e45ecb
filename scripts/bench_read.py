#!/usr/bin/env python3
"""Read-path benchmark (issue: the read path). Prints a markdown table.

Generates a ~1 GiB bf16 model (or reuses one), registers it and an f16 cast in a fresh store,
mounts with --cache-size 256MiB, and measures in one run:
  (a) a base shard read directly from disk, warm in the page cache
  (b) the same shard read through the mount (first read through FUSE)
  (c) the cast variant's shard, first read (decoded on the fly)
  (d) the cast variant's shard, re-read (kernel page cache, keep-cache)
and the daemon's peak RSS (VmHWM).

usage: scripts/bench_read.py [WORKDIR] [SIZE_MIB]   (build first: cargo build --release --examples)
"""
import os, subprocess, sys, time, shutil

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
llmfs = os.path.join(root, "target/release/llmfs")
gen = os.path.join(root, "target/release/examples/gen_model")
work = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llmfs-bench")
size_mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1100
model, store, mnt = f"{work}/model", f"{work}/store", f"{work}/mnt"

def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout

def read_all(path, bs=1 << 20):
    """Sequential read into one reused buffer (as dd does), so Python's allocations don't count."""
    buf = bytearray(bs)
    view = memoryview(buf)
    n = 0
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            got = os.readv(fd, [view])
            if not got:
                break
            n += got
    finally:
        os.close(fd)
    return n, time.perf_counter() - t

def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass

os.makedirs(work, exist_ok=True)
if not os.path.exists(f"{model}/config.json"):
    print(sh(gen, model, str(size_mib)), end="", file=sys.stderr)
subprocess.run([llmfs, "umount", mnt], capture_output=True)
shutil.rmtree(store, ignore_errors=True)
os.makedirs(mnt, exist_ok=True)
sh(llmfs, "--store", store, "add", "bench", model)
sh(llmfs, "--store", store, "cast", "bench-f16", "--base", "bench", "--dtype", "f16")
drop_caches()
sh(llmfs, "--store", store, "mount", mnt, "--cache-size", "256MiB")
try:
    pid = sh("pgrep", "-f", f"llmfs --store {store} mount").split()[0]
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[0]
    read_all(f"{model}/{shard}")                     # warm the page cache with the base shard
    rows = []
    n, t = read_all(f"{model}/{shard}"); rows.append(("(a) base shard, page cache", n, t))
    n, t = read_all(f"{mnt}/bench/{shard}"); rows.append(("(b) base shard through the mount", n, t))
    n, t = read_all(f"{mnt}/bench-f16/{shard}"); rows.append(("(c) f16 cast, first read", n, t))
    n, t = read_all(f"{mnt}/bench-f16/{shard}"); rows.append(("(d) f16 cast, re-read", n, t))
    hwm = [l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")][0].split()[1]
finally:
    subprocess.run([llmfs, "umount", mnt])
gbps = {k: n / t / 1e9 for k, n, t in rows}
print(f"\nmodel {size_mib} MiB, shard {rows[0][1] / 2**20:.0f} MiB, {os.cpu_count()} cores, --cache-size 256MiB\n")
print("| read | GB/s |\n|---|---|")
for k, n, t in rows:
    print(f"| {k} | {n / t / 1e9:.2f} |")
a, b, c, d = gbps.values()
print(f"| (c)/(b) (target >= 0.9) | {c / b:.2f} |")
print(f"| (d)/(a) (target >= 0.8) | {d / a:.2f} |")
print(f"| daemon peak RSS (target <= 320 MiB) | {int(hwm) / 1024:.0f} MiB |")
