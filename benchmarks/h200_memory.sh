#!/usr/bin/env bash
# The memory-scale rows of RESULTS.md: big shapes under small budgets, page cache dropped, peaks beside budgets.
#   bash benchmarks/h200_memory.sh STAGE     ($OUT: JSON lines and logs of every run)
# Stages: check (the CUDA tests), mac70 (70B cut to 4 layers under 12 GiB in all: host 4G + GPU 8G),
# small (13B within 8 GiB, 7B within 6 GiB, cut to 8 layers: streaming is per block, the budgets do not
# depend on the number of layers), old (OLD=checkout: the same runs of the old commit, refused or not).
set -u
cd "$(dirname "$0")/.."
NEW=$PWD
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bench() {  # bench WHICH NAME ARGS...: one run of the checkout WHICH (new|old)
    local which=$1 name=$2; shift 2
    local dir=$NEW; [ "$which" = old ] && dir=${OLD:?set OLD}
    echo "== $which $name: slowllama bench $*"
    (cd "$dir" && PYTHONPATH=$dir timeout 500 python3 -m slowllama bench "$@" --json) > "$OUT/$which-$name.jsonl" 2> "$OUT/$which-$name.log"
    echo "exit $?"; tail -n 1 "$OUT/$which-$name.jsonl" | python3 -c "
import json, sys
s = json.loads(sys.stdin.read() or '{}'); m = s.get('median', {})
g = lambda k: round((s.get(k) or 0) / 2**30, 2)
print('  median s/step', round(m.get('seconds') or 0, 3), 'bound', round(m.get('bound_seconds') or 0, 3),
      'eff', round(m.get('efficiency') or 0, 3), 'unit', s.get('stream_unit'), s.get('read_ahead'), s.get('writes_in_flight'),
      'peak RSS GiB', g('peak_rss_bytes'), 'of', g('budget_host_bytes'),
      'peak GPU GiB', g('peak_gpu_bytes'), 'of', g('budget_gpu_bytes'))"
    grep -v '^{' "$OUT/$which-$name.log" | grep -v "^measuring\|^timing" | tail -n 3
    python3 -c "
import json
for line in open('$OUT/$which-$name.jsonl'):
    r = json.loads(line)
    if 'summary' not in r: print('  step', r['step'], round(r['seconds'], 3), 'waits', round(r.get('read_wait', 0), 2), round(r.get('write_wait', 0), 2), 'bound', round(r['bound_seconds'], 3), r['bound_tier'], 'read GB', round(r['bytes_read'] / 1e9, 2), 'written GB', round(r['bytes_written'] / 1e9, 2), 'loss', round(r['loss'], 5))"
}
S70=/tmp/bench-70b4; S13=/tmp/bench-13b8; S7=/tmp/bench-7b8
case "${1:-}" in
check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; df -h /tmp | tail -1
    python3 -m pytest -q -x tests/test_cuda.py 2>&1 | tail -n 3
    ;;
mac70)  # a 16 GB Mac's share: host 4 GiB + GPU 8 GiB
    bench new 70b_sgd_1x512 --preset 70b --layers 4 --store-dir $S70 --batch-size 1 --seq-len 512 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench new 70b_sgd_4x256 --preset 70b --layers 4 --store-dir $S70 --batch-size 4 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench new 70b_lora8_4x256 --preset 70b --layers 4 --store-dir $S70 --batch-size 4 --seq-len 256 --steps 3 --lora-rank 8 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    ;;
small)
    bench new 70b_sgd_1x512-2 --preset 70b --layers 4 --store-dir $S70 --batch-size 1 --seq-len 512 --steps 2 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench new 13b_sgd_16x256_8G --preset 13b --layers 8 --store-dir $S13 --batch-size 16 --seq-len 256 --steps 2 --max-memory 3G --max-gpu-memory 5G --drop-cache --probe-size 1G
    bench new 7b_sgd_16x256_6G --preset 7b --layers 8 --store-dir $S7 --batch-size 16 --seq-len 256 --steps 2 --max-memory 2G --max-gpu-memory 4G --drop-cache --probe-size 1G
    bench new 7b_adamw_16x256_6G --preset 7b --layers 8 --store-dir $S7 --batch-size 16 --seq-len 256 --steps 2 --optimizer adamw --max-memory 2G --max-gpu-memory 4G --drop-cache --probe-size 1G
    ;;
last)  # after exact-size pinned buffers: the CUDA tests that stream through them, the small budgets, 70B again
    python3 -m pytest -q -x tests/test_cuda.py -k "tight or host or adamw" 2>&1 | tail -n 2
    bench new 13b_sgd_16x256_8G-2 --preset 13b --layers 8 --store-dir $S13 --batch-size 16 --seq-len 256 --steps 2 --max-memory 3G --max-gpu-memory 5G --drop-cache --probe-size 256M
    bench new 7b_sgd_16x256_6G --preset 7b --layers 8 --store-dir $S7 --batch-size 16 --seq-len 256 --steps 2 --max-memory 1536M --max-gpu-memory 4608M --drop-cache --probe-size 256M
    bench new 7b_adamw_16x256_6G --preset 7b --layers 8 --store-dir $S7 --batch-size 16 --seq-len 256 --steps 2 --optimizer adamw --max-memory 1536M --max-gpu-memory 4608M --drop-cache --probe-size 256M
    bench new 70b_sgd_4x256-2 --preset 70b --layers 4 --store-dir $S70 --batch-size 4 --seq-len 256 --steps 2 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 256M
    bench new 70b_lora8_4x256-2 --preset 70b --layers 4 --store-dir $S70 --batch-size 4 --seq-len 256 --steps 3 --lora-rank 8 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 256M
    ;;
old)
    bench old 70b_sgd_1x512 --preset 70b --layers 4 --store-dir $S70 --batch-size 1 --seq-len 512 --steps 2 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 64M
    bench old 13b_sgd_16x256_8G --preset 13b --layers 8 --store-dir $S13 --batch-size 16 --seq-len 256 --steps 2 --max-memory 3G --max-gpu-memory 5G --drop-cache --probe-size 64M
    ;;
*) echo "usage: $0 check|mac70|small|last|old"; exit 2 ;;
esac
