"""Block-sparse attention for any device (CPU included): time and memory grow with the attended blocks.

A pattern is split into groups of identical heads, each computed by one or more
components (``Pattern.head_groups``). A component lists, in its own token order,
the key blocks each query block touches; the kernel visits query blocks in
chunks, gathers their key/value blocks, and runs a masked softmax over just
those keys. Like FlashAttention it keeps only the output and the per-query
log-sum-exp for backward, and recomputes the scores there, so no tensor ever
has T x T entries and peak memory is a few chunks above the inputs' size.

Several components of one head (strided ``union``: the window in token order,
the strided keys in the reordered order) are merged exactly through their
log-sum-exps; their masks are disjoint by construction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .patterns import Component, Pattern

# Score entries per chunk per (batch, head): bounds the working memory of one step.
_CHUNK_ELEMS = 1 << 17


@dataclass
class _Chunk:
    q0: int  # first query block
    q1: int  # one past the last query block
    kv: torch.Tensor  # [n, m] key blocks per query block (padded rows repeat block 0, masked out)
    mask: torch.Tensor | None  # [n, b, m*b] True = attend; None = every pair attends


@dataclass
class _ComponentPlan:
    block: int
    length: int  # padded length: a multiple of block (and of the stride)
    order: torch.Tensor | None  # [length] original position held at each new position; None = identity
    chunks: list[_Chunk]


@dataclass
class _GroupPlan:
    heads: list[int]
    components: list[_ComponentPlan]


@functools.lru_cache(maxsize=64)
def plan(pattern: Pattern, T: int, n_head: int, device: torch.device) -> tuple[_GroupPlan, ...]:
    """What to compute for ``pattern`` at length ``T``: cached per pattern, length and device."""
    return tuple(_GroupPlan(list(g.heads), [_plan_component(pattern, c, g.heads[0], T, device) for c in g.components])
                 for g in pattern.head_groups(n_head))


def _plan_component(pattern: Pattern, comp: Component, head: int, T: int, device) -> _ComponentPlan:
    b, s = comp.block, comp.stride or 1
    strided_len = -(-T // s) * s
    length = -(-strided_len // b) * b
    order = None
    if comp.stride:
        order = torch.arange(strided_len).view(-1, s).t().reshape(-1)  # p -> (p mod s, p div s)
        order = torch.cat([order, torch.arange(strided_len, length)])
    pos = order if order is not None else torch.arange(length)
    nb = length // b
    blocks = torch.arange(nb)
    layout = comp.layout(blocks.view(nb, 1), blocks.view(1, nb), b, strided_len)
    counts = layout.sum(1)
    # Active key blocks first, in ascending order; padding slots point at block 0.
    ranked = torch.where(layout, blocks.view(1, nb), nb + blocks.view(1, nb)).sort(dim=1).values
    chunks, q0 = [], 0
    while q0 < nb:  # consecutive query blocks, each chunk padded to its own widest row
        q1, m = q0 + 1, max(int(counts[q0]), 1)
        while q1 < nb and (q1 - q0 + 1) * max(m, int(counts[q1])) * b * b <= _CHUNK_ELEMS:
            m, q1 = max(m, int(counts[q1])), q1 + 1
        kv = ranked[q0:q1, :m]
        valid = kv < nb
        kv = torch.where(valid, kv, 0)
        qpos = pos[q0 * b:q1 * b].view(q1 - q0, b, 1)
        kpos = pos[(kv.view(-1, m, 1) * b + torch.arange(b)).view(q1 - q0, 1, m * b)]
        key_ok = valid.repeat_interleave(b, dim=1).view(q1 - q0, 1, m * b) & (kpos < T)
        mask = pattern.allowed(qpos, kpos, torch.tensor(head)) & key_ok
        if comp.select is not None:
            mask = mask & comp.select(qpos, kpos)
        chunks.append(_Chunk(q0, q1, kv.to(device), None if bool(mask.all()) else mask.to(device)))
        q0 = q1
    return _ComponentPlan(b, length, None if order is None else order.to(device), chunks)


# ------------------------------------------------------------------ kernel

def _to_order(x: torch.Tensor, cp: _ComponentPlan) -> torch.Tensor:
    """[B,H,T,D] in original order -> [B,H,nb,b,D] in the component's order, zero-padded."""
    B, H, T, D = x.shape
    if cp.length > T:
        x = torch.cat([x, x.new_zeros(B, H, cp.length - T, D)], dim=2)
    if cp.order is not None:
        x = x.index_select(2, cp.order)
    return x.view(B, H, cp.length // cp.block, cp.block, D)


def _from_order(x: torch.Tensor, cp: _ComponentPlan, T: int) -> torch.Tensor:
    """Inverse of ``_to_order`` for [B,H,length,...] tensors: back to original order, cropped to T."""
    if cp.order is not None:
        x = torch.empty_like(x).index_copy_(2, cp.order, x)
    return x[:, :, :T]


def _gather(xb: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """[B,H,nb,b,D] blocks at kv [n, m] -> [B,H,n,m*b,D]."""
    B, H, _, b, D = xb.shape
    return xb[:, :, kv].view(B, H, kv.shape[0], kv.shape[1] * b, D)


def _scatter_add(dst: torch.Tensor, kv: torch.Tensor, src: torch.Tensor) -> None:
    """dst [B,H,nb,b,D] += src [B,H,n,m*b,D] at the key blocks kv [n, m]."""
    B, H, _, b, D = dst.shape
    dst.index_add_(2, kv.reshape(-1), src.reshape(B, H, -1, b, D))


def _dropout_keep(seed: int, index: int, shape, p: float, device) -> torch.Tensor:
    """The same keep-mask in forward and backward, regenerated from (seed, chunk index)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    return torch.rand(shape, generator=gen, device=device) >= p


def _forward_component(q, k, v, cp: _ComponentPlan, p: float, seed: int, salt: int):
    """Output and log-sum-exp of one component, in its order: [B,H,length,D], [B,H,length,1]."""
    qb, kb, vb = (_to_order(x, cp) for x in (q, k, v))
    B, H, nb, b, D = qb.shape
    out = qb.new_zeros(B, H, nb, b, D)
    lse = qb.new_full((B, H, nb, b, 1), -math.inf)
    for i, ch in enumerate(cp.chunks):
        s = qb[:, :, ch.q0:ch.q1] @ _gather(kb, ch.kv).transpose(-1, -2)  # [B,H,n,b,m*b]
        if ch.mask is not None:
            s.masked_fill_(~ch.mask, -math.inf)
        mx = s.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # rows with no key: keep exp() at 0
        s.sub_(mx).exp_()
        total = s.sum(-1, keepdim=True)
        lse[:, :, ch.q0:ch.q1] = mx + total.log()
        s.div_(total.clamp_min(torch.finfo(s.dtype).tiny))
        if p > 0.0:
            s.mul_(_dropout_keep(seed, salt + i, s.shape, p, s.device)).div_(1.0 - p)
        out[:, :, ch.q0:ch.q1] = s @ _gather(vb, ch.kv)
    return out.view(B, H, nb * b, D), lse.view(B, H, nb * b, 1)


def _backward_component(q, k, v, dout, lse, delta, cp: _ComponentPlan, p: float, seed: int, salt: int):
    """Gradients of one component given the merged output's lse and delta = rowsum(dout * out)."""
    qb, kb, vb, dob = (_to_order(x, cp) for x in (q, k, v, dout))
    lseb, deltab = (_to_order(x, cp) for x in (lse, delta))
    lseb = torch.where(lseb.isinf(), 0.0, lseb)  # rows with no key have p = 0 everywhere
    dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
    for i, ch in enumerate(cp.chunks):
        kc, vc, qc, doc = _gather(kb, ch.kv), _gather(vb, ch.kv), qb[:, :, ch.q0:ch.q1], dob[:, :, ch.q0:ch.q1]
        s = qc @ kc.transpose(-1, -2)
        if ch.mask is not None:
            s.masked_fill_(~ch.mask, -math.inf)
        prob = s.sub_(lseb[:, :, ch.q0:ch.q1]).exp_()
        dprob = doc @ vc.transpose(-1, -2)
        if p > 0.0:
            keep = _dropout_keep(seed, salt + i, prob.shape, p, prob.device) / (1.0 - p)
            _scatter_add(dv, ch.kv, (prob * keep).transpose(-1, -2) @ doc)
            dprob.mul_(keep)
        else:
            _scatter_add(dv, ch.kv, prob.transpose(-1, -2) @ doc)
        ds = prob.mul_(dprob.sub_(deltab[:, :, ch.q0:ch.q1]))
        dq[:, :, ch.q0:ch.q1] = ds @ kc
        _scatter_add(dk, ch.kv, ds.transpose(-1, -2) @ qc)
    B, H, nb, b, D = qb.shape
    return tuple(x.view(B, H, nb * b, D) for x in (dq, dk, dv))


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of disjoint key sets from each part's (out, lse)."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([l for _, l in parts]).logsumexp(0)
    safe = torch.where(lse.isinf(), 0.0, lse)
    out = sum(o * (l - safe).exp() for o, l in parts)
    return out, lse


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, p, seed):
        T = q.shape[2]
        out, lse = torch.empty_like(q), q.new_empty(*q.shape[:3], 1)
        for g, gp in enumerate(plans):
            qg, kg, vg = (x[:, gp.heads] for x in (q, k, v))
            parts = [tuple(_from_order(t, cp, T) for t in _forward_component(qg, kg, vg, cp, p, seed, 1000 * (4 * g + c)))
                     for c, cp in enumerate(gp.components)]
            out[:, gp.heads], lse[:, gp.heads] = _merge(parts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.p, ctx.seed = plans, p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        T = q.shape[2]
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for g, gp in enumerate(ctx.plans):
            h = gp.heads
            for c, cp in enumerate(gp.components):
                grads = _backward_component(q[:, h], k[:, h], v[:, h], dout[:, h], lse[:, h], delta[:, h],
                                            cp, ctx.p, ctx.seed, 1000 * (4 * g + c))
                for acc, grad in zip((dq, dk, dv), grads):
                    acc[:, h] += _from_order(grad, cp, T)
        return dq, dk, dv, None, None, None


def blocksparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Attention backend: ``pattern`` computed block by block, forward and backward, on any device."""
    B, H, T, D = q.shape
    p = dropout_p if training else 0.0
    seed = int(torch.randint(0, 2**31 - 1, (1,))) if p > 0.0 else 0
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q = (q * D ** -0.5).to(compute)  # fold the softmax scale into q once
    out = _BlockSparse.apply(q, k.to(compute), v.to(compute), plan(pattern, T, H, q.device), p, seed)
    return out.to(dtype)
