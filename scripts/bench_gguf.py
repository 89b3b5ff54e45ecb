#!/usr/bin/env python3
"""GGUF benchmark (issue 24): from a Hugging Face directory to a model loaded in llama.cpp, through
llmfs's GGUF views against llama.cpp's own tools. Prints markdown tables and writes
WORK/gguf-results-NcoresS.json.

Generates a bf16 LLaMA-shaped model of SIZE_MIB (examples/gen_model; vocabulary 32000) with a
byte-level BPE tokenizer (Llama-3 pre-tokenizer regex, trained as scripts/gguf_check.py does;
the converter pads the vocabulary to the model's with [PAD] tokens, as llmfs does) and registers
it in place (`llmfs add`). Then:
  converter   llama-cpp-python 0.3.36's vendored convert_hf_to_gguf.py (gguf_check.py's
              stand-ins: gguf.LazyChunkedTensor, the pre-tokenizer told, "llama-bpe") to q8_0,
              and to f16 followed by llama_model_quantize(Q4_K_M, nthread = cores) (ggml's
              llama-quantize); then the written file loaded (page cache warm: just written)
  llmfs       an empty disk cache, `llmfs mount` and the mounted MOUNT/base/gguf/base-TYPE.gguf
              loaded (its first open decodes it into the disk cache); then umount, mount again
              and the same load (served from the disk cache by passthrough)
A load is llama_cpp.Llama(path, n_ctx=64, n_threads=cores) (mmap) and one token generated
(create_completion, max_tokens=1), in a long-lived worker process (import time not counted).
A file's first open also starts the fills of the entry's other files (every GGUF type), ahead:
the remount's load runs beside those; a third load follows `llmfs warm base` (every file cached).
Fill rates: for each type (F16, BF16, Q8_0, Q4_0, Q4_K_M) alone, `llmfs export base OUT --gguf
TYPE` (the decode a fill runs, without FUSE), in GB/s of the GGUF file's bytes; and `llmfs warm
base` (every type at once).

usage: scripts/bench_gguf.py WORK SIZE_MIB [REPS]
  env: LLMFS, EXAMPLES (binaries, default target/release), LLAMA_CPP (the sdist's
  vendor/llama.cpp, default /tmp/llmfs-ci-llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp),
  BENCH_FILL=F16,BF16,Q8_0,Q4_0,Q4_K_M (the fill-rate types; empty: none), CONV_REPS (converter
  rounds, default 1; llmfs loads REPS, default 3), BENCH_WARM=0 (no `llmfs warm` rows). The
  results are saved after each step: `scripts/bench_gguf.py _table FILE` prints a cut-short run.
  needs: llama_cpp (llama-cpp-python 0.3.36), tokenizers, numpy, torch, gguf's deps (the
  converter's own gguf-py is used); scripts/gguf_check.py beside this file.
  Run under `taskset -c 0,1` for the 2-core table.
"""
import ctypes, json, os, re, shutil, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_load as bl  # noqa: E402  (Mount, sh, warm, files)

LLMFS, EXAMPLES = bl.LLMFS, bl.EXAMPLES
LLAMA_CPP = os.environ.get("LLAMA_CPP", "/tmp/llmfs-ci-llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
FILL_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M"]
PROMPT = "the quick brown fox jumps over"


def log(*a):
    print("#", *a, file=sys.stderr, flush=True)


def cores():
    return len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------------
# Child processes: the converter, ggml's quantizer, the llama.cpp load worker
# --------------------------------------------------------------------------------------------

def quantize_child(inp, out, ftype):
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = cores()
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


def load_worker():
    import llama_cpp
    n = cores()
    for line in sys.stdin:
        req = json.loads(line)
        t = time.perf_counter()
        try:
            llm = llama_cpp.Llama(model_path=req["path"], n_ctx=64, n_batch=64, n_threads=n,
                                  n_threads_batch=n, verbose=False)
            t_load = time.perf_counter() - t
            r = llm.create_completion(PROMPT, max_tokens=1, temperature=0.0)
            out = {"secs": time.perf_counter() - t, "load_secs": t_load, "token": r["choices"][0]["text"]}
            llm.close()
            del llm
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(out), flush=True)


