"""Fixtures: tiny random Llamas in Meta format, built once per session in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from slowllama.cli import main
from slowllama.data.windows import load_text, microbatches, step_windows
from slowllama.formats.meta import prepare_meta
from slowllama.formats.tiny import write_tiny
from slowllama.model.tokenizer import load_tokenizer
from slowllama.train.checkpoints import StoreCheckpoint
from slowllama.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
ALICE = REPO / "test_data" / "alice.txt"
FAULTS_RUNNER = "slowllama.testing.faults"  # `python -m` it in place of slowllama: $SLOWLLAMA_FAULTS armed


@pytest.fixture(autouse=True, scope="session")
def own_cache_folder(tmp_path_factory):
    """bench keeps the machine's measured limits in $XDG_CACHE_HOME for `slowllama plan`: the tests' own folder
    (subprocesses inherit it), never the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    """The default tiny model: 2 shards, bf16, GQA (4 heads, 2 kv heads), ffn_dim_multiplier 1.3."""
    return write_tiny(tmp_path_factory.mktemp("models") / "tiny-bf16")


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("models") / "tiny-fp32", dtype="fp32")


@pytest.fixture
def store_fp32(tiny_fp32, tmp_path) -> Path:
    return prepare_meta(tiny_fp32, tmp_path / "store", log=lambda m: None)


def committed_step(store, engine, number: int, lr: float) -> None:
    """Training step `number` of an engine on a store opened for writing (4 windows of alice's text,
    32 tokens each, in 2 microbatches), written back and committed."""
    x, y = step_windows(load_text(ALICE, load_tokenizer(store.path)), number - 1, 4, 32, "random", 0)
    Trainer(engine, StoreCheckpoint(store), log=lambda m: None).step(number, microbatches(x, y, 2), lr)


def run_cli(*args, check=None, env=None, timeout=300, module="slowllama", **kw):
    """Run `python -m slowllama ARGS` (or `-m FAULTS_RUNNER`) in a subprocess; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, **kw)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture
def cli(capsys):
    """cli(*args): `slowllama ARGS` in this process; returns (returncode, stdout, stderr) like a subprocess."""
    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def assert_one_line_error(proc, *fragments):
    """A user error: non-zero exit, one error line on stderr naming the problem, no traceback.

    Progress and information lines may come before it (a run that fails at step 2 has run step 1);
    the error itself is the one and last line that says "error".
    """
    assert proc.returncode != 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def hf_tokenizers(tmp_path_factory) -> dict:
    """Tokenizer folders trained on alice.txt: 'spm' (tokenizer.model) and 'json' (Llama 3 style tokenizer.json)."""
    from hf_models import train_sentencepiece, train_tokenizer_json

    root = tmp_path_factory.mktemp("tokenizers")
    train_sentencepiece(root / "spm")
    train_tokenizer_json(root / "json")
    return {"spm": root / "spm", "json": root / "json"}


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory, hf_tokenizers):
    """hf_model(name) -> (folder, transformers model): a tiny Hugging Face checkpoint, built once per session."""
    from hf_models import build_hf_model

    root, cache = tmp_path_factory.mktemp("hf"), {}

    def get(name: str):
        if name not in cache:
            cache[name] = (root / name, build_hf_model(name, root / name, hf_tokenizers))
        return cache[name]
    return get
