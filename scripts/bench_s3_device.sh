#!/bin/bash
# bench_s3.py on the lent machine in one device call.
#
#   here:   cargo build --release --bin llmfs --example gen_model --example gen_finetune --example s3_get
#           scripts/bench_s3_device.sh pack .devbench      # an ignored dir in the checkout the call sends
#   device: run(carry=[".devbench"], command="bash .devbench/bench_s3_device.sh run", timeout_s=420)
#
# pack: the binaries stripped and xz-compressed (weed is 153 MB, 34 MB compressed; the kit is
# about 41 MB, under the 64 MiB the call carries with the tree), the two scripts and this file.
# run: unpacks them (Python's lzma: no xz needed there) and runs bench_s3.py WORK 1100 3 on all
# cores; $OUT gets the log and the results JSON. SIZE, REPS, LOADERS override.
set -u
case "${1:-}" in
pack)
    K=${2:?pack DIR}
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    mkdir -p "$K/scripts"
    WEED_BIN=${WEED:-$(command -v pyenv >/dev/null && pyenv which weed 2>/dev/null || command -v weed)}
    WEED_BIN=$(readlink -f "$WEED_BIN")
    file "$WEED_BIN" | grep -q ELF || { echo "weed: $WEED_BIN is not the binary (a shim?); set WEED=" >&2; exit 1; }
    xz -6 -T2 -c "$WEED_BIN" >"$K/weed.xz"
    for b in "$ROOT/target/release/llmfs" "$ROOT"/target/release/examples/{s3_get,gen_model,gen_finetune}; do
        strip -o "$K/tmp.bin" "$b" && xz -6 -T2 -c "$K/tmp.bin" >"$K/$(basename "$b").xz" && rm "$K/tmp.bin"
    done
    cp "$ROOT/scripts/bench_s3.py" "$ROOT/scripts/bench_load.py" "$K/scripts/"
    cp "$0" "$K/bench_s3_device.sh"
    du -sh "$K"
    ;;
run)
    D=$(cd "$(dirname "$0")" && pwd)
    B=/var/tmp/s3b-bin W=/var/tmp/s3b-work
    mkdir -p $B
    python3 - "$D" "$B" <<'P'
import lzma, os, shutil, sys
d, b = sys.argv[1:]
for n in ("weed", "llmfs", "s3_get", "gen_model", "gen_finetune"):
    with lzma.open(f"{d}/{n}.xz") as src, open(f"{b}/{n}", "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.chmod(f"{b}/{n}", 0o755)
P
    nproc; uname -r; df -h /var/tmp | tail -1; ls -la /dev/fuse
    python3 -c "import torch, transformers, safetensors; print(torch.__version__, transformers.__version__, safetensors.__version__)"
    export LLMFS=$B/llmfs EXAMPLES=$B WEED=$B/weed PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1
    SECS=$(date +%s)
    python3 "$D/scripts/bench_s3.py" $W "${SIZE:-1100}" "${REPS:-3}" "${LOADERS:-load_file,safe_open,hf}" >"$OUT/log.txt" 2>&1
    echo "rc=$? in $(($(date +%s) - SECS)) s"
    cp $W/results-s3-*cores.json "$OUT/" 2>/dev/null
    grep -v "Loading weights" "$OUT/log.txt" | tail -30
    ;;
*)
    echo "usage: $0 pack DIR | run" >&2
    exit 2
    ;;
esac
