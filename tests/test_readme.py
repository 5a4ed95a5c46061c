"""The README stays true: its size table is computed, its commands and flags exist, and every command of
its shell blocks runs, in the order a reader meets them, on tiny models.

The runner maps the README's paths to a temp folder (~/llama-2-7b is the tiny Meta model,
~/Llama-3.2-3B-Instruct and ~/Mistral-7B-v0.1 tiny Hugging Face models, my_notes.txt and held_out.txt
alice.txt, chats.jsonl the samsum chats, meta-llama/Llama-3.2-1B a tiny model in a Hugging Face cache
folder) and caps what would take long on the tiny model: --steps above 30 to 3, --seq-len to 128,
--batch-size to 4, --accumulate to 2, --max-new-tokens to 16, bench's 7b preset to tiny. A command
must exit 0 (or be refused with the message its `# refused:` comment quotes), print what its `# says:`
comment quotes, and a finetune must not find its run already finished.
"""

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slowllama.cli import build_parser, main
from slowllama.formats.tiny import write_tiny
from slowllama.model.families import size_table

from conftest import REPO, run_cli

README = (REPO / "README.md").read_text()
# code in the README: fenced blocks and `inline spans`
CODE = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S) + re.findall(r"`([^`\n]+)`", README))
CODE = re.sub(r"\\\n\s*", " ", CODE)  # a command continued over lines (trailing backslash) is checked whole

# the README's lines that the runner does not run, and why (any other line runs)
NOT_RUN = {
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": "installs: .ci/run does (test below)",
    "pip install -e '.[test]'": "installs: .ci/run does",
    "pip install -e '.[hf,chat]'": "installs: the test extra has hf and chat",
    "pip install -e '.[gguf]'": "installs: the test extra has gguf",
    'llama-cli -m ~/llama-2-7b-tuned.gguf -p "The main idea of"': "llama.cpp's program (not installed here); "
                                                                    "test_gguf.py reads the file back",
    "python -m pytest -q -n auto": "the suite itself",
    "rsync -a ~/shares/host-1/ host1:shares/host-1/": "another machine (test_split_store.py runs 2 hosts on one)",
    "torchrun --nnodes 2 --node-rank 0 --master-addr host0 --master-port 29500 --nproc-per-node 8 -m slowllama "
    "finetune ~/shares/host-0 --data my_notes.txt --steps 500 --optimizer adamw": "2 machines of 8 GPUs "
                                                                                   "(test_split_store.py: 2 on one)",
}
CAPS = {"--steps": 3, "--seq-len": 128, "--batch-size": 4, "--accumulate": 2, "--max-new-tokens": 16}


def test_size_table_is_the_computed_one():
    block = README.split("<!-- size-table -->")[1].split("<!-- /size-table -->")[0].strip()
    assert block == size_table()


def test_commands_and_flags_in_the_readme_exist():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    used = set(re.findall(r"^\s*slowllama ([a-z][a-z-]*)", CODE, flags=re.M))
    assert used and used <= set(sub.choices), used - set(sub.choices)
    for command in used:
        flags = {opt for action in sub.choices[command]._actions for opt in action.option_strings}
        for line in CODE.splitlines():
            for call in re.findall(rf"^\s*slowllama {command} .*", line):
                for flag in re.findall(r"--[a-z][a-z-]*", call):
                    assert flag in flags, f"{command} {flag}"


def test_ci_installs_as_the_readme_says():
    """.ci/run: torch's CPU build when torch is missing (this machine's local torch==2.13.0 stands in for
    the README's index URL, which it cannot reach), then the README's install line, then its test command."""
    setup = re.search(r"## Set up\n.*?```sh\n(.*?)```", README, flags=re.S).group(1)
    lines = [line.split("#")[0].strip() for line in setup.splitlines()]
    assert lines[0] == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    # the README's lines as .ci/run writes them (`python -m pip`, quiet)
    as_ci = lambda line: "python -m " + line.replace("pip install ", "pip install -q ", 1)  # noqa: E731
    install, test = ci.index(as_ci(lines[1])), ci.index(lines[3])
    torch_line = next(i for i, line in enumerate(ci) if line == as_ci("pip install torch==2.13.0"))
    assert torch_line < install < test and "if ! python -c \"import torch\"" in ci[torch_line - 1]


