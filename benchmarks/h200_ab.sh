#!/usr/bin/env bash
# Old commit against new commit, back to back on one machine: the bench rows of RESULTS.md's latest table.
#   OLD=folder-with-the-old-checkout bash benchmarks/h200_ab.sh STAGE    ($OUT: JSON lines and logs of every run)
# Each pair runs old, then new (REPEAT=1: then new, old again, so that drift in the machine shows).
set -u
cd "$(dirname "$0")/.."
NEW=$PWD
OLD=${OLD:?set OLD to a checkout of the commit to compare with}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S7=/tmp/bench-7b
bench() {  # bench WHICH NAME ARGS...: one run of the checkout WHICH (old|new)
    local which=$1 name=$2; shift 2
    local dir=$NEW; [ "$which" = old ] && dir=$OLD
    echo "== $which $name: slowllama bench $*"
    (cd "$dir" && PYTHONPATH=$dir timeout 560 python3 -m slowllama bench "$@" --json) > "$OUT/$which-$name.jsonl" 2> "$OUT/$which-$name.log"
    echo "exit $?"; tail -n 1 "$OUT/$which-$name.jsonl" | python3 -c "
import json, sys
s = json.loads(sys.stdin.read() or '{}'); m = s.get('median', {})
print('  median s/step', round(m.get('seconds') or 0, 4), 'eff', round(m.get('efficiency') or 0, 3),
      'mfu', round(m.get('mfu') or 0, 4), 'peak_gpu', s.get('peak_gpu_bytes'), 'peak_rss', s.get('peak_rss_bytes'))"
    grep -v '^{' "$OUT/$which-$name.log" | grep -v "^measuring\|^timing" | tail -n 2
    python3 -c "
import json
for line in open('$OUT/$which-$name.jsonl'):
    r = json.loads(line)
    if 'summary' not in r: print('  step', r['step'], round(r['seconds'], 4), 'loss', round(r['loss'], 5))"
}
ref() {  # ref NAME ARGS...: one run of benchmarks/reference_inmemory.py (issue 16's in-memory references)
    local name=$1; shift
    echo "== ref $name: python3 benchmarks/reference_inmemory.py $*"
    timeout 240 python3 benchmarks/reference_inmemory.py "$@" --json > "$OUT/ref-$name.json" 2> "$OUT/ref-$name.log"
    echo "exit $?"; grep -v "^{" "$OUT/ref-$name.log" | tail -n 3; cat "$OUT/ref-$name.json"; echo
}
pair() {  # pair NAME ARGS...: old then new (with REPEAT=1 also new then old)
    local name=$1; shift
    bench old "$name" "$@"; bench new "$name" "$@"
    if [ "${REPEAT:-0}" = 1 ]; then bench new "$name-2" "$@"; bench old "$name-2" "$@"; fi
}
case "${1:-}" in
resident)  # SGD 16x256 resident (save-every 100), LoRA r4 wq,wv 16x128: the model stays on the GPU
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print(torch.__version__)"; df -h /tmp | tail -1; nproc
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)  # build the store once
    pair sgd_16x256_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 256M
    pair lora4_16x128 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 128 --steps 4 --lora-rank 4 --probe-size 256M
    ;;
sgd_adamw)  # the resident SGD pair both ways round, then the AdamW pairs (one machine, one store)
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    REPEAT=1 pair sgd_16x256_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 5 --save-every 100 --probe-size 64M
    pair adamw_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 64M
    pair adamw_hostram --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 64M
    ;;
adamw)  # AdamW resident on the GPU, and with model + moments in host RAM (GPU 16G)
    pair adamw_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 256M
    pair adamw_hostram --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 256M
    ;;
ssd)  # SGD SSD-bound: host 4 GiB, GPU 8 GiB, page cache dropped (every step reads and writes the store)
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    bench old sgd_ssd --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps ${STEPS:-3} --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench new sgd_ssd --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps ${STEPS:-3} --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    ;;
ssd2)
    bench new sgd_ssd-2 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench old sgd_ssd-2 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    ;;
refs)  # issue 16's in-memory references (benchmarks/reference_inmemory.py), then the resident SGD and LoRA pairs
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    ref peft_lora4_16x128 peft-lora
    ref sgd_hf_16x256 sgd --impl hf
    ref sgd_ours_16x256 sgd --impl slowllama
    ref adamw_hf_16x256 adamw --impl hf
    ref adamw_ours_16x256 adamw --impl slowllama
    pair lora4_16x128 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 128 --steps 4 --lora-rank 4 --probe-size 64M
    pair sgd_16x256_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --save-every 100 --probe-size 64M
    ;;
issue16)  # the references and the new code's resident rows side by side (6 steps each), and the old AdamW row
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    ref peft_lora4_16x128 peft-lora
    ref sgd_hf_16x256 sgd --impl hf
    ref adamw_hf_16x256 adamw --impl hf
    bench new lora4_16x128 --preset 7b --store-dir $S7 --batch-size 16 --seq-len 128 --steps 6 --lora-rank 4 --probe-size 64M
    bench new sgd_16x256_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 6 --save-every 100 --probe-size 64M
    bench new adamw_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 6 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 64M
    bench old adamw_resident --preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 4 --optimizer adamw --save-every 100 --max-memory 100G --probe-size 64M
    ;;
