#!/usr/bin/env python3
"""The timeline of one first load (issue 23): a fresh mount with an empty disk cache, one
`load_file` of each KIND (every tensor copied), and when each of its files was decoded, from the
daemon's log (memory tier: "memory cache: decoded"; disk tier: "disk cache: decoded", which for a
file decoded into memory first is its write to disk behind the reader), against the loader's own
moments, taken inside the loading process: when each shard's open returned (a decoded file's
open waits for its fill) and when its tensors were all copied. Seconds from the loader's start.

usage: LLMFS=... EXAMPLES=... scripts/fill_timeline.py WORK SIZE_MIB KINDS [MOUNT_ARGS...]
       (TIMELINE_ROUNDS=N: N first loads of each kind, default 1)
"""
import datetime, glob, json, os, re, shutil, subprocess, sys, time
D = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, D)
import bench_load as b

LINE = re.compile(r'^(\S+Z)\s.*?(memory|disk) cache: (?:decoded|stored from memory) (\S+) .*?secs="([0-9.]+)"')


def stamp(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def worker():
    """Answers {"dir": D} with the wall-clock moments of one load_file of D's shards."""
    import gc
    import torch
    import safetensors.torch
    touch = b.toucher(torch)

    def copy_all(f):
        # In a function, so no tensor outlives it: a loop variable left holding the last one
        # kept its shard mapped, the mount busy, and the next round's umount waiting for the
        # daemon (120 s) before it gave up.
        return sum(touch(v) for v in safetensors.torch.load_file(f).values())

    for line in sys.stdin:
        d = json.loads(line)["dir"]
        gc.collect()
        marks, n = {"start": time.time()}, 0
        for i, f in enumerate(sorted(glob.glob(os.path.join(d, "*.safetensors"))), 1):
            with open(f, "rb"):
                marks[f"shard {i} open"] = time.time()
            n += copy_all(f)
            marks[f"shard {i} copied"] = time.time()
        print(json.dumps({"marks": marks, "bytes": n}), flush=True)


def main():
    work, size, kinds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    extra = sys.argv[4:]
    rounds = int(os.environ.get("TIMELINE_ROUNDS", "1"))
    model, ft, store = b.setup(work, size, kinds)
    b.warm(glob.glob(f"{model}/*.safetensors") + glob.glob(f"{ft}/*.safetensors") + glob.glob(f"{store}/models/*/*"))
    w = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_worker"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def load(d):
        w.stdin.write(json.dumps({"dir": d}) + "\n")
        w.stdin.flush()
        r = json.loads(w.stdout.readline())
        m = r["marks"]
        return {k: v - m["start"] for k, v in m.items()}, m["start"], r["bytes"]

    load(ft)
    plain = min(max(load(ft)[0].values()) for _ in range(2))
    print(f"plain fine-tune load_file: {plain:.3f} s")
    mnt, cache = f"{work}/mnt", f"{work}/cache"
    log = f"{store}/llmfs.log"
    for e in kinds:
        for _ in range(rounds):
            shutil.rmtree(cache, ignore_errors=True)
            m = b.Mount(store, mnt, cache, extra)
            start_at = os.path.getsize(log)
            marks, t0, nbytes = load(f"{mnt}/{e}")
            m.close()
            secs = max(marks.values())
            text = open(log, errors="replace").read()[start_at:]
            text = re.sub(r"\x1b\[[0-9;]*m", "", text)
            print(f"\n{e}: load_file {secs:.3f} s ({nbytes / secs / 1e9:.2f} GB/s, {plain / secs:.3f}x of plain)")
            print(f"  {'file':<48} {'tier':<6} {'start s':>8} {'end s':>8} {'GB/s':>6}")
            for line in text.splitlines():
                mt = LINE.search(line)
                if not mt:
                    continue
                end = stamp(mt.group(1)) - t0
                fill = float(mt.group(4))
                fb = re.search(r"bytes=(\d+)", line)
                rate = int(fb.group(1)) / fill / 1e9 if fb and fill > 0 else 0
                print(f"  {mt.group(3):<48} {mt.group(2):<6} {end - fill:8.3f} {end:8.3f} {rate:6.2f}")
            print("  loader: " + ", ".join(f"{k} {v:.3f}" for k, v in marks.items() if k != "start"))
    w.stdin.close()
    w.wait()


if __name__ == "__main__":
    if sys.argv[1:] == ["_worker"]:
        worker()
    else:
        main()
