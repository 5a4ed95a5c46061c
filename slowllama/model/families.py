"""The model families slowllama knows, and what tells them apart: Llama 2, Code Llama, Llama 3, Mistral.

All of them are Llama-shaped (one table of weights: model/shapes.py). They differ in numbers, and in
how their checkpoints say which they are:
- Hugging Face's config.json names an architecture: LlamaForCausalLM (Llama 2, Code Llama, Llama 3)
  or MistralForCausalLM, and leaves out the fields that have transformers' default value. Mistral's
  sliding_window bounds its attention.
- Meta's params.json names no family: Code Llama is told by its rope_theta (its context is not in the
  file), Llama 3 by its vocabulary (its shards cut the embeddings by rows), Llama 3.1 by
  use_scaled_rope (the llama3 rope scaling, with fixed numbers).
- The presets (bench, the tiny model) and README's size table are the shapes of Llama 2's releases.

A new Llama-shaped family goes here: an HFArchitecture in ARCHITECTURES (its class name, model_type
and transformers' defaults), a rule below if Meta's format has to tell it apart, its presets.
"""

from __future__ import annotations

from dataclasses import dataclass

from slowllama.errors import SlowllamaError
from slowllama.model.args import ModelArgs
from slowllama.model.shapes import model_param_count

# ---- Hugging Face ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class HFArchitecture:
    """A Hugging Face architecture slowllama reads: how config.json names it, and what it leaves out."""

    name: str  # config.json's architectures[0]
    model_type: str  # config.json's model_type (what names the architecture when `architectures` is absent)
    defaults: dict  # transformers' defaults for the fields a config.json may leave out
    sliding_window: bool = False  # config.json's sliding_window bounds attention


LLAMA = HFArchitecture("LlamaForCausalLM", "llama", dict(
    max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    hidden_act="silu", attention_bias=False, mlp_bias=False))
MISTRAL = HFArchitecture("MistralForCausalLM", "mistral", dict(
    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    hidden_act="silu", num_key_value_heads=8, sliding_window=4096), sliding_window=True)
ARCHITECTURES = {arch.name: arch for arch in (LLAMA, MISTRAL)}


# ---- Meta's params.json ---------------------------------------------------------------------------

CODE_LLAMA_ROPE_THETA = 1e6  # Code Llama's rope_theta (Llama 2's: 10000)
CODE_LLAMA_MAX_SEQ_LEN = 16384  # Code Llama's context; Llama 2's is ModelArgs' default, 4096
LLAMA3_VOCAB_SIZE = 128000  # Llama 3's vocabulary has 128256 tokens (Llama 2's: 32000)
# the llama3 rope scaling Meta's use_scaled_rope stands for: Llama 3.1's numbers
LLAMA3_SCALED_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}


def is_code_llama(args: ModelArgs) -> bool:
    """Code Llama: Llama 2 with a larger rope_theta, and a context its params.json does not give."""
    return args.rope_theta >= CODE_LLAMA_ROPE_THETA


def embeddings_cut_by_vocabulary(args: ModelArgs) -> bool:
    """Whether Meta's shards cut the token embeddings by rows (VocabParallelEmbedding), as Llama 3's do;
    Llama 2's and Code Llama's are cut by columns (ParallelEmbedding)."""
    return args.vocab_size >= LLAMA3_VOCAB_SIZE


# ---- presets: the shapes of Llama 2's releases -----------------------------------------------------

# Shapes of the public Llama 2 / Code Llama releases, for size tables and benchmark presets.
PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                 ffn_dim_multiplier=1.3, max_seq_len=512),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                ffn_dim_multiplier=1.3),
}


def preset_args(name: str, **overrides) -> ModelArgs:
    """The ModelArgs of a preset, with fields overridden (n_layers=2, say)."""
    if name not in PRESETS:
        raise SlowllamaError(f"--preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return ModelArgs(**{**PRESETS[name], **overrides}).validate(f"preset {name}")


def size_table() -> str:
    """README's table of disk and memory per model size, computed from the shapes."""
    gib = 1 << 30
    rows = ["| model | parameters | store (bf16) | largest module (bf16) | disk, full FT with SGD | "
            "disk, full FT with AdamW | disk, LoRA |",
            "|---|---|---|---|---|---|---|"]
    for name in ("7b", "13b", "70b"):
        args = preset_args(name)
        counts = model_param_count(args)
        n = counts["total"]
        largest = max(counts["embeddings"], counts["block"], counts["head"])
        store = 2 * n
        # a step writes new files beside the old ones until its commit: up to twice the weights on disk;
        # AdamW adds two fp32 moments per weight (and their new copies during a step)
        rows.append(f"| Llama 2 {name.upper()} | {n / 1e9:.2f} B | {store / gib:.1f} GiB | "
                    f"{2 * largest / gib:.2f} GiB | {2 * store / gib:.0f} GiB | "
                    f"{2 * (store + 8 * n) / gib:.0f} GiB | {store / gib:.1f} GiB |")
    return "\n".join(rows)
