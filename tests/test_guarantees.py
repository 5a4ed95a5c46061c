"""Nothing lost, nothing outside: bad inputs and hostile files for every command (issue 19).

Each case damages copies of a Meta folder, a store, an adapter folder or a Hugging Face folder (or
passes a bad path or value), runs `slowllama ARGS` in this process, and checks: exit non-zero, one
line on stderr naming the file or field, no traceback, and the source, the store, the adapter folder,
the Hugging Face folder and the files outside byte for byte as they were, with nothing new beside them.
Cases are "bad" (flags, paths, values) or "hostile" (files damaged or planted).
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

from slowllama import cli
from slowllama.commands.finetune import finetune
from slowllama.errors import SlowllamaError
from slowllama.formats.hf import export_hf, prepare_hf
from slowllama.settings import FinetuneSettings
from slowllama.store import safetensors_io as st

from conftest import ALICE, assert_one_line_error
from crashes import base_store, folder_hash

BAD, HOSTILE = {}, {}


def bad(fn):
    BAD[fn.__name__] = fn
    return fn


def hostile(fn):
    HOSTILE[fn.__name__] = fn
    return fn


def many(registry, name, items):
    """Register one case per item: items maps a suffix to a function of the context."""
    for suffix, fn in items.items():
        registry[f"{name}[{suffix}]"] = fn


# ---- the folders, built once per module ----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store = base_store(tmp_path_factory)
    root = tmp_path_factory.mktemp("guarantees")
    shutil.copytree(store, root / "store")
    finetune(FinetuneSettings(store=str(root / "store"), data=str(ALICE), device="cpu", steps=2, save_every=1,
                              lora_rank=2, adapter_path=str(root / "ad"), batch_size=2, seq_len=16, log_every=0),
             log=lambda m: None, emit=lambda m: None)
    export_hf(root / "store", root / "hf", log=lambda m: None)
    held = root / "held"
    shutil.copytree(store, held)
    # another process holds `held` as a running finetune would (an flock on its lock file)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(held / 'lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
                               "print('held', flush=True); time.sleep(3600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield SimpleNamespace(model=store.parent / "model", store=root / "store", ad=root / "ad", hf=root / "hf",
                          held=held)
    holder.kill()
    holder.wait()


@pytest.fixture
def c(world, tmp_path):
    ctx = SimpleNamespace(tmp=tmp_path, src=tmp_path / "src", store=tmp_path / "store", ad=tmp_path / "ad",
                          hf=tmp_path / "hf", outside=tmp_path / "outside", held=world.held)
    shutil.copytree(world.model, ctx.src)
    shutil.copytree(world.store, ctx.store, ignore=shutil.ignore_patterns("run", "lock", "scratch"))
    shutil.copytree(world.ad, ctx.ad, ignore=shutil.ignore_patterns("lock"))
    shutil.copytree(world.hf, ctx.hf)
    ctx.outside.mkdir()
    (ctx.outside / "victim.txt").write_text("keep me")
    ctx.victim = ctx.outside / "victim.txt"
    return ctx


def slowllama(capsys, *argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def snapshot(c):
    return (folder_hash(c.src), folder_hash(c.store, skip=("lock", "run", "scratch")), folder_hash(c.ad, skip=("lock",)),
            folder_hash(c.hf), folder_hash(c.outside), sorted(p.name for p in c.tmp.iterdir()))


def check_case(c, capsys, argv, fragments):
    before = snapshot(c)
    line = assert_one_line_error(slowllama(capsys, *argv), *map(str, fragments))
    assert line.startswith(f"slowllama {argv[0]}: error: "), line
    assert snapshot(c) == before  # nothing changed, nothing written beside the folders
    assert (c.outside / "victim.txt").read_text() == "keep me"


# ---- argv of the commands ----------------------------------------------------------------------------------
def eval_argv(c, *more):
    return ["eval", c.store, "--data", ALICE, "--seq-len", 16, "--device", "cpu", *more]


def finetune_argv(c, *more):
    return ["finetune", c.store, "--data", ALICE, "--seq-len", 16, "--batch-size", 2, "--steps", 1,
            "--device", "cpu", "--log-every", 0, *more]


def lora_argv(c, *more):
    return finetune_argv(c, "--lora-rank", 2, "--adapter-path", c.ad, "--steps", 3, *more)


# ---- helpers that damage files -------------------------------------------------------------------------------
def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))  # NaN and Infinity written as JSON's extensions, as an editor might


def set_key(path, keys, value):
    def change(d):
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    edit_json(path, change)


def module_file(c, name="layers.1"):
    return c.store / json.loads((c.store / "manifest.json").read_text())["files"]["modules"][name]["file"]


def rehash(c, name="layers.1"):
    """Give the manifest the file's new size and checksum: only the content can give it away."""
    def change(m):
        data = (c.store / m["files"]["modules"][name]["file"]).read_bytes()
        m["files"]["modules"][name].update(bytes=len(data), xxh3=xxhash.xxh3_128(data).hexdigest())
    edit_json(c.store / "manifest.json", change)


