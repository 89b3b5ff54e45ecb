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
Ratios are to the plain fine-tune with the same loader, loaded REPS times up front and once more
after every round of every variant (the row is made from all of them, so drift falls on both).
The last column is the daemon's peak RSS (VmHWM) over its mounts, and sampled every 5 ms the
peaks of its own memory (anonymous and memfd pages) and of the page cache it had mapped (the
files it filled through a mapping, the sources it read in place): "own" and "mapped".

Extra rows for the lossless delta: after a remount with --disk-cache-verify full (the content
hash checked on first open), with LLMFS_PASSTHROUGH=0 (the daemon serves the cache file by pread), and with no disk
cache at all (--disk-cache 0: decoded on the FUSE read path, as before the disk cache).

Cold rows (BENCH_COLD=1): the base warm in the page cache, the plain fine-tune's files and the
lossless delta's stored container dropped from it (posix_fadvise DONTNEED per file, not
drop_caches), the disk cache empty; the bytes each first load reads from the block device
(/proc/PID/io of the loader and the daemon) beside what each stores.
ZipNN peer (BENCH_ZIPNN=SITE, implies the cold rows): SITE is a `pip install --target` dir with
zipnn==0.5.4 transformers==4.49.0 safetensors==0.5.3 tokenizers==0.21.1 huggingface_hub==0.29.3
(--no-deps; torch from the system). The fine-tune is compressed as ZipNN's scripts do, per tensor
(*.znn.safetensors: zipnn_safetensors() + load_file, SafeOpen + get_tensor) and whole-file
(*.safetensors.znn: zipnn_hf() + from_pretrained, or decompress + safetensors load), and loaded
cold (its files dropped) and again (cached), in the same run as the lossless delta.
BENCH_FRESH=1 adds a control row: the plain fine-tune copied just before each of its loads (a file
written seconds before, as a variant's decoded files are when loaded "again").
BENCH_KINDS=d-lossless (a comma-separated subset of base and the variants' entries) registers and
runs only those, without the extra rows.
A/B in one run (BENCH_CONFIGS="NAME:VAR=VAL,VAR=VAL NAME2:VAR=VAL ..."): every variant row is run
once per configuration, its daemons with those environment variables, the configurations
alternating within each round (A B A B: drift on a shared machine falls on both), and labelled
"LABEL [NAME]"; e.g. BENCH_CONFIGS="before:LLMFS_AHEAD_NICE=0,LLMFS_FILL_DROP_MAPPED=0
after:LLMFS_AHEAD_NICE=10". With REPS > 1 a second table gives the median of the REPS rounds
beside the best; results.json keeps every round's time ("first_all", "again_all").

usage: scripts/bench_load.py [WORKDIR] [SIZE_MIB] [REPS] [LOADERS]
  LOADERS: comma-separated subset of load_file,safe_open,hf (default all); BENCH_EXTRA=0 leaves
  out the extra rows
  build first: cargo build --release --bins --examples; LLMFS=path picks another binary.
  Run under `taskset -c 0,1` for the 2-core table (the daemon inherits the affinity).
"""
import gc, glob, json, os, shutil, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLMFS = os.environ.get("LLMFS", os.path.join(ROOT, "target/release/llmfs"))
EXAMPLES = os.environ.get("EXAMPLES", os.path.join(ROOT, "target/release/examples"))
LOADERS = ["load_file", "safe_open", "hf"]


# --------------------------------------------------------------------------------------------
# The worker: a long-lived process with torch and transformers imported, timing one load per
# request (so import time is never counted).
# --------------------------------------------------------------------------------------------

def toucher(torch):
    """Every tensor's bytes copied into one reused buffer, as a copy to a GPU would touch them:
    returns the function that does it (and gives the byte count)."""
    buf = [None]

    def touch(t):
        b = t.detach().reshape(-1).contiguous().view(torch.uint8)
        n = b.numel()
        if buf[0] is None or buf[0].numel() < n:
            buf[0] = torch.empty(n, dtype=torch.uint8)
        buf[0][:n].copy_(b)
        return n
    return touch


def worker():
    import torch
    import safetensors.torch
    from safetensors import safe_open
    import transformers
    transformers.logging.set_verbosity_error()
    touch = toucher(torch)

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


# --------------------------------------------------------------------------------------------
# The ZipNN peer's worker (BENCH_ZIPNN=SITE): run with PYTHONPATH=SITE, a `pip --target` dir with
# zipnn 0.5.4, transformers 4.49 and safetensors 0.5.3 (its loading plugins fail on transformers 5
# and safetensors 0.8); torch is the system's. It compresses the fine-tune both ways ZipNN's
# scripts do and loads the copies through ZipNN's own loading paths.
# --------------------------------------------------------------------------------------------

def zworker():
    # zipnn_hf prints progress to stdout: keep stdout for the answers alone.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch
    import safetensors.torch
    import transformers
    from zipnn import ZipNN, zipnn_hf, zipnn_safetensors
    from zipnn.zipnn import SafeOpen, decompress_safetensors_tensor
    transformers.logging.set_verbosity_error()
    zipnn_hf()            # from_pretrained decompresses *.safetensors.znn (whole-file)
    zipnn_safetensors()   # safetensors.torch.load_file decompresses *.znn.safetensors (per tensor)
    touch = toucher(torch)

    def per_tensor(d):
        return sorted(glob.glob(os.path.join(d, "*.znn.safetensors")))

    def whole(d):
        return sorted(glob.glob(os.path.join(d, "*.safetensors.znn")))

    def load_file(d):
        n = 0
        for f in per_tensor(d):
            sd = safetensors.torch.load_file(f)
            n += sum(touch(v) for v in sd.values())
            del sd
        for f in whole(d):  # the whole-file format: decompress the file, then parse it
            with open(f, "rb") as h:
                sd = safetensors.torch.load(bytes(ZipNN(is_streaming=True).decompress(h.read())))
            n += sum(touch(v) for v in sd.values())
            del sd
        return n

    def safe_open_(d):
        if not per_tensor(d):
            raise ValueError("n/a: ZipNN's whole-file format has no per-tensor reader")
        n = 0
        for f in per_tensor(d):
            with SafeOpen(f, "pt") as h:
                for k in h.keys():
                    n += touch(h.get_tensor(k))
        return n

    def hf(d):
        if not whole(d):
            raise ValueError("n/a: zipnn_hf() decompresses only the whole-file format")
        model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype="auto")
        n = sum(touch(p) for p in model.parameters())
        del model
        return n

    def compress(src, pt, wf):
        """As ZipNN's scripts/zipnn_compress_safetensors.py (per tensor: each floating-point tensor
        Huffman-coded by ZipNN when that is smaller, its dtype and shape in the file's metadata) and
        scripts/zipnn_compress_file.py --is_streaming (the whole file in 1 MiB chunks, bfloat16)."""
        from safetensors import safe_open
        from safetensors.torch import save_file
        from zipnn.util_header import EnumFormat
        from zipnn.util_torch import zipnn_is_floating_point
        from zipnn.util_safetensors import (build_compressed_tensor_info, set_compressed_tensors_metadata,
                                            COMPRESSED_DTYPE, COMPRESSION_METHOD)
        for d in (pt, wf):
            os.makedirs(d, exist_ok=True)
        t0 = time.perf_counter()
        for f in sorted(os.listdir(src)):
            path = os.path.join(src, f)
            if f.endswith(".safetensors"):
                tensors, infos = {}, {}
                with safe_open(path, "pt", "cpu") as h:
                    for name in h.keys():
                        t = h.get_tensor(name)
                        if not zipnn_is_floating_point(EnumFormat.TORCH.value, t, t.dtype):
                            tensors[name] = t
                            continue
                        info = build_compressed_tensor_info(t)
                        # ZipNN reorders its input's bits in place: hand it a copy.
                        c = ZipNN(input_format="torch", bytearray_dtype=t.dtype,
                                  method=COMPRESSION_METHOD).compress(t.clone())
                        if not torch.equal(decompress_safetensors_tensor(torch.frombuffer(bytearray(c), dtype=torch.uint8))
                                           .view(torch.uint8).reshape(-1), t.view(torch.uint8).reshape(-1)):
                            raise ValueError(f"ZipNN's round trip of {name} differs")
                        if len(c) >= t.numel() * t.element_size():
                            tensors[name] = t
                            continue
                        tensors[name] = torch.frombuffer(bytearray(c), dtype=COMPRESSED_DTYPE)
                        infos[name] = info
                    metadata = h.metadata() or {"format": "pt"}
                set_compressed_tensors_metadata(infos, metadata)
                save_file(tensors, os.path.join(pt, f[: -len(".safetensors")] + ".znn.safetensors"), metadata)
                data = open(path, "rb").read()
                c = ZipNN(bytearray_dtype="bfloat16", is_streaming=True, streaming_chunk=1 << 20,
                          method="HUFFMAN").compress(bytearray(data))
                if bytes(ZipNN(is_streaming=True).decompress(c)) != data:
                    raise ValueError(f"ZipNN's whole-file round trip of {f} differs")
                with open(os.path.join(wf, f + ".znn"), "wb") as o:
                    o.write(c)
            elif f.endswith(".index.json"):  # the shard names, as zipnn_compress_path.py rewrites them
                text = open(path).read()
                open(os.path.join(pt, f), "w").write(text.replace('.safetensors"', '.znn.safetensors"'))
                open(os.path.join(wf, f), "w").write(text.replace('.safetensors"', '.safetensors.znn"'))
            else:
                shutil.copy(path, pt)
                shutil.copy(path, wf)
        from importlib.metadata import version
        return {"secs": time.perf_counter() - t0, "zipnn": version("zipnn"),
                "transformers": transformers.__version__, "safetensors": safetensors.__version__}

    fns = {"load_file": load_file, "safe_open": safe_open_, "hf": hf}
    for line in sys.stdin:
        req = json.loads(line)
        gc.collect()
        t = time.perf_counter()
        try:
            if "compress" in req:
                out = compress(*req["compress"])
            else:
                n = fns[req["loader"]](req["dir"])
                out = {"secs": time.perf_counter() - t, "bytes": n}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"[:300]}
        gc.collect()
        print(json.dumps(out), file=answers, flush=True)


class Worker:
    def __init__(self, mode="_worker", env=None):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), mode],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def request(self, req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def load(self, loader, d):
        """One timed load; "disk_read" is what this process read from the block device meanwhile."""
        r0 = read_bytes(self.p.pid)
        r = self.request({"loader": loader, "dir": d})
        r1 = read_bytes(self.p.pid)
        if r0 is not None and r1 is not None:
            r["disk_read"] = r1 - r0
        return r

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


def drop(paths):
    """Drop files from the page cache (written back first), leaving every other file cached: the
    cold case of a node that serves many fine-tunes of one warm base (drop_caches would drop the
    base too)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes(pid):
    """Bytes a process has read from the block device (/proc/PID/io), None where unreadable."""
    try:
        for line in open(f"/proc/{pid}/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def files(d, pattern="*"):
    return sorted(p for p in glob.glob(os.path.join(d, pattern)) if os.path.isfile(p))


def make_fastchat_delta(base, ft, out):
    """FastChat make_delta's output: the fine-tune's files, its tensors target - base in f16."""
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


def setup(work, size_mib, entries=None):
    """Generate the model and register `entries` (default: the base and every variant) that the
    store does not hold yet, so a run of a few kinds (BENCH_KINDS) builds only those."""
    model, ft, fcd, lora, store = (f"{work}/{x}" for x in ("model", "ft", "fc-delta", "lora-adapter", "store"))
    if not os.path.exists(f"{model}/config.json"):
        print(sh(f"{EXAMPLES}/gen_model", model, str(size_mib)), end="", file=sys.stderr)
    if not os.path.exists(f"{ft}/config.json"):
        sh(f"{EXAMPLES}/gen_finetune", model, ft)
    want = ["base"] + [e for e, _ in VARIANTS] if entries is None else ["base"] + list(entries)
    have = set()
    if os.path.exists(f"{store}/registry.json"):
        have = set(json.load(open(f"{store}/registry.json"))["entries"])
    L = [LLMFS, "--store", store]
    cmds = {
        "base": lambda: sh(*L, "add", "base", model),
        "f16": lambda: sh(*L, "cast", "f16", "--base", "base", "--dtype", "f16"),
        "q8": lambda: sh(*L, "quantize", "q8", "--base", "base"),
        "q4": lambda: sh(*L, "quantize", "q4", "--base", "base", "--bits", "4", "--group-size", "128"),
        "fc": lambda: (make_fastchat_delta(model, ft, fcd) if not os.path.exists(f"{fcd}/config.json") else None,
                       sh(*L, "delta", "import", "fc", "--base", "base", "--from", fcd, "--format", "fastchat")),
        "lora": lambda: (make_lora(model, lora) if not os.path.exists(f"{lora}/adapter_config.json") else None,
                         sh(*L, "delta", "import", "lora", "--base", "base", "--from", lora, "--format", "lora")),
    }
    for codec in ("lossless", "q8", "bitdelta"):
        cmds[f"d-{codec}"] = (lambda c: lambda: sh(*L, "delta", "make", f"d-{c}", "--base", "base", "--target", ft,
                                                    "--codec", c))(codec)
    for e in want:
        if e not in have:
            cmds[e]()
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


def rss_parts_kib(pid):
    """(RssAnon, RssFile, RssShmem) of `pid` in KiB, or None once it is gone."""
    parts = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "RssShmem"):
                parts[key] = int(line.split()[1])
    except OSError:
        return None
    return parts.get("RssAnon", 0), parts.get("RssFile", 0), parts.get("RssShmem", 0)


class Mount:
    def __init__(self, store, mnt, cache, extra=(), env=None):
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        subprocess.run([LLMFS, "umount", mnt], capture_output=True)
        sh(LLMFS, "--store", store, "mount", mnt, "--cache-size", "256MiB", "--disk-cache", cache, *extra,
           env=env)
        self.pid = daemon_pid(mnt)
        # The peak RSS split (VmHWM is one number): the daemon's own memory (anonymous and the
        # memory tier's memfds) against page cache it maps while filling or reading sources,
        # sampled every 5 ms while mounted.
        self.peak_parts = [0, 0, 0]
        self.sampling = self.pid is not None
        if self.sampling:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while self.sampling:
            parts = rss_parts_kib(self.pid)
            if parts is None:
                return
            self.peak_parts = [max(a, b) for a, b in zip(self.peak_parts, parts)]
            time.sleep(0.005)

    def rss(self):
        return peak_rss_mib(self.pid) if self.pid else None

    def rss_split(self):
        """Peak (anonymous + memfd, mapped files) in MiB, sampled."""
        anon, file, shmem = self.peak_parts
        return (anon + shmem) / 1024, file / 1024

    def close(self):
        self.sampling = False
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


def parse_configs(spec):
    """BENCH_CONFIGS ("NAME:VAR=VAL,VAR=VAL NAME2:..."): [(name, {var: val})]; unset: one unnamed."""
    if not spec or not spec.strip():
        return [("", {})]
    configs = []
    for item in spec.split():
        name, _, assigns = item.partition(":")
        env = dict(a.split("=", 1) for a in assigns.split(",") if a)
        configs.append((name, env))
    return configs


def best_of(runs):
    """The fastest of one loader's rounds (the first error if none loaded)."""
    ok = [r for r in runs if "secs" in r]
    return min(ok, key=lambda r: r["secs"]) if ok else runs[0]


def median_of(runs):
    """The median round (the slower of the middle two for an even count), or the first error.
    The slower: with 2 rounds the faster one is the best, which the best-of table shows already
    (until session 16 this took the faster, so the "median of 2" tables were best-of-2 tables)."""
    bad = [r for r in runs if "secs" not in r]
    if bad:
        return bad[0]
    return sorted(runs, key=lambda r: r["secs"])[len(runs) // 2]


def main():
    args = sys.argv[1:]
    work = os.path.abspath(args[0] if args else "/tmp/llmfs-load")
    size_mib = int(args[1]) if len(args) > 1 else 1100
    reps = int(args[2]) if len(args) > 2 else 2
    loaders = args[3].split(",") if len(args) > 3 else LOADERS
    os.makedirs(work, exist_ok=True)
    kinds = os.environ.get("BENCH_KINDS")  # a comma-separated subset of base and VARIANTS' entries
    variants = VARIANTS if kinds is None else [v for v in VARIANTS if v[0] in kinds.split(",")]
    cold = os.environ.get("BENCH_COLD") == "1"
    zsite = os.environ.get("BENCH_ZIPNN")
    need = None if kinds is None else {e for e, _ in variants} | ({"d-lossless"} if cold or zsite else set())
    model, ft, store = setup(work, size_mib, need)
    cores = len(os.sched_getaffinity(0))
    mnt, cache = f"{work}/mnt", f"{work}/cache"
    # Dropped and read back: in the page cache as a read from disk leaves them. As the generators
    # wrote them (many small writes) the same files loaded 20-40 % slower (2 cores: the fine-tune
    # at 9-12 GB/s against 15-16 once read back), which made the plain row, every ratio's
    # denominator, depend on how the files came to be cached.
    stored = (glob.glob(f"{model}/*.safetensors") + glob.glob(f"{ft}/*.safetensors")
              + glob.glob(f"{store}/models/*/*"))
    drop(stored)
    warm(stored)
    w = Worker()
    results = {"cores": cores, "size_mib": size_mib, "reps": reps, "rows": []}

    def timed(loader, d):
        runs = []
        for _ in range(reps):
            runs.append(w.load(loader, d))
            if "error" in runs[-1]:
                break
        return runs

    def gbps(r):
        return r["bytes"] / r["secs"] / 1e9 if "secs" in r else None

    def row(label, first_all, again_all=None, rss=None, at=None, rss_split=None):
        """A row from every round's result per loader: the best (the table), the median and all
        (appended, or in place of row `at`)."""
        pick = lambda runs, f: {l: f(rs) for l, rs in runs.items()} if runs is not None else None
        first, again = pick(first_all, best_of), pick(again_all, best_of)
        r = {"label": label, "first": first, "again": again, "rss_mib": rss, "rss_split_mib": rss_split,
             "first_median": pick(first_all, median_of),
             "again_median": pick(again_all, median_of),
             "first_all": first_all, "again_all": again_all}
        if at is None:
            results["rows"].append(r)
        else:
            results["rows"][at] = r
        print(f"# {label}: " + ", ".join(
            f"{l} {gbps(first[l]) or first[l].get('error')} / {again and (gbps(again[l]) or again[l].get('error'))}"
            for l in loaders), file=sys.stderr, flush=True)

    # Warm-up: the first from_pretrained imports the model's code; not timed.
    for l in loaders:
        w.load(l, ft)
    # Plain fine-tune on local disk, warm: REPS loads now, and one more after every round of every
    # variant below, so the ratios' denominator sees the same drift as the variants (measured
    # only up front, right after the store's files were written, it once read 0.6x of its speed
    # later in the same run); the row is remade from all of them at the end.
    plain_all = {l: timed(l, ft) for l in loaders}
    row("plain fine-tune, local disk", plain_all)
    plain_at = len(results["rows"]) - 1

    def better(a, b):
        return b if a is None or ("secs" in b and ("secs" not in a or b["secs"] < a["secs"])) else a

    configs = parse_configs(os.environ.get("BENCH_CONFIGS"))

    def variant(entry, label, extra_first=(), extra_again=(), env=None, remount=True):
        """REPS rounds of: empty disk cache, mount, first load; remount, load again; once per
        configuration (BENCH_CONFIGS) in each round."""
        runs = {name: ({}, {}, [0, 0, 0]) for name, _ in configs}

        def note_rss(rss, m):
            """rss: [peak VmHWM, peak own memory, peak mapped files] in MiB, over mounts."""
            own, mapped = m.rss_split()
            rss[:] = [max(rss[0], m.rss() or 0), max(rss[1], own), max(rss[2], mapped)]
        for l in loaders:
            for _ in range(reps):
                for name, cenv in configs:
                    e = dict(env or os.environ, **cenv) if cenv else env
                    first, again, rss = runs[name]
                    shutil.rmtree(cache, ignore_errors=True)
                    m = Mount(store, mnt, cache, extra_first, e)
                    first.setdefault(l, []).append(w.load(l, f"{mnt}/{entry}"))
                    note_rss(rss, m)
                    m.close()
                    if remount:
                        m = Mount(store, mnt, cache, extra_again, e)
                        again.setdefault(l, []).append(w.load(l, f"{mnt}/{entry}"))
                        note_rss(rss, m)
                        m.close()
                    plain_all[l].append(w.load(l, ft))
        for name, _ in configs:
            first, again, rss = runs[name]
            row(f"{label} [{name}]" if name else label, first, again if remount else None, rss[0],
                rss_split=rss[1:])

    if kinds is None or "base" in kinds.split(","):
        variant("base", "base through the mount")
    for entry, label in variants:
        variant(entry, label)
    if os.environ.get("BENCH_FRESH") == "1":
        fresh_plain(w, loaders, reps, ft, work, row, plain_all)
    if cold or zsite:
        peer(results, w, loaders, reps, model, ft, store, mnt, cache, better, zsite, work)
    if os.environ.get("BENCH_EXTRA", "1") == "0" or kinds is not None:  # the kinds only (a shorter run)
        row("plain fine-tune, local disk", plain_all, at=plain_at)
        return finish(w, results, work, cores, loaders)
    variant("d-lossless", "lossless delta, again with --disk-cache-verify full", extra_again=("--disk-cache-verify", "full"))
    env = dict(os.environ, LLMFS_PASSTHROUGH="0")
    variant("d-lossless", "lossless delta, LLMFS_PASSTHROUGH=0 (cache file by pread)", env=env)
    variant("d-lossless", "lossless delta, --disk-cache 0 (decoded on the read path)",
            extra_first=("--disk-cache-size", "0"), remount=False)
    row("plain fine-tune, local disk", plain_all, at=plain_at)
    finish(w, results, work, cores, loaders)


def fresh_plain(w, loaders, reps, ft, work, row, plain_all):
    """BENCH_FRESH=1: the plain fine-tune copied just before each load (2 MiB writes, so 2 MiB
    folios where the page cache makes them), loaded once and deleted: what the page cache of a
    file written seconds before costs a loader on this machine, apart from llmfs. A variant's
    "again" loads its decoded files written by the first load's fills seconds before, where the
    plain row loads files cached since the run began; on a VM whose host backs newly touched
    memory afresh the two differ without any llmfs code between them (issue 23)."""
    dst = f"{work}/ft-fresh"
    runs = {}
    for l in loaders:
        for _ in range(reps):
            shutil.rmtree(dst, ignore_errors=True)
            os.makedirs(dst)
            for f in filter(os.path.isfile, glob.glob(f"{ft}/*")):
                with open(f, "rb") as src, open(f"{dst}/{os.path.basename(f)}", "wb") as out:
                    while chunk := src.read(2 << 20):
                        out.write(chunk)
            runs.setdefault(l, []).append(w.load(l, dst))
            plain_all[l].append(w.load(l, ft))
    shutil.rmtree(dst, ignore_errors=True)
    row("plain fine-tune, a fresh copy (written just before)", runs)


def peer(results, w, loaders, reps, model, ft, store, mnt, cache, better, zsite, work):
    """Cold loads (BENCH_COLD=1) and the ZipNN peer (BENCH_ZIPNN=SITE). The base stays warm in the
    page cache (one base serves many fine-tunes); the plain fine-tune's files, the lossless delta's
    stored container and ZipNN's files are dropped from it before each first load (drop()), and
    the disk cache starts empty. "again": the plain fine-tune and ZipNN's copies loaded once more
    with their files now cached; the delta after a remount, its decoded file in the disk cache."""
    rows = results.setdefault("peer", [])
    base_files = files(model, "*.safetensors") + files(f"{store}/models/base")
    container = files(f"{store}/models/d-lossless")
    size = lambda fs: sum(os.path.getsize(f) for f in fs)

    def add(label, on_disk, first, again):
        rows.append({"label": label, "on_disk": on_disk, "first": first, "again": again})
        print(f"# {label}: on disk {on_disk / 1e6:.0f} MB; " + ", ".join(
            f"{l} {first[l].get('secs') and first[l]['bytes'] / first[l]['secs'] / 1e9}"
            f" (read {first[l].get('disk_read')}) / {again.get(l, {}).get('secs') and again[l]['bytes'] / again[l]['secs'] / 1e9}"
            for l in first), file=sys.stderr, flush=True)

    def plain_like(worker, d, ls):
        first, again = {}, {}
        for l in ls:
            for _ in range(reps):
                drop(files(d))
                first[l] = better(first.get(l), worker.load(l, d))
                again[l] = better(again.get(l), worker.load(l, d))
        return first, again

    first, again = plain_like(w, ft, loaders)
    add("plain fine-tune, cold", size(files(ft)), first, again)

    first, again = {}, {}
    for l in loaders:
        for _ in range(reps):
            warm(base_files)
            drop(container)
            shutil.rmtree(cache, ignore_errors=True)
            m = Mount(store, mnt, cache)
            r = w.load(l, f"{mnt}/d-lossless")
            dr = read_bytes(m.pid) if m.pid else None
            if "disk_read" in r and dr is not None:
                r["disk_read"] += dr  # the daemon reads the container; the loader the decoded file
            m.close()
            first[l] = better(first.get(l), r)
            m = Mount(store, mnt, cache)
            again[l] = better(again.get(l), w.load(l, f"{mnt}/d-lossless"))
            m.close()
    add("llmfs lossless delta, cold", size(container), first, again)

    if not zsite:
        return
    env = dict(os.environ, PYTHONPATH=os.path.abspath(zsite) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    z = Worker("_zworker", env)
    zpt, zwf = f"{work}/zipnn-per-tensor", f"{work}/zipnn-whole-file"
    if not os.path.exists(f"{zwf}/config.json"):
        c = z.request({"compress": [ft, zpt, zwf]})
        if "error" in c:
            raise SystemExit(f"ZipNN compression failed: {c['error']}")
        results["zipnn"] = c
        print(f"# ZipNN compressed the fine-tune both ways in {c['secs']:.1f} s ({c})", file=sys.stderr)
    for l in ("load_file", "hf"):  # warm-up: imports, the first from_pretrained's model code
        z.load(l, zwf)
    first, again = plain_like(z, zpt, [l for l in loaders if l != "hf"])
    add("ZipNN per-tensor (.znn.safetensors)", size(files(zpt, "*.safetensors")), first, again)
    first, again = plain_like(z, zwf, [l for l in loaders if l != "safe_open"])
    add("ZipNN whole-file (.safetensors.znn)", size(files(zwf, "*.znn")), first, again)
    z.close()


def print_peer(results, loaders):
    rows = results.get("peer")
    if not rows:
        return
    names = {"load_file": "load_file", "safe_open": "safe_open+get_tensor", "hf": "from_pretrained"}
    plain = rows[0]

    def g(r):
        return r["bytes"] / r["secs"] / 1e9 if r and "secs" in r else None

    def cell(r, l, ref):
        if l not in r:
            return "n/a"
        if "error" in r[l]:
            return "n/a" if r[l]["error"].startswith("ValueError: n/a") else "error"
        p = g(ref.get(l))
        return f"{g(r[l]):.2f} ({g(r[l]) / p:.2f}x)" if p else f"{g(r[l]):.2f}"

    def read(r):
        v = [r[l]["disk_read"] for l in loaders if l in r and "disk_read" in r[l]]
        return f"{min(v) / 1e6:.0f}–{max(v) / 1e6:.0f}" if v else "?"

    print(f"\n{results['cores']} cores, cold: base warm; the fine-tune's, the delta's and ZipNN's files dropped "
          "from the page cache (posix_fadvise DONTNEED), disk cache empty; GB/s (ratio to the plain fine-tune "
          "cold, same loader); again: files now cached / delta after a remount\n")
    print("| case | stored, MB (of the fine-tune) | read from disk, first, MB | "
          + " | ".join(f"{names[l]} first | again" for l in loaders) + " |")
    print("|" + "---|" * (3 + 2 * len(loaders)))
    for r in rows:
        cells = []
        for l in loaders:
            cells += [cell(r["first"], l, plain["first"]), cell(r["again"], l, plain["first"])]
        print(f"| {r['label']} | {r['on_disk'] / 1e6:.0f} ({r['on_disk'] / plain['on_disk']:.2f}) | "
              f"{read(r['first'])} | " + " | ".join(cells) + " |")


def finish(w, results, work, cores, loaders):
    w.close()
    with open(f"{work}/results-{cores}cores.json", "w") as f:
        json.dump(results, f, indent=1)
    print_table(results, loaders)
    print_peer(results, loaders)


def print_table(results, loaders):
    print_table_of(results, loaders, "first", "again", f"best of {results['reps']}")
    if results["reps"] > 1 and "first_median" in results["rows"][0]:
        print_table_of(results, loaders, "first_median", "again_median", f"median of {results['reps']}")


def print_table_of(results, loaders, first_key, again_key, stat):
    rows = results["rows"]
    plain = rows[0][first_key]
    names = {"load_file": "load_file", "safe_open": "safe_open+get_tensor", "hf": "from_pretrained"}

    def cell(r, l):
        if r is None or l not in r:
            return ""
        if "error" in r[l]:
            return "error"
        g = r[l]["bytes"] / r[l]["secs"] / 1e9
        p = plain[l]["bytes"] / plain[l]["secs"] / 1e9 if "secs" in plain.get(l, {}) else None
        return f"{g:.2f} ({g / p:.2f}x)" if p else f"{g:.2f}"

    print(f"\n{results['cores']} cores, {results['size_mib']} MiB model, {stat}; "
          "GB/s (ratio to the plain fine-tune); first load on a fresh mount and empty disk cache / after a remount\n")
    head = "| case | " + " | ".join(f"{names[l]} first | {names[l]} again" for l in loaders) + " | daemon peak RSS |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(loaders)))
    for r in rows:
        cells = []
        for l in loaders:
            cells += [cell(r[first_key], l), cell(r[again_key], l)]
        rss = f"{r['rss_mib']:.0f} MiB" if r.get("rss_mib") else ""
        if rss and r.get("rss_split_mib"):
            rss += " (own {:.0f}, mapped {:.0f})".format(*r["rss_split_mib"])
        print(f"| {r['label']} | " + " | ".join(cells) + f" | {rss} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker()
    elif len(sys.argv) > 1 and sys.argv[1] == "_zworker":
        zworker()
    elif len(sys.argv) > 1 and sys.argv[1] == "_table":
        r = json.load(open(sys.argv[2]))
        print_table(r, [l for l in LOADERS if l in r["rows"][0]["first"]])
        print_peer(r, [l for l in LOADERS if l in r["rows"][0]["first"]])
    else:
        main()
