"""The one attention interface the model uses: (q, k, v) under a pattern, through a backend."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AttentionConfig
from .backends import select_backend
from .patterns import Pattern, build_pattern


class Attention(nn.Module):
    """The one attention interface: (q, k, v) [B,H,T,Dh] -> [B,H,T,Dh] under a pattern.

    The pattern and backend are resolved once, at construction, so a forward
    is a single backend call: no mask building or dispatch per step.
    """

    pattern: Pattern
    backend: str

    def __init__(self, attn_cfg: AttentionConfig, layer_idx: int, n_layer: int, n_head: int, dropout: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = n_head
        self.dropout = dropout
        self.pattern = build_pattern(attn_cfg, layer_idx, n_layer, n_head)
        # The device is not known yet; the choice for today's backends does not depend on it.
        self.backend, self._fn = select_backend(attn_cfg.backend, self.pattern, device=None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._fn(q, k, v, self.pattern, self.dropout, self.training)

    def describe(self, T: int) -> dict:
        """What this layer's attention is, for ``model_info`` logs."""
        return {
            "layer": self.layer_idx,
            "pattern": self.pattern.name,
            "params": self.pattern.params(),
            "density": self.pattern.density(T, self.n_head),
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, pattern={self.pattern.name}, backend={self.backend}, dropout={self.dropout}"
