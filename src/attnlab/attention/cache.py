"""KV caches, one kind per attention pattern: what a decoding step keeps, and what it reads.

A layer's cache is built from its pattern (``make_cache``) and keeps only the
keys and values the pattern can still reach from the current or a later query:

    pattern        kept per head                               memory
    dense          every position so far (preallocated)        T
    block_layout   every position so far, masked by layout      T
    local(w)       a ring of the last w positions               w
    sink_window    s sink slots, then a ring of the last w      s + w
    strided(l)     local heads: a ring of l; strided heads:     l / T (reads l + T/l)
                   every position, read one residue class
    fixed(l, c)    every finished chunk's summary columns,      l + c T / l
                   then the current chunk
    linear         the recurrent state (S, z)                   Dh x Dv

Strided heads must keep every position: key j is reached again by query
j + m*l for every m, so no past key ever becomes unreachable; what the cache
bounds is the work per step (the keys of one residue class, T/l of them).

Keys arrive already rotated (RoPE at their true positions), so a slot's
position matters only for masking. Caches keep what a step reads contiguous,
so most steps are one fused attention call; ``attend_parts`` also computes one
exact softmax over several key sets (a strided head's window and residue
class, masked slots), merged with a shared maximum instead of concatenated.

``sink_window`` streams past the training context as StreamingLLM does: with
RoPE, positions are assigned within the cache. Window keys keep their relative
distances; the sinks are seen from position ``min(i, context - 1)``, i.e. as the
last query of a training sequence saw them. ``GPT`` passes ``shift_sinks``, which
rotates the s sink keys forward by i - (context - 1), the same thing for RoPE's
relative scores. Inside the context this is exactly the full forward pass.

Grouped-query attention: caches store only the ``n_kv_head`` shared key/value
heads (memory divided by n_head / n_kv_head); a step attends with the query
heads of each group as rows of one product, so nothing is expanded. Where the
query heads of one group keep different keys, a ``fixed`` head keeps the union
of its query heads' summary columns and masks each to its own; strided
``split`` with a group spanning both halves keeps every position and masks with
the rule instead (``AppendCache``).

Score modifiers are applied to the kept keys with their absolute positions
(each part carries them); a sink seen from ``min(i, context - 1)`` under
streaming is seen from there by a translation-invariant modifier too.

Document masking: documents are contiguous, so "key j is in the query's
document" is "j >= the position where the current document began". The model
sets ``doc_start`` [B] before each prefill and step; every part then masks the
kept keys whose absolute position lies before it (ring slots included), and the
linear state starts again from zero where a document begins. A token after
``<eos>`` therefore sees nothing before it, exactly as in the full forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .documents import DocState
from .linear import LinearState, feature_map, linear_step
from .patterns import Fixed, Linear, Pattern, Strided

Rotation = Callable[[torch.Tensor], torch.Tensor]  # re-positions keys (RoPE), see SinkWindowCache


class Part(NamedTuple):
    """One key set a query attends to. ``mask`` broadcasts to [B,H,1,S] (True = usable slot); ``k_pos`` (broadcasting
    to [Hkv,1,S]) and ``q_pos`` (a position, or one per slot) are absolute positions, for score modifiers."""

    q: torch.Tensor  # [B, H, 1, Dqk]
    keys: torch.Tensor  # [B, Hkv, S, Dqk]
    values: torch.Tensor  # [B, Hkv, S, Dv]
    mask: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    q_pos: torch.Tensor | int | None = None


def attend_parts(parts: Sequence[Part | tuple], modifier=None, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of one query over the union of several key sets: q [B,H,1,Dqk] -> [B,H,1,Dv].

    Each part's mask (broadcasting to [B,H,1,S]) marks usable slots. The parts
    share one running maximum, so the result equals a softmax over their
    concatenation. A query with no usable key gets 0, as in the reference.
    Keys with fewer heads than q are shared by groups of query heads; ``modifier``
    changes the scores of query heads ``heads`` (default 0..H-1) at the parts' positions.
    """
    sets = [Part(*p) for p in parts]
    B, H, _, D = sets[0].q.shape
    group = H // sets[0].keys.shape[1]
    if modifier is not None:  # head indices shaped like the scores: [Hkv, group, 1] grouped, [H, 1, 1] otherwise
        heads = (torch.arange(H) if heads is None else heads).to(sets[0].q.device).view(-1, group, 1)
    if group > 1:
        sets = [_grouped(p, group) for p in sets]
    out = _attend(sets, modifier, heads)
    return out.reshape(B, H, 1, out.shape[-1]) if group > 1 else out


