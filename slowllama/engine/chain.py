"""The offloaded model: its modules live in the store and pass through the device one at a time.

Forward: embeddings -> block 0 .. block L-1, microbatch by microbatch inside each module, keeping
every module's input (Activations). The dropout masks of module m in microbatch k of step s come
from a seed that is a function of (run seed, s, k, m), set just before the module runs, so the
backward pass replays them exactly, a resumed run draws the same ones, and so do several ranks.

Backward: head (norm + output + loss, run here for the first time, with autograd) -> block L-1 ..
block 0 -> embeddings. Each module is loaded once, re-run on its saved inputs with its seeds, and
backpropagated for all K microbatches (its gradient accumulates over them), then updated by the
optimizer (updates.py) and handed back to the pipeline; the gradient with respect to its input
passes down. Where a whole block is more than the budgets hold, each block streams by weight instead
(streamed.py): its linears fetch their weights at use and its weights are updated one by one during
its backward. What stays resident and what is read ahead: residency.py and pipeline.py; several
ranks: replicas.py. The step's transaction around this (begin, commit, roll back): train/trainer.py.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slowllama.engine.activations import Activations, Budget, KeptGraphs
from slowllama.engine.compiled import (BlockTensors, CompiledBlocks, CompiledDequantize, CompiledUpdates,
                                       compile_reason, wants_compile)
from slowllama.engine.fleet import Fleet
from slowllama.engine.pipeline import Pipeline
from slowllama.engine.replicas import Replicas
from slowllama.engine.residency import (block_input_bytes, eval_plan, fits_in_memory, kept_block_bytes,
                                        staging_bytes, step_uses, train_plan)
from slowllama.engine.step import NonFiniteLoss, Step, StepResult, Tally, module_seed
from slowllama.engine.streamed import NORMS, BlockGradients, stream_linears
from slowllama.engine.updates import Updater
from slowllama.errors import SlowllamaError
from slowllama.faults import fault_point
from slowllama.model import nf4
from slowllama.model.args import ModelArgs
from slowllama.model.layers import IGNORE_INDEX, assign_weights, build_module, cross_entropy_sum, rope_tables
from slowllama.model.lora import LoRAState, inject
from slowllama.model.shapes import model_param_count, module_names
from slowllama.optim.base import Optimizer
from slowllama.optim.sgd import SGD
from slowllama.store.quantized import dequantized
from slowllama.store.state_parts import piece_name
from slowllama.store.store import Store


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
    read_ahead_bytes: int = 1 << 62  # ... and at most this many bytes of them (one at least)
    write_bytes: int = 1 << 62  # ... and at most this many bytes of them (one at least)
    head_chunk_bytes: int = 256 << 20  # logits of at most this many bytes at once (fp32)
    stochastic_rounding: bool = False  # for 16-bit stores without master weights
    master_weights: bool = False  # keep (and use) an fp32 master copy in the store
    compile: str = "off"  # training's blocks and updates through torch.compile: auto (on cuda), on, off
    unit: str = "block"  # what streams in a block's place: the block, or each of its weights (residency.py)
    keep_graphs: bool = True  # blocks keep their forward graph (no recompute) where the activation budget holds it


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A weight for a block's graph: a new leaf that gathers its gradient, when it is trained (the resident tensor
    itself stays untouched, as a module's nn.Parameter around it leaves it)."""
    return t.detach().requires_grad_() if requires_grad else t


def keeps_master(store: Store, master_weights: bool, lora: Optional[LoRAState]) -> bool:
    """Whether a run keeps fp32 master weights: asked for, on a 16-bit store, in full fine-tuning."""
    return master_weights and store.dtype != torch.float32 and lora is None


