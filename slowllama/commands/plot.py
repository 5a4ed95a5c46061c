"""loss.png: train and eval loss against steps, from a run's metrics.jsonl (matplotlib, optional)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from slowllama.errors import SlowllamaError
from slowllama.settings import PlotSettings
from slowllama.store.destination import check_output_file
from slowllama.store.safe_files import check_regular, open_new

PNG = b"\x89PNG\r\n\x1a\n"  # the start of every PNG: an existing --out is replaced only if it is one
MISSING = "matplotlib is not installed (pip install 'slowllama[plot]')"


def read_metrics(path: Path) -> list[dict]:
    """The last run's lines of a metrics.jsonl: a step not above the one before starts a new run."""
    rows = []
    check_regular(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SlowllamaError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
            if not all(isinstance(row.get(k, 0.0), (int, float)) for k in ("loss", "eval_loss")):
                raise TypeError
        except (ValueError, KeyError, TypeError, OverflowError):
            raise SlowllamaError(f"{path}:{number}: not a metrics line (JSON with a 'step')") from None
        if rows and step <= rows[-1]["step"]:
            rows = []
        rows.append(row)
    return rows


def plot_losses(rows: list[dict], out: Path, title: str = "") -> Path:
    """Write the chart of train loss (every step) and eval loss (where computed) to out; raises ImportError."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend

    fig = Figure(figsize=(7, 4), dpi=100, layout="tight")
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        with open_new(tmp) as f:  # never through a link planted at the temporary name
            fig.savefig(f, format="png")
        os.replace(tmp, out)
    finally:
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()
    return out


def plot_run(run_dir: Path, log: Callable[[str], None], out: Optional[Path] = None) -> Optional[Path]:
    """At the end of a run: loss.png beside metrics.jsonl, or one log line if matplotlib is missing."""
    try:
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        return plot_losses(rows, out or Path(run_dir) / "loss.png", title=Path(run_dir).resolve().parent.name)
    except ImportError:
        log(f"loss plot skipped: {MISSING}")
    except (SlowllamaError, OSError) as e:  # the run itself succeeded: say why there is no chart, go on
        log(f"loss plot skipped: {e}")
    return None


def find_metrics(path: Path) -> Path:
    """metrics.jsonl of a store (STORE/run/) or of a run folder."""
    path = Path(path)
    for candidate in (path / "run" / "metrics.jsonl", path / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    raise SlowllamaError(f"{path}: no metrics.jsonl here or in {path / 'run'} (is it a store that has been "
                         "fine-tuned?)")


def run(s: PlotSettings, log: Callable[[str], None]) -> None:
    """`slowllama plot`: an explicit request, so a missing matplotlib is an error here."""
    metrics = find_metrics(Path(s.run))
    rows = read_metrics(metrics)
    if not rows:
        raise SlowllamaError(f"{metrics}: no steps recorded yet")
    out = check_output_file(Path(s.out) if s.out else metrics.parent / "loss.png", magic=PNG)
    try:
        log(f"wrote {plot_losses(rows, out, title=metrics.parent.resolve().parent.name)}")
    except ImportError:
        raise SlowllamaError(f"cannot plot: {MISSING}") from None
    except OSError as e:
        raise SlowllamaError(f"{out}: cannot write ({e.strerror})") from None
