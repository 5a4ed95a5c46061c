#!/usr/bin/env bash
# The GPU benchmark runs of benchmarks/RESULTS.md, in stages (each under the device tool's 10 minutes).
#   bash benchmarks/h100.sh STAGE   with $OUT set: every run's JSON lines and logs go there
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S7=/tmp/bench-7b          # random Llama-2-7B-shaped store, bf16 (reused by the runs of a stage)
bench() {  # bench NAME ARGS...: one run, its JSON lines in $OUT/NAME.jsonl, its log in $OUT/NAME.log
    local name=$1; shift
    echo "== $name: slowllama bench $*"
    timeout 540 python -m slowllama bench "$@" --json > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
    echo "exit $?"; tail -n 1 "$OUT/$name.jsonl" | python -c "
import json, sys
s = json.loads(sys.stdin.read() or '{}'); m = s.get('median', {})
print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}, 'peak_gpu', s.get('peak_gpu_bytes'), 'peak_rss', s.get('peak_rss_bytes'))"
    grep -v '^{' "$OUT/$name.log" | tail -n 3
}
case "${1:-}" in
smoke)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
    df -h /tmp | tail -1; free -g | head -2; nproc
    python -m pytest -q tests/test_cuda.py 2>&1 | tail -3
    bench tiny --preset tiny --device cuda --steps 3 --probe-size 64M
    ;;
resident)  # the original's settings: full FT SGD 16x256 and LoRA r4 wq,wv 16x128; the model stays on the GPU
    bench sgd_16x256_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 1G
    bench lora4_16x128 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 128 --steps 4 --lora-rank 4 --probe-size 1G
    bench sgd_16x256_resident_commit_each --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --save-every 1 --probe-size 1G
    ;;
ssd)  # SSD-bound: host 4 GiB, GPU 8 GiB, page cache dropped
    bench sgd_ssd --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 2G
    bench sgd_ssd_sync --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 2 --max-memory 4G --max-gpu-memory 8G --drop-cache --no-prefetch --no-async-writes --probe-size 2G
    ;;
adamw)  # AdamW: SSD-bound on 8 layers (the disk holds neither 32 layers' moments twice), then RAM/GPU-resident
    S8=/tmp/bench-7b-8l
    bench adamw_ssd_8layers --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --max-memory 4G --max-gpu-memory 16G --drop-cache --probe-size 1G
    rm -rf $S8
    bench adamw_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 1G
    echo "== fsdp2"; timeout 400 python benchmarks/fsdp2_offload.py --preset 7b --batch-size 16 --seq-len 256 --warmup 2 --steps 3 --json > $OUT/fsdp2.jsonl 2> $OUT/fsdp2.log; echo "exit $?"; tail -n 2 $OUT/fsdp2.jsonl; tail -n 3 $OUT/fsdp2.log
    ;;
tokens)  # more tokens per step amortize the same SSD traffic (GPU 24 GiB holds the step's activations)
    for k in 1 4 8; do
        bench sgd_ssd_k$k --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate $k --steps 2 --max-memory 4G --max-gpu-memory 24G --drop-cache --probe-size 1G
    done
    bench sgd_resident_k8 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --save-every 100 --probe-size 1G
    ;;
layers)  # step time against depth, SSD-bound
    for l in 8 16; do
        bench sgd_ssd_${l}layers --preset 7b --layers $l --store-dir /tmp/bench-7b-$l --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
        rm -rf /tmp/bench-7b-$l
    done
    ;;
fused)  # session 3: the cuda tests, then torch.compile'd blocks against eager ones (8 layers), and a profile
    python -m pytest -q tests/test_cuda.py 2>&1 | tail -n 4
    S8=/tmp/bench-7b-8l
    bench sgd8_eager --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 256M
    bench sgd8_compile --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 256M --compile
    python benchmarks/profile_step.py --layers 8 --steps 3 --compile > $OUT/profile_compile.txt 2>&1; echo "profile exit $?"; head -n 3 $OUT/profile_compile.txt
    ;;
fused7b)  # session 3: the 7B shape with compiled blocks, 1 and 8 microbatches, resident
    bench sgd_16x256_compile --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 1G --compile
    bench sgd_k8_compile --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --save-every 100 --probe-size 1G --compile
    ;;
hostram2)  # session 3: modules (and AdamW moments) in host RAM, copies both ways at once; activations pinned
    bench adamw_hostram --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 1G
    bench sgd_host_k8 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --max-memory 24G --max-gpu-memory 12G --save-every 100 --probe-size 1G
    bench sgd_host_k8_compile --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --max-memory 24G --max-gpu-memory 12G --save-every 100 --probe-size 1G --compile
    ;;
compiled)  # session 3, after --compile auto became the default on cuda: the cuda tests, AdamW from host RAM, K=16 streamed
    python -m pytest -q tests/test_cuda.py 2>&1 | tail -n 3
    bench adamw_hostram_compiled --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 1G
    bench sgd_host_k16_compiled --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 16 --steps 3 --max-memory 40G --max-gpu-memory 12G --save-every 100 --probe-size 1G
    ;;
