#!/usr/bin/env python3
"""Merge benchmark (issue 22): mergekit-yaml writing a merged model against `llmfs merge` plus the
first load through a fresh mount. Prints a markdown table and writes WORK/merge-results-NcoresS.json.

Generates a bf16 LLaMA-shaped base of SIZE_MIB (examples/gen_model) and three fine-tunes of it
(examples/gen_finetune, 0.02, each with noise of its own: the generator seeds by file position,
so each shard of each fine-tune is made, in parallel, from a view of the base holding that shard
behind a different number of empty files), registers
them in a store in place (`llmfs add`), then for each merge (linear of the three fine-tunes
0.5/0.3/0.2; TIES of the three on the base, density 0.5, weight 1/3 each; both bfloat16):
  mergekit CPU   `mergekit-yaml CONFIG OUT` (mergekit 0.1.5, every core) writing the merged model:
                 wall time and peak RSS (wait4's ru_maxrss); then from_pretrained of what it wrote
                 (page cache warm: it was just written)
  mergekit cuda  the same with --cuda, when torch sees a GPU (BENCH_CUDA=0: never)
  llmfs          `llmfs merge NAME --config YAML` (the store's growth in bytes: every file of the
                 store but llmfs.log and the disk cache), then an empty disk cache, a fresh mount
                 and transformers' from_pretrained(dtype="auto") with every tensor's bytes copied
                 once (bench_load.py's worker: the merge is computed by that read); then umount,
                 mount again and the same load (the merged files now in the disk cache)
  reference      from_pretrained of the first fine-tune from local disk (page cache warm)
Each llmfs round registers a new merge (NAME-1, NAME-2 ...) so each is computed from nothing.
Medians of REPS rounds (MK_REPS for mergekit, default REPS). The store's and the fine-tunes'
files are warm in the page cache (read once before timing) for both sides.

usage: scripts/bench_merge.py WORK SIZE_MIB [REPS]
  env: LLMFS, EXAMPLES (binaries, default target/release), MERGEKIT_PYTHON (a python that
  imports mergekit 0.1.5, default this one), MK_REPS, BENCH_CUDA=0|1, BENCH_METHODS=linear,ties,
  MK_DEVICES=cpu,cuda (which mergekit runs; cuda only where torch sees a GPU), MK_CPU_METHODS=linear,ties
  (the merges mergekit runs on the CPU), BENCH_BACKENDS=cpu,gpu (llmfs rounds once per
  `mount --backend`, a table row each; default: one round set on the default backend, auto)
  build first: cargo build --release --features gpu --bin llmfs --example gen_model --example gen_finetune
  Run under `taskset -c 0,1` for the 2-core table (the daemon and mergekit inherit the affinity).
"""
import json, os, shutil, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_load as bl  # noqa: E402  (Worker, Mount, sh, warm, daemon RSS)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLMFS, EXAMPLES = bl.LLMFS, bl.EXAMPLES
MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON", sys.executable)
FTS = ["ft1", "ft2", "ft3"]


def log(*a):
    print("#", *a, file=sys.stderr, flush=True)


