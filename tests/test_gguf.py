"""`export --format gguf`: read back with llama.cpp's `gguf` package and with transformers' GGUF loader.

The file's tensors are the store's (bit for bit in f32, its rounding in f16 / bf16, within q8_0's
error), its metadata and tokenizer what llama.cpp reads, and transformers' model from the file gives
the logits of slowllama's own model with the file's weights: Llama 2-style (sentencepiece), Llama 3-
style (tokenizer.json, GQA), Mistral, and a model with LoRA adapters fused in.
"""

import json

import numpy as np
import pytest
import torch
import xxhash

from slowllama.formats.convert import export, prepare
from slowllama.formats.meta import prepare_meta
from slowllama.model.layers import Transformer
from slowllama.model.tokenizer import load_tokenizer
from slowllama.store.store import Store
from slowllama.testing.reference import store_state_dict

from conftest import ALICE, assert_one_line_error, run_cli

gguf = pytest.importorskip("gguf")
quiet = dict(log=lambda m: None)

META_OF = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
           "output.weight": "output.weight", "attn_q": "attention.wq", "attn_k": "attention.wk",
           "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
           "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm",
           "ffn_norm": "ffn_norm"}


def read_gguf(path):
    """(metadata, {Meta key: fp32 tensor}, {GGUF name: GGML type name}) of a GGUF file, via gguf's reader."""
    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors, types = {}, {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        types[t.name] = t.tensor_type.name
        if t.name.startswith("blk."):
            _, i, leaf, _ = t.name.split(".")
            key = f"layers.{i}.{META_OF[leaf]}.weight"
        else:
            key = META_OF.get(t.name, t.name)
        tensors[key] = torch.from_numpy(np.array(values, dtype=np.float32))
    return meta, tensors, types


def our_logits(args, state, tokens):
    """slowllama's model (what eval runs) with the given weights."""
    model = Transformer(args).eval()
    state = {k: v for k, v in state.items() if k != "rope_freqs.weight"}
    if args.tie_word_embeddings:
        state.pop("output.weight", None)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(tokens)


def transformers_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens_of(vocab, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def meta_store(tiny_fp32, tmp_path_factory):
    return prepare_meta(tiny_fp32, tmp_path_factory.mktemp("gguf") / "tiny-store", **quiet)


def test_f32_file_holds_the_store_bit_for_bit_and_what_llama_cpp_reads(meta_store, tmp_path):
    path = export(meta_store, tmp_path / "tiny.gguf", format="gguf", dtype="f32", **quiet)
    meta, tensors, types = read_gguf(path)
    store = Store.open(meta_store)
    args, tok = store.args, load_tokenizer(meta_store)
    expected = store_state_dict(meta_store)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)  # wq / wk in Meta's rotary layout
    assert set(types.values()) == {"F32"}
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.rope.dimension_count"], meta["llama.context_length"]) == (
        args.n_layers, args.dim, args.hidden_dim, args.n_heads, 2, args.head_dim, args.max_seq_len)
    assert meta["llama.rope.freq_base"] == args.rope_theta
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(args.norm_eps)
    # the sentencepiece model as llama.cpp's "llama" vocabulary
    sp = tok.sp
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    assert meta["tokenizer.ggml.scores"] == pytest.approx([sp.GetScore(i) for i in range(sp.GetPieceSize())])
    assert meta["tokenizer.ggml.token_type"][:3] == [2, 3, 3] and meta["tokenizer.ggml.token_type"][3] == 6
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    # transformers' GGUF loader: our eval's logits, and our tokenizer's ids
    x = tokens_of(args.vocab_size)
    torch.testing.assert_close(transformers_logits(path, x), our_logits(args, expected, x), rtol=1e-5, atol=1e-5)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = ALICE.read_text()[:3000]
    assert auto(text).input_ids == tok.encode_text(text)


