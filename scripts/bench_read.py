#!/usr/bin/env python3
"""Read-path benchmark (issue: the read path). Prints a markdown table.

Generates a ~1 GiB bf16 model (or reuses one), registers it, an f16 cast and q8/q4 quantized
variants in a fresh store (timing `quantize`), mounts with --cache-size 256MiB, and measures
sequential reads (1 MiB, into one buffer) of the first shard:
  (a) read directly from disk, warm in the page cache
  (b) through the mount, served by the kernel from the base file (FUSE passthrough)
  (b') through the mount with passthrough off (LLMFS_PASSTHROUGH=0): every byte via the daemon
  (c) the f16 cast, first read (decoded on the fly); (d) re-read (kernel page cache)
  (e), (f) the q8 and q4 variants, first read (dequantized on the fly)
and the daemon's peak RSS (VmHWM).

usage: scripts/bench_read.py [WORKDIR] [SIZE_MIB]   (build first: cargo build --release --examples)
"""
import json, os, subprocess, sys, time, shutil

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
model_bytes = sum(os.path.getsize(f"{model}/{f}") for f in os.listdir(model) if f.endswith(".safetensors"))
quant_secs = {}
for name, args in [("bench-q8", []), ("bench-q4", ["--bits", "4", "--group-size", "128"])]:
    t = time.perf_counter()
    sh(llmfs, "--store", store, "quantize", name, "--base", "bench", *args)
    quant_secs[name] = time.perf_counter() - t
ratios = {}
for name in quant_secs:
    info = json.loads(sh(llmfs, "--store", store, "info", name, "--json"))
    ratios[name] = info["recipe"]["disk_ratio"]
shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[0]
read_all(f"{model}/{shard}")                     # warm the page cache with the base shard

def mounted(env, reads):
    """Mount (with extra environment), run the reads, unmount; returns rows and the daemon's peak RSS."""
    drop_caches()
    read_all(f"{model}/{shard}")
    subprocess.run([llmfs, "--store", store, "mount", mnt, "--cache-size", "256MiB"], check=True,
                   capture_output=True, env={**os.environ, **env})
    try:
        pid = sh("pgrep", "-f", f"llmfs --store {store} mount").split()[0]
        rows = [(label, *read_all(path)) for label, path in reads]
        hwm = int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")][0].split()[1])
    finally:
        subprocess.run([llmfs, "umount", mnt], capture_output=True)
    return rows, hwm

rows = [("(a) base shard, page cache", *read_all(f"{model}/{shard}"))]
r1, hwm1 = mounted({}, [
    ("(b) base shard through the mount (FUSE passthrough)", f"{mnt}/bench/{shard}"),
    ("(c) f16 cast, first read", f"{mnt}/bench-f16/{shard}"),
    ("(d) f16 cast, re-read", f"{mnt}/bench-f16/{shard}"),
    ("(e) q8 variant, first read", f"{mnt}/bench-q8/{shard}"),
    ("(f) q4 variant, first read", f"{mnt}/bench-q4/{shard}"),
])
r2, hwm2 = mounted({"LLMFS_PASSTHROUGH": "0"}, [
    ("(b') base shard through the daemon (passthrough off)", f"{mnt}/bench/{shard}"),
])
rows += r1 + r2
g = {k.split(")")[0] + ")": n / t / 1e9 for k, n, t in rows}
bd = g["(b')"]
print(f"\nmodel {model_bytes / 2**30:.2f} GiB bf16, shard {rows[0][1] / 2**20:.0f} MiB, {os.cpu_count()} cores, --cache-size 256MiB\n")
print("| measure | value |\n|---|---|")
for k, n, t in rows:
    print(f"| {k} | {n / t / 1e9:.2f} GB/s |")
print(f"| (c)/(b') cast first read vs base through the daemon (target >= 0.9) | {g['(c)'] / bd:.2f} |")
print(f"| (c)/(b) cast first read vs base with passthrough | {g['(c)'] / g['(b)']:.2f} |")
print(f"| (d)/(a) re-read vs page cache (target >= 0.8) | {g['(d)'] / g['(a)']:.2f} |")
print(f"| (e)/(b') q8 first read vs base through the daemon (target >= 0.9) | {g['(e)'] / bd:.2f} |")
print(f"| (f)/(b') q4 first read vs base through the daemon | {g['(f)'] / bd:.2f} |")
print(f"| daemon peak RSS, --cache-size 256MiB (target <= 320 MiB) | {max(hwm1, hwm2) / 1024:.0f} MiB |")
for name, secs in quant_secs.items():
    print(f"| quantize {name}: throughput / disk ratio | {model_bytes / secs / 1e9:.2f} GB/s / {ratios[name]:.2f}x |")