def run_rusage(cmd, env=None):
    """Run cmd; (wall seconds, peak RSS MiB of the process, output) — wait4's rusage is the child's own."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{out.decode(errors='replace')[-4000:]}")
    return secs, ru.ru_maxrss / 1024, out


def setup(work, size_mib):
    model, store = f"{work}/model", f"{work}/store"
    t = time.perf_counter()
    if not os.path.exists(f"{model}/config.json"):
        log(bl.sh(f"{EXAMPLES}/gen_model", model, str(size_mib)).strip())
    # gen_finetune seeds each file's noise by its position in the directory's sorted listing:
    # one process per (fine-tune, shard), each on a view of the base holding that shard alone
    # behind 10 * k + s empty files listed first, gives every fine-tune and shard noise of its
    # own (signs differ between the fine-tunes, as TIES needs) and uses the cores.
    shards = bl.files(model, "*.safetensors")
    procs = []
    for k, ft in enumerate(FTS, 1):
        out = f"{work}/{ft}"
        if os.path.exists(f"{out}/config.json"):
            continue
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for s_, shard in enumerate(shards):
            view = f"{work}/.view-{ft}-{s_}"
            shutil.rmtree(view, ignore_errors=True)
            os.makedirs(view)
            for j in range(10 * k + s_):
                open(f"{view}/0pad{j:03}", "w").close()
            os.symlink(os.path.abspath(shard), f"{view}/{os.path.basename(shard)}")
            procs.append((subprocess.Popen([f"{EXAMPLES}/gen_finetune", view, f"{view}.out", "0.02"]),
                          view, f"{view}.out/{os.path.basename(shard)}", out))
    for p, view, made, out in procs:
        if p.wait() != 0:
            raise SystemExit("gen_finetune failed")
        os.rename(made, f"{out}/{os.path.basename(made)}")
        shutil.rmtree(view)
        shutil.rmtree(f"{view}.out")
    for ft in FTS:
        out = f"{work}/{ft}"
        if not os.path.exists(f"{out}/config.json"):
            for f in bl.files(model):
                if not f.endswith(".safetensors"):
                    shutil.copy(f, out)
    gen = time.perf_counter() - t
    t = time.perf_counter()
    have = set()
    if os.path.exists(f"{store}/registry.json"):
        have = set(json.load(open(f"{store}/registry.json"))["entries"])
    for name, d in [("base", model)] + [(ft, f"{work}/{ft}") for ft in FTS]:
        if name not in have:
            bl.sh(LLMFS, "--store", store, "add", name, d)
    log(f"generated in {gen:.1f} s, registered in {time.perf_counter() - t:.1f} s")
    return model, store


def configs(work):
    """(name, llmfs YAML, mergekit YAML): the same merge, entry names for llmfs, paths for mergekit."""
    def linear(ref):
        return ("merge_method: linear\ndtype: bfloat16\nmodels:\n"
                + "".join(f"  - model: {ref(ft)}\n    parameters:\n      weight: {w}\n"
                          for ft, w in zip(FTS, (0.5, 0.3, 0.2))))

    def ties(ref):
        return (f"merge_method: ties\nbase_model: {ref('base')}\ndtype: bfloat16\n"
                "parameters:\n  normalize: true\nmodels:\n"
                + "".join(f"  - model: {ref(ft)}\n    parameters:\n      weight: 0.3333\n      density: 0.5\n"
                          for ft in FTS))

    path = lambda n: f"{work}/model" if n == "base" else f"{work}/{n}"
    return [(n, f(lambda x: x), f(path)) for n, f in (("linear", linear), ("ties", ties))]


def store_bytes(store):
    n = 0
    for root, dirs, files in os.walk(store):
        if os.path.abspath(root) == os.path.abspath(store) and "cache" in dirs:
            dirs.remove("cache")
        n += sum(os.path.getsize(os.path.join(root, f)) for f in files if f != "llmfs.log")
    return n


def cuda_visible():
    if os.environ.get("BENCH_CUDA") in ("0", "1"):
        return os.environ["BENCH_CUDA"] == "1"
    r = subprocess.run([MERGEKIT_PYTHON, "-c", "import torch; print(torch.cuda.is_available())"],
                       capture_output=True, text=True)
    return r.stdout.strip() == "True"


def main():
    args = sys.argv[1:]
    work = os.path.abspath(args[0] if args else "/tmp/llmfs-merge")
    size_mib = int(args[1]) if len(args) > 1 else 1000
    reps = int(args[2]) if len(args) > 2 else 3
    mk_reps = int(os.environ.get("MK_REPS", reps))
    methods = os.environ.get("BENCH_METHODS", "linear,ties").split(",")
    os.makedirs(work, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    model, store = setup(work, size_mib)
    mnt, cache = f"{work}/mnt", f"{work}/cache"
    # Dropped and read back, as bench_load.py does: cached as a read from disk leaves them.
    inputs = bl.files(model, "*.safetensors") + [f for ft in FTS for f in bl.files(f"{work}/{ft}", "*.safetensors")]
    bl.drop(inputs)
    bl.warm(inputs)
    cuda = cuda_visible()
    w = bl.Worker()
    w.load("hf", f"{work}/ft1")  # warm-up: imports, the model code
    plain = [w.load("hf", f"{work}/ft1") for _ in range(reps)]
    res = {"cores": cores, "size_mib": size_mib, "reps": reps, "mk_reps": mk_reps, "cuda": cuda,
           "model_bytes": sum(os.path.getsize(f) for f in bl.files(model, "*.safetensors")),
           "plain": plain, "merges": {}}
    log(f"plain fine-tune from_pretrained: {[round(p['secs'], 2) for p in plain]} s")
    for name, ycfg, mcfg in configs(work):
        if name not in methods:
            continue
        r = res["merges"][name] = {"mergekit": [], "mergekit_cuda": [], "mk_load": [], "llmfs": []}
        open(f"{work}/{name}.llmfs.yaml", "w").write(ycfg)
        open(f"{work}/{name}.mergekit.yaml", "w").write(mcfg)
        devs = os.environ.get("MK_DEVICES", "cpu,cuda").split(",")
        cpu_methods = os.environ.get("MK_CPU_METHODS", "linear,ties").split(",")
        for dev in [d for d in devs if (d == "cpu" and name in cpu_methods) or (d == "cuda" and cuda)]:
            for i in range(mk_reps):
                out = f"{work}/mk-{name}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [MERGEKIT_PYTHON, "-c", "from mergekit.scripts.run_yaml import main; main()",
                       f"{work}/{name}.mergekit.yaml", out, "--quiet"] + (["--cuda"] if dev == "cuda" else [])
                secs, rss, _ = run_rusage(cmd)
                r["mergekit" if dev == "cpu" else "mergekit_cuda"].append({"secs": secs, "rss_mib": rss})
                log(f"{name}: mergekit {dev} {secs:.1f} s, peak RSS {rss:.0f} MiB")
                if i == 0 and not r["mk_load"]:
                    ld = w.load("hf", out)
                    r["mk_load"].append(ld)
                    r["mk_bytes"] = sum(os.path.getsize(f) for f in bl.files(out, "*.safetensors"))
                    log(f"{name}: from_pretrained of mergekit's output {ld.get('secs')} s")
                shutil.rmtree(out, ignore_errors=True)
        backends = [b for b in os.environ.get("BENCH_BACKENDS", "").split(",") if b] or [None]
        for b, i in [(b, i) for b in backends for i in range(reps)]:
            key = "llmfs" if b is None else f"llmfs --backend {b}"
            extra = () if b is None else ("--backend", b)
            entry = f"m-{name}-{i + 1}" if b is None else f"m-{name}-{b}-{i + 1}"
            if os.path.exists(f"{store}/registry.json") and entry in json.load(open(f"{store}/registry.json"))["entries"]:
                bl.sh(LLMFS, "--store", store, "rm", entry)
            before = store_bytes(store)
            t = time.perf_counter()
            bl.sh(LLMFS, "--store", store, "merge", entry, "--config", f"{work}/{name}.llmfs.yaml")
            msecs = time.perf_counter() - t
            grew = store_bytes(store) - before
            shutil.rmtree(cache, ignore_errors=True)
            t = time.perf_counter()
            m = bl.Mount(store, mnt, cache, extra)
            mount_secs = time.perf_counter() - t
            first = w.load("hf", f"{mnt}/{entry}")
            rss = m.rss()
            m.close()
            m = bl.Mount(store, mnt, cache, extra)
            again = w.load("hf", f"{mnt}/{entry}")
            rss = max(rss or 0, m.rss() or 0)
            m.close()
            for x in (first, again):
                if "error" in x:
                    raise SystemExit(f"{name}: load through the mount failed: {x['error']}")
            r.setdefault(key, []).append({"merge_secs": msecs, "mount_secs": mount_secs, "first": first, "again": again,
                               "store_growth": grew, "rss_mib": rss})
            log(f"{name}: {key} merge {msecs:.2f} s (+{grew} B), mount {mount_secs:.2f} s, first "
                f"{first['secs']:.2f} s, again {again['secs']:.2f} s, daemon RSS {rss:.0f} MiB")
        save(work, res)  # after each merge: a run cut short still has a table (`_table FILE`)
    w.close()
    save(work, res)
    print_table(res)


def save(work, res):
    with open(f"{work}/merge-results-{res['cores']}cores.json", "w") as f:
        json.dump(res, f, indent=1)


def med(xs):
    return statistics.median(xs) if xs else None


def print_table(res):
    gb = res["model_bytes"] / 1e9
    plain = med([p["secs"] for p in res["plain"]])
    print(f"\n{res['cores']} cores, {res['size_mib']} MiB bf16 model ({gb:.2f} GB), 3 fine-tunes; medians of "
          f"{res['mk_reps']} mergekit / {res['reps']} llmfs rounds; seconds. llmfs first = `llmfs merge` + "
          "mount + from_pretrained with every tensor touched, empty disk cache; again = after umount + mount. "
          f"Reference: from_pretrained of a plain fine-tune from local disk, warm: {plain:.2f} s "
          f"({gb / plain:.2f} GB/s)\n")
    runs = {"mergekit CPU": "mergekit", "mergekit --cuda": "mergekit_cuda"}
    have = [k for k, v in runs.items() if any(r[v] for r in res["merges"].values())]
    head = ["merge"] + [f"{k} (peak RSS)" for k in have] + ["load of mergekit's output", "llmfs merge",
            "llmfs merge + first load"] + [f"vs {k}" for k in have] + [
            "load after remount (GB/s, vs plain)", "store growth", "daemon peak RSS"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = [(f"{name} ({k[6:]})" if k != "llmfs" else name, r, r[k]) for name, r in res["merges"].items()
            for k in r if k.startswith("llmfs")]
    for name, r, L in rows:
        if not L:
            continue
        ms = med([x["merge_secs"] for x in L])
        first = med([x["merge_secs"] + x["mount_secs"] + x["first"]["secs"] for x in L])
        again = med([x["again"]["secs"] for x in L])
        cells, vs = [name], []
        for k in have:
            xs = r[runs[k]]
            if not xs:
                cells.append("")
                vs.append("")
                continue
            t = med([x["secs"] for x in xs])
            cells.append(f"{t:.1f} ({max(x['rss_mib'] for x in xs) / 1024:.1f} GiB)")
            vs.append(f"{t / first:.2f}x faster" if t >= first else f"{first / t:.2f}x slower")
        mkl = med([x["secs"] for x in r["mk_load"]]) if r["mk_load"] else None
        cells += [f"{mkl:.2f}" if mkl is not None else "", f"{ms:.3f}", f"{first:.1f}"] + vs
        growth = med([x["store_growth"] for x in L])
        cells += [f"{again:.2f} ({gb / again:.2f} GB/s, {plain / again:.2f}x)", f"{growth:.0f} B",
                  f"{max(x['rss_mib'] or 0 for x in L):.0f} MiB"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_table":
        print_table(json.load(open(sys.argv[2])))
    else:
        main()
