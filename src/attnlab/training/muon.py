"""``torch.optim.Muon`` with its Newton–Schulz iteration in float32 (``optim.muon_ns_dtype=float32``).

torch runs the iteration in bfloat16: fast on GPUs and on CPUs with bf16 matrix units (AVX512-BF16,
AMX), but CPUs without them (AVX2 laptops and servers) multiply bf16 matrices on a slow fallback path,
where the mainrun-best optimizer step takes 42 times as long as in float32 and 89% of the training
step (benchmarks/bf16-cpu). ``Float32Muon`` is torch's update rule step for step with that one dtype
changed; tests check that with the iteration in bfloat16 it matches ``torch.optim.Muon`` exactly.
Import this module only where ``torch.optim.Muon`` exists (torch >= 2.9).
"""

from __future__ import annotations

import math

import torch


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton–Schulz orthogonalisation of the 2-D ``g``, as torch computes it, in ``dtype``."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Float32Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (Nesterov momentum, decoupled decay, torch's default learning-rate scale) with the
    Newton–Schulz iteration in ``ns_dtype``."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.float32, **kwargs):
        if kwargs.get("adjust_lr_fn") not in (None, "original"):
            raise ValueError("Float32Muon keeps torch's default learning-rate scale only (adjust_lr_fn=None)")
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None  # Optimizer.step's closure contract, as in optim.CombinedOptimizer
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.shape[0] / p.shape[1])))
        return loss
