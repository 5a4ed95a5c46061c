"""Profile resident training steps of a random Llama-2-7B-shaped model cut to a few layers (torch.profiler).

    python benchmarks/profile_step.py [--layers 8] [--optimizer sgd|adamw] [--steps 3] [--gpu-budget GB]
                                      [--compile auto|on|off] [--rounding stochastic|nearest] [--optim-dtype fp32|bf16]
                                      [--recompute auto|always] [--out DIR]

Prints the top operators by GPU time and by CPU time, and the share of the step the GPU was busy,
so that the largest costs of a step can be found and fixed. Needs a CUDA GPU.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from slowllama.bench.synthetic import bench_args, random_batches, write_random_store
from slowllama.engine.chain import EngineConfig, OffloadedModel
from slowllama.optim.registry import make_optimizer
from slowllama.store.store import Store
from slowllama.train.checkpoints import NoCheckpoint
from slowllama.train.trainer import Trainer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gpu-budget", type=float, default=None,
                   help="GB of GPU memory for resident modules (default: all); the rest stay in host RAM")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="blocks and updates through torch.compile (finetune's --compile; auto: on, on cuda)")
    p.add_argument("--rounding", default="stochastic", choices=["stochastic", "nearest"],
                   help="rounding of the updated bf16 weights (finetune's default: stochastic)")
    p.add_argument("--optim-dtype", default="fp32", choices=["fp32", "bf16"], help="AdamW's moments")
    p.add_argument("--recompute", default="auto", choices=["auto", "always"],
                   help="auto: blocks keep their forward graph where it fits (finetune's default)")
    p.add_argument("--out", default=None, help="folder for the Chrome trace")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_step.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    args = bench_args("7b", a.layers)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = write_random_store(Path(tmp) / "store", args, torch.bfloat16, log=lambda m: None)
        store = Store.open(path, writable=True, log=lambda m: None)
        budgets = {}
        if a.gpu_budget is not None:  # modules beyond it in host RAM; activations on the GPU
            budgets = dict(device_budget=int(a.gpu_budget * 1e9), host_budget=1 << 40)
        cfg = EngineConfig(torch.device("cuda"), torch.bfloat16, stochastic_rounding=a.rounding == "stochastic",
                           compile=a.compile, keep_graphs=a.recompute == "auto", **budgets)
        optimizer = make_optimizer(a.optimizer, state_dtype=torch.bfloat16 if a.optim_dtype == "bf16" else None)
        engine = OffloadedModel(store, cfg, optimizer=optimizer)
        # resident (the model fits these budgets) and never committed: the compute path alone
        trainer = Trainer(engine, NoCheckpoint(), save_every=1 << 30, log=lambda m: None)

        def step(number):
            trainer.step(number, random_batches(args, number, a.batch_size, 1, a.seq_len), 1e-5)
            torch.cuda.synchronize()

        step(1)  # reads the store, allocates
        step(2)
        t0 = time.perf_counter()
        for n in range(a.steps):
            step(3 + n)
        print(f"{(time.perf_counter() - t0) / a.steps:.3f} s/step without the profiler")
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA], with_stack=True) as prof:
            for n in range(a.steps):
                step(3 + n)
        seconds = (time.perf_counter() - t0) / a.steps
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e6 / a.steps
        print(f"{a.layers} layers, {a.optimizer} ({a.optim_dtype} state), {a.batch_size}x{a.seq_len}, compile "
              f"{a.compile}, rounding {a.rounding}, recompute {a.recompute}, GPU budget "
              f"{a.gpu_budget} GB: {seconds:.3f} s/step under the profiler,"
              f" GPU busy {gpu:.3f} s/step ({100 * gpu / seconds:.0f}%)")
        print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90))
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        # where the host waits for the GPU: each place that synchronizes, by its Python stack
        syncs = [e for e in prof.key_averages(group_by_stack_n=4)
                 if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")]
        for e in sorted(syncs, key=lambda e: -e.count):
            print(f"{e.key} x{e.count / a.steps:.0f}/step, {e.cpu_time_total / 1e3 / a.steps:.1f} ms/step:",
                  " <- ".join(e.stack[:4]))
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(a.out) / "trace.json"))
        engine.pipe.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