def blocks():
    """The README's fenced blocks in order: (language, text)."""
    return re.findall(r"```([a-z]*)\n(.*?)```", README, flags=re.S)


def readme_steps():
    """Every step of the README's sh and toml blocks, in order: ("write", name, text) for a toml block
    that names its file, ("run", line, refused, says) for a command."""
    steps = []
    for lang, text in blocks():
        if lang == "toml" and text.startswith("# "):
            name, _, body = text.partition("\n")
            steps.append(("write", name[2:].strip(), body))
        if lang != "sh":
            continue
        for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines():
            line = line.strip()
            says = re.match(r"# says: (.*)", line)
            if says:
                steps[-1] = steps[-1][:3] + (says.group(1),)
                continue
            if not line or line.startswith("#"):
                continue
            command, _, comment = line.partition("   #") if "   #" in line else line.partition("  #")
            refused = re.match(r"\s*refused: (.*)", comment)
            steps.append(("run", command.strip(), refused.group(1) if refused else None, None))
    return steps


def capped(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a in CAPS and out[i + 1].isdigit():
            n, cap = int(out[i + 1]), CAPS[a]
            out[i + 1] = str(n if a == "--steps" and n <= 30 else min(n, cap))
        if a == "--preset" and out[i + 1] != "tiny":
            out[i + 1] = "tiny"
    return out


@pytest.fixture
def reader(tmp_path, hf_model, monkeypatch, request):
    """A reader's machine: their models where the README says, the data files it names, a Hugging Face
    cache, and a working folder with test_data/ and finetune.py as in a checkout."""
    home = tmp_path / "home"
    (home / "stores").mkdir(parents=True)
    (home / "adapters").mkdir()
    write_tiny(home / "llama-2-7b")
    for name, readme_name in (("llama3", "Llama-3.2-3B-Instruct"), ("mistral", "Mistral-7B-v0.1")):
        shutil.copytree(hf_model(name)[0], home / readme_name)
    cache = tmp_path / "hf-cache"
    snap = cache / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "0123abcd"
    shutil.copytree(hf_model("llama3")[0], snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    work = tmp_path / "work"
    work.mkdir()
    (work / "test_data").symlink_to(REPO / "test_data")
    (work / "finetune.py").symlink_to(REPO / "finetune.py")
    for name in ("my_notes.txt", "held_out.txt"):
        shutil.copyfile(REPO / "test_data" / "alice.txt", work / name)
    # a chat file of some size: --val-split 0.05 holds out more than one window of it
    (work / "chats.jsonl").write_text((REPO / "test_data" / "samsum_mini_chat.jsonl").read_text() * 20)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # one thread: on a busy box a second one mostly waits for the first (and the subprocesses likewise)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def local(text: str) -> str:
        text = text.replace("~/.cache/huggingface/hub", str(cache))
        text = text.replace("~/", f"{home}/").replace("/home/me/", f"{home}/")
        return text.replace("/tmp/x/", f"{tmp_path}/x/").replace("/tmp/bench-7b", f"{tmp_path}/bench-7b")
    return local


def run_finetune_py(capsys) -> str:
    """`python finetune.py`, its run capped like the README's commands (300 steps -> 3)."""
    spec = importlib.util.spec_from_file_location("finetune_script", REPO / "finetune.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.TINY_RUN = capped(script.TINY_RUN)
    script.tiny_demo()
    out = capsys.readouterr()
    return out.out + out.err


def test_every_readme_command_runs_in_order(reader, capsys, tmp_path):
    skipped, ran = set(), []
    for step in readme_steps():
        if step[0] == "write":
            text = reader(step[2])
            for key, cap in (("steps", 3), ("batch-size", 4), ("accumulate", 2), ("seq-len", 128)):
                text = re.sub(rf"^{key} = (\d+)$", lambda m: f"{key} = {min(int(m.group(1)), cap)}", text, flags=re.M)
            Path(step[1]).write_text(text)
            continue
        _, line, refused, says = step
        if line in NOT_RUN:
            skipped.add(line)
            continue
        argv = capped(shlex.split(reader(line)))
        if argv[:2] == ["python", "finetune.py"] and len(argv) == 2:
            output, code = run_finetune_py(capsys), 0
        elif argv[0] == "slowllama":
            code = main(argv[1:])
            out = capsys.readouterr()
            output = out.out + out.err
        elif argv[0] == "torchrun":
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:]], capture_output=True,
                                  text=True, timeout=300)
            code, output = proc.returncode, proc.stdout + proc.stderr
        else:  # mkdir, cp, head: the shell's
            proc = subprocess.run(reader(line), shell=True, capture_output=True, text=True)
            code, output = proc.returncode, proc.stdout + proc.stderr
        where = f"README command {line!r}:\n{output[-3000:]}"
        if refused:
            assert code != 0 and refused in output, where
        else:
            assert code == 0, where
        assert "nothing to do" not in output, where
        if says:
            pattern = re.escape(reader(says)).replace(re.escape("<rev>"), r"[0-9a-z]+")
            assert re.search(pattern, output), f"{where}\nexpected: {says}"
        ran.append((line, output))
    assert skipped == set(NOT_RUN)
    outputs = dict(ran)
    # statements about these runs
    first = outputs["slowllama finetune tiny2 --data test_data/alice.txt --steps 30"]
    assert "tiny2: preparing it once into the store" in first
    quoted = "training data: 40 windows of 128 tokens; 30 steps of 4\nwindows = 3.0 epochs"
    assert quoted in README and quoted.replace("\n", " ") in first
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([\d.]+), lr 0.03, .* peak RSS [\d.]+ [KMG]iB$", first,
                                           flags=re.M)]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.2, losses  # the defaults visibly learn
    lora = outputs["slowllama finetune ~/stores/llama-2-7b --data my_notes.txt --lora-rank 8 --lora-targets wq,wv "
                   "--adapter-path ~/adapters/notes --steps 1000 --lr 1e-4 --save-every 100"]
    # rank 8 on wq (128 x 128) and wv (64 x 128) of 4 blocks: 8 x (128 + 128 + 128 + 64) x 4
    assert "LoRA: 14,336 trainable weights (rank 8 on wq,wv; 1.41% of the model's 1,016,960)" in lora
    assert "LoRA: 14,336 trainable weights (rank 8 on wq,wv; 1.41% of the model's 1,016,960)" in README
    refused = outputs["slowllama finetune tiny-store --data test_data/alice.txt --max-memory 4M --new-run"]
    assert "streaming each weight of a block: whole blocks would need 19.8 MiB" in refused
    assert "(whole blocks would need 19.8 MiB)" in README
    folder = outputs["slowllama finetune tiny2 --data samsum --steps 20 --new-run"]
    assert "samsum: training on train.jsonl, validating on valid.jsonl" in folder
    assert "evaluating on test.jsonl" in outputs["slowllama eval tiny2 --data samsum"]
    chat = outputs['slowllama generate ~/Llama-3.2-3B-Instruct --chat --prompt "Summarize: Tom will meet Anna at 5." '
                   '--max-new-tokens 40']
    assert "<|start_header_id|>user<|end_header_id|>\n\nSummarize: Tom will meet Anna at 5.<|eot_id|>" in chat
    assert re.search(r"\d+ tokens in [\d.]+ s: [\d.]+ tokens/s", chat)


def test_the_readme_runner_sees_every_command():
    """Every line of the README's sh blocks that starts a command is a step of the runner."""
    lines = [line for lang, text in blocks() if lang == "sh"
             for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines()
             if line.strip() and not line.strip().startswith("#")]
    steps = [s for s in readme_steps() if s[0] == "run"]
    assert len(steps) == len(lines) and all(line.strip().startswith(s[1]) for s, line in zip(steps, lines))
    assert run_cli("--version", check=0).stdout.startswith("slowllama ")
