#!/usr/bin/env python3
"""Load test (hardening issue): 16 concurrent readers over three variants, random ranges, for a
fixed time; every read compared with `llmfs export` of the same file. Reports mismatches, hung
readers (a read over 30 s), the daemon's peak RSS against its budget (the cache + 64 MiB), and
throughput. Exits non-zero on a mismatch, an error, a hung reader, or a peak RSS over budget (or
one that could not be measured).

usage: scripts/load_test.py [SECONDS] [READERS]   (build first: cargo build --release --bins --examples)
"""
import os, random, shutil, subprocess, sys, threading, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
llmfs = os.path.join(root, "target/release/llmfs")
gen = os.path.join(root, "target/release/examples/gen_model")
secs = float(sys.argv[1]) if len(sys.argv) > 1 else 60
readers = int(sys.argv[2]) if len(sys.argv) > 2 else 16
work = "/tmp/llmfs-load"
store, mnt, model = f"{work}/store", f"{work}/mnt", f"{work}/model"
cache_mib = 128
# The daemon's memory target (README, Numbers): its chunk cache plus 64 MiB for everything else.
rss_budget_mib = cache_mib + 64

def sh(*a):
    return subprocess.run(a, check=True, capture_output=True, text=True).stdout

subprocess.run([llmfs, "umount", mnt], capture_output=True)
shutil.rmtree(work, ignore_errors=True)
os.makedirs(mnt)
sh(gen, model, "300")
sh(llmfs, "--store", store, "add", "base", model)
sh(llmfs, "--store", store, "cast", "f16", "--base", "base", "--dtype", "f16")
sh(llmfs, "--store", store, "quantize", "q4", "--base", "base", "--bits", "4", "--group-size", "128")
sh(llmfs, "--store", store, "quantize", "q8", "--base", "base")
expected = {}
for v in ["f16", "q4", "q8"]:
    sh(llmfs, "--store", store, "export", v, f"{work}/exp-{v}")
    for f in os.listdir(f"{work}/exp-{v}"):
        if f.endswith(".safetensors"):
            expected[f"{v}/{f}"] = open(f"{work}/exp-{v}/{f}", "rb").read()
sh(llmfs, "--store", store, "mount", mnt, "--cache-size", f"{cache_mib}MiB")
pid = sh("pgrep", "-f", f"llmfs --store {store} mount").split()[0]
stats = {"reads": 0, "bytes": 0, "mismatches": 0, "errors": 0, "slowest": 0.0}
lock = threading.Lock()
hwm = [0]
stop = time.time() + secs

def reader(seed):
    rng = random.Random(seed)
    names = sorted(expected)
    while time.time() < stop:
        name = rng.choice(names)
        want = expected[name]
        off = rng.randrange(len(want))
        n = rng.choice([4096, 65536, 1 << 20, 3 << 20])
        t = time.time()
        try:
            fd = os.open(f"{mnt}/{name}", os.O_RDONLY)
            got = os.pread(fd, n, off)
            os.close(fd)
            ok = got == want[off:off + n]
        except OSError:
            ok = None
        dt = time.time() - t
        with lock:
            stats["reads"] += 1
            stats["bytes"] += n if ok else 0
            stats["slowest"] = max(stats["slowest"], dt)
            if ok is None:
                stats["errors"] += 1
            elif not ok:
                stats["mismatches"] += 1

def watch():
    while time.time() < stop:
        try:
            kb = int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")][0].split()[1])
            hwm[0] = max(hwm[0], kb)
        except OSError:
            pass
        time.sleep(0.5)

ts = [threading.Thread(target=reader, args=(i,)) for i in range(readers)] + [threading.Thread(target=watch)]
t0 = time.time()
[t.start() for t in ts]
[t.join(timeout=secs + 60) for t in ts]
hung = sum(t.is_alive() for t in ts)
elapsed = time.time() - t0
subprocess.run([llmfs, "umount", mnt])
print(f"| readers | seconds | reads | GB/s | mismatches | errors | hung | slowest read | daemon peak RSS (cache {cache_mib} MiB) |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| {readers} | {elapsed:.0f} | {stats['reads']} | {stats['bytes'] / elapsed / 1e9:.2f} | {stats['mismatches']} | {stats['errors']} | {hung} | {stats['slowest']:.2f} s | {hwm[0] / 1024:.0f} MiB |")
shutil.rmtree(work, ignore_errors=True)
peak_mib = hwm[0] / 1024
failures = []
if stats["mismatches"] or stats["errors"] or hung:
    failures.append(f"{stats['mismatches']} mismatches, {stats['errors']} errors, {hung} hung readers")
if hwm[0] == 0:
    failures.append("the daemon's peak RSS could not be measured")
elif peak_mib > rss_budget_mib:
    failures.append(f"daemon peak RSS {peak_mib:.0f} MiB is over the budget of {rss_budget_mib} MiB")
for f in failures:
    print(f"FAIL: {f}", file=sys.stderr)
if not failures:
    print(f"ok: peak RSS {peak_mib:.0f} MiB within the budget of {rss_budget_mib} MiB")
sys.exit(1 if failures else 0)
