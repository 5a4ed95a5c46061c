"""A LoRA run killed (SIGKILL) at any instant of its saves leaves the adapter folder at one step, entirely;
the same command then resumes it to bit-identical adapters, optimizer state and snapshots.

The kills come at the fault points of AdapterFolder.save (slowllama/faults.py): the step's files
written, state.json's temporary file written or renamed, a copy (snapshot, adapters.safetensors)
written but not yet renamed, and the commit done before adapters.safetensors is refreshed.
"""

import json
import signal

import torch

from slowllama import cli
from slowllama.commands.finetune import finetune
from slowllama.store.adapters import AdapterFolder

from conftest import ALICE, FAULTS_RUNNER, run_cli
from crashes import ONE_THREAD, base_store, in_one_thread, settings

LORA = ["--device", "cpu", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--lora-rank", "2",
        "--save-every", "2", "--seed", "3", "--lr", "1e-2", "--log-every", "0", "--eval-every", "0",
        "--data", str(ALICE)]


def folder_state(ad):
    """(step, adapters, optimizer state) of the folder as slowllama reads it, every file checked."""
    step, params, optim, _ = AdapterFolder(ad).load_training_state("cpu")
    return step, params, optim


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files(ad):
    return sorted(p.name for p in ad.iterdir())


def test_killed_lora_saves_leave_one_step_and_resume_bit_for_bit(tmp_path, tmp_path_factory, capsys):
    store = base_store(tmp_path_factory)  # LoRA only reads it
    ref_ad = tmp_path / "reference"
    steps = {}
    in_one_thread(finetune, settings(store, [*LORA, "--adapter-path", str(ref_ad)]), log=lambda m: None,
                  emit=lambda m: steps.update({m["step"]: folder_state(ref_ad)}))
    ad = tmp_path / "ad"
    # (fault, the folder's step after the kill, what a listing must not show, what the next start says)
    chain = [
        ("lora.save.files:1", None, [], None),  # step 1's files written, no state.json yet
        ("lora.state.before_rename:1", None, ["state.json"], None),  # state.json.tmp written, not renamed
        ("lora.state.after_rename:1", 1, ["adapters.safetensors"], None),  # committed; the result not yet copied
        # (its first copy renews the missing adapters.safetensors; the second is step 2's snapshot, cut off)
        ("lora.save.copy:2", 1, ["0000002_adapters.safetensors"], "adapters.safetensors brought up to step 1"),
        ("lora.save.committed:1", 2, [], None),  # step 2 committed, adapters.safetensors still step 1's
    ]
    said = None
    for fault, step, absent, says in chain:
        proc = run_cli("finetune", store, *LORA, "--adapter-path", ad, module=FAULTS_RUNNER,
                       env={**ONE_THREAD, "SLOWLLAMA_FAULTS": fault})
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        if says:
            assert says in proc.stderr, proc.stderr
        names = files(ad)
        for name in absent:
            assert name not in names, (fault, names)
        if step is None:
            assert "state.json" not in names, (fault, names)
            continue
        got = folder_state(ad)
        assert got[0] == step and same(got[1], steps[step][1]) and same(got[2], steps[step][2]), fault
        # eval, generate and fuse read the adapters that state.json names: the committed step's
        state = json.loads((ad / "state.json").read_text())
        assert state["step"] == step and all(n in names for n in state["files"].values())
        assert all(n in names for n in state["snapshots"])
        said = fault
    assert said == "lora.save.committed:1"
    capsys.readouterr()
    code = in_one_thread(cli.main, ["finetune", str(store), *LORA, "--adapter-path", str(ad)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "adapters.safetensors brought up to step 2" in err
    got = folder_state(ad)
    assert got[0] == 3 and same(got[1], steps[3][1]) and same(got[2], steps[3][2])
    # the folder equals the uninterrupted run's, file for file (no leftovers, no temporary names)
    assert files(ad) == files(ref_ad)
    for name in ("adapters.safetensors", "0000002_adapters.safetensors", "0000003_adapters.safetensors",
                 "adapters@3.safetensors", "optim@3.safetensors"):
        assert (ad / name).read_bytes() == (ref_ad / name).read_bytes(), name
    capsys.readouterr()
    assert cli.main(["verify", str(ad)]) == 0

