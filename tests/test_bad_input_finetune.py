"""Bad input to finetune / eval: one clear line, non-zero exit, the store left at its last completed step."""

import json
import subprocess
import sys

import pytest

from slowllama.store.store import Store

from conftest import ALICE, REPO, assert_one_line_error, run_cli
from reference import store_state_dict


def finetune(store, *args):
    return run_cli("finetune", store, "--device", "cpu", "--steps", 2, "--batch-size", 2, "--seq-len", 32,
                   "--log-every", 0, *args)


def assert_untouched(store, before):
    after = store_state_dict(store)
    assert all(after[k].equal(v) for k, v in before.items())
    assert Store.open(store).step == 0


@pytest.mark.parametrize("content, fragments", [
    (None, ("nope.txt", "not found")),
    (b"", ("empty",)),
    (b"  \n\n ", ("empty",)),
    (b"caf\xe9 au lait", ("not UTF-8",)),
    (b"Alice", ("tokens", "one window of --seq-len 32 needs 33")),
])
def test_bad_data_files(store_fp32, tmp_path, content, fragments):
    before = store_state_dict(store_fp32)
    path = tmp_path / "nope.txt"
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(finetune(store_fp32, "--data", path), str(path) if content is not None else "nope.txt",
                          *fragments)
    assert_untouched(store_fp32, before)


@pytest.mark.parametrize("args, fragments", [
    (("--seq-len", "100000"), ("--seq-len", "max_seq_len")),
    (("--lr", "0"), ("--lr", "positive")),
    (("--lr", "-1e-3"), ("--lr",)),
    (("--lr", "fast"), ("--lr", "invalid float value")),
    (("--lr", "nan"), ("--lr",)),
    (("--batch-size", "0"), ("--batch-size", "at least 1")),
    (("--steps", "0"), ("--steps", "at least 1")),
    (("--accumulate", "0"), ("--accumulate", "at least 1")),
    (("--dropout", "1.5"), ("--dropout",)),
    (("--max-memory", "lots"), ("--max-memory", "lots")),
    (("--device", "tpu"), ("--device", "invalid choice")),
])
def test_bad_flags(store_fp32, args, fragments):
    before = store_state_dict(store_fp32)
    assert_one_line_error(finetune(store_fp32, "--data", ALICE, *args), *fragments)
    assert_untouched(store_fp32, before)


def test_missing_data_flag(store_fp32):
    assert_one_line_error(finetune(store_fp32), "--data")


def test_store_that_is_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(finetune(tmp_path / "empty", "--data", ALICE), "not a slowllama store")
    assert_one_line_error(finetune(tmp_path / "missing", "--data", ALICE), "no such store")


def test_non_finite_loss_stops_before_writing_that_step(store_fp32):
    # lr 1e30: step 1 blows the weights up, step 2's loss is NaN and nothing of step 2 is written
    line = assert_one_line_error(finetune(store_fp32, "--data", ALICE, "--lr", "1e30", "--steps", "5"),
                                 "step 2", "nan", "lower --lr")
    assert Store.open(store_fp32).step == 1
    assert json.loads((store_fp32 / "manifest.json").read_text())["step"] == 1


def test_a_store_in_use_by_another_finetune(store_fp32, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from slowllama.store.store import Store\n"
        f"s = Store.open({str(store_fp32)!r}, writable=True, log=lambda m: None)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(finetune(store_fp32, "--data", ALICE), "in use by another slowllama process",
                              f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # a lock left by a dead process is taken over with a message
    proc = finetune(store_fp32, "--data", ALICE)
    assert proc.returncode == 0, proc.stderr
    assert f"taking over the lock of pid {holder.pid}" in proc.stderr


def test_eval_bad_input(store_fp32, tmp_path):
    assert_one_line_error(run_cli("eval", store_fp32, "--data", tmp_path / "none.txt"), "none.txt")
    assert_one_line_error(run_cli("eval", store_fp32, "--data", ALICE, "--seq-len", "100000"), "--seq-len")
    assert_one_line_error(run_cli("eval", store_fp32), "--data")


def test_stochastic_rounding_asked_for_on_an_fp16_store(tiny_fp32, tmp_path):
    from slowllama.formats.meta import prepare_meta

    store = prepare_meta(tiny_fp32, tmp_path / "store", dtype="fp16", log=lambda m: None)
    before = store_state_dict(store)
    assert_one_line_error(finetune(store, "--data", ALICE, "--rounding", "stochastic"), "--rounding stochastic",
                          "fp16", "--master-weights fp32")
    assert_untouched(store, before)
