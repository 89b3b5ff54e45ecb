#!/usr/bin/env python3
"""Benchmark llmfs deltas against FastChat's make_delta / apply_delta and ZipNN (issue 5, "Benchmark").

What it measures, all in one run on this machine, on a generated >= 0.5B-parameter bf16
LLaMA-shaped model (`gen_model`, ~1.1 GB, 2 shards, LlamaForCausalLM config, plus the tiny
offline tokenizer of tests/data/fastchat_delta/base so that FastChat can load it) and a synthetic
fine-tune of it (`gen_finetune BASE OUT 0.01`: every float weight + N(0, 0.01*0.02), i.e. ~1% of
the weights' std, rounded to bf16):

* `llmfs delta make` with --codec lossless, q8 and bitdelta: wall time and peak RSS;
  FastChat's `make_delta(base, target, delta)` (fschat 0.2.36, unmodified): wall time and peak RSS.
* writing into deltas/ through a real mount (`llmfs mount --foreground`, then
  `mkdir MP/base/deltas/NEW && cp -r TARGET/. MP/base/deltas/NEW/`): time of mkdir + cp; the
  daemon's peak RSS (VmHWM). Target: >= 5x faster than make_delta. Every file read back through
  MP/NEW/ is compared byte for byte with TARGET.
* `llmfs export` of each delta variant (time, peak RSS) vs FastChat's `apply_delta(base, out,
  delta)`. Targets (lossless variant): >= 10x faster, <= 1/8 of apply_delta's peak RSS. The
  lossless export is checked byte-identical to TARGET.
* `llmfs delta import fc --base base --from FASTCHAT_DELTA --format fastchat` and its export
  (time, RSS); every tensor of that export is compared bit for bit with apply_delta's output.
* compression ratio of each codec: target bytes (sum of TARGET's file sizes) / `stored_bytes` of
  `llmfs info NAME --json`; max abs error of the lossy codecs (and of the FastChat path), exported
  tensors vs TARGET's in f64 (bf16 viewed as uint16 and shifted to f32).
* a real fine-tune (`--real-steps`, default 20; 0 skips it): `scripts/real_finetune.py` trains a
  smaller generated base (`--real-size-mib`, default 400) with AdamW on the repository's docs (see
  its docstring; the base is randomly initialised, nothing pretrained can be downloaded here); then
  `llmfs delta make` with each codec on that pair: ratio, max error of the lossy codecs, and ZipNN
  on its XOR delta. Results in their own section.
* ZipNN (pip package zipnn): the XOR delta of the same bf16 pair (uint16 views of each tensor
  xor-ed, concatenated in tensor-name order) compressed with ZipNN's default bf16 settings
  (`ZipNN(bytearray_dtype="bfloat16")`, i.e. method AUTO, byte input, zstd level 3) and checked to
  decompress back; its ratio next to llmfs lossless. Target: llmfs >= 1.2x smaller.
  ZipNN 0.5.4 quirk: `compress` rotates the sign bit of every bf16 of its input buffer in place
  (even of an immutable `bytes`), so it is given a copy; comparing the round trip with the
  (mutated) original would wrongly report a failure.

Every timed step runs as a subprocess under `/usr/bin/time -v` (peak RSS = "Maximum resident
set size") and is run twice (the machine is shared and noisy): the table shows the better
(smaller) time of the two runs and the larger peak RSS of the two.

Needs:
* the crate built in release mode: `cargo build --release --bins --examples` (the script does it
  unless --no-build; a failing build is retried a few times, other people may be mid-edit);
* FUSE (/dev/fuse, fusermount3) for the mount part;
* a Python with torch (CPU), fschat 0.2.36, transformers, accelerate, numpy for FastChat
  (`--fastchat-python`, default /tmp/fcq/bin/python; see scripts/fastchat_quant_check.py for
  how that venv is made). FastChat's module-global `args.hub_repo_id` only exists under
  __main__, so it is set to Namespace(hub_repo_id=None) first (as scripts/fastchat_delta_check.py
  does); nothing else is patched. make_delta loading both models with
  `AutoModelForCausalLM.from_pretrained(DIR, torch_dtype=torch.float16)` doubles as the check
  that the generated model is a loadable LLaMA;
* a Python with zipnn and numpy (`--zipnn-python`, default /tmp/bdz/bin/python); if it does not
  exist the script makes it: `python3 -m venv /tmp/bdz && /tmp/bdz/bin/pip install zipnn numpy`.
  If that fails, the reason is printed and written in the results instead of the ZipNN ratio;
* about 12 GB free under --work (default /tmp/llmfs_bench_delta), ~10 GB RAM.

Run from the repository root with the FastChat venv's Python (the driver itself needs numpy):

    /tmp/fcq/bin/python scripts/bench_delta.py            # full run, ~15-20 min on 2 cores (3-4 of them the real fine-tune)
    /tmp/fcq/bin/python scripts/bench_delta.py --size-mib 300 --reps 1   # quicker smoke run

It prints one markdown table and writes it, with the machine (nproc, CPU model, memory, date)
and the versions, to scripts/bench_delta_results.md. The work directory (models, store, exports,
FastChat outputs: ~10 GB) is deleted at the end unless --keep; nothing big is written in the repo.
"""

