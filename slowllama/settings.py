"""One settings dataclass per command; the CLI is generated from them (flags, help, defaults).

Precedence: dataclass defaults < config file (-c/--config, TOML) < command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

# --optimizer's names and what --help says of each, here so that building the parser (--help) needs no
# torch; tests/test_cli.py holds this table to optim/registry.py's optimizers
OPTIMIZER_SUMMARIES = {
    "sgd": "torch.optim.SGD without momentum",
    "adamw": "torch.optim.AdamW",
    "lion": "Lion, the sign of an interpolated momentum (half of AdamW's state; it wants a 3-10x lower --lr)",
}
# the learning rate a run takes without --lr: full fine-tuning's by optimizer, from the study on the tiny
# model (benchmarks/RESULTS.md, "Defaults for a first run"); LoRA's as before
DEFAULT_LR = {"sgd": 3e-2, "adamw": 3e-4, "lion": 1e-4}
DEFAULT_LORA_LR = 1e-4


def optimizer_names() -> list[str]:
    """The names --optimizer takes: full fine-tuning's default (sgd) first, then the others alphabetically."""
    return sorted(OPTIMIZER_SUMMARIES, key=lambda name: (name != "sgd", name))


def optimizers_help() -> str:
    return "; ".join(f"{name}: {OPTIMIZER_SUMMARIES[name]}" for name in optimizer_names())


# --help shows a command's flags in these groups, in this order (a field names its group; none: the
# general options)
GROUPS = {
    "data": "data",
    "schedule": "schedule (steps, batches, learning rate over the run)",
    "optimizer": "optimizer",
    "lora": "LoRA",
    "memory": "device and memory",
    "output": "output (logs, evals, prompts, saves)",
}


def opt(default: Any, help: str, *, choices=None, positional: bool = False, metavar: Optional[str] = None,
        short: Optional[str] = None, group: Optional[str] = None, required: bool = False):
    """A setting. required: the command needs it, on the command line or in the -c/--config file."""
    return field(default=default, metadata=dict(help=help, choices=choices, positional=positional,
                                                metavar=metavar, short=short, group=group, required=required))


@dataclass
class DeviceSettings:
    device: str = opt("auto", "where to compute: auto picks cuda, then mps, then cpu",
                      choices=["auto", "cpu", "cuda", "mps"], group="memory")
    compute_dtype: Optional[str] = opt(None, "compute dtype (default: fp32 on cpu, bf16 on cuda, fp16 on mps)",
                                       choices=["fp32", "bf16", "fp16"], group="memory")
    max_memory: str = opt("auto", "host memory for resident modules and cached activations "
                          "(e.g. 8G; auto: half of physical memory; on mps, where it covers the GPU too, 3/4 "
                          "leaving the system at least 4 GiB)", group="memory")
    max_gpu_memory: str = opt("auto", "GPU memory for resident modules and cached activations "
                              "(e.g. 20G; auto: 90%% of the GPU's; not on mps, whose GPU shares the host's memory)",
                              group="memory")
    stream_unit: str = opt("auto", "what streams through the device: whole blocks, or each weight of a block "
                           "(less memory, more reads); auto: blocks where the budgets allow",
                           choices=["auto", "block", "weight"], group="memory")
    debug: bool = opt(False, "show tracebacks of errors", group="output")


DATA_HELP = ("a .txt file (one sequence), a .jsonl file of records: {\"text\"}, {\"prompt\", \"completion\"} "
             "or {\"messages\": [{\"role\", \"content\"}, ...]}, or a folder as mlx-lm has it")


def pack_opt():
    return opt(True, "pack records into one stream cut into windows that cross record boundaries; --no-pack: "
               "one window per record, padded (or truncated) to --seq-len + 1", group="data")


def mask_prompt_opt():
    return opt(True, "loss only on completion / assistant tokens of prompt/completion and chat records "
               "(text records have no prompt)", group="data")