class Loader:
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_lworker"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def load(self, path):
        self.p.stdin.write(json.dumps({"path": path}) + "\n")
        self.p.stdin.flush()
        r = json.loads(self.p.stdout.readline())
        if "error" in r:
            raise SystemExit(f"llama.cpp could not load {path}: {r['error']}")
        return r

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------

def setup(work, size_mib):
    import gguf_check as gc
    model, store = f"{work}/model", f"{work}/store"
    if not os.path.exists(f"{model}/config.json"):
        log(bl.sh(f"{EXAMPLES}/gen_model", model, str(size_mib)).strip())
    if not os.path.exists(f"{model}/tokenizer.json"):
        tok = gc.bpe_tokenizer(gc.LLAMA3_REGEX, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                               "<|begin_of_text|>")
        tok.save(f"{model}/tokenizer.json")
        with open(f"{model}/tokenizer_config.json", "w") as f:
            json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                       "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}, f)
        cfg = json.load(open(f"{model}/config.json"))
        cfg.update(bos_token_id=0, eos_token_id=1)
        json.dump(cfg, open(f"{model}/config.json", "w"), indent=1)
        gen = json.load(open(f"{model}/generation_config.json"))
        gen.update(bos_token_id=0, eos_token_id=1)
        json.dump(gen, open(f"{model}/generation_config.json", "w"))
    add_secs = None
    if not os.path.exists(f"{store}/registry.json"):
        add_secs = timed([LLMFS, "--store", store, "add", "base", model])
    info = bl.sh(LLMFS, "--store", store, "info", "base")
    if "Q4_K_M" not in info:
        raise SystemExit(f"llmfs shows no GGUF files for the model:\n{info}")
    return model, store, add_secs


def fill_line(store, name, since):
    """The daemon's 'disk cache: decoded NAME' log line after byte offset `since`: (bytes, secs)."""
    with open(f"{store}/llmfs.log", errors="replace") as f:
        f.seek(since)
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
    for line in reversed(text.splitlines()):
        if "disk cache: decoded" in line and name in line:
            b = re.search(r"bytes=(\d+)", line)
            s = re.search(r'secs="?([0-9.]+)', line)
            if b and s:
                return int(b.group(1)), float(s.group(1))
    return None


def fill_lines(store, since):
    """The files the daemon decoded after byte offset `since` of its log: names."""
    with open(f"{store}/llmfs.log", errors="replace") as f:
        f.seek(since)
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
    return re.findall(r"disk cache: decoded \S+/(\S+)", text)


def log_size(store):
    try:
        return os.path.getsize(f"{store}/llmfs.log")
    except OSError:
        return 0


