"""A store split across hosts by owner: split and join, two hosts simulated by two torchruns (gloo, on the CPU) each
given its own share, against one process on the whole store; the commit across hosts killed at its phases; the
shares that do not fit a run refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slowllama.commands.shares import join, split
from slowllama.engine.owners import assign_owners
from slowllama.errors import SlowllamaError
from slowllama.model.shapes import module_names
from slowllama.store.manifest import MANIFEST, Manifest
from slowllama.store.shares import PREPARED, ShareRecord, recovery
from slowllama.store.state_parts import part_module
from slowllama.store.store import Store
from slowllama.train.shares import ShareRefused, placed

from conftest import ALICE, FAULTS_RUNNER, assert_one_line_error
from crashes import ONE_THREAD, assert_bit_identical, files_on_disk, folder_hash, fresh_store, state, streaming_budget
from test_distributed import COMMON, RUNS as TWO_RANKS, assert_close_states, single_process

HOSTS = ("host-0", "host-1")
RUNS = {
    # streaming: every module read, reduced, updated and written on its owner's host at every step (no eval: rank 0
    # would need the other host's modules)
    "sgd-streaming": COMMON + ["--lr", "0.05", "--dropout", "0.1", "--max-memory", streaming_budget(False, ranks=2)],
    "adamw-streaming": TWO_RANKS["adamw-streaming"],
    # resident: each rank keeps copies of the other host's modules, so rank 0 evaluates (steps 2 and 3)
    "adamw-resident": TWO_RANKS["adamw-resident"],
    # 2 hosts x 2 ranks: each host's second rank writes its modules' files into the share its first rank commits;
    # one window per microbatch, so that every rank's microbatch (and dropout mask) is one of the single process's
    "sgd-2x2": COMMON + ["--lr", "0.05", "--dropout", "0.1", "--batch-size", "1", "--accumulate", "4",
                         "--max-memory", streaming_budget(False, ranks=2)],
}
PER_HOST = {"sgd-2x2": 2}  # ranks per host (else 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_hosts(shares: Path, args: list[str], faults: tuple[str, str] = ("", ""), per_host: int = 1,
              timeout: int = 300):
    """Two torchruns of per_host ranks each, as two hosts (`--nnodes 2`, a c10d rendezvous on this machine), each given
    its own share (shares/host-0, shares/host-1) and its own faults; returns their CompletedProcess-like results."""
    port = free_port()
    procs = []
    for host, fault in zip(HOSTS, faults):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(per_host),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "-m", FAULTS_RUNNER, "finetune",
               str(shares / host), *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", "SLOWLLAMA_FAULTS": fault}))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def share_state(share: Path) -> dict:
    """Every tensor of the files a share holds (its own ranks' modules)."""
    s = Store.open(share, follower=True, share_ok=True)
    return {(kind, name, key): t.clone() for kind, files in s.manifest.files.items() for name in files
            if s.share.host_of(name) in (None, s.share.host) for key, t in s.read(name, kind).items()}


def shares_state(shares: Path) -> dict:
    out = {}
    for host in HOSTS:
        out.update(share_state(shares / host))
    return out


def owned_by_host(store: Path, hosts: int, per_host: int = 1) -> dict[str, int]:
    s = Store.open(store)
    owners = assign_owners([(n, s.module_bytes(n)) for n in module_names(s.args)], hosts * per_host)
    return {n: r // per_host for n, r in owners.items()}


# ---- split and join, in this process ------------------------------------------------------------------------
def test_split_gives_each_host_its_owners_files_and_join_gives_the_store_back(tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    before = folder_hash(store)
    paths = split(store, tmp_path / "shares", 2, 2, log=lambda m: None)  # 2 hosts x 2 ranks
    assert [p.name for p in paths] == list(HOSTS)
    assert folder_hash(store) == before  # the source is left as it is
    host_of = owned_by_host(store, 2, 2)
    whole = Manifest.read(store)
    for host, path in enumerate(paths):
        record = Store.open(path, follower=True, share_ok=True).share
        assert (record.hosts, record.ranks_per_host, record.host) == (2, 2, host)
        mine = {f for kind, entries in whole.files.items() for name, e in entries.items()
                if host_of.get(part_module(name), host) == host for f in e.files()}
        assert files_on_disk(path) == mine  # its own ranks' modules (and the extras), nothing else
        assert (path / "tokenizer.model").read_bytes() == (store / "tokenizer.model").read_bytes()
        assert {k: v for k, v in Manifest.read(path).to_json().items() if k != "share"} == whole.to_json()
    joined = join(paths, tmp_path / "joined", log=lambda m: None)
    assert Manifest.read(joined).to_json() == whole.to_json()
    assert_bit_identical(state(joined), state(store))
    with pytest.raises(SlowllamaError, match="the share of host 1 of 2 is missing"):
        join(paths[:1], tmp_path / "j2", log=lambda m: None)
    with pytest.raises(SlowllamaError, match="the share of host 0, as"):
        join([paths[0], paths[0]], tmp_path / "j3", log=lambda m: None)
    other = split(store, tmp_path / "other", 2, 1, log=lambda m: None)  # another split: 2 hosts x 1 rank
    with pytest.raises(SlowllamaError, match=r"not a share of the store .* \(step 0, 2 hosts x 1 rank; .*: step 0, "
                                             r"2 hosts x 2 ranks\)"):
        join([paths[0], other[1]], tmp_path / "j4", log=lambda m: None)
    assert not any((tmp_path / name).exists() for name in ("j2", "j3", "j4"))
    for host in (1, 0):  # one host's share at a time, beside the others'
        split(store, tmp_path / "one-by-one", 2, 2, log=lambda m: None, host=host)
    assert [folder_hash(tmp_path / "one-by-one" / h) for h in HOSTS] == [folder_hash(p) for p in paths]


def test_a_trained_store_splits_its_optimizer_state_by_owner_and_joins_back(tmp_path, tmp_path_factory):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    single_process(store, RUNS["adamw-streaming"][:-2] + ["--steps", "1"])  # AdamW moments in parts, a run record
    shares = split(store, tmp_path / "shares", 2, log=lambda m: None)
    host_of = owned_by_host(store, 2)
    whole = Manifest.read(store)
    assert whole.files.get("optim") and whole.run is not None
    for host, path in enumerate(shares):
        assert files_on_disk(path) == {f for kind, entries in whole.files.items() for name, e in entries.items()
                                       if host_of.get(part_module(name), host) == host for f in e.files()}
        assert (path / "run" / "metrics.jsonl").read_bytes() == (store / "run" / "metrics.jsonl").read_bytes()
    assert_bit_identical(share_state(shares[0]) | share_state(shares[1]), state(store))
    assert_bit_identical(state(join(shares, tmp_path / "joined", log=lambda m: None)), state(store))


def test_a_share_alone_is_refused_in_one_line_and_verify_checks_its_files(tmp_path, tmp_path_factory, cli):
    store = fresh_store(tmp_path_factory, tmp_path / "store")
    share = split(store, tmp_path / "shares", 2, log=lambda m: None)[0]
    before = folder_hash(share)
    for command in (["eval", share, "--data", ALICE], ["generate", share, "--prompt", "Alice", "--max-new-tokens", "2"],
                    ["export", share, tmp_path / "out"],
                    ["finetune", share, "--data", ALICE, "--steps", "1", "--device", "cpu"]):
        assert_one_line_error(cli(*command), f"{share}: the share of host 0 of a store split across 2 hosts x 1 rank",
                              "slowllama join")
    assert folder_hash(share) == before and not (tmp_path / "out").exists()
    checked = cli("verify", share)  # the files a share holds: its own host's modules
    assert checked.returncode == 0 and "step 0, the share of host 0 of 2 hosts x 1 rank, 3 files" in checked.stdout, \
        checked.stdout + checked.stderr
    next(f for f in (share / "modules").iterdir() if not f.name.startswith("extras")).write_bytes(b"x")
    assert_one_line_error(cli("verify", share), "size")
    assert_one_line_error(cli("split", share, tmp_path / "again"), "the share of host 0")
    assert_one_line_error(cli("split", store, tmp_path / "shares"), "already exists")
    assert_one_line_error(cli("split", store, tmp_path / "one", "--hosts", "1"), "--hosts: a split needs at least 2")
    assert_one_line_error(cli("split", store, tmp_path / "one", "--host", "2"), "--host: a host of 0 ... 1, got 2")
    assert_one_line_error(cli("split", store, tmp_path / "shares", "--host", "0"), "host-0: already exists")
    assert not (tmp_path / "one").exists()
    assert_one_line_error(cli("join", share, tmp_path / "whole"), "SHARES: give every share")
    manifest = json.loads((share / MANIFEST).read_text())  # a share record edited by hand
    for edit, message in [({"host": 5}, "field 'share.host' is 5, of 2 hosts"),
                          ({"owners": {"head": 0}}, "field 'share.owners' must give each module of the model a rank")]:
        (share / MANIFEST).write_text(json.dumps({**manifest, "share": {**manifest["share"], **edit}}))
        assert_one_line_error(cli("verify", share), message)


def test_the_hosts_recover_a_commit_cut_off_to_one_step():
    # (committed step, prepared step) of each host after a kill: roll forward, back, or nothing to do
    assert recovery([(1, None), (1, None)]) == ""
    assert recovery([(1, 2), (1, None)]) == "back"  # phase 1 on one host only
    assert recovery([(1, 2), (1, 2)]) == "forward"  # prepared everywhere: every host's files are durable
    assert recovery([(2, None), (1, 2)]) == "forward"  # between the hosts' phase 2
    assert recovery([(2, None), (2, None), (1, 2)]) == "forward"
    for states, message in [([(3, None), (0, None)], "at steps 3, 0"), ([(2, None), (1, None)], "without having"),
                            ([(1, 4), (1, None)], "prepared step 4 at step 1")]:
        with pytest.raises(SlowllamaError, match=message):
            recovery(states)


def test_shares_that_do_not_fit_the_torchrun_world_are_refused():
    owners = {"tok_embeddings": 0, "layers.0": 1, "layers.1": 0, "head": 1}

    def rec(host, hosts=2, per=1):
        return ShareRecord(hosts, per, host, owners).to_json()

    split_, layout, table = placed([rec(1), rec(0)], 2)  # ranks numbered as torchrun's rendezvous joined them
    assert layout.hosts == (1, 0) and table == {"tok_embeddings": 1, "layers.0": 0, "layers.1": 1, "head": 0}
    for records, world, message in [
        ([rec(0), rec(1), rec(0), rec(1)], 4, r"made for 2 hosts x 1 rank \(2 ranks\), and this run has 4"),
        ([rec(0), rec(0)], 2, r"given to 1 rank \(one host's ranks\), and were: host 0's to 2, host 1's to 0"),
        ([rec(0), rec(1, per=2)], 2, r"another split \(2 hosts x 2 ranks\) than rank 0 \(2 hosts x 1 rank\)"),
        ([rec(0), None], 2, "rank 1 was given a whole store and rank 0 a share"),
    ]:
        with pytest.raises(ShareRefused, match=message):
            placed(records, world)


# ---- two hosts, two torchruns ---------------------------------------------------------------------------------
_uninterrupted: dict[str, dict] = {}


def uninterrupted(run: str, tmp_path_factory) -> dict:
    """The shares' whole state after an uninterrupted run on two hosts (once per session)."""
    if run not in _uninterrupted:
        root = tmp_path_factory.mktemp(f"two-hosts-{run}")
        shares = root / "shares"
        per_host = PER_HOST.get(run, 1)
        split(fresh_store(tmp_path_factory, root / "store"), shares, 2, per_host, log=lambda m: None)
        procs = two_hosts(shares, RUNS[run], per_host=per_host)
        assert all(p.returncode == 0 for p in procs), procs[0].stderr + procs[1].stderr
        _uninterrupted[run] = {"shares": shares, "state": shares_state(shares),
                               "stderr": procs[0].stderr + procs[1].stderr}
    return _uninterrupted[run]


@pytest.mark.parametrize("run", ["adamw-streaming", "adamw-resident", "sgd-2x2"])  # (SGD 2 x 1: the refusals')
def test_two_hosts_on_their_shares_give_the_weights_and_moments_of_one_process(run, tmp_path, tmp_path_factory):
    one = fresh_store(tmp_path_factory, tmp_path / "one")
    single_process(one, RUNS[run])
    done = uninterrupted(run, tmp_path_factory)
    shares = done["shares"]
    assert "each host's ranks read, update and write the modules of their share" in done["stderr"]
    host_of = owned_by_host(one, 2, PER_HOST.get(run, 1))
    for host, name in enumerate(HOSTS):
        manifest = Manifest.read(shares / name)
        assert manifest.step == 3 and not (shares / name / PREPARED).exists()
        assert_clean_share(shares / name)
        assert {part_module(n) for kind, entries in manifest.files.items() for n, e in entries.items()
                if (shares / name / e.file).exists()} == {n for n, h in host_of.items() if h == host} | {"extras"}
    assert Manifest.read(shares / HOSTS[0]).to_json()["files"] == Manifest.read(shares / HOSTS[1]).to_json()["files"]
    expected = state(one)
    assert any(kind == "optim" for kind, _, _ in expected) == ("adamw" in run)
    assert_close_states(done["state"], expected)  # every weight and moment
    joined = join([shares / h for h in HOSTS], tmp_path / "joined", log=lambda m: None)
    assert_close_states(state(joined), expected)  # the whole store again, which eval and export read
    metrics = [json.loads(line) for line in (joined / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = [json.loads(line) for line in (one / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == len(ours)
    for got, want in zip(metrics, ours):
        for key in ("loss", "eval_loss"):
            assert (key in got) == (key in want), key
            if key in want:  # (pytest 9.2's approx takes no None)
                assert got[key] == pytest.approx(want[key], rel=1e-5), (want.get("step"), key)


def assert_clean_share(share: Path) -> None:
    """Nothing but the committed step on this host: its files named by the manifest, no journal or prepared one."""
    named = Manifest.read(share).named_files()
    assert files_on_disk(share) <= named
    for name in ("journal.json", PREPARED, f"{PREPARED}.tmp", "manifest.json.tmp"):
        assert not (share / name).exists(), name


@pytest.mark.parametrize("faults, at, committed, says", [
    # phase 1 on one host only: host 1 prepared step 2, host 0 died before: both back to step 1
    (("store.prepare.before_rename:2", "store.prepare.after_rename:2"), [(1, None), (1, 2)], 1,
     "host 1's share: recovered: rolled back the interrupted step 2; the store is at step 1"),
    # between the hosts' phase 2: host 0 made step 2 current, host 1 died with it prepared: both forward to step 2
    (("store.commit.after_rename:2", "store.commit.before_rename:2"), [(2, None), (1, 2)], 2,
     "host 1's share: recovered: every host had prepared step 2; committed it on this host too"),
    # host 0 dies just after its phase 1 and host 1 runs on: its own phase 1 done or not (a race), it stops when
    # it finds host 0 gone, keeping its files: forward if it had prepared, else back; either way, one step
    (("store.prepare.after_rename:2", ""), None, None, "resuming the run at step"),
])
def test_a_commit_across_hosts_killed_at_its_phases_recovers_to_one_step_and_resumes(
        faults, at, committed, says, tmp_path, tmp_path_factory):
    shares = tmp_path / "shares"
    split(fresh_store(tmp_path_factory, tmp_path / "store"), shares, 2, log=lambda m: None)
    killed = two_hosts(shares, RUNS["adamw-streaming"], faults)
    assert all(p.returncode != 0 for p in killed)
    states = [(Manifest.read(shares / h).step, Manifest.read_file(shares / h / PREPARED).step
               if (shares / h / PREPARED).exists() else None) for h in HOSTS]
    if at is None:
        assert states[0] == (1, 2) and states[1] in [(1, 2), (1, None)], states
        committed = 2 if states[1] == (1, 2) else 1
    assert at is None or states == at
    resumed = two_hosts(shares, RUNS["adamw-streaming"])
    assert all(p.returncode == 0 for p in resumed), resumed[0].stderr + resumed[1].stderr
    said = resumed[0].stderr + resumed[1].stderr
    assert f"resuming the run at step {committed} of 3" in said
    assert says in said
    for h in HOSTS:
        assert Manifest.read(shares / h).step == 3
        assert_clean_share(shares / h)
    assert_bit_identical(shares_state(shares), uninterrupted("adamw-streaming", tmp_path_factory)["state"])


def test_two_hosts_train_lora_adapters_on_their_shares_like_one_process(tmp_path, tmp_path_factory):
    from slowllama.store.adapters import AdapterFolder
    from slowllama.store.safetensors_io import read_file

    base = fresh_store(tmp_path_factory, tmp_path / "base")
    shares = tmp_path / "shares"
    split(base, shares, 2, log=lambda m: None)
    before = folder_hash(shares)
    args = COMMON + ["--lora-rank", "4", "--lr", "1e-3", "--lora-targets", "wq,wv,w2"]
    single_process(base, args + ["--adapter-path", str(tmp_path / "one")])
    procs = two_hosts(shares, args + ["--adapter-path", str(tmp_path / "two")])  # rank 0 saves them
    assert all(p.returncode == 0 for p in procs), procs[0].stderr + procs[1].stderr
    one, two = (read_file(AdapterFolder(tmp_path / name).path / "adapters.safetensors") for name in ("one", "two"))
    assert_close_states(two, one)
    assert folder_hash(shares) == before  # the base is only read


def test_a_share_that_lacks_a_file_of_its_own_modules_is_named(tmp_path, tmp_path_factory):
    from slowllama.train.shares import missing_files

    share = split(fresh_store(tmp_path_factory, tmp_path / "store"), tmp_path / "shares", 2, log=lambda m: None)[1]
    store = Store.open(share, follower=True, share_ok=True)
    assert missing_files(store) is None
    own = next(f for f in sorted((share / "modules").iterdir()) if not f.name.startswith("extras"))
    own.unlink()
    assert missing_files(store).startswith(f"{own}: missing or of another size (modules {own.name.split('@')[0]}")


def test_shares_that_do_not_fit_the_run_are_refused_in_one_line(tmp_path, tmp_path_factory):
    shares = tmp_path / "shares"
    split(fresh_store(tmp_path_factory, tmp_path / "store"), shares, 2, log=lambda m: None)
    split(tmp_path / "store", tmp_path / "again", 2, log=lambda m: None)  # what they hold, to compare

    def error_lines(procs) -> list[str]:
        assert all(p.returncode != 0 for p in procs)
        return [line for p in procs for line in p.stderr.splitlines() if line.startswith("slowllama finetune: error")]

    # host 0's share given to both ranks of one torchrun
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "slowllama",
           "finetune", str(shares / "host-0"), *RUNS["sgd-streaming"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"})
    assert error_lines([proc]) == ["slowllama finetune: error: each host's share must be given to 1 rank (one host's "
                                   "ranks), and were: host 0's to 2, host 1's to 0"], proc.stderr
    # an eval on rank 0 of a streaming run: it would need the other host's modules (rank 0 alone says it)
    procs = two_hosts(shares, RUNS["sgd-streaming"] + ["--val-split", "0.2"])
    assert error_lines(procs) == ["slowllama finetune: error: --val-split: rank 0 evaluates alone, and its share lacks "
                                  "the other hosts' modules (kept as copies only when the model fits the device); "
                                  "evaluate the joined store instead"], procs[0].stderr + procs[1].stderr
    assert all(folder_hash(shares / h, skip=("lock",)) == folder_hash(tmp_path / "again" / h)
               for h in HOSTS)
    # shares of one store at different steps (host 1's manifest made to say step 1)
    manifest = json.loads((shares / "host-1" / MANIFEST).read_text())
    (shares / "host-1" / MANIFEST).write_text(json.dumps({**manifest, "step": 1}))
    procs = two_hosts(shares, RUNS["sgd-streaming"])
    assert error_lines(procs) == ["slowllama finetune: error: a host committed step 1, and another host is at step 0 "
                                  "without having prepared it: not shares of one store"], \
        procs[0].stderr + procs[1].stderr
    assert folder_hash(shares / "host-0", skip=("lock",)) == folder_hash(tmp_path / "again" / "host-0")
