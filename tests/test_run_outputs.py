"""What a run leaves behind: metrics.jsonl with eval_loss / eval_ppl, --json lines, loss.png, `slowllama plot`."""

import json
import math
import sys

import pytest

from slowllama.commands.finetune import finetune
from slowllama.commands.plot import plot_run, read_metrics
from slowllama.settings import FinetuneSettings

from conftest import REPO, assert_one_line_error, run_cli

SAMSUM = REPO / "test_data" / "samsum_mini.jsonl"
SAMSUM_CHAT = REPO / "test_data" / "samsum_mini_chat.jsonl"
PNG = b"\x89PNG\r\n\x1a\n"


def test_a_chat_run_from_a_config_file(store_fp32, tmp_path, cli):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{SAMSUM_CHAT}"\nval_split = 0.25\nseq_len = 96\nbatch_size = 2\nsteps = 3\n'
                   f'eval_every = 2\nlr = 0.5\ndevice = "cpu"\nlog_every = 0\n')
    proc = run_cli("finetune", store_fp32, "-c", cfg, "--lr", "0.05", "--json", check=0)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert "eval_loss" not in lines[0]
    for m in lines[1:]:  # every --eval-every steps and at the end
        assert m["eval_ppl"] == pytest.approx(math.exp(m["eval_loss"]))
        assert m["eval_tokens"] > 0
    for m in lines:
        assert m["tokens"] == 2 * 96 and {"loss", "lr", "tokens_per_second", "bytes_read", "bytes_written"} <= set(m)
        assert m["lr"] == 0.05
    assert "step 2: eval loss" in proc.stderr and "step 3: eval loss" in proc.stderr
    assert "3 of 13 records held out for validation" in proc.stderr
    run = store_fp32 / "run"
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == lines
    saved = json.loads((run / "settings.json").read_text())["settings"]  # resolved: defaults, file, command line
    assert (saved["lr"], saved["steps"], saved["val_split"], saved["seq_len"], saved["pack"], saved["optimizer"]) == (
        0.05, 3, 0.25, 96, True, "sgd")
    assert (run / "loss.png").read_bytes().startswith(PNG)
    # the plot command redraws it anywhere
    out = tmp_path / "chart.png"
    assert cli("plot", store_fp32, "--out", out).returncode == 0
    assert out.read_bytes().startswith(PNG)
    assert cli("plot", run).returncode == 0


def test_without_matplotlib_the_plot_is_skipped_with_one_line(store_fp32, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    log = []
    s = FinetuneSettings(store=str(store_fp32), data=str(SAMSUM), steps=1, batch_size=2, seq_len=64,
                         device="cpu", log_every=0)
    result = finetune(s, log=log.append, emit=lambda m: None)
    assert result["step"] == 1
    assert [line for line in log if "plot" in line or "matplotlib" in line] == [
        "loss plot skipped: matplotlib is not installed (pip install 'slowllama[plot]')"]
    assert not (store_fp32 / "run" / "loss.png").exists()
    assert (store_fp32 / "run" / "metrics.jsonl").exists()
    # asked for explicitly, a missing matplotlib is an error
    assert_one_line_error(cli("plot", store_fp32), "matplotlib is not installed")


def test_metrics_of_the_last_run_and_bad_metrics(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - s / 10} for s in (1, 2, 3, 1, 2)]  # a second run began at the 4th line
    rows[4]["eval_loss"] = 4.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(run / "metrics.jsonl") == rows[3:]
    assert plot_run(run, log=lambda m: None).read_bytes().startswith(PNG)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "lo')
    log = []
    assert plot_run(run, log=log.append) is None  # the run itself succeeded: a line, not an error
    assert log == [f"loss plot skipped: {run / 'metrics.jsonl'}:2: not a metrics line (JSON with a 'step')"]
    assert_one_line_error(cli("plot", run), "metrics.jsonl:2")
    assert_one_line_error(cli("plot", tmp_path / "nothing"), "no metrics.jsonl")