def skip_bad_lines_opt():
    return opt(False, "leave out .jsonl lines that are not valid records (counted in the log) instead of "
               "stopping at the first", group="data")


def compile_opt():
    return opt("auto", "run training's transformer blocks and optimizer updates through torch.compile, which fuses "
               "their elementwise work (on an H100 a 7B step at 4K tokens goes from 0.75 to 0.46 s; the first step "
               "pays a few seconds of compiling): auto: on cuda, falling back to eager if compiling fails; on: also "
               "on cpu (needs a C++ compiler); off. Blocks with dropout run eager",
               choices=["auto", "on", "off"], group="memory")


def recompute_opt():
    return opt("auto", "auto: where the whole model stays resident and memory is left beside it, the last blocks "
               "keep their forward pass's autograd graph, as many as fit, and skip the re-run in the backward (a "
               "third fewer FLOPs, the same result); always: every block is re-run in its backward (the least "
               "memory)", choices=["auto", "always"], group="memory")


@dataclass
class InitTinySettings:
    out: str = opt(None, "folder to write the tiny Meta-format model to", positional=True)
    text: Optional[str] = opt(None, "text to train the tokenizer on (default: chapter 1 of Alice in Wonderland, "
                              "shipped with slowllama)")
    layers: int = opt(4, "number of transformer blocks")
    dim: int = opt(128, "model width")
    shards: int = opt(2, "number of consolidated.NN.pth shards")
    dtype: str = opt("bf16", "dtype of the checkpoint", choices=["bf16", "fp16", "fp32"])
    seed: int = opt(0, "seed of the random weights")
    force: bool = opt(False, "replace OUT if it exists")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class PrepareSettings:
    src: str = opt(None, "a Meta Llama folder (params.json, tokenizer.model, consolidated.NN.pth) or a Hugging Face "
                   "folder (config.json, *.safetensors, tokenizer.json or tokenizer.model), told apart by their files",
                   positional=True)
    store: str = opt(None, "the store folder to create", positional=True)
    dtype: Optional[str] = opt(None, "dtype of the stored weights (default: the source's)",
                               choices=["bf16", "fp16", "fp32"])
    quantize: Optional[str] = opt(None, "store the blocks' linear weights (wq wk wv wo w1 w2 w3) quantized: nf4, "
                                  "QLoRA's 4-bit NormalFloat with one absmax per block of 64 (a read-only base for "
                                  "LoRA; the embeddings, norms and output layer stay in the store's dtype)")
    double_quant: bool = opt(False, "with --quantize nf4: quantize the absmax scales too (QLoRA's double "
                             "quantization: 8-bit in blocks of 256, mean subtracted)")
    force: bool = opt(False, "replace STORE if it exists")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class ExportSettings:
    store: str = opt(None, "the store to export", positional=True)
    out: str = opt(None, "the folder to write", positional=True)
    format: Optional[str] = opt(None, "output format (default: the source's; gguf: one file for llama.cpp, OUT/model.gguf "
                                "unless OUT ends in .gguf)", choices=["hf", "meta", "gguf"])
    shards: Optional[int] = opt(None, "number of output shards (default: the source's; hf: files of about equal size)")
    max_shard_size: Optional[str] = opt(None, "hf: largest output shard, e.g. 2G (default: the source's shards, "
                                        "else 5G)")
    dtype: Optional[str] = opt(None, "dtype of the written weights (default: each tensor's source dtype; gguf: "
                               "the store's); gguf also takes q8_0, and llama.cpp's names f16, f32",
                               choices=["bf16", "fp16", "fp32", "q8_0", "f16", "f32"])
    force: bool = opt(False, "replace OUT if it exists")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class SplitSettings:
    store: str = opt(None, "the whole store to split (left as it is)", positional=True)
    out: str = opt(None, "a new folder for the shares: OUT/host-0 ... OUT/host-{H-1}", positional=True)
    hosts: int = opt(2, "the number of hosts (torchrun --nnodes) the shares are for")
    nproc_per_node: int = opt(1, "the ranks on each host (torchrun --nproc-per-node) the modules are dealt to")
    host: Optional[int] = opt(None, "write only this host's share, OUT/host-R (e.g. onto a disk that goes to that "
                              "host; default: every host's)")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class JoinSettings:
    shares: str = opt(None, "the share folders of every host, separated by commas (one store at one step)",
                      positional=True)
    out: str = opt(None, "the whole store to write", positional=True)
    force: bool = opt(False, "replace OUT if it is a store")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class FuseSettings:
    store: str = opt(None, "the base store", positional=True)
    out: str = opt(None, "the folder to write the merged model to", positional=True)
    adapter_path: str = opt(None, "the LoRA adapter folder to merge in (slowllama's or PEFT's)", required=True)
    format: Optional[str] = opt(None, "output format (default: the source's; gguf: one file, as export writes it)",
                                choices=["hf", "meta", "gguf"])
    shards: Optional[int] = opt(None, "number of output shards (default: the source's)")
    dtype: Optional[str] = opt(None, "dtype of the written weights (default: each tensor's source dtype); gguf "
                               "also takes q8_0", choices=["bf16", "fp16", "fp32", "q8_0", "f16", "f32"])
    force: bool = opt(False, "replace OUT if it exists")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class EvalSettings(DeviceSettings):
    store: str = opt(None, "the store to evaluate; or a Meta or Hugging Face folder, prepared once into "
                     "FOLDER-store beside it; or a Hugging Face id org/name in the local Hugging Face cache",
                     positional=True)
    data: str = opt(None, "data to evaluate on: " + DATA_HELP + " (its test.jsonl)", required=True, group="data")
    seq_len: int = opt(128, "tokens per window")
    batch_size: int = opt(8, "windows per batch")
    pack: bool = pack_opt()
    mask_prompt: bool = mask_prompt_opt()
    skip_bad_lines: bool = skip_bad_lines_opt()
    json: bool = opt(False, "print the result as one JSON object on the last line")
    adapter_path: Optional[str] = opt(None, "LoRA adapters to apply to the store (slowllama's or PEFT's folder)")


