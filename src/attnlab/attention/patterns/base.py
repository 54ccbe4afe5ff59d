"""What every attention pattern is: a small, pure rule of which keys a query may see.

A pattern answers one question, ``allowed(q_idx, k_idx, head)``, vectorised over
broadcasting index tensors. Everything else is derived from that rule: the
dense mask (reference backend, tests), the density, the block layout the
block-sparse kernel visits (``derived_head_groups``), the picture
(``attnlab viz pattern``) and a KV cache (``attention.cache``). A pattern's
parameters are the dataclass fields declared with ``param`` (typed, with a
range and a one-line help), so the config, the CLI listings and the docs read
them from the class.

All patterns are causal: ``allowed`` is ``k_idx <= q_idx`` AND the pattern's
own ``rule``. A pattern may add hints where it knows better than the generic
derivations: ``head_groups`` (hand-made block-sparse components, e.g. the
strided reordering), ``cache`` (a specialised KV cache kind) and ``reach``
(the largest distance i - j it ever allows, which bounds the generic cache).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

# Queries per chunk when counting allowed pairs: bounds memory to chunk * T * H.
_DENSITY_CHUNK = 1024
# Default token block of the block-sparse kernel (patterns without a natural block).
KERNEL_BLOCK = 64
# Token pairs evaluated at once when a block layout is derived from the rule.
_DERIVE_ELEMS = 1 << 22

# (q_block [n, 1], k_block [1, n], block, padded length) -> bool: may any pair in these blocks attend?
LayoutFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def param(default: Any, *, choices=None, lo=None, hi=None, help: str = ""):
    """A pattern parameter: a dataclass field with its allowed values or range and a one-line help."""
    return field(default=default, metadata={"choices": choices, "lo": lo, "hi": hi, "help": help, "param": True})


@dataclass(frozen=True)
class LayerContext:
    """Where a pattern is used: its layer in the model, the number of heads and (if known) the context."""

    layer_idx: int = 0
    n_layer: int = 1
    n_head: int = 1
    context: int | None = None


@dataclass(frozen=True)
class Component:
    """One piece of a pattern, computed by the block-sparse kernel in one token order.

    ``layout`` lists the (query block, key block) pairs to compute, in the
    component's order; it must cover every allowed pair that ``select`` keeps.
    ``stride`` (if set) reorders positions ``p -> (p mod stride, p div stride)``
    first. ``select(q, k)`` (original positions) keeps components disjoint when
    several make up one head.
    """

    layout: LayoutFn
    block: int = KERNEL_BLOCK
    q_group: int = 1  # queries are processed q_group * block at a time (bigger matrix products)
    stride: int | None = None
    select: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class HeadGroup:
    """Heads that share one rule, and the components that compute it."""

    heads: tuple[int, ...]
    components: tuple[Component, ...]


@dataclass(frozen=True)
class Pattern:
    """Base class of all patterns. Subclasses are frozen dataclasses; fields made with ``param`` are parameters."""

    name: ClassVar[str] = "pattern"
    # True only when the pattern is exactly "every j <= i": fast kernels with a
    # built-in causal mask (SDPA is_causal) can then run it without any mask.
    is_dense_causal: ClassVar[bool] = False
    # "softmax" for masked softmax attention; "linear" for linear attention (no softmax).
    mechanism: ClassVar[str] = "softmax"
    # Hint: the name of a specialised KV cache kind in attention.cache (None: the generic cache).
    cache: ClassVar[str | None] = None
    # True when the rule depends on i - j (and the head) only, so a bounded cache may stream past the context.
    translation_invariant: ClassVar[bool] = False

    # ------------------------------------------------------------ the rule
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

    # ------------------------------------------------------------ construction
    @classmethod
    def create(cls, params: dict, layer: LayerContext) -> Pattern:
        """This layer's pattern from its parameters; override to add fields derived from the layer or checks."""
        return cls(**params)

    def check(self, context: int) -> None:
        """Raise ConfigError if the pattern cannot run at this training context (default: it always can)."""

    @classmethod
    def parameters(cls) -> dict[str, dataclasses.Field]:
        """The user-facing parameters: fields declared with ``param``."""
        return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("param")}

    def params(self) -> dict:
        """The pattern's parameter values, for logs and reports."""
        return {name: getattr(self, name) for name in self.parameters()}

    def describe(self) -> str:
        """``name(k=v, ...)``: how reports and pictures label the pattern."""
        inner = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({inner})" if inner else self.name

    # ------------------------------------------------------------ hints
    def reach(self) -> int | None:
        """The largest i - j any allowed pair has (None: unbounded). Keys further back can be evicted."""
        return None

    def head_groups(self, n_head: int) -> list[HeadGroup] | None:
        """Hand-made block-sparse components per group of heads; None derives them from the rule."""
        return None

    # ------------------------------------------------------------ derived
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

    def kernel_groups(self, n_head: int, T: int) -> list[HeadGroup]:
        """What the block-sparse kernel computes at length ``T``: the hint, else groups derived from the rule."""
        return self.head_groups(n_head) or derived_head_groups(self, n_head, T)

    def block_layout(self, T: int, block: int, n_head: int) -> torch.Tensor:
        """Bool [n_head, nb, nb] (nb = ceil(T/block)), in the original token order: True where the
        query block may attend to any key of the key block."""
        groups = self.head_groups(n_head)
        if groups is None:
            return torch.stack([rule_block_layout(self, h, T, block) for h in range(n_head)])
        nb = -(-T // block)
        qb, kb = torch.arange(nb).view(nb, 1), torch.arange(nb).view(1, nb)
        out = torch.zeros(n_head, nb, nb, dtype=torch.bool)
        for group in groups:
            lay = torch.zeros(nb, nb, dtype=torch.bool)
            for c in group.components:
                lay |= strided_orig_layout(c.stride)(qb, kb, block, T) if c.stride else c.layout(qb, kb, block, T)
            out[list(group.heads)] = lay
        return out


def _grid(q_start: int, n_q: int, T: int, n_head: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcasting index tensors: queries [1, n_q, 1], keys [1, 1, T], heads [H, 1, 1]."""
    q = torch.arange(q_start, q_start + n_q, device=device).view(1, n_q, 1)
    k = torch.arange(T, device=device).view(1, 1, T)
    h = torch.arange(n_head, device=device).view(n_head, 1, 1)
    return q, k, h


# ------------------------------------------------------------- block layouts
# Each answers "can any query of block qb attend to any key of block kb?" exactly.


def causal_layout(qb, kb, block, T):
    return kb <= qb


def band_layout(window: int) -> LayoutFn:
    """Blocks holding some pair with 0 <= i - j < window."""

    def layout(qb, kb, block, T):
        min_dist = (qb - kb) * block - (block - 1)
        return (kb <= qb) & (min_dist < window)

    return layout


def strided_orig_layout(stride: int) -> LayoutFn:
    """Blocks (original order) holding some pair with i - j >= 0 a multiple of ``stride``."""

    def layout(qb, kb, block, T):
        lo = ((qb - kb) * block - (block - 1)).clamp(min=0)
        hi = (qb - kb) * block + (block - 1)
        return (kb <= qb) & (hi // stride * stride >= lo)

    return layout


def grouped_causal_layout(stride: int) -> LayoutFn:
    """In the strided order (groups of T/stride positions with the same p mod stride), causal blocks
    whose query and key blocks share a group."""

    def layout(qb, kb, block, T):
        group = T // stride  # T is padded to a multiple of stride
        q_lo, q_hi = qb * block // group, (qb * block + block - 1) // group
        k_lo, k_hi = kb * block // group, (kb * block + block - 1) // group
        return (kb <= qb) & (k_hi >= q_lo) & (k_lo <= q_hi)

    return layout


# ------------------------------------------------- layouts derived from the rule


def rule_block_layout(pattern: Pattern, head: int, T: int, block: int, digest=None) -> torch.Tensor:
    """Bool [nb, nb]: True where some query of the query block may attend to some key of the key block,
    found by evaluating the rule on every token pair, a few query blocks at a time (never T x T at once).
    ``digest`` (a hashlib object), if given, is fed the token-level mask, so heads can be compared exactly."""
    nb = -(-T // block)
    length = nb * block
    out = torch.zeros(nb, nb, dtype=torch.bool)
    keys = torch.arange(length).view(1, length)
    step = max(1, _DERIVE_ELEMS // (block * length))
    for q0 in range(0, nb, step):
        q1 = min(nb, q0 + step)
        queries = torch.arange(q0 * block, q1 * block).view(-1, 1)
        ok = (
            pattern.allowed(queries, keys, torch.tensor(head)).expand(queries.shape[0], length)
            & (keys < T)
            & (queries < T)
        )
        if digest is not None:
            digest.update(np.packbits(ok.numpy()).tobytes())
        out[q0:q1] = ok.reshape(q1 - q0, block, nb, block).any(3).any(1)
    return out


@functools.lru_cache(maxsize=64)
def derived_head_groups(pattern: Pattern, n_head: int, T: int, block: int = KERNEL_BLOCK) -> list[HeadGroup]:
    """Block-sparse components derived from the rule alone: one group per distinct per-head mask, each
    visiting only the blocks its mask touches, so the kernel's cost follows the pattern's density without
    hand-written ``head_groups``."""
    groups: dict[bytes, tuple[list[int], torch.Tensor]] = {}
    for h in range(n_head):
        digest = hashlib.sha256()
        lay = rule_block_layout(pattern, h, T, block, digest)
        groups.setdefault(digest.digest(), ([], lay))[0].append(h)
    return [
        HeadGroup(tuple(heads), (Component(_fixed_layout(lay, block), block=block),)) for heads, lay in groups.values()
    ]


def _fixed_layout(lay: torch.Tensor, derived_block: int) -> LayoutFn:
    """A LayoutFn reading a precomputed block layout (valid for the block size it was derived with)."""

    def layout(qb, kb, block, T):
        if block != derived_block:  # plans always ask with the component's own block
            raise ValueError(f"layout derived for block {derived_block}, asked for {block}")
        nb = lay.shape[0]
        return lay[qb.clamp(max=nb - 1), kb.clamp(max=nb - 1)] & (qb < nb) & (kb < nb)

    return layout
