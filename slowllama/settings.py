"""One settings dataclass per command; the CLI is generated from them (flags, help, defaults).

Precedence: dataclass defaults < config file (-c/--config, TOML) < command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from slowllama.errors import SlowllamaError
from slowllama.model.args import dtype_from_name
from slowllama.optim.registry import optimizer_names, optimizers_help


def opt(default: Any, help: str, *, choices=None, positional: bool = False, metavar: Optional[str] = None,
        short: Optional[str] = None):
    return field(default=default, metadata=dict(help=help, choices=choices, positional=positional,
                                                metavar=metavar, short=short))


@dataclass
class DeviceSettings:
    device: str = opt("auto", "where to compute: auto picks cuda, then mps, then cpu",
                      choices=["auto", "cpu", "cuda", "mps"])
    compute_dtype: Optional[str] = opt(None, "compute dtype (default: fp32 on cpu, bf16 on cuda, fp16 on mps)",
                                       choices=["fp32", "bf16", "fp16"])
    max_memory: str = opt("auto", "host memory for resident modules and cached activations "
                          "(e.g. 8G; auto: half of physical memory; on mps, where it covers the GPU too, 3/4 "
                          "leaving the system at least 4 GiB)")
    max_gpu_memory: str = opt("auto", "GPU memory for resident modules and cached activations "
                              "(e.g. 20G; auto: 90%% of the GPU's; not on mps, whose GPU shares the host's memory)")
    stream_unit: str = opt("auto", "what streams through the device: whole blocks, or each weight of a block "
                           "(less memory, more reads); auto: blocks where the budgets allow",
                           choices=["auto", "block", "weight"])
    debug: bool = opt(False, "show tracebacks of errors")


DATA_HELP = ("a .txt file (one sequence) or a .jsonl file of records: {\"text\"}, {\"prompt\", \"completion\"} "
             "or {\"messages\": [{\"role\", \"content\"}, ...]}")


def pack_opt():
    return opt(True, "pack records into one stream cut into windows that cross record boundaries; --no-pack: "
               "one window per record, padded (or truncated) to --seq-len + 1")


def mask_prompt_opt():
    return opt(True, "loss only on completion / assistant tokens of prompt/completion and chat records "
               "(text records have no prompt)")


def skip_bad_lines_opt():
    return opt(False, "leave out .jsonl lines that are not valid records (counted in the log) instead of "
               "stopping at the first")


def compile_opt():
    return opt("auto", "run training's transformer blocks and optimizer updates through torch.compile, which fuses "
               "their elementwise work (on an H100 a 7B step at 4K tokens goes from 0.75 to 0.46 s; the first step "
               "pays a few seconds of compiling): auto: on cuda, falling back to eager if compiling fails; on: also "
               "on cpu (needs a C++ compiler); off. Blocks with dropout or LoRA run eager",
               choices=["auto", "on", "off"])


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
    force: bool = opt(False, "replace STORE if it exists")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class ExportSettings:
    store: str = opt(None, "the store to export", positional=True)
    out: str = opt(None, "the folder to write", positional=True)
    format: Optional[str] = opt(None, "output format (default: the source's)", choices=["hf", "meta"])
    shards: Optional[int] = opt(None, "number of output shards (default: the source's; hf: files of about equal size)")
    max_shard_size: Optional[str] = opt(None, "hf: largest output shard, e.g. 2G (default: the source's shards, "
                                        "else 5G)")
    dtype: Optional[str] = opt(None, "dtype of the written weights (default: each tensor's source dtype)",
                               choices=["bf16", "fp16", "fp32"])
    force: bool = opt(False, "replace OUT if it exists")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class FuseSettings:
    store: str = opt(None, "the base store", positional=True)
    out: str = opt(None, "the folder to write the merged model to", positional=True)
    adapter_path: str = opt(None, "the LoRA adapter folder to merge in")
    shards: Optional[int] = opt(None, "number of output shards (default: the source's)")
    dtype: Optional[str] = opt(None, "dtype of the written weights (default: each tensor's source dtype)",
                               choices=["bf16", "fp16", "fp32"])
    force: bool = opt(False, "replace OUT if it exists")
    debug: bool = opt(False, "show tracebacks of errors")


@dataclass
class EvalSettings(DeviceSettings):
    store: str = opt(None, "the store to evaluate", positional=True)
    data: str = opt(None, "data to evaluate on: " + DATA_HELP)
    seq_len: int = opt(128, "tokens per window")
    batch_size: int = opt(8, "windows per batch")
    pack: bool = pack_opt()
    mask_prompt: bool = mask_prompt_opt()
    skip_bad_lines: bool = skip_bad_lines_opt()
    json: bool = opt(False, "print the result as one JSON object on the last line")
    adapter_path: Optional[str] = opt(None, "LoRA adapters to apply to the store")


@dataclass
class GenerateSettings(DeviceSettings):
    store: str = opt(None, "the store (or a Meta or Hugging Face folder) to generate from", positional=True)
    prompt: str = opt("", "text to continue")
    max_new_tokens: int = opt(64, "tokens to generate")
    temperature: float = opt(0.0, "sampling temperature; 0 is greedy")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    seed: int = opt(0, "seed of the sampler")
    adapter_path: Optional[str] = opt(None, "LoRA adapters to apply to the store")


@dataclass
class FinetuneSettings(DeviceSettings):
    store: str = opt(None, "the store to fine-tune (updated in place)", positional=True)
    data: str = opt(None, "training data: " + DATA_HELP)
    pack: bool = pack_opt()
    mask_prompt: bool = mask_prompt_opt()
    skip_bad_lines: bool = skip_bad_lines_opt()
    steps: int = opt(100, "total number of steps of the run; a finished run does nothing")
    batch_size: int = opt(4, "windows per microbatch")
    accumulate: int = opt(1, "microbatches per step (one load and one write of each module per step)")
    seq_len: int = opt(128, "tokens per window")
    lr: float = opt(1e-4, "learning rate")
    optimizer: str = opt("auto", f"{optimizers_help()}; auto: sgd for full fine-tuning, adamw for LoRA",
                         choices=["auto", *optimizer_names()])
    adam_betas: str = opt("0.9,0.999", "AdamW's (and Lion's) beta1,beta2")
    adam_eps: float = opt(1e-8, "AdamW's eps")
    weight_decay: float = opt(0.0, "the optimizer's decoupled weight decay (SGD has none)")
    optim_dtype: str = opt("fp32", "dtype of the optimizer's state in the store (AdamW's moments, Lion's momentum)",
                           choices=["fp32", "bf16"])
    lr_schedule: str = opt("constant", "learning rate after warmup: constant, cosine or linear decay to 0",
                           choices=["constant", "cosine", "linear"])
    warmup_steps: int = opt(0, "linear warmup steps")
    grad_clip: float = opt(0.0, "clip the global gradient norm to this (0: off)")
    clip_norm: str = opt("previous", "which norm --grad-clip uses: previous (the last step's, free) or exact "
                         "(a gradient pass first: twice the compute and reads)", choices=["previous", "exact"])
    master_weights: str = opt("none", "fp32: keep an fp32 master copy of 16-bit weights in the store",
                              choices=["none", "fp32"])
    rounding: str = opt("auto", "rounding of updated bf16 weights: stochastic (auto, when no master copy) "
                        "or nearest (fp16 stores: nearest)", choices=["auto", "stochastic", "nearest"])
    dropout: float = opt(0.0, "dropout probability (embeddings, attention, residual and FFN outputs)")
    seed: int = opt(0, "seed of data order, dropout and --val-split")
    order: str = opt("random", "random: window starts drawn uniformly; sequential: eval's windows in order",
                     choices=["random", "sequential"])
    eval_every: int = opt(50, "evaluate (eval loss, prompt completion) every N steps and at the end; 0: only at "
                          "the end")
    val_data: Optional[str] = opt(None, "validation data (.txt or .jsonl, read like --data) for eval_loss and "
                                  "eval_ppl")
    val_split: float = opt(0.0, "hold out this fraction of --data's records (of its windows for a single "
                           "sequence) for validation, drawn with --seed; 0: none")
    prompt: Optional[str] = opt(None, "prompt whose greedy completion is shown at each eval")
    completion_tokens: int = opt(32, "tokens of the prompt completion")
    lora_rank: int = opt(0, "train LoRA adapters of this rank on a read-only store instead of every weight (0: off)")
    lora_alpha: Optional[float] = opt(None, "LoRA scale numerator: the update is (alpha / rank) B A (default: 2 x rank)")
    lora_dropout: float = opt(0.0, "dropout on the input of the LoRA path")
    lora_targets: str = opt("wq,wv", "comma-separated linears to adapt: wq,wk,wv,wo,w1,w2,w3")
    adapter_path: Optional[str] = opt(None, "folder for the LoRA adapters (adapters.safetensors, adapter_config.json)")
    save_every: int = opt(100, "when the model fits in memory (it then stays resident), write the store every N "
                          "steps (a crash loses at most N); LoRA: keep a numbered snapshot of the adapters every N steps")
    log_every: int = opt(1, "print one line of metrics every N steps (0: none)")
    new_run: bool = opt(False, "start a new run from the store's current weights instead of resuming")
    compile: str = compile_opt()
    dist_backend: str = opt("auto", "under torchrun: how the ranks talk (auto: nccl between GPUs, gloo on CPUs)",
                            choices=["auto", "nccl", "gloo"])
    json: bool = opt(False, "print one JSON object per step")


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
    optimizer: str = opt("sgd", f"{optimizers_help()} (the state in the store, fp32)", choices=optimizer_names())
    lr: float = opt(1e-5, "learning rate")
    lora_rank: int = opt(0, "LoRA rank (0: full fine-tuning); the adapters train with AdamW")
    lora_targets: str = opt("wq,wv", "comma-separated linears to adapt: wq,wk,wv,wo,w1,w2,w3")
    save_every: int = opt(1, "when the model fits in memory (it then stays resident), commit the store every N steps")
    store_dir: Optional[str] = opt(None, "the random store's folder: reused if it holds one of this shape and dtype, "
                                   "kept afterwards (default: a temporary folder here, removed at the end)")
    drop_cache: bool = opt(False, "evict module files from the page cache after each read and write, so that "
                           "reads come from the disk (else storage figures are page-cache figures)")
    probe_size: str = opt("1G", "size of the file that measures the disk's bandwidth")
    prefetch: bool = opt(True, "read the next modules while the current one computes (off: to measure the gain)")
    async_writes: bool = opt(True, "write updated modules in the background (off: to measure the gain)")
    compile: str = compile_opt()
    seed: int = opt(0, "seed of the random weights and tokens")
    json: bool = opt(False, "print one JSON object per step, then a summary object")


COMMANDS = {
    "init-tiny": (InitTinySettings, "write a small random Llama in Meta format (no download needed)"),
    "prepare": (PrepareSettings, "stream a Meta or Hugging Face checkpoint into a store (one file per module)"),
    "export": (ExportSettings, "write a store as a Meta or Hugging Face folder (default: the source's format)"),
    "eval": (EvalSettings, "eval loss and perplexity of a store on a .txt or .jsonl file"),
    "generate": (GenerateSettings, "generate text from a store, streaming its modules"),
    "finetune": (FinetuneSettings, "fine-tune a store in place, or LoRA adapters on it"),
    "fuse": (FuseSettings, "write a store with LoRA adapters merged in, in the source's format"),
    "plot": (PlotSettings, "plot the train and eval loss of a store's run (needs matplotlib)"),
    "verify": (VerifySettings, "check every file of a store: sizes, checksums, shapes, no links outside it"),
    "bench": (BenchSettings, "time training steps on a random-weight store against the machine's measured limits"),
}


def resolve_device(settings) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype a command runs with (auto: cuda, then mps, then cpu)."""
    name = settings.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlowllamaError("--device cuda: no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SlowllamaError("--device mps: MPS is not available")
    default = {"cpu": "fp32", "cuda": "bf16", "mps": "fp16"}[name]
    dtype = dtype_from_name(settings.compute_dtype or default, "--compute-dtype")
    if name == "mps" and dtype == torch.bfloat16:
        raise SlowllamaError("--compute-dtype bf16: not supported on mps (use fp16 or fp32)")
    return torch.device(name), dtype


def to_dict(settings) -> dict:
    return dataclasses.asdict(settings)