@dataclass
class GenerateSettings(DeviceSettings):
    store: str = opt(None, "the store to generate from; or a Meta or Hugging Face folder, or a Hugging Face id "
                     "org/name in the local Hugging Face cache (prepared into a temporary store)", positional=True)
    prompt: str = opt("", "text to continue (with --chat: the user's message)")
    chat: bool = opt(False, "render --prompt as a user message with the model's chat template (from its "
                     "tokenizer_config.json), ready for the assistant's answer")
    max_new_tokens: int = opt(64, "tokens to generate")
    temperature: float = opt(0.0, "sampling temperature; 0 is greedy")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    seed: int = opt(0, "seed of the sampler")
    adapter_path: Optional[str] = opt(None, "LoRA adapters to apply to the store (slowllama's or PEFT's folder)")


@dataclass
class FinetuneSettings(DeviceSettings):
    store: str = opt(None, "the store to fine-tune (updated in place); or a Meta or Hugging Face folder, prepared "
                     "once into FOLDER-store beside it; or a Hugging Face id org/name in the local Hugging Face cache",
                     positional=True)
    data: str = opt(None, "training data: " + DATA_HELP + " (train.jsonl; valid.jsonl for validation)",
                    group="data", required=True)
    val_data: Optional[str] = opt(None, "validation data (.txt or .jsonl, read like --data) for eval_loss and "
                                  "eval_ppl", group="data")
    val_split: float = opt(0.0, "hold out this fraction of --data's records (of its windows for a single "
                           "sequence) for validation, drawn with --seed; 0: none", group="data")
    pack: bool = pack_opt()
    mask_prompt: bool = mask_prompt_opt()
    skip_bad_lines: bool = skip_bad_lines_opt()
    steps: int = opt(100, "total number of steps of the run; a finished run does nothing", group="schedule")
    batch_size: int = opt(4, "windows per microbatch", group="schedule")
    accumulate: int = opt(1, "microbatches per step (one load and one write of each module per step)",
                          group="schedule")
    seq_len: int = opt(128, "tokens per window", group="schedule")
    order: str = opt("random", "random: window starts drawn uniformly; sequential: eval's windows in order",
                     choices=["random", "sequential"], group="schedule")
    seed: int = opt(0, "seed of data order, dropout and --val-split", group="schedule")
    lr_schedule: str = opt("constant", "learning rate after warmup: constant, cosine or linear decay to 0",
                           choices=["constant", "cosine", "linear"], group="schedule")
    warmup_steps: int = opt(0, "linear warmup steps", group="schedule")
    new_run: bool = opt(False, "start a new run from the store's current weights instead of resuming",
                        group="schedule")
    optimizer: str = opt("auto", f"{optimizers_help()}; auto: sgd for full fine-tuning, adamw for LoRA",
                         choices=["auto", *optimizer_names()], group="optimizer")
    lr: Optional[float] = opt(None, "learning rate (default: by optimizer for full fine-tuning, "
                              + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                              + f", the rates at which the tiny model visibly learns in 100 steps; {DEFAULT_LORA_LR:g} "
                              "with LoRA. Pretrained models often want less)", group="optimizer")
    adam_betas: str = opt("0.9,0.999", "AdamW's (and Lion's) beta1,beta2", group="optimizer")
    adam_eps: float = opt(1e-8, "AdamW's eps", group="optimizer")
    weight_decay: float = opt(0.0, "the optimizer's decoupled weight decay (SGD has none)", group="optimizer")
    optim_dtype: str = opt("fp32", "dtype of the optimizer's state in the store (AdamW's moments, Lion's momentum)",
                           choices=["fp32", "bf16"], group="optimizer")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this (0: off)", group="optimizer")
    clip_norm: str = opt("previous", "which norm --grad-clip uses: previous (the last step's, free) or exact "
                         "(a gradient pass first: twice the compute and reads)", choices=["previous", "exact"],
                         group="optimizer")
    master_weights: str = opt("none", "fp32: keep an fp32 master copy of 16-bit weights in the store",
                              choices=["none", "fp32"], group="optimizer")
    rounding: str = opt("auto", "rounding of updated bf16 weights: stochastic (auto, when no master copy) "
                        "or nearest (fp16 stores: nearest)", choices=["auto", "stochastic", "nearest"],
                        group="optimizer")
    dropout: float = opt(0.0, "dropout probability (embeddings, attention, residual and FFN outputs)",
                         group="optimizer")
    lora_rank: int = opt(0, "train LoRA adapters of this rank on a read-only store instead of every weight (0: off)",
                         group="lora")
    lora_alpha: Optional[float] = opt(None, "LoRA scale numerator: the update is (alpha / rank) B A (default: 2 x rank)",
                                      group="lora")
    lora_dropout: float = opt(0.0, "dropout on the input of the LoRA path", group="lora")
    lora_targets: str = opt("wq,wv", "comma-separated linears to adapt: wq,wk,wv,wo,w1,w2,w3 or Hugging Face's "
                            "q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj", group="lora")
    adapter_path: Optional[str] = opt(None, "folder for the LoRA adapters (also in PEFT's format; a PEFT adapter "
                                      "folder trains on)", group="lora")
    compile: str = compile_opt()
    recompute: str = recompute_opt()
    dist_backend: str = opt("auto", "under torchrun: how the ranks talk (auto: nccl between GPUs, gloo on CPUs)",
                            choices=["auto", "nccl", "gloo"], group="memory")
    eval_every: int = opt(50, "evaluate (eval loss, prompt completion) every N steps and at the end; 0: only at "
                          "the end", group="output")
    prompt: Optional[str] = opt(None, "prompt whose greedy completion is shown at each eval", group="output")
    completion_tokens: int = opt(32, "tokens of the prompt completion", group="output")
    save_every: int = opt(100, "when the model fits in memory (it then stays resident), write the store every N "
                          "steps (a crash loses at most N); LoRA: keep a numbered snapshot of the adapters every N steps",
                          group="output")
    log_every: int = opt(1, "print one line of metrics every N steps (0: none)", group="output")
    json: bool = opt(False, "print one JSON object per step", group="output")


