"""The one attention interface the model uses: (q, k, v) under a pattern and score modifiers, through a backend."""

from __future__ import annotations

import torch
from torch import nn

from .backends import BackendFn, select_backend
from .modifiers import ScoreModifiers, build_modifiers, check_modifiers, join_specs
from .patterns import Pattern, build_pattern


class Attention(nn.Module):
    """The one attention interface: q [B,H,T,Dqk], k [B,Hkv,T,Dqk] and v [B,Hkv,T,Dv] -> [B,H,T,Dv] under a pattern.

    ``modifiers`` (specs; default ``attn_cfg.modifiers``) change the scores
    before the mask; a learned one is a submodule (``modifier``), so its
    parameters train and save with the model. Hkv divides H (grouped-query).
    With ``attn_cfg.document_mask`` the forward takes ``doc`` (document ids [B, T],
    ``attention.documents``) and a query sees only keys of its own document.

    The pattern is built at construction. The backend is resolved for a device
    (``resolve``; the trainer calls it once the model is placed) and re-resolved
    only if a forward arrives on another device type, so a step is one backend
    call: no mask building or dispatch per step.
    """

    pattern: Pattern
    backend: str | None
    modifier: ScoreModifiers | None

    def __init__(
        self, attn_cfg, layer_idx: int, n_layer: int, n_head: int, dropout: float, modifiers: list[str] | None = None
    ):
        """``attn_cfg``: an ``AttentionConfig`` (anything with ``layer_spec`` and ``backend``)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = n_head
        self.dropout = dropout
        self.pattern = build_pattern(attn_cfg, layer_idx, n_layer, n_head)
        self.specs = join_specs(list(getattr(attn_cfg, "modifiers", []) if modifiers is None else modifiers))
        check_modifiers(self.specs, self.pattern, n_head, layer_idx)
        self.modifier = build_modifiers(self.specs, n_head)
        self._mod_kw = {} if self.modifier is None else {"modifier": self.modifier}
        self.requested = attn_cfg.backend
        self.document_mask = bool(getattr(attn_cfg, "document_mask", False))
        # reject impossible choices before any device exists
        select_backend(self.requested, self.pattern, None, dropout, self.specs, self.document_mask)
        self.backend: str | None = None
        self._fn: BackendFn | None = None
        self._device_type: str | None = None

    def resolve(self, device: torch.device | str) -> str:
        """Pick the backend for ``device`` (ConfigError if a forced one cannot run there); returns its name."""
        device = torch.device(device)
        self.backend, self._fn = select_backend(
            self.requested, self.pattern, device, self.dropout, self.specs, self.document_mask
        )
        self._device_type = device.type
        return self.backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``doc``: document ids [B, T] (only with document masking; None attends across documents)."""
        if q.device.type != self._device_type or self._fn is None:
            self.resolve(q.device)
        assert self._fn is not None
        kw = self._mod_kw if doc is None else {**self._mod_kw, "doc": doc}
        return self._fn(q, k, v, self.pattern, self.dropout, self.training, **kw)

    def describe(self, T: int) -> dict:
        """What this layer's attention is, for ``model_info`` logs (after ``resolve``: the backend that runs)."""
        info = {
            "layer": self.layer_idx,
            "pattern": self.pattern.name,
            "params": self.pattern.params(),
            "density": round(self.pattern.density(T, self.n_head), 6),
            "backend": self.backend,
        }
        if self.modifier is not None:
            info["modifiers"] = self.modifier.specs
        if self.document_mask:
            info["document_mask"] = True
        return info

    def extra_repr(self) -> str:
        mods = (f", modifiers={self.specs}" if self.specs else "") + (", document_mask" if self.document_mask else "")
        return (
            f"layer={self.layer_idx}, pattern={self.pattern.name}{mods}, backend={self.backend or self.requested}, "
            f"dropout={self.dropout}"
        )