def split(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header_text: bytes, body: bytes) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + body


def rewrite_header(path, change, body_change=None):
    """Apply change(header) (or, returning bytes, replace the header text) to a safetensors file."""
    header, body = split(path.read_bytes())
    out = change(header)
    text = out if isinstance(out, bytes) else json.dumps(header).encode()
    path.write_bytes(join(text, body_change(body) if body_change else body))


def first_two(header):
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return header[keys[0]], header[keys[1]]


def overlap(h):
    a, b = first_two(h)
    b["data_offsets"][0] -= 4
    a["data_offsets"][1] += 0  # b now starts inside a
    a["shape"], b["shape"] = a["shape"], [b["data_offsets"][1] - b["data_offsets"][0]]
    b["dtype"] = "U8"


def gap(h):
    a, _ = first_two(h)
    a["data_offsets"][1] -= 4
    a["shape"], a["dtype"] = [a["data_offsets"][1] - a["data_offsets"][0]], "U8"


def swap_offsets(h):
    a, _ = first_two(h)
    a["data_offsets"].reverse()


def duplicate_key(h):
    text = json.dumps(h)
    key, value = next((k, v) for k, v in h.items() if k != "__metadata__")
    return (text[:-1] + ", " + json.dumps(key) + ": " + json.dumps(value) + "}").encode()


HEADER_DAMAGE = {
    "tensors_overlap": (overlap, None, "overlap"),
    "a_gap_between_tensors": (gap, None, "bytes of no tensor"),
    "bytes_after_the_last_tensor": (lambda h: None, lambda body: body + b"\0" * 16, "bytes after the last tensor"),
    "unknown_dtype": (lambda h: first_two(h)[0].update(dtype="F7"), None, "unknown dtype"),
    "negative_shape": (lambda h: first_two(h)[0].update(shape=[-1, 64]), None, "bad header entry"),
    "shape_of_floats": (lambda h: first_two(h)[0].update(shape=[0.5, 64]), None, "bad header entry"),
    "shape_a_string": (lambda h: first_two(h)[0].update(shape="64x64"), None, "bad header entry"),
    "offsets_reversed": (swap_offsets, None, "lies outside the file"),
    "three_offsets": (lambda h: first_two(h)[0].update(data_offsets=[0, 4, 8]), None, "bad header entry"),
    "offsets_negative": (lambda h: first_two(h)[0].update(data_offsets=[-8, 0]), None, "bad header entry"),
    "duplicate_key": (duplicate_key, None, "not a safetensors file"),
    "metadata_not_strings": (lambda h: h.update(__metadata__={"format": 5}), None, "__metadata__"),
    "header_a_list": (lambda h: b"[1, 2, 3]", None, "not a safetensors file"),
    "header_not_json": (lambda h: b"{'a': 1}", None, "not a safetensors file"),
    "entry_not_an_object": (lambda h: h.update({next(iter(k for k in h if k != "__metadata__")): 7}), None,
                            "bad header entry"),
    "shape_too_small_for_offsets": (lambda h: first_two(h)[0].update(shape=[1]), None, "need"),
    "dtype_bool_of_floats": (lambda h: first_two(h)[0].update(dtype="F64"), None, "need"),
}


def damaged_module(change, body_change, command):
    def case(c):
        p = module_file(c)
        rewrite_header(p, change, body_change)
        rehash(c)
        argv = {"verify": ["verify", c.store], "eval": eval_argv(c), "finetune": finetune_argv(c),
                "export": ["export", c.store, c.tmp / "out"]}[command]
        return argv, [p.name]
    return case


for _command in ("verify", "eval", "finetune", "export"):
    many(HOSTILE, f"{_command}_module_header", {name: damaged_module(fn, body, _command)
                                                for name, (fn, body, _) in HEADER_DAMAGE.items()})


def damaged_shard(change, body_change, fragment):
    def case(c):
        p = next(c.hf.glob("*.safetensors"))
        rewrite_header(p, change, body_change)
        return ["prepare", c.hf, c.tmp / "new"], [p.name, fragment]
    return case


many(HOSTILE, "prepare_hf_shard_header", {name: damaged_shard(*spec) for name, spec in HEADER_DAMAGE.items()
                                          if name not in ("metadata_not_strings",)})


def damaged_adapters(change, fragment):
    def case(c):
        p = c.ad / json.loads((c.ad / "state.json").read_text())["files"]["adapters"]
        rewrite_header(p, change)
        return ["verify", c.ad], [p.name]
    return case


many(HOSTILE, "verify_adapter_header", {name: damaged_adapters(fn, frag) for name, (fn, _, frag)
                                        in list(HEADER_DAMAGE.items())[:4]})


# ---- 1. destinations -----------------------------------------------------------------------------------------
@bad
def export_hf_into_the_store_itself(c):
    return ["export", c.store, c.store, "--format", "hf", "--force"], [c.store, "overlaps"]


@bad
def export_meta_into_the_store_itself(c):
    return ["export", c.store, c.store, "--format", "meta", "--force"], [c.store, "overlaps"]