@dataclass
class PlotSettings:
    run: str = opt(None, "a store, or its run/ folder, whose metrics.jsonl to plot", positional=True)
    out: Optional[str] = opt(None, "the PNG to write (default: loss.png beside metrics.jsonl)")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class VerifySettings:
    store: str = opt(None, "the store (or LoRA adapter folder) to check", positional=True)
    json: bool = opt(False, "print the summary as one JSON object")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class BenchSettings(DeviceSettings):
    preset: str = opt("tiny", "model shape (Llama 2's, or a tiny one)", choices=["tiny", "7b", "13b", "70b"])
    layers: Optional[int] = opt(None, "cut the preset to this many transformer blocks (to fit a small disk)")
    dtype: str = opt("bf16", "dtype of the random store's weights", choices=["bf16", "fp16", "fp32"])
    steps: int = opt(3, "training steps to time; the first is warm-up, left out of the medians")
    batch_size: int = opt(16, "windows per microbatch")
    accumulate: int = opt(1, "microbatches per step")
    seq_len: int = opt(256, "tokens per window")
    optimizer: str = opt("sgd", optimizers_help(), choices=optimizer_names())
    optim_dtype: str = opt("fp32", "dtype of the optimizer's state (AdamW's moments; plain PyTorch's follow the bf16 "
                           "weights: bf16)", choices=["fp32", "bf16"])
    rounding: str = opt("auto", "rounding of updated bf16 weights: auto (stochastic, as finetune's default) or "
                        "nearest (plain PyTorch's arithmetic)", choices=["auto", "stochastic", "nearest"])
    lr: float = opt(1e-5, "learning rate")
    lora_rank: int = opt(0, "LoRA rank (0: full fine-tuning); the adapters train with AdamW")
    quantize: Optional[str] = opt(None, "a random store whose blocks' linear weights are quantized: nf4 (QLoRA's "
                                  "base; with --lora-rank only)")
    double_quant: bool = opt(False, "with --quantize nf4: the absmax scales quantized too")
    lora_targets: str = opt("wq,wv", "comma-separated linears to adapt: wq,wk,wv,wo,w1,w2,w3 (or q_proj...)")
    save_every: int = opt(1, "when the model fits in memory (it then stays resident), commit the store every N steps")
    store_dir: Optional[str] = opt(None, "the random store's folder: reused if it holds one of this shape and dtype, "
                                   "kept afterwards (default: a temporary folder here, removed at the end)")
    drop_cache: bool = opt(False, "evict module files from the page cache after each read and write, so that "
                           "reads come from the disk (else storage figures are page-cache figures)")
    probe_size: str = opt("auto", "size of the file that measures the disk's bandwidth (auto: the store's size, "
                          "at least 64M and at most 1G)")
    prefetch: bool = opt(True, "read the next modules while the current one computes (off: to measure the gain)")
    async_writes: bool = opt(True, "write updated modules in the background (off: to measure the gain)")
    compile: str = compile_opt()
    recompute: str = recompute_opt()
    seed: int = opt(0, "seed of the random weights and tokens")
    profile: Optional[str] = opt(None, "write torch.profiler's tables of the steps after the first (operators and "
                                 "kernels by device and host time) to this file; those steps run slower")
    json: bool = opt(False, "print one JSON object per step, then a summary object")


