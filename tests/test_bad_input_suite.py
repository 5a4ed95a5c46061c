"""Bad input to every command: missing, empty, truncated, wrong-typed, wrong-shaped, non-UTF-8 and hostile files.

Each case damages a copy of a Meta folder or of a store (or passes a bad flag), runs the command in
this process (two of them also as `python -m slowllama`), and checks: exit non-zero, one line on
stderr naming the problem, no traceback, the source folder and the store byte for byte as they were
(lock, run/ and scratch/ aside), nothing written outside, no half-written output.
"""

import json
import os
import pickle
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
import xxhash

from slowllama import cli
from slowllama.store import safetensors_io as st

from conftest import ALICE, assert_one_line_error, run_cli
from crashes import base_store, folder_hash

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


class Result(SimpleNamespace):
    pass


def slowllama(capsys, *argv) -> Result:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return Result(returncode=code, stdout=out.out, stderr=without_progress(out.err))


def without_progress(stderr: str) -> str:
    """generate's note that it prepares a Meta folder first is progress, not part of the error."""
    return "\n".join(line for line in stderr.splitlines() if not line.endswith("preparing a temporary store"))


@pytest.fixture
def ctx(tmp_path_factory, tmp_path):
    store = base_store(tmp_path_factory)
    c = SimpleNamespace(tmp=tmp_path, src=tmp_path / "src", store=tmp_path / "store", outside=tmp_path / "outside")
    shutil.copytree(store.parent / "model", c.src)
    shutil.copytree(store, c.store)
    c.outside.mkdir()
    (c.outside / "victim.txt").write_text("keep me")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, " .encode("latin-1") * 50)
    (tmp_path / "empty.txt").write_bytes(b"")
    return c


# ---- helpers that damage a store the way a careless or hostile editor would ------------------------------
def manifest(c):
    return json.loads((c.store / "manifest.json").read_text())


def set_manifest(c, m):
    (c.store / "manifest.json").write_text(json.dumps(m))


def set_field(c, path, value):
    m = manifest(c)
    d = m
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    set_manifest(c, m)


def module_path(c, name="layers.1"):
    return c.store / manifest(c)["files"]["modules"][name]["file"]


def rehash(c, name="layers.1"):
    """Give the manifest the file's new size and checksum: only the content can give it away."""
    m = manifest(c)
    data = (c.store / m["files"]["modules"][name]["file"]).read_bytes()
    m["files"]["modules"][name].update(bytes=len(data), xxh3=xxhash.xxh3_128(data).hexdigest())
    set_manifest(c, m)


def rewrite_header(c, change):
    p = module_path(c)
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    rehash(c)
    return p


def rewrite_tensors(c, change):
    p = module_path(c)
    tensors = {k: v.clone() for k, v in st.read_file(str(p)).items()}
    change(tensors)
    st.write_file(str(p), tensors)
    rehash(c)
    return p


