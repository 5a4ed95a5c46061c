"""Fine-tune a model with slowllama, the way the original slowllama's finetune.py did.

    python finetune.py                          # the built-in tiny model on test_data/alice.txt
    python finetune.py MODEL [finetune flags]   # MODEL: a slowllama store, a Meta or a Hugging Face folder

With no arguments it writes a small random Llama to ./tiny, prepares ./tiny-store from it (afresh
each time), prints the greedy completion of the prompt, fine-tunes with AdamW and prints the
completion again. With MODEL, a Meta or Hugging Face folder is prepared into ./<name>-store first (once); the flags
are those of `slowllama finetune` (default data: test_data/alice.txt).
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


def model_run(model: Path, flags: list[str]) -> None:
    store = model
    if not (model / "manifest.json").exists():
        store = Path(f"{model.resolve().name}-store")
        if not (store / "manifest.json").exists():
            run("prepare", model, store)
    if "--data" not in flags:
        flags = ["--data", str(ALICE), "--prompt", PROMPT, *flags]
    run("finetune", store, *flags)


if __name__ == "__main__":
    if len(sys.argv) == 1:
        tiny_demo()
    elif sys.argv[1] in ("-h", "--help"):
        print(__doc__)
    else:
        model_run(Path(sys.argv[1]), sys.argv[2:])
