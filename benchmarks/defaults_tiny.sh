#!/usr/bin/env bash
# The defaults study (issue 17): loss curves of full fine-tuning on the tiny model for a few
# optimizer / lr choices, at finetune's batch shape (4 x 128 tokens, 100 steps), on the CPU,
# with 4 of alice.txt's 40 windows held out (--val-split 0.1) and evaluated every 25 steps.
#   benchmarks/defaults_tiny.sh OUTDIR [JOBS]
set -euo pipefail
out=${1:?OUTDIR}; jobs=${2:-4}
mkdir -p "$out"
python -m slowllama init-tiny "$out/tiny" --force >/dev/null 2>&1
python -m slowllama prepare "$out/tiny" "$out/base" --force >/dev/null 2>&1
configs=(
  "sgd 1e-4" "sgd 1e-3" "sgd 1e-2" "sgd 3e-2" "sgd 1e-1" "sgd 3e-1"
  "adamw 1e-4" "adamw 3e-4" "adamw 1e-3" "adamw 3e-3" "adamw 1e-2"
  "lion 1e-4" "lion 3e-4" "lion 1e-3"
)
run_one() {
  local opt=$1 lr=$2 name="$1_$2"
  cp -r "$out/base" "$out/$name"
  OMP_NUM_THREADS=1 python -m slowllama finetune "$out/$name" --data test_data/alice.txt --optimizer "$opt" --lr "$lr" \
    --steps 100 --batch-size 4 --seq-len 128 --val-split 0.1 --eval-every 25 --device cpu --json --log-every 0 \
    >"$out/$name.jsonl" 2>"$out/$name.log"
  rm -rf "$out/$name"
}
export -f run_one; export out
printf '%s\n' "${configs[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}'
python - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| optimizer | lr | train loss step 1 | step 25 | step 50 | step 100 | eval loss 25 / 50 / 75 / 100 |")
print("|---|---|---|---|---|---|---|")
for f in sorted(out.glob("*.jsonl"), key=lambda p: (p.stem.split("_")[0], float(p.stem.split("_")[1]))):
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.startswith("{")]
    loss = {r["step"]: r["loss"] for r in rows}
    ev = [f"{r['eval_loss']:.3f}" for r in rows if "eval_loss" in r]
    opt, lr = f.stem.split("_")
    def at(s): return f"{loss[s]:.3f}" if s in loss else "-"
    print(f"| {opt} | {lr} | {at(1)} | {at(25)} | {at(50)} | {at(100)} | {' / '.join(ev)} |")
PY
