"""Model FLOPs per token and model FLOPs utilisation (MFU) against a GPU's bf16 peak.

``flops_per_token`` counts a training step's forward and backward (3 x the
forward's 2 FLOPs per multiply-add), as PaLM's 6N + 12 L H Q T does:

- every matrix multiply with a weight: 6 x the number of ``nn.Linear`` weights
  (the output layer included, tied or not; embedding lookups are not multiplies);
- attention: 6 x T x (query/key width + value width) per layer for dense causal
  attention over a context of T, scaled by the layer pattern's density relative
  to dense causal, so a sparse pattern is credited only with the pairs it scores.

MFU = flops_per_token x tokens/s / peak. Peaks are the dense (no 2:4 sparsity)
bf16 tensor-core figures of the vendor's data sheets, matched on the CUDA
device name; ``ATTNLAB_PEAK_TFLOPS`` overrides them (e.g. for another GPU).

A CPU has no data-sheet figure here: its peak is measured once per process,
thread count and matmul dtype (``measured_cpu_peak_tflops``: the median of three
timed 1024 x 1024 matmuls in the run's autocast dtype, fp32 or bf16, about 0.1 s
on one core; a bf16 run measured against the fp32 rate would read above 1), and
training logs MFU against it under its own name, ``mfu_cpu_measured_peak``, so it
is never mistaken for a GPU's MFU.
"""

from __future__ import annotations

import functools
import os
import re
import statistics
import time

import torch
from torch import nn

# (device-name pattern, dense bf16 TFLOPS). First match wins: specific names before their prefixes.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H200", 989.0),  # H200 SXM (GH200 matches too: the same Hopper tensor cores)
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # H100 SXM
    (r"H800", 989.0),
    (r"A100", 312.0),
    (r"A800", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"A6000", 155.0),
)
PEAK_ENV = "ATTNLAB_PEAK_TFLOPS"
CPU_MFU_KEY = "mfu_cpu_measured_peak"  # MFU against the measured CPU matmul rate, not a data-sheet peak


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of the named GPU in TFLOPS (``ATTNLAB_PEAK_TFLOPS`` first), or None if unknown."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def device_peak_tflops(device: torch.device) -> float | None:
    """``peak_tflops`` of a CUDA device; None on CPU and other devices (no table for them)."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device))


@functools.cache
def measured_cpu_peak_tflops(
    threads: int, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 3
) -> float:
    """This CPU's ``dtype`` matmul rate in TFLOPS at ``threads`` threads (the caller's setting; the argument keys
    the cache): the median of ``repeats`` timed ``n`` x ``n`` matmuls after one warm-up. Its own generator leaves
    the global RNG streams untouched."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, n, generator=g).to(dtype), torch.rand(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / max(statistics.median(times), 1e-9) / 1e12


def flops_per_token(model: nn.Module, context: int) -> float:
    """Training FLOPs per token (forward + backward) of an attnlab ``GPT`` at ``context`` (see module doc)."""
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 0.0
    for block in model.blocks:
        attn = block.attn
        width = attn.n_head * (attn.qk_head + attn.v_head)
        attention += 6 * context * width * attn.core.pattern.density(context, attn.n_head)  # density: 1 = dense causal
    return 6 * weights + attention


def mfu(flops_token: float, tokens_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of ``peak`` TFLOPS; None without a peak."""
    if not peak:
        return None
    return flops_token * tokens_per_second / (peak * 1e12)
