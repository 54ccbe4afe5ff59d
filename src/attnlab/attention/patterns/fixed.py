"""``fixed``: Child et al.'s fixed attention with openai/sparse_attention's summary columns.

fixed(local_attn_ctx=4, blocksize=1, vertsize=1), N=12
x...........
xx..........
xxx.........
xxxx........
...xx.......
...xxx......
...xxxx.....
...xxxxx....
...x...xx...
...x...xxx..
...x...xxxx.
...x...xxxxx
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ConfigError
from .base import Component, HeadGroup, LayerContext, Pattern, param
from .registry import register_pattern


@register_pattern
@dataclass(frozen=True)
class Fixed(Pattern):
    """Child et al.'s fixed attention with openai/sparse_attention's summary columns.

    A query sees its own chunk of ``local_attn_ctx`` (l) keys and, in every
    chunk, the summary key blocks k (of ``blocksize`` b) with
    (k mod l/b) in [l/b - v(g+1), l/b - v g), g = head mod num_verts.
    """

    name: ClassVar[str] = "fixed"
    cache: ClassVar[str] = "fixed"
    local_attn_ctx: int = param(128, lo=1, help="the chunk length l (the Sparse Transformer's local_attn_ctx)")
    blocksize: int = param(32, lo=1, help="block size b of the summary columns")
    vertsize: int = param(1, lo=1, help="summary blocks per chunk and head (c = vertsize * blocksize)")
    num_verts: int = param(1, lo=1, help="distinct summary-column sets across heads")

    @classmethod
    def create(cls, params, layer: LayerContext):
        p = cls(**params)
        l, b = p.local_attn_ctx, p.blocksize  # noqa: E741
        if l % b:
            raise ConfigError(
                f"attention.blocksize={b} must divide attention.local_attn_ctx={l} (chunks are whole blocks): "
                f"choose e.g. blocksize={math.gcd(l, b)}"
            )
        if p.vertsize * p.num_verts > l // b:
            raise ConfigError(
                f"attention.vertsize*num_verts={p.vertsize * p.num_verts} exceeds the {l // b} blocks per chunk "
                f"(local_attn_ctx/blocksize): lower vertsize or num_verts"
            )
        if layer.n_head % p.num_verts:
            raise ConfigError(
                f"attention.num_verts={p.num_verts} must divide model.n_head={layer.n_head} "
                f"(each summary-column set gets the same number of heads): choose a divisor of {layer.n_head}"
            )
        return p

    def check(self, context):
        if context % self.local_attn_ctx:
            raise ConfigError(
                f"attention.local_attn_ctx={self.local_attn_ctx} must divide model.context={context} "
                f"(the context is a whole number of chunks): choose a divisor of {context}"
            )

    def _summary_block(self, key_block: torch.Tensor, head) -> torch.Tensor:
        per_chunk = self.local_attn_ctx // self.blocksize
        g = head % self.num_verts
        pos = key_block % per_chunk
        return (pos >= per_chunk - self.vertsize * (g + 1)) & (pos < per_chunk - self.vertsize * g)

    def rule(self, q_idx, k_idx, head):
        same_chunk = q_idx // self.local_attn_ctx == k_idx // self.local_attn_ctx
        return same_chunk | self._summary_block(k_idx // self.blocksize, head)

    def head_groups(self, n_head):
        b, l = self.blocksize, self.local_attn_ctx  # noqa: E741
        per_chunk = l // b

        def layout_for(g):
            # Summary keys of group g have (j mod l) in [first, last]; any kernel block size works.
            first, last = (per_chunk - self.vertsize * (g + 1)) * b, (per_chunk - self.vertsize * g) * b - 1

            def layout(qb, kb, block, T):
                k_lo, k_hi = kb * block, kb * block + block - 1
                same_chunk = (qb * block) // l <= k_hi // l  # the query block's first chunk reaches the key block
                start = k_lo % l  # residues start..start+block-1 (mod l) occur in the key block
                summary = (
                    (block >= l)
                    | _overlaps(start, start + block - 1, first, last)
                    | _overlaps(start, start + block - 1, first + l, last + l)
                )
                return (kb <= qb) & (same_chunk | summary)

            return layout

        return [
            HeadGroup(tuple(range(g, n_head, self.num_verts)), (Component(layout_for(g), block=b, q_group=per_chunk),))
            for g in range(min(self.num_verts, n_head))
        ]


def _overlaps(a_lo, a_hi, b_lo, b_hi):
    return (a_lo <= b_hi) & (b_lo <= a_hi)
