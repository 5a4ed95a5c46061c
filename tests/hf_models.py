"""Tiny random Hugging Face Llama / Mistral folders, built with transformers, and tokenizers trained on alice.txt.

Every architecture the issue names, shrunk (dim <= 128, 2 layers, a small vocabulary except where the
vocabulary is the point) but keeping what distinguishes it: grouped-query attention, rope_theta, the
"llama3" rope scaling, tied embeddings, Mistral's sliding window.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import ALICE

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}")

# name -> (architecture, config fields, tokenizer kind)
ARCHS = {
    "llama2": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                             num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5), "spm"),
    "llama2-70b-gqa": ("llama", dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_attention_heads=8,
                                     num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5), "spm"),
    "codellama": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=1e6), "spm"),
    "llama3": ("llama", dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_attention_heads=8,
                             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                             rope_theta=500000.0), "json"),
    # the "llama3" scaling with a short original context, so that all three frequency bands occur at head_dim 16
    "llama3.1": ("llama", dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_attention_heads=8,
                               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                               rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                    low_freq_factor=1.0, high_freq_factor=4.0,
                                                    original_max_position_embeddings=64)), "json"),
    # Llama 3.2 1B/3B: 128K vocabulary, tied embeddings, factor 32 (kept narrow so it stays fast)
    "llama3.2-tied-128k": ("llama", dict(vocab_size=128256, hidden_size=32, intermediate_size=96,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                                              original_max_position_embeddings=64)), "json"),
    "mistral": ("mistral", dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                                rope_theta=1e6, sliding_window=None), "spm"),
    # Mistral 7B v0.1: a sliding window shorter than the context
    "mistral-v0.1-window": ("mistral", dict(vocab_size=512, hidden_size=64, intermediate_size=224,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                                            sliding_window=24), "spm"),
}


def train_sentencepiece(out_dir: Path) -> Path:
    from slowllama.model.tokenizer import train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    path = train_tokenizer(ALICE, out_dir / "tokenizer", 512)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return path


def train_tokenizer_json(out_dir: Path, vocab_size: int = 400) -> Path:
    """A Llama 3 style byte-level BPE tokenizer.json whose post-processor adds <|begin_of_text|> by itself,
    with tokenizer_config.json naming BOS / EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(ALICE)], trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir / "tokenizer.json"


def hf_config(name: str, **overrides):
    from transformers import LlamaConfig, MistralConfig

    arch, fields, _ = ARCHS[name]
    cls = MistralConfig if arch == "mistral" else LlamaConfig
    return cls(num_hidden_layers=2, bos_token_id=1, eos_token_id=2, **{**fields, **overrides})


def build_hf_model(name: str, out: Path, tokenizers: dict[str, Path], seed: int = 0,
                   max_shard_size: str = "60KB"):
    """A random-weight transformers model saved to `out` (safetensors, several shards), with its tokenizer.

    Returns the model (fp32, eval mode): the reference for logits. Every weight is random, the norms
    around 1, so a swapped or mis-permuted tensor changes the logits.
    """
    from transformers import AutoModelForCausalLM

    _, _, tok_kind = ARCHS[name]
    config = hf_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in key else 0.0))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for p in tokenizers[tok_kind].iterdir():
        shutil.copyfile(p, out / p.name)
    return model


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits if hasattr(model, "config") else model(tokens)
