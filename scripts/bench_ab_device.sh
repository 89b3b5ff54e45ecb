#!/bin/bash
# Two llmfs builds, A and B, through the same load and read benchmarks in one device call each,
# alternating A B A B on one warm store, so a change meant to keep speed (issue 21's shape) is
# measured against the build before it on the same machine within minutes.
#
#   here:   cargo build --release --features gpu --bin llmfs --example gen_model --example gen_finetune
#           A=/path/to/old/llmfs scripts/bench_ab_device.sh pack .devbench-ab     # B: this checkout's
#   device: run(carry=[".devbench-ab"], command="OUT=$OUT bash .devbench-ab/bench_ab_device.sh load")
#           run(carry=[".devbench-ab"], command="OUT=$OUT bash .devbench-ab/bench_ab_device.sh read")
#
# load: scripts/bench_load.py WORK $SIZE (6000 MiB) 1 load_file,safe_open for BENCH_KINDS
#   ($KINDS, default base,f16,q8,d-lossless), ROUNDS (2) rounds of A then B; the store and models
#   are made once (by A) and reused. Tables in $OUT/load-{A,B}-N.txt.
# read: scripts/bench_read.py WORK 1100 REPS (3) the same way, ROUNDS rounds of A then B.
# Each step's wall time is printed so that a call cut off by its limit still says how far it got.
set -u
case "${1:-}" in
pack)
    K=${2:?pack DIR}
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    T=${CARGO_TARGET_DIR:-$ROOT/target}
    mkdir -p "$K/scripts"
    pack() { strip -o "$K/tmp.bin" "$1" && xz -6 -T2 -c "$K/tmp.bin" >"$K/$2.xz" && rm "$K/tmp.bin"; }
    pack "${A:?A=old llmfs binary}" llmfs-A
    pack "${B:-$T/release/llmfs}" llmfs-B
    pack "$T/release/examples/gen_model" gen_model
    pack "$T/release/examples/gen_finetune" gen_finetune
    cp "$ROOT/scripts/bench_load.py" "$ROOT/scripts/bench_read.py" "$K/scripts/"
    cp "$0" "$K/bench_ab_device.sh"
    { echo "A ${A_COMMIT:-unknown}"; echo "B $(git -C "$ROOT" rev-parse --short HEAD)"; } >"$K/commits"
    du -sh "$K"
    ;;
load | read)
    D=$(cd "$(dirname "$0")" && pwd)
    B=/var/tmp/ab-bin
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" $B
    python3 - "$D" "$B" <<'P'
import lzma, os, shutil, sys
d, b = sys.argv[1:]
for n in ("llmfs-A", "llmfs-B", "gen_model", "gen_finetune"):
    if not os.path.exists(f"{b}/{n}"):
        with lzma.open(f"{d}/{n}.xz") as src, open(f"{b}/{n}", "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.chmod(f"{b}/{n}", 0o755)
P
    cat "$D/commits"; echo "$(nproc) cores; $(uname -r); $(free -g | awk '/Mem/{print $2}') GiB"
    export EXAMPLES=$B GEN=$B/gen_model PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1
    t0=$(date +%s)
    for round in $(seq 1 "${ROUNDS:-2}"); do
        for v in A B; do
            if [ "$1" = load ]; then
                LLMFS=$B/llmfs-$v BENCH_KINDS=${KINDS:-base,f16,q8,d-lossless} python3 "$D/scripts/bench_load.py" \
                    /var/tmp/ab-load "${SIZE:-6000}" 1 load_file,safe_open >"$OUT/load-$v-$round.txt" 2>"$OUT/load-$v-$round.log"
                echo "rc=$?"; tail -7 "$OUT/load-$v-$round.txt"
            else
                LLMFS=$B/llmfs-$v python3 "$D/scripts/bench_read.py" /var/tmp/ab-read "${RSIZE:-1100}" "${REPS:-3}" \
                    >"$OUT/read-$v-$round.txt" 2>"$OUT/read-$v-$round.log"
                echo "rc=$?"; tail -12 "$OUT/read-$v-$round.txt"
            fi
            echo "$1 $v round $round done: $(($(date +%s) - t0)) s"
        done
    done
    ;;
*)
    echo "usage: A=OLD_LLMFS $0 pack DIR | load | read" >&2
    exit 2
    ;;
esac