@dataclass
class PlanSettings:
    model: str = opt(None, "a store, a Meta folder (params.json), a Hugging Face folder (config.json is enough: "
                     "plan before the download) or a preset: tiny, 7b, 13b, 70b", positional=True)
    memory: Optional[str] = opt(None, "the --max-memory to check (e.g. 8G; on unified memory the whole budget); "
                                "default: none, only the minimums")
    gpu_memory: Optional[str] = opt(None, "the --max-gpu-memory to check (e.g. 16G; a GPU of its own only); default: "
                                    "none, only the minimums (with --memory on cuda: 90%% of this machine's GPU)")
    batch_size: int = opt(4, "windows per microbatch (finetune's --batch-size)")
    seq_len: int = opt(128, "tokens per window")
    accumulate: int = opt(1, "microbatches per step")
    optimizer: Optional[str] = opt(None, "plan full fine-tuning with this optimizer too (SGD and AdamW always are)",
                                   choices=optimizer_names())
    lora_rank: int = opt(8, "rank of the LoRA row (its adapters train with AdamW)")
    lora_targets: str = opt("wq,wv", "comma-separated linears LoRA adapts: wq,wk,wv,wo,w1,w2,w3 (or q_proj...)")
    master_weights: str = opt("none", "fp32: full fine-tuning keeps an fp32 master copy of 16-bit weights",
                              choices=["none", "fp32"])
    unified: bool = opt(False, "host and GPU share one memory (Apple silicon): one budget, --memory, covers both")
    device: str = opt("auto", "the device to plan for (nothing runs on it): auto: this machine's (cuda, then mps, "
                      "then cpu)", choices=["auto", "cpu", "cuda", "mps"])
    compute_dtype: Optional[str] = opt(None, "compute dtype (default: fp32 on cpu, bf16 on cuda, fp16 on mps)",
                                       choices=["fp32", "bf16", "fp16"])
    dtype: Optional[str] = opt(None, "dtype of the store's weights (default: the store's, the source's, bf16 for "
                               "a preset)", choices=["bf16", "fp16", "fp32"])
    layers: Optional[int] = opt(None, "cut the model to this many transformer blocks (as bench --layers does)")
    quantize: Optional[str] = opt(None, "plan for a store prepared with --quantize nf4 (LoRA on a read-only NF4 "
                                  "base; default: the store's own)")
    double_quant: bool = opt(False, "with --quantize nf4: as prepared with --double-quant")
    json: bool = opt(False, "print the plan as one JSON object")
    debug: bool = opt(False, "show tracebacks of errors")


