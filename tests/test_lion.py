"""Lion (optim/lion.py): an optimizer added as one file, held to a plain in-memory reference written here."""

import pytest
import torch

from slowllama.commands.finetune import finetune
from slowllama.data.windows import load_text
from slowllama.engine.residency import largest_part_elements, staging_bytes, working_bytes
from slowllama.model.families import preset_args
from slowllama.model.tokenizer import load_tokenizer
from slowllama.optim.adamw import AdamW
from slowllama.optim.lion import Lion
from slowllama.settings import FinetuneSettings
from slowllama.store.store import Store

from conftest import ALICE, assert_one_line_error, run_cli
from reference import meta_model, store_state_dict, train_in_memory

LR, BETAS, DECAY = 3e-4, (0.9, 0.99), 0.1


class PlainLion(torch.optim.Optimizer):
    """Lion as its paper's pseudocode writes it (Chen et al. 2023, Program 1), on whole tensors in memory."""

    def __init__(self, params, lr, betas, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = (b1 * m + (1 - b1) * p.grad).sign()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def test_an_update_equals_the_plain_reference():
    torch.manual_seed(0)
    w, g = torch.randn(300, 40), torch.randn(300, 40) * 1e-2
    ref = w.clone().requires_grad_(True)
    plain = PlainLion([ref], LR, BETAS, DECAY)
    lion = Lion(betas=BETAS, weight_decay=DECAY)
    state = lion.init_state({"w": w})
    assert set(state) == {"w.exp_avg"}  # one moment, no step count
    for _ in range(3):
        ref.grad = g.clone()
        plain.step()
        lion.update({"w": w}, {"w": g}, state, LR)
        g = torch.randn_like(g) * 1e-2
    torch.testing.assert_close(w, ref.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(state["w.exp_avg"], plain.state[ref]["exp_avg"], rtol=1e-5, atol=1e-10)


def assert_lion_close(actual: torch.Tensor, expected: torch.Tensor, steps: int) -> None:
    """Equal to fp32 rounding, except where the sign of the interpolated momentum was within rounding of zero:
    there one update in 10^4 may go the other way (a difference of 2 lr per flipped step)."""
    off = ~torch.isclose(actual, expected.float(), rtol=1e-5, atol=1e-7)
    assert off.float().mean() <= 1e-4, off.float().mean()
    assert ((actual - expected.float()).abs()[off] <= 2 * LR * steps + 1e-6).all()


def test_three_lion_steps_equal_in_memory_training(tiny_fp32, store_fp32):
    finetune(FinetuneSettings(store=str(store_fp32), data=str(ALICE), device="cpu", eval_every=0, log_every=0,
                              steps=3, batch_size=2, accumulate=2, seq_len=32, lr=LR, optimizer="lion",
                              adam_betas="0.9,0.99", weight_decay=DECAY), log=lambda m: None, emit=lambda m: None)
    model = meta_model(tiny_fp32)
    opt = PlainLion(model.parameters(), LR, BETAS, DECAY)
    data = load_text(ALICE, load_tokenizer(store_fp32))
    train_in_memory(model, data, 3, 2, 2, 32, LR, order="random", optimizer=opt)
    actual, expected = store_state_dict(store_fp32), model.state_dict()
    assert set(actual) == set(expected)
    for key in expected:
        assert_lion_close(actual[key], expected[key], 3)
    # its moment lives in the store beside each module, as AdamW's do: one tensor per weight, no step count
    state = Store.open(store_fp32).read_state("layers.1", "optim")
    assert set(state) == {f"{k}.exp_avg" for k in Store.open(store_fp32).expected_shapes["layers.1"]}
    m = opt.state[model.layers[1].attention.wq.weight]["exp_avg"]
    torch.testing.assert_close(state["attention.wq.weight.exp_avg"], m, rtol=1e-4, atol=1e-9)


def test_its_state_declaration_sizes_the_budgets_and_the_disk():
    args = preset_args("7b")
    lion, adamw = Lion(), AdamW()
    assert lion.state_bytes_per_weight == 4 and adamw.state_bytes_per_weight == 8
    assert working_bytes(args, torch.bfloat16, torch.bfloat16, train=True, optimizer=lion) < \
        working_bytes(args, torch.bfloat16, torch.bfloat16, train=True, optimizer=adamw)
    # with parts of 64 Mi weights AdamW's parts (512 MiB) outgrow a block's weights (386 MiB), Lion's (256 MiB) do not
    parts = 1 << 26
    assert staging_bytes(args, torch.bfloat16, lion, False, 2, 2, parts) == staging_bytes(args, torch.bfloat16, None,
                                                                                           False, 2, 2, parts)
    assert staging_bytes(args, torch.bfloat16, adamw, False, 2, 2, parts) == 6 * 8 * largest_part_elements(args, parts)


def test_another_optimizers_state_is_refused_by_name(store_fp32):
    args = ["--data", ALICE, "--device", "cpu", "--batch-size", 2, "--seq-len", 32, "--eval-every", 0,
            "--log-every", 0]
    run_cli("finetune", store_fp32, *args, "--steps", 1, "--optimizer", "lion", "--lr", LR, check=0)
    before = Store.open(store_fp32).step
    assert_one_line_error(run_cli("finetune", store_fp32, *args, "--steps", 1, "--optimizer", "adamw", "--new-run"),
                          "optimizer state", "not the state of --optimizer adamw")
    assert Store.open(store_fp32).step == before


@pytest.mark.parametrize("flag", [("--adam-betas", "0.9,1.5"), ("--weight-decay", "-1")])
def test_bad_hyperparameters_are_one_line_errors(store_fp32, flag):
    assert_one_line_error(run_cli("finetune", store_fp32, "--data", ALICE, "--optimizer", "lion", *flag), flag[0])