def main():
    args = sys.argv[1:]
    work = os.path.abspath(args[0] if args else "/tmp/llmfs-gguf")
    size_mib = int(args[1]) if len(args) > 1 else 1000
    reps = int(args[2]) if len(args) > 2 else 3
    conv_reps = int(os.environ.get("CONV_REPS", 1))
    fill_types = [t for t in os.environ.get("BENCH_FILL", ",".join(FILL_TYPES)).split(",") if t]
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    model, store, add_secs = setup(work, size_mib)
    log(f"setup {time.perf_counter() - t0:.1f} s")
    mnt, cache = f"{work}/mnt", f"{work}/cache"
    bl.warm(bl.files(model))
    res = {"cores": cores(), "size_mib": size_mib, "reps": reps, "conv_reps": conv_reps, "add_secs": add_secs,
           "model_bytes": sum(os.path.getsize(f) for f in bl.files(model, "*.safetensors")),
           "converter": {}, "llmfs": {}, "fill": {}}
    conv = [sys.executable, os.path.abspath(__file__), "_convert", LLAMA_CPP, model]
    c = res["converter"]
    for _ in range(conv_reps):
        for t in ("q8_0", "f16"):
            out = f"{work}/conv-{t.upper()}.gguf"
            if os.path.exists(out):
                os.remove(out)
            secs = timed(conv + [out, t, "llama-bpe", "base"])
            c.setdefault(f"convert_{t}", []).append(secs)
            log(f"convert_hf_to_gguf {t}: {secs:.1f} s")
        out = f"{work}/conv-Q4_K_M.gguf"
        secs = timed([sys.executable, os.path.abspath(__file__), "_quantize", f"{work}/conv-F16.gguf", out, "Q4_K_M"])
        c.setdefault("quantize_q4_k_m", []).append(secs)
        log(f"llama_model_quantize Q4_K_M: {secs:.1f} s")
    save(work, res)
    L = Loader()
    L.load(f"{work}/conv-Q8_0.gguf")  # warm-up: llama.cpp's backend initialisation
    for t in ("Q8_0", "Q4_K_M"):
        path = f"{work}/conv-{t}.gguf"
        c[f"load_{t}"] = [L.load(path) for _ in range(reps)]
        c[f"bytes_{t}"] = os.path.getsize(path)
        log(f"load of the converter's {t}: {[round(x['secs'], 2) for x in c[f'load_{t}']]} s")
    for t in ("Q8_0", "Q4_K_M"):
        path = f"{mnt}/base/gguf/base-{t}.gguf"
        r = res["llmfs"][t] = []
        for _ in range(reps):
            shutil.rmtree(cache, ignore_errors=True)
            since = log_size(store)
            tm = time.perf_counter()
            m = bl.Mount(store, mnt, cache)
            mount_secs = time.perf_counter() - tm
            first = L.load(path)
            size = os.path.getsize(path)
            rss = m.rss()
            m.close()
            fill = fill_line(store, f"base-{t}.gguf", since)
            tm = time.perf_counter()
            m = bl.Mount(store, mnt, cache)
            remount_secs = time.perf_counter() - tm
            since = log_size(store)
            again = L.load(path)
            m.close()
            ahead = fill_lines(store, since)
            r.append({"mount_secs": mount_secs, "first": first, "remount_secs": remount_secs, "again": again,
                      "bytes": size, "fill": fill, "rss_mib": rss, "ahead": ahead})
            log(f"llmfs {t}: mount {mount_secs:.2f} s, first {first['secs']:.2f} s (fill {fill}), "
                f"remount {remount_secs:.2f} s, again {again['secs']:.2f} s (decoded meanwhile: {ahead}), "
                f"daemon RSS {rss}")
            save(work, res)
    # Every file of the entry in the disk cache (`llmfs warm`: what a remount finds once the first
    # open's fills of the other files are over), then the loads again.
    shutil.rmtree(cache, ignore_errors=True)
    warm = os.environ.get("BENCH_WARM", "1") == "1"
    if warm:
        res["warm_secs"] = timed([LLMFS, "--store", store, "warm", "base", "--disk-cache", cache])
        log(f"llmfs warm base (every GGUF type at once): {res['warm_secs']:.1f} s")
    for t in ("Q8_0", "Q4_K_M") if warm else ():
        path = f"{mnt}/base/gguf/base-{t}.gguf"
        for x in res["llmfs"][t]:
            tm = time.perf_counter()
            m = bl.Mount(store, mnt, cache)
            x["warm_mount_secs"] = time.perf_counter() - tm
            since = log_size(store)
            x["warm"] = L.load(path)
            m.close()
            log(f"llmfs {t}, all cached: mount {x['warm_mount_secs']:.2f} s, load {x['warm']['secs']:.2f} s "
                f"(decoded meanwhile: {fill_lines(store, since)})")
            save(work, res)
    L.close()
    shutil.rmtree(cache, ignore_errors=True)
    # Fill rate of each type alone: `llmfs export --gguf TYPE` (the same decode as a fill, no FUSE).
    for t in fill_types:
        out = f"{work}/export-{t}"
        shutil.rmtree(out, ignore_errors=True)
        secs = timed([LLMFS, "--store", store, "export", "base", out, "--gguf", t])
        n = sum(os.path.getsize(f) for f in bl.files(out) + bl.files(f"{out}/gguf"))
        shutil.rmtree(out, ignore_errors=True)
        res["fill"][t] = {"bytes": n, "secs": secs}
        log(f"export --gguf {t}: {n} B in {secs:.2f} s")
        save(work, res)
    shutil.rmtree(cache, ignore_errors=True)
    save(work, res)
    print_table(res)


