"""`slowllama verify`, and files altered outside slowllama caught at load by every command."""

import fcntl
import json
import os
import shutil

import pytest
import xxhash

from slowllama import cli
from slowllama.store import safetensors_io as st

from conftest import ALICE, assert_one_line_error
from crashes import committed_hash, fresh_store


class Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def slowllama(capsys, *argv) -> Result:
    """`slowllama ARGV` in this process."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


@pytest.fixture
def store(tmp_path_factory, tmp_path):
    return fresh_store(tmp_path_factory, tmp_path / "store")


def manifest(store):
    return json.loads((store / "manifest.json").read_text())


def set_manifest(store, m):
    (store / "manifest.json").write_text(json.dumps(m))


def module_file(store, name="layers.1"):
    return store / manifest(store)["files"]["modules"][name]["file"]


def rehash(store, name, kind="modules"):
    """Record a file's new size and checksum in the manifest, as a hostile or careless editor would."""
    m = manifest(store)
    data = (store / m["files"][kind][name]["file"]).read_bytes()
    m["files"][kind][name].update(bytes=len(data), xxh3=xxhash.xxh3_128(data).hexdigest())
    set_manifest(store, m)


def test_a_sound_store(store, capsys):
    r = slowllama(capsys, "verify", store, "--json")
    assert r.returncode == 0, r.stderr
    assert "step 0, 5 files" in r.stdout and "sizes, checksums, names and shapes all match" in r.stdout
    assert json.loads(r.stdout.splitlines()[-1])["files"] == 5


def truncate(store):
    p = module_file(store)
    p.write_bytes(p.read_bytes()[:-10])
    return p, "size"


def flip_a_byte(store):
    p = module_file(store)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    return p, "checksum mismatch"


def remove(store):
    p = module_file(store)
    p.unlink()
    return p, "module file missing"


def point_up(store):
    m = manifest(store)
    m["files"]["modules"]["layers.1"]["file"] = "../x"
    set_manifest(store, m)
    return store / "manifest.json", "'../x' points outside the store"


def point_to_an_absolute_path(store):
    m = manifest(store)
    m["files"]["modules"]["layers.1"]["file"] = str(module_file(store))
    set_manifest(store, m)
    return store / "manifest.json", "points outside the store"


def plant_a_link(store):
    (store / "modules" / "layers.9@0.safetensors").symlink_to("/etc/passwd")
    return store / "modules" / "layers.9@0.safetensors", "symbolic link"


def link_a_module_to_a_copy_outside(store):
    p = module_file(store)
    outside = store.parent / "copy.safetensors"
    shutil.copyfile(p, outside)  # same bytes: only the link gives it away
    p.unlink()
    p.symlink_to(outside)
    return p, "symbolic link"


def link_a_folder_outside(store):
    (store.parent / "elsewhere").mkdir()
    (store / "optim").symlink_to(store.parent / "elsewhere")
    return store / "optim", "symbolic link"


def reshape_a_weight(store):
    p = module_file(store)
    tensors = {k: v.clone() for k, v in st.read_file(str(p)).items()}
    tensors["attention.wq.weight"] = tensors["attention.wq.weight"][:32]
    st.write_file(str(p), tensors)
    rehash(store, "layers.1")
    return p, "'attention.wq.weight' [32, 64] is not a weight of layers.1"


def drop_a_module(store):
    m = manifest(store)
    del m["files"]["modules"]["layers.0"]
    set_manifest(store, m)
    return store / "manifest.json", "no file for module 'layers.0'"


@pytest.mark.parametrize("damage", [truncate, flip_a_byte, remove, point_up, point_to_an_absolute_path, plant_a_link,
                                    link_a_module_to_a_copy_outside, link_a_folder_outside, reshape_a_weight,
                                    drop_a_module])
def test_verify_names_the_first_bad_file(damage, store, capsys):
    path, what = damage(store)
    line = assert_one_line_error(slowllama(capsys, "verify", store), str(path), what)
    assert line.startswith("slowllama verify: error: ")


def test_leftovers_of_an_interrupted_step_are_reported_not_failed(store, capsys):
    shutil.copyfile(module_file(store), store / "modules" / "layers.1@1.safetensors")
    (store / "journal.json").write_text('{"step": 1}')
    r = slowllama(capsys, "verify", store)
    assert r.returncode == 0 and "1 files left by an interrupted step" in r.stdout


@pytest.mark.parametrize("command", ["eval", "generate", "export", "finetune"])
def test_a_file_altered_outside_slowllama_is_refused_at_load(command, store, tmp_path, capsys):
    path, _ = flip_a_byte(store)
    before = committed_hash(store)
    argv = {"eval": ["--data", ALICE, "--seq-len", 16, "--device", "cpu"],
            "generate": ["--prompt", "Alice", "--max-new-tokens", 2, "--device", "cpu"],
            "export": [tmp_path / "out"],
            "finetune": ["--data", ALICE, "--seq-len", 16, "--batch-size", 2, "--steps", 1, "--device", "cpu"]}[command]
    assert_one_line_error(slowllama(capsys, command, store, *argv), str(path), "checksum mismatch")
    assert committed_hash(store) == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not (store / "journal.json").exists() and not list((store / "modules").glob("*@1.*"))


@pytest.mark.parametrize("command", ["verify", "eval", "export"])
def test_readers_refuse_a_store_a_finetune_is_writing(command, store, tmp_path, capsys):
    # a live writer: the lock file flock'ed, with its pid in it (a finetune in another process)
    fd = os.open(store / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242")
        argv = {"verify": [], "eval": ["--data", ALICE], "export": [tmp_path / "out"]}[command]
        assert_one_line_error(slowllama(capsys, command, store, *argv), "a finetune (pid 4242) is writing this store")
    finally:
        os.close(fd)
    # once it is gone (its lock released), they read the store, its pid still in the file
    assert slowllama(capsys, "verify", store).returncode == 0


def test_a_reader_overtaken_by_a_finetune_says_so(store, capsys):
    # eval/export opened the store at step 0; a finetune started since then and committed step 1,
    # removing step 0's files: the reader stops with a line that says what happened
    from slowllama.errors import SlowllamaError
    from slowllama.store.store import Store

    reader = Store.open(store)
    r = slowllama(capsys, "finetune", store, "--data", ALICE, "--seq-len", 16, "--batch-size", 2, "--steps", 1,
                  "--device", "cpu", "--log-every", 0)
    assert r.returncode == 0, r.stderr
    with pytest.raises(SlowllamaError, match="moved from step 0 to 1 while it was read"):
        reader.read("head")
