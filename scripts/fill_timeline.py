#!/usr/bin/env python3
"""The timeline of one first load (issue 23): a fresh mount with an empty disk cache, one
`load_file` of each KIND, and when each of its files was decoded, from the daemon's log (memory
tier: "memory cache: decoded"; disk tier: "disk cache: decoded", which for a file decoded into
memory first is its write to disk behind the reader), against the loader's start and end.

usage: LLMFS=... EXAMPLES=... scripts/fill_timeline.py WORK SIZE_MIB KINDS [MOUNT_ARGS...]
"""
import datetime, glob, os, re, shutil, sys, time
D = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, D)
import bench_load as b

LINE = re.compile(r'^(\S+Z)\s.*?(memory|disk) cache: (?:decoded|stored from memory) (\S+) .*?secs="([0-9.]+)"')


def stamp(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def main():
    work, size, kinds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    extra = sys.argv[4:]
    model, ft, store = b.setup(work, size, kinds)
    b.warm(glob.glob(f"{model}/*.safetensors") + glob.glob(f"{ft}/*.safetensors") + glob.glob(f"{store}/models/*/*"))
    w = b.Worker()
    w.load("load_file", ft)
    plain = min(w.load("load_file", ft)["secs"] for _ in range(2))
    print(f"plain fine-tune load_file: {plain:.3f} s")
    mnt, cache = f"{work}/mnt", f"{work}/cache"
    log = f"{store}/llmfs.log"
    for e in kinds:
        shutil.rmtree(cache, ignore_errors=True)
        m = b.Mount(store, mnt, cache, extra)
        start_at = os.path.getsize(log)
        t0 = time.time()
        r = w.load("load_file", f"{mnt}/{e}")
        t1 = time.time()
        m.close()
        text = open(log, errors="replace").read()[start_at:]
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        print(f"\n{e}: load_file {r['secs']:.3f} s ({r['bytes'] / r['secs'] / 1e9:.2f} GB/s, {plain / r['secs']:.3f}x of plain)")
        print(f"  {'file':<48} {'tier':<6} {'start s':>8} {'end s':>8} {'GB/s':>6}")
        for line in text.splitlines():
            mt = LINE.search(line)
            if not mt:
                continue
            end = stamp(mt.group(1)) - t0
            secs = float(mt.group(4))
            nbytes = re.search(r"bytes=(\d+)", line)
            rate = int(nbytes.group(1)) / secs / 1e9 if nbytes and secs > 0 else 0
            print(f"  {mt.group(3):<48} {mt.group(2):<6} {end - secs:8.3f} {end:8.3f} {rate:6.2f}")
        print(f"  loader done at {t1 - t0:.3f} s")
    w.close()


if __name__ == "__main__":
    main()
