#!/bin/bash
# The lent machine's load benchmark for issue 23 in one device call, building nothing there.
#
#   here:   cargo build --release --features gpu --bin llmfs --example gen_model --example gen_finetune
#           scripts/bench_load_device.sh pack .devbench     # an ignored dir of the checkout
#   device: run(carry=[".devbench"], command="OUT=$OUT bash .devbench/bench_load_device.sh run", timeout_s=600)
#
# pack: llmfs and the two model generators stripped and xz-compressed, fill_bench and mem_touch
# compiled here (cc -O2), bench_load.py, fill_timeline.py and this file: about 10 MB, under the
# 64 MiB a call carries. run: unpacks them (Python's lzma) and runs, under $OUT:
#   fill.txt       fill_bench: one 1 GiB file by pwrite and through a mapping (each piece's pages
#                  given back: mmap; kept: keep, the cost of LLMFS_FILL_DROP_MAPPED), ext4 and tmpfs, 1/16 threads
#   b16.txt        bench_load.py WORK $SIZE (6000 MiB) $R16 on all cores: the >= 6 GB table
#   timeline.txt   fill_timeline.py: one first load per kind (TIMELINE_KINDS, default f16,d-lossless; set
#                  and empty: none), when each file was decoded and when the loader got and copied it
#   direct.txt     (DIRECT_KINDS=K,K only) cache_direct.py: each kind's decoded files loaded
#                  outside the mount and through it again, against the plain fine-tune
#   b2.txt         (B2=1 only) the same table under `taskset -c 0,1`, SIZE2 MiB (default 1100), R2 rounds (default 1),
#                  B2_CONFIGS in place of CONFIGS where given
#   b2_ab.txt      (B2_AB=1 only; pack with AB_OLD=BIN AB_NEW=BIN) that table with each packed build,
#                  alternating, B2_ROUNDS (default 2) runs of B2_REPS (default 1) rounds, B2_KINDS
#                  (default KINDS): two builds' loads with the fills of 2 cores (by pwrite)
#   scaling.txt    (SCALING=K,K only) `llmfs warm K` into an empty disk cache under `taskset -c
#                  0-(N-1)` for N in SCALING_CORES (default 2,4,8,16): each kind's fill rate by
#                  core count (its printed "warm:" line), until SCALING_SECS (default 150) have
#                  passed; `lscpu -e` first, to tell cores from hyperthreads
#   warm_ab.txt    (WARM_AB=K,K only; pack with AB_OLD=BIN AB_NEW=BIN) `llmfs warm K` into an empty disk
#                  cache on all cores, the two packed builds alternating, WARM_AB_ROUNDS (default 2)
#                  rounds: two builds' fill rates on the same host (each line its "warm:" line)
#   folio.txt      (FOLIO_KINDS=K,K only) `llmfs warm K` on all cores, then folio_check.py over the
#                  plain fine-tune's files, the base's and K's decoded files: each mapped and read,
#                  and how much of it the page cache holds in 2 MiB folios (FilePmdMapped)
# b16.txt and b2.txt end with a control row, the plain fine-tune loaded right after a fresh copy
# (FRESH=0 leaves it out). FILL_BENCH=0 skips fill.txt, B16=0 the table (b16.txt). SIZE, R16, KINDS, LOADERS (default load_file,safe_open, the targets' loaders; add hf for
# from_pretrained), W (the work dir) and BIN (where the binaries are unpacked) override.
# A/B of the daemon's environment switches in the same call: CONFIGS="NAME:VAR=VAL,VAR=VAL ..."
# (bench_load.py's BENCH_CONFIGS) runs every row of b16.txt/b2.txt once per configuration,
# alternating within each round (rows "LABEL [NAME]", a median table when R16 > 1), and the
# timeline once per configuration (timeline-NAME.txt). Issue 23's two switches, e.g.
#   OUT=$OUT KINDS=f16,d-lossless R16=3 LOADERS=load_file CONFIGS="off:LLMFS_AHEAD_NICE=0,LLMFS_FILL_DROP_MAPPED=0
#   nice:LLMFS_AHEAD_NICE=10,LLMFS_FILL_DROP_MAPPED=0 both:LLMFS_AHEAD_NICE=10,LLMFS_FILL_DROP_MAPPED=1"
#   bash .devbench/bench_load_device.sh run
# (LLMFS_AHEAD_NICE: the nice increment of the fills of the files not opened; LLMFS_FILL_DROP_MAPPED:
# a mapped fill gives back each piece's pages; both in src/vfs/decoded.rs.) Unset: one run as built. Checked here end to end with SIZE=300 KINDS=f16 (79 s). Each
# step's wall time is printed: a 6 GB model takes minutes to generate and register, and KINDS
# keeps the run inside the call.
set -u
case "${1:-}" in
pack)
    K=${2:?pack DIR}
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    T=${CARGO_TARGET_DIR:-$ROOT/target}
    mkdir -p "$K/scripts"
    for b in "$T/release/llmfs" "$T"/release/examples/{gen_model,gen_finetune}; do
        strip -o "$K/tmp.bin" "$b" && xz -6 -T2 -c "$K/tmp.bin" >"$K/$(basename "$b").xz" && rm "$K/tmp.bin"
    done
    # Two more builds for WARM_AB (say CPU-only builds of two commits), when given.
    [ -n "${AB_OLD:-}" ] && strip -o "$K/tmp.bin" "$AB_OLD" && xz -6 -T2 -c "$K/tmp.bin" >"$K/llmfs-old.xz"
    [ -n "${AB_NEW:-}" ] && strip -o "$K/tmp.bin" "$AB_NEW" && xz -6 -T2 -c "$K/tmp.bin" >"$K/llmfs-new.xz"
    rm -f "$K/tmp.bin"
    cc -O2 -pthread -o "$K/fill_bench" "$ROOT/scripts/fill_bench.c"
    cc -O2 -pthread -o "$K/mem_touch" "$ROOT/scripts/mem_touch.c"
    cp "$ROOT/scripts/bench_load.py" "$ROOT/scripts/fill_timeline.py" "$ROOT/scripts/cache_direct.py" \
        "$ROOT/scripts/folio_check.py" "$K/scripts/"
    cp "$0" "$K/bench_load_device.sh"
    git -C "$ROOT" rev-parse --short HEAD >"$K/commit"
    [ -n "${AB_OLD:-}" ] && echo "${AB_OLD_LABEL:-$AB_OLD}" >"$K/ab-old"
    [ -n "${AB_NEW:-}" ] && echo "${AB_NEW_LABEL:-$AB_NEW}" >"$K/ab-new"
    du -sh "$K"
    ;;
