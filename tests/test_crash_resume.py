"""A run killed (SIGKILL) at any moment of a step resumes to bit-identical weights and optimizer state.

Each chain kills `slowllama finetune` several times, at the fault points of slowllama/faults.py,
each time running the same command again; the last run completes in this process. After every
kill the store must hold exactly the uninterrupted run's state at step s or s+1 (never a mix),
and the next start must clean up with one "recovered" line.
"""

import signal

import pytest

from slowllama.store.store import Store

from crashes import (assert_bit_identical, assert_clean, exported, files_on_disk, finetune_cli, fresh_store, generation,
                     reference, referenced, resume_in_process, state)

# (faults of one process, the step the store must be at after the kill, files left beside it,
#  what the next start says)
CHAINS = {
    "sgd": [
        ("forward.module:2", 0, 0, "rolled back the interrupted step 1"),  # step 1, forward, after the embeddings
        ("store.write.after:6", 1, 2, "rolled back the interrupted step 2"),  # step 2, between module writes
        ("store.commit.before_rename:1", 1, 4, "rolled back the interrupted step 2"),  # new manifest not renamed
        # renamed, old files not yet removed: 3 (the embeddings' row patch of step 1 stays, under step 2's)
        ("store.commit.after_rename:1", 2, 3, "step 2 was committed"),
        ("backward.module:3", 2, 2, "rolled back the interrupted step 3"),  # step 3, backward, 2 modules written
    ],
    "adamw": [
        # step 1 first measures the gradient norm (clipping, no norm of a previous step yet): 4 backward
        # points without writes, then the update pass: the kill comes after head's state (2 parts) and weights
        ("backward.module:6", 0, 3, "rolled back the interrupted step 1"),
        # a step writes 25 files (per block 9 parts of state, then its weights): this is step 2, after head's
        # 3 files and 5 of the 9 parts of layers.1's state
        ("store.write.after:33", 1, 8, "rolled back the interrupted step 2"),
        ("store.commit.after_rename:1", 2, 25, "step 2 was committed"),
    ],
}


@pytest.mark.parametrize("run", ["sgd", "adamw"])
def test_killed_runs_resume_bit_for_bit(run, tmp_path, tmp_path_factory, capsys):
    expected = reference(tmp_path_factory, run)
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    said = None  # what the start after the last kill must say
    for faults, step, left, next_says in CHAINS[run]:
        proc = finetune_cli(store, run, faults)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        if said:
            recovered = [line for line in proc.stderr.splitlines() if line.startswith("recovered:")]
            assert len(recovered) == 1 and said in recovered[0], proc.stderr
        said = next_says
        # entirely at step s or s+1: every file checks out and holds the uninterrupted run's tensors
        assert Store.open(store).step == step, faults
        assert_bit_identical(state(store), expected["steps"][step])
        # what the kill cut off: the journal, and at most one generation of files beside the committed one
        assert (store / "journal.json").exists()
        leftovers = files_on_disk(store) - referenced(store)
        if faults.startswith("backward.module"):  # updates are written in the background: some may not be yet
            assert len(leftovers) <= left, (faults, leftovers)
        else:
            assert len(leftovers) == left, (faults, leftovers)
        # (SGD writes only the embedding rows a step used: a row-patched module keeps older files)
        assert all(generation(f) in (step - 1, step, step + 1) for f in leftovers | referenced(store)
                   if "extras" not in f and not (run == "sgd" and "tok_embeddings" in f))

    err = resume_in_process(store, run, capsys)
    recovered = [line for line in err.splitlines() if line.startswith("recovered:")]
    assert len(recovered) == 1 and said in recovered[0], err
    assert Store.open(store).step == 3
    assert_clean(store)  # one generation of files, nothing else
    assert_bit_identical(state(store), expected["steps"][3])
    assert_bit_identical(exported(store, tmp_path / "export"), expected["export"])


def test_the_reference_runs_differ_step_by_step(tmp_path_factory):
    # the comparisons above can fail: every step changes every module's tensors
    steps = reference(tmp_path_factory, "adamw")["steps"]
    for before, after in zip(steps, steps[1:]):
        changed = {k[1] for k, t in after.items() if k[0] == "modules" and (k not in before or not t.equal(before[k]))}
        assert changed == {"tok_embeddings", "layers.0", "layers.1", "head"}
