"""PyTorch FSDP2 with CPU offload on a random-weight Llama, world size 1: the reference of issue 5.

Every decoder block is sharded on its own (fully_shard), then the root (embeddings, final norm,
output), all with CPUOffloadPolicy: parameters, gradients and AdamW's state live in pinned host
memory; each group's parameters are copied to the GPU for its forward and again for its backward,
its gradients are copied back, and AdamW steps on the CPU. The whole model and its optimizer
state must fit in host RAM (Llama 2 7B in bf16 with bf16 AdamW state: about 60 GB), which is
where slowllama's offloading from SSD goes further.

    python benchmarks/fsdp2_offload.py                      # Llama 2 7B shape, AdamW, 16 x 256
    python benchmarks/fsdp2_offload.py --layers 8 --json    # a cut shape, one JSON object at the end

Needs one CUDA GPU. Prints s/step, tokens/s, peak host RSS and peak GPU memory; the first
--warmup steps are left out of the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slowllama.bench.roofline import step_flops  # noqa: E402
from slowllama.model.args import DTYPES  # noqa: E402
from slowllama.model.families import preset_args  # noqa: E402
from slowllama.model.layers import Transformer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FSDP2 CPU-offload training steps on a random-weight Llama (1 GPU)")
    p.add_argument("--preset", default="7b", choices=["tiny", "7b", "13b", "70b"], help="model shape (default: 7b)")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many blocks")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW's learning rate")
    p.add_argument("--param-dtype", default="bf16", choices=["bf16", "fp32"],
                   help="dtype of the parameters and AdamW's state; compute is bf16 either way (default: bf16)")
    p.add_argument("--adam", default="default", choices=["default", "foreach", "fused"],
                   help="torch.optim.AdamW's implementation (default: torch's own choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_host_rss() -> int:
    """Peak resident set size of this process (pinned host memory included), bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(args, param_dtype: torch.dtype, mesh):
    """The Transformer built on 'meta', sharded block by block then at the root with CPU offload,
    then materialized in host memory and filled with N(0, 0.02) weights and unit norms."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):
        model = Transformer(args).to(param_dtype)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=param_dtype)
    offload = CPUOffloadPolicy(pin_memory=True)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # world size 1: the whole tensor
            if name.endswith("norm.weight"):
                local.fill_(1.0)
            else:
                local.copy_(torch.randn(local.shape, generator=g) * 0.02)
    return model


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print("fsdp2_offload.py: error: needs a CUDA GPU (FSDP2's CPU offload computes on the GPU); none is available",
              file=sys.stderr)
        return 2
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    args = preset_args(a.preset, **({"n_layers": a.layers} if a.layers else {}))
    if a.seq_len > args.max_seq_len:
        print(f"fsdp2_offload.py: --seq-len {a.seq_len} is above the model's max_seq_len {args.max_seq_len}",
              file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        t0 = time.perf_counter()
        model = build_model(args, DTYPES[a.param_dtype], mesh)
        adam = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[a.adam]
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, **adam)
        print(f"built and sharded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        times = []
        for i in range(a.warmup + a.steps):
            stream = torch.randint(args.vocab_size, (a.batch_size, a.seq_len + 1), generator=g).cuda()
            x, y = stream[:, :-1], stream[:, 1:]
            if i == a.warmup:
                torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, args.vocab_size), y.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            timed = i >= a.warmup
            if timed:
                times.append(seconds)
            print(f"{'step' if timed else 'warm-up'} {i + 1}: {seconds:.3f} s, loss {loss.item():.4f}", file=sys.stderr)
        tokens = a.batch_size * a.seq_len
        median = statistics.median(times)
        flops = step_flops(args, a.batch_size, a.seq_len).model
        result = {"what": "fsdp2 cpu offload", "preset": a.preset, "layers": args.n_layers,
                  "param_dtype": a.param_dtype, "adam": a.adam, "batch_size": a.batch_size, "seq_len": a.seq_len,
                  "timed_steps": len(times), "seconds_per_step": median, "tokens_per_second": tokens / median,
                  "model_tflops": flops / median / 1e12, "peak_host_rss_bytes": peak_host_rss(),
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name()}
        if a.json:
            print(json.dumps(result))
        else:
            print(f"FSDP2 CPU offload, {a.preset} shape with {args.n_layers} layers, {a.param_dtype} params, "
                  f"AdamW ({a.adam}), {a.batch_size} x {a.seq_len}: median {median:.3f} s/step over {len(times)} "
                  f"steps, {tokens / median:.0f} tokens/s, {result['model_tflops']:.1f} TFLOP/s model, peak host "
                  f"RSS {result['peak_host_rss_bytes'] / 1e9:.2f} GB, peak GPU {result['peak_gpu_bytes'] / 1e9:.2f} GB "
                  f"on {result['device']}")
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
