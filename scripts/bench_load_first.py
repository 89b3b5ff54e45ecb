#!/usr/bin/env python3
"""First loads (load_file, empty disk cache, fresh mount) of KINDS, alternately as they are and
right after another process wrote 3 GiB of fresh memory and exited (mem_touch): whether handing
out new memory is what bounds the disk cache's fill on a VM (issue 13; it was not, on the lent
H200 host). Prints each load's time and the daemon's fill times.

usage: LLMFS=... EXAMPLES=... MEM_TOUCH=path/to/mem_touch scripts/bench_load_first.py WORK SIZE_MIB KINDS
  (mem_touch: cc -O2 -pthread -o mem_touch scripts/mem_touch.c)
"""
import os, sys, glob, shutil, subprocess, time
D = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, D)
MEM_TOUCH = os.environ.get("MEM_TOUCH", os.path.join(D, "mem_touch"))
import bench_load as b
work, size = sys.argv[1], int(sys.argv[2])
kinds = sys.argv[3].split(",")
model, ft, store = b.setup(work, size, kinds)
b.warm(glob.glob(f"{model}/*.safetensors") + glob.glob(f"{ft}/*.safetensors") + glob.glob(f"{store}/models/*/*"))
w = b.Worker()
for _ in range(2):
    w.load("load_file", ft)
plain = min(w.load("load_file", ft)["secs"] for _ in range(3))
print(f"plain fine-tune load_file: {plain:.3f} s", flush=True)
mnt, cache = f"{work}/mnt", f"{work}/cache"
for e in kinds:
    for pre in (0, 1, 0, 1):
        shutil.rmtree(cache, ignore_errors=True)
        time.sleep(3)  # freed pages go back to the host meanwhile, if they do
        if pre:
            subprocess.run([MEM_TOUCH, "3072", "16", "1", "0"], capture_output=True)
        m = b.Mount(store, mnt, cache)
        r = w.load("load_file", f"{mnt}/{e}")
        m.close()
        fills = subprocess.run(f"sed 's/\\x1b\\[[0-9;]*m//g' {store}/llmfs.log | grep 'disk cache: decoded' | tail -2 | grep -o 'secs=\"[^\"]*\"'",
                               shell=True, capture_output=True, text=True).stdout.split()
        print(f"{e} first load {'after 3 GiB of memory touched' if pre else 'plain'}: {r.get('secs', r)} s "
              f"({r['bytes'] / r['secs'] / 1e9:.2f} GB/s, {plain / r['secs']:.3f}x); fills {fills}", flush=True)
w.close()
