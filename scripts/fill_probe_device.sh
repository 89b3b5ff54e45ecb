#!/bin/bash
# Where a first load's fill time goes on the lent 16-core host, and what a load after a remount
# spends (open vs read), without bench_load.py's whole table (issue 23).
#   here:   D=.devprobe; mkdir -p $D; for b in target/release/llmfs target/release/examples/gen_model; do
#             strip -o $D/t $b && xz -6 -c $D/t > $D/$(basename $b).xz; done; rm $D/t; cp scripts/fill_probe_device.sh $D/
#   device: run(carry=[".devprobe"], command="cd .devprobe && SIZE=6000 bash fill_probe_device.sh")
# Prints, per mount: the backend chosen, each file's fill time (the daemon's log), then for three
# remounts: plain files, the base and the f16 cast through the mount, and the cache file itself.
# Output of 2026-12-06 (H100 host): scripts/bench_load_results/16core-fill-probe.txt.
set -u
W=${W:-/var/tmp/pw}; B=${B:-/var/tmp/pb}; D=$(cd "$(dirname "$0")" && pwd)
[ -x $B/llmfs ] || python3 - "$D" "$B" <<'P'
import lzma, os, shutil, sys
d, b = sys.argv[1:]
os.makedirs(b, exist_ok=True)
for n in ("llmfs", "gen_model"):
    with lzma.open(f"{d}/{n}.xz") as s, open(f"{b}/{n}", "wb") as o: shutil.copyfileobj(s, o, 16 << 20)
    os.chmod(f"{b}/{n}", 0o755)
P
if [ ! -f $W/store/registry.json ]; then
  rm -rf $W; mkdir -p $W; $B/gen_model $W/model ${SIZE:-6000} | tail -1
  L="$B/llmfs --store $W/store"; $L add base $W/model | tail -1; $L cast f16 --base base --dtype f16 | tail -1; $L quantize q8 --base base | tail -1
fi
L="$B/llmfs --store $W/store"
cat $W/model/*.safetensors > /dev/null
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
fill() { # label entry mount-args...
  local label=$1 entry=$2; shift 2; local dc=$W/dc-$label mnt=$W/mnt; rm -rf $dc; mkdir -p $mnt; sync
  : > $W/store/llmfs.log
  $L mount $mnt --disk-cache $dc "$@" >/dev/null 2>&1 || { echo "mount failed"; return; }
  local s=$(date +%s%N); python3 -c "import glob; [open(f,'rb').close() for f in sorted(glob.glob('$mnt/$entry/*.safetensors'))[::-1]]"
  echo "fill $label $entry $*: all opens $(ms $s) ms"
  $L umount $mnt >/dev/null 2>&1
  sed 's/\x1b\[[0-9;]*m//g' $W/store/llmfs.log | grep -h "backend\|decoded" | sed 's/^.*Z *//' | cut -c1-200
}
fill auto f16
fill cpu f16 --backend cpu
env RAYON_NUM_THREADS=4 bash -c "true"
fill cpu-mem f16 --backend cpu --memory-cache-size 16GiB
fill q8cpu q8 --backend cpu
fill q8auto q8
# After a remount: open and read through the mount, per shard, base and f16 (cache committed by the cpu fill).
for i in 1 2 3; do
  $L mount $W/mnt --disk-cache $W/dc-cpu --backend cpu >/dev/null 2>&1
  python3 - $W <<'P'
import glob, os, sys, time, torch
from safetensors.torch import load_file
w = sys.argv[1]; buf = [None]
def touch(v):
    b = v.reshape(-1).contiguous().view(torch.uint8); n = b.numel()
    if buf[0] is None or buf[0].numel() < n: buf[0] = torch.empty(n, dtype=torch.uint8)
    buf[0][:n].copy_(b)
def load(p):
    s = time.perf_counter(); d = load_file(p)
    for v in d.values(): touch(v)
    return time.perf_counter() - s
cache = sorted(p for p in glob.glob(f"{w}/dc-cpu/*") if os.path.getsize(p) > 64 << 20)
rows = []
for label, files in (("plain", sorted(glob.glob(f"{w}/model/*.safetensors"))), ("base mnt", sorted(glob.glob(f"{w}/mnt/base/*.safetensors"))),
                     ("f16 mnt", sorted(glob.glob(f"{w}/mnt/f16/*.safetensors"))), ("f16 cachefile", cache)):
    tot_o = tot_l = n = 0
    for p in files:
        s = time.perf_counter(); fd = os.open(p, os.O_RDONLY); o = time.perf_counter() - s; os.close(fd)
        tot_o += o; tot_l += load(p); n += os.path.getsize(p)
    rows.append(f"{label}: first open {tot_o*1000:.1f} ms, load {tot_l*1000:.0f} ms, {n/tot_l/1e9:.1f} GB/s; again {n/sum(load(p) for p in files)/1e9:.1f} GB/s")
print(" | ".join(rows))
P
  $L umount $W/mnt >/dev/null 2>&1
done