qlora)  # issue 16: LoRA r8 B4xT256 SSD-bound (page cache dropped, host 4 GiB, GPU 8 GiB) on a bf16 7B, the same on an
    # NF4 7B, a 70B cut to 4 layers on NF4 within 4 + 4 GiB; then the SGD SSD-bound pair (no regression)
    S7Q=/tmp/bench-7b-nf4; S70Q=/tmp/bench-70b4-nf4
    SSD="--batch-size 4 --seq-len 256 --steps 3 --lora-rank 8 --drop-cache --probe-size 1G"
    bench new lora8_ssd_bf16 --preset 7b --store-dir $S7 $SSD --max-memory 4G --max-gpu-memory 8G
    bench new qlora8_ssd_nf4 --preset 7b --store-dir $S7Q --quantize nf4 $SSD --max-memory 4G --max-gpu-memory 8G
    bench new qlora8_70b4_nf4 --preset 70b --layers 4 --store-dir $S70Q --quantize nf4 $SSD --max-memory 4G --max-gpu-memory 4G
    # the pair on a store the old code builds (the new code reads older stores; not necessarily the reverse)
    bench old sgd_ssd --preset 7b --store-dir /tmp/bench-7b-ab --batch-size 16 --seq-len 256 --steps 2 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    bench new sgd_ssd --preset 7b --store-dir /tmp/bench-7b-ab --batch-size 16 --seq-len 256 --steps 2 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G
    ;;
profile)  # where the resident full-FT step's time goes (8 layers of 7B): ours and plain PyTorch's, then QLoRA rows
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    for run in "sgd" "sgd --rounding nearest" "adamw" "adamw --optim-dtype bf16 --rounding nearest"; do
        echo "== profile_step.py --layers 8 --optimizer $run"
        (cd "$NEW" && PYTHONPATH=$NEW timeout 150 python3 benchmarks/profile_step.py --layers 8 --optimizer $run) \
            > "$OUT/profile-${run// /_}.txt" 2>&1; echo "exit $?"; grep "s/step" "$OUT/profile-${run// /_}.txt"
    done
    for mode in sgd adamw; do
        echo "== reference_inmemory.py $mode --layers 8 --profile"
        timeout 120 python3 benchmarks/reference_inmemory.py $mode --layers 8 --profile > "$OUT/profile-ref-$mode.txt" 2>&1
        echo "exit $?"; grep "s/step" "$OUT/profile-ref-$mode.txt"
    done
    ;&
qlora2)  # QLoRA 7B SSD-bound (4 + 8 GiB) with the dequantization compiled, and 70B cut to 4 layers within 3 + 5 GiB
    SSD="--batch-size 4 --seq-len 256 --steps 3 --lora-rank 8 --drop-cache --probe-size 1G"
    bench new qlora8_ssd_nf4 --preset 7b --store-dir /tmp/bench-7b-nf4 --quantize nf4 $SSD --max-memory 4G --max-gpu-memory 8G
    bench new qlora8_70b4_nf4 --preset 70b --layers 4 --store-dir /tmp/bench-70b4-nf4 --quantize nf4 $SSD --max-memory 3G --max-gpu-memory 5G
    ;;
resident2)  # the resident full-FT rows side by side: plain PyTorch, old, new (default), new with plain PyTorch's
    # arithmetic (round to nearest; AdamW's moments in bf16); then a profile of the QLoRA step
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    R="--preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --save-every 100 --probe-size 64M"
    ref sgd_hf_16x256 sgd --impl hf
    bench old sgd_16x256_resident $R --steps 7
    bench new sgd_16x256_resident $R --steps 7
    bench new sgd_16x256_resident_nearest $R --steps 7 --rounding nearest
    ref adamw_hf_16x256 adamw --impl hf
    bench old adamw_resident $R --steps 6 --optimizer adamw --max-memory 100G
    bench new adamw_resident $R --steps 6 --optimizer adamw --max-memory 100G
    bench new adamw_resident_bf16_nearest $R --steps 6 --optimizer adamw --max-memory 100G --optim-dtype bf16 --rounding nearest
    bench new qlora8_ssd_nf4_profile --preset 7b --store-dir /tmp/bench-7b-nf4 --quantize nf4 --batch-size 4 --seq-len 256 \
        --steps 3 --lora-rank 8 --drop-cache --probe-size 256M --max-memory 4G --max-gpu-memory 8G --profile "$OUT/profile-qlora.txt"
    ;;
