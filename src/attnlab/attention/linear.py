"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax's ``exp(q.k)`` is replaced by a kernel ``phi(q).phi(k)`` with a
non-negative feature map ``phi``, so for query ``i``

    out_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps)
          = phi(q_i) S_i / (phi(q_i).z_i + eps),
    S_i = sum_{j<=i} phi(k_j) v_j^T   [Dh x Dv],    z_i = sum_{j<=i} phi(k_j)   [Dh].

The second line is an RNN with a constant-size state ``(S, z)``: the decoding
form (``linear_step``). Training uses the chunked form (``linear_chunked``):
quadratic inside a chunk, the state carried across chunks, never a T x T
tensor. ``linear_reference`` is the dense O(T^2) spec both are tested against.

Tensors are ``[B, H, T, Dh]`` (v may have its own ``Dv``). Work is done in at
least float32 (half-precision sums over T lose too much; float64 stays float64
so tests can compare gradients tightly) and outputs come back in q's dtype.
There is no ``1/sqrt(Dh)`` scale: the denominator already normalises.

Document masking (``doc``, ids [B, T]): the sums run over ``j <= i`` in i's
document only, i.e. the state ``(S, z)`` starts again at zero at every document
start. The reference masks ``A`` with "same document"; the chunked form masks
inside each chunk and carries into a chunk only the state of the document that
is running at its first position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .heads import expand_kv

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": lambda x: F.elu(x) + 1,  # the paper's choice: strictly positive, so the denominator never vanishes
    "relu": F.relu,  # sparse features; a query that matches no key gets ~0 (eps keeps it finite)
}

DEFAULT_CHUNK = 64


