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
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slowllama.engine.compiled import CompiledBlocks, CompiledUpdates, compile_reason, wants_compile
from slowllama.model.args import ModelArgs
from slowllama.engine.fleet import Fleet
from slowllama.errors import SlowllamaError
from slowllama.faults import fault_point
from slowllama.engine.activations import Activations, Budget
from slowllama.model.layers import IGNORE_INDEX, build_module, cross_entropy_sum, module_names, rope_tables
from slowllama.model.lora import LoRAConfig, block_params, inject
from slowllama.optim.sgd import SGD
from slowllama.optim.schedule import clip_coefficient
from slowllama.optim.rounding import round_to, round_with_bits, rounding_bits
from slowllama.engine.pipeline import Key, Pipeline
from slowllama.store.state_parts import DEFAULT_PART_ELEMENTS, state_parts
from slowllama.store.store import Store


def module_seed(run_seed: int, step: int, micro: int, module_index: int) -> int:
    """The RNG seed for one module in one microbatch of one step (dropout masks)."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{micro}/{module_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class NonFiniteLoss(SlowllamaError):
    """A NaN or infinite loss or gradient. `untouched`: no weight had been updated yet in this step."""

    def __init__(self, message: str, untouched: bool):
        super().__init__(message)
        self.untouched = untouched


def largest_file_bytes(args: ModelArgs, store_dtype: torch.dtype, stateful: bool = False, master: bool = False,
                       part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """Bytes of the largest file a step reads or writes: a module's weights, or one part (state_parts.py) of
    its optimizer state (fp32 moments) or master weights."""
    from slowllama.model.args import model_param_count

    counts = model_param_count(args)
    biggest = max(counts["embeddings"], counts["block"], counts["head"]) * store_dtype.itemsize
    if stateful or master:
        biggest = max(biggest, largest_part_elements(args, part_elements) * (8 if stateful else 4))
    return biggest


def staging_bytes(args: ModelArgs, store_dtype: torch.dtype, stateful: bool, master: bool, lookahead: int,
                  write_queue: int, part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """Host memory for the pinned buffers of reads and writes in flight on cuda, and two spares kept for reuse
    (pinning is slow)."""
    return (lookahead + write_queue + 2) * largest_file_bytes(args, store_dtype, stateful, master, part_elements)


def largest_part_elements(args: ModelArgs, part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """Elements of the largest part of any module's state."""
    from slowllama.model.layers import module_shapes

    return max(math.prod(p.shape) for name in ("tok_embeddings", "layers.0", "head")
               for p in state_parts(name, module_shapes(args, name), part_elements))


def working_bytes(args: ModelArgs, store_dtype: torch.dtype, compute_dtype: torch.dtype, *, train: bool,
                  stateful: bool = False, master: bool = False, lora: bool = False, batch_size: int = 1,
                  seq_len: int = 1, microbatches: int = 1, lookahead: int = 2, write_queue: int = 2,
                  head_chunk: int = 256 << 20, part_elements: int = DEFAULT_PART_ELEMENTS) -> int:
    """An upper estimate of the memory one module in flight needs, beyond what stays resident."""
    from slowllama.model.args import model_param_count

    es, ec = store_dtype.itemsize, compute_dtype.itemsize
    counts = model_param_count(args)
    p = max(counts["embeddings"], counts["block"], counts["head"])
    per_file = largest_file_bytes(args, store_dtype, stateful, master, part_elements)
    total = p * es + (p * ec if ec != es else 0) + lookahead * per_file
    if train and not lora:
        total += p * ec + p * es  # gradients, the new weights
        # one part's update: fp32 weights and gradient, its state and the state's new copy, master weights
        q = largest_part_elements(args, part_elements)
        total += q * (8 + (16 if stateful else 0) + (4 if master else 0))
        total += write_queue * per_file
    tokens = batch_size * seq_len
    total += microbatches * tokens * args.dim * ec  # gradients w.r.t. the module's inputs
    # one block run (and backward) on one microbatch: projections, FFN, attention probabilities
    total += tokens * (12 * args.dim + 4 * args.hidden_dim) * max(ec, 4) + 2 * batch_size * args.n_heads * seq_len ** 2 * 4
    total += min(head_chunk, tokens * microbatches * args.vocab_size * 12)
    return int(total * 1.2)


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
    device_budget: int = 1 << 62  # bytes for resident modules on the device (on cpu: in memory)
    host_budget: int = 1 << 62  # bytes for resident modules in host memory (a GPU's host)
    activation_budget: int = 1 << 62  # bytes for a step's cached activations on the device (on cpu: in memory)
    host_activation_budget: int = 0  # ... and in host memory (a GPU's host), before the scratch folder
    lookahead: int = 2  # modules read ahead of use (0: no prefetch)
    write_queue: int = 2  # updated modules whose writes may be in flight (0: synchronous writes)
    head_chunk_bytes: int = 256 << 20  # logits of at most this many bytes at once (fp32)
    stochastic_rounding: bool = False  # for 16-bit stores without master weights
    master_weights: bool = False  # keep (and use) an fp32 master copy in the store
    compile: str = "off"  # training's blocks and updates through torch.compile: auto (on cuda), on, off