@bad
def export_into_the_stores_run_folder(c):
    return ["export", c.store, c.store / "run" / "out", "--format", "hf"], ["overlaps"]


@bad
def export_onto_the_folder_that_holds_the_store(c):
    return ["export", c.store, c.tmp, "--format", "hf", "--force"], [c.tmp, "overlaps"]


@bad
def export_onto_a_file(c):
    return ["export", c.store, c.victim, "--force"], ["victim.txt", "not a folder"]


@bad
def export_hf_onto_a_file(c):
    return ["export", c.store, c.victim, "--format", "hf", "--force"], ["victim.txt", "not a folder"]


@bad
def export_onto_a_folder_of_other_things(c):
    return ["export", c.store, c.outside, "--force"], [c.outside, "replaces only a checkpoint folder"]


@bad
def export_hf_onto_a_folder_of_other_things(c):
    return ["export", c.store, c.outside, "--format", "hf", "--force"], [c.outside, "replaces only"]


@bad
def export_onto_an_adapter_folder(c):
    return ["export", c.store, c.ad, "--force"], [c.ad, "replaces only"]


@bad
def export_onto_another_store(c):
    return ["export", c.store, c.held, "--force"], [c.held]


@bad
def export_into_a_folder_a_running_slowllama_holds(c):
    return ["export", c.store, c.held / "out"], [c.held, "running slowllama"]


@bad
def export_without_force_onto_a_folder(c):
    return ["export", c.store, c.outside], [c.outside, "already exists"]


@bad
def export_through_a_link(c):
    (c.tmp / "link").symlink_to(c.outside)
    return ["export", c.store, c.tmp / "link", "--force"], ["link"]


@bad
def export_under_a_file(c):
    return ["export", c.store, c.victim / "out"], ["victim.txt", "not a folder"]


@bad
def export_onto_a_checkpoint_folder_that_holds_a_store(c):
    box = c.outside / "box"
    box.mkdir()
    (box / "config.json").write_text("{}")
    shutil.copytree(c.store, box / "inner", ignore=shutil.ignore_patterns("modules"))
    return ["export", c.store, box, "--format", "hf", "--force"], [box, "holds"]


@bad
def prepare_into_its_own_source(c):
    return ["prepare", c.src, c.src, "--force"], [c.src, "overlaps"]


@bad
def prepare_hf_into_its_own_source(c):
    return ["prepare", c.hf, c.hf, "--force"], [c.hf, "overlaps"]


@bad
def prepare_onto_the_sources_parent(c):
    return ["prepare", c.hf, c.tmp, "--force"], [c.tmp, "overlaps"]


@bad
def prepare_inside_its_source(c):
    return ["prepare", c.hf, c.hf / "store"], ["overlaps"]


@bad
def prepare_inside_a_store(c):
    return ["prepare", c.src, c.store / "modules" / "new"], [c.store, "store or adapter folder"]


@bad
def prepare_inside_an_adapter_folder(c):
    return ["prepare", c.src, c.ad / "new"], [c.ad, "store or adapter folder"]


@bad
def prepare_onto_a_file(c):
    return ["prepare", c.src, c.victim, "--force"], ["victim.txt", "not a folder"]


@bad
def prepare_hf_onto_a_file(c):
    return ["prepare", c.hf, c.victim, "--force"], ["victim.txt", "not a folder"]


@bad
def prepare_onto_a_folder_of_other_things(c):
    return ["prepare", c.src, c.outside, "--force"], [c.outside, "replaces only a slowllama store"]


@bad
def prepare_hf_onto_a_folder_of_other_things(c):
    return ["prepare", c.hf, c.outside, "--force"], [c.outside, "replaces only a slowllama store"]


@bad
def prepare_onto_a_checkpoint_folder(c):
    return ["prepare", c.src, c.hf, "--force"], [c.hf, "replaces only a slowllama store"]


@bad
def prepare_onto_a_store_a_running_slowllama_holds(c):
    return ["prepare", c.src, c.held, "--force"], [c.held, "running slowllama"]


@bad
def prepare_through_a_link(c):
    (c.tmp / "link").symlink_to(c.outside)
    return ["prepare", c.src, c.tmp / "link", "--force"], ["link", "symbolic link"]


@bad
def prepare_under_a_file(c):
    return ["prepare", c.src, c.victim / "store"], ["victim.txt", "not a folder"]


@bad
def fuse_onto_the_base_store(c):
    return ["fuse", c.store, c.store, "--adapter-path", c.ad, "--force"], [c.store, "overlaps"]


@bad
def fuse_onto_the_adapter_folder(c):
    return ["fuse", c.store, c.ad, "--adapter-path", c.ad, "--force"], [c.ad, "overlaps"]


@bad
def fuse_into_the_stores_modules(c):
    return ["fuse", c.store, c.store / "modules", "--adapter-path", c.ad, "--force"], ["overlaps"]


@bad
def fuse_onto_a_file(c):
    return ["fuse", c.store, c.victim, "--adapter-path", c.ad, "--force"], ["victim.txt", "not a folder"]


