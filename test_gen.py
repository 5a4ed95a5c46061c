"""Generate a completion from a model, like the original slowllama's test_gen.py.

    python test_gen.py MODEL_DIR [device]

MODEL_DIR may be a slowllama store, a Meta or a Hugging Face folder (prepared into a temporary store first).
"""

import sys

from slowllama.cli import main

PROMPT = "Alice drank from the bottle which had a label"

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    device = sys.argv[2] if len(sys.argv) > 2 else "auto"
    sys.exit(main(["generate", sys.argv[1], "--prompt", PROMPT, "--max-new-tokens", "50", "--device", device]))
