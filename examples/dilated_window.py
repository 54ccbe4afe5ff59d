"""A dilated sliding window as an attnlab plugin: one file, no edit to attnlab.

Query i sees keys j = i, i - d, i - 2d, ... back to window * d positions:

    dilated_window(window=3, dilation=2), N=8
    x.......
    .x......
    x.x.....
    .x.x....
    x.x.x...
    .x.x.x..
    ..x.x.x.
    ...x.x.x

Use it with ``attention.plugins=[examples/dilated_window.py] attention.pattern=dilated_window
attention.window=16 attention.dilation=2``. From the rule alone attnlab derives the block layout the
block-sparse kernel visits (so its cost follows the density), a KV cache that keeps only the last
window * dilation positions (``reach``), the picture and the statistics.
"""

from dataclasses import dataclass
from typing import ClassVar

from attnlab.attention.patterns import Pattern, param, register_pattern


@register_pattern
@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """Dilated window: i - j < window * dilation and (i - j) mod dilation == 0."""

    name: ClassVar[str] = "dilated_window"
    translation_invariant: ClassVar[bool] = True  # the rule reads i - j only: caches may stream
    window: int = param(256, lo=1, help="keys kept per query")
    dilation: int = param(2, lo=1, help="distance between two kept keys")

    def rule(self, q_idx, k_idx, head):
        dist = q_idx - k_idx
        return (dist < self.window * self.dilation) & (dist % self.dilation == 0)

    def reach(self):
        return (self.window - 1) * self.dilation
