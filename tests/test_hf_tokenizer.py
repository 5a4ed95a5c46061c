"""Tokenizers: tokenizer.json (Llama 3) and tokenizer.model, BOS/EOS from the folder's JSON files, chat template."""

import json
import shutil

import pytest

from slowllama.errors import SlowllamaError
from slowllama.model.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

from conftest import assert_one_line_error, run_cli
from hf_models import CHAT_TEMPLATE

TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank."


@pytest.fixture
def json_folder(hf_tokenizers, tmp_path):
    out = tmp_path / "tok"
    shutil.copytree(hf_tokenizers["json"], out)
    return out


def edit_json(path, **changes):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def test_tokenizer_json_adds_bos_and_eos_only_when_asked(json_folder):
    from tokenizers import Tokenizer as Reference

    tok = load_tokenizer(json_folder)
    ref = Reference.from_file(str(json_folder / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (ref.token_to_id("<|begin_of_text|>"), ref.token_to_id("<|end_of_text|>"))
    assert tok.vocab_size == ref.get_vocab_size() == 400
    plain = ref.encode(TEXT, add_special_tokens=False).ids
    assert ref.encode(TEXT).ids == [tok.bos_id] + plain  # the file's post-processor adds BOS by itself ...
    assert tok.encode(TEXT) == plain  # ... slowllama adds it only when asked, and only once
    assert tok.encode(TEXT, bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.chat_template == CHAT_TEMPLATE and tok.bos_token == "<|begin_of_text|>"


def test_eos_from_tokenizer_config_and_stop_ids_from_generation_config(json_folder):
    # a Llama 3 Instruct folder: EOS is <|eot_id|>, generation stops at any of generation_config's ids
    edit_json(json_folder / "tokenizer_config.json", eos_token={"content": "<|eot_id|>", "special": True})
    edit_json(json_folder / "generation_config.json", bos_token_id=0, eos_token_id=[1, 4])
    tok = load_tokenizer(json_folder)
    assert tok.eos_id == 4 and tok.stop_ids == {1, 4}
    # no token names in tokenizer_config.json: the ids of generation_config.json
    edit_json(json_folder / "tokenizer_config.json", bos_token=None, eos_token=None)
    (json_folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [3, 4]}))
    tok = load_tokenizer(json_folder)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (2, 3, {3, 4})


def test_sentencepiece_ids_from_the_model_unless_the_folder_names_others(hf_tokenizers, tmp_path):
    folder = tmp_path / "spm"
    shutil.copytree(hf_tokenizers["spm"], folder)
    tok = load_tokenizer(folder)
    assert isinstance(tok, Tokenizer) and (tok.bos_id, tok.eos_id, tok.chat_template) == (1, 2, None)
    assert tok.encode(TEXT, bos=True, eos=True) == [1] + tok.sp.EncodeAsIds(TEXT) + [2]
    edit_json(folder / "special_tokens_map.json", eos_token="<unk>")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (1, 0, "{{ messages }}")


def test_a_token_name_missing_from_the_vocabulary(json_folder):
    edit_json(json_folder / "tokenizer_config.json", eos_token="<|nope|>")
    with pytest.raises(SlowllamaError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not in the vocabulary"):
        load_tokenizer(json_folder)


def test_no_tokenizer_at_all(tmp_path):
    with pytest.raises(SlowllamaError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizers_package_missing_is_one_line(hf_model, tmp_path):
    # a Llama 3 folder needs the optional `tokenizers` package: block its import in the subprocess
    folder, _ = hf_model("llama3")
    blocker = tmp_path / "blocker" / "tokenizers"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("prepare", folder, tmp_path / "store", env=env)
    assert_one_line_error(proc, "tokenizer.json", "needs the 'tokenizers' package", "slowllama[hf]")
    assert not (tmp_path / "store").exists()
