"""Attention backends: functions that compute attention for a pattern.

Every backend has the signature
``fn(q, k, v, pattern, dropout_p, training) -> out`` with q ``[B, H, T, Dqk]``,
k ``[B, Hkv, T, Dqk]``, v ``[B, Hkv, T, Dv]`` and out ``[B, H, T, Dv]`` (the head
sizes may differ; scores scale by 1/sqrt(Dqk); Hkv divides H: grouped-query
attention, see ``heads``), and must agree with ``reference`` (the spec) on
outputs and gradients. Backends registered with ``modifiers=True`` also take
``modifier=`` (a ``ScoreModifiers``) and apply it to the scores before the mask;
those registered with ``documents=True`` take ``doc=`` (document ids [B, T], see
``documents``) and let a query see only keys of its own document as well.
Backends register themselves with a ``supports(pattern, device)`` predicate;
``select_backend`` picks the first supporting one in preference order for
``auto`` and refuses a forced backend that cannot run the pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .documents import same_document
from .heads import expand_kv
from .patterns import Linear, Pattern, _grid

BackendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Pattern, float, bool], torch.Tensor]


# linear.py's default: keeps a row whose features are all ~0 finite.
_LINEAR_EPS = 1e-6


def reference_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: Pattern,
    q_start: int | None = None,
    modifier=None,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights of the spec, ``[B, H, Tq, Tk]`` in fp32 (or wider): row i mixes the values of the keys.

    Softmax patterns: dense scores scaled by 1/sqrt(Dqk), the score ``modifier``
    (if any) at the pairs' absolute positions, the pattern's dense mask, softmax
    in fp32; a query with no allowed key gets an all-zero row. Keys with fewer
    heads than q are shared by groups of query heads. Linear patterns: the
    implicit weights phi(q_i).phi(k_j) / (sum_{j'<=i} phi(q_i).phi(k_j') + eps)
    over the causal keys (rows sum to 1 up to eps). Queries sit at positions
    ``q_start ..`` (default: the last ``Tq`` of the ``Tk`` positions), so rows can
    be computed a chunk at a time. ``doc`` [B, Tk] (document ids of the keys'
    positions): the mask is ANDed with "same document". Slow and O(Tq * Tk) memory on purpose.
    """
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    k = expand_kv(k, H)
    start = Tk - Tq if q_start is None else q_start
    qi, kj, h = _grid(start, Tq, Tk, H, q.device)
    mask = pattern.allowed(qi, kj, h).expand(H, Tq, Tk)  # the dense mask's rows, broadcasting over B
    if doc is not None:
        mask = mask & same_document(doc[:, start : start + Tq], doc)  # [B, H, Tq, Tk]
    if pattern.mechanism == "linear":
        from .linear import _features

        feature_map = cast(Linear, pattern).feature_map
        fq, fk, _ = _features(q, k, k[..., :0], feature_map)  # no values: only their dtype matters
        A = (fq @ fk.transpose(-2, -1)).masked_fill(~mask, 0.0)
        return A / (A.sum(-1, keepdim=True) + _LINEAR_EPS)
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[3] ** -0.5
    if modifier is not None:
        scores = modifier.score(scores, qi, kj, h)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    # A query with no allowed key would softmax to NaN; define its weights (and output) as zero.
    return weights.masked_fill(~mask, 0.0)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    dropout_p: float = 0.0,
    training: bool = False,
    modifier=None,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec: ``reference_weights`` (dense scores, the pattern's dense mask AND the documents', softmax in
    fp32), dropout, @ v.

    Slow and O(T^2) memory on purpose: it is the obviously-correct version the
    fast backends are tested against. Queries are the last ``Tq`` of the ``Tk``
    positions (Tq == Tk in training), so a query-only suffix also works. Linear
    attention has no dropout (its backend never forms the weights).
    """
    weights = reference_weights(q, k, pattern, modifier=modifier, doc=doc)
    v = expand_kv(v, q.shape[1])
    if training and dropout_p > 0.0 and pattern.mechanism == "softmax":
        weights = F.dropout(weights, p=dropout_p)
    return (weights @ v.to(weights.dtype)).to(v.dtype)


# Dense attention within documents, fwd+bwd, fp32, H=8, Dh=64, documents of 128 tokens on average, one CPU core
# (benchmarks/docmask-cpu/dense-choice.csv): SDPA with a boolean [B, 1, T, T] causal-and-same-document mask is
# clearly faster up to T=512 (22 against 50 ms at B=8, T=128; 68 against 122 ms at B=2, T=512); at T=1024 the
# block-sparse kernel, which skips the blocks no document reaches, is level or faster (94 against 94 ms at B=1,
# 346 against 354 at B=4; 72 against 114 at B=1 in an earlier run), and its memory follows the visited blocks
# where the mask's B * T^2 bytes do not. So SDPA takes the mask up to this length; longer rows go to the kernel
# (FlexAttention on CUDA).
SDPA_DOC_MAX = 512


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    dropout_p: float = 0.0,
    training: bool = False,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` with its built-in causal mask (no T x T mask).

    With ``doc`` (document masking) and T <= ``SDPA_DOC_MAX`` the mask is a boolean causal-and-same-document
    one; longer rows go to the block-sparse kernel (see ``SDPA_DOC_MAX``)."""
    if not pattern.is_dense_causal:
        raise ConfigError(
            f"attention backend 'sdpa' runs only the dense causal pattern, not {pattern.name!r}: use backend=auto or reference"
        )
    p = dropout_p if training else 0.0
    if doc is not None:
        return _sdpa_documents(q, k, v, pattern, p, doc)
    if k.shape[1] != q.shape[1]:  # shared key/value heads, never copied
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