run)
    D=$(cd "$(dirname "$0")" && pwd)
    B=${BIN:-/var/tmp/lb-bin} W=${W:-/var/tmp/lb}
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" $B
    python3 - "$D" "$B" <<'P'
import lzma, os, shutil, sys
d, b = sys.argv[1:]
for n in ("llmfs", "gen_model", "gen_finetune", "llmfs-old", "llmfs-new"):
    if not os.path.exists(f"{d}/{n}.xz"):
        continue
    with lzma.open(f"{d}/{n}.xz") as src, open(f"{b}/{n}", "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.chmod(f"{b}/{n}", 0o755)
P
    cp "$D/fill_bench" "$D/mem_touch" $B/
    echo "commit $(cat "$D/commit"); $(nproc) cores; $(uname -r); $(free -g | awk '/Mem/{print $2}') GiB"
    cat /sys/kernel/mm/transparent_hugepage/shmem_enabled
    # Whether the host takes back free 2 MiB blocks (decides the 2-core fills' default, pwrite.rs).
    echo "virtio_balloon: $(ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -c virtio) device(s);" \
        "page_reporting_order: $(cat /sys/module/page_reporting/parameters/page_reporting_order 2>/dev/null || echo none)"
    python3 -c "import torch, transformers, safetensors; print(torch.__version__, transformers.__version__, safetensors.__version__)"
    export LLMFS=$B/llmfs EXAMPLES=$B PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1
    SIZE=${SIZE:-6000} R16=${R16:-2} KINDS=${KINDS:-base,f16,q8,d-lossless,d-bitdelta}
    LOADERS=${LOADERS:-load_file,safe_open}
    t0=$(date +%s)
    # Register the kinds KINDS (comma-separated) that the store lacks (bench_load.setup adds only
    # what is missing), logging to LOG.
    register() { # KINDS LOG
        python3 -c "import sys; sys.path.insert(0, '$D/scripts'); import bench_load as b; b.setup('$W', $SIZE, '$1'.split(','))" >"$2" 2>&1
    }
    # `llmfs warm KIND` into the empty disk cache DC with the llmfs binary BIN (after any command
    # prefix, such as taskset): its "warm:" line.
    warm_line() { # DC BIN KIND [PREFIX...]
        local dc=$1 bin=$2 kind=$3
        shift 3
        rm -rf "$dc"
        "$@" "$bin" --store $W/store warm "$kind" --disk-cache "$dc" 2>&1 | tr '\r' '\n' | grep '^warm:'
    }
    [ "${FILL_BENCH:-1}" = 1 ] && {
        for dir in /var/tmp /dev/shm; do
            for t in 1 16; do for m in pwrite mmap keep; do $B/fill_bench $dir 1024 $t $m; done; done
            for r in 1 2; do for m in mmap keep; do $B/fill_bench $dir 1024 16 $m; done; done
            $B/fill_bench $dir 1024 16 pwrite 4
            # Without the untimed fallocate first, which on tmpfs allocates (and zeroes) every
            # page before the clock starts: what a memfd fill (the memory tier) pays in its faults.
            for r in 1 2; do NOFALLOC=1 $B/fill_bench $dir 1024 16 mmap; done
        done
    } >"$OUT/fill.txt" 2>&1
    [ -f "$OUT/fill.txt" ] && tail -10 "$OUT/fill.txt"; echo "fill_bench done: $(($(date +%s) - t0)) s"
    export BENCH_CONFIGS=${CONFIGS:-} BENCH_FRESH=${FRESH:-1}
    [ "${B16:-1}" = 1 ] && {
        BENCH_KINDS=$KINDS python3 "$D/scripts/bench_load.py" $W $SIZE $R16 $LOADERS >"$OUT/b16.txt" 2>"$OUT/b16.log"
        echo "rc=$?"; tail -40 "$OUT/b16.txt"; echo "16 cores done: $(($(date +%s) - t0)) s"
    }
    # The timeline once per configuration: NAME and its assignments (none when CONFIGS is unset).
    [ -n "${TIMELINE_KINDS-x}" ] && for c in ${CONFIGS:-:}; do
        name=${c%%:*} assigns=${c#*:}
        [ "$assigns" = "$c" ] && assigns=
        t="$OUT/timeline${name:+-$name}.txt"
        echo "== ${name:-as built} ${assigns}" >"$t"
        env ${assigns//,/ } python3 "$D/scripts/fill_timeline.py" $W $SIZE ${TIMELINE_KINDS:-f16,d-lossless} >>"$t" 2>"${t%.txt}.log"
        cat "$t"
    done
    echo "timeline done: $(($(date +%s) - t0)) s"
    if [ -n "${DIRECT_KINDS:-}" ]; then
        python3 "$D/scripts/cache_direct.py" $W $SIZE $DIRECT_KINDS ${DIRECT_ROUNDS:-3} $LOADERS >"$OUT/direct.txt" 2>"$OUT/direct.log"
        cat "$OUT/direct.txt"; echo "direct done: $(($(date +%s) - t0)) s"
    fi
    if [ "${B2:-0}" = 1 ]; then
        taskset -c 0,1 env BENCH_KINDS=$KINDS BENCH_CONFIGS="${B2_CONFIGS:-$BENCH_CONFIGS}" python3 "$D/scripts/bench_load.py" $W-2 ${SIZE2:-1100} ${R2:-1} $LOADERS >"$OUT/b2.txt" 2>"$OUT/b2.log"
        tail -20 "$OUT/b2.txt"; echo "2 cores done: $(($(date +%s) - t0)) s"
        # The daemons' own choice of fill on 2 cores (pwrite.rs), beside the host's facts above.
        sed 's/\x1b\[[0-9;]*m//g' $W-2/store/llmfs.log 2>/dev/null | grep -o "fills by pwrite.*" | sort | uniq -c
    fi
    if [ "${B2_AB:-0}" = 1 ]; then
        for r in $(seq ${B2_ROUNDS:-2}); do for which in old new; do
            echo "== $which round $r" >>"$OUT/b2_ab.txt"
            taskset -c 0,1 env LLMFS=$B/llmfs-$which BENCH_KINDS=${B2_KINDS:-$KINDS} python3 "$D/scripts/bench_load.py" \
                $W-2 1100 ${B2_REPS:-1} $LOADERS 2>>"$OUT/b2_ab.log" | grep -E '^(\||[0-9]+ cores)' >>"$OUT/b2_ab.txt"
        done; done
        echo "old: $(cat "$D/ab-old" 2>/dev/null), new: $(cat "$D/ab-new" 2>/dev/null)" >>"$OUT/b2_ab.txt"
        tail -30 "$OUT/b2_ab.txt"; echo "2-core A/B done: $(($(date +%s) - t0)) s"
    fi
    if [ -n "${SCALING:-}" ]; then
        s0=$(date +%s)
        register "$SCALING" "$OUT/scaling.log"
        { lscpu -e 2>/dev/null || grep -E "^(processor|core id|physical id)" /proc/cpuinfo; } >"$OUT/scaling.txt"
        cores=${SCALING_CORES:-2,4,8,16}
        for k in ${SCALING//,/ }; do for n in ${cores//,/ }; do
            [ $(($(date +%s) - s0)) -gt "${SCALING_SECS:-150}" ] && break 2
            echo "$k $n cores: $(warm_line "$W/scaling-dc" $B/llmfs $k taskset -c 0-$((n - 1)))" >>"$OUT/scaling.txt"
        done; done
        rm -rf "$W/scaling-dc"
        cat "$OUT/scaling.txt"; echo "scaling done: $(($(date +%s) - t0)) s"
    fi
    if [ -n "${WARM_AB:-}" ]; then
        register "$WARM_AB" "$OUT/warm_ab.log"
        echo "old: $(cat "$D/ab-old" 2>/dev/null), new: $(cat "$D/ab-new" 2>/dev/null)" >"$OUT/warm_ab.txt"
        for k in ${WARM_AB//,/ }; do for r in $(seq ${WARM_AB_ROUNDS:-2}); do for which in old new; do
            echo "$k $which: $(warm_line "$W/ab-dc" $B/llmfs-$which $k)" >>"$OUT/warm_ab.txt"
        done; done; done
        rm -rf "$W/ab-dc"
        cat "$OUT/warm_ab.txt"; echo "warm A/B done: $(($(date +%s) - t0)) s"
    fi
    if [ -n "${FOLIO_KINDS:-}" ]; then
        register "$FOLIO_KINDS" "$OUT/folio.log"
        for k in ${FOLIO_KINDS//,/ }; do
            echo "== $k: $(warm_line "$W/folio-dc" $B/llmfs $k)"
            python3 "$D/scripts/folio_check.py" $W/ft/*.safetensors $W/model/*.safetensors \
                $(ls "$W"/folio-dc/* | grep -E '/[0-9a-f]{64}$')
        done >>"$OUT/folio.txt" 2>&1
        rm -rf "$W/folio-dc"
        cat "$OUT/folio.txt"; echo "folio done: $(($(date +%s) - t0)) s"
    fi
    cp $W/results-*.json "$OUT/" 2>/dev/null
    grep -h "cache: decoded" $W/store/llmfs.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | tail -200 >"$OUT/fills.txt"
    ;;
*)
    echo "usage: $0 pack DIR | run" >&2
    exit 2
    ;;
esac
