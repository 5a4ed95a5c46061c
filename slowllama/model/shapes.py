"""The one table of a Llama-shaped model: every weight of each module by Meta's name, its shape a
function of ModelArgs.

Whatever needs a shape reads it here: the nn.Modules (model/layers.py), the store's expected files,
the converters, the parameter counts, the roofline's FLOPs (bench/roofline.py), LoRA's targets and
the engine's budgets. The model is offloaded as modules, in the order of the forward pass:
'tok_embeddings', 'layers.0' .. 'layers.{n_layers - 1}' and 'head' (final norm + output projection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from slowllama.model.args import ModelArgs


@dataclass(frozen=True)
class Weight:
    """One weight of a module: Meta's name inside the module, and its shape for given args.

    `linear` is the short name of a linear layer ('wq' .. 'w3' in a block, 'output' in the head): a
    weight that multiplies activations, shaped (out_features, in_features) as nn.Linear stores it.
    """

    key: str
    shape: Callable[[ModelArgs], tuple[int, ...]]
    linear: Optional[str] = None


def _norm(a: ModelArgs) -> tuple[int, ...]:
    return (a.dim,)


def _vocab_by_dim(a: ModelArgs) -> tuple[int, ...]:
    return (a.vocab_size, a.dim)  # a row per token: the embeddings, and the output projection


# each module's weights in the order of its state_dict (the order of its files and of its optimizer state's parts)
EMBEDDINGS = (Weight("weight", _vocab_by_dim),)
BLOCK = (
    Weight("attention.wq.weight", lambda a: (a.n_heads * a.head_dim, a.dim), "wq"),
    Weight("attention.wk.weight", lambda a: (a.kv_heads * a.head_dim, a.dim), "wk"),  # grouped-query: kv_heads
    Weight("attention.wv.weight", lambda a: (a.kv_heads * a.head_dim, a.dim), "wv"),
    Weight("attention.wo.weight", lambda a: (a.dim, a.n_heads * a.head_dim), "wo"),
    Weight("feed_forward.w1.weight", lambda a: (a.hidden_dim, a.dim), "w1"),  # gate
    Weight("feed_forward.w2.weight", lambda a: (a.dim, a.hidden_dim), "w2"),  # down
    Weight("feed_forward.w3.weight", lambda a: (a.hidden_dim, a.dim), "w3"),  # up
    Weight("attention_norm.weight", _norm),
    Weight("ffn_norm.weight", _norm),
)
HEAD = (Weight("norm.weight", _norm), Weight("output.weight", _vocab_by_dim, "output"))

# a block's linear layers, short name -> path in the block: the layers LoRA can adapt
LINEARS = {w.linear: w.key.removesuffix(".weight") for w in BLOCK if w.linear}
_LINEAR_WEIGHTS = {w.linear: w for w in BLOCK + HEAD if w.linear}


def module_names(args: ModelArgs) -> list[str]:
    """The offloaded modules in the order of the forward pass."""
    return ["tok_embeddings"] + [f"layers.{i}" for i in range(args.n_layers)] + ["head"]


def module_weights(args: ModelArgs, name: str) -> tuple[Weight, ...]:
    """The weights of one module by its store name: 'tok_embeddings', 'layers.N' or 'head'.

    With tied embeddings the head has no output.weight: its projection is the embedding matrix."""
    if name == "tok_embeddings":
        return EMBEDDINGS
    if name == "head":
        return HEAD[:1] if args.tie_word_embeddings else HEAD
    return BLOCK


def module_shapes(args: ModelArgs, name: str) -> dict[str, tuple[int, ...]]:
    """Weight names (Meta's, inside the module) and shapes of one module, in its state_dict's order."""
    return {w.key: w.shape(args) for w in module_weights(args, name)}


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight of the model under its full Meta key, with its shape."""
    return {join_key(name, key): shape for name in module_names(args)
            for key, shape in module_shapes(args, name).items()}


def linear_shape(args: ModelArgs, name: str) -> tuple[int, ...]:
    """(out_features, in_features) of a linear layer by short name: one of LINEARS, or 'output' (the head's
    projection to the vocabulary, which is the embedding matrix when they are tied)."""
    return _LINEAR_WEIGHTS[name].shape(args)


def model_param_count(args: ModelArgs) -> dict[str, int]:
    """Parameter counts of the offloaded modules (embeddings, one block, head) and of the whole model."""
    embeddings, block, head = (sum(math.prod(s) for s in module_shapes(args, name).values())
                               for name in ("tok_embeddings", "layers.0", "head"))
    return {"embeddings": embeddings, "block": block, "head": head,
            "total": embeddings + args.n_layers * block + head}


def split_key(key: str) -> tuple[str, str]:
    """A Meta checkpoint key -> (module name, key inside the module); ('', key) for extras like rope.freqs."""
    if key.startswith("tok_embeddings."):
        return "tok_embeddings", key[len("tok_embeddings."):]
    if key.startswith("layers."):
        _, index, rest = key.split(".", 2)
        return f"layers.{index}", rest
    if key.startswith(("norm.", "output.")):
        return "head", key
    return "", key


def join_key(module: str, key: str) -> str:
    """(module name, key inside the module) -> the Meta checkpoint key; the inverse of split_key."""
    if module == "tok_embeddings":
        return f"tok_embeddings.{key}"
    if module.startswith("layers."):
        return f"{module}.{key}"
    return key