@bad
def fuse_onto_a_folder_of_other_things(c):
    return ["fuse", c.store, c.outside, "--adapter-path", c.ad, "--force"], [c.outside, "replaces only"]


@bad
def fuse_onto_a_folder_a_running_slowllama_holds(c):
    return ["fuse", c.store, c.held / "x", "--adapter-path", c.ad], [c.held, "running slowllama"]


@bad
def fuse_without_an_adapter_folder(c):
    return ["fuse", c.store, c.tmp / "out", "--adapter-path", c.outside], [c.outside, "adapter_config.json"]


@bad
def lora_adapters_into_the_stores_modules(c):
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.store / "modules"), [c.store, "overlaps"]


@bad
def lora_adapters_in_the_store(c):
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.store), [c.store, "overlaps"]


@bad
def lora_adapters_around_the_store(c):
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.tmp), [c.tmp, "overlaps"]


@bad
def lora_adapters_in_a_file(c):
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.victim), ["victim.txt", "not a folder"]


@bad
def lora_adapters_under_a_file(c):
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.victim / "ad"), ["victim.txt", "not a folder"]


@bad
def lora_adapters_in_a_folder_of_other_things(c):
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.outside), [c.outside, "not a slowllama adapter"]


@bad
def lora_adapters_in_a_held_folder(c):
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.held / "ad"), [c.held, "running slowllama"]


@bad
def lora_adapters_through_a_link(c):
    (c.tmp / "link").symlink_to(c.ad)
    return finetune_argv(c, "--lora-rank", 4, "--adapter-path", c.tmp / "link"), ["link", "symbolic link"]


@bad
def adapter_path_without_lora_rank(c):
    return finetune_argv(c, "--adapter-path", c.tmp / "new-ad"), ["--adapter-path", "--lora-rank"]


@bad
def adapter_path_of_an_existing_folder_without_lora_rank(c):
    return finetune_argv(c, "--adapter-path", c.ad), ["--adapter-path", "--lora-rank"]


@bad
def plot_into_the_stores_modules(c):
    return ["plot", c.ad, "--out", c.store / "modules" / "x.png"], ["modules", "outside its run folder"]


@bad
def plot_over_a_file_that_is_not_a_png(c):
    return ["plot", c.ad, "--out", c.victim], ["victim.txt", "not a file slowllama wrote"]


@bad
def plot_onto_a_folder(c):
    return ["plot", c.ad, "--out", c.outside], [c.outside, "not a regular file"]


@bad
def plot_through_a_link(c):
    (c.tmp / "l.png").symlink_to(c.victim)
    return ["plot", c.ad, "--out", c.tmp / "l.png"], ["l.png", "symbolic link"]


@bad
def plot_into_a_held_folder(c):
    return ["plot", c.ad, "--out", c.held / "x.png"], [c.held]


@bad
def init_tiny_onto_a_folder_of_other_things(c):
    return ["init-tiny", c.outside, "--force"], [c.outside, "replaces only a Meta model folder"]


@bad
def init_tiny_onto_a_store(c):
    return ["init-tiny", c.store, "--force"], [c.store, "replaces only"]


@bad
def init_tiny_inside_a_store(c):
    return ["init-tiny", c.store / "tiny"], [c.store, "store or adapter folder"]


# ---- 4. numbers: params.json, config.json, the manifest, TOML, flags ---------------------------------------
NOT_NUMBERS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "negative": -1.0, "zero": 0}


def params_case(field, value):
    def case(c):
        set_key(c.src / "params.json", [field], value)
        return ["prepare", c.src, c.tmp / "new"], ["params.json", field]
    return case


for _field in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
    many(BAD, f"prepare_params_{_field}", {k: params_case(_field, v) for k, v in NOT_NUMBERS.items()})
for _field in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "vocab_size"):
    many(BAD, f"prepare_params_{_field}", {"huge": params_case(_field, 1 << 40), "string": params_case(_field, "64"),
                                           "float": params_case(_field, 2.5), "bool": params_case(_field, True)})
many(BAD, "prepare_params_use_scaled_rope", {"string": params_case("use_scaled_rope", "yes")})
many(BAD, "prepare_params_norm_eps", {"above_one": params_case("norm_eps", 5.0)})


def config_case(keys, value, fragment=None):
    def case(c):
        set_key(c.hf / "config.json", keys, value)
        return ["prepare", c.hf, c.tmp / "new"], ["config.json", fragment or keys[-1]]
    return case


for _field in ("rms_norm_eps", "rope_theta"):
    many(BAD, f"prepare_config_{_field}", {k: config_case([_field], v) for k, v in NOT_NUMBERS.items()})
for _field in ("hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings", "vocab_size"):
    many(BAD, f"prepare_config_{_field}", {"huge": config_case([_field], 1 << 40, None),
                                           "nan": config_case([_field], float("nan")),
                                           "string": config_case([_field], "64")})
