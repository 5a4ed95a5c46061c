"""In-memory references for resident training steps on one GPU, the rows slowllama is compared with (issue 16).

    python benchmarks/reference_inmemory.py peft-lora    # transformers + PEFT: LoRA r4 on q_proj,v_proj, 16 x 128
    python benchmarks/reference_inmemory.py sgd          # plain PyTorch, whole model on the GPU: SGD, 16 x 256
    python benchmarks/reference_inmemory.py adamw        # ... fused AdamW, 16 x 256
    options: --impl hf|slowllama --preset 7b --layers N --batch-size B --seq-len S --warmup 2 --steps 5 --json

The model is a random-weight Llama of the preset's shape in bf16, all of it on the GPU, no
offload, no activation checkpointing, eager (no torch.compile). peft-lora: Hugging Face's
LlamaForCausalLM (attention through SDPA) wrapped by PEFT's get_peft_model, AdamW (fused) on the
adapters. sgd and adamw: with --impl hf the same LlamaForCausalLM, with --impl slowllama our own
plain nn.Module Transformer (model/layers.py, attention through SDPA), trained by ordinary
autograd, torch.optim.SGD (foreach) or torch.optim.AdamW (fused), weights, gradients and moments
in bf16 as plain PyTorch keeps them. Random tokens, every target counted.
Prints s/step (median of the timed steps) and peak GPU memory; --json one object at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slowllama.bench.synthetic import random_batches  # noqa: E402
from slowllama.model.families import preset_args  # noqa: E402
from slowllama.model.layers import Transformer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["peft-lora", "sgd", "adamw"])
    p.add_argument("--impl", default="hf", choices=["hf", "slowllama"], help="the model's code (sgd, adamw)")
    p.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of the script)")
    p.add_argument("--preset", default="7b", choices=["tiny", "7b", "13b", "70b"])
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many blocks")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="default: 128 for peft-lora, 256 otherwise")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (peft-lora)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", action="store_true", help="then 2 more steps under torch.profiler: the top kernels")
    return p.parse_args(argv)


def hf_config(args):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                       num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                       num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                       max_position_embeddings=args.max_seq_len, tie_word_embeddings=False,
                       attn_implementation="sdpa")


def build(a, args):
    """(a function of (inputs, targets) -> loss, the optimizer)."""
    if a.mode == "peft-lora" or a.impl == "hf":
        from transformers import LlamaForCausalLM
        with torch.device(a.device):
            hf = LlamaForCausalLM(hf_config(args)).to(torch.bfloat16)
        model = hf
        if a.mode == "peft-lora":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(hf, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))

        def run(x):
            return model(input_ids=x).logits
    else:
        with torch.device(a.device):
            model = Transformer(args).to(torch.bfloat16)
        for p in model.parameters():  # built uninitialized (torch.empty): a Llama-like random init
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        run = model
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(trainable, lr=a.lr, foreach=True) if a.mode == "sgd"
           else torch.optim.AdamW(trainable, lr=a.lr, fused=True))

    def loss_of(x, y):
        return F.cross_entropy(run(x).float().reshape(-1, args.vocab_size), y.reshape(-1))
    return loss_of, opt


def main(argv=None) -> int:
    a = parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("reference_inmemory.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seq_len = a.seq_len or (128 if a.mode == "peft-lora" else 256)
    args = preset_args(a.preset, **({"n_layers": a.layers} if a.layers else {}))
    torch.manual_seed(0)
    loss_of, opt = build(a, args)
    times = []

    def step(i):
        (x, y), = random_batches(args, i, a.batch_size, 1, seq_len)
        x, y = x.to(a.device), y.to(a.device)
        sync()
        t0 = time.perf_counter()
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, loss

    for i in range(a.warmup + a.steps):
        seconds, loss = step(i)
        if i >= a.warmup:
            times.append(seconds)
        print(f"{'step' if i >= a.warmup else 'warm-up'} {i + 1}: {seconds:.4f} s, loss {loss.item():.4f}",
              file=sys.stderr)
    if a.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            seconds = sum(step(a.warmup + a.steps + i)[0] for i in range(2)) / 2
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e6 / 2
        print(f"{seconds:.3f} s/step under the profiler, GPU busy {gpu:.3f} s/step", file=sys.stderr)
        print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30,
                           max_name_column_width=90), file=sys.stderr)
    result = {"mode": a.mode, "impl": "hf" if a.mode == "peft-lora" else a.impl, "preset": a.preset, "layers": args.n_layers, "batch_size": a.batch_size,
              "seq_len": seq_len, "median_seconds": statistics.median(times), "steps": times,
              "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None, "torch": torch.__version__}
    print(json.dumps(result) if a.json else
          f"{a.mode} ({result['impl']}): {result['median_seconds']:.4f} s/step, peak GPU "
          f"{(result['peak_gpu_bytes'] or 0) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
