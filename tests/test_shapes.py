"""The table of shapes (model/shapes.py) is what the nn.Modules build, and what everything else derives from."""

import math

import pytest
import torch

from slowllama.bench.roofline import matmul_params
from slowllama.model.families import PRESETS, preset_args
from slowllama.model.layers import Transformer, assign_weights, build_module, rope_tables
from slowllama.model.lora import LoRAConfig, init_params
from slowllama.model.shapes import (LINEARS, expected_shapes, linear_shape, model_param_count, module_names,
                                    module_shapes)

SHAPES = {
    **{name: preset_args(name) for name in PRESETS},  # tiny and 70b have grouped-query attention
    "tiny-tied": preset_args("tiny", tie_word_embeddings=True),
    "mistral-7b": preset_args("7b", n_kv_heads=8, hidden_dim_override=14336),  # HF's intermediate_size
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_module_built_on_meta_has_the_tables_state_dict(shape):
    args = SHAPES[shape]
    names = module_names(args)
    assert names == ["tok_embeddings"] + [f"layers.{i}" for i in range(args.n_layers)] + ["head"]
    for name in ("tok_embeddings", "layers.0", f"layers.{args.n_layers - 1}", "head"):
        built = [(k, tuple(t.shape)) for k, t in build_module(args, name).state_dict().items()]
        assert built == list(module_shapes(args, name).items()), name  # names, order and shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_the_whole_model_and_the_counts_follow_the_table(shape):
    args = SHAPES[shape]
    with torch.device("meta"):
        model = Transformer(args)
    assert [(k, tuple(t.shape)) for k, t in model.state_dict().items()] == list(expected_shapes(args).items())
    counts = model_param_count(args)
    assert counts["total"] == sum(t.numel() for t in model.parameters())
    assert counts["block"] == sum(t.numel() for t in model.layers[0].parameters())
    if args.tie_word_embeddings:
        assert model.output is None and "output.weight" not in expected_shapes(args)
    assert matmul_params(args)["blocks"] == args.n_layers * sum(
        t.numel() for t in model.layers[0].parameters() if t.dim() == 2)
    assert matmul_params(args)["head"] == args.vocab_size * args.dim  # the output projection, tied or not


def test_lora_adapts_the_tables_linear_layers():
    args = SHAPES["tiny"]
    block = build_module(args, "layers.0")
    assert LINEARS == {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                       "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
    params = init_params(args, LoRAConfig(rank=3, alpha=6.0, targets=tuple(LINEARS)), 0, "meta")
    for short, path in LINEARS.items():
        linear = block.get_submodule(path)
        assert tuple(linear.weight.shape) == linear_shape(args, short) == (linear.out_features, linear.in_features)
        assert params[f"layers.0.{path}.lora_a"].shape == (3, linear.in_features)
        assert params[f"layers.0.{path}.lora_b"].shape == (linear.out_features, 3)
    assert math.prod(linear_shape(args, "output")) == args.vocab_size * args.dim


def test_assign_weights_is_load_state_dict_with_assign():
    """The engine's fast assignment of a module's weights: the module load_state_dict(assign=True) gives, refusing
    what it would refuse (a missing or extra weight, a wrong shape); the linears skip their init on meta only."""
    args = SHAPES["tiny"]
    tensors = {k: torch.randn(v.shape) for k, v in build_module(args, "layers.0").state_dict().items()}
    fast = assign_weights(build_module(args, "layers.0"), tensors, requires_grad=False)
    slow = build_module(args, "layers.0")
    slow.load_state_dict(tensors, assign=True)
    for (k, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        assert a.data_ptr() == b.data_ptr() == tensors[k].data_ptr() and not a.requires_grad
    x, (cos, sin) = torch.randn(1, 4, args.dim), rope_tables(args, 0, 4)
    assert torch.equal(fast(x, cos, sin), slow(x, cos, sin))
    with pytest.raises(ValueError, match="expected"):
        assign_weights(build_module(args, "layers.0"), {k: v for k, v in tensors.items() if "wq" not in k}, False)
    wrong = dict(tensors, **{"attention.wq.weight": torch.randn(3, 3)})
    with pytest.raises(ValueError, match=r"attention.wq.weight: shape \(3, 3\)"):
        assign_weights(build_module(args, "layers.0"), wrong, False)
    assert not torch.equal(*(build_module(args, "layers.0", device="cpu").attention.wq.weight for _ in range(2)))
