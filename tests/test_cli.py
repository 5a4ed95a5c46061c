"""The command line of a new user's first hour: --help without torch, --version, usage, required
arguments, finetune's help in groups, the defaults' table, models by folder or hub id, data folders,
generate --chat, the warning when the loss does not move, bench's probe size."""

import shutil
import subprocess
import sys

import torch

from slowllama.bench.synthetic import bench_args
from slowllama.cli import build_parser
from slowllama.commands.bench import probe_bytes
from slowllama.commands.finetune import StallWatch
from slowllama.commands.models import hub_cache, hub_snapshot, store_path
from slowllama.optim.registry import OPTIMIZERS
from slowllama.optim.registry import optimizer_names as registry_names
from slowllama.optim.registry import optimizers_help as registry_help
from slowllama.settings import DEFAULT_LR, GROUPS, optimizer_names, optimizers_help

from conftest import ALICE, assert_one_line_error


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from slowllama.cli import main; sys.argv = ['slowllama', 'finetune', '--help'];\n"
            "try: main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'\n"
            "assert main(['--version']) == 0 and 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: slowllama finetune" in proc.stdout and "slowllama 0." in proc.stdout


def test_the_static_optimizer_table_is_the_registry():
    assert optimizer_names() == registry_names() and optimizers_help() == registry_help()
    assert set(DEFAULT_LR) == set(OPTIMIZERS)


def test_bare_slowllama_prints_usage_and_the_commands(cli):
    proc = cli()
    assert proc.returncode == 2 and "usage: slowllama" in proc.stderr and "finetune" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_required_arguments_are_marked_and_refused(cli):
    proc = cli("finetune", "--help")
    usage = proc.stdout.split("\n\n")[0]
    assert " --data DATA" in usage and "[--data" not in usage and usage.rstrip().endswith("STORE")
    assert "[STORE]" not in usage
    assert_one_line_error(cli("finetune"), "STORE, --data: required")
    assert_one_line_error(cli("eval", "s"), "--data: required")
    assert_one_line_error(cli("fuse", "a", "b"), "--adapter-path: required")


def test_finetune_help_is_grouped():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    groups = {g.title: {a.dest for a in g._group_actions} for g in sub.choices["finetune"]._action_groups}
    assert list(groups)[2:] == list(GROUPS.values())
    assert {"data", "val_split", "pack"} <= groups["data"] and {"steps", "warmup_steps"} <= groups[GROUPS["schedule"]]
    assert {"lr", "optimizer", "grad_clip"} <= groups["optimizer"] and "lora_rank" in groups["LoRA"]
    assert {"max_memory", "device"} <= groups[GROUPS["memory"]] and {"json", "log_every"} <= groups[GROUPS["output"]]
    lr_help = next(a.help for a in sub.choices["finetune"]._actions if a.dest == "lr")
    assert "sgd 0.03, adamw 0.0003, lion 0.0001" in lr_help


def test_stall_warning_once_when_the_loss_does_not_move():
    watch = StallWatch(1e-4)
    said = [watch.add(6.25 + 0.001 * (i % 2)) for i in range(40)]
    assert [i for i, w in enumerate(said) if w] == [24]
    assert said[24].startswith("warning: the loss has not moved in 25 steps (6.2") and "--lr 0.0001" in said[24]
    moving = StallWatch(3e-2)
    assert not any(moving.add(6.25 - 0.02 * i) for i in range(40))


def test_bench_probe_is_sized_to_the_model():
    assert probe_bytes("auto", bench_args("tiny", None), torch.bfloat16) == 64 << 20
    assert probe_bytes("auto", bench_args("7b", None), torch.bfloat16) == 1 << 30
    assert probe_bytes("4M", bench_args("7b", None), torch.bfloat16) == 4 << 20


