"""The one attention interface the model uses: (q, k, v) under a pattern, through a backend."""

from __future__ import annotations

import torch
from torch import nn

from .backends import select_backend
from .patterns import Pattern, build_pattern


class Attention(nn.Module):
    """The one attention interface: q, k [B,H,T,Dqk] and v [B,H,T,Dv] -> [B,H,T,Dv] under a pattern.

    The pattern is built at construction. The backend is resolved for a device
    (``resolve``; the trainer calls it once the model is placed) and re-resolved
    only if a forward arrives on another device type, so a step is one backend
    call: no mask building or dispatch per step.
    """

    pattern: Pattern
    backend: str | None

    def __init__(self, attn_cfg, layer_idx: int, n_layer: int, n_head: int, dropout: float):
        """``attn_cfg``: an ``AttentionConfig`` (anything with ``layer_spec`` and ``backend``)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = n_head
        self.dropout = dropout
        self.pattern = build_pattern(attn_cfg, layer_idx, n_layer, n_head)
        self.requested = attn_cfg.backend
        select_backend(self.requested, self.pattern, None, dropout)  # reject impossible choices before any device exists
        self.backend, self._fn, self._device_type = None, None, None

    def resolve(self, device: torch.device | str) -> str:
        """Pick the backend for ``device`` (ConfigError if a forced one cannot run there); returns its name."""
        device = torch.device(device)
        self.backend, self._fn = select_backend(self.requested, self.pattern, device, self.dropout)
        self._device_type = device.type
        return self.backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type != self._device_type:
            self.resolve(q.device)
        return self._fn(q, k, v, self.pattern, self.dropout, self.training)

    def describe(self, T: int) -> dict:
        """What this layer's attention is, for ``model_info`` logs (after ``resolve``: the backend that runs)."""
        return {
            "layer": self.layer_idx,
            "pattern": self.pattern.name,
            "params": self.pattern.params(),
            "density": round(self.pattern.density(T, self.n_head), 6),
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, pattern={self.pattern.name}, backend={self.backend or self.requested}, dropout={self.dropout}"
