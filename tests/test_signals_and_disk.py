"""Ctrl-C / SIGTERM stop at the next committed step; a full disk (a fault hook, a small tmpfs) loses nothing."""

import collections
import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest

from slowllama import cli
from slowllama.store.store import Store
from slowllama.testing import faults

from conftest import FAULTS_RUNNER, REPO, assert_one_line_error
from crashes import (ONE_THREAD, RUNS, assert_bit_identical, assert_clean, committed_hash, exported, finetune_cli,
                     fresh_store, in_one_thread, reference, resume_in_process, state)

RESUME_HINT = "Run the same command again to resume."


@pytest.mark.parametrize("how, code", [("sigint", 130), ("sigterm", 143)])
def test_a_signal_stops_after_the_step_in_progress(how, code, tmp_path, tmp_path_factory, capsys):
    # the signal arrives in the middle of step 2's backward pass (fault point 6: step 2's second module)
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    proc = finetune_cli(store, "sgd", f"backward.module:6:{how}")
    assert proc.returncode == code, proc.stderr
    name = "SIGINT" if how == "sigint" else "SIGTERM"
    assert f"{name}: stopping once the step in progress is committed" in proc.stderr
    assert f"stopped after step 2 of 3; the store is at step 2 (step 2 of the run), committed. {RESUME_HINT}" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert Store.open(store).step == 2  # step 2 was finished and committed, step 3 not begun
    assert_clean(store)
    assert_bit_identical(state(store), expected["steps"][2])
    resume_in_process(store, "sgd", capsys)
    assert_bit_identical(exported(store, tmp_path / "export"), expected["export"])


