"""``local``: a sliding window, i - j < window.

local(window=4), N=8
x.......
xx......
xxx.....
xxxx....
.xxxx...
..xxxx..
...xxxx.
....xxxx
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Component, HeadGroup, Pattern, band_layout, param
from .registry import register_pattern


@register_pattern
@dataclass(frozen=True)
class Local(Pattern):
    """Sliding window: i - j < window."""

    name: ClassVar[str] = "local"
    cache: ClassVar[str] = "ring"
    translation_invariant: ClassVar[bool] = True
    window: int = param(256, lo=1, help="keys within this distance (i - j < window)")

    def rule(self, q_idx, k_idx, head):
        return q_idx - k_idx < self.window

    def reach(self):
        return self.window - 1

    def head_groups(self, n_head):
        return [HeadGroup(tuple(range(n_head)), (Component(band_layout(self.window)),))]
