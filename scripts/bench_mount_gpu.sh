#!/usr/bin/env bash
# A quantized variant read through the mount with --backend gpu against --backend cpu, on the
# device machine (see /work/.library/device/README.md). Needs the binaries in .devbin/
# (cargo build --release --features gpu --bins --examples; copy llmfs and examples/gen_model)
# and the Vulkan loader debs in .gl/. Prints a markdown table.
set -u
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
B=.devbin; W=/tmp/bm; mkdir -p $W/mnt
$B/gen_model $W/model 2200 >/dev/null
$B/llmfs --store $W/s add m $W/model >/dev/null
$B/llmfs --store $W/s quantize q8 --base m >/dev/null
$B/llmfs --store $W/s quantize q4 --base m --bits 4 --group-size 128 >/dev/null
$B/llmfs --store $W/s cast f32 --base m --dtype f32 >/dev/null
echo "| backend | variant | first read GB/s | re-read GB/s |"; echo "|---|---|---|---|"
for backend in cpu gpu auto; do
  $B/llmfs --store $W/s mount $W/mnt --backend $backend --cache-size 2GiB || { tail -5 $W/s/llmfs.log; continue; }
  for v in q8 q4 f32; do
    f=$(ls $W/mnt/$v/*.safetensors | head -1)
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
    a=$(dd if=$f of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1), $NF}')
    b=$(dd if=$f of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1), $NF}')
    echo "| $backend | $v | $a | $b |"
  done
  grep -E "calibration|backend" $W/s/llmfs.log | tail -6 | sed 's/^/    /' >&2
  $B/llmfs umount $W/mnt
done
echo; nproc; nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null