final3)  # the CUDA tests, QLoRA 7B SSD-bound again, then the no-regression pairs: AdamW in host RAM, SGD SSD-bound
    (cd "$NEW" && PYTHONPATH=$NEW timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_step_tally.py 2>&1 | tail -n 5)
    bench new qlora8_ssd_nf4 --preset 7b --store-dir /tmp/bench-7b-nf4 --quantize nf4 --batch-size 4 --seq-len 256 \
        --steps 4 --lora-rank 8 --drop-cache --probe-size 256M --max-memory 4G --max-gpu-memory 8G
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    H="--preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --optimizer adamw --save-every 100 --max-memory 100G --max-gpu-memory 16G --probe-size 64M"
    bench old adamw_hostram $H
    bench new adamw_hostram $H
    D="--preset 7b --store-dir $S7 --batch-size 16 --seq-len 256 --steps 3 --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G"
    bench old sgd_ssd $D
    bench new sgd_ssd $D
    ;;
qlora3)  # blocks given their tensors (5258b3f) against the commit before (OLD): QLoRA 7B NF4 at 4 + 8 GiB (4x256, 16x256),
    # then LoRA r4 16x128 and SGD 16x256 with the bf16 model resident
    Q="--preset 7b --store-dir /tmp/bench-7b-nf4 --quantize nf4 --seq-len 256 --lora-rank 8 --drop-cache --probe-size 256M --max-memory 4G --max-gpu-memory 8G"
    bench new qlora8_4x256 $Q --batch-size 4 --steps 6; echo "  ($SECONDS s)"
    bench old qlora8_4x256 $Q --batch-size 4 --steps 6; echo "  ($SECONDS s)"
    bench new qlora8_16x256 $Q --batch-size 16 --steps 5; echo "  ($SECONDS s)"
    bench old qlora8_16x256 $Q --batch-size 16 --steps 5; echo "  ($SECONDS s)"
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    echo "  (bf16 store built: $SECONDS s)"
    R="--preset 7b --store-dir $S7 --probe-size 64M"
    pair lora4_16x128 $R --batch-size 16 --seq-len 128 --steps 6 --lora-rank 4; echo "  ($SECONDS s)"
    pair sgd_16x256_resident $R --batch-size 16 --seq-len 256 --steps 6 --save-every 100; echo "  ($SECONDS s)"
    ;;
ssd3)  # the CUDA tests; the SSD-bound SGD pair (4 + 8 GiB, page cache dropped) on a store the old code (OLD) builds;
    # 70B cut to 4 layers, NF4, 3 + 5 GiB
    (cd "$NEW" && PYTHONPATH=$NEW timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_step_tally.py 2>&1 | tail -n 3)
    echo "  ($SECONDS s)"
    D="--preset 7b --store-dir /tmp/bench-7b-ab --batch-size 16 --seq-len 256 --steps ${STEPS:-3} --max-memory 4G --max-gpu-memory 8G --drop-cache --probe-size 1G"
    bench old sgd_ssd $D; echo "  ($SECONDS s)"
    bench new sgd_ssd $D; echo "  ($SECONDS s)"
    bench new qlora8_70b4_nf4 --preset 70b --layers 4 --store-dir /tmp/bench-70b4-nf4 --quantize nf4 --batch-size 4 --seq-len 256 \
        --steps 3 --lora-rank 8 --drop-cache --probe-size 1G --max-memory 3G --max-gpu-memory 5G; echo "  ($SECONDS s)"
    ;;
final4)  # side by side: PEFT's LoRA step and ours (16x128, bf16 model resident); the QLoRA 7B step at 4 + 8 GiB
    # under the profiler (4x256) and at 8x256; 70B cut to 4 layers, NF4, 3 + 5 GiB again
    Q="--preset 7b --store-dir /tmp/bench-7b-nf4 --quantize nf4 --seq-len 256 --lora-rank 8 --drop-cache --probe-size 256M --max-memory 4G --max-gpu-memory 8G"
    bench new qlora8_4x256_profile $Q --batch-size 4 --steps 3 --profile "$OUT/profile-qlora.txt"; echo "  ($SECONDS s)"
    bench new qlora8_8x256 $Q --batch-size 8 --steps 5; echo "  ($SECONDS s)"
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m slowllama bench --preset 7b --store-dir $S7 --steps 1 --probe-size 64M --device cuda > /dev/null 2>&1)
    echo "  (bf16 store built: $SECONDS s)"
    ref peft_lora4_16x128 peft-lora; echo "  ($SECONDS s)"
    bench new lora4_16x128 --preset 7b --store-dir $S7 --probe-size 64M --batch-size 16 --seq-len 128 --steps 6 --lora-rank 4
    echo "  ($SECONDS s)"
    bench new qlora8_70b4_nf4 --preset 70b --layers 4 --store-dir /tmp/bench-70b4-nf4 --quantize nf4 --batch-size 4 --seq-len 256 \
        --steps 3 --lora-rank 8 --drop-cache --probe-size 1G --max-memory 3G --max-gpu-memory 5G; echo "  ($SECONDS s)"
    ;;
cuda)  # the CUDA tests at the new commit
    (cd "$NEW" && PYTHONPATH=$NEW python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 5)
    ;;
*)
    echo "usage: OLD=DIR bash benchmarks/h200_ab.sh resident|sgd_adamw|adamw|ssd|ssd2|refs|issue16|qlora|profile|qlora2|resident2|final3|qlora3|ssd3|final4|cuda" >&2; exit 2
    ;;
esac
