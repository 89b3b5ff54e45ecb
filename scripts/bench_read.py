#!/usr/bin/env python3
"""Read-path benchmark (issue: the read path). Prints a markdown table.

Generates a ~1 GiB bf16 model (or reuses one), registers it, an f16 cast and q8/q4 quantized
variants in a fresh store (timing `quantize`), mounts with --cache-size 256MiB, and measures
sequential reads (1 MiB, into one buffer) of the first shard, the base's and the stored variants'
files warm in the page cache (so the disk is timed nowhere):
  (a) read directly from disk, warm in the page cache
  (b) through the mount, served by the kernel from the base file (FUSE passthrough)
  (b') through the mount with passthrough off (LLMFS_PASSTHROUGH=0): every byte via the daemon
  (c) the f16 cast, first read (decoded on the fly); (d) re-read (kernel page cache)
  (e), (f) the q8 and q4 variants, first read (dequantized on the fly)
and the daemon's peak RSS (VmHWM).

Each mount-and-read sequence runs REPS times (a fresh mount each time, so every first read decodes)
and the table gives the median, with the daemon's and the reader's CPU seconds for the bytes read:
the ratios of CPU cost do not depend on what else the machine is doing, the throughputs do.

usage: scripts/bench_read.py [WORKDIR] [SIZE_MIB] [REPS]
  build first: cargo build --release --bins --examples (without --features gpu: a GPU build's
  `--backend auto` would calibrate on whatever adapter it finds); LLMFS=path picks another binary.
"""
import json, os, resource, statistics, subprocess, sys, time, shutil

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
llmfs = os.environ.get("LLMFS", os.path.join(root, "target/release/llmfs"))
gen = os.environ.get("GEN", os.path.join(root, "target/release/examples/gen_model"))
work = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llmfs-bench")
size_mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1100
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
model, store, mnt = f"{work}/model", f"{work}/store", f"{work}/mnt"

def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout

def read_all(path, bs=1 << 20):
    """Sequential read into one reused buffer (as dd does), so Python's allocations don't count.
    Returns (bytes, wall seconds, this process's CPU seconds)."""
    buf = bytearray(bs)
    view = memoryview(buf)
    n = 0
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            got = os.readv(fd, [view])
            if not got:
                break
            n += got
    finally:
        os.close(fd)
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return n, wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

def proc_cpu(pid):
    """CPU seconds (user + system) process `pid` has used so far."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

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
    """Mount (with extra environment), run the reads, unmount. Returns {label: (bytes, wall s,
    daemon CPU s, reader CPU s)} and the daemon's peak RSS in KiB."""
    drop_caches()
    # Every path starts from the page cache: the base shard and the variants' stored files
    # (else a quantized variant's first read would also time the disk, which the base read,
    # warm, does not).
    read_all(f"{model}/{shard}")
    for d in os.listdir(f"{store}/models"):
        for f in os.listdir(f"{store}/models/{d}"):
            read_all(f"{store}/models/{d}/{f}")
    subprocess.run([llmfs, "--store", store, "mount", mnt, "--cache-size", "256MiB"], check=True,
                   capture_output=True, env={**os.environ, **env})
    out = {}
    try:
        pid = sh("pgrep", "-f", f"{llmfs} --store {store} mount").split()[0]
        for label, path in reads:
            c0 = proc_cpu(pid)
            n, wall, reader_cpu = read_all(path)
            out[label] = (n, wall, proc_cpu(pid) - c0, reader_cpu)
        hwm = int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")][0].split()[1])
    finally:
        subprocess.run([llmfs, "umount", mnt], capture_output=True)
    return out, hwm

A, B, B2, C, D, E, F = ("(a) base shard, page cache", "(b) base shard through the mount (FUSE passthrough)",
                        "(b') base shard through the daemon (passthrough off)", "(c) f16 cast, first read",
                        "(d) f16 cast, re-read", "(e) q8 variant, first read", "(f) q4 variant, first read")
runs, hwms = [], []
for _ in range(reps):
    n, wall, cpu = read_all(f"{model}/{shard}")
    run = {A: (n, wall, 0.0, cpu)}
    r, hwm1 = mounted({}, [(B, f"{mnt}/bench/{shard}")])
    run.update(r)
    # (b') and the variants in one mount: the ratios compare reads of the same daemon.
    r, hwm2 = mounted({"LLMFS_PASSTHROUGH": "0"}, [
        (B2, f"{mnt}/bench/{shard}"),
        (C, f"{mnt}/bench-f16/{shard}"),
        (D, f"{mnt}/bench-f16/{shard}"),
        (E, f"{mnt}/bench-q8/{shard}"),
        (F, f"{mnt}/bench-q4/{shard}"),
    ])
    run.update(r)
    runs.append(run)
    hwms += [hwm1, hwm2]

def med(label, i):
    return statistics.median(run[label][i] for run in runs)

gbs = {k: statistics.median(run[k][0] / run[k][1] / 1e9 for run in runs) for k in runs[0]}
g = {k.split(")")[0] + ")": v for k, v in gbs.items()}
bd = g["(b')"]
print(f"\nmodel {model_bytes / 2**30:.2f} GiB bf16, shard {runs[0][A][0] / 2**20:.0f} MiB, {os.cpu_count()} cores, "
      f"--cache-size 256MiB, median of {reps} runs\n")
print("| measure | GB/s | daemon CPU s | reader CPU s |\n|---|---|---|---|")
for k in runs[0]:
    print(f"| {k} | {gbs[k]:.2f} | {med(k, 2):.2f} | {med(k, 3):.2f} |")
cpu = {k.split(")")[0] + ")": med(k, 2) + med(k, 3) for k in runs[0]}
cpu_bd = cpu["(b')"]
print(f"| (c)/(b') cast first read vs base through the daemon (target >= 0.9) | {g['(c)'] / bd:.2f} | CPU cost {cpu['(c)'] / cpu_bd:.2f}x | |")
print(f"| (c)/(b) cast first read vs base with passthrough | {g['(c)'] / g['(b)']:.2f} | | |")
print(f"| (d)/(a) re-read vs page cache (target >= 0.8) | {g['(d)'] / g['(a)']:.2f} | | |")
print(f"| (e)/(b') q8 first read vs base through the daemon (target >= 0.9) | {g['(e)'] / bd:.2f} | CPU cost {cpu['(e)'] / cpu_bd:.2f}x | |")
print(f"| (f)/(b') q4 first read vs base through the daemon | {g['(f)'] / bd:.2f} | CPU cost {cpu['(f)'] / cpu_bd:.2f}x | |")
print(f"| daemon peak RSS, --cache-size 256MiB (target <= 320 MiB) | {max(hwms) / 1024:.0f} MiB | | |")
for name, secs in quant_secs.items():
    print(f"| quantize {name}: throughput / disk ratio | {model_bytes / secs / 1e9:.2f} GB/s / {ratios[name]:.2f}x | | |")