@dataclass
class LoRAState:
    """Resident LoRA adapters of every block (fp32 Parameters) and their optimizer state."""

    cfg: LoRAConfig
    params: dict[str, nn.Parameter]  # "layers.N.attention.wq.lora_a" -> (rank, in), "...lora_b" -> (out, rank)
    optim_state: dict[str, torch.Tensor] = field(default_factory=dict)


class OffloadedModel:
    """Forward, eval and training steps of a model whose modules are streamed from a store.

    With `lora`, the store is a frozen base: blocks get the resident adapters injected, only the
    adapters are trained, and nothing is written to the store.
    With a `fleet` of several ranks (distributed.py), training steps run data-parallel: rank 0 reads,
    updates and writes every module, the others get each module from it by broadcast.
    """

    def __init__(self, store: Store, cfg: EngineConfig, optimizer=None, lora: Optional[LoRAState] = None,
                 fleet: Optional[Fleet] = None):
        self.store, self.cfg, self.lora = store, cfg, lora
        self.fleet = fleet or Fleet()
        self.replicate = False  # ranks > 0 keep every module they get (the model fits their device budget)
        self.replicas: dict[str, dict[str, torch.Tensor]] = {}  # ranks > 0: name -> tensors
        self.sent: set[str] = set()  # rank 0: modules the replicas hold in their current version
        self._collective = False  # inside a training step: modules come from rank 0 (eval runs alone)
        self.args: ModelArgs = store.args
        self.names = module_names(self.args)
        self.device = cfg.device
        self.device_budget = Budget(cfg.device_budget, "device")
        self.host_budget = Budget(cfg.host_budget, "host") if cfg.device.type != "cpu" else self.device_budget
        self.activation_budget = Budget(cfg.activation_budget, "activations")
        self.host_activation_budget = Budget(cfg.host_activation_budget, "host activations")
        self.optimizer = optimizer or SGD()
        master = cfg.master_weights and store.dtype != torch.float32 and lora is None
        staging = staging_bytes(self.args, store.dtype, self.optimizer.stateful and lora is None, master,
                                cfg.lookahead, cfg.write_queue, store.state_part_elements)
        self.pipe = Pipeline(store, cfg.device, self.device_budget, self.host_budget, cfg.lookahead, cfg.write_queue,
                             staging)
        self.deferred = False  # updates stay resident until write_back() (a model that fits in memory)
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        wanted = wants_compile(cfg.compile, cfg.device)
        self.compile_note = compile_reason(wanted, cfg.dropout, lora is not None)
        on_failure = None if cfg.compile == "on" else (lambda m: print(m, file=sys.stderr, flush=True))
        self.compiled_blocks = CompiledBlocks(self.args, on_failure) if wanted and not self.compile_note else None
        self.compiled_updates = CompiledUpdates(on_failure) if wanted else None

    # ---- building blocks ------------------------------------------------------------------
    def rope(self, seqlen: int):
        if seqlen not in self._rope:
            self._rope = {seqlen: rope_tables(self.args, 0, seqlen, device=self.device)}
        return self._rope[seqlen]

    def activations(self) -> Activations:
        """A cache for one step's module inputs, on the device, then the host, then the scratch folder."""
        host = self.host_activation_budget if self.device.type != "cpu" else None
        scratch = self.store.scratch / f"rank{self.fleet.rank}" if self.fleet.active else self.store.scratch
        return Activations(self.activation_budget, scratch, self.device, host)

    # ---- plans: the order of use the pipeline reads ahead by ------------------------------------
    def _blocks(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.args.n_layers)]

    def _with_state(self, name: str) -> list[Key]:
        """A module's weights, then the parts of its master weights and optimizer state, in the update's order."""
        keys = [("modules", name)]
        if self.lora is None:
            kinds = (["master"] if self.cfg.master_weights and self.store.dtype != torch.float32 else []) + \
                (["optim"] if self.optimizer.stateful else [])
            keys += [(kind, part.name) for part in self.store.state_parts(name) for kind in kinds]
        return keys

    def eval_plan(self) -> list[Key]:
        tied = [("modules", "tok_embeddings")] if self.args.tie_word_embeddings else []
        return [("modules", n) for n in ["tok_embeddings"] + self._blocks() + ["head"]] + tied

    def train_plan(self) -> list[Key]:
        forward = [("modules", n) for n in ["tok_embeddings"] + self._blocks()]
        backward = self._with_state("head")
        if self.args.tie_word_embeddings:
            backward.append(("modules", "tok_embeddings"))
        for name in reversed(self._blocks()):
            backward += self._with_state(name)
        if self.lora is None:
            backward += self._with_state("tok_embeddings")
        return forward + backward

    def fits_in_memory(self) -> bool:
        """Whether every module, with its optimizer state and master weights, fits the resident budgets."""
        from slowllama.model.args import model_param_count

        total = sum(self.store.module_bytes(n) for n in self.names)
        params = model_param_count(self.args)["total"]
        if self.lora is None and self.optimizer.stateful:
            total += params * 2 * torch.empty((), dtype=getattr(self.optimizer, "state_dtype", torch.float32)).element_size()
        if self.cfg.master_weights and self.store.dtype != torch.float32:
            total += 4 * params
        room = self.device_budget.limit + (self.host_budget.limit if self.host_budget is not self.device_budget else 0)
        return total * 1.1 <= room

    def fits_on_device(self) -> bool:
        """Whether every module's weights fit the device budget (ranks > 0 then keep them all)."""
        return sum(self.store.module_bytes(n) for n in self.names) * 1.1 <= self.device_budget.limit

    def choose_replication(self) -> str:
        """Several ranks: whether ranks > 0 keep a copy of every module, as rank 0 decides (a collective);
        returns the line that says so."""
        self.replicate = self.fleet.broadcast_object(self.fits_on_device())
        how = "keep a copy of every module" if self.replicate else "get each module as it is used"
        return f"{self.fleet.world} ranks: the others {how}"

    def weights(self, name: str, kind: str = "modules") -> dict[str, torch.Tensor]:
        return self.pipe.get((kind, name))

    def shared(self, name: str) -> dict[str, torch.Tensor]:
        """A module's weights to compute with: from the store, or on ranks > 0 of a step, from rank 0.

        Every rank calls this at the same points of a step, in the same order (it is a collective).
        """
        fleet = self.fleet
        if not (fleet.active and self._collective):
            return self.weights(name)
        if fleet.main:
            tensors = self.weights(name)
            if not (self.replicate and name in self.sent):
                fleet.broadcast(tensors)
                if self.replicate:
                    self.sent.add(name)
            return tensors
        if name in self.replicas:
            return self.replicas[name]
        tensors = {k: torch.empty(shape, dtype=self.store.dtype, device=self.device)
                   for k, shape in self.store.expected_shapes[name].items()}
        fleet.broadcast(tensors)
        if self.replicate:
            self.replicas[name] = tensors
        return tensors

    def module(self, name: str, train: bool = False, grad: bool = False) -> nn.Module:
        """Build module `name` around its (resident or freshly read) weights, in the compute dtype."""
        tensors = self.shared(name)
        m = build_module(self.args, name, dropout=self.cfg.dropout if train else 0.0)
        m.load_state_dict({k: v.to(self.cfg.compute_dtype) for k, v in tensors.items()}, assign=True)
        m.requires_grad_(grad and self.lora is None)
        if self.lora is not None and name.startswith("layers."):
            inject(m, block_params(self.lora.params, name), self.lora.cfg)
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

    def _run_block(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   train: bool) -> torch.Tensor:
        """A training step's block runs compiled where asked for (eval and generation stay eager)."""
        if train and self.compiled_blocks is not None:
            return self.compiled_blocks(block, x, cos, sin)
        return block(x, cos, sin)

    def _seed(self, step: int, micro: int, index: int) -> None:
        if self.cfg.dropout > 0:
            torch.manual_seed(module_seed(self.cfg.seed, step, micro, index))

    # ---- forward ------------------------------------------------------------------------
    def forward_hidden(self, batches: list[torch.Tensor], acts: Optional[Activations], train: bool = False,
                       step: int = 0, micro_offset: int = 0) -> list[torch.Tensor]:
        """Run embeddings and all blocks over the microbatches; returns the final hidden states.

        With `acts`, the input of every block (and of the head) is kept there under (level, microbatch).
        micro_offset: the step-wide index of the first microbatch (dropout seeds), for ranks > 0.
        """
        with torch.no_grad():
            fault_point("forward.module")
            emb = self.module("tok_embeddings", train)
            hs = []
            for k, tokens in enumerate(batches):
                self._seed(step, micro_offset + k, 0)
                hs.append(emb(tokens.to(self.device)))
            del emb
            cos, sin = self.rope(batches[0].shape[1])
            for i in range(self.args.n_layers):
                fault_point("forward.module")
                block = self.module(f"layers.{i}", train)
                for k in range(len(hs)):
                    if acts is not None:
                        acts.put((i, k), hs[k])
                    self._seed(step, micro_offset + k, i + 1)
                    hs[k] = self._run_block(block, hs[k], cos, sin, train)
                del block
        return hs

    def loss_sum(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Summed cross-entropy and number of targets over microbatches (no gradients): eval's core."""
        self.pipe.set_plan(self.eval_plan())
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
                   acts: Activations, clip_coef: float = 1.0, update: bool = True, max_grad_norm: float = 0.0,
                   on_module_done: Optional[Callable[[str], None]] = None, micro_offset: int = 0) -> StepResult:
        """One optimizer step over the microbatches: forward, backward, update and write every module.

        `step` is the step being made (the store is at step - 1); the caller commits the store.
        Gradients are multiplied by clip_coef before the update. update=False only measures the
        gradient norm (the norm pass of exact clipping): nothing is updated or written.
        With LoRA the adapters are updated once the whole backward is done, so their clipping to
        max_grad_norm is exact; the embeddings (frozen, the last in the chain) are not even re-run.
        With several ranks, `batches` are this rank's share of the step's windows (the first of them
        microbatch number micro_offset of the step); the result is the whole step's.
        """
        self._collective = self.fleet.active
        try:
            return self._train_step(step, batches, lr, acts, clip_coef, update, max_grad_norm, on_module_done,
                                    micro_offset)
        finally:
            self._collective = False

    def _train_step(self, step, batches, lr, acts, clip_coef, update, max_grad_norm, on_module_done,
                    micro_offset) -> StepResult:
        self._norms: list[torch.Tensor] = []
        self._apply = update
        self._touched = False  # some weight of this step updated (resident copies may hold it)
        self.pipe.set_plan(self.train_plan())
        n_targets = int(self.fleet.sum(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)))
        if n_targets == 0:
            raise SlowllamaError(f"step {step}: no targets carry loss in this batch")
        scale = 1.0 / n_targets
        L = self.args.n_layers
        hs = self.forward_hidden([x for x, _ in batches], acts, train=True, step=step, micro_offset=micro_offset)

        # head: norm + output + loss, with autograd, in chunks of tokens
        fault_point("backward.module")
        head, tied = self.head(train=True, grad=self.lora is None)
        grads, loss = [], torch.zeros((), dtype=torch.float64, device=self.device)
        for k, (h, (_, y)) in enumerate(zip(hs, batches)):
            y = y.to(self.device).reshape(-1)
            flat = h.reshape(-1, h.shape[-1])
            g = torch.empty_like(flat)
            for rows in self._head_chunks(flat.shape[0]):
                hc = flat[rows].detach().requires_grad_(True)
                chunk_loss = cross_entropy_sum(head(hc, tied), y[rows]) * scale
                chunk_loss.backward()
                g[rows] = hc.grad
                loss += chunk_loss.detach()  # summed on the device: one sync for the step, below
            grads.append(g.view_as(h))
        del hs
        loss = self.fleet.sum(loss.item())
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"step {step}: the loss is {loss}; nothing of this step was written "
                                "(try a lower --lr)", untouched=not self._touched)
        # a tied output projection's gradient joins the embeddings' own at their update
        tied_grad = tied.grad if tied is not None else None
        del tied
        self._finish("head", head, step, lr, clip_coef)
        if on_module_done:
            on_module_done("head")

        for i in reversed(range(L)):
            name = f"layers.{i}"
            fault_point("backward.module")
            block = self.module(name, train=True, grad=True)
            cos, sin = self.rope(batches[0][0].shape[1])
            for k in range(len(batches)):
                acts.prefetch((i, k + 1) if k + 1 < len(batches) else (i - 1, 0))  # the next input, meanwhile
                x = acts.pop((i, k)).detach().requires_grad_(True)
                self._seed(step, micro_offset + k, i + 1)
                with torch.enable_grad():
                    y = self._run_block(block, x, cos, sin, train=True)
                y.backward(grads[k])
                grads[k] = x.grad
            self._finish(name, block, step, lr, clip_coef)
            if on_module_done:
                on_module_done(name)

        tokens = int(self.fleet.sum(sum(x.numel() for x, _ in batches)))
        if self.lora is not None:
            self._update_adapters(step, lr, max_grad_norm)
            return StepResult(loss=loss, targets=n_targets, tokens=tokens, grad_norm=self._grad_norm())
        fault_point("backward.module")
        self._embeddings_backward(batches, grads, tied_grad, step, lr, clip_coef, micro_offset)
        if on_module_done:
            on_module_done("tok_embeddings")
        return StepResult(loss=loss, targets=n_targets, tokens=tokens, grad_norm=self._grad_norm())

    def _finish(self, name: str, module: nn.Module, step: int, lr: float, clip_coef: float) -> None:
        """A module's backward is done: update it (full fine-tuning) or leave it (LoRA: frozen base)."""
        if self.lora is None:
            self._step_module(name, {k: p.grad for k, p in module.named_parameters()}, step, lr, clip_coef)

    def _step_module(self, name: str, grads: dict[str, torch.Tensor], step: int, lr: float, clip_coef: float) -> None:
        """Sum the module's gradient over ranks; rank 0 updates and writes it, and the replicas follow."""
        grads = self.fleet.reduce(grads)
        new = self._update(name, grads, step, lr, clip_coef) if self.fleet.main else None
        if self.fleet.active and self.replicate and self._apply:
            self.fleet.broadcast(new if self.fleet.main else self.replicas[name])

    def _embeddings_backward(self, batches, grads, tied_grad, step: int, lr: float, clip_coef: float,
                             micro_offset: int = 0) -> None:
        """The embeddings' gradient, only in the rows the step used; SGD updates and writes only those rows.

        The rows are gathered once (ids sorted), and each microbatch's lookup and dropout are re-run on
        them: the same values and masks as the forward pass, and a gradient of (used rows, dim)
        instead of (vocab, dim). AdamW (whose moments move every row), master weights and a tied
        output projection (a gradient in every row) take the dense path.
        """
        weight = self.shared("tok_embeddings")["weight"]
        ids = torch.unique(torch.cat([x.reshape(-1) for x, _ in batches]).to(self.device))
        rows = weight[ids].to(self.cfg.compute_dtype).requires_grad_(True)
        p = self.cfg.dropout
        for k, (x, _) in enumerate(batches):
            self._seed(step, micro_offset + k, 0)
            with torch.enable_grad():
                index = torch.searchsorted(ids, x.to(self.device).contiguous())
                out = F.dropout(F.embedding(index, rows), p, training=p > 0)
            out.backward(grads[k])
        # (ranks use different rows: their gradients are summed dense)
        sparse = (not self.optimizer.stateful and tied_grad is None and not self.fleet.active
                  and not (self.cfg.master_weights and self.store.dtype != torch.float32))
        if sparse:
            self._update_rows("tok_embeddings", "weight", ids, rows.grad, step, lr, clip_coef)
            return
        dense = torch.zeros(weight.shape, dtype=torch.float32, device=self.device)
        dense.index_add_(0, ids, rows.grad.float())
        if tied_grad is not None:
            dense += tied_grad.float()
        self._step_module("tok_embeddings", {"weight": dense}, step, lr, clip_coef)

    def _update_rows(self, name: str, key: str, ids: torch.Tensor, grad: torch.Tensor, step: int, lr: float,
                     clip_coef: float) -> None:
        """SGD on some rows of one weight: w[ids] -= lr * grad, the other rows untouched (their gradient is 0)."""
        grad = grad.float()
        self._check_finite(step, f"{name}.", {key: grad})
        if not self._apply:
            return
        if clip_coef != 1.0:
            grad.mul_(clip_coef)
        self._touched = True
        tensors = self.weights(name)
        rows = tensors[key][ids].float()
        self.optimizer.update({key: rows}, {key: grad}, {}, lr)
        tensors[key][ids] = round_to(rows, self.store.dtype, self._rounding_generator(name, step, master=False))
        self._keep(name, "modules", tensors, rows={key: ids})  # only those rows changed

    def _check_finite(self, step: int, where: str, grads: dict[str, torch.Tensor]) -> None:
        """Record each gradient's norm; a non-finite one stops the step before anything is written.

        The global norm is then the norm of all per-tensor norms, as clip_grad_norm_ computes it.
        """
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads.values()]
        if not torch.isfinite(torch.stack(norms)).all().item():  # one device sync per module
            bad = next(k for k, g in grads.items() if not torch.isfinite(g).all())
            raise NonFiniteLoss(f"step {step}: non-finite gradient in {where}{bad}; nothing of this step "
                                "was committed (try a lower --lr)", untouched=not self._touched)
        self._norms.extend(norms)

    def _grad_norm(self) -> float:
        return torch.linalg.vector_norm(torch.stack(self._norms)).item() if self._norms else 0.0

    def _update_adapters(self, step: int, lr: float, max_grad_norm: float) -> None:
        """AdamW (or the configured optimizer) on all resident adapters, after the whole backward."""
        params = self.lora.params
        grads = {k: p.grad.float() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
        grads = self.fleet.all_reduce(grads)  # every rank applies the same update to its copy
        for p in params.values():
            p.grad = None
        self._check_finite(step, "", grads)
        if not self._apply:
            return
        coef = clip_coefficient(self._grad_norm(), max_grad_norm) if max_grad_norm else 1.0
        if coef != 1.0:
            for g in grads.values():
                g.mul_(coef)
        self._touched = True
        if self.optimizer.stateful and not self.lora.optim_state:
            self.lora.optim_state = self.optimizer.init_state(params)
        with torch.no_grad():
            self.optimizer.update({k: p.data for k, p in params.items()}, grads, self.lora.optim_state, lr)

    def _update(self, name: str, grads: dict[str, torch.Tensor], step: int, lr: float,
                clip_coef: float) -> Optional[dict[str, torch.Tensor]]:
        """Apply the optimizer to a module's accumulated gradients; write weights (and state) back.

        Returns the new weights in the store's dtype (None in a norm pass, which updates nothing).

        The update runs part by part (state_parts.py: rows of one weight), so that only a part's
        optimizer state and master weights are in flight at once: each is read ahead, updated and
        written back while the next is read. Arithmetic in fp32, on the master copy if there is one
        (in place), else on the stored weights upcast, rounded back to the store's dtype
        (stochastically if so configured), fused into one pass where compiled.
        The cached tensors may be updated in place, so a failed step must drop the cache (discard_step).
        """
        self._check_finite(step, f"{name}.", grads)
        if not self._apply:
            return None
        self._touched = True
        master = self.cfg.master_weights and self.store.dtype != torch.float32
        weights = self.weights(name)
        gen = self._rounding_generator(name, step, master)
        fused = self.compiled_updates if not master else None
        number = consts = None  # this update's number (AdamW), and the fused updates' scalars: once per module
        pieces: dict[str, list[torch.Tensor]] = {k: [] for k in weights}
        for part in self.store.state_parts(name):
            w, g = weights[part.key][part.rows], grads[part.key][part.rows]
            bits = rounding_bits(w, gen) if gen is not None else None  # drawn in part order, however updated
            state = {}
            if self.optimizer.stateful:
                state = (self.weights(part.name, "optim") if self.pipe.has(("optim", part.name))
                         else self.optimizer.init_state({part.key: w}))
                if number is None:  # every part of a module has had the same updates: one device sync
                    number = state["step"].item() + 1
            out = None
            if fused is not None:
                consts = consts or self._fused_constants(lr, clip_coef, number)
                out = self._fused_part(part.key, w, g, state, consts, bits)
            if out is not None:
                new_w, state = out
            else:
                g = g.float() * clip_coef if clip_coef != 1.0 else g.float()
                if master and self.pipe.has(("master", part.name)):
                    w32 = self.weights(part.name, "master")[part.key]
                else:
                    w32 = w.float()
                self.optimizer.update({part.key: w32}, {part.key: g}, state, lr, step=number)
                new_w = round_with_bits(w32, self.store.dtype, bits)
                if master:
                    self._keep(part.name, "master", {part.key: w32})
            if state:
                self._keep(part.name, "optim", state)
            pieces[part.key].append(new_w)
        new = {k: p[0] if len(p) == 1 else torch.cat(p) for k, p in pieces.items()}
        self._keep(name, "modules", new)
        return new

    def _rounding_generator(self, name: str, step: int, master: bool) -> Optional[torch.Generator]:
        """The random bits of a module's stochastic rounding in a step (None: round to nearest)."""
        if not (self.cfg.stochastic_rounding and not master and self.store.dtype == torch.bfloat16):
            return None
        seed = module_seed(self.cfg.seed, step, -1, self.names.index(name))
        return torch.Generator(device=self.device).manual_seed(seed)

    def _fused_constants(self, lr: float, clip_coef: float, number: Optional[float]) -> dict[str, torch.Tensor]:
        """The device scalars of a module's fused updates (made once: each costs a copy to the device)."""
        out = {"coef": torch.tensor(clip_coef, dtype=torch.float32, device=self.device)}
        if number is None:
            out["lr"] = torch.tensor(lr, dtype=torch.float32, device=self.device)
        else:
            out["adamw"] = self.optimizer.fused_scalars(number, lr, self.device)
        return out

    def _fused_part(self, key: str, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor],
                    consts: dict[str, torch.Tensor], bits: Optional[torch.Tensor]):
        """One part's update through compiled.py's fused passes: (new weight rows, new state), or None if
        compiling failed (the caller runs it eager)."""
        fused = self.compiled_updates
        if "lr" in consts:
            new_w = fused(fused.sgd, w, g, consts["coef"], consts["lr"], bits)
            return None if new_w is None else (new_w, {})
        out = fused(fused.adamw, w, g, state[f"{key}.exp_avg"], state[f"{key}.exp_avg_sq"], consts["coef"],
                    consts["adamw"], bits)
        if out is None:
            return None
        new_w, m, v = out
        return new_w, {"step": state["step"] + 1, f"{key}.exp_avg": m, f"{key}.exp_avg_sq": v}

    def _keep(self, name: str, kind: str, tensors: dict[str, torch.Tensor],
              rows: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Hand a module's new version to the pipeline (rows: {weight: ids} when only those rows changed)."""
        self.pipe.put((kind, name), tensors, persist=not self.deferred, rows=rows)

    def write_back(self) -> None:
        """Make the store hold every update so far (queue what is resident and newer, wait for all writes)."""
        self.pipe.write_dirty()
        self.pipe.flush()

    def discard_step(self) -> None:
        """After a failed step: forget resident weights that may hold its uncommitted updates."""
        self.pipe.discard()
        if self.lora is not None:
            for p in self.lora.params.values():
                p.grad = None
