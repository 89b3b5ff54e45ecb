#!/usr/bin/env python3
"""Where a decoded file's "again" load loses against the plain fine-tune (issue 23): for each
KIND, one first load fills the disk cache, then ROUNDS alternating rounds of
  plain    the plain fine-tune (page cache warm)
  direct   the decoded cache files themselves, opened outside the mount (symlinks to them)
  mount    the same files through a fresh mount (passthrough), after `umount` + `mount`
with each loader, and the medians. direct ≈ plain and mount < direct: the mount costs it;
direct < plain: the cache files themselves read slower (how they were written: folio sizes,
dirty pages).

usage: LLMFS=... EXAMPLES=... scripts/cache_direct.py WORK SIZE_MIB KINDS [ROUNDS] [LOADERS]
"""
import glob, json, os, shutil, statistics, sys
D = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, D)
import bench_load as b


def main():
    work, size, kinds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    loaders = (sys.argv[5] if len(sys.argv) > 5 else "load_file,safe_open").split(",")
    model, ft, store = b.setup(work, size, kinds)
    b.warm(glob.glob(f"{model}/*.safetensors") + glob.glob(f"{ft}/*.safetensors") + glob.glob(f"{store}/models/*/*"))
    w = b.Worker()
    mnt, cache, direct = f"{work}/mnt", f"{work}/cache", f"{work}/direct"
    print(f"| kind | loader | plain s | direct s | mount s | direct/plain | mount/plain |")
    print(f"|---|---|---|---|---|---|---|")
    for kind in kinds:
        shutil.rmtree(cache, ignore_errors=True)
        m = b.Mount(store, mnt, cache)
        w.load("load_file", f"{mnt}/{kind}")
        m.close()
        shutil.rmtree(direct, ignore_errors=True)
        os.makedirs(direct)
        for meta in glob.glob(f"{cache}/*.meta"):
            label = json.load(open(meta))["label"]
            if label.endswith(".safetensors"):
                os.symlink(meta[:-len(".meta")], f"{direct}/{os.path.basename(label)}")
        for loader in loaders:
            t = {"plain": [], "direct": [], "mount": []}
            for _ in range(rounds):
                t["plain"].append(w.load(loader, ft)["secs"])
                t["direct"].append(w.load(loader, direct)["secs"])
                m = b.Mount(store, mnt, cache)
                t["mount"].append(w.load(loader, f"{mnt}/{kind}")["secs"])
                m.close()
            med = {k: statistics.median(v) for k, v in t.items()}
            print(f"| {kind} | {loader} | {med['plain']:.3f} | {med['direct']:.3f} | {med['mount']:.3f} | "
                  f"{med['plain'] / med['direct']:.2f}x | {med['plain'] / med['mount']:.2f}x |", flush=True)
            print("  rounds: " + "; ".join(f"{k} " + " ".join(f"{x:.3f}" for x in v) for k, v in t.items()),
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