def save(work, res):
    """The results so far: a run cut short still has its rows (`_table FILE`)."""
    with open(f"{work}/gguf-results-{res['cores']}cores.json", "w") as f:
        json.dump(res, f, indent=1)


def med(xs):
    return statistics.median(xs)


def vs(theirs, ours):
    return f"{theirs / ours:.2f}x faster" if theirs >= ours else f"{ours / theirs:.2f}x slower"


def print_table(res):
    c = res["converter"]
    gb = res["model_bytes"] / 1e9
    add = res.get("add_secs") or 0.0
    print(f"\n{res['cores']} cores, {res['size_mib']} MiB bf16 model ({gb:.2f} GB); seconds from the Hugging Face "
          f"directory to llama.cpp's Llama(path, n_ctx=64) + one token; medians ({res['conv_reps']} converter "
          f"round(s), {res['reps']} loads). llmfs first = `llmfs add` ({add:.2f} s, once) + mount + load of the "
          "mounted file, empty disk cache (it decodes that file only); after "
          "remount = mount + load, the file in the disk cache and the others decoded meanwhile; every file cached = "
          "after `llmfs warm base`. "
          "Converter = convert_hf_to_gguf.py (+ llama_model_quantize) + load of the written file (page cache warm)\n")
    print("| type | converter: convert | quantize | load | total | llmfs first (its fill) | vs converter | "
          "after remount | after remount, every file cached | load of the written file |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in ("Q8_0", "Q4_K_M"):
        if not res["llmfs"].get(t) or f"load_{t}" not in c:
            continue  # a run cut short
        conv = med(c["convert_q8_0"]) if t == "Q8_0" else med(c["convert_f16"])
        quant = med(c["quantize_q4_k_m"]) if t == "Q4_K_M" else 0.0
        load = med([x["secs"] for x in c[f"load_{t}"]])
        total = conv + quant + load
        L = res["llmfs"][t]
        first = add + med([x["mount_secs"] + x["first"]["secs"] for x in L])
        fills = [x["fill"][1] for x in L if x.get("fill")]
        fill = f" ({med(fills):.1f} s)" if fills else ""
        again = med([x["remount_secs"] + x["again"]["secs"] for x in L])
        again_load = med([x["again"]["secs"] for x in L])
        W = [x for x in L if "warm" in x]
        warm = med([x["warm_mount_secs"] + x["warm"]["secs"] for x in W]) if W else float("nan")
        warm_load = med([x["warm"]["secs"] for x in W]) if W else float("nan")
        print(f"| {t} ({L[0]['bytes'] / 1e9:.2f} GB) | {conv:.1f}{' (f16)' if t == 'Q4_K_M' else ''} | "
              f"{quant:.1f} | {load:.2f} | {total:.1f} | {first:.1f}{fill} | {vs(total, first)} | "
              f"{again:.2f} (load {again_load:.2f}) | {warm:.2f} (load {warm_load:.2f}) | {load:.2f} |")
    if res["fill"]:
        print(f"\n{res['cores']} cores: fill rate of each GGUF type alone (`llmfs export base OUT --gguf TYPE`, "
              f"the decode a fill runs, no FUSE), GB/s of the GGUF file's bytes; `llmfs warm base` (every type "
              f"at once): {res.get('warm_secs', float('nan')):.1f} s\n")
        print("| type | GGUF size | seconds | GB/s |")
        print("|---|---|---|---|")
        for t, f in res["fill"].items():
            print(f"| {t} | {f['bytes'] / 1e9:.2f} GB | {f['secs']:.1f} | {f['bytes'] / f['secs'] / 1e9:.2f} |")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_lworker":
        load_worker()
    elif len(sys.argv) > 1 and sys.argv[1] == "_convert":
        import gguf_check
        gguf_check.convert_child(*sys.argv[2:8])
    elif len(sys.argv) > 1 and sys.argv[1] == "_quantize":
        quantize_child(*sys.argv[2:5])
    elif len(sys.argv) > 2 and sys.argv[1] == "_table":
        print_table(json.load(open(sys.argv[2])))
    else:
        main()
