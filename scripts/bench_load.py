#!/usr/bin/env python3
"""Load benchmark with real loaders (issue 13). Prints markdown tables and writes WORK/results.json.

Generates a bf16 LLaMA-shaped model (examples/gen_model, SIZE_MIB) and a fine-tune of it
(examples/gen_finetune), a FastChat-style delta (target - base in f16) and a LoRA adapter (rank 16
on every linear layer) of it, then registers in a fresh store: the base, an f16 cast, q8 and q4
quantized copies, the fine-tune as lossless, q8 and bitdelta deltas, the FastChat delta and the
LoRA adapter. Each is loaded with
  load_file   safetensors.torch.load_file per shard
  safe_open   safe_open(framework="pt") + get_tensor per tensor (mmap)
  hf          transformers AutoModelForCausalLM.from_pretrained(dtype="auto")
and every tensor's bytes are copied into one reused buffer (as a copy to a GPU would touch them).
Rows: the plain fine-tune on local disk (page cache warm), the base through the mount (FUSE
passthrough), and every variant: "first" on a fresh mount with an empty disk cache, "again"
after unmounting and mounting again (the disk cache warm: what a later process or node restart
sees). The store's own files are warm in the page cache throughout (no path times the disk).
Ratios are to the plain fine-tune with the same loader.

Extra rows for the lossless delta: after a remount with --disk-cache-verify full (the content
hash checked on first open), with LLMFS_PASSTHROUGH=0 (the daemon serves the cache file by pread), and with no disk
cache at all (--disk-cache 0: decoded on the FUSE read path, as before the disk cache).

usage: scripts/bench_load.py [WORKDIR] [SIZE_MIB] [REPS] [LOADERS]
  LOADERS: comma-separated subset of load_file,safe_open,hf (default all); BENCH_EXTRA=0 leaves
  out the extra rows
  build first: cargo build --release --bins --examples; LLMFS=path picks another binary.
  Run under `taskset -c 0,1` for the 2-core table (the daemon inherits the affinity).
"""
import gc, glob, json, os, shutil, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLMFS = os.environ.get("LLMFS", os.path.join(ROOT, "target/release/llmfs"))
EXAMPLES = os.environ.get("EXAMPLES", os.path.join(ROOT, "target/release/examples"))
LOADERS = ["load_file", "safe_open", "hf"]


# --------------------------------------------------------------------------------------------
# The worker: a long-lived process with torch and transformers imported, timing one load per
# request (so import time is never counted).
# --------------------------------------------------------------------------------------------

def worker():
    import torch
    import safetensors.torch
    from safetensors import safe_open
    import transformers
    transformers.logging.set_verbosity_error()
    buf = [None]

    def touch(t):
        b = t.detach().reshape(-1).contiguous().view(torch.uint8)
        n = b.numel()
        if buf[0] is None or buf[0].numel() < n:
            buf[0] = torch.empty(n, dtype=torch.uint8)
        buf[0][:n].copy_(b)
        return n

    def shards(d):
        return sorted(glob.glob(os.path.join(d, "*.safetensors")))

    def load_file(d):
        n = 0
        for f in shards(d):
            sd = safetensors.torch.load_file(f)
            for v in sd.values():
                n += touch(v)
            del sd
        return n

    def safe_open_(d):
        n = 0
        for f in shards(d):
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    n += touch(h.get_tensor(k))
        return n

    def hf(d):
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype="auto")
        n = sum(touch(p) for p in model.parameters())
        del model
        return n

    fns = {"load_file": load_file, "safe_open": safe_open_, "hf": hf}
    for line in sys.stdin:
        req = json.loads(line)
        gc.collect()
        t = time.perf_counter()
        try:
            n = fns[req["loader"]](req["dir"])
            out = {"secs": time.perf_counter() - t, "bytes": n}
        except Exception as e:  # a failed load is a result too (EIO, a loader's error)
            out = {"error": f"{type(e).__name__}: {e}"[:300]}
        gc.collect()
        print(json.dumps(out), flush=True)


