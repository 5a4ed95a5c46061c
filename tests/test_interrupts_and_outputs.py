"""SIGHUP stops like SIGTERM; a signal in the last step finishes the run's outputs; links at temporary
names are never followed; leftover partial folders of dead processes go; OSErrors are one line."""

import errno
import os
import shutil

import pytest

from slowllama import cli
from slowllama.commands.finetune import finetune
from slowllama.settings import FinetuneSettings
from slowllama.store import safetensors_io as st
from slowllama.store.store import Store

from conftest import ALICE, assert_one_line_error
from crashes import (RUNS, assert_bit_identical, assert_clean, base_store, finetune_cli, folder_hash, fresh_store,
                     reference, resume_in_process, state, streaming_budget)

RESUME_HINT = "Run the same command again to resume."


def test_sighup_stops_after_the_step_in_progress(tmp_path, tmp_path_factory, capsys):
    # the terminal closes in step 2's backward pass: step 2 is finished and committed, as with SIGTERM
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    proc = finetune_cli(store, "sgd", "backward.module:6:sighup")
    assert proc.returncode == 129, proc.stderr
    assert "SIGHUP: stopping once the step in progress is committed (send it again to stop at once: the store " \
           "is at step 1 (step 1 of the run), committed" in proc.stderr
    assert f"stopped after step 2 of 3; the store is at step 2 (step 2 of the run), committed. {RESUME_HINT}" \
        in proc.stderr
    assert Store.open(store).step == 2
    assert_clean(store)
    assert_bit_identical(state(store), expected["steps"][2])
    resume_in_process(store, "sgd", capsys)
    assert_bit_identical(state(store), expected["steps"][3])


def test_a_signal_in_the_last_step_finishes_the_run(tmp_path, tmp_path_factory, capsys):
    pytest.importorskip("matplotlib")
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    proc = finetune_cli(store, "sgd", "backward.module:10:sigint")  # step 3 of 3, its second module
    assert proc.returncode == 130, proc.stderr
    assert "stopped by SIGINT in the last step: the run is complete (the store is at step 3" in proc.stderr
    assert RESUME_HINT not in proc.stderr
    assert (store / "run" / "loss.png").is_file()  # its outputs are written
    assert_bit_identical(state(store), expected["steps"][3])
    # a run whose outputs were lost (killed after its last commit): the rerun writes them
    (store / "run" / "loss.png").unlink()
    capsys.readouterr()
    assert cli.main(["finetune", str(store), *RUNS["sgd"]]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (store / "run" / "loss.png").is_file()


def lora_settings(store, ad, **kw):
    return FinetuneSettings(**{**dict(store=str(store), data=str(ALICE), device="cpu", steps=2, lora_rank=2,
                                      adapter_path=str(ad), batch_size=2, seq_len=16, log_every=0), **kw})


def test_links_at_temporary_names_are_never_followed(tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    ad = tmp_path / "ad"
    finetune(lora_settings(store, ad, steps=1), log=lambda m: None, emit=lambda m: None)
    # every temporary name a LoRA save and a store's commit write, planted as a link to a file outside
    for folder, name in [(ad, "state.json.tmp"), (ad, "adapters.safetensors.tmp"), (ad, "adapter_config.json.tmp"),
                         (ad, "0000002_adapters.safetensors.tmp"), (ad, "adapters@2.safetensors"),
                         (ad, ".loss.png.tmp.png"), (store, "manifest.json.tmp"), (store, "journal.json.tmp"),
                         (store / "run", ".loss.png.tmp.png")]:
        folder.mkdir(exist_ok=True)
        (folder / name).symlink_to(victim)
    finetune(lora_settings(store, ad, steps=2), log=lambda m: None, emit=lambda m: None)
    finetune(FinetuneSettings(store=str(store), data=str(ALICE), device="cpu", steps=1, batch_size=2, seq_len=16,
                              log_every=0), log=lambda m: None, emit=lambda m: None)
    assert victim.read_text() == "keep me"
    assert Store.open(store).step == 1
    assert not [p for p in ad.iterdir() if p.is_symlink()]


def test_lora_on_a_read_only_store_writes_nothing_to_it(tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    before = folder_hash(store)
    os.chmod(store, 0o555)
    try:  # a budget that keeps no activation in memory: they spill, to the adapter folder
        finetune(lora_settings(store, tmp_path / "ad", max_memory=streaming_budget(True)), log=lambda m: None,
                 emit=lambda m: None)
    finally:
        os.chmod(store, 0o755)
    assert folder_hash(store) == before and not (store / "scratch").exists()


def test_partial_folders_of_dead_processes_are_removed(tmp_path, tmp_path_factory, capsys):
    model = base_store(tmp_path_factory).parent / "model"
    dead = tmp_path / ".new.partial-999999999"  # no such pid
    alive = tmp_path / f".new.partial-{os.getppid()}"
    for p in (dead, alive):
        (p / "modules").mkdir(parents=True)
        (p / "modules" / "junk").write_bytes(b"x" * 1000)
    assert cli.main(["prepare", str(model), str(tmp_path / "new")]) == 0
    assert not dead.exists() and alive.exists()
    assert Store.open(tmp_path / "new").step == 0


def test_a_full_disk_while_prepare_writes_is_one_line(tmp_path, tmp_path_factory, capsys, monkeypatch):
    # prepare writes with pwrite: a full disk is ENOSPC (one line), not a SIGBUS through a memory map
    model = base_store(tmp_path_factory).parent / "model"
    calls = {"n": 0}
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(st.os, "pwrite", pwrite)
    capsys.readouterr()
    code = cli.main(["prepare", str(model), str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert_one_line_error(type("R", (), {"returncode": code, "stderr": err})(), "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("dest", ["/sys/slowllama-export", "/proc/slowllama-export"])
def test_a_destination_that_cannot_be_written_is_one_line(dest, tmp_path, tmp_path_factory, capsys):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    capsys.readouterr()
    code = cli.main(["export", str(store), dest])
    err = capsys.readouterr().err
    assert_one_line_error(type("R", (), {"returncode": code, "stderr": err})(), "slowllama-export")


def test_verify_takes_an_adapter_folder(tmp_path, tmp_path_factory, capsys):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    ad = tmp_path / "ad"
    finetune(lora_settings(store, ad, save_every=1), log=lambda m: None, emit=lambda m: None)
    capsys.readouterr()
    assert cli.main(["verify", str(ad)]) == 0
    assert "adapters at step 2, 7 files" in capsys.readouterr().out  # (and PEFT's two)
    shutil.copyfile(ad / "0000001_adapters.safetensors", ad / "adapters.safetensors")  # an older step's
    assert cli.main(["verify", str(ad)]) != 0
    assert "not the adapters of step 2" in capsys.readouterr().err

