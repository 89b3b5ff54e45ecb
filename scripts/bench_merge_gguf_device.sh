#!/bin/bash
# The lent machine's merge and GGUF benchmarks (issues 22 and 24) in one device call, building
# nothing there.
#
#   here:   cargo build --release --features gpu --bin llmfs --example gen_model --example gen_finetune \
#               --example bench_merge_gpu
#           scripts/bench_merge_gguf_device.sh pack .devbench-mg     # an ignored dir of the checkout
#   device: run(carry=[".devbench-mg"], command="OUT=$OUT bash .devbench-mg/bench_merge_gguf_device.sh run", timeout_s=600)
#
# pack: llmfs, the two model generators and bench_merge_gpu stripped and xz-compressed; bench_merge.py,
# bench_gguf.py and what they import (bench_load.py, gguf_check.py); llama.cpp's converter
# (convert_hf_to_gguf.py, conversion/, gguf-py/ of llama-cpp-python 0.3.36's sdist); the wheels
# the lent machine lacks (it has torch, transformers, safetensors, numpy; no network):
# llama-cpp-python 0.3.36 (built here with GGML_NATIVE=OFF, its libs need libgomp.so.1: carried
# too, used only where the machine has none), mergekit 0.1.5 and what it imports at run time
# beyond transformers' own dependencies (peft, accelerate, psutil, pydantic, annotated-types,
# typing-inspection, click, immutables, diskcache for llama_cpp), pydantic-core and immutables
# for CPython 3.10-3.13 (pip picks the one that fits; scipy and dill, which transformers and torch
# import only when present, are left out). MG_WHEELS=DIR takes the wheels from DIR instead of
# downloading them (pip download --no-deps).
# run: installs the wheels into /tmp/site (pip --no-index --no-deps --target), unpacks the
# binaries (Python's lzma) and runs, printing each step's wall time, under $OUT:
#   merge.txt/.log  bench_merge.py $W/merge $MSIZE $MREPS  (MK_REPS mergekit rounds; then the
#                   fine-tunes, mergekit's outputs and the disk cache are removed: disk)
#   gguf.txt/.log   bench_gguf.py  $W/gguf  $GSIZE $GREPS     (then $W/gguf is removed)
#   kernel.txt      bench_merge_gpu $KELEMS $KREPS: mergekit's apply, GPU vs CPU on all cores
#                   (linear, ties, dare_ties over 3, 5, 8 parents; no mergekit, no mount)
#   *-results-16cores.json, fills-*.txt (the daemons' "disk cache: decoded" lines)
# STEPS (default merge,gguf: the order they run; kernel too: STEPS=kernel,merge), KELEMS (default
# 67108864), KREPS (3), BENCH_BACKENDS (e.g. cpu,gpu: bench_merge.py's llmfs rounds once per
# `mount --backend`), MSIZE/GSIZE (default 6000), MREPS (1),
# GREPS (1), MK_REPS (1), METHODS (linear,ties), MK_DEVICES (cpu,cuda), MK_CPU_METHODS
# (linear,ties: the merges mergekit runs on the CPU), FILL (F16,BF16,Q8_0,Q4_0,Q4_K_M; empty:
# none), WARM (1; 0: no `llmfs warm` rows), MT/GT (each step's timeout in seconds, default 540;
# a step cut short prints the table of what it finished), W override. Checked here end to end with MSIZE=300
# GSIZE=300 (see the README).
set -u
case "${1:-}" in
pack)
    K=${2:?pack DIR}
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    T=${CARGO_TARGET_DIR:-$ROOT/target}
    LCP=${LLAMA_CPP:-/tmp/llmfs-ci-llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp}
    LCW=${LLAMA_CPP_WHEEL:-/root/.cache/pip/wheels/a7/aa/8f/764d801c7baba50b8d7c4804f6e67c0962ae13466263528365/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl}
    rm -rf "$K" && mkdir -p "$K/scripts" "$K/wheels/bin" "$K/llama.cpp" "$K/lib" || exit 1
    for b in "$T/release/llmfs" "$T"/release/examples/{gen_model,gen_finetune,bench_merge_gpu}; do
        strip -o "$K/tmp.bin" "$b" && xz -6 -T2 -c "$K/tmp.bin" >"$K/$(basename "$b").xz" && rm "$K/tmp.bin" || exit 1
    done
    cp "$ROOT"/scripts/{bench_merge.py,bench_gguf.py,bench_load.py,gguf_check.py} "$K/scripts/"
    cp "$0" "$K/bench_merge_gguf_device.sh"
    (cd "$LCP" && tar -cf - --exclude=__pycache__ --exclude=tests convert_hf_to_gguf.py conversion gguf-py/gguf) | tar -xf - -C "$K/llama.cpp"
    cp "$LCW" "$K/wheels/"
    cp -L /lib/x86_64-linux-gnu/libgomp.so.1 "$K/lib/"
    if [ -n "${MG_WHEELS:-}" ]; then
        cp "$MG_WHEELS"/*.whl "$K/wheels/" && cp "$MG_WHEELS"/bin/*.whl "$K/wheels/bin/"
    else
        python3 -m pip download -q --no-deps -d "$K/wheels" mergekit==0.1.5 peft==0.21.2 accelerate==1.16.0 \
            pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 click==8.5.1 diskcache==5.6.3 || exit 1
        python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
            --python-version 3.11 -d "$K/wheels" psutil==7.2.2 || exit 1
        for v in 3.10 3.11 3.12 3.13; do
            python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
                --python-version $v -d "$K/wheels/bin" pydantic-core==2.46.4 immutables==0.21 || exit 1
        done
    fi
    git -C "$ROOT" rev-parse --short HEAD >"$K/commit"
    du -sh "$K"
    ;;
run)
    D=$(cd "$(dirname "$0")" && pwd)
    B=/var/tmp/mg-bin W=${W:-/var/tmp/mg} SITE=${SITE:-/tmp/site}
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" $B
    t0=$(date +%s)
    step() { echo "== $1: $(($(date +%s) - t0)) s"; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        --find-links "$D/wheels/bin" "$D"/wheels/*.whl pydantic-core==2.46.4 immutables==0.21 2>&1 | grep -v WARNING
    export PYTHONPATH=$SITE
    ldconfig -p | grep -q 'libgomp.so.1 ' || export LD_LIBRARY_PATH=$D/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    python3 - "$D" "$B" <<'P'
import lzma, os, shutil, sys
d, b = sys.argv[1:]
for n in ("llmfs", "gen_model", "gen_finetune", "bench_merge_gpu"):
    with lzma.open(f"{d}/{n}.xz") as src, open(f"{b}/{n}", "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.chmod(f"{b}/{n}", 0o755)
P
    echo "commit $(cat "$D/commit"); $(nproc) cores; $(uname -r); $(free -g | awk '/Mem/{print $2}') GiB; $(df -h /var/tmp | awk 'NR==2{print $4}') free on /var/tmp"
    python3 -c "import sys, torch, transformers, safetensors, mergekit, peft, llama_cpp, importlib.metadata as m; print(sys.version.split()[0], torch.__version__, transformers.__version__, safetensors.__version__, 'mergekit', m.version('mergekit'), 'llama_cpp', llama_cpp.__version__, 'cuda', torch.cuda.is_available())" || echo "IMPORT CHECK FAILED"
    step "installed"
    export LLMFS=$B/llmfs EXAMPLES=$B PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 LLAMA_CPP=$D/llama.cpp
    STEPS=${STEPS:-merge,gguf} GSIZE=${GSIZE:-6000} MSIZE=${MSIZE:-6000}
    export MK_REPS=${MK_REPS:-1} BENCH_METHODS=${METHODS:-linear,ties} MK_DEVICES=${MK_DEVICES:-cpu,cuda}
    export BENCH_FILL=${FILL-F16,BF16,Q8_0,Q4_0,Q4_K_M} BENCH_WARM=${WARM:-1}
    mkdir -p $W
    gguf_step() {
        timeout -k 15 -s INT ${GT:-540} python3 "$D/scripts/bench_gguf.py" $W/gguf $GSIZE ${GREPS:-1} >"$OUT/gguf.txt" 2>"$OUT/gguf.log"
        rc=$?; echo "rc=$rc"; cat "$OUT/gguf.txt"; grep '^#' "$OUT/gguf.log"; grep -v '^#' "$OUT/gguf.log" | tail -5
        [ $rc = 0 ] || python3 "$D/scripts/bench_gguf.py" _table $W/gguf/gguf-results-*cores.json
        cp $W/gguf/gguf-results-*.json "$OUT/" 2>/dev/null
        grep -h "cache: decoded" $W/gguf/store/llmfs.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | tail -100 >"$OUT/fills-gguf.txt"
        $B/llmfs umount $W/gguf/mnt >/dev/null 2>&1; rm -rf $W/gguf
        step "gguf done"
    }
    merge_step() {
        timeout -k 15 -s INT ${MT:-540} python3 "$D/scripts/bench_merge.py" $W/merge $MSIZE ${MREPS:-1} >"$OUT/merge.txt" 2>"$OUT/merge.log"
        rc=$?; echo "rc=$rc"; cat "$OUT/merge.txt"; grep '^#' "$OUT/merge.log"; grep -v '^#' "$OUT/merge.log" | tail -5
        # cut short (timeout: rc 124): the table of the merges that finished
        [ $rc = 0 ] || python3 "$D/scripts/bench_merge.py" _table $W/merge/merge-results-*cores.json
        cp $W/merge/merge-results-*.json "$OUT/" 2>/dev/null
        grep -h "cache: decoded" $W/merge/store/llmfs.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | tail -100 >"$OUT/fills-merge.txt"
        for m in $W/merge/mnt; do $B/llmfs umount $m >/dev/null 2>&1; done
        # The store goes with the fine-tunes it names: a later run in the same machine (a call cut
        # off, then another) would find ft1..3 registered over removed files.
        rm -rf $W/merge/ft1 $W/merge/ft2 $W/merge/ft3 $W/merge/cache $W/merge/mk-* $W/merge/store
        step "merge done"
    }
    kernel_step() {
        timeout -k 15 -s INT ${KT:-540} $B/bench_merge_gpu ${KELEMS:-67108864} ${KREPS:-3} >"$OUT/kernel.txt" 2>&1
        echo "rc=$?"; cat "$OUT/kernel.txt"
        step "kernel done"
    }
    for s in ${STEPS//,/ }; do "${s}_step"; done
    ;;
*)
    echo "usage: $0 pack DIR | run" >&2
    exit 2
    ;;
esac