COMMANDS = {
    "init-tiny": (InitTinySettings, "write a small random Llama in Meta format (no download needed)"),
    "prepare": (PrepareSettings, "stream a Meta or Hugging Face checkpoint into a store (one file per module)"),
    "export": (ExportSettings, "write a store as a Meta or Hugging Face folder (default: the source's format)"),
    "eval": (EvalSettings, "eval loss and perplexity of a store on a .txt or .jsonl file"),
    "generate": (GenerateSettings, "generate text from a store, streaming its modules"),
    "finetune": (FinetuneSettings, "fine-tune a store in place, or LoRA adapters on it"),
    "split": (SplitSettings, "split a store into shares for several hosts, each with its own ranks' module files"),
    "join": (JoinSettings, "join the shares of a split store (after training on several hosts) into one store"),
    "fuse": (FuseSettings, "write a store with LoRA adapters merged in, in the source's format"),
    "plot": (PlotSettings, "plot the train and eval loss of a store's run (needs matplotlib)"),
    "verify": (VerifySettings, "check every file of a store: sizes, checksums, shapes, no links outside it"),
    "bench": (BenchSettings, "time training steps on a random-weight store against the machine's measured limits"),
    "plan": (PlanSettings, "will it fit? the memory, disk, traffic and time of a step, without running anything"),
}


def to_dict(settings) -> dict:
    return dataclasses.asdict(settings)
