"""Attention patterns: small, pure, named definitions of which keys a query may see.

A pattern answers one question, ``allowed(q_idx, k_idx, head)``, vectorised over
broadcasting index tensors. Everything else (the dense mask used by the
reference backend and tests, the density reported in ``model_info``) is derived
from it, so a new pattern only writes its rule and registers a factory.

All patterns are causal: ``allowed`` is ``k_idx <= q_idx`` AND the pattern's own
``rule``. A subclass restricts attention further by overriding ``rule``.

For the block-sparse kernel a pattern also says, per group of identical heads,
which key blocks each query block can touch (``head_groups``): one or more
``Component``s, each a block layout in its own token order. Strided attention
reorders positions ``p -> (p mod l, p div l)`` so that "every l-th key" becomes
a contiguous, block-local run, as the Sparse Transformer's kernels did.

Pictures (``attnlab viz pattern``; row = query i, column = key j, N=12, l=4):

    local(4)       strided part(4)  fixed(4, c=1)   sink_window(2, 3)
    x...........   x...........   x...........   x...........
    xx..........   .x..........   xx..........   xx..........
    xxx.........   ..x.........   xxx.........   xxx.........
    xxxx........   ...x........   xxxx........   xxxx........
    .xxxx.......   x...x.......   ...xx.......   xxxxx.......
    ..xxxx......   .x...x......   ...xxx......   xx.xxx......
    ...xxxx.....   ..x...x.....   ...xxxx.....   xx..xxx.....
    ....xxxx....   ...x...x....   ...xxxxx....   xx...xxx....
    .....xxxx...   x...x...x...   ...x...xx...   xx....xxx...
    ......xxxx..   .x...x...x..   ...x...xxx..   xx.....xxx..
    .......xxxx.   ..x...x...x.   ...x...xxxx.   xx......xxx.
    ........xxxx   ...x...x...x   ...x...xxxxx   xx.......xxx
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from ..config import AttentionConfig, ModelConfig
from ..errors import ConfigError

# Queries per chunk when counting allowed pairs: bounds memory to chunk * T * H.
_DENSITY_CHUNK = 1024
# Default token block of the block-sparse kernel (patterns without a natural block).
KERNEL_BLOCK = 64

# (q_block [n, 1], k_block [1, n], block, padded length) -> bool: may any pair in these blocks attend?
LayoutFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


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
    """Base class of all patterns. Subclasses are frozen dataclasses whose fields are their parameters."""

    name: ClassVar[str] = "pattern"
    # True only when the pattern is exactly "every j <= i": fast kernels with a
    # built-in causal mask (SDPA is_causal) can then run it without any mask.
    is_dense_causal: ClassVar[bool] = False
    # "softmax" for masked softmax attention; "linear" for linear attention (no softmax).
    mechanism: ClassVar[str] = "softmax"

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

    def head_groups(self, n_head: int) -> list[HeadGroup]:
        """Groups of heads with the same rule and their block-sparse components (default: one group)."""
        return [HeadGroup(tuple(range(n_head)), (Component(causal_layout),))]

    def block_layout(self, T: int, block: int, n_head: int) -> torch.Tensor:
        """Bool [n_head, nb, nb] (nb = ceil(T/block)), in the original token order: True where the
        query block may attend to any key of the key block. Computed per block pair, never per token pair."""
        nb = -(-T // block)
        qb, kb = torch.arange(nb).view(nb, 1), torch.arange(nb).view(1, nb)
        out = torch.zeros(n_head, nb, nb, dtype=torch.bool)
        for group in self.head_groups(n_head):
            lay = torch.zeros(nb, nb, dtype=torch.bool)
            for c in group.components:
                lay |= (strided_orig_layout(c.stride)(qb, kb, block, T) if c.stride else c.layout(qb, kb, block, T))
            out[list(group.heads)] = lay
        return out


def _grid(q_start: int, n_q: int, T: int, n_head: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcasting index tensors: queries [1, n_q, 1], keys [1, 1, T], heads [H, 1, 1]."""
    q = torch.arange(q_start, q_start + n_q, device=device).view(1, n_q, 1)
    k = torch.arange(T, device=device).view(1, 1, T)
    h = torch.arange(n_head, device=device).view(n_head, 1, 1)
    return q, k, h


# ------------------------------------------------------------- block layouts
# Each answers "can any query of block qb attend to any key of block kb?" exactly,
# from the range of distances i - j between the two blocks.

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


