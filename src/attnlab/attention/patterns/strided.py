"""``strided``: Child et al.'s strided attention, local(l) plus the strided part (i - j) mod l == 0.

    local part(4)   strided part(4), N=12
    x...........    x...........
    xx..........    .x..........
    xxx.........    ..x.........
    xxxx........    ...x........
    .xxxx.......    x...x.......
    ..xxxx......    .x...x......
    ...xxxx.....    ..x...x.....
    ....xxxx....    ...x...x....
    .....xxxx...    x...x...x...
    ......xxxx..    .x...x...x..
    .......xxxx.    ..x...x...x.
    ........xxxx    ...x...x...x

For the block-sparse kernel the strided part reorders positions
``p -> (p mod l, p div l)``, so "every l-th key" becomes a contiguous,
block-local run, as the Sparse Transformer's kernels did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...errors import ConfigError
from .base import Component, HeadGroup, LayerContext, Pattern, band_layout, grouped_causal_layout, param
from .registry import register_pattern


@register_pattern
@dataclass(frozen=True)
class Strided(Pattern):
    """Child et al.'s strided attention: local(l) and the strided part (i - j) mod l == 0 (their A(2)).

    ``strided_mode`` combines them across heads (``split``: the first half of the heads
    local, the second half strided), across layers (``interleave``: even layers local,
    odd layers strided), or in every head (``union``).
    """

    name: ClassVar[str] = "strided"
    cache: ClassVar[str] = "strided"
    translation_invariant: ClassVar[bool] = True
    local_attn_ctx: int = param(128, lo=1, help="the stride l (the Sparse Transformer's local_attn_ctx)")
    strided_mode: str = param(
        "split",
        choices=["split", "interleave", "union"],
        help="local and strided parts across heads, across layers, or in each head",
    )
    n_head: int = field(default=1)  # split: the first n_head // 2 heads are local
    part: str = field(default="both")  # interleave: "local" or "stride" for this layer

    @classmethod
    def create(cls, params, layer: LayerContext):
        mode = params.get("strided_mode", "split")
        if mode == "split" and layer.n_head % 2:
            raise ConfigError(
                f"attention.strided_mode=split gives half the heads to each part, but model.n_head={layer.n_head} "
                f"is odd: use an even n_head or strided_mode=union"
            )
        part = ("local" if layer.layer_idx % 2 == 0 else "stride") if mode == "interleave" else "both"
        return cls(**params, n_head=layer.n_head, part=part)

    def check(self, context):
        if context % self.local_attn_ctx:
            raise ConfigError(
                f"attention.local_attn_ctx={self.local_attn_ctx} must divide model.context={context} "
                f"(the context is a whole number of strides): choose a divisor of {context}"
            )

    @property
    def mode(self) -> str:
        return self.strided_mode

    def rule(self, q_idx, k_idx, head):
        dist = q_idx - k_idx
        local, stride = dist < self.local_attn_ctx, dist % self.local_attn_ctx == 0
        if self.mode == "union":
            return local | stride
        if self.mode == "interleave":
            return local if self.part == "local" else stride
        return torch.where(head < self.n_head // 2, local, stride)

    def head_groups(self, n_head):
        l = self.local_attn_ctx  # noqa: E741
        local = Component(band_layout(l))
        stride = Component(grouped_causal_layout(l), stride=l)
        everyone = tuple(range(n_head))
        if self.mode == "union":  # disjoint pieces: the window, and the strided keys beyond it
            near = lambda q, k: q - k < l  # noqa: E731
            far = lambda q, k: q - k >= l  # noqa: E731
            return [
                HeadGroup(everyone, (dataclasses.replace(local, select=near), dataclasses.replace(stride, select=far)))
            ]
        if self.mode == "interleave":
            return [HeadGroup(everyone, (local if self.part == "local" else stride,))]
        half = n_head // 2
        return [HeadGroup(tuple(range(half)), (local,)), HeadGroup(tuple(range(half, n_head)), (stride,))]
