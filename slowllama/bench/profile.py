"""bench --profile: where a step's time goes, from torch.profiler, as tables of operators and kernels."""

from __future__ import annotations

from pathlib import Path

import torch


def start_profile(device: torch.device) -> torch.profiler.profile:
    """A running profiler of the host's operators, and of the GPU's kernels on cuda."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, acc_events=True)
    prof.start()
    return prof


def write_profile(prof: torch.profiler.profile, path: Path, steps: int, seconds: float, device: torch.device) -> str:
    """Stop the profiler and write its tables to path: the top operators and kernels by device time (cuda), and
    by host time, with the share of the steps' wall time the device was busy. Returns a line that says so."""
    prof.stop()
    events = prof.key_averages()
    summary = f"{steps} steps profiled, {seconds / steps:.4f} s/step under the profiler"
    tables = ["self_cpu_time_total"]
    if device.type == "cuda":
        # kernels only (operators count their kernels' time again): what the device did
        busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        summary += f", device busy {busy / steps:.4f} s/step ({100 * busy / seconds:.0f}% of the wall time)"
        tables.insert(0, "self_device_time_total")
    lines = [summary]
    for key in tables:
        lines += ["", f"by {key}:", events.table(sort_by=key, row_limit=40, max_name_column_width=100)]
    syncs = [e for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")]
    lines += [f"{e.key}: {e.count / steps:.1f} a step, {e.cpu_time_total / 1e3 / steps:.2f} ms a step" for e in syncs]
    path.write_text("\n".join(lines) + "\n")
    return f"wrote the profile to {path}: {summary}"
