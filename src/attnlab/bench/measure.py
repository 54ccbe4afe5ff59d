"""What the benchmarks share: memory measurement (CUDA peaks, CPU peak RSS through /proc), pattern labels
and the machine description written beside every result."""

from __future__ import annotations

import ctypes
import gc
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..attention.patterns import Pattern


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def cpu_peak_supported() -> bool:
    """Whether this process can reset its peak RSS (Linux /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        status_kb("VmHWM")
        return True
    except OSError:
        return False


def peak_mb(run: Callable[[], None], device: torch.device) -> float:
    """MB the call ``run()`` adds at its peak above what was allocated/resident just before (see module doc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return max(0.0, (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    if not cpu_peak_supported():
        return math.nan
    malloc_trim()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    run()
    return max(0.0, (status_kb("VmHWM") - before) / 1024)


def reset_peak_rss() -> bool:
    """Return freed heap to the OS and restart the peak RSS from the current RSS, so a pass's peak is its own.

    ``cpu_peak_supported`` probes by writing 5 to /proc/self/clear_refs, which is the reset itself;
    False where that is not possible.
    """
    gc.collect()
    malloc_trim()
    return cpu_peak_supported()


def rss_mb(peak_ok: bool) -> dict:
    """Peak RSS since the last reset and current RSS, in MB (NaN where unavailable)."""

    def mb(field: str) -> float:
        try:
            return status_kb(field) / 1024
        except OSError:
            return math.nan

    rss = mb("VmRSS")  # first: the peak read after it cannot be below it
    return {"peak_rss_mb": mb("VmHWM") if peak_ok else math.nan, "rss_mb": rss}


def params_label(pattern: Pattern) -> str:
    from ..eval.inspection.pattern_viz import format_params

    return format_params(pattern.params())


def machine_info(device: torch.device) -> dict:
    """bench.train's machine description plus the benchmarked device."""
    from .train import machine

    info = machine()
    info["device"] = device.type
    info["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else info["cpu"]
    return info
