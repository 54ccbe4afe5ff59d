"""Where a run executes: device, autocast dtype, seeds and the facts recorded about them."""

from __future__ import annotations

import ctypes
import os
import platform
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from . import flops


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible: use train.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device=mps but MPS is not available: use train.device=auto or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if name == "float32":
        return None
    if name == "float16" and device.type == "cpu":
        raise ConfigError("train.dtype=float16 is not supported on CPU: use train.dtype=bfloat16 or float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


SLOW_BF16 = 4.0  # bf16 matmuls this many times slower than fp32: a CPU without bf16 matrix units


def slow_bf16_warning(cfg, device: torch.device) -> str | None:
    """One line, with the settings that avoid it, when a CPU run asks for bf16 matmuls (``train.dtype=bfloat16``,
    Muon's bf16 Newton-Schulz step) and this CPU multiplies bf16 matrices far slower than fp32; else None.

    The settings stay the user's: switching them by hardware would make the same config compute differently
    on different machines."""
    fixes = []
    if cfg.train.dtype == "bfloat16":
        fixes.append("train.dtype=float32")
    if cfg.optim.name == "muon" and cfg.optim.muon_ns_dtype == "bfloat16":
        fixes.append("optim.muon_ns_dtype=float32")
    if device.type != "cpu" or not fixes:
        return None
    threads = torch.get_num_threads()
    ratio = flops.measured_cpu_peak_tflops(threads, torch.float32) / flops.measured_cpu_peak_tflops(
        threads, torch.bfloat16
    )
    if ratio < SLOW_BF16:
        return None
    return (
        f"attnlab: warning: this CPU multiplies bf16 matrices {ratio:.0f}x slower than float32 (it has no bf16 "
        f"matrix units), so this run will be slow: {' '.join(fixes)} makes it much faster (its losses differ "
        f"slightly from bf16's)"
    )


def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the OS (Linux, CPU training).

    A training step frees and re-allocates hundreds of MB of activations and
    logits; by default each such block is an mmap that the kernel must
    page-fault in again on every step (a third of the step in kernel time at
    the mainrun size). Keeping them in the heap makes CPU steps ~1.4x faster
    for a slightly higher resident peak. Returns whether the setting applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


NO_MALLOC_TUNING = "ATTNLAB_NO_MALLOC_TUNING"  # set to 1 to keep glibc's default allocator settings


def tune_allocator() -> bool:
    """Apply ``keep_freed_memory`` for this whole process unless ``ATTNLAB_NO_MALLOC_TUNING=1``.

    ``attnlab train`` and ``attnlab bench attention`` call this at start; library
    functions never do, so importing attnlab changes nothing about the process.
    From Python, call it once before training on CPU to get the CLI's speed.
    Returns whether the setting applied.
    """
    if os.environ.get(NO_MALLOC_TUNING, "").strip() not in ("", "0"):
        return False
    return keep_freed_memory()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB (macOS in bytes): the process's peak resident memory.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _git(*args: str) -> str | None:
    """``git args`` run in attnlab's own source folder; None outside a checkout or without git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_sha() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """True when attnlab's tracked source differs from the commit (the SHA alone does not reproduce the run)."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":/src")  # :/ = from the top, not this folder
    return None if status is None else bool(status)


def device_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        # torch's widest vector instruction set here (AVX2, AVX512, ...): CPUs alike by name can train at very
        # different speeds, bf16 most of all (benchmarks/bf16-cpu)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict:
    import tokenizers

    from .. import __version__

    return {
        "attnlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
    }