def _sdpa_documents(q, k, v, pattern: Pattern, p: float, doc: torch.Tensor) -> torch.Tensor:
    T = q.shape[2]
    if T > SDPA_DOC_MAX:
        if q.device.type == "cuda" and p == 0.0 and _flex_preferred(pattern, q.device):
            return _flex(q, k, v, pattern, doc=doc)
        return _blocksparse(q, k, v, pattern, p, p > 0.0, doc=doc)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = same_document(doc, doc) & causal  # [B, 1, T, T]
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class BackendSpec:
    fn: BackendFn
    supports: Callable[[Pattern, torch.device | None], bool]  # can run it (a forced choice is accepted)
    why_not: str  # completes "backend X cannot run pattern P: ..."
    preferred: Callable[[Pattern, torch.device | None], bool]  # ``auto`` picks it (e.g. flex: GPU only)
    dropout: bool  # applies attention dropout in training
    modifiers: bool = False  # applies score modifiers (takes ``modifier=``)
    documents: bool = False  # applies document masking (takes ``doc=``)


# Insertion order is the preference order for ``auto``.
BACKENDS: dict[str, BackendSpec] = {}


def register_backend(
    name: str,
    fn: BackendFn,
    supports: Callable[[Pattern, torch.device | None], bool],
    why_not: str = "",
    preferred: Callable[[Pattern, torch.device | None], bool] | None = None,
    dropout: bool = True,
    modifiers: bool = False,
    documents: bool = False,
) -> None:
    """Add a backend; later registrations are less preferred by ``auto`` than earlier ones, except ``reference``,
    which is always last. ``preferred`` (default: ``supports``) narrows where ``auto`` picks it; ``dropout=False``
    keeps it away from models with attention dropout; ``modifiers=True`` says it applies score modifiers,
    ``documents=True`` that it applies document masking."""
    BACKENDS[name] = BackendSpec(fn, supports, why_not, preferred or supports, dropout, modifiers, documents)
    if "reference" in BACKENDS and name != "reference":
        BACKENDS["reference"] = BACKENDS.pop("reference")  # keep the slow spec as the last resort


# Fast backends live in their own modules, imported on first use: the registry stays light.


def _softmax(pattern: Pattern) -> bool:
    return pattern.mechanism == "softmax"


def _flex(q, k, v, pattern, dropout_p=0.0, training=False, modifier=None, doc=None):
    from .flex import flex

    return flex(q, k, v, pattern, dropout_p, training, modifier, doc)


def _flex_supports(pattern: Pattern, device: torch.device | None) -> bool:
    from .flex import flex_supported

    return flex_supported(pattern, device)


