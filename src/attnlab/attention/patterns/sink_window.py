"""``sink_window``: StreamingLLM's attention sinks plus a window, j < sinks or i - j < window.

sink_window(sinks=2, window=3), N=8
x.......
xx......
xxx.....
xxxx....
xxxxx...
xx.xxx..
xx..xxx.
xx...xxx
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Component, HeadGroup, Pattern, band_layout, param
from .registry import register_pattern


@register_pattern
@dataclass(frozen=True)
class SinkWindow(Pattern):
    """StreamingLLM: the first ``sinks`` keys plus a window: j < sinks or i - j < window."""

    name: ClassVar[str] = "sink_window"
    cache: ClassVar[str] = "sink_ring"
    sinks: int = param(4, lo=0, help="the first `sinks` keys are always visible")
    window: int = param(256, lo=1, help="keys within this distance (i - j < window)")

    def rule(self, q_idx, k_idx, head):
        return (k_idx < self.sinks) | (q_idx - k_idx < self.window)

    def head_groups(self, n_head):
        band = band_layout(self.window)
        layout = lambda qb, kb, block, T: band(qb, kb, block, T) | ((kb * block < self.sinks) & (kb <= qb))  # noqa: E731
        return [HeadGroup(tuple(range(n_head)), (Component(layout),))]
