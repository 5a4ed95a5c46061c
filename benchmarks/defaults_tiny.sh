#!/usr/bin/env bash
# The defaults study (issue 17): loss curves of full fine-tuning on the tiny model for a few
# optimizer / lr choices at finetune's default batch (4 windows of 128 tokens, 100 steps), on the CPU
# (one thread per run, 16 runs at once), with 4 of alice.txt's 40 windows held out (--val-split 0.1)
# and evaluated every 25 steps. Prints the table of benchmarks/tiny-defaults/table.md.
#   PYTHONPATH=. bash benchmarks/defaults_tiny.sh OUTDIR
set -euo pipefail
out=${1:?OUTDIR}; mkdir -p "$out"
python -m slowllama init-tiny "$out/tiny" >/dev/null 2>&1
python -m slowllama prepare "$out/tiny" "$out/base" >/dev/null 2>&1
run_one() { n=$(echo "$*" | tr ' ' '_'); cp -r "$out/base" "$out/$n"
  OMP_NUM_THREADS=1 python -m slowllama finetune "$out/$n" --data test_data/alice.txt --optimizer "$1" --lr "$2" "${@:3}" \
    --steps 100 --batch-size 4 --seq-len 128 --val-split 0.1 --eval-every 25 --device cpu --json --log-every 0 \
    >"$out/$n.jsonl" 2>"$out/$n.log"
  rm -rf "${out:?}/$n"; }
export -f run_one; export out
printf '%s\n' "sgd 1e-4" "sgd 1e-3" "sgd 1e-2" "sgd 3e-2" "sgd 1e-1" "sgd 3e-1" "sgd 1" \
  "adamw 1e-4" "adamw 3e-4" "adamw 1e-3" "adamw 3e-3" "adamw 1e-2" "lion 1e-4" "lion 3e-4" "lion 1e-3" \
  "adamw 1e-3 --warmup-steps 10 --lr-schedule cosine" "adamw 3e-3 --warmup-steps 10 --lr-schedule cosine" \
  "sgd 3e-1 --warmup-steps 10 --lr-schedule cosine" | xargs -P 16 -I{} bash -c 'run_one {}'
python - "$out" <<'PY'
import json, sys, pathlib, statistics as st
out = pathlib.Path(sys.argv[1])
print("| run | train loss: step 1 | mean of steps 11-20 | 41-50 | 91-100 | eval loss at 25 / 50 / 75 / 100 |")
print("|---|---|---|---|---|---|")
for f in sorted(out.glob("*.jsonl")):
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.startswith("{")]
    loss = {r["step"]: r["loss"] for r in rows}
    ev = [f"{r['eval_loss']:.3f}" for r in rows if "eval_loss" in r]
    m = lambda a, b: f"{st.mean(loss[s] for s in range(a, b + 1)):.3f}" if b in loss else "-"
    print(f"| {f.stem.replace('_', ' ')} | {loss.get(1, 0):.3f} | {m(11, 20)} | {m(41, 50)} | {m(91, 100)} | {' / '.join(ev)} |")
PY
