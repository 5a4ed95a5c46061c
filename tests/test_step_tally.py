"""A step's tally of gradient norms: a non-finite gradient stops the step, at once on the CPU and before the
first update, one module late on a GPU once updates have begun (the GPU then never drains for a check)."""

import pytest
import torch

from slowllama.engine.step import NonFiniteLoss, Tally


def grads(device, bad=False):
    g = torch.ones(4, 3, device=device)
    if bad:
        g[1, 2] = float("nan")
    return {"weight": torch.ones(3, device=device), "w1": g}


def test_on_the_cpu_a_non_finite_gradient_stops_at_once():
    tally = Tally(7)
    tally.record("head.", grads("cpu"))
    tally.touched = True
    with pytest.raises(NonFiniteLoss, match=r"step 7: non-finite gradient in layers\.3\.w1;") as e:
        tally.record("layers.3.", grads("cpu", bad=True))
    assert not e.value.untouched


def test_before_any_update_the_check_is_at_once_and_nothing_is_touched():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(NonFiniteLoss) as e:
        Tally(1).record("head.", grads(device, bad=True))
    assert e.value.untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("then", ["record", "grad_norm"])
def test_on_a_gpu_the_check_comes_one_module_late(then):
    tally = Tally(2)
    tally.record("head.", grads("cuda"))
    tally.touched = True
    tally.record("layers.3.", grads("cuda", bad=True))  # learnt at the next record, or at the step's norm
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient in layers\.3\.w1;") as e:
        tally.record("layers.2.", grads("cuda")) if then == "record" else tally.grad_norm()
    assert not e.value.untouched


def test_the_global_norm_is_the_norm_of_every_gradient():
    tally = Tally(1)
    a, b = grads("cpu"), {"x": torch.full((5,), 2.0)}
    tally.record("a.", a)
    tally.record("b.", b)
    everything = torch.cat([g.reshape(-1) for g in [*a.values(), *b.values()]])
    assert tally.grad_norm() == pytest.approx(torch.linalg.vector_norm(everything).item(), rel=1e-6)
