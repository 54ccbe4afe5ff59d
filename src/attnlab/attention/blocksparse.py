"""Block-sparse attention for any device (CPU included): time and memory grow with the attended blocks.

A pattern is split into groups of identical heads, each computed by one or more
components (``Pattern.head_groups``). A component lists, in its own token order,
the key blocks each query block touches; the kernel visits query blocks in
chunks, gathers their key/value blocks, and runs a masked softmax over just
those keys. Like FlashAttention it keeps only the output and the per-query
log-sum-exp for backward, and recomputes the scores there, so no tensor ever
has T x T entries and peak memory is a few chunks above the inputs' size.

On the CPU, in fp32 without dropout or score modifiers, a lone component's chunk
runs through PyTorch's fused CPU attention (one op forward, one backward, the
chunk's mask as an additive bias; the output and log-sum-exp are kept the same
way): far fewer operations per chunk, each of which a shared CPU makes wait.

Several components of one head (strided ``union``: the window in token order,
the strided keys in the reordered order) are merged exactly through their
log-sum-exps; their masks are disjoint by construction.

Score modifiers are applied to each computed block with its pairs' original
positions (kept in the plan), before the mask. Backward recomputes the
modified scores and takes the modifier's gradient (to the raw scores and to
its parameters, e.g. a learned bias) from autograd of its one definition, a
chunk at a time.

Document masking (``doc``, ids [B, T]) is one more elementwise mask inside each
visited block, doc_q[i] == doc_k[j] gathered with the block's keys: the cost
stays proportional to the visited blocks, with no T x T tensor. Key-block slots
of a chunk whose document range (per row, per block) meets no query block's in
any row are dropped before the scores are computed (``_live``): long rows of
short documents visit far fewer blocks than the pattern alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from .heads import expand_kv
from .patterns import Component, Pattern

# Largest additive bias (one query block's mask) kept in a plan; larger ones are built per call.
_BIAS_KEEP_ELEMS = 1 << 15
# Score entries per chunk per (batch, head) and CPU thread: bounds the working memory of one step. With more
# threads a chunk grows with them (up to _MAX_CHUNK_THREADS): each thread keeps the same share, and there are
# fewer parallel regions, each of which waits for every thread (slow when another process competes for a core).
_CHUNK_ELEMS = 1 << 17
_MAX_CHUNK_THREADS = 4


@dataclass
class _Chunk:
    q0: int  # first query block
    q1: int  # one past the last query block
    kv: torch.Tensor  # [n, m] key blocks per query block (padding slots repeat block 0, masked out)
    masks: list[tuple[slice, torch.Tensor]]  # (key columns, [n, q_block, cols] True = may NOT attend) per run of
    # key-block slots that hold a masked pair (e.g. a band's first and diagonal blocks); full blocks need none
    empty_rows: bool  # some query (e.g. padding) attends no key: its softmax row must be zeroed
    sees_self: bool  # every query attends its own position here, so document masking empties no row
    qpos: torch.Tensor  # [n, q_block, 1] original position of each query row (for score modifiers)
    kpos: torch.Tensor  # [n, 1, m*block] original position of each gathered key column
    bias: torch.Tensor | None = None  # [1, 1, q_block, m*block] 0 / -inf: the mask as an additive bias, kept
    # where every query block of the chunk has the same one and it is small (else built per call)


@dataclass
class _ComponentPlan:
    block: int  # key block
    q_group: int  # key blocks per query block: queries go q_group * block at a time
    length: int  # padded length: a multiple of the query block (and of the stride)
    order: torch.Tensor | None  # [length] original position held at each new position; None = identity
    chunks: list[_Chunk]


@dataclass
class _GroupPlan:
    heads: slice | list[int]  # a slice when contiguous: selecting them is then a view, not a copy
    components: list[_ComponentPlan]
    head_idx: torch.Tensor  # [h, 1, 1, 1] the heads' indices, broadcasting over a block's scores (modifiers)


@functools.lru_cache(maxsize=64)
def plan(
    pattern: Pattern, T: int, n_head: int, device: torch.device, chunk_elems: int = _CHUNK_ELEMS
) -> tuple[_GroupPlan, ...]:
    """What to compute for ``pattern`` at length ``T``: cached per pattern, length, device and chunk size."""
    groups = []
    for g in pattern.kernel_groups(n_head, T):
        comps = [_plan_component(pattern, c, g.heads[0], T, device, chunk_elems) for c in g.components]
        # Reordered or merged components copy their inputs: go one head at a time to keep those copies small.
        one_by_one = len(comps) > 1 or any(cp.order is not None for cp in comps)
        groups += [
            _GroupPlan(_head_index(hs), comps, torch.tensor(hs, device=device).view(-1, 1, 1, 1))
            for hs in ([(h,) for h in g.heads] if one_by_one else [g.heads])
        ]
    return tuple(groups)


def _head_index(heads: tuple[int, ...]) -> slice | list[int]:
    contiguous = list(heads) == list(range(heads[0], heads[0] + len(heads)))
    return slice(heads[0], heads[0] + len(heads)) if contiguous else list(heads)


def _plan_component(pattern: Pattern, comp: Component, head: int, T: int, device, chunk_elems) -> _ComponentPlan:
    b, r, s = comp.block, comp.q_group, comp.stride or 1
    qb_size = b * r
    strided_len = -(-T // s) * s
    length = -(-strided_len // qb_size) * qb_size
    order = None
    if comp.stride:
        order = torch.arange(strided_len).view(-1, s).t().reshape(-1)  # p -> (p mod s, p div s)
        order = torch.cat([order, torch.arange(strided_len, length)])
    pos = order if order is not None else torch.arange(length)
    nk, nq = length // b, length // qb_size
    blocks = torch.arange(nk)
    layout = comp.layout(blocks.view(nk, 1), blocks.view(1, nk), b, strided_len).view(nq, r, nk).any(1)
    counts = layout.sum(1)
    # Active key blocks first, in ascending order; padding slots hold nk (replaced by block 0 below).
    ranked = torch.where(layout, blocks.view(1, nk), nk + blocks.view(1, nk)).sort(dim=1).values
    chunks, q0 = [], 0
    while q0 < nq:  # consecutive query blocks, each chunk padded to its own widest row
        q1, m = q0 + 1, max(int(counts[q0]), 1)
        while q1 < nq and (q1 - q0 + 1) * max(m, int(counts[q1])) * b * qb_size <= chunk_elems:
            m, q1 = max(m, int(counts[q1])), q1 + 1
        n, kv = q1 - q0, ranked[q0:q1, :m]
        valid = kv < nk
        kv = torch.where(valid, kv, 0)
        qpos = pos[q0 * qb_size : q1 * qb_size].view(n, qb_size, 1)
        kpos = pos[(kv.view(n, m, 1) * b + torch.arange(b)).view(n, 1, m * b)]
        mask = (
            pattern.allowed(qpos, kpos, torch.tensor(head))
            & valid.repeat_interleave(b, dim=1).view(n, 1, m * b)
            & (kpos < T)
        )
        if comp.select is not None:
            mask = mask & comp.select(qpos, kpos)
        sees_self = bool((mask & (kpos == qpos)).any(-1).all())  # padding queries never do
        chunks.append(
            _Chunk(
                q0,
                q1,
                kv.to(device),
                _mask_runs(mask, b, device),
                not bool(mask.any(-1).all()),
                sees_self,
                qpos.to(device),
                kpos.to(device),
                _shared_bias(mask, device),
            )
        )
        q0 = q1
    return _ComponentPlan(b, r, length, None if order is None else order.to(device), chunks)


def _shared_bias(mask: torch.Tensor, device) -> torch.Tensor | None:
    """[1, 1, qb, cols] additive form of ``mask`` [n, qb, cols] when all n rows of blocks share it and it is small."""
    if mask[0].numel() > _BIAS_KEEP_ELEMS or not bool((mask == mask[:1]).all()):
        return None
    return torch.zeros(mask.shape[1:]).masked_fill_(~mask[0], -math.inf).view(1, 1, *mask.shape[1:]).to(device)


def _mask_runs(mask: torch.Tensor, block: int, device) -> list[tuple[slice, torch.Tensor]]:
    """The blocked entries of ``mask`` [n, qb, m*block], stored only for runs of key-block slots that have any."""
    partial = (~mask).view(mask.shape[0], mask.shape[1], -1, block).any(3).any(1).any(0).tolist()
    runs, slot = [], 0
    while slot < len(partial):
        if partial[slot]:
            end = slot
            while end < len(partial) and partial[end]:
                end += 1
            cols = slice(slot * block, end * block)
            runs.append((cols, (~mask[:, :, cols]).contiguous().to(device)))
            slot = end
        else:
            slot += 1
    return runs


# ------------------------------------------------------------------ kernel


def _to_order(x: torch.Tensor, cp: _ComponentPlan) -> torch.Tensor:
    """[B,H,T,D] in original order -> [B,H,length,D] in the component's order, zero-padded."""
    B, H, T, D = x.shape
    if cp.length > T:
        x = torch.cat([x, x.new_zeros(B, H, cp.length - T, D)], dim=2)
    if cp.order is not None:
        x = x.index_select(2, cp.order)
    return x


