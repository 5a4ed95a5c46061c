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


# --- BOS / EOS as the tokenizer's config says; tokenizer.json written for sentencepiece models ---

def auto_tokenizer_ids(folder, texts):
    """input_ids of transformers' AutoTokenizer on each text, in a subprocess where protobuf cannot be imported."""
    import os
    import subprocess
    import sys

    script = ("import json, sys; sys.modules['google'] = None; sys.modules['google.protobuf'] = None\n"
              "from transformers import AutoTokenizer\n"
              f"tok = AutoTokenizer.from_pretrained({str(folder)!r})\n"
              "texts = json.loads(sys.stdin.read())\n"
              "print(json.dumps([tok(t).input_ids for t in texts]))\n")
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


TEXTS = [TEXT, "  two  spaces,\n\n a\ttab and 12345 ", "ünïcode 日本語 😀", ""]


def test_bos_and_eos_as_tokenizer_config_says(hf_tokenizers, json_folder, tmp_path):
    from slowllama.data.windows import load_text

    spm_folder = tmp_path / "spm"
    shutil.copytree(hf_tokenizers["spm"], spm_folder)
    tok = load_tokenizer(spm_folder)  # no tokenizer_config.json: the sentencepiece model has BOS; no EOS
    assert (tok.add_bos, tok.add_eos) == (True, False)
    assert tok.encode_text(TEXT) == [tok.bos_id] + tok.encode(TEXT)
    edit_json(spm_folder / "tokenizer_config.json", add_bos_token=False, add_eos_token=True)
    tok = load_tokenizer(spm_folder)
    assert tok.encode_text(TEXT) == tok.encode(TEXT) + [tok.eos_id]
    data = tmp_path / "a.txt"
    data.write_text(TEXT)
    assert load_text(data, tok).tokens.tolist() == tok.encode(TEXT) + [tok.eos_id]  # eval's and training's tokens

    # tokenizer.json: what its post-processor adds (Llama 3: BOS) ...
    tok = load_tokenizer(json_folder)
    assert (tok.add_bos, tok.add_eos) == (True, False)
    assert [tok.encode_text(t) for t in TEXTS] == auto_tokenizer_ids(json_folder, TEXTS)
    # ... a SmolLM2-like one adds nothing (BOS is <|begin_of_text|> but text does not get it)
    raw = json.loads((json_folder / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (json_folder / "tokenizer.json").write_text(json.dumps(raw))
    tok = load_tokenizer(json_folder)
    assert (tok.add_bos, tok.add_eos) == (False, False)
    assert [tok.encode_text(t) for t in TEXTS] == auto_tokenizer_ids(json_folder, TEXTS)
    # ... and tokenizer_config.json's flags, where it has them, decide (as transformers 4's Llama tokenizers do;
    # transformers 5 drops them when there is a tokenizer.json)
    edit_json(json_folder / "tokenizer_config.json", add_bos_token=True, add_eos_token=True)
    tok = load_tokenizer(json_folder)
    assert tok.encode_text(TEXT) == [tok.bos_id] + tok.encode(TEXT) + [tok.eos_id]


def test_a_model_without_bos_gets_none_in_training_data_and_generate(json_folder, tmp_path):
    from slowllama.data.sequences import load_examples

    raw = json.loads((json_folder / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (json_folder / "tokenizer.json").write_text(json.dumps(raw))
    tok = load_tokenizer(json_folder)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Alice was", "completion": " tired."}) + "\n")
    (example,) = load_examples(data, tok)
    assert tok.bos_id not in example.tokens.tolist()
    assert example.tokens.tolist() == tok.encode("Alice was tired.") + [tok.eos_id]
    assert tok.stream(tok.encode("Alice", bos=tok.add_bos)).prompt_ids == tok.encode("Alice")


def test_add_bos_token_must_be_a_boolean(json_folder):
    edit_json(json_folder / "tokenizer_config.json", add_bos_token="yes")
    with pytest.raises(SlowllamaError, match=r"tokenizer_config.json: field 'add_bos_token' must be true or false"):
        load_tokenizer(json_folder)


def test_hf_export_writes_a_tokenizer_json_that_auto_tokenizer_loads(tiny_fp32, hf_model, tmp_path):
    from slowllama.formats.convert import export, prepare
    from slowllama.formats.meta import prepare_meta

    # a Meta store (tokenizer.model only), and a Hugging Face folder with tokenizer.model and no tokenizer_config
    folder, _ = hf_model("mistral")
    for name, store in [("meta", prepare_meta(tiny_fp32, tmp_path / "meta-store", log=lambda m: None)),
                        ("mistral", prepare(folder, tmp_path / "mistral-store", log=lambda m: None))]:
        out = export(store, tmp_path / f"{name}-hf", format="hf", log=lambda m: None)
        assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
        tok = load_tokenizer(store)
        texts = TEXTS + [(tmp_path.parent / "x").as_posix(), open(__file__).read()[:3000]]
        assert auto_tokenizer_ids(out, texts) == [tok.encode_text(t) for t in texts], name


@pytest.mark.parametrize("normalization,remove_extra_whitespaces", [("identity", False), ("nmt_nfkc", True)])
def test_tokenizer_json_from_sentencepiece_encodes_and_decodes_alike(normalization, remove_extra_whitespaces,
                                                                     tmp_path):
    # settings of the tiny model's tokenizer differ from Llama 2's (identity, spaces kept): both kinds
    import sentencepiece as spm
    from tokenizers import Tokenizer as Reference

    from slowllama.formats.spm_json import spm_to_tokenizer_json

    from conftest import ALICE

    spm.SentencePieceTrainer.Train(
        input=str(ALICE), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, split_digits=True, normalization_rule_name=normalization,
        remove_extra_whitespaces=remove_extra_whitespaces, allow_whitespace_only_pieces=True)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    spm_to_tokenizer_json(tmp_path / "tokenizer.model", tmp_path / "tokenizer.json", True, False, 1, 2)
    ref = Reference.from_file(str(tmp_path / "tokenizer.json"))
    texts = TEXTS + ["ｆｕｌｌ ｗｉｄｔｈ", "   ", "x  \n  y"] + ALICE.read_text().splitlines()
    for text in texts:
        ids = sp.encode(text)
        assert ref.encode(text).ids == [1] + ids, repr(text)
        assert ref.decode(ids) == sp.decode(ids), repr(text)


def test_unigram_sentencepiece_is_refused_by_name(tmp_path):
    import sentencepiece as spm

    from slowllama.formats.spm_json import spm_to_tokenizer_json

    from conftest import ALICE

    spm.SentencePieceTrainer.Train(input=str(ALICE), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
                                   model_type="unigram", minloglevel=2, num_threads=1)
    with pytest.raises(SlowllamaError, match=r"tokenizer.model: not a BPE sentencepiece model; no tokenizer.json"):
        spm_to_tokenizer_json(tmp_path / "tokenizer.model", tmp_path / "tokenizer.json", True, False, 1, 2)
