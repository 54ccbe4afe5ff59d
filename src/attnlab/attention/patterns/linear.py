"""``linear``: causal linear attention (no softmax), every key j <= i weighted by phi(q_i).phi(k_j).

x...
xx..
xxx.
xxxx
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import Pattern, param
from .registry import register_pattern


@register_pattern
@dataclass(frozen=True)
class Linear(Pattern):
    """Causal linear attention (no softmax): out_i = phi(q_i)^T S_i / phi(q_i)^T z_i over all j <= i."""

    name: ClassVar[str] = "linear"
    mechanism: ClassVar[str] = "linear"
    cache: ClassVar[str] = "linear_state"
    feature_map: str = param("elu1", choices=["elu1", "relu"], help="the feature map phi")
    chunk: int = field(default=64)  # queries per chunk of the chunked causal form (speed only)