def _flex_preferred(pattern: Pattern, device: torch.device | None) -> bool:
    """``auto`` uses flex for sparse patterns on CUDA only: on CPU it is compiled for inference alone."""
    if device is None or device.type != "cuda" or not _softmax(pattern):
        return False
    from .flex import flex_available

    return flex_available(device)[0]


def _blocksparse(q, k, v, pattern, dropout_p=0.0, training=False, modifier=None, doc=None):
    from .blocksparse import blocksparse

    return blocksparse(q, k, v, pattern, dropout_p, training, modifier, doc)


def _linear(q, k, v, pattern, dropout_p=0.0, training=False, doc=None):
    from .linear import linear_backend

    return linear_backend(q, k, v, pattern, dropout_p, training, doc)


register_backend(
    "sdpa",
    sdpa,
    lambda pattern, device: pattern.is_dense_causal,
    "it only has the dense causal mask built in",
    documents=True,
)
register_backend(
    "flex",
    _flex,
    _flex_supports,
    "it computes softmax attention on CUDA or CPU only",
    preferred=_flex_preferred,
    dropout=False,
    modifiers=True,
    documents=True,
)
register_backend(
    "blocksparse",
    _blocksparse,
    lambda pattern, device: _softmax(pattern),
    "it computes softmax attention, not linear attention",
    modifiers=True,
    documents=True,
)
register_backend(
    "linear",
    _linear,
    lambda pattern, device: pattern.mechanism == "linear",
    "it computes linear attention only",
    documents=True,
)
register_backend("reference", reference, lambda pattern, device: True, modifiers=True, documents=True)


def select_backend(
    name: str,
    pattern: Pattern,
    device: torch.device | str | None = None,
    dropout: float = 0.0,
    modifiers: list[str] | None = None,
    document_mask: bool = False,
) -> tuple[str, BackendFn]:
    """Resolve ``name`` (``auto`` or a backend name) for ``pattern`` on ``device`` to ``(backend_name, fn)``,
    for a model with attention ``dropout``, score ``modifiers`` (their specs) and ``document_mask``.

    ``device`` None means "not known yet": only device-independent choices are made.
    """
    if device is not None:
        device = torch.device(device)
    if name == "auto":
        for backend_name, spec in BACKENDS.items():
            if (
                spec.preferred(pattern, device)
                and (spec.dropout or dropout == 0.0)
                and (spec.modifiers or not modifiers)
                and (spec.documents or not document_mask)
            ):
                return backend_name, spec.fn
        raise ConfigError(
            f"no attention backend can run pattern {pattern.name!r} on {device}"
        )  # unreachable while reference exists
    chosen = BACKENDS.get(name)
    if chosen is None:
        raise ConfigError(f"attention.backend={name!r} is unknown: use auto or one of {', '.join(BACKENDS)}")
    if not chosen.supports(pattern, device):
        reason = f" ({chosen.why_not})" if chosen.why_not else ""
        raise ConfigError(
            f"attention.backend={name!r} cannot run pattern {pattern.name!r}{reason}: use attention.backend=auto or reference"
        )
    if dropout > 0.0 and not chosen.dropout:
        raise ConfigError(
            f"attention.backend={name!r} has no attention dropout but the model's is {dropout} "
            f"(model.attn_dropout, or model.dropout where it is unset): use attention.backend=auto, "
            f"blocksparse or reference, or model.attn_dropout=0"
        )
    if modifiers and not chosen.modifiers:
        able = ", ".join(n for n, s in BACKENDS.items() if s.modifiers)
        raise ConfigError(
            f"attention.backend={name!r} cannot apply score modifiers {list(modifiers)}: "
            f"use attention.backend=auto or one of {able}"
        )
    if document_mask and not chosen.documents:
        able = ", ".join(n for n, s in BACKENDS.items() if s.documents)
        raise ConfigError(
            f"attention.backend={name!r} cannot apply attention.document_mask: "
            f"use attention.backend=auto or one of {able}, or attention.document_mask=false"
        )
    return name, chosen.fn


def attention_dropout(model_cfg) -> float:
    """The dropout on the attention weights: ``model.attn_dropout``, or ``model.dropout`` where it is None.

    None is the default, so configs written before ``attn_dropout`` existed keep their attention dropout.
    """
    return model_cfg.dropout if model_cfg.attn_dropout is None else model_cfg.attn_dropout