class Worker:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_worker"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def load(self, loader, d):
        self.p.stdin.write(json.dumps({"loader": loader, "dir": d}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self):
        self.p.stdin.close()
        self.p.wait()


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------

def sh(*args, env=None):
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def warm(paths):
    """Read files so they are in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def make_fastchat_delta(base, ft, out):
    """FastChat make_delta's output: the fine-tune's files, its tensors target - base in f16."""
    import torch
    from safetensors.torch import load_file, save_file
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(ft):
        src = os.path.join(ft, f)
        if f.endswith(".safetensors"):
            b, t = load_file(os.path.join(base, f)), load_file(src)
            save_file({k: (t[k].half() - b[k].half()).contiguous() for k in t}, os.path.join(out, f),
                      metadata={"format": "pt"})
        else:
            shutil.copy(src, os.path.join(out, f))


def make_lora(base, out, rank=16):
    """A PEFT adapter of rank `rank` on every linear layer of the base."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    tensors, modules = {}, set()
    for f in sorted(glob.glob(os.path.join(base, "*.safetensors"))):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                if "layers." in k and k.endswith("_proj.weight"):
                    rows, cols = h.get_slice(k).get_shape()
                    stem = k[: -len(".weight")]
                    modules.add(stem.rsplit(".", 1)[1])
                    tensors[f"base_model.model.{stem}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) * 0.01).to(torch.bfloat16)
                    tensors[f"base_model.model.{stem}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(modules),
                   "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "bias": "none"}, f)


VARIANTS = [  # (entry, label)
    ("f16", "f16 cast"),
    ("q8", "q8"),
    ("q4", "q4"),
    ("d-lossless", "lossless delta"),
    ("d-q8", "q8 delta"),
    ("d-bitdelta", "bitdelta"),
    ("fc", "FastChat delta import"),
    ("lora", "LoRA (rank 16, all linear)"),
]


def setup(work, size_mib):
    model, ft, fcd, lora, store = (f"{work}/{x}" for x in ("model", "ft", "fc-delta", "lora-adapter", "store"))
    if not os.path.exists(f"{model}/config.json"):
        print(sh(f"{EXAMPLES}/gen_model", model, str(size_mib)), end="", file=sys.stderr)
    if not os.path.exists(f"{ft}/config.json"):
        sh(f"{EXAMPLES}/gen_finetune", model, ft)
    if not os.path.exists(f"{fcd}/config.json"):
        make_fastchat_delta(model, ft, fcd)
    if not os.path.exists(f"{lora}/adapter_config.json"):
        make_lora(model, lora)
    if not os.path.exists(f"{store}/registry.json"):
        shutil.rmtree(store, ignore_errors=True)
        L = [LLMFS, "--store", store]
        sh(*L, "add", "base", model)
        sh(*L, "cast", "f16", "--base", "base", "--dtype", "f16")
        sh(*L, "quantize", "q8", "--base", "base")
        sh(*L, "quantize", "q4", "--base", "base", "--bits", "4", "--group-size", "128")
        for codec in ("lossless", "q8", "bitdelta"):
            sh(*L, "delta", "make", f"d-{codec}", "--base", "base", "--target", ft, "--codec", codec)
        sh(*L, "delta", "import", "fc", "--base", "base", "--from", fcd, "--format", "fastchat")
        sh(*L, "delta", "import", "lora", "--base", "base", "--from", lora, "--format", "lora")
    return model, ft, store


# --------------------------------------------------------------------------------------------
# Mounts
# --------------------------------------------------------------------------------------------

def daemon_pid(mnt):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"mount" in cmd and mnt.encode() in cmd and b"--foreground" in cmd:
            return int(pid)
    return None


def peak_rss_mib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Mount:
    def __init__(self, store, mnt, cache, extra=(), env=None):
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        subprocess.run([LLMFS, "umount", mnt], capture_output=True)
        sh(LLMFS, "--store", store, "mount", mnt, "--cache-size", "256MiB", "--disk-cache", cache, *extra,
           env=env)
        self.pid = daemon_pid(mnt)

    def rss(self):
        return peak_rss_mib(self.pid) if self.pid else None

    def close(self):
        sh(LLMFS, "umount", self.mnt)
        deadline = time.time() + 60
        # Wait for the daemon to exit: it commits what it decoded before it does.
        while self.pid and os.path.exists(f"/proc/{self.pid}") and time.time() < deadline:
            try:
                if open(f"/proc/{self.pid}/stat").read().split(") ")[1][0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.02)


def main():
    args = sys.argv[1:]
    work = os.path.abspath(args[0] if args else "/tmp/llmfs-load")
    size_mib = int(args[1]) if len(args) > 1 else 1100
    reps = int(args[2]) if len(args) > 2 else 2
    loaders = args[3].split(",") if len(args) > 3 else LOADERS
    os.makedirs(work, exist_ok=True)
    model, ft, store = setup(work, size_mib)
    cores = len(os.sched_getaffinity(0))
    mnt, cache = f"{work}/mnt", f"{work}/cache"
    warm(glob.glob(f"{model}/*.safetensors") + glob.glob(f"{ft}/*.safetensors")
         + glob.glob(f"{store}/models/*/*"))
    w = Worker()
    results = {"cores": cores, "size_mib": size_mib, "reps": reps, "rows": []}

    def timed(loader, d):
        best = None
        for _ in range(reps):
            r = w.load(loader, d)
            if "error" in r:
                return r
            if best is None or r["secs"] < best["secs"]:
                best = r
        return best

    def gbps(r):
        return r["bytes"] / r["secs"] / 1e9 if "secs" in r else None

    def row(label, first, again=None, rss=None):
        results["rows"].append({"label": label, "first": first, "again": again, "rss_mib": rss})
        print(f"# {label}: " + ", ".join(
            f"{l} {gbps(first[l]) or first[l].get('error')} / {again and (gbps(again[l]) or again[l].get('error'))}"
            for l in loaders), file=sys.stderr, flush=True)

    # Warm-up: the first from_pretrained imports the model's code; not timed.
    for l in loaders:
        w.load(l, ft)
    # Plain fine-tune on local disk, warm.
    row("plain fine-tune, local disk", {l: timed(l, ft) for l in loaders})

    def better(a, b):
        return b if a is None or ("secs" in b and ("secs" not in a or b["secs"] < a["secs"])) else a

    def variant(entry, label, extra_first=(), extra_again=(), env=None, remount=True):
        """Best of REPS rounds of: empty disk cache, mount, first load; remount, load again."""
        first, again, rss = {}, {}, 0
        for l in loaders:
            for _ in range(reps):
                shutil.rmtree(cache, ignore_errors=True)
                m = Mount(store, mnt, cache, extra_first, env)
                first[l] = better(first.get(l), w.load(l, f"{mnt}/{entry}"))
                rss = max(rss, m.rss() or 0)
                m.close()
                if remount:
                    m = Mount(store, mnt, cache, extra_again, env)
                    again[l] = better(again.get(l), w.load(l, f"{mnt}/{entry}"))
                    rss = max(rss, m.rss() or 0)
                    m.close()
        row(label, first, again if remount else None, rss)

    variant("base", "base through the mount")
    for entry, label in VARIANTS:
        variant(entry, label)
    if os.environ.get("BENCH_EXTRA", "1") == "0":  # the kinds only (a shorter run)
        return finish(w, results, work, cores, loaders)
    variant("d-lossless", "lossless delta, again with --disk-cache-verify full", extra_again=("--disk-cache-verify", "full"))
    env = dict(os.environ, LLMFS_PASSTHROUGH="0")
    variant("d-lossless", "lossless delta, LLMFS_PASSTHROUGH=0 (cache file by pread)", env=env)
    variant("d-lossless", "lossless delta, --disk-cache 0 (decoded on the read path)",
            extra_first=("--disk-cache-size", "0"), remount=False)
    finish(w, results, work, cores, loaders)


def finish(w, results, work, cores, loaders):
    w.close()
    with open(f"{work}/results-{cores}cores.json", "w") as f:
        json.dump(results, f, indent=1)
    print_table(results, loaders)


def print_table(results, loaders):
    rows = results["rows"]
    plain = rows[0]["first"]
    names = {"load_file": "load_file", "safe_open": "safe_open+get_tensor", "hf": "from_pretrained"}

    def cell(r, l):
        if r is None or l not in r:
            return ""
        if "error" in r[l]:
            return "error"
        g = r[l]["bytes"] / r[l]["secs"] / 1e9
        p = plain[l]["bytes"] / plain[l]["secs"] / 1e9 if "secs" in plain.get(l, {}) else None
        return f"{g:.2f} ({g / p:.2f}x)" if p else f"{g:.2f}"

    print(f"\n{results['cores']} cores, {results['size_mib']} MiB model, best of {results['reps']}; "
          "GB/s (ratio to the plain fine-tune); first load on a fresh mount and empty disk cache / after a remount\n")
    head = "| case | " + " | ".join(f"{names[l]} first | {names[l]} again" for l in loaders) + " | daemon peak RSS |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(loaders)))
    for r in rows:
        cells = []
        for l in loaders:
            cells += [cell(r["first"], l), cell(r["again"], l)]
        rss = f"{r['rss_mib']:.0f} MiB" if r.get("rss_mib") else ""
        print(f"| {r['label']} | " + " | ".join(cells) + f" | {rss} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker()
    elif len(sys.argv) > 1 and sys.argv[1] == "_table":
        r = json.load(open(sys.argv[2]))
        print_table(r, [l for l in LOADERS if l in r["rows"][0]["first"]])
    else:
        main()
