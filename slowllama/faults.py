"""Named points where crash tests interrupt slowllama; in normal runs they do nothing.

The points: forward.module / backward.module (before each module of a pass), store.write.before /
store.write.after (each module file), store.begin_step (journal written), store.commit.before_rename /
store.commit.after_rename (the manifest's replacement; on a share, phase 2 of a commit across hosts),
store.prepare.before_rename / store.prepare.after_rename (a share's next manifest written beside the current one:
phase 1), store.adopt (a rank > 0 takes rank 0's new manifest, before it deletes the files it replaced); LoRA's
saves: lora.save.files (the step's files written), lora.save.copy (a copy written, before its rename),
lora.state.before_rename / lora.state.after_rename (state.json's replacement), lora.save.committed (before
adapters.safetensors), lora.save.peft (PEFT's adapter_model.safetensors written, before its rename).

Only a test arms them, through slowllama.testing.faults (which sets `hook`); until then `fault_point`
is one check of a None.
"""

from __future__ import annotations

from typing import Callable, Optional

hook: Optional[Callable[[str], None]] = None  # called with the point's name; None unless a test armed it


def fault_point(name: str) -> None:
    """Called at the points named above; does nothing unless a test armed a hook."""
    if hook is not None:
        hook(name)
