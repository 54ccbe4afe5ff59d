"""``dense``: full causal attention, every key j <= i.

x...
xx..
xxx.
xxxx
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Component, HeadGroup, Pattern, causal_layout
from .registry import register_pattern


@register_pattern
@dataclass(frozen=True)
class Dense(Pattern):
    """Full causal attention: every key j <= i."""

    name: ClassVar[str] = "dense"
    is_dense_causal: ClassVar[bool] = True
    cache: ClassVar[str] = "append"
    translation_invariant: ClassVar[bool] = True

    def density(self, T: int, n_head: int) -> float:
        return 1.0  # by definition; no need to count T^2 pairs

    def head_groups(self, n_head):
        return [HeadGroup(tuple(range(n_head)), (Component(causal_layout),))]
