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
        p._refuse(_divisors(layer.n_head), layer.n_head, layer.context)
        return p

    def check(self, context):
        # Only the chunk rule is left to check here (create saw the rest); the divisors of num_verts
        # divide n_head, so the proposed setting keeps to them.
        self._refuse(_divisors(self.num_verts), None, context)

    def _refuse(self, head_sets: list[int], n_head: int | None, context: int | None) -> None:
        """One ConfigError naming every broken rule (a line each) and the nearest valid setting."""
        broken = self._broken(n_head, context)
        if not broken:
            return
        nearest = " ".join(f"attention.{k}={v}" for k, v in self._nearest(head_sets, context).items())
        if len(broken) == 1:
            raise ConfigError(f"{broken[0]}; nearest valid setting: {nearest}")
        raise ConfigError("\n".join([*broken, f"nearest valid setting: {nearest}"]))

    def _broken(self, n_head: int | None, context: int | None) -> list[str]:
        """The rules this setting breaks, one line each, in parameter order."""
        l, b, v, nv = self.local_attn_ctx, self.blocksize, self.vertsize, self.num_verts  # noqa: E741
        broken = []
        if context is not None and context % l:
            broken.append(
                f"attention.local_attn_ctx={l} must divide model.context={context} "
                f"(the context is a whole number of chunks): use one of {_choices(context)}"
            )
        if l % b:
            broken.append(
                f"attention.blocksize={b} must divide attention.local_attn_ctx={l} (chunks are whole blocks): "
                f"use one of {_choices(l)}"
            )
        elif v * nv > l // b:
            blocks = f"{l // b} block{'s' if l // b > 1 else ''}"
            broken.append(
                f"attention.vertsize*num_verts={v}*{nv}={v * nv} exceeds the {blocks} per chunk "
                f"(local_attn_ctx/blocksize={l}/{b}; vertsize counts blocks, not tokens): "
                f"use vertsize*num_verts <= {l // b}, or a smaller blocksize"
            )
        if n_head is not None and n_head % nv:
            broken.append(
                f"attention.num_verts={nv} must divide model.n_head={n_head} "
                f"(each summary-column set gets the same number of heads): use one of {_choices(n_head)}"
            )
        return broken

    def _nearest(self, head_sets: list[int], context: int | None) -> dict[str, int]:
        """The nearest valid setting: each value kept where it breaks no rule, else moved to the nearest one that
        does, in the order chunk length, head sets, block size, summary width."""
        l, b = self.local_attn_ctx, self.blocksize  # noqa: E741
        if context is not None and context % l:
            l = _closest(_divisors(context), l)  # noqa: E741
        nv = _closest([d for d in head_sets if d <= l], self.num_verts)  # 1 always qualifies
        if l % b or l // b < nv:  # the largest block size no larger than asked that leaves a block per head set
            b = max(d for d in _divisors(l) if d <= b and l // d >= nv)
        v = min(self.vertsize, l // b // nv)
        return {"local_attn_ctx": l, "blocksize": b, "vertsize": v, "num_verts": nv}

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


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _choices(n: int) -> str:
    ds = _divisors(n)
    return ", ".join(map(str, ds)) if len(ds) <= 12 else f"a divisor of {n}"


def _closest(candidates: list[int], x: int) -> int:
    """The candidate nearest to x on a log scale (ties to the smaller one)."""
    return min(candidates, key=lambda d: (abs(math.log2(d / x)), d))
