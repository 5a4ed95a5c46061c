"""Fine-tune a model with slowllama, the way the original slowllama's finetune.py did.

    python finetune.py                          # the built-in tiny model on test_data/alice.txt
    python finetune.py MODEL [finetune flags]   # MODEL: a store, a Meta or Hugging Face folder, or a hub id

With no arguments it writes a small random Llama to ./tiny, prepares ./tiny-store from it (afresh
each time), prints the greedy completion of the prompt, fine-tunes with AdamW and prints the
completion again. With MODEL, a Meta or Hugging Face folder is prepared once into <folder>-store beside it, a
Hugging Face id in the local cache into ./<name>-store, as `slowllama finetune` does; the flags are those of
`slowllama finetune` (default data: test_data/alice.txt).
"""

import sys
from pathlib import Path

from slowllama.cli import main

HERE = Path(__file__).resolve().parent
PROMPT = "Alice drank from the bottle which had a label"
ALICE = HERE / "test_data" / "alice.txt"
TINY_RUN = ["--steps", "300", "--batch-size", "8", "--seq-len", "128", "--optimizer", "adamw", "--lr", "3e-3",
            "--warmup-steps", "20", "--lr-schedule", "cosine", "--eval-every", "100", "--log-every", "25",
            "--device", "cpu"]


def run(*args: str) -> None:
    code = main([str(a) for a in args])
    if code:
        sys.exit(code)


def completion(store: Path, title: str) -> None:
    print(f"\n{title}:", flush=True)
    run("generate", store, "--prompt", PROMPT, "--max-new-tokens", "40", "--device", "cpu")


def tiny_demo() -> None:
    tiny, store = Path("tiny"), Path("tiny-store")
    if not (tiny / "params.json").exists():
        run("init-tiny", tiny, "--force")
    run("prepare", tiny, store, "--force")
    completion(store, "before fine-tuning")
    print(flush=True)
    run("finetune", store, "--data", ALICE, "--prompt", PROMPT, *TINY_RUN)
    completion(store, "after fine-tuning")


def model_run(model: str, flags: list[str]) -> None:
    """`slowllama finetune MODEL`: a store, or a folder or hub id it prepares once into a store."""
    if "--data" not in flags:
        flags = ["--data", str(ALICE), "--prompt", PROMPT, *flags]
    run("finetune", model, *flags)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        tiny_demo()
    elif sys.argv[1] in ("-h", "--help"):
        print(__doc__)
    else:
        model_run(sys.argv[1], sys.argv[2:])
