"""The offloaded model: its modules live in the store and pass through the device one at a time.

Forward: embeddings -> block 0 .. block L-1, microbatch by microbatch inside each module, keeping
every module's input (Activations). The dropout masks of module m in microbatch k of step s come
from a seed that is a function of (run seed, s, k, m), set just before the module runs, so the
backward pass replays them exactly, a resumed run draws the same ones, and so do several ranks.

Backward: head (norm + output + loss, run here for the first time, with autograd) -> block L-1 ..
block 0 -> embeddings. Each module is loaded once, re-run on its saved inputs with its seeds, and
backpropagated for all K microbatches (its gradient accumulates over them), then updated by the
optimizer and written back; the gradient with respect to its input passes down.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from slowllama.config import ModelArgs
from slowllama.errors import SlowllamaError
from slowllama.faults import fault_point
from slowllama.memory import Activations, Budget, nbytes
from slowllama.model import IGNORE_INDEX, build_module, cross_entropy_sum, module_names, rope_tables
from slowllama.optim import SGD, round_to
from slowllama.store import Store


def module_seed(run_seed: int, step: int, micro: int, module_index: int) -> int:
    """The RNG seed for one module in one microbatch of one step (dropout masks)."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{micro}/{module_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class NonFiniteLoss(SlowllamaError):
    pass


class ModuleCache:
    """Module tensors in the store's dtype on the compute device, kept while the budget allows.

    Least recently used goes first: after the forward pass the last modules are the first the
    backward pass needs, and after the backward pass the first are the first the next forward needs.
    """

    def __init__(self, store: Store, device: torch.device, budget: Budget):
        self.store, self.device, self.budget = store, device, budget
        self.entries: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()

    def get(self, name: str, kind: str = "modules") -> dict[str, torch.Tensor]:
        key = (kind, name)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        tensors = {k: v.to(self.device) for k, v in self.store.read(name, kind).items()}
        self._admit(key, tensors)
        return tensors

    def put(self, name: str, tensors: dict[str, torch.Tensor], kind: str = "modules") -> None:
        """Replace the resident copy with updated tensors (kept only if the budget allows)."""
        self.drop(name, kind)
        self._admit((kind, name), tensors)

    def drop(self, name: str, kind: str = "modules") -> None:
        old = self.entries.pop((kind, name), None)
        if old is not None:
            self.budget.give(sum(nbytes(t) for t in old.values()))

    def clear(self) -> None:
        for kind, name in list(self.entries):
            self.drop(name, kind)

    def _admit(self, key, tensors) -> None:
        n = sum(nbytes(t) for t in tensors.values())
        while not self.budget.try_take(n):
            if not self.entries:
                return  # does not fit: used in flight only
            old_key, old = self.entries.popitem(last=False)
            self.budget.give(sum(nbytes(t) for t in old.values()))
        self.entries[key] = tensors


@dataclass
class StepResult:
    loss: float  # mean token cross-entropy over all targets of the step
    targets: int  # number of targets that carry loss
    tokens: int  # number of input tokens
    grad_norm: float  # global L2 norm of the step's gradient, before clipping


@dataclass
class EngineConfig:
    device: torch.device
    compute_dtype: torch.dtype
    dropout: float = 0.0
    seed: int = 0
    budget_bytes: int = 1 << 62
    head_chunk_bytes: int = 256 << 20  # logits of at most this many bytes at once (fp32)
    stochastic_rounding: bool = False  # for 16-bit stores without master weights
    master_weights: bool = False  # keep (and use) an fp32 master copy in the store


