"""Bad training data and config files: one line naming file:line or file and key, the store untouched.

The CLI runs in-process here (main() with captured stderr); test_config_file.py runs it once as a
subprocess as well.
"""

import json

import pytest

from slowllama.store.store import Store

from conftest import ALICE, REPO, assert_one_line_error
from reference import store_state_dict

SAMSUM = REPO / "test_data" / "samsum_mini.jsonl"
GOOD = {"prompt": "Q: two and two?\nA:", "completion": " four"}


def finetune_args(store, *args):
    return ("finetune", store, "--device", "cpu", "--steps", 1, "--batch-size", 2, "--seq-len", 32,
            "--log-every", 0, *args)


def assert_untouched(store, before):
    after = store_state_dict(store)
    assert all(after[k].equal(v) for k, v in before.items())
    assert Store.open(store).step == 0
    assert not (store / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("line, fragments", [
    ("{not json", ("not JSON",)),
    ("[1, 2]", ("not a JSON object (got list)",)),
    ('{"id": 3}', ("has none of the fields 'text', 'prompt'+'completion', 'messages'",)),
    ('{"prompt": "a"}', ("has 'prompt' but no 'completion'",)),
    ('{"completion": "a"}', ("has 'completion' but no 'prompt'",)),
    ('{"text": 5}', ("'text' must be a string, got int",)),
    ('{"text": "a", "prompt": "b", "completion": "c"}', ("several formats",)),
    ('{"messages": []}', ("'messages' must be a non-empty list",)),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ("the chat has no assistant turn",)),
    ('{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     ("messages[0]: role 'bot' is not one of system, user, assistant",)),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}',
     ("messages[0]: must be an object with 'role' and 'content'",)),
])
def test_bad_jsonl_lines_name_file_and_line(cli, store_fp32, tmp_path, line, fragments):
    before = store_state_dict(store_fp32)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    assert_one_line_error(cli(*finetune_args(store_fp32, "--data", path)), f"{path}:3: ", *fragments,
                          "--skip-bad-lines")
    assert_untouched(store_fp32, before)
    # eval reads --data the same way
    assert_one_line_error(cli("eval", store_fp32, "--data", path, "--device", "cpu"), f"{path}:3: ")


def test_skip_bad_lines_counts_them(cli, store_fp32, tmp_path):
    path = tmp_path / "train.jsonl"
    good = [json.loads(line) for line in SAMSUM.read_text().splitlines()[:4]]
    path.write_text("\n".join([json.dumps(good[0]), "oops", json.dumps(good[1]), '{"prompt": "x"}',
                               json.dumps(good[2]), json.dumps(good[3])]) + "\n")
    proc = cli(*finetune_args(store_fp32, "--data", path, "--skip-bad-lines", "--seq-len", 64))
    assert proc.returncode == 0, proc.stderr
    assert f"{path}: skipped 2 bad lines (first: line 2: not JSON" in proc.stderr
    assert f"{path}: 4 records (4 completion)" in proc.stderr
    assert Store.open(store_fp32).step == 1
    # nothing usable at all is still an error
    path.write_text("oops\n[]\n")
    assert_one_line_error(cli(*finetune_args(store_fp32, "--data", path, "--skip-bad-lines", "--new-run")),
                          f"{path}: no usable records (2 bad lines skipped)")


def test_bad_data_choices(cli, store_fp32, tmp_path):
    before = store_state_dict(store_fp32)
    (tmp_path / "a.json").write_text(json.dumps([GOOD]))
    long_prompt = tmp_path / "long.jsonl"  # one window of 33 tokens holds only prompt; the answer is beyond it
    long_prompt.write_text(json.dumps({"prompt": ALICE.read_text()[:300], "completion": " yes"}) + "\n")
    cases = [
        (("--data", ALICE, "--val-data", ALICE, "--val-split", "0.1"), ("--val-data and --val-split",)),
        (("--data", ALICE, "--val-split", "1.5"), ("--val-split", "[0, 1)")),
        (("--data", ALICE, "--val-split", "0.99", "--seq-len", "500"), ("--val-split 0.99", "leave none")),
        (("--data", tmp_path / "a.json"), ("a.json", "JSON lines (.jsonl")),
        # prompts longer than the window: no window could carry loss
        (("--data", long_prompt), ("no window of --seq-len 32 has a token with loss", "--no-mask-prompt")),
        (("--data", SAMSUM, "--seq-len", "64", "--no-pack"), ("no window of --seq-len 64", "--pack")),
    ]
    for args, fragments in cases:
        assert_one_line_error(cli(*finetune_args(store_fp32, *args)), *fragments)
    assert_untouched(store_fp32, before)