def test_a_normal_run_arms_no_fault_and_loads_no_test_support(tmp_path, tmp_path_factory):
    # $SLOWLLAMA_FAULTS means something to the test runner alone: `slowllama` ignores it
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    code = ("import sys; from slowllama import cli; code = cli.main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith('slowllama.testing'))); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, "finetune", str(store), *RUNS["sgd"]], capture_output=True,
                          text=True, env={**os.environ, **ONE_THREAD, "SLOWLLAMA_FAULTS": "forward.module:1"},
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert Store.open(store).step == 3


def test_a_signal_from_outside(tmp_path, tmp_path_factory):
    # the process waits at step 1's second forward module until SIGTERM comes from this test
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", "SLOWLLAMA_FAULTS": "forward.module:2:wait"}
    child = subprocess.Popen([sys.executable, "-m", FAULTS_RUNNER, "finetune", str(store), *RUNS["sgd"]],
                             stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = child.stderr.readline().strip()
        while line.startswith("training data:"):  # the run's first information line comes before the step
            line = child.stderr.readline().strip()
        assert line == "fault: waiting at forward.module"
        child.send_signal(signal.SIGTERM)
        err = child.communicate(timeout=300)[1]
        assert child.returncode == 143, err
    finally:
        child.kill()
    assert f"stopped after step 1 of 3; the store is at step 1 (step 1 of the run), committed. {RESUME_HINT}" in err
    assert Store.open(store).step == 1
    assert_clean(store)


@pytest.mark.parametrize("how, code, second, step", [
    ("sigint", 130, "backward.module:8", 1),  # two modules after the first: step 2 is rolled back
    ("sigterm", 143, "store.commit.before_rename:2", 2),  # inside step 2's commit: held until it is done
])
def test_a_second_signal_stops_at_once(how, code, second, step, tmp_path, tmp_path_factory):
    # the first signal comes in step 2's backward pass, after its first module
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    proc = finetune_cli(store, "sgd", f"backward.module:6:{how},{second}:{how}")
    assert proc.returncode == code, proc.stderr
    assert f"interrupted: the store is at step {step} (step {step} of the run), committed; run the same command " \
           "again to resume" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert Store.open(store).step == step
    assert_clean(store)  # what step 2 had written is gone (or committed), its journal too
    assert_bit_identical(state(store), expected["steps"][step])


def run_in_process(store, run, fault_spec, capsys):
    capsys.readouterr()
    faults.configure(fault_spec)
    try:
        code = in_one_thread(cli.main, ["finetune", str(store), *RUNS[run]])
    finally:
        faults.configure("")
    return code, capsys.readouterr()


def assert_full_disk_kept_step_1(code: int, err: str, store, expected, *fragments: str) -> None:
    """One 'disk full' line (with the fragments); the store is at step 1, clean, with the reference's tensors."""
    assert_one_line_error(collections.namedtuple("proc", "returncode stderr")(code, err), "disk full", *fragments)
    assert Store.open(store).step == 1
    assert_clean(store)
    assert_bit_identical(state(store), expected["steps"][1])


@pytest.mark.parametrize("fault", [
    "store.write.before:7:enospc",  # step 2's third module file
    "store.commit.before_rename:2:enospc",  # step 2's manifest
    "store.begin_step:2:enospc",  # step 2's journal (raised after it is written)
])
def test_disk_full_in_a_step_keeps_the_last_committed_step(fault, tmp_path, tmp_path_factory, capsys):
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    code, out = run_in_process(store, "sgd", fault, capsys)
    assert_full_disk_kept_step_1(code, out.err, store, expected, "the store stays at its last committed step")
    resume_in_process(store, "sgd", capsys)  # the next run resumes to the uninterrupted run's result
    assert_bit_identical(exported(store, tmp_path / "export"), expected["export"])


def test_not_enough_disk_for_a_step_is_refused_before_anything(tmp_path, tmp_path_factory, capsys, monkeypatch):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    before = committed_hash(store)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    code, out = run_in_process(store, "adamw", "", capsys)
    line = assert_one_line_error(collections.namedtuple("proc", "returncode stderr")(code, out.err),
                                 "not enough free disk", "needs", "module files", "optimizer state", "GiB free")
    assert committed_hash(store) == before and Store.open(store).manifest.run is None


def unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=1m tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="no user namespaces to mount a small tmpfs in")
def test_a_really_full_disk(tmp_path, tmp_path_factory, capsys):
    # a 24 MiB tmpfs of its own: the run passes the free-space check, then another process fills the
    # disk in the middle of step 2 (the "fill" fault), and the next write meets a real ENOSPC
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = " ".join(RUNS["sgd"])
    script = (f"mount -t tmpfs -o size=24m tmpfs {mnt} && cp -r {store} {mnt}/store && "
              f"SLOWLLAMA_FAULTS=store.write.after:5:fill SLOWLLAMA_FAULT_FILL={mnt}/filler "
              f"{sys.executable} -m {FAULTS_RUNNER} finetune {mnt}/store {args}; echo rc=$? >&2; "
              f"rm -f {mnt}/filler; rm -rf {store} && cp -r {mnt}/store {store}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=300)
    # (the run's information line aside)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("training data:")]
    assert lines[-1] == "rc=2", proc.stderr
    assert len(lines) == 2 and "disk full" in lines[0] and "last committed step" in lines[0], proc.stderr
    assert Store.open(store).step == 1
    assert_clean(store)
    assert_bit_identical(state(store), expected["steps"][1])
    resume_in_process(store, "sgd", capsys)
    assert_bit_identical(exported(store, tmp_path / "export"), expected["export"])


def enospc_at_call(monkeypatch, name: str, call: int, partial: bool = False) -> list[str]:
    """Make safetensors_io.<name>(path, ...) raise ENOSPC at its call-th call (after writing 100 bytes of the
    file if partial); returns the paths it is called with."""
    from slowllama.store import safetensors_io

    real, calls = getattr(safetensors_io, name), []

    def failing(path, *a, **kw):
        calls.append(path)
        if len(calls) == call:
            if partial:
                with open(path, "wb") as f:
                    f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, *a, **kw)

    monkeypatch.setattr(safetensors_io, name, failing)
    return calls


def test_disk_full_in_the_middle_of_a_file(tmp_path, tmp_path_factory, capsys, monkeypatch):
    # the third file of step 2 is cut short by ENOSPC: the partial file goes at once, with the rest of step 2
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    calls = enospc_at_call(monkeypatch, "write_file", 7, partial=True)
    code, out = run_in_process(store, "sgd", "", capsys)
    # the 7th write failed (a write queued after it may have run since: writes are in the background)
    assert_full_disk_kept_step_1(code, out.err, store, expected, calls[6])


def test_disk_full_when_a_file_is_flushed(tmp_path, tmp_path_factory, capsys, monkeypatch):
    # files are fsynced in the background: an ENOSPC from an fsync (delayed allocation) stops the step
    # at its commit, which never happens; the store stays at step 1 and resumes exactly
    expected = reference(tmp_path_factory, "sgd")
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    calls = enospc_at_call(monkeypatch, "fsync_file", 7)
    code, out = run_in_process(store, "sgd", "", capsys)
    assert_full_disk_kept_step_1(code, out.err, store, expected, calls[6])
    monkeypatch.undo()
    resume_in_process(store, "sgd", capsys)
    assert_bit_identical(exported(store, tmp_path / "export"), expected["export"])