class OffloadedModel:
    """Forward, eval and training steps of a model whose modules are streamed from a store."""

    def __init__(self, store: Store, cfg: EngineConfig, optimizer=None):
        self.store, self.cfg = store, cfg
        self.args: ModelArgs = store.args
        self.names = module_names(self.args)
        self.device = cfg.device
        self.budget = Budget(cfg.budget_bytes, "device")
        self.cache = ModuleCache(store, cfg.device, self.budget)
        self.optimizer = optimizer or SGD()
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- building blocks ------------------------------------------------------------------
    def rope(self, seqlen: int):
        if seqlen not in self._rope:
            self._rope = {seqlen: rope_tables(self.args, 0, seqlen, device=self.device)}
        return self._rope[seqlen]

    def module(self, name: str, train: bool = False, grad: bool = False) -> nn.Module:
        """Build module `name` around its (cached or freshly read) weights, in the compute dtype."""
        tensors = self.cache.get(name)
        m = build_module(self.args, name, dropout=self.cfg.dropout if train else 0.0)
        m.load_state_dict({k: v.to(self.cfg.compute_dtype) for k, v in tensors.items()}, assign=True)
        m.requires_grad_(grad)
        return m.train(train)

    def head(self, train: bool = False, grad: bool = False):
        """The head module and the output weight to pass it: the embedding matrix if they are tied."""
        head = self.module("head", train, grad)
        if not self.args.tie_word_embeddings:
            return head, None
        emb = self.module("tok_embeddings", train, grad)
        return head, emb.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head, weight = self.head()
        return head(h, weight)

    def _seed(self, step: int, micro: int, index: int) -> None:
        if self.cfg.dropout > 0:
            torch.manual_seed(module_seed(self.cfg.seed, step, micro, index))

    # ---- forward ------------------------------------------------------------------------
    def forward_hidden(self, batches: list[torch.Tensor], acts: Optional[Activations], train: bool = False,
                       step: int = 0) -> list[torch.Tensor]:
        """Run embeddings and all blocks over the microbatches; returns the final hidden states.

        With `acts`, the input of every block (and of the head) is kept there under (level, microbatch).
        """
        with torch.no_grad():
            fault_point("forward.module")
            emb = self.module("tok_embeddings", train)
            hs = []
            for k, tokens in enumerate(batches):
                self._seed(step, k, 0)
                hs.append(emb(tokens.to(self.device)))
            del emb
            cos, sin = self.rope(batches[0].shape[1])
            for i in range(self.args.n_layers):
                fault_point("forward.module")
                block = self.module(f"layers.{i}", train)
                for k in range(len(hs)):
                    if acts is not None:
                        acts.put((i, k), hs[k])
                    self._seed(step, k, i + 1)
                    hs[k] = block(hs[k], cos, sin)
                del block
        return hs

    def loss_sum(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Summed cross-entropy and number of targets over microbatches (no gradients): eval's core."""
        hs = self.forward_hidden([x for x, _ in batches], None)
        head, weight = self.head()
        total, count = 0.0, 0
        with torch.no_grad():
            for h, (_, y) in zip(hs, batches):
                y = y.to(self.device)
                for rows in self._head_chunks(h.shape[0] * h.shape[1]):
                    hf = h.reshape(-1, h.shape[-1])[rows]
                    total += cross_entropy_sum(head(hf, weight), y.reshape(-1)[rows]).item()
                count += int((y != IGNORE_INDEX).sum())
        return total, count

    def _head_chunks(self, n_tokens: int):
        per = max(1, self.cfg.head_chunk_bytes // (4 * self.args.vocab_size * 3))  # logits, softmax, grad
        for start in range(0, n_tokens, per):
            yield slice(start, min(start + per, n_tokens))

    # ---- training -------------------------------------------------------------------------
    def train_step(self, step: int, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float,
                   acts: Activations, clip_coef: float = 1.0, update: bool = True,
                   on_module_done: Optional[Callable[[str], None]] = None) -> StepResult:
        """One optimizer step over the microbatches: forward, backward, update and write every module.

        `step` is the step being made (the store is at step - 1); the caller commits the store.
        Gradients are multiplied by clip_coef before the update. update=False only measures the
        gradient norm (the norm pass of exact clipping): nothing is updated or written.
        """
        self._grad_sq = 0.0
        self._apply = update
        n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        if n_targets == 0:
            raise SlowllamaError(f"step {step}: no targets carry loss in this batch")
        scale = 1.0 / n_targets
        L = self.args.n_layers
        hs = self.forward_hidden([x for x, _ in batches], acts, train=True, step=step)

        # head: norm + output + loss, with autograd, in chunks of tokens
        fault_point("backward.module")
        head, tied = self.head(train=True, grad=True)
        grads, loss = [], 0.0
        for k, (h, (_, y)) in enumerate(zip(hs, batches)):
            y = y.to(self.device).reshape(-1)
            flat = h.reshape(-1, h.shape[-1])
            g = torch.empty_like(flat)
            for rows in self._head_chunks(flat.shape[0]):
                hc = flat[rows].detach().requires_grad_(True)
                chunk_loss = cross_entropy_sum(head(hc, tied), y[rows]) * scale
                chunk_loss.backward()
                g[rows] = hc.grad
                loss += chunk_loss.item()
            grads.append(g.view_as(h))
        del hs
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"step {step}: the loss is {loss}; nothing of this step was written "
                                "(try a lower --lr)")
        # a tied output projection's gradient joins the embeddings' own at their update
        tied_grad = tied.grad if tied is not None else None
        del tied
        self._update("head", head, step, lr, clip_coef)
        if on_module_done:
            on_module_done("head")

        for i in reversed(range(L)):
            name = f"layers.{i}"
            fault_point("backward.module")
            block = self.module(name, train=True, grad=True)
            cos, sin = self.rope(batches[0][0].shape[1])
            for k in range(len(batches)):
                x = acts.pop((i, k)).detach().requires_grad_(True)
                self._seed(step, k, i + 1)
                with torch.enable_grad():
                    y = block(x, cos, sin)
                y.backward(grads[k])
                grads[k] = x.grad
            self._update(name, block, step, lr, clip_coef)
            if on_module_done:
                on_module_done(name)

        fault_point("backward.module")
        emb = self.module("tok_embeddings", train=True, grad=True)
        for k, (x, _) in enumerate(batches):
            self._seed(step, k, 0)
            with torch.enable_grad():
                out = emb(x.to(self.device))
            out.backward(grads[k])
        if tied_grad is not None:
            emb.weight.grad += tied_grad
        self._update("tok_embeddings", emb, step, lr, clip_coef)
        if on_module_done:
            on_module_done("tok_embeddings")
        tokens = sum(x.numel() for x, _ in batches)
        return StepResult(loss=loss, targets=n_targets, tokens=tokens, grad_norm=math.sqrt(self._grad_sq))

    def _update(self, name: str, module: nn.Module, step: int, lr: float, clip_coef: float) -> None:
        """Apply the optimizer to a module's accumulated gradients; write weights (and state) back.

        The update runs in fp32: on the master copy if there is one (in place), else on the stored
        weights upcast, rounded back to the store's dtype (stochastically if so configured).
        The cached tensors may be updated in place, so a failed step must drop the cache (discard_step).
        """
        grads = {k: p.grad.float() for k, p in module.named_parameters()}
        sq = torch.stack([g.pow(2).sum() for g in grads.values()]).sum().item()  # one device sync
        if not math.isfinite(sq):
            bad = next(k for k, g in grads.items() if not torch.isfinite(g).all())
            raise NonFiniteLoss(f"step {step}: non-finite gradient in {name}.{bad}; nothing of this step "
                                "was committed (try a lower --lr)")
        self._grad_sq += sq
        if not self._apply:
            return
        if clip_coef != 1.0:
            for g in grads.values():
                g.mul_(clip_coef)
        master = self.cfg.master_weights and self.store.dtype != torch.float32
        if master and self.store.has(name, "master"):
            weights = self.cache.get(name, "master")
        else:
            weights = {k: v.float() for k, v in self.cache.get(name).items()}
        state = {}
        if self.optimizer.stateful:
            state = (self.cache.get(name, "optim") if self.store.has(name, "optim")
                     else self.optimizer.init_state(weights))
        self.optimizer.update(weights, grads, state, lr)
        gen = None
        if self.cfg.stochastic_rounding and not master and self.store.dtype == torch.bfloat16:
            seed = module_seed(self.cfg.seed, step, -1, self.names.index(name))
            gen = torch.Generator(device=self.device).manual_seed(seed)
        new = {k: round_to(w, self.store.dtype, gen) for k, w in weights.items()}
        self._keep(name, "modules", new)
        if master:
            self._keep(name, "master", weights)
        if state:
            self._keep(name, "optim", state)

    def _keep(self, name: str, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        self.cache.put(name, tensors, kind)
        self.store.write(name, tensors, kind=kind)

    def discard_step(self) -> None:
        """After a failed step: forget cached weights that may hold its uncommitted updates."""
        self.cache.clear()