@pytest.mark.parametrize("dtype,ggml", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_f16_bf16_and_q8_0_round_the_store_and_give_its_logits(dtype, ggml, meta_store, tmp_path):
    path = export(meta_store, tmp_path / "out", format="gguf", dtype=dtype, **quiet)
    assert path == tmp_path / "out" / "model.gguf"
    meta, tensors, types = read_gguf(path)
    store_sd = store_state_dict(meta_store)
    for key, w in store_sd.items():
        if w.dim() == 1:
            assert torch.equal(tensors[key], w)  # norms stay f32
        elif dtype == "f16":
            assert torch.equal(tensors[key], w.half().float())
        elif dtype == "bf16":
            assert torch.equal(tensors[key], w.bfloat16().float())
        else:  # q8_0: per block of 32, an f16 scale d = max|block| / 127 and int8 values: error at most
            # half a step, plus 127 times the scale's f16 rounding (2^-11 d)
            blocks = w.reshape(-1, 32)
            step = blocks.abs().amax(1, keepdim=True) / 127
            assert ((tensors[key].reshape(-1, 32) - blocks).abs() <= step * (0.5 + 127 / 2048) + 1e-7).all(), key
            assert not torch.equal(tensors[key], w)
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {ggml}
    args = Store.open(meta_store).args
    x = tokens_of(args.vocab_size)
    got = transformers_logits(path, x)
    # the file's weights in our model: the same logits (fp32 arithmetic apart) ...
    torch.testing.assert_close(got, our_logits(args, tensors, x), rtol=1e-5, atol=1e-5)
    # ... and near the unrounded store's
    assert (got - our_logits(args, store_sd, x)).abs().max() < 0.05


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_hugging_face_stores_llama3_tokenizer_json_and_mistral(name, hf_model, tmp_path):
    folder, model = hf_model(name)
    store = prepare(folder, tmp_path / f"{name}-store", **quiet)
    # (a file named exactly "mistral" is one transformers 5.24 reads as its mistral architecture, which gguf lacks)
    path = export(store, tmp_path / f"{name}-tuned.gguf", format="gguf", **quiet)
    meta, tensors, _ = read_gguf(path)
    args, tok = Store.open(store).args, load_tokenizer(store)
    assert meta["llama.attention.head_count_kv"] == args.kv_heads < args.n_heads
    assert meta["llama.rope.freq_base"] == args.rope_theta
    x = tokens_of(args.vocab_size)
    torch.testing.assert_close(transformers_logits(path, x), our_logits(args, tensors, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and transformers' own model of the source folder
        torch.testing.assert_close(transformers_logits(path, x), model(x).logits, rtol=1e-4, atol=1e-4)
    if name == "llama3":  # byte-level BPE as llama.cpp's "gpt2" vocabulary, padded to the embedding's rows
        raw = json.loads((folder / "tokenizer.json").read_text())
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
        tokens = meta["tokenizer.ggml.tokens"]
        assert len(tokens) == args.vocab_size == 512 and tokens[400] == "[PAD400]"
        assert all(tokens[i] == p for p, i in raw["model"]["vocab"].items())
        assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                                 for m in raw["model"]["merges"]]
        assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id and meta["tokenizer.chat_template"]
        assert meta["tokenizer.ggml.token_type"][tok.bos_id] == 3  # control
        assert meta["tokenizer.ggml.add_bos_token"] is True


def test_llama3_rope_scaling_goes_in_as_rope_freqs(hf_model, tmp_path):
    from slowllama.model.layers import rope_tables

    folder, _ = hf_model("llama3.1")
    store = prepare(folder, tmp_path / "store", **quiet)
    path = export(store, tmp_path / "m.gguf", format="gguf", **quiet)
    _, tensors, types = read_gguf(path)
    args = Store.open(store).args
    plain = Store.open(store).args
    plain.rope_scaling = None
    # llama.cpp divides each frequency by its factor: the scaled angles are the plain ones over the factors

    def angles(a):  # the rotation angles at position 1, one per frequency
        cos, sin = rope_tables(a, 1, 1)
        return torch.atan2(sin.flatten().double(), cos.flatten().double())[: a.head_dim // 2]

    angle, expected = angles(plain), angles(args)
    factors = tensors["rope_freqs.weight"].double()
    assert types["rope_freqs.weight"] == "F32" and factors.shape == (args.head_dim // 2,)
    assert factors.min() == 1.0 and factors.max() == 8.0
    torch.testing.assert_close(angle / factors, expected, rtol=1e-4, atol=1e-6)


def test_fused_lora_as_gguf(meta_store, cli, tmp_path):
    adapters = tmp_path / "adapters"
    assert cli("finetune", meta_store, "--data", ALICE, "--lora-rank", 4, "--adapter-path", adapters, "--steps", 2,
               "--lr", 1e-2, "--seq-len", 32, "--batch-size", 2, "--device", "cpu").returncode == 0
    assert cli("fuse", meta_store, tmp_path / "fused.gguf", "--adapter-path", adapters, "--format", "gguf",
               "--dtype", "f32").returncode == 0
    assert cli("fuse", meta_store, tmp_path / "fused-hf", "--adapter-path", adapters, "--format", "hf",
               "--dtype", "fp32").returncode == 0
    from transformers import AutoModelForCausalLM

    _, tensors, _ = read_gguf(tmp_path / "fused.gguf")
    base = store_state_dict(meta_store)
    assert not torch.equal(tensors["layers.0.attention.wq.weight"], base["layers.0.attention.wq.weight"])
    x = tokens_of(512)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fused-hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(transformers_logits(tmp_path / "fused.gguf", x), hf(x).logits, rtol=1e-5,
                                   atol=1e-5)


# --- bad input: one line naming it, nothing written ---

def test_q8_0_of_rows_not_a_multiple_of_32(hf_model, tmp_path):
    folder, _ = hf_model("llama2")  # intermediate_size 176: ffn_down's rows are 176 long
    store = prepare(folder, tmp_path / "store", **quiet)
    proc = run_cli("export", store, tmp_path / "m.gguf", "--format", "gguf", "--dtype", "q8_0")
    assert_one_line_error(proc, "--dtype q8_0", "blk.0.ffn_down.weight", "176", "multiple of 32")
    assert not any(tmp_path.glob("*.gguf")) and not any(tmp_path.glob(".m.gguf*"))


def rehash(store, name):
    """The manifest's size and checksum of a tokenizer file this test replaced (as a new prepare would record)."""
    manifest = json.loads((store / "manifest.json").read_text())
    data = (store / name).read_bytes()
    manifest["copied_files"][name] = {"bytes": len(data), "xxh3": xxhash.xxh3_128(data).hexdigest()}
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_a_tokenizer_larger_than_the_embeddings(meta_store, tmp_path):
    import shutil

    import sentencepiece as spm

    store = tmp_path / "store"
    shutil.copytree(meta_store, store)
    spm.SentencePieceTrainer.Train(input=str(ALICE), model_prefix=str(tmp_path / "big"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1)
    shutil.copyfile(tmp_path / "big.model", store / "tokenizer.model")
    rehash(store, "tokenizer.model")  # only the vocabulary's size can tell
    proc = run_cli("export", store, tmp_path / "m.gguf", "--format", "gguf")
    assert_one_line_error(proc, "--format gguf", "600 tokens", "token_embd.weight", "512 rows")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_flags_that_do_not_apply_and_an_existing_file(meta_store, tmp_path):
    proc = run_cli("export", meta_store, tmp_path / "m.gguf", "--format", "gguf", "--shards", 2)
    assert_one_line_error(proc, "--shards", "does not apply to --format gguf")
    (tmp_path / "m.gguf").write_bytes(b"x")
    proc = run_cli("export", meta_store, tmp_path / "m.gguf", "--format", "gguf")
    assert_one_line_error(proc, "m.gguf", "already exists", "--force")
    assert (tmp_path / "m.gguf").read_bytes() == b"x"


def test_gguf_package_missing_is_one_line(meta_store, tmp_path):
    import os

    blocker = tmp_path / "blocker" / "gguf"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("export", meta_store, tmp_path / "m.gguf", "--format", "gguf", env=env)
    assert_one_line_error(proc, "--format gguf", "needs the 'gguf' package", "slowllama[gguf]")
    assert not (tmp_path / "m.gguf").exists()


def test_llama3_pre_tokenizer_is_named_llama_bpe(hf_model, tmp_path):
    import shutil

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from slowllama.formats.gguf import LLAMA3_SPLIT

    folder, _ = hf_model("llama3")
    store = tmp_path / "store"
    shutil.copytree(prepare(folder, tmp_path / "s", **quiet), store)
    # Llama 3's own pre-tokenizer: its split regex, then byte-level without GPT-2's regex
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train([str(ALICE)], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(store / "tokenizer.json"))
    rehash(store, "tokenizer.json")
    meta, _, _ = read_gguf(export(store, tmp_path / "m.gguf", format="gguf", **quiet))
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["general.name"] == "m"