def _grouped(p: Part, group: int) -> Part:
    """The query heads of each key/value head as ``group`` query rows: q [B,Hkv,group,D], masks to match."""
    B, H, _, D = p.q.shape
    mask = p.mask
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] == H:
        mask = mask.reshape(*mask.shape[:-3], H // group, group, mask.shape[-1])
    return p._replace(q=p.q.reshape(B, H // group, group, D), mask=mask)


def _attend(parts: list[Part], modifier, heads: torch.Tensor | None) -> torch.Tensor:
    if len(parts) == 1 and parts[0].mask is None and modifier is None:  # one unmasked key set: PyTorch's fused kernel
        q, keys, values = parts[0][:3]
        return F.scaled_dot_product_attention(q, keys, values)
    scale = parts[0].q.shape[-1] ** -0.5
    scores = []
    for p in parts:
        s = (p.q.float() @ p.keys.float().transpose(-2, -1)) * scale
        if modifier is not None and s.shape[-1]:
            if p.k_pos is None:
                raise ValueError("this KV cache gives no key positions, so it cannot apply score modifiers")
            device = s.device
            q_pos = torch.as_tensor(p.q_pos, device=device)
            s = modifier.score(s, q_pos, p.k_pos.to(device), heads)
        scores.append(s if p.mask is None else s.masked_fill(~p.mask, float("-inf")))
    top = torch.stack([s.amax(-1, keepdim=True) for s in scores if s.shape[-1]]).amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    num = den = torch.zeros((), device=top.device)
    for s, p in zip(scores, parts):
        if s.shape[-1]:
            e = torch.exp(s - top)
            num = num + e @ p.values.float()
            den = den + e.sum(-1, keepdim=True)
    return (num / torch.where(den > 0, den, torch.ones_like(den))).to(parts[0].values.dtype)


class LayerCache:
    """One layer's decoding memory for ``batch`` sequences of ``n_head`` heads.

    ``prefill(k, v)`` takes the keys/values of positions 0..P-1 (the prompt, whose
    outputs the full forward pass computed); ``step(q, k, v, pos)`` adds position
    ``pos`` and returns its attention output. Buffers are allocated on first use
    with the incoming dtype and device. Keys and values have ``n_kv_head`` heads
    (default ``n_head``), shared by groups of query heads; ``modifier`` changes the
    scores; ``context`` (the training context) places the sinks when streaming.
    """

    streams: bool = False  # True when memory is bounded, so decoding may run past the context
    doc_start: torch.Tensor | None = None  # [B] where the current document begins (document masking), set per call

    def __init__(
        self,
        pattern: Pattern,
        batch: int,
        n_head: int,
        max_len: int,
        n_kv_head: int | None = None,
        modifier=None,
        context: int | None = None,
    ):
        self.pattern, self.batch, self.n_head, self.max_len = pattern, batch, n_head, max_len
        self.n_kv_head = n_kv_head or n_head
        self.group = n_head // self.n_kv_head  # query heads per key/value head
        self.modifier, self.context = modifier, context
        if modifier is not None and not modifier.streams:
            self.streams = False  # an absolute-position modifier: past the context it would not be exact
        self.length = 0  # positions seen

    @classmethod
    def shares_heads(cls, pattern: Pattern, n_head: int, n_kv_head: int) -> bool:
        """Whether this kind can store ``n_kv_head`` shared heads for ``pattern`` (default: what it keeps is the
        same for every head)."""
        return True

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, q, k, v, pos: int, shift_sinks: Rotation | None = None) -> torch.Tensor:
        self._write(k, v, pos)
        self.length = pos + 1
        return attend_parts(self.in_document(self._parts(q, pos, shift_sinks)), self.modifier)

    def in_document(self, parts: Sequence[Part]) -> list[Part]:
        """``parts`` with the keys of earlier documents masked out (unchanged without document masking)."""
        if self.doc_start is None:
            return list(parts)
        return [self._in_document(Part(*p)) for p in parts]

    def _in_document(self, p: Part) -> Part:
        if p.k_pos is None:
            raise ValueError("this KV cache gives no key positions, so it cannot mask documents")
        assert self.doc_start is not None
        device = p.q.device
        k_pos = p.k_pos.to(device)  # [S] or [Hkv, 1, S]
        keep = k_pos >= self.doc_start.to(device).view(-1, 1, 1, 1)  # [B, 1 or Hkv, 1, S]
        if self.group > 1 and keep.shape[1] > 1:  # per key/value head: one row per query head
            keep = keep.repeat_interleave(self.group, dim=1)
        return p._replace(mask=keep if p.mask is None else p.mask & keep)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def held(self) -> list[set[int]]:
        """Positions whose key each head still holds (for tests)."""
        raise NotImplementedError

    # subclass hooks
    def _write(self, k, v, pos: int) -> None:
        raise NotImplementedError

    def _parts(self, q, pos: int, shift_sinks) -> list[Part]:
        raise NotImplementedError

    def _tensors(self) -> list[torch.Tensor]:
        return []


def _uniform_groups(pattern: Pattern, n_head: int, n_kv_head: int) -> bool:
    """Every group of query heads sharing a key/value head lies inside one of the pattern's head groups (one rule)."""
    group = n_head // n_kv_head
    groups = pattern.head_groups(n_head)
    if groups is None:  # no hand-made head groups: the heads cannot be told apart here
        return False
    owner = {h: i for i, g in enumerate(groups) for h in g.heads}
    return all(len({owner[h] for h in range(g * group, (g + 1) * group)}) == 1 for g in range(n_kv_head))


class Slots:
    """Preallocated key/value slots [B, H, n, D], created on first write (H: the stored key/value heads)."""

    k: torch.Tensor  # [B, H, n, Dqk] and [B, H, n, Dv], allocated by the first write (its dtype and device)
    v: torch.Tensor

    def __init__(self, batch: int, n_head: int, n: int):
        self.shape = (batch, n_head, n)

    @property
    def allocated(self) -> bool:
        return hasattr(self, "k")

    def write(self, index, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.allocated:
            self.k = k.new_zeros(*self.shape, k.shape[-1])
            self.v = v.new_zeros(*self.shape, v.shape[-1])
        self.k[:, :, index] = k
        self.v[:, :, index] = v

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v] if self.allocated else []


# ------------------------------------------------------------------ the caches


class AppendCache(LayerCache):
    """dense / block_layout: every position, appended in order; a step reads the filled prefix only."""

    def __init__(self, pattern, batch, n_head, max_len, **kw):
        super().__init__(pattern, batch, n_head, max_len, **kw)
        self.slots = Slots(batch, self.n_kv_head, max_len)
        self.heads = torch.arange(n_head)[:, None]  # query heads: the rule may differ per head

    def prefill(self, k, v):
        P = k.shape[2]
        self.slots.write(slice(0, P), k, v)
        self.length = P

    def _write(self, k, v, pos):
        self.slots.write(slice(pos, pos + 1), k, v)

    def _parts(self, q, pos, shift_sinks):
        n = pos + 1
        mask = keys = None
        if not self.pattern.is_dense_causal or self.modifier is not None or self.doc_start is not None:
            keys = torch.arange(n, device=q.device)
        if not self.pattern.is_dense_causal:  # block_layout or a fallback: the pattern's rule over the filled slots
            mask = self.pattern.allowed(torch.tensor(pos, device=q.device), keys[None, :], self.heads.to(q.device))[
                :, None, :
            ]
        return [Part(q, self.slots.k[:, :, :n], self.slots.v[:, :, :n], mask, keys, pos)]

    def held(self):
        return [set(range(self.length)) for _ in range(self.n_head)]

    def _tensors(self):
        return self.slots.tensors()


class Ring:
    """The last ``size`` positions of some heads: position p lives in slot p mod size."""

    def __init__(self, batch: int, n_head: int, size: int):
        self.size = size
        self.slots = Slots(batch, n_head, size)
        self.pos = torch.full((size,), -1, dtype=torch.long)
        self.full = False

    def write(self, k, v, first: int) -> None:
        """Write positions first..first+t-1 (only the last ``size`` of them can stay)."""
        t = k.shape[2]
        skip = max(0, t - self.size)
        positions = torch.arange(first + skip, first + t)
        self.slots.write(positions % self.size, k[:, :, skip:], v[:, :, skip:])
        self.pos[positions % self.size] = positions
        self.full = self.full or bool((self.pos >= 0).all())

    def part(self, q, q_pos: int | None = None) -> Part:
        """The filled slots; until the ring is full, empty slots are cut off or masked."""
        if self.full:
            return Part(q, self.slots.k, self.slots.v, None, self.pos, q_pos)
        filled = self.pos >= 0
        n = int(filled.nonzero().max()) + 1
        mask = None if bool(filled[:n].all()) else filled[:n].to(q.device)
        return Part(q, self.slots.k[:, :, :n], self.slots.v[:, :, :n], mask, self.pos[:n], q_pos)

    def held(self) -> set[int]:
        return set(self.pos[self.pos >= 0].tolist())


class SinkWindowCache(LayerCache):
    """StreamingLLM: slots 0..s-1 hold the sinks, slots s.. a ring of the last ``window`` positions.

    One buffer, so a step is one fused attention call (masking empty slots only
    until the ring is full). Streaming past the context with RoPE, each step
    writes the sinks re-positioned by ``shift_sinks`` from a kept copy.
    """

    streams = True

    def __init__(self, pattern, batch, n_head, max_len, **kw):
        super().__init__(pattern, batch, n_head, max_len, **kw)
        self.sinks, self.window = pattern.sinks, min(pattern.window, max_len)
        self.slots = Slots(batch, self.n_kv_head, self.sinks + self.window)
        self.pos = torch.full((self.sinks + self.window,), -1, dtype=torch.long)
        self.full = False
        self.sink_keys = None  # the sinks as written (at their true positions), for re-positioning

    def _slot(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.where(positions < self.sinks, positions, self.sinks + positions % self.window)

    def prefill(self, k, v):
        P = k.shape[2]
        keep = torch.cat([torch.arange(min(self.sinks, P)), torch.arange(min(max(self.sinks, P - self.window), P), P)])
        self._store(k[:, :, keep], v[:, :, keep], keep)
        self.length = P

    def _write(self, k, v, pos):
        self._store(k, v, torch.tensor([pos]))

    def _store(self, k, v, positions: torch.Tensor) -> None:
        slots = self._slot(positions)
        self.slots.write(slots, k, v)
        self.pos[slots] = positions
        self.full = self.full or bool((self.pos >= 0).all())
        if bool((positions < self.sinks).any()):
            self.sink_keys = self.slots.k[:, :, : self.sinks].clone()

    def _parts(self, q, pos, shift_sinks):
        if shift_sinks is not None and self.sinks:
            self.slots.k[:, :, : self.sinks] = shift_sinks(self.sink_keys)
        q_pos = None
        if self.modifier is not None:  # the sinks are seen from where the last query of a training sequence saw them
            sink_from = pos if self.context is None else min(pos, self.context - 1)
            q_pos = torch.where(torch.arange(len(self.pos)) < self.sinks, sink_from, pos)
        mask = None if self.full else (self.pos >= 0).to(q.device)
        return [Part(q, self.slots.k, self.slots.v, mask, self.pos, q_pos)]

    def held(self):
        return [set(self.pos[self.pos >= 0].tolist()) for _ in range(self.n_head)]

    def _tensors(self):
        return self.slots.tensors() + ([] if self.sink_keys is None else [self.sink_keys])


class StridedCache(LayerCache):
    """strided(l): local heads keep a ring of l; strided heads keep every position.

    A strided head's query i reads keys i, i-l, i-2l, ...: one residue class,
    a strided view of the append-only buffer (no copy). ``union`` heads read the
    last l positions and, beyond them, the residue class, merged in one softmax.
    """

    pattern: Strided

    def __init__(self, pattern: Strided, batch, n_head, max_len, **kw):
        super().__init__(pattern, batch, n_head, max_len, **kw)
        l, mode = pattern.local_attn_ctx, pattern.mode
        if mode == "split":
            self.n_local = pattern.n_head // 2
        else:
            self.n_local = n_head if (mode == "interleave" and pattern.part == "local") else 0
        self.union = mode == "union"
        self.kv_local = self.n_local // self.group  # key/value heads of the local query heads (whole groups)
        self.ring = Ring(batch, self.kv_local, l) if self.n_local else None
        self.all = Slots(batch, self.n_kv_head - self.kv_local, max_len) if self.n_local < n_head else None

    @classmethod
    def shares_heads(cls, pattern, n_head, n_kv_head):
        return _uniform_groups(pattern, n_head, n_kv_head)

    def prefill(self, k, v):
        P, h = k.shape[2], self.kv_local
        if self.ring:
            self.ring.write(k[:, :h], v[:, :h], 0)
        if self.all:
            self.all.write(slice(0, P), k[:, h:], v[:, h:])
        self.length = P

    def _write(self, k, v, pos):
        h = self.kv_local
        if self.ring:
            self.ring.write(k[:, :h], v[:, :h], pos)
        if self.all:
            self.all.write(slice(pos, pos + 1), k[:, h:], v[:, h:])

    def step(self, q, k, v, pos, shift_sinks=None):
        self._write(k, v, pos)
        self.length = pos + 1
        h, outs, heads = self.n_local, [], torch.arange(self.n_head)
        if self.ring:
            outs.append(attend_parts(self.in_document([self.ring.part(q[:, :h], pos)]), self.modifier, heads[:h]))
        if self.all:  # the strided heads come after the local ones: their head indices start at h
            outs.append(attend_parts(self.in_document(self._strided_parts(q[:, h:], pos)), self.modifier, heads[h:]))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _strided_parts(self, q, pos) -> list[Part]:
        assert self.all is not None  # called for the strided heads only
        l, K, V = self.pattern.local_attn_ctx, self.all.k, self.all.v
        r = pos % l
        if not self.union:
            return [Part(q, K[:, :, r : pos + 1 : l], V[:, :, r : pos + 1 : l], None, torch.arange(r, pos + 1, l), pos)]
        near = max(0, pos - l + 1)  # the window; the residue class continues below it
        far = slice(r, max(near, r), l)
        return [
            Part(q, K[:, :, near : pos + 1], V[:, :, near : pos + 1], None, torch.arange(near, pos + 1), pos),
            Part(q, K[:, :, far], V[:, :, far], None, torch.arange(far.start, far.stop, l), pos),
        ]

    def held(self):
        local = self.ring.held() if self.ring else set()
        return [local if h < self.n_local else set(range(self.length)) for h in range(self.n_head)]

    def _tensors(self):
        return (self.ring.slots.tensors() if self.ring else []) + (self.all.tensors() if self.all else [])


class FixedCache(LayerCache):
    """fixed(l, c): the summary columns of every finished chunk, then the current chunk, in one buffer.

    The current chunk sits right after the summaries, so a step reads one
    contiguous prefix (one fused attention call). When a chunk finishes, each head
    keeps its own c summary columns of it (heads of different ``num_verts`` groups
    keep different offsets, all keep c), moved down to where the chunk began.
    A key/value head shared by query heads of different groups keeps the union
    of their columns, and each query head is masked to its own.
    """

    pattern: Fixed

    def __init__(self, pattern: Fixed, batch, n_head, max_len, **kw):
        super().__init__(pattern, batch, n_head, max_len, **kw)
        l, H = pattern.local_attn_ctx, self.n_kv_head
        # A key of an earlier chunk (query at l, key at offset o < l) is visible iff it is a summary column.
        per_query = self._visible(pattern, n_head).view(H, self.group, l)
        kept = per_query.any(1)  # [Hkv, l]: the columns some query head of the group sees
        self.offsets = kept.nonzero()[:, 1].view(H, -1)  # [Hkv, c'], the same c' for every key/value head
        own = per_query.gather(2, self.offsets[:, None, :].expand(H, self.group, -1))  # [Hkv, group, c']
        self.own = None if bool(own.all()) else own.reshape(n_head, 1, -1)  # each query head's own kept columns
        size = (max_len // l) * self.offsets.shape[1] + l
        self.slots = Slots(batch, H, size)
        self.positions = torch.full((H, 1, size), -1, dtype=torch.long)  # each slot's position, for modifiers
        self.n_summary = 0

    @staticmethod
    def _visible(pattern: Fixed, n_head: int) -> torch.Tensor:
        l = pattern.local_attn_ctx
        return pattern.allowed(torch.tensor(l), torch.arange(l)[None, :], torch.arange(n_head)[:, None]).expand(
            n_head, l
        )

    @classmethod
    def shares_heads(cls, pattern, n_head, n_kv_head):
        kept = cls._visible(pattern, n_head).view(n_kv_head, n_head // n_kv_head, -1).any(1).sum(1)
        return bool((kept == kept[0]).all())  # every key/value head keeps as many columns (one buffer)

    def prefill(self, k, v):
        l, P = self.pattern.local_attn_ctx, k.shape[2]
        for c0 in range(0, P, l):
            n = min(l, P - c0)
            self.slots.write(slice(self.n_summary, self.n_summary + n), k[:, :, c0 : c0 + n], v[:, :, c0 : c0 + n])
            self.positions[:, :, self.n_summary : self.n_summary + n] = torch.arange(c0, c0 + n)
            if n == l:
                self._finish_chunk(c0)
        self.length = P

    def _finish_chunk(self, start: int) -> None:
        """Keep only the just-finished chunk's (it began at position ``start``) summary columns."""
        l, (B, H, _, D), c = self.pattern.local_attn_ctx, self.slots.k.shape, self.offsets.shape[1]
        chunk = slice(self.n_summary, self.n_summary + l)
        index = self.offsets.to(self.slots.k.device)[None, :, :, None]
        k = self.slots.k[:, :, chunk].gather(2, index.expand(B, H, c, D))
        v = self.slots.v[:, :, chunk].gather(2, index.expand(B, H, c, self.slots.v.shape[-1]))
        self.slots.write(slice(self.n_summary, self.n_summary + c), k, v)
        self.positions[:, 0, self.n_summary : self.n_summary + c] = start + self.offsets
        self.n_summary += c

    def step(self, q, k, v, pos, shift_sinks=None):
        l = self.pattern.local_attn_ctx
        end = self.n_summary + pos % l + 1
        self.slots.write(slice(end - 1, end), k, v)
        self.positions[:, :, end - 1] = pos
        self.length = pos + 1
        mask = None
        if self.own is not None and self.n_summary:  # shared columns: each query head reads only its own
            chunks = self.n_summary // self.offsets.shape[1]
            mask = torch.cat(
                [self.own.repeat(1, 1, chunks), self.own.new_ones(self.n_head, 1, end - self.n_summary)], -1
            )
            mask = mask.to(q.device)
        out = attend_parts(
            self.in_document(
                [Part(q, self.slots.k[:, :, :end], self.slots.v[:, :, :end], mask, self.positions[:, :, :end], pos)]
            ),
            self.modifier,
        )
        if pos % l == l - 1:
            self._finish_chunk(pos - l + 1)
        return out

    def held(self):
        l = self.pattern.local_attn_ctx
        done = self.length // l * l
        current = set(range(done, self.length))
        own = [
            self.offsets[h // self.group][self.own[h, 0] if self.own is not None else slice(None)].tolist()
            for h in range(self.n_head)
        ]
        return [current | {c0 + o for c0 in range(0, done, l) for o in own[h]} for h in range(self.n_head)]

    def _tensors(self):
        return self.slots.tensors()


class LinearCache(LayerCache):
    """linear: the recurrent state ``(S, z)``; constant memory, one ``linear_step`` per token."""

    pattern: Linear

    streams = True

    def __init__(self, pattern, batch, n_head, max_len, **kw):
        super().__init__(pattern, batch, n_head, max_len, **kw)
        self.state: LinearState | None = None  # per key/value head: the state depends on keys and values only

    def prefill(self, k, v):
        phi = feature_map(self.pattern.feature_map)
        fk, vw = phi(k.float()), v.float()
        if self.doc_start is not None:  # only the current document's keys make the state
            keep = torch.arange(k.shape[2], device=k.device) >= self.doc_start.to(k.device)[:, None]
            fk = fk * keep[:, None, :, None]
        self.state = LinearState(fk.transpose(-2, -1) @ vw, fk.sum(-2))
        self.length = k.shape[2]

    def step(self, q, k, v, pos, shift_sinks=None):
        if self.state is None:
            self.state = LinearState.zeros(self.batch, self.n_kv_head, k.shape[-1], v.shape[-1], k.device)
        if self.doc_start is not None:  # a document begins here: nothing before it counts
            fresh = (self.doc_start.to(k.device) == pos).view(-1, 1, 1)
            self.state = LinearState(
                self.state.s.masked_fill(fresh[..., None], 0.0), self.state.z.masked_fill(fresh, 0.0)
            )
        if self.group == 1:
            out, self.state = linear_step(q, k, v, self.state, self.pattern.feature_map)
        else:
            out = self._grouped_step(q, k, v)
        self.length = pos + 1
        return out

    def _grouped_step(self, q, k, v, eps: float = 1e-6) -> torch.Tensor:
        """``linear_step`` for one position with shared key/value heads: one state per group of query heads."""
        phi = feature_map(self.pattern.feature_map)
        fk, vw = phi(k.float()), v.float()
        assert self.state is not None  # step() starts it
        self.state = LinearState(self.state.s + fk.transpose(-2, -1) @ vw, self.state.z + fk.sum(-2))
        B, H, _, D = q.shape
        fq = phi(q.float()).reshape(B, self.n_kv_head, self.group, D)  # the group's query heads as rows
        num = fq @ self.state.s
        den = (fq * self.state.z[:, :, None, :]).sum(-1, keepdim=True)
        return (num / (den + eps)).reshape(B, H, 1, -1).to(q.dtype)

    def held(self):
        return [set() for _ in range(self.n_head)]

    def _tensors(self):
        return [] if self.state is None else [self.state.s, self.state.z]


class GenericCache(LayerCache):
    """Any pattern without a specialised cache: the keys a later query can still reach, read through the
    pattern's own rule. With ``reach()`` (the largest i - j the rule allows) a ring of the last reach + 1
    positions, so memory is bounded (and decoding streams past the context if the rule depends on i - j
    only); without, every position, appended."""

    def __init__(self, pattern, batch, n_head, max_len, **kw):
        super().__init__(pattern, batch, n_head, max_len, **kw)
        reach = pattern.reach()
        self.ring = Ring(batch, self.n_kv_head, min(reach + 1, max_len) if reach is not None else max_len)
        self.streams = cache_streams(pattern) and (self.modifier is None or self.modifier.streams)
        self.heads = torch.arange(n_head)[:, None]  # query heads: the rule may differ per head

    def prefill(self, k, v):
        self.ring.write(k, v, 0)
        self.length = k.shape[2]

    def _write(self, k, v, pos):
        self.ring.write(k, v, pos)

    def _parts(self, q, pos, shift_sinks):
        held = self.ring.pos.to(q.device)
        mask = self.pattern.allowed(torch.tensor(pos, device=q.device), held[None, :], self.heads.to(q.device)) & (
            held >= 0
        )
        return [Part(q, self.ring.slots.k, self.ring.slots.v, mask[:, None, :], self.ring.pos, pos)]

    def held(self):
        return [self.ring.held() for _ in range(self.n_head)]

    def _tensors(self):
        return self.ring.slots.tensors()


class LocalCache(GenericCache):
    """local(w): a ring of the last w positions; memory constant in the generated length. Every held key is in
    the window, so a step reads the ring without a mask."""

    def _parts(self, q, pos, shift_sinks):
        return [self.ring.part(q, pos)]


# ------------------------------------------------------------------ registry

# Cache kinds a pattern may name as its ``cache`` hint; a pattern that names none gets GenericCache.
CACHES: dict[str, type[LayerCache]] = {
    "append": AppendCache,
    "ring": LocalCache,
    "sink_ring": SinkWindowCache,
    "strided": StridedCache,
    "fixed": FixedCache,
    "linear_state": LinearCache,
}


def cache_kind(pattern: Pattern) -> type[LayerCache]:
    """The cache class for ``pattern``: its ``cache`` hint (a kind in ``CACHES`` or a LayerCache class), else generic."""
    kind = pattern.cache
    if kind is None:
        return GenericCache
    if isinstance(kind, type) and issubclass(kind, LayerCache):
        return kind
    if kind not in CACHES:
        raise ValueError(
            f"pattern {pattern.name!r} names unknown cache kind {kind!r}: use one of {', '.join(CACHES)} "
            f"or a LayerCache subclass"
        )
    return CACHES[kind]


def cache_streams(pattern: Pattern) -> bool:
    """Whether ``pattern``'s cache has bounded memory, so decoding may run past the training context."""
    kind = cache_kind(pattern)
    if issubclass(kind, GenericCache):
        return pattern.reach() is not None and pattern.translation_invariant
    return kind.streams


def make_cache(
    pattern: Pattern,
    batch: int,
    n_head: int,
    max_len: int,
    *,
    n_kv_head: int | None = None,
    modifier=None,
    context: int | None = None,
) -> LayerCache:
    """An empty cache for one layer of ``pattern`` (see ``cache_kind``), storing ``n_kv_head`` key/value heads and
    applying the score ``modifier`` (see ``LayerCache``)."""
    kind = cache_kind(pattern)
    if n_kv_head and n_kv_head < n_head and not kind.shares_heads(pattern, n_head, n_kv_head):
        kind = AppendCache  # the query heads of a group differ in what they keep: keep all, mask with the rule
    return kind(pattern, batch, n_head, max_len, n_kv_head=n_kv_head, modifier=modifier, context=context)


class ModelCache:
    """Every layer's cache, plus how many positions the model has consumed."""

    def __init__(self, layers: list[LayerCache], context: int):
        self.layers, self.context = layers, context
        self.docs: DocState | None = None  # where the documents of the tokens consumed so far left off

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def streams(self) -> bool:
        """Every layer's memory is bounded, so decoding may continue past the training context."""
        return all(c.streams for c in self.layers)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


__all__ = [
    "attend_parts",
    "Part",
    "LayerCache",
    "GenericCache",
    "ModelCache",
    "cache_kind",
    "cache_streams",
    "make_cache",
    "CACHES",
]