class RunsCode:
    """Unpickling this runs a shell command (it creates a file): a hostile checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def eval_argv(c):
    return ["eval", c.store, "--data", ALICE, "--seq-len", 16, "--device", "cpu"]


def finetune_argv(c, *more):
    return ["finetune", c.store, "--data", ALICE, "--seq-len", 16, "--batch-size", 2, "--steps", 1,
            "--device", "cpu", "--log-every", 0, *more]


# ---- init-tiny -------------------------------------------------------------------------------------------
@case
def init_tiny_text_not_utf8(c):
    return ["init-tiny", c.tmp / "tiny", "--text", c.tmp / "latin1.txt"], ["latin1.txt", "not UTF-8"]


@case
def init_tiny_text_empty(c):
    return ["init-tiny", c.tmp / "tiny", "--text", c.tmp / "empty.txt"], ["empty.txt", "empty"]


@case
def init_tiny_out_is_a_file(c):
    return ["init-tiny", c.outside / "victim.txt", "--force"], ["victim.txt", "not a folder"]


@case
def init_tiny_shards_that_do_not_divide(c):
    return ["init-tiny", c.tmp / "tiny", "--shards", 3], ["--shards 3", "does not split"]


@case
def init_tiny_no_shards(c):
    return ["init-tiny", c.tmp / "tiny", "--shards", 0], ["--shards", "at least 1"]


# ---- prepare ---------------------------------------------------------------------------------------------
@case
def prepare_params_json_empty(c):
    (c.src / "params.json").write_bytes(b"")
    return ["prepare", c.src, c.tmp / "new"], ["params.json", "not valid JSON"]


@case
def prepare_params_json_not_utf8(c):
    (c.src / "params.json").write_bytes(b'{"dim": 64, "n\xe9": 1}')
    return ["prepare", c.src, c.tmp / "new"], ["params.json", "not UTF-8"]


@case
def prepare_params_json_a_list(c):
    (c.src / "params.json").write_text("[64, 2, 4]")
    return ["prepare", c.src, c.tmp / "new"], ["params.json", "expected a JSON object"]


@case
def prepare_shard_empty(c):
    (c.src / "consolidated.00.pth").write_bytes(b"")
    return ["prepare", c.src, c.tmp / "new"], ["consolidated.00.pth", "not a PyTorch checkpoint"]


@case
def prepare_shard_of_random_bytes(c):
    (c.src / "consolidated.00.pth").write_bytes(os.urandom(4096))
    return ["prepare", c.src, c.tmp / "new"], ["consolidated.00.pth"]


@case
def prepare_shard_holding_a_number(c):
    sd = torch.load(c.src / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "layers.0.attention.wq.weight": 5}, c.src / "consolidated.00.pth")
    return ["prepare", c.src, c.tmp / "new"], ["consolidated.00.pth", "not a state dict of named tensors"]


@case
def prepare_shard_of_integers(c):
    sd = torch.load(c.src / "consolidated.00.pth", weights_only=True)
    torch.save({k: v.to(torch.int64) for k, v in sd.items()}, c.src / "consolidated.00.pth")
    return ["prepare", c.src, c.tmp / "new"], ["consolidated.00.pth", "int64", "not supported"]


@case
def prepare_into_its_own_source(c):
    return ["prepare", c.src, c.src, "--force"], [str(c.src), "overlaps"]


@case
def prepare_src_is_a_file(c):
    return ["prepare", c.src / "params.json", c.tmp / "new"], ["params.json", "no such folder"]


# ---- export ----------------------------------------------------------------------------------------------
@case
def export_into_the_store(c):
    return ["export", c.store, c.store / "modules", "--force"], ["modules", "overlaps"]


@case
def export_out_is_a_file(c):
    return ["export", c.store, c.outside / "victim.txt", "--force"], ["victim.txt", "not a folder"]


@case
def export_zero_shards(c):
    return ["export", c.store, c.tmp / "out", "--shards", 0], ["--shards", "at least 1"]


@case
def export_tokenizer_file_outside_the_store(c):
    set_field(c, ["source", "tokenizer_files"], ["../outside/victim.txt"])
    return ["export", c.store, c.tmp / "out"], ["tokenizer file", "victim.txt"]


@case
def export_split_dims_of_the_wrong_type(c):
    set_field(c, ["source", "split_dims"], "rows")
    return ["export", c.store, c.tmp / "out"], ["manifest.json", "field 'source' is malformed"]


@case
def export_truncated_module(c):
    p = module_path(c, "head")
    p.write_bytes(p.read_bytes()[:1000])
    return ["export", c.store, c.tmp / "out"], [p.name, "size 1000 bytes"]


# ---- eval ------------------------------------------------------------------------------------------------
@case
def eval_data_is_a_folder(c):
    # a folder is a data folder now (mlx-lm's layout); this one has no test.jsonl
    return ["eval", c.store, "--data", c.outside, "--seq-len", 16], ["outside", "a data folder without test.jsonl"]


@case
def eval_data_not_utf8(c):
    return ["eval", c.store, "--data", c.tmp / "latin1.txt", "--seq-len", 16], ["latin1.txt", "not UTF-8"]


@case
def eval_tokenizer_not_sentencepiece(c):
    (c.store / "tokenizer.model").write_bytes(b"\x00" * 64)
    m = manifest(c)  # re-hashed in the manifest's table: only the parse can give it away
    m["copied_files"]["tokenizer.model"] = {"bytes": 64, "xxh3": xxhash.xxh3_128(b"\x00" * 64).hexdigest()}
    set_manifest(c, m)
    return eval_argv(c), ["tokenizer.model", "not a sentencepiece model"]


@case
def eval_manifest_empty(c):
    (c.store / "manifest.json").write_bytes(b"")
    return eval_argv(c), ["manifest.json", "not valid JSON"]


@case
def eval_manifest_not_utf8(c):
    (c.store / "manifest.json").write_bytes(b'{"format": "slowllama-store\xff"}')
    return eval_argv(c), ["manifest.json", "not UTF-8"]


@case
def eval_manifest_truncated(c):
    text = (c.store / "manifest.json").read_text()
    (c.store / "manifest.json").write_text(text[: len(text) // 2])
    return eval_argv(c), ["manifest.json", "not valid JSON"]


@case
def eval_manifest_step_a_string(c):
    set_field(c, ["step"], "two")
    return eval_argv(c), ["manifest.json", "'step'", "'two'"]


@case
def eval_manifest_model_a_list(c):
    set_field(c, ["model"], [64, 2])
    return eval_argv(c), ["manifest.json", "'model' must be an object"]


# ---- generate --------------------------------------------------------------------------------------------
@case
def generate_temperature_nan(c):
    return ["generate", c.store, "--prompt", "Alice", "--temperature", "nan"], ["--temperature", "nan"]


@case
def generate_from_a_folder_with_a_pickle_that_runs_code(c):
    sd = torch.load(c.src / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "evil": RunsCode(c.outside / "pwned")}, c.src / "consolidated.00.pth")
    return ["generate", c.src, "--prompt", "Alice", "--device", "cpu"], ["consolidated.00.pth",
                                                                         "not a plain tensor checkpoint"]


@case
def generate_module_file_that_is_a_pickle(c):
    p = module_path(c)
    p.write_bytes(pickle.dumps(RunsCode(c.outside / "pwned")))
    rehash(c)
    return ["generate", c.store, "--prompt", "Alice", "--device", "cpu"], [p.name, "not a safetensors file"]


# ---- finetune --------------------------------------------------------------------------------------------
@case
def finetune_manifest_points_up(c):
    set_field(c, ["files", "modules", "head", "file"], "../outside/victim.txt")
    return finetune_argv(c), ["manifest.json", "points outside the store"]


@case
def finetune_manifest_points_to_an_absolute_path(c):
    set_field(c, ["files", "modules", "head", "file"], str(c.outside / "victim.txt"))
    return finetune_argv(c), ["manifest.json", "points outside the store"]


@case
def finetune_module_linked_to_a_copy_outside(c):
    p = module_path(c)
    shutil.copyfile(p, c.outside / "copy.safetensors")  # the same bytes: only the link gives it away
    p.unlink()
    p.symlink_to(c.outside / "copy.safetensors")
    return finetune_argv(c), [p.name, "symbolic link"]


@case
def finetune_optim_folder_links_outside(c):
    # a writer removes the files of modules/, optim/, master/ that the manifest doesn't name: never through a link
    (c.store / "optim").symlink_to(c.outside)
    return finetune_argv(c, "--optimizer", "adamw"), ["optim", "symbolic link"]


@case
def finetune_lock_links_outside(c):
    (c.store / "lock").symlink_to(c.outside / "victim.txt")  # would be truncated to hold the pid
    return finetune_argv(c), ["lock", "symbolic link"]


@case
def finetune_header_claims_a_huge_length(c):
    p = module_path(c)
    data = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    rehash(c)
    return finetune_argv(c), [p.name, "not a safetensors file"]


@case
def finetune_header_offsets_past_the_end(c):
    def past(header):
        header["attention.wq.weight"]["data_offsets"][1] += 1 << 40
    p = rewrite_header(c, past)
    return finetune_argv(c), [p.name, "'attention.wq.weight' lies outside the file"]


@case
def finetune_header_claims_a_huge_shape(c):
    def huge(header):
        header["attention.wo.weight"]["shape"] = [1 << 40, 1 << 40]
    p = rewrite_header(c, huge)
    return finetune_argv(c), [p.name, "'attention.wo.weight' lies outside the file"]


@case
def finetune_module_of_the_wrong_shape(c):
    p = rewrite_tensors(c, lambda t: t.update({"feed_forward.w1.weight": t["feed_forward.w1.weight"][:, :32]}))
    return finetune_argv(c), [p.name, "'feed_forward.w1.weight'", "not a weight of layers.1"]


@case
def finetune_module_of_the_wrong_dtype(c):
    p = rewrite_tensors(c, lambda t: t.update({"ffn_norm.weight": t["ffn_norm.weight"].half()}))
    return finetune_argv(c), [p.name, "'ffn_norm.weight'", "torch.float16"]


@case
def finetune_val_data_not_utf8(c):
    return finetune_argv(c, "--val-data", c.tmp / "latin1.txt"), ["latin1.txt", "not UTF-8"]


@case
def finetune_negative_completion_tokens(c):
    return finetune_argv(c, "--prompt", "Alice", "--completion-tokens", -1), ["--completion-tokens"]


@case
def finetune_run_record_a_number(c):
    set_field(c, ["run"], 5)
    return finetune_argv(c), ["manifest.json", "'run'"]


@case
def finetune_manifest_of_another_version(c):
    set_field(c, ["version"], 99)
    return finetune_argv(c), ["manifest.json", "store version 99"]


@case
def finetune_file_size_a_string(c):
    set_field(c, ["files", "modules", "head", "bytes"], "lots")
    return finetune_argv(c), ["manifest.json", "'head'", "'bytes'"]


# ---- verify ----------------------------------------------------------------------------------------------
@case
def verify_torch_checkpoint_as_module(c):
    p = module_path(c)
    torch.save({"attention.wq.weight": torch.zeros(64, 64)}, p)
    rehash(c)
    return ["verify", c.store], [p.name, "not a safetensors file"]


@case
def verify_manifest_is_a_folder(c):
    (c.store / "manifest.json").unlink()
    (c.store / "manifest.json").mkdir()
    return ["verify", c.store], ["not a slowllama store"]


@case
def verify_store_is_a_file(c):
    return ["verify", c.outside / "victim.txt"], ["victim.txt", "no such store folder"]


@case
def verify_tokenizer_missing(c):
    (c.store / "tokenizer.model").unlink()
    return ["verify", c.store], ["tokenizer.model", "missing"]


@case
def verify_lock_is_a_folder(c):
    (c.store / "lock").mkdir()
    return ["verify", c.store], ["lock", "a folder where slowllama keeps its lock file"]


@case
def verify_a_module_missing_from_the_manifest(c):
    m = manifest(c)
    del m["files"]["modules"]["tok_embeddings"]
    set_manifest(c, m)
    return ["verify", c.store], ["manifest.json", "no file for module 'tok_embeddings'"]


def test_the_suite_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({fn.__name__.split("_")[0] for fn in CASES.values()}) == 7


def snapshot(c):
    return (folder_hash(c.src), folder_hash(c.store, skip=("lock", "run", "scratch")), folder_hash(c.outside),
            sorted(p.name for p in c.tmp.iterdir()))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, ctx, capsys):
    argv, fragments = CASES[name](ctx)
    before = snapshot(ctx)
    line = assert_one_line_error(slowllama(capsys, *argv), *map(str, fragments))
    assert line.startswith(f"slowllama {argv[0]}: error: ")
    assert snapshot(ctx) == before  # sources, store, outside files: as they were; no output, no partial files
    assert not (ctx.outside / "pwned").exists()


@pytest.mark.parametrize("name", ["generate_from_a_folder_with_a_pickle_that_runs_code",
                                  "finetune_optim_folder_links_outside"])
def test_bad_input_in_a_subprocess(name, ctx):
    argv, fragments = CASES[name](ctx)
    before = snapshot(ctx)
    proc = run_cli(*argv)
    assert_one_line_error(Result(returncode=proc.returncode, stderr=without_progress(proc.stderr)),
                          *map(str, fragments))
    assert snapshot(ctx) == before
    assert not (ctx.outside / "pwned").exists()