class OffloadedModel:
    """Forward, eval and training steps of a model whose modules are streamed from a store.

    With `lora`, the store is a frozen base: blocks get the resident adapters injected, only the
    adapters are trained, and nothing is written to the store.
    With a `fleet` of several ranks (fleet.py), training steps run data-parallel (replicas.py).
    """

    def __init__(self, store: Store, cfg: EngineConfig, optimizer: Optional[Optimizer] = None,
                 lora: Optional[LoRAState] = None, fleet: Optional[Fleet] = None):
        self.store, self.cfg, self.lora = store, cfg, lora
        self.fleet = fleet or Fleet()
        self.args: ModelArgs = store.args
        self.names = module_names(self.args)
        self.device = cfg.device
        self.device_budget = Budget(cfg.device_budget, "device")
        self.host_budget = Budget(cfg.host_budget, "host") if cfg.device.type != "cpu" else self.device_budget
        self.activation_budget = Budget(cfg.activation_budget, "activations")
        self.host_activation_budget = Budget(cfg.host_activation_budget, "host activations")
        self.optimizer = optimizer or SGD()
        master = keeps_master(store, cfg.master_weights, lora)
        staging = staging_bytes(self.args, store.dtype, self.optimizer if lora is None else None, master,
                                cfg.lookahead, cfg.write_queue, store.state_part_elements, cfg.unit,
                                store.quantization)
        self.pipe = Pipeline(store, cfg.device, self.device_budget, self.host_budget, cfg.lookahead, cfg.write_queue,
                             staging, cfg.read_ahead_bytes, cfg.write_bytes)
        self.replicas = Replicas(self.fleet, self.pipe, store.stored_specs, cfg.device,
                                 [(n, store.module_bytes(n)) for n in self.names])
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        wanted = wants_compile(cfg.compile, cfg.device)
        self.compile_note = compile_reason(wanted, cfg.dropout, lora.cfg.dropout if lora is not None else 0.0,
                                           cfg.unit == "weight")
        on_failure = None if cfg.compile == "on" else (lambda m: print(m, file=sys.stderr, flush=True))
        self.compiled_blocks = (CompiledBlocks(self.args, on_failure, lora.cfg if lora is not None else None,
                                               store.dtype, cfg.compute_dtype)
                                if wanted and not self.compile_note else None)
        compiled_updates = CompiledUpdates(self.optimizer, on_failure) if wanted else None
        self.compiled_dequantize = CompiledDequantize(on_failure) if wanted and store.quantization else None
        self.updater = Updater(store, self.pipe, self.optimizer, cfg.device, self.names, master=master,
                               stochastic=cfg.stochastic_rounding, seed=cfg.seed, compiled=compiled_updates)

    # ---- residency ------------------------------------------------------------------------
    def fits_in_memory(self) -> bool:
        """Whether every module, with its optimizer state and master weights, fits the resident budgets. Several
        ranks: and every module fits the device, so that the ranks keep copies of the modules they do not own and
        rank 0's eval between commits sees every module's latest version."""
        room = self.device_budget.limit + (self.host_budget.limit if self.host_budget is not self.device_budget else 0)
        return fits_in_memory(self._module_bytes(),
                              model_param_count(self.args)["total"], self.optimizer if self.lora is None else None,
                              self.updater.master, room) and (not self.fleet.active or self.fits_on_device())

    def fits_on_device(self) -> bool:
        """Whether every module's weights fit the device budget (several ranks then keep copies of the modules they
        do not own)."""
        return self._module_bytes() * 1.1 <= self.device_budget.limit

    def _module_bytes(self) -> int:
        """Bytes of every module's weights in the store."""
        return sum(self.store.module_bytes(n) for n in self.names)

    def defer_writes(self) -> None:
        """Keep updates resident until write_back() (a model that fits in memory: written at commit points)."""
        self.updater.deferred = True

    def choose_replication(self) -> str:
        """Several ranks: whether each keeps a copy of the modules it does not own (a collective); the line that says
        so."""
        return self.replicas.choose(self.fits_on_device())

    def write_back(self) -> None:
        """Make the store hold every update so far (queue what is resident and newer, wait for all writes)."""
        self.pipe.write_dirty()
        self.pipe.flush()

    def discard_step(self) -> None:
        """After a failed step: forget resident weights that may hold its uncommitted updates."""
        self.pipe.discard()
        self.updater.forget()
        self.replicas.discard()
        if self.lora is not None:
            for p in self.lora.params.values():
                p.grad = None

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

    def streams_by_weight(self, name: str) -> bool:
        return self.cfg.unit == "weight" and name.startswith("layers.")

    def module(self, name: str, train: bool = False, grad: bool = False,
               gradients: Optional[BlockGradients] = None) -> nn.Module:
        """Build module `name` around its (resident or freshly read) weights, in the compute dtype. A block
        streamed by weight holds only its norms: its linears fetch their weights at use (streamed.py) and hand
        their gradients to `gradients`."""
        m = build_module(self.args, name, dropout=self.cfg.dropout if train else 0.0)
        if self.streams_by_weight(name):
            def fetch(key: str) -> torch.Tensor:
                return self._dequantized(name, self.replicas.weights(piece_name(name, key)))[key].to(
                    self.cfg.compute_dtype)

            stream_linears(m, fetch, gradients if grad and self.lora is None else None)
            tensors = {key: self.replicas.weights(piece_name(name, key))[key] for key in NORMS}
        else:
            tensors = self._dequantized(name, self.replicas.weights(name))
        assign_weights(m, {k: v.to(self.cfg.compute_dtype) for k, v in tensors.items()}, grad and self.lora is None)
        if self.lora is not None and name.startswith("layers."):
            inject(m, self.lora.block(name), self.lora.cfg)
        return m.train(train)

    def block(self, name: str, train: bool = False, grad: bool = False,
              gradients: Optional[BlockGradients] = None) -> nn.Module | BlockTensors:
        """Block `name` to run: for a training step's compiled graph its tensors, as they are resident (no module is
        built, nothing dequantized outside the graph); else its module (module())."""
        if not train or self.compiled_blocks is None or self.streams_by_weight(name):
            return self.module(name, train, grad, gradients)
        tensors, quant, shapes = self.replicas.weights(name), self.store.quantization, self.store.expected_shapes[name]
        packed = {k: nf4.parts(t, shapes[k], quant.double_quant) for k, t in tensors.items()
                  if quant is not None and quant.covers(name, k)}
        trained = grad and self.lora is None
        params = {k: _leaf(t.to(self.cfg.compute_dtype), trained) for k, t in tensors.items() if k not in packed}
        if self.lora is not None:
            params.update(self.lora.block(name))
        return BlockTensors(params, packed)

    def _dequantized(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A quantized store's packed weights (as they streamed, on the device) -> weights in the store's dtype."""
        return dequantized(self.store.quantization, name, tensors, self.store.expected_shapes[name], self.store.dtype,
                           self.compiled_dequantize)

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

    def _run_block(self, block: nn.Module | BlockTensors, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   train: bool) -> torch.Tensor:
        """A training step's block runs compiled where asked for (eval and generation stay eager)."""
        if train and self.compiled_blocks is not None:
            return self.compiled_blocks(block, x, cos, sin)
        return block(x, cos, sin)

    def _seed(self, number: int, micro: int, index: int) -> None:
        """Seed the dropout masks of module `index` in a microbatch: the model's and the LoRA path's (a recompute
        must draw the masks its forward pass drew)."""
        if self.cfg.dropout > 0 or (self.lora is not None and self.lora.cfg.dropout > 0):
            torch.manual_seed(module_seed(self.cfg.seed, number, micro, index))

    def _head_chunks(self, n_tokens: int):
        per = max(1, self.cfg.head_chunk_bytes // (4 * self.args.vocab_size * 3))  # logits, softmax, grad
        for start in range(0, n_tokens, per):
            yield slice(start, min(start + per, n_tokens))

    # ---- forward ------------------------------------------------------------------------
    def forward_hidden(self, batches: list[torch.Tensor], acts: Optional[Activations], train: bool = False,
                       step: int = 0, micro_offset: int = 0,
                       graphs: Optional[KeptGraphs] = None) -> list[torch.Tensor]:
        """Run embeddings and all blocks over the microbatches; returns the final hidden states.

        With `acts`, the input of every block is kept there under (level, microbatch), except for the blocks
        that `graphs` holds: those run with autograd, and their graphs are kept instead.
        step: the step's number (dropout seeds); micro_offset: the step-wide index of the first microbatch.
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
                keep = graphs is not None and graphs.holds(i)
                block = self.block(f"layers.{i}", train, grad=keep)
                pairs = []
                for k in range(len(hs)):
                    self._seed(step, micro_offset + k, i + 1)
                    if keep:
                        x = hs[k].detach().requires_grad_(True)
                        with torch.enable_grad():
                            y = self._run_block(block, x, cos, sin, train)
                        pairs.append((x, y))
                        hs[k] = y.detach()
                        continue
                    if acts is not None:
                        acts.put((i, k), hs[k])
                    hs[k] = self._run_block(block, hs[k], cos, sin, train)
                if keep:
                    graphs.put(i, block, pairs)
                del block, pairs
        return hs

    def loss_sum(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Summed cross-entropy and number of targets over microbatches (no gradients): eval's core."""
        self.pipe.set_plan(self.replicas.outside(eval_plan(self.args, self.cfg.unit, len(batches))))
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

    # ---- training -------------------------------------------------------------------------
    def train_step(self, step: Step, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   acts: Activations) -> StepResult:
        """One optimizer step over the microbatches: forward, backward, and every module updated and handed to
        the pipeline (train/trainer.py runs it between a step's begin and its commit).

        The store is at step.number - 1 of the run. Gradients are multiplied by step.clip_coef before
        the update; step.update False only measures the gradient norm (exact clipping's norm pass):
        nothing is updated or written. With LoRA the adapters are updated once the whole backward is
        done, so their clipping to step.max_grad_norm is exact; the embeddings (frozen, the last in the
        chain) are not even re-run. With several ranks, `batches` are this rank's share of the step's
        windows (the first of them microbatch number step.micro_offset); the result is the whole step's.
        """
        with self.replicas.step(step_uses(self.args, embeddings_backward=self.lora is None)):
            return self._train_step(step, batches, acts)

    def kept_graph_count(self, batch_size: int, seq_len: int, microbatches: int) -> int:
        """How many of the last blocks keep their forward graph in a step of these shapes: as many as the activation
        budget holds beside the other blocks' cached inputs. Not with several ranks: their modules come as the
        step's plan of uses says (replicas.py), which has every block's backward ask for it."""
        if not self.cfg.keep_graphs or self.cfg.unit == "weight" or self.fleet.active:
            return 0
        per_input = block_input_bytes(self.args, self.cfg.compute_dtype, microbatches * batch_size * seq_len)
        room = self.activation_budget.free - self.args.n_layers * per_input
        extra = self._kept_block_bytes(batch_size, seq_len, microbatches) - per_input
        return max(0, min(self.args.n_layers, room // max(1, extra)))

    def _kept_block_bytes(self, batch_size: int, seq_len: int, microbatches: int) -> int:
        return kept_block_bytes(self.args, self.store.dtype, self.cfg.compute_dtype, batch_size, seq_len, microbatches,
                                self.cfg.dropout, self.store.quantization)

    def _train_step(self, step: Step, batches, acts: Activations) -> StepResult:
        batch_size, seq_len = batches[0][0].shape
        count = self.kept_graph_count(batch_size, seq_len, len(batches))
        graphs = KeptGraphs(self.activation_budget, self.args.n_layers, count,
                            self._kept_block_bytes(batch_size, seq_len, len(batches)))
        try:
            return self._train_step_with(step, batches, acts, graphs)
        finally:
            graphs.clear()

    def _train_step_with(self, step: Step, batches, acts: Activations, graphs: KeptGraphs) -> StepResult:
        tally = Tally(step.number)
        self.pipe.set_plan(self.replicas.plan(train_plan(self.args, self.store.state_parts,
                                                         self.updater.state_kinds if self.lora is None else [],
                                                         embeddings_backward=self.lora is None, unit=self.cfg.unit,
                                                         microbatches=len(batches), graphs=graphs.count,
                                                         deferred_updates=self.replicas.update_lag
                                                         if self.lora is None else 0)))
        n_targets = int(self.fleet.sum(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)))
        if n_targets == 0:
            raise SlowllamaError(f"step {step.number}: no targets carry loss in this batch")
        scale = 1.0 / n_targets
        hs = self.forward_hidden([x for x, _ in batches], acts, train=True, step=step.number,
                                 micro_offset=step.micro_offset, graphs=graphs)

        # head: norm + output + loss, with autograd, in chunks of tokens
        fault_point("backward.module")
        head, tied = self.head(train=True, grad=self.lora is None)
        grads, loss = [], torch.zeros((), dtype=torch.float64, device=self.device)
        for h, (_, y) in zip(hs, batches):
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
            raise NonFiniteLoss(f"step {step.number}: the loss is {loss}; nothing of this step was written "
                                "(try a lower --lr)", untouched=not tally.touched, everywhere=True)
        # a tied output projection's gradient joins the embeddings' own at their update
        tied_grad = tied.grad if tied is not None else None
        del tied
        self._finish("head", head, step, tally)

        for i in reversed(range(self.args.n_layers)):
            name = f"layers.{i}"
            fault_point("backward.module")
            if graphs.holds(i):  # its graph from the forward pass: backpropagate, no recompute
                acts.prefetch((i - 1, 0))
                block, pairs = graphs.pop(i)
                for k, (x, y) in enumerate(pairs):
                    y.backward(grads[k])
                    grads[k] = x.grad
                del pairs
                self._finish(name, block, step, tally)
                continue
            gradients = BlockGradients(len(batches), lambda key, g, name=name: self._update_weight(name, key, g, step,
                                                                                                tally))
            block = self.block(name, train=True, grad=True, gradients=gradients)
            cos, sin = self.rope(batches[0][0].shape[1])
            for k in range(len(batches)):
                acts.prefetch((i, k + 1) if k + 1 < len(batches) else (i - 1, 0))  # the next input, meanwhile
                x = acts.pop((i, k)).detach().requires_grad_(True)
                self._seed(step.number, step.micro_offset + k, i + 1)
                with torch.enable_grad():
                    y = self._run_block(block, x, cos, sin, train=True)
                y.backward(grads[k])
                grads[k] = x.grad
            self._finish(name, block, step, tally)

        tokens = int(self.fleet.sum(sum(x.numel() for x, _ in batches)))
        if self.lora is not None:
            self._update_adapters(step, tally)
        else:
            fault_point("backward.module")
            self._embeddings_backward(batches, grads, tied_grad, step, tally)
        grad_norm = tally.grad_norm() if self.lora is not None else self.replicas.finish(tally)
        return StepResult(loss=loss, targets=n_targets, tokens=tokens, grad_norm=grad_norm)

    def _finish(self, name: str, module: nn.Module | BlockTensors, step: Step, tally: Tally) -> None:
        """A module's backward is done: update it (full fine-tuning) or leave it (LoRA: frozen base). A block
        streamed by weight has had its linears updated during its backward: its norms are left."""
        if self.lora is not None:
            return
        grads = {k: p.grad for k, p in module.named_parameters()}
        if self.streams_by_weight(name):
            for key, g in grads.items():
                self._update_weight(name, key, g, step, tally)
            return
        self._update_module(name, grads, step, tally)

    def _update_weight(self, name: str, key: str, grad: torch.Tensor, step: Step, tally: Tally) -> None:
        """One weight of a block streamed by weight, its gradient final: updated and handed to the pipeline now
        (one rank: several stream whole blocks)."""
        self.updater.weight(name, key, grad, step, tally)

    def _update_module(self, name: str, grads: dict[str, torch.Tensor], step: Step, tally: Tally) -> None:
        """Sum the module's gradient over ranks onto its owner, which updates it, and the copies follow (several
        ranks: overlapped with the next module's backward, replicas.py)."""
        self.replicas.reduce(name, grads, step, lambda summed: self.updater.module(name, summed, step, tally))

    def _embeddings_backward(self, batches, grads, tied_grad, step: Step, tally: Tally) -> None:
        """The embeddings' gradient, only in the rows the step used; SGD updates and writes only those rows.

        The rows are gathered once (ids sorted), and each microbatch's lookup and dropout are re-run on
        them: the same values and masks as the forward pass, and a gradient of (used rows, dim)
        instead of (vocab, dim). A stateful optimizer (whose moments move every row), master weights
        and a tied output projection (a gradient in every row) take the dense path. Several ranks take the
        rows of the whole step (the union of theirs), so that their gradients sum row by row onto the owner.
        """
        sparse = not self.optimizer.stateful and tied_grad is None and not self.updater.master
        weight = self.replicas.weights("tok_embeddings")["weight"]
        ids = torch.unique(torch.cat([x.reshape(-1) for x, _ in batches]).to(self.device))
        if sparse:
            ids = self.replicas.union(ids)
        rows = weight[ids].to(self.cfg.compute_dtype).requires_grad_(True)
        p = self.cfg.dropout
        for k, (x, _) in enumerate(batches):
            self._seed(step.number, step.micro_offset + k, 0)
            with torch.enable_grad():
                index = torch.searchsorted(ids, x.to(self.device).contiguous())
                out = F.dropout(F.embedding(index, rows), p, training=p > 0)
            out.backward(grads[k])
        if sparse:  # (summed over ranks in fp32, as the dense gradient is)
            self.replicas.reduce("tok_embeddings", {"weight": rows.grad.float()}, step,
                                 lambda summed: self.updater.rows("tok_embeddings", "weight", ids, summed["weight"],
                                                                  step, tally))
            return
        dense = torch.zeros(weight.shape, dtype=torch.float32, device=self.device)
        dense.index_add_(0, ids, rows.grad.float())
        if tied_grad is not None:
            dense += tied_grad.float()
        self._update_module("tok_embeddings", {"weight": dense}, step, tally)

    def _update_adapters(self, step: Step, tally: Tally) -> None:
        """The resident adapters' gradients summed over ranks (every rank applies the same update), then updated."""
        params = self.lora.params
        grads = {k: p.grad.float() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
        grads = self.fleet.all_reduce(grads)
        for p in params.values():
            p.grad = None
        self.lora.optim_state = self.updater.adapters(params, self.lora.optim_state, grads, step, tally)