fusedupd)  # session 3: fused updates (SGD, AdamW); 8-layer SGD, the AdamW host-RAM profile
    python -m pytest -q tests/test_cuda.py 2>&1 | tail -n 2
    S8=/tmp/bench-7b-8l
    bench sgd8_fused --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 256M
    python benchmarks/profile_step.py --layers 8 --steps 3 --compile > $OUT/profile_sgd8_fused.txt 2>&1; echo "profile exit $?"; head -n 1 $OUT/profile_sgd8_fused.txt
    python benchmarks/profile_step.py --layers 8 --steps 3 --compile --optimizer adamw --gpu-budget 4 > $OUT/profile_adamw8_host.txt 2>&1; echo "profile exit $?"; head -n 1 $OUT/profile_adamw8_host.txt
    ;;
fusedupd7b)  # session 3: fused updates on the 7B shape: SGD and AdamW resident, AdamW from host RAM
    bench sgd_16x256_fused --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 1G
    bench adamw_resident_fused --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 1G
    bench adamw_hostram_fused --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 1G
    ;;
host3)  # session 3: a host-resident module copied to the GPU once per use (not again for its update)
    bench adamw_hostram_3 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 1G
    bench sgd_host_k8_3 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --max-memory 24G --max-gpu-memory 12G --save-every 100 --probe-size 1G
    ;;
io3)  # session 3: files fsynced in the background (the disk flushes one while the next is written)
    bench sgd_commit_each_3 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --save-every 1 --probe-size 1G
    bench sgd_ssd_3 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 2G
    bench sgd_resident_k8_3 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --save-every 100 --probe-size 1G
    ;;
rows)  # session 3: the embeddings written back as row patches (SSD-bound SGD), AdamW SSD-bound again
    python -m pytest -q tests/test_cuda.py 2>&1 | tail -n 2
    bench sgd_ssd_rows --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    rm -rf $S7
    bench adamw_ssd_8layers_3 --preset 7b --layers 8 --store-dir /tmp/bench-7b-8l --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --max-memory 12G --max-gpu-memory 16G --drop-cache --probe-size 1G
    ;;
parts)  # session 4: AdamW's state streamed in parts: SSD-bound at the issue's 4 GiB host / 8 GiB GPU (8 layers)
    python -m pytest -q tests/test_cuda.py 2>&1 | tail -n 2
    S8=/tmp/bench-7b-8l
    bench adamw_ssd_8layers_4g8g --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench sgd_ssd_8layers_4g8g --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    ;;
parts2)  # session 4: the resident and host-RAM AdamW steps with state in parts (32 layers)
    bench adamw_resident_parts --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 1G
    bench adamw_hostram_parts --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 1G
    bench sgd_16x256_resident_parts --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 1G
    ;;
more|final|prefetch|hostram) ;;
*) echo "usage: h100.sh smoke|resident|ssd|adamw|tokens|layers|more|final|prefetch|hostram|fused|fused7b|hostram2|compiled|fusedupd|fusedupd7b|host3|io3|rows|parts|parts2"; exit 2 ;;
esac
# stage "more": AdamW SSD-bound (8 layers) and the token sweep, in one call
if [ "${1:-}" = more ]; then
    S8=/tmp/bench-7b-8l
    bench adamw_ssd_8layers --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --max-memory 4G --max-gpu-memory 16G --drop-cache --probe-size 1G
    rm -rf $S8
    for k in 1 4 8; do
        bench sgd_ssd_k$k --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate $k --steps 2 --max-memory 4G --max-gpu-memory 24G --drop-cache --probe-size 1G
    done
    bench sgd_resident_k8 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --save-every 100 --probe-size 1G
fi
# stage "final": AdamW SSD-bound (8 layers), streaming over PCIe at 8 microbatches, depth, FSDP2 with fused Adam
if [ "${1:-}" = final ]; then
    S8=/tmp/bench-7b-8l
    bench adamw_ssd_8layers --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --max-memory 12G --max-gpu-memory 16G --drop-cache --probe-size 1G
    bench sgd_ssd_8layers --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 2 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    rm -rf $S8
    bench sgd_host_k8 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --max-memory 24G --max-gpu-memory 12G --save-every 100 --probe-size 1G
    bench sgd_host_k8_compile --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --max-memory 24G --max-gpu-memory 12G --save-every 100 --probe-size 1G --compile
    echo "== fsdp2 fused"; timeout 300 python benchmarks/fsdp2_offload.py --preset 7b --batch-size 16 --seq-len 256 --warmup 2 --steps 3 --adam fused --json > $OUT/fsdp2_fused.jsonl 2> $OUT/fsdp2_fused.log; echo "exit $?"; tail -n 1 $OUT/fsdp2_fused.jsonl; tail -n 2 $OUT/fsdp2_fused.log
fi
# stage "prefetch": what read-ahead and background writes gain, SSD-bound on 8 layers (the same store, both ways)
if [ "${1:-}" = prefetch ]; then
    S8=/tmp/bench-7b-8l
    git rev-parse HEAD > $OUT/commit.txt 2>/dev/null
    bench sgd_ssd_8layers --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench sgd_ssd_8layers_sync --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --no-prefetch --no-async-writes --probe-size 1G
fi
# stage "hostram": the model (and AdamW's state) held in host RAM, the GPU holding only what is in flight
if [ "${1:-}" = hostram ]; then
    bench adamw_hostram --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 1G
    bench sgd_hostram --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --save-every 100 --max-memory 100G --max-gpu-memory 8G --probe-size 1G
fi
