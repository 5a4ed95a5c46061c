"""Where a training step's time went, per run: horizontal stacked bars from `slowllama bench --json` lines.

    python benchmarks/plot_breakdown.py --out static/step_breakdown.png \
        --panel "TITLE" "LABEL=FILE.jsonl" ... [--panel "TITLE" "LABEL=FILE.jsonl" ...]

Each FILE is the output of `python -m slowllama bench ... --json` (one JSON object per step, then a
summary) or of `benchmarks/fsdp2_offload.py --json` (a summary only). Each --panel is one subplot
with its own time axis (the runs' step times differ by two orders of magnitude), stacked vertically.

A bar is the median step after the first (bench's median: for an even count, the mean of the two
middle steps, parts included), split into:
  waiting on reads   pipeline.read_wait: the compute thread blocked on a module read (SSD/page cache)
  waiting on writes  pipeline.write_wait: blocked on the write queue or the final flush
  matmuls at peak    the step's hardware FLOPs / the measured bf16 matmul peak (roofline's compute tier),
                     capped at what is left of the step
  rest               everything else the compute thread did: non-matmul kernels, launches and syncs,
                     matmuls below peak, host<->device copies, commit
The black diamond is the roofline bound (the slowest tier: storage, PCIe or compute). Runs with no
per-step lines get one hatched bar (FSDP2: total only) or, if the file is empty, the last line of
the .log beside it (a failed or refused run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SEGMENTS = [("read_wait", "waiting on reads", "#4c72b0"),
            ("write_wait", "waiting on writes", "#dd8452"),
            ("matmul", "matmuls at measured peak", "#55a868"),
            ("rest", "rest of the compute thread", "#c7c7c7")]


def load(spec: str) -> dict:
    """One run from 'LABEL=PATH': its median step's split, bound and totals, or why there is none."""
    label, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"plot_breakdown.py: expected LABEL=PATH, got {spec!r}")
    path = Path(path)
    objs = [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]
    steps = [o for o in objs if "tier_seconds" in o]
    if steps:
        kept = sorted(steps[1:] if len(steps) > 1 else steps, key=lambda s: s["seconds"])
        middle = kept[(len(kept) - 1) // 2: len(kept) // 2 + 1]  # one step, or the two middle ones
        parts = {k: 0.0 for k, _, _ in SEGMENTS}
        for s in middle:
            busy = max(s["seconds"] - s["read_wait"] - s["write_wait"], 0.0)
            matmul = min(s["tier_seconds"]["compute"], busy)
            for k, v in (("read_wait", s["read_wait"]), ("write_wait", s["write_wait"]), ("matmul", matmul),
                         ("rest", busy - matmul)):
                parts[k] += v / len(middle)
        mean = lambda key: sum(s[key] for s in middle) / len(middle)  # noqa: E731
        return {"label": label, "seconds": mean("seconds"), "parts": parts, "bound": mean("bound_seconds"),
                "steps": [s["step"] for s in middle]}
    if objs and "seconds_per_step" in objs[-1]:  # fsdp2_offload.py: median only
        return {"label": label, "seconds": objs[-1]["seconds_per_step"], "parts": None}
    log = path.with_suffix(".log")
    why = "no steps recorded"
    if log.exists():
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        if lines:
            why = lines[-1].strip()
    return {"label": label, "seconds": None, "parts": None, "why": why}


def draw(ax, runs: list[dict], title: str) -> None:
    ys = list(range(len(runs)))[::-1]
    right = max([r["seconds"] for r in runs if r["seconds"]] + [r.get("bound", 0) for r in runs]) * 1.45
    for y, r in zip(ys, runs):
        if r["seconds"] is None:
            ax.text(0.01 * right, y, "no data: " + r["why"][:70], va="center", fontsize=7.5, color="#a00000")
            continue
        if r["parts"] is None:
            ax.barh(y, r["seconds"], color="white", edgecolor="#555555", hatch="///", height=0.6)
        else:
            left = 0.0
            for key, _, color in SEGMENTS:
                ax.barh(y, r["parts"][key], left=left, color=color, height=0.6)
                left += r["parts"][key]
            ax.plot([r["bound"]], [y], marker="D", color="black", markersize=6, zorder=5)
        note = f"{r['seconds']:.2f} s" if r["seconds"] < 10 else f"{r['seconds']:.1f} s"
        if r.get("bound"):
            note += f"  (bound {r['bound']:.2f} s = {100 * r['bound'] / r['seconds']:.0f}%)"
        ax.text(max(r["seconds"], r.get("bound") or 0) + 0.01 * right, y, note, va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["label"] for r in runs], fontsize=8.5)
    ax.set_xlim(0, right)
    ax.set_xlabel("seconds per step (median of the steps after the first)", fontsize=8.5)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--panel", nargs="+", action="append", default=[], metavar="TITLE LABEL=PATH",
                   help="a subplot: its title, then its runs")
    p.add_argument("--out", default="static/step_breakdown.png")
    p.add_argument("--title", default="Llama-2-7B-shaped random store, bf16, H100 80GB: where a step's time went")
    a = p.parse_args()
    panels = [([load(spec) for spec in runs], title) for title, *runs in a.panel if runs]
    if not panels:
        raise SystemExit("plot_breakdown.py: no runs given (--panel TITLE LABEL=PATH ...)")
    rows = [len(runs) + 1.6 for runs, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.8 + 0.34 * sum(rows)), squeeze=False,
                             gridspec_kw={"height_ratios": rows})
    for ax, (runs, title) in zip(axes[:, 0], panels):
        draw(ax, runs, title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in SEGMENTS]
    handles += [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="#555555", hatch="///"),
                plt.Line2D([], [], marker="D", color="black", linestyle="none")]
    labels = [name for _, name, _ in SEGMENTS] + ["total only (no split recorded)", "roofline bound"]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(a.title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