def feature_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature map ``phi`` called ``name``; ConfigError naming the valid choices otherwise."""
    try:
        return FEATURE_MAPS[name]
    except KeyError:
        raise ConfigError(
            f"unknown linear attention feature map {name!r}: use one of {', '.join(FEATURE_MAPS)}"
        ) from None


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _features(q, k, v, name: str, *more_dtypes: torch.dtype):
    """``(phi(q), phi(k), v)`` in the working dtype (phi is applied after upcasting)."""
    phi = feature_map(name)
    dt = _work_dtype(q.dtype, k.dtype, v.dtype, *more_dtypes)
    return phi(q.to(dt)), phi(k.to(dt)), v.to(dt)


def linear_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec, dense on purpose: ``A = tril(phi(q) phi(k)^T)``, ``out = A v / (A 1 + eps)``. O(T^2) memory.
    ``doc`` (document ids [B, T]): A is also zero between positions of different documents."""
    fq, fk, vw = _features(q, k, v, feature_map)
    T = q.shape[-2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if doc is not None:
        causal = causal & (doc[:, None, :, None] == doc[:, None, None, :])
    A = (fq @ fk.transpose(-2, -1)).masked_fill(~causal, 0.0)
    return ((A @ vw) / (A.sum(-1, keepdim=True) + eps)).to(q.dtype)


def linear_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    chunk: int = DEFAULT_CHUNK,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training form: split T into chunks of ``chunk`` positions; for chunk ``c``

        out_c = (tril(Q_c K_c^T) V_c + Q_c S_{<c}) / (tril(Q_c K_c^T) 1 + Q_c z_{<c} + eps)

    with ``Q = phi(q)``, ``K = phi(k)``, ``S_{<c} = sum_{c'<c} K_{c'}^T V_{c'}`` and
    ``z_{<c} = sum_{c'<c} K_{c'}^T 1`` (exclusive prefix sums over chunks).
    Memory O(T*(Dh + chunk) + (T/chunk)*Dh*Dv), no T x T tensor; plain autograd differentiates it.
    ``doc`` (document ids [B, T], never decreasing along a row): see ``_document_states``.
    """
    if chunk < 1:
        raise ConfigError(f"linear attention chunk must be >= 1, got {chunk}")
    B, H, T, _ = q.shape
    if k.shape[-2] != T:
        raise ValueError(
            f"linear_chunked needs as many queries as keys (got {T} and {k.shape[-2]}); decode with linear_step"
        )
    fq, fk, vw = _features(q, k, v, feature_map)
    n = -(-T // chunk)
    # Pad at the end: padded keys reach only padded queries (cropped below) and the
    # last chunk's state, which no chunk reads because the prefix is exclusive.
    pad = n * chunk - T
    fq, fk, vw = ((F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B, H, n, chunk, x.shape[-1]) for x in (fq, fk, vw))

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    if doc is None:
        s = fk.transpose(-2, -1) @ vw  # [B, H, n, Dh, Dv]: each chunk's own contribution
        z = fk.sum(-2)  # [B, H, n, Dh]
        s_prev = s.cumsum(2) - s  # exclusive prefix: the chunks before this one
        z_prev = z.cumsum(2) - z
        fq_prev = fq
    else:
        docs = (F.pad(doc, (0, pad), value=-1) if pad else doc).reshape(B, 1, n, chunk)
        s_prev, z_prev, fq_prev = _document_states(fq, fk, vw, docs)
        causal = causal & (docs[..., :, None] == docs[..., None, :])  # [B, 1, n, C, C]

    # In-place steps below act on fresh matmul outputs that autograd does not need: fewer T-sized copies.
    A = (fq @ fk.transpose(-2, -1)).masked_fill_(~causal, 0.0)  # [B, H, n, C, C]
    num = (A @ vw).add_(fq_prev @ s_prev)
    den = A.sum(-1, keepdim=True).add_(fq_prev @ z_prev.unsqueeze(-1))
    out = (num / (den + eps)).reshape(B, H, n * chunk, -1)[:, :, :T]
    return out.to(q.dtype)


def _document_states(fq, fk, vw, docs):
    """The state each chunk starts from under document masking, and the query features that read it.

    ``docs`` [B, 1, n, C]. Documents are contiguous, so a query of chunk c that needs earlier keys is in the
    document running at the chunk's first position, and reads only that document's state; every other query
    of the chunk started its document inside the chunk (its features are zeroed for the carried state). The
    state entering chunk c is the exclusive sum, over the chunks since that document began, of each chunk's
    keys in the document that continues into the next chunk ("tails"). Returns ``(s_prev, z_prev, fq_carry)``.
    """
    first = docs[..., 0]  # [B, 1, n]: the document running at each chunk's start
    nxt = torch.cat([first[..., 1:], first.new_full(first.shape[:-1] + (1,), -2)], -1)  # the next chunk's
    tail = (docs == nxt[..., None]).unsqueeze(-1).to(fk.dtype)  # [B, 1, n, C, 1]: keys carried onward
    s = (fk * tail).transpose(-2, -1) @ vw  # [B, H, n, Dh, Dv]
    z = (fk * tail).sum(-2)
    s_excl, z_excl = s.cumsum(2) - s, z.cumsum(2) - z  # tails of all chunks before c
    # The document running at chunk c began in chunk b(c) - 1 or earlier, b(c) = the last chunk <= c whose first
    # document differs from the previous chunk's: only tails from chunk b(c) - 1 on count.
    n = first.shape[-1]
    chunks = torch.arange(n, device=first.device).expand_as(first)
    changed = torch.cat([torch.zeros_like(first[..., :1], dtype=torch.bool), first[..., 1:] != first[..., :-1]], -1)
    since = torch.where(changed, chunks - 1, 0).cummax(-1).values  # [B, 1, n]
    H = fk.shape[1]
    idx = since.expand(-1, H, -1)
    s_base = s_excl.gather(2, idx[..., None, None].expand(-1, -1, -1, *s.shape[-2:]))
    z_base = z_excl.gather(2, idx[..., None].expand(-1, -1, -1, z.shape[-1]))
    carry = (docs == first[..., None]).unsqueeze(-1).to(fq.dtype)  # [B, 1, n, C, 1]
    return s_excl - s_base, z_excl - z_base, fq * carry


@dataclass
class LinearState:
    """Decoding state after the positions seen so far: ``s = sum_j phi(k_j) v_j^T`` [B,H,Dh,Dv], ``z = sum_j phi(k_j)`` [B,H,Dh].

    Its size does not grow with the sequence: the linear-attention KV cache.
    """

    s: torch.Tensor
    z: torch.Tensor

    @classmethod
    def zeros(
        cls,
        B: int,
        H: int,
        Dh: int,
        Dv: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LinearState:
        return cls(
            torch.zeros(B, H, Dh, Dv, device=device, dtype=dtype), torch.zeros(B, H, Dh, device=device, dtype=dtype)
        )


def linear_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: LinearState,
    feature_map: str = "elu1",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearState]:
    """Recurrent form for ``t`` new positions ``[B, H, t, Dh]``, in order; for each:

        S += phi(k_i) v_i^T,   z += phi(k_i),   out_i = phi(q_i) S / (phi(q_i).z + eps)

    Returns ``(out [B, H, t, Dv], new_state)``. ``state`` is not modified in place,
    so it stays valid (e.g. to branch) and autograd sees a pure function.
    """
    fq, fk, vw = _features(q_t, k_t, v_t, feature_map, state.s.dtype)
    s, z = state.s.to(fq.dtype), state.z.to(fq.dtype)
    outs = []
    for i in range(q_t.shape[-2]):
        s = s + fk[..., i, :, None] * vw[..., i, None, :]
        z = z + fk[..., i, :]
        num = (fq[..., i, None, :] @ s).squeeze(-2)  # [B, H, Dv]
        den = (fq[..., i, :] * z).sum(-1, keepdim=True)
        outs.append(num / (den + eps))
    out = torch.stack(outs, dim=-2) if outs else vw.new_zeros(vw.shape)
    return out.to(q_t.dtype), LinearState(s.to(state.s.dtype), z.to(state.z.dtype))


def linear_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str = "elu1", eps: float = 1e-6
) -> torch.Tensor:
    """``linear_step`` one position at a time over the whole sequence, from a zero state (tests' RNN view)."""
    B, H, T, Dh = k.shape
    state = LinearState.zeros(B, H, Dh, v.shape[-1], q.device, dtype=_work_dtype(q.dtype, k.dtype, v.dtype))
    outs = []
    for i in range(T):
        out, state = linear_step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state, feature_map, eps)
        outs.append(out)
    return torch.cat(outs, dim=-2) if outs else q.new_zeros(B, H, 0, v.shape[-1])


def linear_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    dropout_p: float = 0.0,
    training: bool = False,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend signature over ``linear_chunked``, reading ``pattern.feature_map`` and ``pattern.chunk`` (default 64).

    ``dropout_p`` and ``training`` are accepted for the signature and ignored:
    linear attention never forms the attention weights, so there is nothing to
    apply attention dropout to (regularise elsewhere, e.g. residual dropout). ``doc``: document masking.
    """
    chunk = getattr(pattern, "chunk", DEFAULT_CHUNK)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])  # grouped-query: shared heads, expanded to compute
    if doc is not None:
        doc = doc.to(q.device, torch.long)
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in (q, k, v)):
        return linear_chunked(q, k, v, pattern.feature_map, chunk=chunk, doc=doc)
    return _HeadByHead.apply(q, k, v, pattern.feature_map, chunk, doc)


class _HeadByHead(torch.autograd.Function):
    """``linear_chunked`` keeping only q, k, v for backward, which recomputes one head at a time.

    Autograd through the chunked form keeps several T-sized intermediates per head
    (features, chunk scores, prefix states); recomputing them head by head in
    backward bounds that extra memory to one head's worth, for one more forward.
    """

    @staticmethod
    def forward(ctx, q, k, v, feature_map, chunk, doc):
        ctx.save_for_backward(q, k, v)
        ctx.feature_map, ctx.chunk, ctx.doc = feature_map, chunk, doc
        return torch.cat(
            [
                linear_chunked(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], feature_map, chunk=chunk, doc=doc)
                for h in range(q.shape[1])
            ],
            dim=1,
        )

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (q, k, v)]
        for h in range(q.shape[1]):
            with torch.enable_grad():
                qh, kh, vh = (x[:, h : h + 1].detach().requires_grad_() for x in (q, k, v))
                out = linear_chunked(qh, kh, vh, ctx.feature_map, chunk=ctx.chunk, doc=ctx.doc)
                for acc, g in zip(grads, torch.autograd.grad(out, (qh, kh, vh), grad[:, h : h + 1])):
                    acc[:, h : h + 1] = g
        return (*grads, None, None, None)
