#!/usr/bin/env bash
# Several GPUs: the runs of benchmarks/RESULTS.md's "two GPUs" section, on nvidia-h200-x2.
#   OUT=... bash benchmarks/h200x2.sh sgd|adamw|more|ssd   (JSON lines in $OUT/NAME.jsonl, all logs in $OUT/all.log)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S7=/tmp/bench-7b   # random Llama-2-7B-shaped store, bf16
TORCHRUN="python -m torch.distributed.run --standalone --nproc-per-node 2"
bench() {  # bench NAME LAUNCHER ARGS...: one run of `slowllama bench`
    local name=$1 launcher=$2; shift 2
    echo "== $name: $launcher -m slowllama bench $*" | tee -a "$OUT/all.log"
    timeout 240 $launcher -m slowllama bench "$@" --json > "$OUT/$name.jsonl" 2>> "$OUT/all.log"
    echo "exit $?"; tail -n 1 "$OUT/$name.jsonl" | python -c "
import json, sys
s = json.loads(sys.stdin.read() or '{}'); m = s.get('median', {})
print({k: round(m[k], 4) for k in ('seconds', 'tokens_per_second', 'mfu', 'bound_seconds', 'efficiency') if m.get(k) is not None}, 'peak_gpu', s.get('peak_gpu_bytes'))"
}
nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m | head -4
if [ "${1:-}" = sgd ]; then
# correctness on GPUs (NCCL): a tiny fp32 model, 3 SGD steps, 2 ranks against 1
T=/tmp/tiny-check; rm -rf $T; mkdir -p $T
{ python -m slowllama init-tiny $T/model --dtype fp32 --layers 2 --dim 64 --shards 1 && python -m slowllama prepare $T/model $T/base
  cp -r $T/base $T/one; cp -r $T/base $T/two
  A="--device cuda --compute-dtype fp32 --steps 3 --batch-size 2 --accumulate 2 --seq-len 16 --lr 0.05 --optimizer adamw --dropout 0.1 --log-every 0 --eval-every 0 --data test_data/alice.txt --max-gpu-memory 64M"
  python -m slowllama finetune $T/one $A && $TORCHRUN -m slowllama finetune $T/two $A
  python - $T/one $T/two <<'PY'
import sys, torch
from slowllama.store.store import Store
a, b = (Store.open(p) for p in sys.argv[1:])
worst = 0.0
for kind, files in a.manifest.files.items():
    for name in files:
        x, y = a.read(name, kind), b.read(name, kind)
        for k in x:
            worst = max(worst, ((x[k].double() - y[k].double()).abs().max() / x[k].double().abs().max().clamp_min(1e-12)).item())
print(f"NCCL check: 2 ranks vs 1, 3 AdamW steps fp32 on cuda, worst relative difference {worst:.3g}")
PY
} > $OUT/tiny_check.log 2>&1; tail -n 3 $OUT/tiny_check.log
# 7B, bf16, model resident (replicated on rank 1), same global batch on 1 and 2 GPUs
for k in 1 8; do
    bench sgd_k${k}_1gpu python --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate $k --steps 4 --save-every 100 --probe-size 1G
    bench sgd_k${k}_2gpu "$TORCHRUN" --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate $k --steps 4 --save-every 100 --probe-size 1G
done
fi
if [ "${1:-}" = adamw ]; then
bench adamw_k1_1gpu python --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 1G
bench adamw_k1_2gpu "$TORCHRUN" --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 1G
fi
if [ "${1:-}" = more ]; then  # AdamW at 8 microbatches; streaming from the SSD (rank 1 gets every module by broadcast)
bench adamw_k8_1gpu python --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 1G
bench adamw_k8_2gpu "$TORCHRUN" --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --accumulate 8 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 1G
rm -rf $S7
S8=/tmp/bench-7b-8l
bench sgd_ssd8_k4_1gpu python --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --accumulate 4 --steps 3 --max-memory 6G --max-gpu-memory 7G --drop-cache --probe-size 1G
bench sgd_ssd8_k4_2gpu "$TORCHRUN" --preset 7b --layers 8 --store-dir $S8 --batch-size 16 --seq-len 256 --accumulate 4 --steps 3 --max-memory 6G --max-gpu-memory 7G --drop-cache --probe-size 1G
fi
if [ "${1:-}" = ssd ]; then  # streaming from the SSD on 2 GPUs (a rank that waits too long prints its stacks)
( sleep 200; for p in $(pgrep -f "slowllama bench"); do grep -q torch.distributed.run /proc/$p/cmdline || kill -USR1 $p; done ) &
bench sgd_ssd8_k4_2gpu "$TORCHRUN" --preset 7b --layers 8 --store-dir /tmp/bench-7b-8l --batch-size 16 --seq-len 256 --accumulate 4 --steps 3 --max-memory 6G --max-gpu-memory 7G --drop-cache --probe-size 1G
fi