def test_models_by_folder_and_by_hub_id(cli, tiny_fp32, tmp_path, monkeypatch, hf_model):
    folder = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_fp32, folder)
    assert store_path(str(folder)) == (tmp_path / "models" / "tiny-store", folder)
    proc = cli("eval", folder, "--data", ALICE, "--device", "cpu")
    assert proc.returncode == 0 and f"{folder}: preparing it once into the store {folder}-store" in proc.stderr
    again = cli("eval", folder, "--data", ALICE, "--device", "cpu")
    assert f"using its store {folder}-store" in again.stderr and again.stdout == proc.stdout
    # the hub cache: HF_HUB_CACHE, else HF_HOME/hub
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == tmp_path / "hf" / "hub"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny-llama3"
    for rev in ("old", "new"):
        shutil.copytree(hf_model("llama3")[0], repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("old\n")
    assert hub_snapshot("org/tiny-llama3") == repo / "snapshots" / "old"  # what refs/main names
    monkeypatch.chdir(tmp_path)
    proc = cli("eval", "org/tiny-llama3", "--data", ALICE, "--device", "cpu", "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr
    assert f"org/tiny-llama3 (in the Hugging Face cache: {repo / 'snapshots' / 'old'}): preparing it once into the " \
           "store tiny-llama3-store" in proc.stderr
    gen = cli("generate", "org/tiny-llama3", "--prompt", "Alice", "--max-new-tokens", "2", "--device", "cpu")
    assert gen.returncode == 0 and f"the Hugging Face cache's {repo / 'snapshots' / 'old'}" in gen.stderr


def test_a_hub_id_not_in_the_cache(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(cli("finetune", "nobody/nothing", "--data", ALICE), "nobody/nothing",
                                 "not in the Hugging Face cache", str(tmp_path / "cache" / "models--nobody--nothing"),
                                 "huggingface-cli download nobody/nothing")
    assert "Traceback" not in line and not (tmp_path / "nothing-store").exists()
    (tmp_path / "cache" / "models--nobody--empty" / "snapshots").mkdir(parents=True)
    assert_one_line_error(cli("eval", "nobody/empty", "--data", ALICE), "holds no snapshot")


def test_data_folders(cli, store_fp32, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "valid.jsonl").write_text('{"text": "Alice was beginning to get very tired."}\n')
    common = ("--device", "cpu", "--steps", "1", "--seq-len", "8", "--batch-size", "1")
    assert_one_line_error(cli("finetune", store_fp32, "--data", data, *common), str(data),
                          "a data folder without train.jsonl")
    assert_one_line_error(cli("eval", store_fp32, "--data", data, "--device", "cpu"), "without test.jsonl")
    shutil.copyfile(data / "valid.jsonl", data / "train.jsonl")
    proc = cli("finetune", store_fp32, "--data", data, *common, "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"{data}: training on train.jsonl, validating on valid.jsonl" in proc.stderr
    assert "training data: 1 windows of 8 tokens; 1 steps of 1 windows = 1.0 epochs" in proc.stderr
    assert "eval_loss" in proc.stdout.splitlines()[-1]


def test_generate_chat(cli, hf_model, tiny_fp32, tmp_path):
    folder = hf_model("llama3")[0]
    chat = cli("generate", folder, "--chat", "--prompt", "Hi", "--max-new-tokens", "4", "--device", "cpu")
    assert chat.returncode == 0, chat.stderr
    rendered = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert chat.stdout.startswith(rendered) and "tokens/s" in chat.stderr
    # the same as the rendered prompt given as text (BOS is added by generate, not taken from the template)
    plain = cli("generate", folder, "--prompt", rendered, "--max-new-tokens", "4", "--device", "cpu")
    assert plain.stdout == chat.stdout
    assert_one_line_error(cli("generate", tiny_fp32, "--chat", "--prompt", "Hi", "--device", "cpu"),
                          "--chat: the model has no chat template")


def test_lora_says_how_many_weights_train(cli, store_fp32, tmp_path):
    proc = cli("finetune", store_fp32, "--data", ALICE, "--lora-rank", "2", "--lora-targets", "wq",
               "--adapter-path", tmp_path / "ad", "--steps", "1", "--seq-len", "16", "--batch-size", "1",
               "--device", "cpu")
    # rank 2 on wq (128 x 128) of 4 blocks: 2 x (128 + 128) x 4
    assert proc.returncode == 0 and "LoRA: 2,048 trainable weights (rank 2 on wq;" in proc.stderr