import argparse
import datetime
import filecmp
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
LLMFS = os.path.join(REPO, "target", "release", "llmfs")
GEN_MODEL = os.path.join(REPO, "target", "release", "examples", "gen_model")
GEN_FINETUNE = os.path.join(REPO, "target", "release", "examples", "gen_finetune")
TOKENIZER_SRC = os.path.join(REPO, "tests", "data", "fastchat_delta", "base")
RESULTS = os.path.join(REPO, "scripts", "bench_delta_results.md")
MiB = 1 << 20


# ----------------------------------------------------------------------------- safetensors helpers


def st_index(d):
    """name -> (path, start, end, dtype, shape) for every tensor of every *.safetensors in d."""
    out = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        p = os.path.join(d, f)
        with open(p, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            hdr = json.loads(fh.read(n))
        hdr.pop("__metadata__", None)
        for k, v in hdr.items():
            s, e = v["data_offsets"]
            out[k] = (p, 8 + n + s, 8 + n + e, v["dtype"], tuple(v["shape"]))
    return out


def st_raw(entry):
    import numpy as np

    p, s, e, _, _ = entry
    if e == s:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(p, dtype=np.uint8, mode="r", offset=s, shape=(e - s,))


def to_f64(raw, dtype):
    import numpy as np

    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "F16":
        return raw.view("<f2").astype(np.float64)
    if dtype == "F32":
        return raw.view("<f4").astype(np.float64)
    raise ValueError(f"dtype {dtype}")


def max_abs_err(out_dir, ref_dir):
    """Max |out - ref| over all tensors (f64), and the same of |ref - base| is not needed here."""
    a, b = st_index(out_dir), st_index(ref_dir)
    assert set(a) == set(b), f"tensor names differ between {out_dir} and {ref_dir}"
    m = 0.0
    for k in sorted(a):
        x, y = to_f64(st_raw(a[k]), a[k][3]), to_f64(st_raw(b[k]), b[k][3])
        if x.size:
            m = max(m, float(abs(x - y).max()))
    return m


def param_count(d):
    n = 0
    for _, _, _, _, shape in st_index(d).values():
        c = 1
        for s in shape:
            c *= s
        n += c
    return n


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))


def dirs_identical(a, b):
    fa = sorted(f for f in os.listdir(a) if os.path.isfile(os.path.join(a, f)))
    fb = sorted(f for f in os.listdir(b) if os.path.isfile(os.path.join(b, f)))
    if fa != fb:
        return False, f"file lists differ: {fa} vs {fb}"
    for f in fa:
        if not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False):
            return False, f"{f} differs"
    return True, f"{len(fa)} files identical"


# ----------------------------------------------------------------------------- child modes


def child_fastchat(op, a, b, c):
    import fastchat.model.apply_delta as fc_apply
    import fastchat.model.make_delta as fc_make

    fc_make.args = argparse.Namespace(hub_repo_id=None)  # see the module docstring
    if op == "make":
        fc_make.make_delta(a, b, c)
    else:
        fc_apply.apply_delta(a, b, c)


def child_zipnn(base_dir, target_dir, out_json):
    import numpy as np
    import zipnn

    try:
        from importlib.metadata import version

        zver = version("zipnn")
    except Exception:
        zver = getattr(zipnn, "__version__", "?")
    bi, ti = st_index(base_dir), st_index(target_dir)
    parts = []
    for k in sorted(ti):
        assert k in bi and bi[k][3] == ti[k][3] == "BF16" and bi[k][4] == ti[k][4], k
        parts.append(st_raw(ti[k]).view("<u2") ^ st_raw(bi[k]).view("<u2"))
    xor = np.concatenate(parts).tobytes()
    del parts
    z = zipnn.ZipNN(bytearray_dtype="bfloat16")  # defaults: method AUTO, input_format byte, zstd 3
    work = bytearray(xor)  # zipnn 0.5.4's compress rotates the sign bits of its input in place (even of a
    t0 = time.perf_counter()  # `bytes`), so give it a copy and keep `xor` pristine for the round-trip check
    comp = z.compress(work)
    t_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = zipnn.ZipNN(bytearray_dtype="bfloat16").decompress(comp)
    t_d = time.perf_counter() - t0
    ok = bytes(back) == xor
    res = {"version": zver, "raw_bytes": len(xor), "compressed_bytes": len(comp), "compress_s": t_c,
           "decompress_s": t_d, "roundtrip_ok": ok}
    with open(out_json, "w") as fh:
        json.dump(res, fh)
    print(json.dumps(res))
    return 0 if ok else 1


