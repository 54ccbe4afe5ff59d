"""Attention patterns: small, pure, named definitions of which keys a query may see.

A pattern answers one question, ``allowed(q_idx, k_idx, head)``, vectorised over
broadcasting index tensors. Everything else (the dense mask used by the
reference backend and tests, the density reported in ``model_info``) is derived
from it, so a new pattern only writes its rule and registers a factory.

All patterns are causal: ``allowed`` is ``k_idx <= q_idx`` AND the pattern's own
``rule``. A subclass restricts attention further by overriding ``rule``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..config import AttentionConfig
from ..errors import ConfigError

# Queries per chunk when counting allowed pairs: bounds memory to chunk * T * H.
_DENSITY_CHUNK = 1024


@dataclass(frozen=True)
class Pattern:
    """Base class of all patterns. Subclasses are frozen dataclasses whose fields are their parameters."""

    name: ClassVar[str] = "pattern"
    # True only when the pattern is exactly "every j <= i": fast kernels with a
    # built-in causal mask (SDPA is_causal) can then run it without any mask.
    is_dense_causal: ClassVar[bool] = False

    def rule(self, q_idx: torch.Tensor, k_idx: torch.Tensor, head: torch.Tensor) -> torch.Tensor | None:
        """The pattern's own restriction on top of causality; None means no restriction."""
        return None

    def allowed(self, q_idx: torch.Tensor, k_idx: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Bool tensor, True where query ``q_idx`` of head ``head`` may attend to key ``k_idx``.

        The three index tensors broadcast against each other; the result has
        their broadcast shape (or a shape that broadcasts to it, when the rule
        ignores an argument).
        """
        causal = k_idx <= q_idx
        extra = self.rule(q_idx, k_idx, head)
        return causal if extra is None else causal & extra

    def dense_mask(self, T: int, n_head: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool mask [n_head, T, T] (True = may attend). Builds T x T: for tests and the reference backend."""
        q, k, h = _grid(0, T, T, n_head, device)
        return self.allowed(q, k, h).expand(n_head, T, T)

    def density(self, T: int, n_head: int) -> float:
        """Allowed (query, key) pairs / causal pairs T*(T+1)/2, averaged over heads.

        1.0 for dense causal attention; a local window w << T gives about 2w/T.
        Counted in query chunks so a long context never materialises T x T.
        """
        allowed = 0
        for start in range(0, T, _DENSITY_CHUNK):
            rows = min(_DENSITY_CHUNK, T - start)
            q, k, h = _grid(start, rows, T, n_head, None)
            allowed += int(self.allowed(q, k, h).expand(n_head, rows, T).sum())
        return allowed / (n_head * T * (T + 1) / 2)

    def params(self) -> dict:
        """The pattern's parameters (its dataclass fields), for logs and reports."""
        return dataclasses.asdict(self)


def _grid(q_start: int, n_q: int, T: int, n_head: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcasting index tensors: queries [1, n_q, 1], keys [1, 1, T], heads [H, 1, 1]."""
    q = torch.arange(q_start, q_start + n_q, device=device).view(1, n_q, 1)
    k = torch.arange(T, device=device).view(1, 1, T)
    h = torch.arange(n_head, device=device).view(n_head, 1, 1)
    return q, k, h


@dataclass(frozen=True)
class Dense(Pattern):
    """Full causal attention: every key j <= i."""

    name: ClassVar[str] = "dense"
    is_dense_causal: ClassVar[bool] = True

    def density(self, T: int, n_head: int) -> float:
        return 1.0  # by definition; no need to count T^2 pairs


# ------------------------------------------------------------------ registry

PatternFactory = Callable[[AttentionConfig, int, int, int], Pattern]
PATTERNS: dict[str, PatternFactory] = {}


def register_pattern(name: str) -> Callable[[PatternFactory], PatternFactory]:
    """Register ``factory(attn_cfg, layer_idx, n_layer, n_head) -> Pattern`` under ``name``.

    The factory sees the layer index so patterns can differ per layer
    (e.g. interleaving local and strided layers); per-head differences live in
    the pattern's ``rule`` via its ``head`` argument.
    """

    def deco(factory: PatternFactory) -> PatternFactory:
        if name in PATTERNS:
            raise ValueError(f"attention pattern {name!r} is registered twice")
        PATTERNS[name] = factory
        return factory

    return deco


@register_pattern("dense")
def _dense(attn_cfg: AttentionConfig, layer_idx: int, n_layer: int, n_head: int) -> Pattern:
    return Dense()


def build_pattern(attn_cfg: AttentionConfig, layer_idx: int, n_layer: int, n_head: int) -> Pattern:
    """The pattern that layer ``layer_idx`` of ``n_layer`` uses, from the attention config."""
    factory = PATTERNS.get(attn_cfg.pattern)
    if factory is None:
        raise ConfigError(f"attention.pattern={attn_cfg.pattern!r} is unknown: use one of {', '.join(sorted(PATTERNS))}")
    return factory(attn_cfg, layer_idx, n_layer, n_head)
