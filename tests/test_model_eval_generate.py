"""The model (GQA, RoPE, KV cache), eval's exact definition, and generation."""

import json
import math

import pytest
import torch

from slowllama.data.windows import load_text
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.engine.generation import generate
from slowllama.model.args import ModelArgs
from slowllama.model.layers import KVCache, Transformer, cross_entropy_sum, rope_tables
from slowllama.model.tokenizer import load_tokenizer
from slowllama.store.store import Store

from conftest import ALICE, run_cli
from reference import meta_model


def cpu_engine(store_path, **kw):
    return OffloadedModel(Store.open(store_path), EngineConfig(torch.device("cpu"), torch.float32, **kw))


def test_grouped_query_attention_equals_repeated_heads():
    # Meta's repeat_kv: each key/value head serves n_heads / n_kv_heads consecutive query heads
    torch.manual_seed(0)
    gqa_args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=50, multiple_of=16)
    mha_args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=50, multiple_of=16)
    gqa, mha = Transformer(gqa_args), Transformer(mha_args)
    for p in gqa.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sd = gqa.state_dict()
    for key in list(sd):
        if key.endswith(("wk.weight", "wv.weight")):  # (kv_heads * hd, dim) -> (n_heads * hd, dim)
            sd[key] = sd[key].view(2, 1, 8, 64).expand(2, 4, 8, 64).reshape(64, 64)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-6)


def test_rope_matches_complex_rotation():
    args = ModelArgs(dim=64, n_heads=4, rope_theta=10000.0)
    cos, sin = rope_tables(args, 3, 5)
    x = torch.randn(1, 5, 4, 16)
    from slowllama.model.layers import apply_rope
    hd = 16
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(5, hd // 2), torch.outer(torch.arange(3, 8).float(), freqs))
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(1, 5, 4, -1, 2)) * cis[None, :, None, :]).flatten(3)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=1e-5, atol=1e-6)


def test_eval_equals_in_memory_computation(tiny_fp32, store_fp32):
    seq_len, batch = 64, 3
    tok = load_tokenizer(store_fp32)
    data = load_text(ALICE, tok)
    # the definition: the text as the tokenizer's config encodes it (a sentencepiece model without
    # tokenizer_config.json: BOS, no EOS), consecutive windows of T+1 from token 0
    ids = [tok.bos_id] + tok.encode(ALICE.read_text())
    assert data.tokens.tolist() == ids
    n = len(ids) // (seq_len + 1)
    windows = torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)
    model = meta_model(tiny_fp32).eval()
    with torch.no_grad():
        loss = cross_entropy_sum(model(windows[:, :-1]), windows[:, 1:]).item() / (n * seq_len)
    proc = run_cli("eval", store_fp32, "--data", ALICE, "--seq-len", seq_len, "--batch-size", batch, "--json",
                   "--device", "cpu", check=0)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == n * seq_len
    assert result["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert result["eval_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    # and with a memory budget that holds almost nothing, the same number
    proc = run_cli("eval", store_fp32, "--data", ALICE, "--seq-len", seq_len, "--batch-size", batch, "--json",
                   "--device", "cpu", "--max-memory", "9M", check=0)  # just above the working set
    assert json.loads(proc.stdout.strip().splitlines()[-1])["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_kv_cache_decoding_equals_full_forward(tiny_fp32):
    model = meta_model(tiny_fp32).eval()
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (1, 10))
    with torch.no_grad():
        full = model(tokens)
        caches = [KVCache(1, 10, args.kv_heads, args.head_dim, torch.float32, "cpu") for _ in range(args.n_layers)]
        outs, pos = [], 0
        for chunk in (tokens[:, :4], tokens[:, 4:5], tokens[:, 5:9], tokens[:, 9:]):
            h = model.tok_embeddings(chunk)
            cos, sin = rope_tables(args, pos, chunk.shape[1])
            for layer, cache in zip(model.layers, caches):
                h = layer(h, cos, sin, pos, cache)
            outs.append(model.output(model.norm(h)))
            pos += chunk.shape[1]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_in_memory_argmax(tiny_fp32, store_fp32):
    model = meta_model(tiny_fp32).eval()
    tok = load_tokenizer(store_fp32)
    ids = tok.encode("Alice was", bos=True)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = tok.decode(ids[len(tok.encode("Alice was", bos=True)):])
    text = generate(cpu_engine(store_fp32), tok, "Alice was", max_new_tokens=12)
    assert text == expected


def test_sampling_is_deterministic_under_a_seed(store_fp32):
    tok = load_tokenizer(store_fp32)
    engine = cpu_engine(store_fp32)
    a = generate(engine, tok, "Alice", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = generate(engine, tok, "Alice", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    c = generate(engine, tok, "Alice", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_generate_cli_streams_text(store_fp32, tiny_fp32):
    proc = run_cli("generate", store_fp32, "--prompt", "Alice drank", "--max-new-tokens", 8, "--device", "cpu",
                   check=0)
    assert proc.stdout.startswith("Alice drank") and len(proc.stdout) > len("Alice drank\n")
    # test_gen.py takes a Meta folder as well as a store
    import subprocess
    import sys

    from conftest import REPO
    out = subprocess.run([sys.executable, str(REPO / "test_gen.py"), str(tiny_fp32), "cpu"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