# ------------------------------------------------------------------ patterns

@dataclass(frozen=True)
class Dense(Pattern):
    """Full causal attention: every key j <= i."""

    name: ClassVar[str] = "dense"
    is_dense_causal: ClassVar[bool] = True

    def density(self, T: int, n_head: int) -> float:
        return 1.0  # by definition; no need to count T^2 pairs


@dataclass(frozen=True)
class Local(Pattern):
    """Sliding window: i - j < window."""

    name: ClassVar[str] = "local"
    window: int = 256

    def rule(self, q_idx, k_idx, head):
        return q_idx - k_idx < self.window

    def head_groups(self, n_head):
        return [HeadGroup(tuple(range(n_head)), (Component(band_layout(self.window)),))]


@dataclass(frozen=True)
class Strided(Pattern):
    """Child et al.'s strided attention: local(l) and the strided part (i - j) mod l == 0 (their A(2)).

    ``mode`` combines them across heads (``split``: the first half of the heads
    local, the second half strided), across layers (``interleave``: ``part`` is
    "local" or "stride" for this layer), or in every head (``union``).
    """

    name: ClassVar[str] = "strided"
    local_attn_ctx: int = 128
    mode: str = "split"
    n_head: int = 1
    part: str = "both"

    def rule(self, q_idx, k_idx, head):
        dist = q_idx - k_idx
        local, stride = dist < self.local_attn_ctx, dist % self.local_attn_ctx == 0
        if self.mode == "union":
            return local | stride
        if self.mode == "interleave":
            return local if self.part == "local" else stride
        return torch.where(head < self.n_head // 2, local, stride)

    def head_groups(self, n_head):
        l = self.local_attn_ctx
        local = Component(band_layout(l))
        stride = Component(grouped_causal_layout(l), stride=l)
        everyone = tuple(range(n_head))
        if self.mode == "union":  # disjoint pieces: the window, and the strided keys beyond it
            near = lambda q, k: q - k < l
            far = lambda q, k: q - k >= l
            return [HeadGroup(everyone, (dataclasses.replace(local, select=near), dataclasses.replace(stride, select=far)))]
        if self.mode == "interleave":
            return [HeadGroup(everyone, (local if self.part == "local" else stride,))]
        half = n_head // 2
        return [HeadGroup(tuple(range(half)), (local,)), HeadGroup(tuple(range(half, n_head)), (stride,))]


@dataclass(frozen=True)
class Fixed(Pattern):
    """Child et al.'s fixed attention with openai/sparse_attention's summary columns.

    A query sees its own chunk of ``local_attn_ctx`` (l) keys and, in every
    chunk, the summary key blocks k (of ``blocksize`` b) with
    (k mod l/b) in [l/b - v(g+1), l/b - v g), g = head mod num_verts.
    """

    name: ClassVar[str] = "fixed"
    local_attn_ctx: int = 128
    blocksize: int = 32
    vertsize: int = 1
    num_verts: int = 1

    def _summary_block(self, key_block: torch.Tensor, head) -> torch.Tensor:
        per_chunk = self.local_attn_ctx // self.blocksize
        g = head % self.num_verts
        pos = key_block % per_chunk
        return (pos >= per_chunk - self.vertsize * (g + 1)) & (pos < per_chunk - self.vertsize * g)

    def rule(self, q_idx, k_idx, head):
        same_chunk = q_idx // self.local_attn_ctx == k_idx // self.local_attn_ctx
        return same_chunk | self._summary_block(k_idx // self.blocksize, head)

    def head_groups(self, n_head):
        b, l = self.blocksize, self.local_attn_ctx
        per_chunk = l // b

        def layout_for(g):
            # Summary keys of group g have (j mod l) in [first, last]; any kernel block size works.
            first, last = (per_chunk - self.vertsize * (g + 1)) * b, (per_chunk - self.vertsize * g) * b - 1

            def layout(qb, kb, block, T):
                k_lo, k_hi = kb * block, kb * block + block - 1
                same_chunk = (qb * block) // l <= k_hi // l  # the query block's first chunk reaches the key block
                start = k_lo % l  # residues start..start+block-1 (mod l) occur in the key block
                summary = (block >= l) | _overlaps(start, start + block - 1, first, last) | _overlaps(start, start + block - 1, first + l, last + l)
                return (kb <= qb) & (same_chunk | summary)
            return layout

        return [HeadGroup(tuple(range(g, n_head, self.num_verts)), (Component(layout_for(g), block=b, q_group=per_chunk),))
                for g in range(min(self.num_verts, n_head))]


def _overlaps(a_lo, a_hi, b_lo, b_hi):
    return (a_lo <= b_hi) & (b_lo <= a_hi)


@dataclass(frozen=True)
class SinkWindow(Pattern):
    """StreamingLLM: the first ``sinks`` keys plus a window: j < sinks or i - j < window."""

    name: ClassVar[str] = "sink_window"
    sinks: int = 4
    window: int = 256

    def rule(self, q_idx, k_idx, head):
        return (k_idx < self.sinks) | (q_idx - k_idx < self.window)

    def head_groups(self, n_head):
        band = band_layout(self.window)
        layout = lambda qb, kb, block, T: band(qb, kb, block, T) | ((kb * block < self.sinks) & (kb <= qb))
        return [HeadGroup(tuple(range(n_head)), (Component(layout),))]


@dataclass(frozen=True)
class BlockLayout(Pattern):
    """A user's boolean block layout [H or 1, nb, nb] of ``block``-token blocks, causal inside diagonal blocks."""

    name: ClassVar[str] = "block_layout"
    path: str = ""
    block: int = 64
    sha256: str = ""
    blocks: torch.Tensor = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.sha256:  # identity (equality, hashing, plan caches) follows the layout's contents
            object.__setattr__(self, "sha256", hashlib.sha256(self.blocks.cpu().numpy().tobytes()
                                                              + str(tuple(self.blocks.shape)).encode()).hexdigest())

    def rule(self, q_idx, k_idx, head):
        blocks = self.blocks.to(q_idx.device)
        last = blocks.shape[-1] - 1  # the config check guarantees the layout covers the context
        h = head % blocks.shape[0]
        return blocks[h, (q_idx // self.block).clamp(max=last), (k_idx // self.block).clamp(max=last)]

    def params(self) -> dict:
        return {"path": self.path, "block": self.block, "sha256": self.sha256, "shape": list(self.blocks.shape)}

    def head_groups(self, n_head):
        groups: dict[bytes, list[int]] = {}
        for h in range(n_head):
            groups.setdefault(self.blocks[h % self.blocks.shape[0]].cpu().numpy().tobytes(), []).append(h)

        def layout_for(h):
            # Prefix sums over the (causal part of the) layout answer "any layout block inside this
            # rectangle?" for kernel blocks of any size.
            lay = self.blocks[h % self.blocks.shape[0]].tril()
            sums = torch.nn.functional.pad(lay.int().cumsum(0).cumsum(1), (1, 0, 1, 0))
            last = lay.shape[0]

            def layout(qb, kb, block, T):
                q_lo, q_hi = (qb * block // self.block).clamp(max=last), ((qb + 1) * block - 1) // self.block + 1
                k_lo, k_hi = (kb * block // self.block).clamp(max=last), ((kb + 1) * block - 1) // self.block + 1
                q_hi, k_hi = q_hi.clamp(max=last), k_hi.clamp(max=last)
                count = sums[q_hi, k_hi] - sums[q_lo, k_hi] - sums[q_hi, k_lo] + sums[q_lo, k_lo]
                return (count > 0) & (kb <= qb)
            return layout

        return [HeadGroup(tuple(hs), (Component(layout_for(hs[0]), block=self.block),)) for hs in groups.values()]


@dataclass(frozen=True)
class Linear(Pattern):
    """Causal linear attention (no softmax): out_i = phi(q_i)^T S_i / phi(q_i)^T z_i over all j <= i."""

    name: ClassVar[str] = "linear"
    mechanism: ClassVar[str] = "linear"
    feature_map: str = "elu1"
    chunk: int = 64


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
def _dense(a: AttentionConfig, layer_idx: int, n_layer: int, n_head: int) -> Pattern:
    return Dense()


@register_pattern("local")
def _local(a, layer_idx, n_layer, n_head):
    return Local(a.window)


@register_pattern("strided")
def _strided(a, layer_idx, n_layer, n_head):
    if a.strided_mode == "split" and n_head % 2:
        raise ConfigError(f"attention.strided_mode=split gives half the heads to each part, but model.n_head={n_head} "
                          f"is odd: use an even n_head or strided_mode=union")
    part = ("local" if layer_idx % 2 == 0 else "stride") if a.strided_mode == "interleave" else "both"
    return Strided(a.local_attn_ctx, a.strided_mode, n_head, part)


@register_pattern("fixed")
def _fixed(a, layer_idx, n_layer, n_head):
    l, b = a.local_attn_ctx, a.blocksize
    if l % b:
        raise ConfigError(f"attention.blocksize={b} must divide attention.local_attn_ctx={l} (chunks are whole blocks): "
                          f"choose e.g. blocksize={math.gcd(l, b)}")
    if a.vertsize * a.num_verts > l // b:
        raise ConfigError(f"attention.vertsize*num_verts={a.vertsize * a.num_verts} exceeds the {l // b} blocks per chunk "
                          f"(local_attn_ctx/blocksize): lower vertsize or num_verts")
    if n_head % a.num_verts:
        raise ConfigError(f"attention.num_verts={a.num_verts} must divide model.n_head={n_head} "
                          f"(each summary-column set gets the same number of heads): choose a divisor of {n_head}")
    return Fixed(l, b, a.vertsize, a.num_verts)


@register_pattern("sink_window")
def _sink_window(a, layer_idx, n_layer, n_head):
    return SinkWindow(a.sinks, a.window)


@register_pattern("block_layout")
def _block_layout(a, layer_idx, n_layer, n_head):
    blocks, sha = load_layout(a.layout, n_head)
    return BlockLayout(a.layout, a.layout_block, sha, blocks)


@register_pattern("linear")
def _linear(a, layer_idx, n_layer, n_head):
    return Linear(a.feature_map)


def load_layout(path: str | None, n_head: int) -> tuple[torch.Tensor, str]:
    """A boolean block layout [H, nb, nb] (H = 1 or n_head) from a .npy file, without executing code."""
    if not path:
        raise ConfigError("attention.pattern=block_layout needs attention.layout=FILE.npy (a boolean [nb, nb] or [n_head, nb, nb] array)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"attention.layout={path!r} not found: pass a .npy file saved with numpy.save")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"attention.layout={path!r} is not a plain .npy array ({e}): save it with numpy.save(path, bool_array)") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[0] not in (1, n_head):
        raise ConfigError(f"attention.layout={path!r} has shape {arr.shape}: use [nb, nb] or [{n_head}, nb, nb] (one per head)")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ConfigError(f"attention.layout={path!r} holds values other than 0/1: use a boolean array")
    return torch.from_numpy(arr.astype(bool)), hashlib.sha256(p.read_bytes()).hexdigest()


def layer_pattern_name(a: AttentionConfig, layer_idx: int) -> str:
    """The pattern name of one layer: ``schedule`` (repeated over layers) if given, else ``pattern``."""
    return a.schedule[layer_idx % len(a.schedule)] if a.schedule else a.pattern


def build_pattern(attn_cfg: AttentionConfig, layer_idx: int, n_layer: int, n_head: int) -> Pattern:
    """The pattern that layer ``layer_idx`` of ``n_layer`` uses, from the attention config."""
    name = layer_pattern_name(attn_cfg, layer_idx)
    factory = PATTERNS.get(name)
    if factory is None:
        key = "attention.schedule" if attn_cfg.schedule else "attention.pattern"
        raise ConfigError(f"{key} names unknown pattern {name!r}: use one of {', '.join(sorted(PATTERNS))}")
    return factory(attn_cfg, layer_idx, n_layer, n_head)


def check_patterns(a: AttentionConfig, m: ModelConfig) -> None:
    """Build every layer's pattern (raising on bad parameters) and check the rules that involve the context."""
    from .backends import attention_dropout, select_backend  # late import: backends depend on this module

    names = {layer_pattern_name(a, i) for i in range(m.n_layer)}
    for i in range(m.n_layer):
        select_backend(a.backend, build_pattern(a, i, m.n_layer, m.n_head), None, attention_dropout(m))
    if names & {"strided", "fixed"} and m.context % a.local_attn_ctx:
        raise ConfigError(f"attention.local_attn_ctx={a.local_attn_ctx} must divide model.context={m.context} "
                          f"(the context is a whole number of strides/chunks): choose a divisor of {m.context}")
    if "block_layout" in names:
        blocks, _ = load_layout(a.layout, m.n_head)
        if blocks.shape[-1] * a.layout_block < m.context:
            raise ConfigError(f"attention.layout covers {blocks.shape[-1]} blocks x layout_block={a.layout_block} = "
                              f"{blocks.shape[-1] * a.layout_block} tokens, less than model.context={m.context}: "
                              f"use a larger layout or layout_block")
