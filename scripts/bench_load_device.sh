#!/bin/bash
# The lent machine's run for issue 13, in one call: scripts/fill_bench.c and scripts/mem_touch.c
# (how fast one file can be filled, how fast fresh memory comes), bench_load.py on all cores and
# under `taskset -c 0,1`, the fill by pwrite against the other way (LLMFS_DISK_FILL, in builds
# that had it), and bench_load_first.py. BIN holds stripped copies of llmfs, gen_model,
# gen_finetune, and fill_bench and mem_touch built from scripts/; the scripts are read from
# beside this one. Output under $OUT.
#   usage: BIN=dir OUT=dir [SIZE=1100] [R16=2] [W=/tmp/lb] bash scripts/bench_load_device.sh
S=$(cd "$(dirname "$0")" && pwd)
export LLMFS=$BIN/llmfs EXAMPLES=$BIN MEM_TOUCH=$BIN/mem_touch PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
SIZE=${SIZE:-1100}; R16=${R16:-2}; W=${W:-/tmp/lb}
KINDS=base,f16,q8,d-lossless,d-bitdelta
t0=$(date +%s)
{
for dir in /tmp /dev/shm; do
  for t in 1 4 16; do for m in pwrite popul; do $BIN/fill_bench $dir 1024 $t $m; done; done
  $BIN/fill_bench $dir 1024 16 pwrite 2
done
taskset -c 0,1 $BIN/fill_bench /tmp 1024 2 pwrite; taskset -c 0,1 $BIN/fill_bench /tmp 1024 2 popul
mkdir -p /tmp/hshm && mount -t tmpfs -o huge=always,size=4g tmpfs /tmp/hshm \
  && for m in pwrite popul; do $BIN/fill_bench /tmp/hshm 1024 16 $m; done; umount /tmp/hshm
echo "== fresh memory, 16 threads, 4 GiB, 5 s apart"; $BIN/mem_touch 4096 16 3 5
echo "== back to back"; $BIN/mem_touch 4096 16 3 0
} 2>&1 | tee $OUT/fill.txt
BENCH_KINDS=$KINDS python3 $S/bench_load.py $W $SIZE $R16 > $OUT/b16.txt 2> $OUT/b16.log
tail -12 $OUT/b16.txt; echo "16 cores done: $(( $(date +%s) - t0 )) s"
taskset -c 0,1 env BENCH_KINDS=$KINDS python3 $S/bench_load.py $W $SIZE 1 > $OUT/b2.txt 2> $OUT/b2.log
tail -12 $OUT/b2.txt; echo "2 cores done: $(( $(date +%s) - t0 )) s"
LLMFS_DISK_FILL=pwrite BENCH_KINDS=f16,d-lossless python3 $S/bench_load.py $W $SIZE 1 > $OUT/b16-pwrite.txt 2> $OUT/b16-pwrite.log
tail -6 $OUT/b16-pwrite.txt
python3 $S/bench_load_first.py $W $SIZE f16,d-lossless 2> $OUT/first.log | tee $OUT/first.txt
grep -h "disk cache: decoded" $W/store/llmfs.log | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'decoded [^ ]*\|secs="[^"]*"' | paste - - > $OUT/fills.txt
echo "done: $(( $(date +%s) - t0 )) s"