many(BAD, "prepare_config_rope_scaling", {
    k: config_case(["rope_scaling"], {"rope_type": "llama3", "factor": v, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "factor")
    for k, v in NOT_NUMBERS.items() if k != "zero"})


def manifest_case(keys, value, fragment=None, command="eval"):
    def case(c):
        set_key(c.store / "manifest.json", keys, value)
        argv = eval_argv(c) if command == "eval" else finetune_argv(c)
        return argv, ["manifest.json", fragment or keys[-1]]
    return case


for _field in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
    many(HOSTILE, f"eval_manifest_model_{_field}", {k: manifest_case(["model", _field], v)
                                                    for k, v in NOT_NUMBERS.items() if k != "zero"})
many(HOSTILE, "export_manifest_source_params", {
    k: (lambda v: lambda c: (set_key(c.store / "manifest.json", ["source", "params", "norm_eps"], v),
                             (["export", c.store, c.tmp / "out"], ["manifest.json", "source.params", "norm_eps"]))[1])(v)
    for k, v in NOT_NUMBERS.items()})
many(HOSTILE, "eval_manifest_model_dim", {"huge": manifest_case(["model", "dim"], 1 << 40)})
many(HOSTILE, "eval_manifest_step", {"negative": manifest_case(["step"], -1), "float": manifest_case(["step"], 1.5)})
many(HOSTILE, "finetune_manifest_run", {
    "grad_norm_nan": manifest_case(["run"], {"start_step": 0, "settings": {}, "grad_norm": float("nan")},
                                   "grad_norm", "finetune"),
    "grad_norm_inf": manifest_case(["run"], {"start_step": 0, "settings": {}, "grad_norm": float("inf")},
                                   "grad_norm", "finetune"),
    "grad_norm_negative": manifest_case(["run"], {"start_step": 0, "settings": {}, "grad_norm": -1.0},
                                        "grad_norm", "finetune"),
    "start_step_past_the_step": manifest_case(["run"], {"start_step": 99, "settings": {}}, "start_step",
                                              "finetune"),
    "start_step_negative": manifest_case(["run"], {"start_step": -1, "settings": {}}, "start_step", "finetune")})
many(HOSTILE, "eval_manifest_state_part_elements", {"zero": manifest_case(["state_part_elements"], 0),
                                                    "nan": manifest_case(["state_part_elements"], float("nan"))})
many(HOSTILE, "eval_manifest_copied_files", {
    "outside": manifest_case(["copied_files", "../outside/victim.txt"], {"bytes": 7, "xxh3": "0"}, "copied_files"),
    "size_a_string": manifest_case(["copied_files", "tokenizer.model", "bytes"], "big", "tokenizer.model"),
    "not_an_object": manifest_case(["copied_files"], [1, 2], "copied_files")})


def toml_case(command, key, literal):
    def case(c):
        (c.tmp / "cfg.toml").write_text(f"{key} = {literal}\n")
        argv = {"finetune": finetune_argv(c), "generate": ["generate", c.store, "--prompt", "Alice"],
                "eval": eval_argv(c)}[command]
        return [*argv, "-c", c.tmp / "cfg.toml"], ["cfg.toml", key, "finite"]
    return case


for _key in ("lr", "grad_clip", "dropout", "adam_eps", "weight_decay", "lora_alpha", "lora_dropout", "val_split"):
    many(BAD, f"finetune_toml_{_key}", {"nan": toml_case("finetune", _key, "nan"),
                                        "inf": toml_case("finetune", _key, "inf")})
many(BAD, "generate_toml", {"temperature_inf": toml_case("generate", "temperature", "inf"),
                            "top_p_nan": toml_case("generate", "top_p", "nan")})


def flag_case(argv_of, flag, value, *fragments):
    def case(c):
        return [*argv_of(c), flag, value], [flag, *fragments]
    return case


many(BAD, "finetune_flag", {
    "lr_nan": flag_case(finetune_argv, "--lr", "nan"), "lr_inf": flag_case(finetune_argv, "--lr", "inf"),
    "lr_negative": flag_case(finetune_argv, "--lr", "-1"), "grad_clip_nan": flag_case(finetune_argv, "--grad-clip", "nan"),
    "grad_clip_negative": flag_case(finetune_argv, "--grad-clip", "-2"),
    "dropout_nan": flag_case(finetune_argv, "--dropout", "nan"), "dropout_one": flag_case(finetune_argv, "--dropout", "1"),
    "adam_eps_nan": flag_case(finetune_argv, "--adam-eps", "nan"), "adam_eps_zero": flag_case(finetune_argv, "--adam-eps", "0"),
    "weight_decay_inf": flag_case(finetune_argv, "--weight-decay", "inf"),
    "weight_decay_negative": flag_case(finetune_argv, "--weight-decay", "-1", ),
    "val_split_nan": flag_case(finetune_argv, "--val-split", "nan"),
    "val_split_one": flag_case(finetune_argv, "--val-split", "1"),
    "lora_alpha_nan": flag_case(lora_argv, "--lora-alpha", "nan"),
    "lora_alpha_inf": flag_case(lora_argv, "--lora-alpha", "inf"),
    "lora_dropout_nan": flag_case(lora_argv, "--lora-dropout", "nan"),
    "lora_dropout_negative": flag_case(lora_argv, "--lora-dropout", "-0.5"),
    "steps_zero": flag_case(finetune_argv, "--steps", "0"),
    "save_every_zero": flag_case(finetune_argv, "--save-every", "0"),
    "warmup_negative": flag_case(finetune_argv, "--warmup-steps", "-3"),
    "max_memory_zero": flag_case(finetune_argv, "--max-memory", "0"),
})
many(BAD, "finetune_adam_betas", {
    k: (lambda v: lambda c: (finetune_argv(c, "--optimizer", "adamw", f"--adam-betas={v}"), ["--adam-betas"]))(v)
    for k, v in {"nan": "nan,0.999", "one": "1,0.999", "negative": "-0.1,0.9", "inf": "0.9,inf"}.items()})
many(BAD, "generate_flag", {
    "temperature_inf": flag_case(lambda c: ["generate", c.store, "--prompt", "Alice"], "--temperature", "inf"),
    "temperature_nan": flag_case(lambda c: ["generate", c.store, "--prompt", "Alice"], "--temperature", "nan"),
    "top_p_nan": flag_case(lambda c: ["generate", c.store, "--prompt", "Alice"], "--top-p", "nan"),
    "top_p_zero": flag_case(lambda c: ["generate", c.store, "--prompt", "Alice"], "--top-p", "0")})


def adapter_config_case(key, value, fragment=None):
    def case(c):
        set_key(c.ad / "slowllama_adapter.json", [key], value)
        return eval_argv(c, "--adapter-path", c.ad), [fragment or "slowllama_adapter.json"]
    return case


many(HOSTILE, "eval_adapter_config", {
    "rank_huge": adapter_config_case("rank", 1 << 40), "rank_zero": adapter_config_case("rank", 0),
    "rank_float": adapter_config_case("rank", 2.5), "rank_string": adapter_config_case("rank", "4"),
    "alpha_nan": adapter_config_case("alpha", float("nan"), "--lora-alpha"),
    "alpha_negative": adapter_config_case("alpha", -1.0, "--lora-alpha"),
    "dropout_nan": adapter_config_case("dropout", float("nan"), "--lora-dropout"),
    "targets_numbers": adapter_config_case("targets", [1, 2]),
    "model_a_string": adapter_config_case("model", "llama"),
    "model_of_another_dim": adapter_config_case("model", {"dim": 4096}, "dim 4096")})


def state_case(change, fragment="state.json", command="eval"):
    def case(c):
        edit_json(c.ad / "state.json", change)
        argv = {"eval": eval_argv(c, "--adapter-path", c.ad), "verify": ["verify", c.ad],
                "fuse": ["fuse", c.store, c.tmp / "f", "--adapter-path", c.ad], "finetune": lora_argv(c)}[command]
        return argv, [fragment]
    return case


for _command in ("eval", "fuse", "finetune", "verify"):
    many(HOSTILE, f"{_command}_adapter_state", {
        "step_negative": state_case(lambda s: s.update(step=-1), command=_command),
        "file_outside": state_case(lambda s: s["files"].update(adapters="../outside/victim.txt"), command=_command),
        "snapshot_outside": state_case(lambda s: s.update(snapshots=["/etc/passwd"]), command=_command),
        "checksum_a_number": state_case(lambda s: s["checksums"].update({"adapters@2.safetensors": 5}),
                                        command=_command),
        "grad_norm_nan": state_case(lambda s: s["run"].update(grad_norm=float("nan")), command=_command)})


# ---- 3. checked reads: every file a command reads is in a manifest, or checked as parsed -------------------
def flip(path):
    """One bit of the last byte (tensor data, not the header: only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))


def flipped_store_file(name, command):
    def case(c):
        path = c.store / name if name == "tokenizer.model" else module_file(c, name)
        flip(path)
        argv = {"eval": eval_argv(c), "verify": ["verify", c.store], "finetune": finetune_argv(c),
                "export": ["export", c.store, c.tmp / "out"], "generate": ["generate", c.store, "--prompt", "A"],
                "lora": lora_argv(c)}[command]
        return argv, [path.name, "checksum"]
    return case


for _command in ("eval", "verify", "finetune", "export", "generate", "lora"):
    many(HOSTILE, f"{_command}_with_a_flipped_bit_in", {"tokenizer": flipped_store_file("tokenizer.model", _command),
                                                        "extras": flipped_store_file("extras", _command)})


def flipped_adapter_file(which, command):
    def case(c):
        state = json.loads((c.ad / "state.json").read_text())
        name = {"adapters": state["files"]["adapters"], "optim": state["files"]["optim"],
                "snapshot": state["snapshots"][0], "result": "adapters.safetensors"}[which]
        flip(c.ad / name)
        argv = {"eval": eval_argv(c, "--adapter-path", c.ad), "verify": ["verify", c.ad], "finetune": lora_argv(c),
                "fuse": ["fuse", c.store, c.tmp / "f", "--adapter-path", c.ad],
                "generate": ["generate", c.store, "--prompt", "A", "--adapter-path", c.ad]}[command]
        return argv, [name]
    return case


many(HOSTILE, "flipped_bit_in_adapters_read_by", {cmd: flipped_adapter_file("adapters", cmd)
                                                  for cmd in ("eval", "verify", "finetune", "fuse", "generate")})
many(HOSTILE, "flipped_bit_in_lora_optimizer_state_read_by", {cmd: flipped_adapter_file("optim", cmd)
                                                               for cmd in ("verify", "finetune")})
many(HOSTILE, "flipped_bit_in_a_snapshot_read_by", {"verify": flipped_adapter_file("snapshot", "verify")})
many(HOSTILE, "flipped_bit_in_adapters_safetensors_read_by", {"verify": flipped_adapter_file("result", "verify")})


@hostile
def eval_tokenizer_replaced_by_another_of_the_same_size(c):
    p = c.store / "tokenizer.model"
    p.write_bytes(bytes(len(p.read_bytes())))
    return eval_argv(c), ["tokenizer.model", "checksum"]


@hostile
def eval_tokenizer_truncated(c):
    p = c.store / "tokenizer.model"
    p.write_bytes(p.read_bytes()[:100])
    return eval_argv(c), ["tokenizer.model", "size 100"]


@hostile
def eval_tokenizer_a_link_to_a_copy(c):
    p = c.store / "tokenizer.model"
    shutil.copyfile(p, c.outside / "tok.model")
    p.unlink()
    p.symlink_to(c.outside / "tok.model")
    return eval_argv(c), ["tokenizer.model", "symbolic link"]


# ---- 2 and 5. links and special files where files belong ---------------------------------------------------
def adapter_link(name):
    def case(c):
        path = c.ad / name
        if path.is_file():
            path.unlink()
        path.symlink_to(c.outside if name == "scratch" else c.victim)
        return lora_argv(c), [name, "symbolic link"]
    return case


many(HOSTILE, "lora_with_a_link_in_the_adapter_folder", {
    n: adapter_link(n) for n in ("metrics.jsonl", "settings.json", "loss.png", "state.json", "adapter_config.json",
                                 "slowllama_adapter.json", "adapter_model.safetensors", "adapters.safetensors",
                                 "scratch", "lock")})


def mkdir(path):
    path.mkdir(exist_ok=True)
    return path


def fifo_case(where, argv_of, fragment="not a regular file"):
    def case(c):
        path = where(c)
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        return argv_of(c), [path.name, fragment]
    return case


# (where the folder's format is told by its files, a FIFO is not one of them: the message says it is missing)
many(HOSTILE, "a_fifo_where_a_file_belongs", {
    "params_json": fifo_case(lambda c: c.src / "params.json", lambda c: ["prepare", c.src, c.tmp / "new"],
                             "no params.json"),
    "hf_config_json": fifo_case(lambda c: c.hf / "config.json", lambda c: ["prepare", c.hf, c.tmp / "new"], ""),
    "hf_shard": fifo_case(lambda c: next(c.hf.glob("*.safetensors")), lambda c: ["prepare", c.hf, c.tmp / "new"], ""),
    "meta_shard": fifo_case(lambda c: c.src / "consolidated.00.pth", lambda c: ["prepare", c.src, c.tmp / "new"]),
    "meta_tokenizer": fifo_case(lambda c: c.src / "tokenizer.model", lambda c: ["prepare", c.src, c.tmp / "new"]),
    "hf_tokenizer_config": fifo_case(lambda c: c.hf / "tokenizer_config.json",
                                     lambda c: ["prepare", c.hf, c.tmp / "new"]),
    "lora_adapters_of_the_last_step": fifo_case(lambda c: c.ad / "adapters@2.safetensors", lambda c: lora_argv(c)),
    "store_tokenizer": fifo_case(lambda c: c.store / "tokenizer.model", eval_argv),
    "module_file": fifo_case(lambda c: module_file(c), lambda c: ["verify", c.store]),
    "adapter_config": fifo_case(lambda c: c.ad / "slowllama_adapter.json",
                                lambda c: eval_argv(c, "--adapter-path", c.ad)),
    "adapter_state": fifo_case(lambda c: c.ad / "state.json", lambda c: eval_argv(c, "--adapter-path", c.ad)),
    "store_run_metrics": fifo_case(lambda c: mkdir(c.store / "run") / "metrics.jsonl", finetune_argv),
    "store_run_settings": fifo_case(lambda c: mkdir(c.store / "run") / "settings.json", finetune_argv),
    "adapter_folder_metrics": fifo_case(lambda c: c.ad / "metrics.jsonl", lora_argv),
    "adapter_folder_loss_png": fifo_case(lambda c: c.ad / "loss.png", lora_argv),
    "config_file": fifo_case(lambda c: c.tmp / "cfg.toml", lambda c: [*eval_argv(c), "-c", c.tmp / "cfg.toml"]),
    "metrics_for_plot": fifo_case(lambda c: c.ad / "metrics.jsonl", lambda c: ["plot", c.ad], "no metrics.jsonl"),
})


@bad
def data_from_dev_zero(c):
    return finetune_argv(c, "--data", "/dev/zero"), ["/dev/zero", "device"]


@bad
def eval_data_from_dev_zero(c):
    return ["eval", c.store, "--data", "/dev/zero", "--seq-len", 16], ["/dev/zero", "device"]


@bad
def val_data_from_dev_null(c):
    return finetune_argv(c, "--val-data", "/dev/null"), ["/dev/null", "device"]


@hostile
def metrics_jsonl_with_a_nan_step(c):
    (c.ad / "metrics.jsonl").write_text('{"step": NaN, "loss": 1.0}\n')
    return ["plot", c.ad, "--out", c.tmp / "p.png"], ["metrics.jsonl:1"]


@hostile
def metrics_jsonl_with_a_string_loss(c):
    (c.ad / "metrics.jsonl").write_text('{"step": 1, "loss": "low"}\n')
    return ["plot", c.ad, "--out", c.tmp / "p.png"], ["metrics.jsonl:1"]


# ---- 7. chat templates: sandboxed, bounded ------------------------------------------------------------------
def chat_template_case(template, fragment):
    def case(c):
        # a model whose tokenizer_config.json carries the template, prepared into a store of its own
        set_key(c.hf / "tokenizer_config.json", ["chat_template"], template)
        store = prepare_hf(c.hf, c.tmp / "chat-store", log=lambda m: None)
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
        (c.tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [*finetune_argv(c, "--data", c.tmp / "chat.jsonl")[:1], store,
                *finetune_argv(c, "--data", c.tmp / "chat.jsonl")[2:]], ["chat template", fragment]
    return case


many(HOSTILE, "chat_template", {
    "nested_loops": chat_template_case("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in "
                                       "range(100000) %}{% endfor %}{% endfor %}{% endfor %}", "took more than"),
    "huge_range": chat_template_case("{% for i in range(10**9) %}{% endfor %}", "exceeds the bounds"),
    "string_repeated": chat_template_case("{{ 'x' * 100000000 }}", "repeated"),
    "doubling": chat_template_case("{% set ns = namespace(s='xx') %}{% for i in range(40) %}"
                                   "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}", "items"),
    "huge_output": chat_template_case("{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' * 40 }}"
                                      "{% endfor %}", "characters"),
    "escape_attempt": chat_template_case("{{ ''.__class__.__mro__[1].__subclasses__() }}", "failed"),
    "recursion": chat_template_case("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "chat template"),
})


# ---- the tests ----------------------------------------------------------------------------------------------
def test_the_suite_has_enough_cases():
    assert len(BAD) >= 150 and len(HOSTILE) >= 60, (len(BAD), len(HOSTILE))


@pytest.fixture
def short_renders(monkeypatch):
    from slowllama.data import chat
    monkeypatch.setattr(chat, "RENDER_SECONDS", 1.0)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(name, c, capsys):
    argv, fragments = BAD[name](c)
    check_case(c, capsys, argv, fragments)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file(name, c, capsys, short_renders):
    argv, fragments = HOSTILE[name](c)
    check_case(c, capsys, argv, fragments)


def test_the_bounds_leave_ordinary_templates_alone():
    from slowllama.data.chat import jinja_template
    render = jinja_template("{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m['role'] }}: "
                            "{{ m['content'] }}{{ eos_token if loop.last }}\n{% endfor %}{{ range(3)|list }} "
                            "{{ range(4)|length }}{{ '-' * 3 }}", "<s>", "</s>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render(messages, False) == "1/2 user: hi\n2/2 assistant: yo</s>\n[0, 1, 2] 4---"


def test_what_the_safetensors_library_writes_is_read_unchanged(tmp_path):
    # as strict as the library, and no stricter: its own files (zero-size tensors, scalars, metadata,
    # any order of keys) read back tensor for tensor
    torch.manual_seed(0)
    tensors = {"z": torch.randn(3, 5), "a": torch.randn(7).to(torch.bfloat16), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(3.5, dtype=torch.float64), "ids": torch.arange(10, dtype=torch.int64),
               "mask": torch.tensor([True, False]), "half": torch.randn(2, 2).half(), "u8": torch.arange(5).byte()}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt", "note": "x"})
    got = st.read_file(str(tmp_path / "lib.safetensors"))
    assert got.keys() == tensors.keys()
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_a_damaged_header_is_refused_by_the_reader(damage, tmp_path):
    path = tmp_path / "m.safetensors"
    st.write_file(str(path), {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(8), "c": torch.randn(2, 3)})
    change, body_change, fragment = HEADER_DAMAGE[damage]
    rewrite_header(path, change, body_change)
    with pytest.raises(SlowllamaError, match=fragment):
        st.read_file(str(path))
    if damage != "duplicate_key":  # (the library takes one of the two entries: slowllama refuses the file)
        with pytest.raises(Exception):  # the safetensors library refuses it too
            with safe_open(str(path), framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]