# ----------------------------------------------------------------------------- driver helpers


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = os.path.abspath(args.work)
        self.logs = os.path.join(self.work, "logs")
        self.store = os.path.join(self.work, "store")
        self.n = 0

    def log(self, msg):
        print(f"[bench_delta {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def sh(self, cmd, check=True, timed=True):
        """Run cmd (a list) under /usr/bin/time -v; return (wall seconds, peak RSS in bytes)."""
        self.n += 1
        logp = os.path.join(self.logs, f"{self.n:03d}_{os.path.basename(cmd[0])}.log")
        full = (["/usr/bin/time", "-v"] if timed else []) + cmd
        t0 = time.perf_counter()
        with open(logp, "w") as lf:
            lf.write("$ " + " ".join(cmd) + "\n")
            lf.flush()
            r = subprocess.run(full, stdout=lf, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
        txt = open(logp, errors="replace").read()
        if check and r.returncode != 0:
            raise RuntimeError(f"command failed (rc {r.returncode}): {' '.join(cmd)}\n--- {logp} (tail) ---\n{txt[-3000:]}")
        rss = None
        m = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", txt)
        if m:
            rss = int(m[-1]) * 1024
        cpu = sum(float(x[-1]) for x in (re.findall(r"(User|System) time \(seconds\): ([\d.]+)", txt)[-2:]))
        self.last_cpu = cpu
        return dt, rss, r.returncode

    def best(self, label, make_cmd, reps=None, between=None):
        """Run make_cmd(rep) reps times; return (min time, max RSS, CPU seconds of the fastest run)."""
        reps = reps or self.a.reps
        ts, rs = [], []
        for rep in range(reps):
            if between and rep:
                between(rep)
            dt, rss, _ = self.sh(make_cmd(rep))
            self.log(f"{label} run {rep + 1}: {dt:.2f} s (cpu {self.last_cpu:.2f} s), peak RSS {rss / MiB:.0f} MiB")
            ts.append((dt, self.last_cpu))
            rs.append(rss)
        return min(ts)[0], max(rs), min(ts)[1]

    def llmfs(self, *args):
        return [LLMFS, "--store", self.store, *args]

    def info(self, name):
        out = subprocess.run(self.llmfs("info", name, "--json"), capture_output=True, text=True, check=True).stdout
        return json.loads(out)


def build(bench):
    for attempt in range(1, 6):
        r = subprocess.run(["cargo", "build", "--release", "--bins", "--examples"], cwd=REPO,
                           capture_output=True, text=True)
        if r.returncode == 0:
            return
        bench.log(f"cargo build failed (attempt {attempt}/5), retrying in 120 s:\n{r.stderr[-1500:]}")
        time.sleep(120)
    raise RuntimeError("cargo build --release keeps failing")


def ensure_zipnn_python(bench):
    py = bench.a.zipnn_python
    if os.path.exists(py):
        return py, None
    venv = os.path.dirname(os.path.dirname(py))
    bench.log(f"making a zipnn venv at {venv}")
    for cmd in (["python3", "-m", "venv", venv],
                [os.path.join(venv, "bin", "pip"), "install", "-q", "zipnn", "numpy"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"`{' '.join(cmd)}` failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()[-600:]}"
    return py, None


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem": mem, "kernel": platform.release(),
            "load": os.getloadavg()[1],
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


def versions(fc_py):
    code = ("import torch, transformers, fastchat, sys; "
            "print(sys.version.split()[0], torch.__version__, transformers.__version__, fastchat.__version__)")
    try:
        out = subprocess.run([fc_py, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
        return dict(zip(("python", "torch", "transformers", "fschat"), out))
    except Exception:
        return {}


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "Cargo.toml"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes in src/" if dirty else "")
    except Exception:
        return "?"


# ----------------------------------------------------------------------------- the benchmark


def run(bench):
    a = bench.a
    W = bench.work
    R = {}  # results
    if os.path.exists(W):
        shutil.rmtree(W)
    os.makedirs(bench.logs)
    base, target = os.path.join(W, "base"), os.path.join(W, "target")

    # --- models
    bench.log(f"generating base ({a.size_mib} MiB bf16) and fine-tune (scale {a.scale})")
    subprocess.run([GEN_MODEL, base, str(a.size_mib)], check=True, stdout=subprocess.DEVNULL)
    for f in os.listdir(TOKENIZER_SRC):
        if f.startswith("tokenizer") and f.endswith(".json"):
            shutil.copy(os.path.join(TOKENIZER_SRC, f), os.path.join(base, f))  # before gen_finetune: it copies non-weights
    subprocess.run([GEN_FINETUNE, base, target, str(a.scale)], check=True, stdout=subprocess.DEVNULL)
    cfg = json.load(open(os.path.join(base, "config.json")))
    R["params"] = param_count(base)
    R["layers"] = cfg["num_hidden_layers"]
    R["target_bytes"] = dir_bytes(target)
    R["shards"] = len([f for f in os.listdir(base) if f.endswith(".safetensors")])
    bench.log(f"{R['params'] / 1e9:.3f} B params, {R['layers']} layers, target {R['target_bytes'] / MiB:.0f} MiB")
    subprocess.run(bench.llmfs("add", "base", base), check=True, stdout=subprocess.DEVNULL)

    # --- the disk's floor: writing the target's size durably (llmfs fsyncs what it writes; torch does not)
    ddf = os.path.join(W, "dd.bin")
    R["dd_fsync"] = bench.best("dd conv=fsync (target size)", lambda rep: [
        "dd", "if=/dev/zero", f"of={ddf}", "bs=8M", f"count={-(-R['target_bytes'] // (8 * MiB))}", "conv=fsync"],
        between=lambda rep: os.remove(ddf))
    os.remove(ddf)

    # --- llmfs delta make, three codecs
    for codec in ("lossless", "q8", "bitdelta"):
        name = f"ft_{codec}"

        def cmd(rep, codec=codec, name=name):
            return bench.llmfs("delta", "make", name if rep == 0 else f"{name}_r{rep}", "--base", "base",
                               "--target", target, "--codec", codec)

        R[f"make_{codec}"] = bench.best(f"llmfs delta make --codec {codec}", cmd)
        for rep in range(1, a.reps):
            subprocess.run(bench.llmfs("rm", f"{name}_r{rep}"), check=True, stdout=subprocess.DEVNULL)
        R[f"stored_{codec}"] = bench.info(name)["recipe"]["stored_bytes"]

    # --- FastChat make_delta
    fc_delta = os.path.join(W, "fc_delta")

    def fc_make(rep):
        d = fc_delta if rep == 0 else f"{fc_delta}_r{rep}"
        return [a.fastchat_python, os.path.abspath(__file__), "_fastchat", "make", base, target, d]

    R["make_fastchat"] = bench.best("FastChat make_delta", fc_make)
    for rep in range(1, a.reps):
        shutil.rmtree(f"{fc_delta}_r{rep}", ignore_errors=True)

    # --- writing into deltas/ through a real mount
    mp = os.path.join(W, "mnt")
    os.makedirs(mp)
    mlog = open(os.path.join(bench.logs, "mount.log"), "w")
    daemon = subprocess.Popen(bench.llmfs("mount", mp, "--foreground"), stdout=mlog, stderr=subprocess.STDOUT)
    try:
        t_end = time.time() + 60
        while not os.path.ismount(mp):
            if daemon.poll() is not None or time.time() > t_end:
                raise RuntimeError(f"mount did not come up (see {mlog.name})")
            time.sleep(0.2)
        ts = []

        def daemon_cpu():
            f = open(f"/proc/{daemon.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

        for rep in range(a.reps):
            name = f"ft_mnt{rep}"
            c0, r0 = daemon_cpu(), os.times()
            t0 = time.perf_counter()
            os.mkdir(os.path.join(mp, "base", "deltas", name))
            subprocess.run(["cp", "-r", target + "/.", os.path.join(mp, "base", "deltas", name) + "/"], check=True)
            ts.append((time.perf_counter() - t0, daemon_cpu() - c0, os.times().children_system - r0.children_system
                       + os.times().children_user - r0.children_user))
            bench.log(f"mount write (mkdir + cp -r) run {rep + 1}: {ts[-1][0]:.2f} s (daemon cpu {ts[-1][1]:.2f} s, cp cpu {ts[-1][2]:.2f} s)")
        # The writes' peak, before the read-back check fills the daemon's read cache (1 GiB).
        hwm = None
        for line in open(f"/proc/{daemon.pid}/status"):
            if line.startswith("VmHWM"):
                hwm = int(line.split()[1]) * 1024
        ok, why = dirs_identical(os.path.join(mp, "ft_mnt0"), target)
        R["mnt_readback"] = (ok, why)
        bench.log(f"read back through the mount vs target: {why}")
        best = min(ts)
        R["mnt_write"] = (best[0], hwm, best[1] + best[2])
    finally:
        subprocess.run([LLMFS, "umount", mp], stdout=mlog, stderr=subprocess.STDOUT)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.terminate()
            daemon.wait(timeout=30)
        mlog.close()
    R["stored_mnt"] = bench.info("ft_mnt0")["recipe"]["stored_bytes"]

    # --- exports of the llmfs variants
    exports = {}
    for codec in ("lossless", "q8", "bitdelta"):
        out = os.path.join(W, f"exp_{codec}")
        R[f"export_{codec}"] = bench.best(
            f"llmfs export ft_{codec}", lambda rep, codec=codec, out=out: bench.llmfs("export", f"ft_{codec}", out),
            between=lambda rep, out=out: shutil.rmtree(out))
        exports[codec] = out
    R["lossless_identical"] = dirs_identical(exports["lossless"], target)
    bench.log(f"lossless export vs target: {R['lossless_identical'][1]}")
    for codec in ("q8", "bitdelta"):
        R[f"err_{codec}"] = max_abs_err(exports[codec], target)
        shutil.rmtree(exports[codec])
    shutil.rmtree(exports["lossless"])
    R["delta_maxabs"] = max_abs_err(target, base)  # scale of what the lossy codecs approximate

    # --- FastChat apply_delta
    fc_applied = os.path.join(W, "fc_applied")
    R["apply_fastchat"] = bench.best(
        "FastChat apply_delta",
        lambda rep: [a.fastchat_python, os.path.abspath(__file__), "_fastchat", "apply", base, fc_applied, fc_delta],
        between=lambda rep: shutil.rmtree(fc_applied))

    # --- llmfs import of FastChat's delta, and its export
    R["import_fastchat"] = bench.best(
        "llmfs delta import --format fastchat",
        lambda rep: bench.llmfs("delta", "import", "fc" if rep == 0 else f"fc_r{rep}", "--base", "base",
                                "--from", fc_delta, "--format", "fastchat"))
    for rep in range(1, a.reps):
        subprocess.run(bench.llmfs("rm", f"fc_r{rep}"), check=True, stdout=subprocess.DEVNULL)
    R["stored_fc"] = bench.info("fc")["recipe"].get("stored_bytes")
    exp_fc = os.path.join(W, "exp_fc")
    R["export_fc"] = bench.best("llmfs export fc", lambda rep: bench.llmfs("export", "fc", exp_fc),
                                between=lambda rep: shutil.rmtree(exp_fc))
    # bit-for-bit vs apply_delta's output, every tensor (shard layouts may differ: match by name)
    import numpy as np

    ei, ai = st_index(exp_fc), st_index(fc_applied)
    same, diff = 0, []
    for k in sorted(ai):
        if k not in ei or ei[k][3] != ai[k][3] or ei[k][4] != ai[k][4] or not np.array_equal(st_raw(ei[k]), st_raw(ai[k])):
            diff.append(k)
        else:
            same += 1
    extra = sorted(set(ei) - set(ai))
    R["fc_bitexact"] = (not diff and not extra, f"{same}/{len(ai)} tensors bit-identical to apply_delta's"
                        + (f"; differ: {diff[:5]}" if diff else "") + (f"; extra in export: {extra[:5]}" if extra else ""))
    bench.log(R["fc_bitexact"][1])
    R["err_fc"] = max_abs_err(exp_fc, target)
    shutil.rmtree(exp_fc)
    R["fc_delta_bytes"] = dir_bytes(fc_delta)

    # --- ZipNN on the XOR delta of the same pair
    zpy, why = ensure_zipnn_python(bench)
    R["zipnn"] = None
    R["zipnn_error"] = why
    if zpy:
        R["zipnn"], R["zipnn_error"] = run_zipnn(bench, zpy, base, target, "zipnn.json")

    # --- a real (AdamW-trained) fine-tune of a smaller generated base: ratios and lossy errors
    if a.real_steps > 0:
        try:
            real_finetune(bench, R, zpy)
        except Exception as e:  # keep the main results whatever happens here
            R["real_error"] = f"{type(e).__name__}: {e}"[-1500:]
            bench.log(f"real fine-tune failed: {R['real_error']}")
    return R


def real_finetune(bench, R, zpy):
    """scripts/real_finetune.py on a small generated base, then every codec on that pair."""
    a, W = bench.a, bench.work
    rbase, rft = os.path.join(W, "rbase"), os.path.join(W, "rft")
    subprocess.run([GEN_MODEL, rbase, str(a.real_size_mib)], check=True, stdout=subprocess.DEVNULL)
    for f in os.listdir(TOKENIZER_SRC):
        if f.startswith("tokenizer") and f.endswith(".json"):
            shutil.copy(os.path.join(TOKENIZER_SRC, f), os.path.join(rbase, f))
    bench.log(f"real fine-tune: {a.real_steps} AdamW steps on a {a.real_size_mib} MiB generated base (CPU)")
    out = subprocess.run([a.fastchat_python, os.path.join(REPO, "scripts", "real_finetune.py"), rbase, rft,
                          "--steps", str(a.real_steps), "--seq", "64", "--batch", "2"],
                         capture_output=True, text=True, check=True).stdout
    RF = json.loads(out.strip().splitlines()[-1])
    RF["params"] = param_count(rbase)
    RF["target_bytes"] = dir_bytes(rft)
    RF["delta_maxabs"] = max_abs_err(rft, rbase)
    bench.log(f"real fine-tune: {RF}")
    subprocess.run(bench.llmfs("add", "rbase", rbase), check=True, stdout=subprocess.DEVNULL)
    for codec in ("lossless", "q8", "bitdelta"):
        name = f"rft_{codec}"
        dt, rss, _ = bench.sh(bench.llmfs("delta", "make", name, "--base", "rbase", "--target", rft, "--codec", codec))
        RF[f"make_{codec}"] = dt
        RF[f"stored_{codec}"] = bench.info(name)["recipe"]["stored_bytes"]
        exp = os.path.join(W, f"rexp_{codec}")
        bench.sh(bench.llmfs("export", name, exp))
        if codec == "lossless":
            RF["lossless_identical"] = dirs_identical(exp, rft)
        else:
            RF[f"err_{codec}"] = max_abs_err(exp, rft)
        shutil.rmtree(exp)
    RF["zipnn"] = run_zipnn(bench, zpy, rbase, rft, "zipnn_real.json")[0] if zpy else None
    R["real"] = RF


def run_zipnn(bench, zpy, base, target, out_name):
    """ZipNN on the XOR delta of base and target (this script's `_zipnn` mode, under ZipNN's
    Python): (its results with the peak RSS, None), or (None, why it failed)."""
    zj = os.path.join(bench.work, out_name)
    _, rss, rc = bench.sh([zpy, os.path.abspath(__file__), "_zipnn", base, target, zj], check=False)
    if rc == 0 and os.path.exists(zj):
        result = json.load(open(zj))
        result["rss"] = rss
        return result, None
    txt = open(os.path.join(bench.logs, f"{bench.n:03d}_{os.path.basename(zpy)}.log"), errors="replace").read()
    txt = txt.split("\tCommand being timed")[0]  # drop /usr/bin/time's report
    return None, f"ZipNN run failed (rc {rc}): {' '.join(txt.split())[-800:]}"


# ----------------------------------------------------------------------------- report


def report(R, a, mach, vers):
    tb = R["target_bytes"]

    def mib(x):
        return "" if x is None else f"{x / MiB:,.0f}"

    def ratio(stored):
        return "" if not stored else f"{tb / stored:.2f}x"

    fc_t, fc_r, fc_c = R["make_fastchat"]
    ap_t, ap_r, ap_c = R["apply_fastchat"]
    rows = []

    def row(what, t=None, rss=None, stored=None, rat="", err="", vs="", cpu=None):
        rows.append(f"| {what} | {'' if t is None else f'{t:.2f}'} | {'' if cpu is None else f'{cpu:.2f}'} | {mib(rss)} "
                    f"| {mib(stored)} | {rat} | {err} | {vs} |")

    def chk(ok):
        return "met" if ok else "**MISSED**"

    for codec in ("lossless", "q8", "bitdelta"):
        t, r, c = R[f"make_{codec}"]
        err = "0 (bit-exact)" if codec == "lossless" else f"{R[f'err_{codec}']:.3g}"
        row(f"`llmfs delta make --codec {codec}`", t, r, R[f"stored_{codec}"], ratio(R[f"stored_{codec}"]), err,
            f"{fc_t / t:.1f}x faster than make_delta", c)
    row("FastChat `make_delta` (f16 delta)", fc_t, fc_r, R["fc_delta_bytes"], ratio(R["fc_delta_bytes"]), "", "baseline", fc_c)
    t, hwm, c = R["mnt_write"]
    s = fc_t / t
    row("write into `deltas/` via mount (`mkdir` + `cp -r`); RSS = daemon VmHWM; CPU = daemon + cp", t, hwm, R["stored_mnt"],
        ratio(R["stored_mnt"]), "0 (read back identical)" if R["mnt_readback"][0] else f"**{R['mnt_readback'][1]}**",
        f"{s:.1f}x faster than make_delta (target >= 5x: {chk(s >= 5)})", c)
    for codec in ("lossless", "q8", "bitdelta"):
        t, r, c = R[f"export_{codec}"]
        vs = f"{ap_t / t:.1f}x faster, {r / ap_r:.3f} of its RSS"
        if codec == "lossless":
            vs += (f" (targets >= 10x: {chk(ap_t / t >= 10)}; <= 1/8 RSS: {chk(r <= ap_r / 8)})")
            err = "0 (bytes = target)" if R["lossless_identical"][0] else f"**{R['lossless_identical'][1]}**"
        else:
            err = f"{R[f'err_{codec}']:.3g}"
        row(f"`llmfs export ft_{codec}`", t, r, None, "", err, vs, c)
    row("FastChat `apply_delta` (writes f16)", ap_t, ap_r, None, "", f"{R['err_fc']:.3g} (f16 vs bf16 target)", "baseline", ap_c)
    t, r, c = R["import_fastchat"]
    row("`llmfs delta import fc --format fastchat`", t, r, R["stored_fc"], ratio(R["stored_fc"]), "", "", c)
    t, r, c = R["export_fc"]
    row("`llmfs export fc` (FastChat delta applied on read)", t, r, None, "",
        f"{R['err_fc']:.3g}; {'bit-identical to apply_delta' if R['fc_bitexact'][0] else '**' + R['fc_bitexact'][1] + '**'}",
        f"{ap_t / t:.1f}x faster, {r / ap_r:.3f} of its RSS", c)
    t, r, c = R["dd_fsync"]
    row("floor: `dd if=/dev/zero bs=8M conv=fsync` of the target's size", t, r, None, "", "",
        "what durably writing 1x the model costs on this disk", c)
    z = R["zipnn"]
    if z:
        ll = R["stored_lossless"]
        f = z["compressed_bytes"] / ll
        row(f"ZipNN {z['version']} default bf16 on the XOR delta (compress only, in-process)", z["compress_s"],
            z.get("rss"), z["compressed_bytes"], f"{z['raw_bytes'] / z['compressed_bytes']:.2f}x",
            "0 (round trip ok)" if z["roundtrip_ok"] else "**round trip failed**",
            f"llmfs lossless is {f:.2f}x smaller (target >= 1.2x: {chk(f >= 1.2)})")
    else:
        row("ZipNN on the XOR delta", None, None, None, "", "", f"**not measured**: {R['zipnn_error']}")

    head = ("| step | time s (best of %d) | CPU s (user+sys) | peak RSS MiB | stored MiB | ratio (target / stored) | max abs error vs target | vs FastChat / ZipNN |\n"
            "|---|---:|---:|---:|---:|---:|---|---|" % a.reps)
    table = head + "\n" + "\n".join(rows)
    model = (f"model: generated LlamaForCausalLM, {R['params'] / 1e9:.3f} B parameters, {R['layers']} layers "
             f"(hidden 2048, intermediate 5504, vocab 32000), bf16, {R['shards']} shards, "
             f"{tb / MiB:,.0f} MiB; fine-tune: every float weight + N(0, {a.scale} * 0.02) (~{a.scale * 100:g}% of the "
             f"weights' std), rounded to bf16; max |target - base| = {R['delta_maxabs']:.3g}")
    return table, model


def real_section(R):
    if R.get("real_error"):
        return f"\n## A real fine-tune\n\n**Failed**: {R['real_error']}\n"
    RF = R.get("real")
    if not RF:
        return ""
    tb = RF["target_bytes"]
    rows = []
    for codec in ("lossless", "q8", "bitdelta"):
        st = RF[f"stored_{codec}"]
        if codec == "lossless":
            err = "0 (export = target)" if RF["lossless_identical"][0] else f"**{RF['lossless_identical'][1]}**"
        else:
            err = f"{RF[f'err_{codec}']:.3g}"
        rows.append(f"| `llmfs delta make --codec {codec}` | {RF[f'make_{codec}']:.2f} | {st / MiB:,.1f} | {tb / st:.2f}x | {err} |")
    z = RF.get("zipnn")
    if z:
        f = z["compressed_bytes"] / RF["stored_lossless"]
        rows.append(f"| ZipNN {z['version']} default bf16 on the XOR delta | {z['compress_s']:.2f} | {z['compressed_bytes'] / MiB:,.1f} "
                    f"| {z['raw_bytes'] / z['compressed_bytes']:.2f}x (of the XOR delta) | llmfs lossless {f:.2f}x smaller |")
    return f"""
## A real fine-tune (optimizer-trained delta on a synthetic base)

No pretrained model can be downloaded on this machine (Hugging Face is not reachable), so the
base here is **randomly initialised** (`gen_model`, {RF['params'] / 1e9:.3f} B parameters, bf16) and the
fine-tune is real training of it: `scripts/real_finetune.py` ran {RF['steps']} AdamW steps (lr {RF['lr']:g},
weight decay 0.01, batch {RF['batch']} x {RF['seq']} tokens, f32 master weights, saved as bf16) of the causal-LM
loss on the repository's own documentation ({RF['corpus_bytes']:,} bytes, byte-level tokens) on the CPU in
{RF['train_s']:.0f} s; loss {RF['loss_first']:.3f} -> {RF['loss_last']:.3f}. {RF['weights_changed']:,} of {RF['weights_total']:,} weights
({100 * RF['weights_changed'] / RF['weights_total']:.1f} %) differ from the base in bf16; max |target - base| = {RF['delta_maxabs']:.3g}.
So this is a genuinely optimizer-trained delta (shaped by gradients and Adam's normalisation,
untouched embedding rows of unused tokens) — but of a random base, not of a pretrained model.

| codec | time s | stored MiB | ratio (target {tb / MiB:,.0f} MiB / stored) | max abs error vs target |
|---|---:|---:|---:|---|
""" + "\n".join(rows) + "\n"


def write_results(table, model, R, a, mach, vers):
    cmd = "/tmp/fcq/bin/python scripts/bench_delta.py" + ("" if (a.size_mib, a.reps, a.scale) == (1100, 2, 0.01)
                                                          else f" --size-mib {a.size_mib} --reps {a.reps} --scale {a.scale}")
    zline = f"ZipNN {R['zipnn']['version']}" if R.get("zipnn") else f"ZipNN: not measured — {R.get('zipnn_error')}"
    text = f"""# llmfs deltas vs FastChat make_delta / apply_delta and ZipNN

Generated by `scripts/bench_delta.py` (`{cmd}` from the repository root); see its docstring for
exactly what each row runs. Every timed step ran as a subprocess under `/usr/bin/time -v`,
{a.reps} time(s) each; the table shows the best (smallest) wall time and the largest peak RSS of the runs.

* machine: {mach['nproc']} CPUs (`nproc`), CPU "{mach['cpu']}", {mach['mem']} RAM, Linux {mach['kernel']};
  load average (5 min) {mach['load']:.2f} at the start and {os.getloadavg()[1]:.2f} at the end (other work on
  the machine makes the times noisy; the CPU column does not depend on it). Date: {mach['date']}.
* llmfs: release build of commit {git_rev()}; CPU backend.
* FastChat: fschat {vers.get('fschat', '?')}, torch {vers.get('torch', '?')} (CPU), transformers {vers.get('transformers', '?')},
  python {vers.get('python', '?')}; {zline}.
* {model}

{table}

Notes:
* ratio = bytes of the target directory ({R['target_bytes']:,} B, all files) / `stored_bytes` of
  `llmfs info NAME --json`; for FastChat's delta, the size of the directory make_delta writes (f16, so
  it is ~1x of the bf16 target); for ZipNN, XOR-delta bytes / ZipNN's compressed bytes.
* max abs error: f64 comparison of every exported tensor with the target's (bf16 -> f32 exact). The
  FastChat path is lossy by design: make_delta and apply_delta work in f16, so its output is f16 and
  differs from the bf16 target; llmfs's import reproduces apply_delta's output bit for bit.
* mount write: `mkdir MP/base/deltas/NEW && cp -r TARGET/. MP/base/deltas/NEW/` timed from mkdir to
  cp's exit (each safetensors file is coded chunk by chunk while it is written, and its container
  finished and stored when it is closed); the daemon ran with `llmfs mount MP --foreground`; its
  peak RSS (VmHWM) is read after the write runs, before the read-back check (which fills the
  daemon's 1 GiB read cache).
* CPU s = user + sys of the fastest run (from `/usr/bin/time -v`). llmfs fsyncs every container it
  stores (`delta make` and the deltas/ write path: the store's atomic-update contract); `export`,
  like `cp` and torch's `save_pretrained`, leaves its output to the kernel's writeback. Where a
  wall time is well above its CPU time, the difference is waiting (for the disk, or for the CPU
  on this shared machine); the `dd ... conv=fsync` row is what durably writing 1x the model costs.
* `llmfs delta import --format fastchat` keeps FastChat's f16 delta (`llmfs info` reports no
  stored size for imports).
{real_section(R)}"""
    with open(RESULTS, "w") as fh:
        fh.write(text)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_fastchat":
        return child_fastchat(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "_zipnn":
        return child_zipnn(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/llmfs_bench_delta", help="scratch dir (deleted at the end unless --keep)")
    p.add_argument("--size-mib", type=int, default=1100, help="model size for gen_model (default 1100: 0.54 B params)")
    p.add_argument("--scale", type=float, default=0.01, help="fine-tune perturbation, in units of the weights' std")
    p.add_argument("--reps", type=int, default=2, help="runs of each timed step (best time reported)")
    p.add_argument("--fastchat-python", default="/tmp/fcq/bin/python")
    p.add_argument("--zipnn-python", default="/tmp/bdz/bin/python")
    p.add_argument("--real-steps", type=int, default=20, help="AdamW steps of the real fine-tune (0: skip it)")
    p.add_argument("--real-size-mib", type=int, default=400, help="size of the real fine-tune's generated base")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args()
    bench = Bench(a)
    if not a.no_build:
        bench.log("cargo build --release --bins --examples")
        build(bench)
    mach = machine()
    vers = versions(a.fastchat_python)
    try:
        R = run(bench)
        table, model = report(R, a, mach, vers)
        print()
        print(model)
        print()
        print(table)
        write_results(table, model, R, a, mach, vers)
        bench.log(f"wrote {RESULTS}")
    finally:
        mp = os.path.join(bench.work, "mnt")
        if os.path.ismount(mp):
            subprocess.run([LLMFS, "umount", mp])
        if not a.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