def _from_order(x: torch.Tensor, cp: _ComponentPlan, T: int) -> torch.Tensor:
    """Inverse of ``_to_order`` for [B,H,length,...] tensors: back to original order, cropped to T."""
    if cp.order is not None:
        x = torch.empty_like(x).index_copy_(2, cp.order, x)
    return x[:, :, :T]


def _rows(x: torch.Tensor, ch: _Chunk, cp: _ComponentPlan) -> torch.Tensor:
    """The chunk's query rows of [B,H,length,D']: [B,H,n,qb,D']."""
    B, H, _, D = x.shape
    q_block = cp.block * cp.q_group
    return x[:, :, ch.q0 * q_block : ch.q1 * q_block].view(B, H, ch.q1 - ch.q0, q_block, D)


def _gather(x: torch.Tensor, kv: torch.Tensor, block: int) -> torch.Tensor:
    """Key blocks kv [n, m] of [B,H,length,D] -> [B,H,n,m*block,D] (index_select: a fast contiguous copy)."""
    B, H, L, D = x.shape
    blocks = x.view(B, H, L // block, block * D).index_select(2, kv.reshape(-1))
    return blocks.view(B, H, kv.shape[0], kv.shape[1] * block, D)


def _scatter_add(dst: torch.Tensor, kv: torch.Tensor, src: torch.Tensor, block: int) -> None:
    """dst [B,H,length,D] += src [B,H,n,m*block,D] at the key blocks kv [n, m]."""
    B, H, L, D = dst.shape
    dst.view(B, H, L // block, block * D).index_add_(2, kv.reshape(-1), src.reshape(B, H, -1, block * D))


def _doc_order(doc: torch.Tensor | None, cp: _ComponentPlan) -> torch.Tensor | None:
    """Document ids [B, T] -> [B, length] in the component's order (padding: -1, never a real document)."""
    if doc is None:
        return None
    if cp.length > doc.shape[1]:
        doc = torch.cat([doc, doc.new_full((doc.shape[0], cp.length - doc.shape[1]), -1)], dim=1)
    return doc if cp.order is None else doc.index_select(1, cp.order)


def _doc_blocked(doc: torch.Tensor | None, ch: _Chunk, cp: _ComponentPlan) -> torch.Tensor | None:
    """[B, 1, n, qb, m*block] True where query and gathered key lie in different documents (broadcasts over heads)."""
    if doc is None:
        return None
    B, L = doc.shape
    q_block, (n, m) = cp.block * cp.q_group, ch.kv.shape
    dq = doc[:, ch.q0 * q_block : ch.q1 * q_block].view(B, n, q_block, 1)
    dk = doc.view(B, L // cp.block, cp.block).index_select(1, ch.kv.reshape(-1)).view(B, n, 1, m * cp.block)
    return (dq != dk).unsqueeze(1)


def _doc_ranges(doc: torch.Tensor | None, cp: _ComponentPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row, the smallest and largest document of every key block and of every query block, in the
    component's order: ([2, B, nk], [2, B, nq]), lo and hi stacked (padding's -1 only widens a range: safe)."""
    if doc is None:
        return None
    B, L = doc.shape
    blocks = doc.view(B, L // cp.block, cp.block)
    key = torch.stack([blocks.amin(-1), blocks.amax(-1)])  # [2, B, nk]
    q = key.view(2, B, -1, cp.q_group)
    return key, torch.stack([q[0].amin(-1), q[1].amax(-1)])  # [2, B, nq]


def _live(ch: _Chunk, cp: _ComponentPlan, ranges) -> _Chunk:
    """``ch`` without the key-block slots where no query block of the chunk, in any row, can share a document."""
    if ranges is None:
        return ch
    key, query = ranges
    qlo, qhi = (query[i][:, ch.q0 : ch.q1, None] for i in (0, 1))  # [B, n, 1]
    klo, khi = key[0][:, ch.kv], key[1][:, ch.kv]  # [B, n, m]
    keep = ((klo <= qhi) & (khi >= qlo)).flatten(0, 1).any(0)  # [m] slots some query block still needs
    if bool(keep.all()):
        return ch
    keep[0] |= not bool(keep.any())  # keep a slot: no shape is ever empty
    b = cp.block
    slots = keep.nonzero().flatten()
    cols = (slots[:, None] * b + torch.arange(b, device=slots.device)).flatten()
    before = keep.cumsum(0) - keep.long()  # new slot index of each old slot
    masks = []
    for span, blocked in ch.masks:  # each run's kept slots stay consecutive
        s0, s1 = span.start // b, span.stop // b
        sel = keep[s0:s1].nonzero().flatten()
        if sel.numel():
            start = int(before[s0 + int(sel[0])])
            run_cols = (sel[:, None] * b + torch.arange(b, device=sel.device)).flatten()
            masks.append((slice(start * b, (start + sel.numel()) * b), blocked[:, :, run_cols]))
    return dataclasses.replace(ch, kv=ch.kv[:, slots], masks=masks, kpos=ch.kpos[..., cols])


def _empty(ch: _Chunk, doc: torch.Tensor | None) -> bool:
    """Whether some softmax row of the chunk may have no key (all -inf): padding, or documents cutting a row off."""
    return ch.empty_rows or (doc is not None and not ch.sees_self)


def _dropout_keep(seed: int, index: int, shape, p: float, device) -> torch.Tensor:
    """The same scaled keep-mask in forward and backward, regenerated from (seed, chunk index)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    return (torch.rand(shape, generator=gen, device=device) >= p) / (1.0 - p)


def _salt(group: int, component: int) -> int:
    """Offset of a (head group, component)'s dropout streams; chunk i of it uses salt + i, in forward and backward."""
    return 1000 * (4 * group + component)


def _raw_scores(qs, kc, ch: _Chunk, cp: _ComponentPlan) -> torch.Tensor:
    """Scores of the chunk's rows of the pre-scaled queries ``qs`` with its gathered keys ``kc``: [B,H,n,qb,m*b]."""
    return _rows(qs, ch, cp) @ kc.transpose(-1, -2)


def _masked(s: torch.Tensor, ch: _Chunk, raw, mod, heads, doc_blocked=None) -> torch.Tensor:
    """The raw scores, modified (a new tensor: ``raw`` stays for backward) and masked in place."""
    if mod is not None:
        s = mod.score(raw, ch.qpos, ch.kpos, heads)
    for cols, blocked in ch.masks:
        s[..., cols].masked_fill_(blocked, -math.inf)
    if doc_blocked is not None:
        s.masked_fill_(doc_blocked, -math.inf)
    return s


def _modifier_backward(mod, params, param_grads, raw, ds, ch: _Chunk, heads) -> torch.Tensor:
    """Gradient to the raw scores from ``ds`` (the gradient to the modified ones); the parameters' share is
    added to ``param_grads``."""
    with torch.enable_grad():
        leaf = raw.detach().requires_grad_()
        grads = torch.autograd.grad(mod.score(leaf, ch.qpos, ch.kpos, heads), (leaf, *params), ds, allow_unused=True)
    for acc, g in zip(param_grads, grads[1:]):
        if g is not None:
            acc += g
    return grads[0]


# PyTorch's fused CPU attention, run on one chunk at a time (its batch = the chunk's query blocks).
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _fused(q, v, p: float, mod, need_lse: bool, doc) -> bool:
    """Whether a component's chunks run through the fused CPU attention (one op per chunk each way, its
    probabilities never stored; several small ops are slow on a shared CPU): fp32 on CPU, without dropout,
    score modifiers, documents or a log-sum-exp to merge, with one head size for queries and values."""
    return (
        doc is None
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and p == 0.0
        and mod is None
        and not need_lse
        and q.shape[-1] == v.shape[-1]
    )


def _by_block(x: torch.Tensor) -> torch.Tensor:
    """[B,H,n,r,D] -> [n, B*H, r, D], a view: the chunk's query blocks become the fused op's batch."""
    B, H, n = x.shape[:3]
    return x.permute(2, 0, 1, 3, 4).reshape(n, B * H, *x.shape[3:])


def _from_block(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    return x.unflatten(1, (B, H)).permute(1, 2, 0, 3, 4)


def _bias(ch: _Chunk, cp: _ComponentPlan, q: torch.Tensor) -> torch.Tensor | None:
    """The chunk's mask as an additive 0 / -inf bias [n or 1, 1, qb, m*b] (None: nothing masked)."""
    if ch.bias is not None or not ch.masks:
        return ch.bias
    n, m = ch.kv.shape
    bias = q.new_zeros(n, 1, cp.block * cp.q_group, m * cp.block)
    for cols, blocked in ch.masks:
        bias[:, 0, :, cols].masked_fill_(blocked, -math.inf)
    return bias


def _fused_forward(q, k, v, out, lse, ch: _Chunk, cp: _ComponentPlan, scale: float) -> None:
    """The chunk's output rows of ``out`` and log-sum-exp rows of ``lse`` [B,H,length,1]."""
    B, H = q.shape[:2]
    kc, vc = _gather(k, ch.kv, cp.block), _gather(v, ch.kv, cp.block)
    o, l = _flash(
        _by_block(_rows(q, ch, cp)), _by_block(kc), _by_block(vc), 0.0, False, attn_mask=_bias(ch, cp, q), scale=scale
    )
    _rows(out, ch, cp).copy_(_from_block(o, B, H))
    _rows(lse, ch, cp).copy_(_from_block(l.unsqueeze(-1), B, H))


def _fused_backward(q, k, v, dout, out, lse, grads, ch: _Chunk, cp: _ComponentPlan, scale: float) -> None:
    """The chunk's share of ``grads`` = (dq, dk, dv), from the forward's output and log-sum-exp rows."""
    B, H = q.shape[:2]
    dq, dk, dv = grads
    kc, vc = _gather(k, ch.kv, cp.block), _gather(v, ch.kv, cp.block)
    gq, gk, gv = _flash_backward(
        _by_block(_rows(dout, ch, cp)),
        _by_block(_rows(q, ch, cp)),
        _by_block(kc),
        _by_block(vc),
        _by_block(_rows(out, ch, cp)),
        _by_block(_rows(lse, ch, cp)).squeeze(-1),
        0.0,
        False,
        attn_mask=_bias(ch, cp, q),
        scale=scale,
    )
    _rows(dq, ch, cp).copy_(_from_block(gq, B, H))
    _scatter_add(dk, ch.kv, _from_block(gk, B, H), cp.block)
    _scatter_add(dv, ch.kv, _from_block(gv, B, H), cp.block)


def _scaled(q: torch.Tensor, scale: float, fused: bool, cp: _ComponentPlan) -> torch.Tensor:
    """The queries times the scale, once per component, for the chunks that do not run fused."""
    return q if fused and not any(ch.empty_rows for ch in cp.chunks) else q * scale


def _forward_component(
    q,
    k,
    v,
    cp: _ComponentPlan,
    scale: float,
    p: float,
    seed: int,
    salt: int,
    need_lse: bool,
    mod=None,
    heads=None,
    doc=None,
):
    """Output (and log-sum-exp if ``need_lse``) of one component, in its order: [B,H,length,Dv], [B,H,length,1].
    Run through the fused op (``_fused``), the second result is the log-sum-exp its backward needs."""
    q, k, v = (_to_order(x, cp) for x in (q, k, v))
    doc = _doc_order(doc, cp)
    ranges = _doc_ranges(doc, cp)
    out = v.new_empty(*q.shape[:3], v.shape[-1])
    fused = _fused(q, v, p, mod, need_lse, doc)
    lse = q.new_empty(*q.shape[:3], 1) if need_lse or fused else None
    qs = _scaled(q, scale, fused, cp)
    for i, ch in enumerate(cp.chunks):
        if fused and not ch.empty_rows:  # empty rows (no key at all) take the path below: their output is 0
            _fused_forward(q, k, v, out, lse, ch, cp, scale)
            continue
        ch = _live(ch, cp, ranges)
        raw = _raw_scores(qs, _gather(k, ch.kv, cp.block), ch, cp)
        s = _masked(raw, ch, raw, mod, heads, _doc_blocked(doc, ch, cp))
        if lse is not None:
            _rows(lse, ch, cp).copy_(s.logsumexp(-1, keepdim=True))
        prob = torch.softmax(s, dim=-1)
        if _empty(ch, doc):  # a query with no key: all -inf gives NaN; its output is defined as 0
            prob.nan_to_num_(nan=0.0)
        if p > 0.0:
            prob.mul_(_dropout_keep(seed, salt + i, prob.shape, p, prob.device))
        torch.matmul(prob, _gather(v, ch.kv, cp.block), out=_rows(out, ch, cp))
    return out, lse


def _backward_component(
    q,
    k,
    v,
    dout,
    lse,
    delta,
    cp: _ComponentPlan,
    scale: float,
    p: float,
    seed: int,
    salt: int,
    mod=None,
    heads=None,
    params=(),
    param_grads=(),
    out=None,
    fused_lse=None,
    doc=None,
):
    """Gradients of one component, in its order. Alone (``lse`` None) its probabilities are its own softmax;
    as one of several they are exp(s - lse) with the merged output's ``lse`` and ``delta`` = rowsum(dout * out).
    ``fused_lse`` (with the output ``out``): the forward ran through the fused op, and so does this.
    The modifier's parameter gradients are added to ``param_grads``."""
    q, k, v, dout = (_to_order(x, cp) for x in (q, k, v, dout))
    doc = _doc_order(doc, cp)
    ranges = _doc_ranges(doc, cp)
    if fused_lse is not None:
        out = _to_order(out, cp)
    if lse is not None:
        lse, delta = _to_order(lse, cp), _to_order(delta, cp)
        lse = torch.where(lse.isinf(), 0.0, lse)  # rows with no key: p = 0
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qs = _scaled(q, scale, fused_lse is not None, cp)  # the scale goes into the queries (so dk) and dq's rows
    for i, ch in enumerate(cp.chunks):
        if fused_lse is not None and not ch.empty_rows:
            _fused_backward(q, k, v, dout, out, fused_lse, (dq, dk, dv), ch, cp, scale)
            continue
        ch = _live(ch, cp, ranges)
        kc, vc, do = _gather(k, ch.kv, cp.block), _gather(v, ch.kv, cp.block), _rows(dout, ch, cp)
        raw = _raw_scores(qs, kc, ch, cp)
        s = _masked(raw, ch, raw, mod, heads, _doc_blocked(doc, ch, cp))
        prob = torch.softmax(s, dim=-1) if lse is None else s.sub_(_rows(lse, ch, cp)).exp_()
        if _empty(ch, doc):
            prob.nan_to_num_(nan=0.0)
        dprob = do @ vc.transpose(-1, -2)
        if p > 0.0:
            keep = _dropout_keep(seed, salt + i, prob.shape, p, prob.device)
            _scatter_add(dv, ch.kv, (prob * keep).transpose(-1, -2) @ do, cp.block)
            dprob.mul_(keep)
        else:
            _scatter_add(dv, ch.kv, prob.transpose(-1, -2) @ do, cp.block)
        if lse is None:  # softmax backward, fused: p * (dp - rowsum(p * dp))
            ds = torch._softmax_backward_data(dprob, prob, -1, prob.dtype)
        else:
            ds = prob.mul_(dprob.sub_(_rows(delta, ch, cp)))
        if mod is not None:
            ds = _modifier_backward(mod, params, param_grads, raw, ds, ch, heads)
        torch.matmul(ds, kc, out=_rows(dq, ch, cp))
        _rows(dq, ch, cp).mul_(scale)
        _scatter_add(dk, ch.kv, ds.transpose(-1, -2) @ _rows(qs, ch, cp), cp.block)
    return dq, dk, dv


def _add_from_order(acc: torch.Tensor, x: torch.Tensor, cp: _ComponentPlan) -> None:
    """acc [B,h,T,D] += x [B,h,length,D] taken back to original order (no full-size temporary)."""
    T = acc.shape[2]
    if cp.order is None:
        acc += x[:, :, :T]
    elif cp.length == T:
        acc.index_add_(2, cp.order, x)
    else:
        real = (cp.order < T).nonzero().flatten()
        acc.index_add_(2, cp.order[real], x.index_select(2, real))


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of disjoint key sets from each part's (out, lse)."""
    lse = torch.stack([l for _, l in parts]).logsumexp(0)
    safe = torch.where(lse.isinf(), 0.0, lse)
    out = parts[0][0] * (parts[0][1] - safe).exp()
    for o, l in parts[1:]:
        out = out + o * (l - safe).exp()
    return out, lse


def _assemble(shape: torch.Size, plans, per_group: list[torch.Tensor]) -> torch.Tensor:
    """Per-group [B,h,T,Dv] results -> one [B,H,T,Dv] tensor of ``shape`` (no copy when one group holds every head)."""
    if len(plans) == 1 and plans[0].heads == slice(0, shape[1]):
        return per_group[0]
    out = per_group[0].new_empty(shape)
    for gp, x in zip(plans, per_group):
        out[:, gp.heads] = x
    return out


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, scale, p, seed, mod, doc, *params):
        T = q.shape[2]
        outs, lses = [], {}  # merged log-sum-exp of groups with several components, for backward
        fused_lses = {}  # a lone component's log-sum-exp from the fused op, in its order, for its backward
        for g, gp in enumerate(plans):
            h, several = gp.heads, len(gp.components) > 1
            parts = []
            for c, cp in enumerate(gp.components):
                o, l = _forward_component(
                    q[:, h], k[:, h], v[:, h], cp, scale, p, seed, _salt(g, c), several, mod, gp.head_idx, doc
                )
                if not several and l is not None:
                    fused_lses[g], l = l, None
                parts.append((_from_order(o, cp, T), None if l is None else _from_order(l, cp, T)))
            if several:
                o, lses[g] = _merge(parts)
            outs.append(o if several else parts[0][0])
        out = _assemble(q.shape[:3] + v.shape[3:], plans, outs)
        ctx.save_for_backward(q, k, v, out)  # the modifier's parameters are read from ``mod`` itself
        ctx.plans, ctx.scale, ctx.p, ctx.seed, ctx.lses, ctx.mod, ctx.doc = plans, scale, p, seed, lses, mod, doc
        ctx.fused_lses = fused_lses
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):  # as in forward, whether or not backward runs in autocast
            return _BlockSparse._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        dout = dout.contiguous()
        plans, mod = ctx.plans, ctx.mod
        params = () if mod is None else tuple(mod.parameters())
        param_grads = [torch.zeros_like(x) for x in params]
        mods = dict(mod=mod, params=params, param_grads=param_grads, doc=ctx.doc)
        cp0 = plans[0].components[0]
        if (
            len(plans) == 1
            and len(plans[0].components) == 1
            and cp0.order is None
            and cp0.length == q.shape[2]
            and plans[0].heads == slice(0, q.shape[1])
        ):  # the common case: the component's grads are the grads
            grads = _backward_component(
                q, k, v, dout, None, None, cp0, ctx.scale, ctx.p, ctx.seed, _salt(0, 0), heads=plans[0].head_idx,
                out=out, fused_lse=ctx.fused_lses.get(0), **mods,
            )  # fmt: skip
            return (*grads, None, None, None, None, None, None, *param_grads)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for g, gp in enumerate(plans):
            h = gp.heads
            lse = ctx.lses.get(g)
            delta = None if lse is None else (dout[:, h] * out[:, h]).sum(-1, keepdim=True)
            for c, cp in enumerate(gp.components):
                grads = _backward_component(
                    q[:, h],
                    k[:, h],
                    v[:, h],
                    dout[:, h],
                    lse,
                    delta,
                    cp,
                    ctx.scale,
                    ctx.p,
                    ctx.seed,
                    _salt(g, c),
                    heads=gp.head_idx,
                    out=out[:, h],
                    fused_lse=ctx.fused_lses.get(g),
                    **mods,
                )
                for acc, grad in zip((dq, dk, dv), grads):
                    if isinstance(h, slice):
                        _add_from_order(acc[:, h], grad, cp)  # a view: accumulates in place
                    else:
                        part = acc[:, h]
                        _add_from_order(part, grad, cp)
                        acc[:, h] = part
                del grads
        return dq, dk, dv, None, None, None, None, None, None, *param_grads


def _chunk_elems(device: torch.device) -> int:
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return _CHUNK_ELEMS * max(1, min(threads, _MAX_CHUNK_THREADS))


@torch.compiler.disable  # a Python loop over cached plans: under train.compile it runs eagerly between graphs
def blocksparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    dropout_p: float = 0.0,
    training: bool = False,
    modifier=None,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention backend: ``pattern`` computed block by block, forward and backward, on any device.

    q, k [B,H,T,Dqk] and v [B,H,T,Dv] may differ in head size; scores are scaled by 1/sqrt(Dqk).
    k and v may have fewer heads (grouped-query attention): they are expanded here, and autograd sums
    their gradients back. ``modifier`` (score modifiers) changes each block's scores before the mask;
    ``doc`` (document ids [B, T]) keeps each query to keys of its own document.
    """
    H, T, Dqk = q.shape[1:]
    p = dropout_p if training else 0.0
    seed = int(torch.randint(0, 2**31 - 1, (1,))) if p > 0.0 else 0
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    k, v = expand_kv(k, H), expand_kv(v, H)
    q, k, v = (x.to(compute).contiguous() for x in (q, k, v))  # the model hands in head-transposed views
    params = () if modifier is None else tuple(modifier.parameters())
    doc = None if doc is None else doc.to(q.device, torch.long).contiguous()
    plans = plan(pattern, T, H, q.device, _chunk_elems(q.device))
    with torch.autocast(q.device.type, enabled=False):  # autocast would run its matmuls in bf16 into fp32 buffers
        out = _BlockSparse.apply(q, k, v, plans, Dqk**-0.5, p, seed, modifier, doc, *params)
    return out.to(dtype)
