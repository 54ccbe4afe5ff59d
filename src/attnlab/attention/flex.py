"""FlexAttention backend: a pattern run by PyTorch's compiled ``flex_attention``.

The pattern's ``allowed`` is the kernel's ``mask_mod``. The BlockMask that tells
the kernel which 128 x 128 tiles to visit is built from ``pattern.block_layout``
(never a T x T mask) and cached per (pattern, T, H, device): tiles where every
pair is allowed are "full" (no mask_mod call), the other active tiles "partial".
Sequences are padded to a multiple of 128, so all lengths within a tile share
one compiled kernel and one BlockMask (causality keeps the padding unseen).
Score modifiers are the kernel's ``score_mod``; shared key/value heads
(grouped-query attention) use flex's ``enable_gqa``.

Document masking ANDs ``doc[b, q] == doc[b, kv]`` into the mask_mod. Its
BlockMask is built per call from the pattern's cached tiles and each row's
per-tile document ranges (ids never decrease along a row): tiles whose query and
key documents cannot meet are skipped, and a full tile stays full only where
all its tokens share one document.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..errors import ConfigError
from .patterns import Pattern

BLOCK = 128  # flex_attention's default tile; the block layout is asked for at this size
_CACHE_SIZE = 32  # BlockMasks kept (a model has a few patterns x a few lengths)
_CHECK_PAIRS = 1 << 22  # token pairs evaluated at once when finding full tiles (bounds memory)
_masks: OrderedDict = OrderedDict()


@functools.cache
def _compiled():
    # Compiled lazily, on first use. Each (pattern, padded length) is one more compile, so
    # allow more than dynamo's default 8 before it falls back to flex's slow eager path.
    try:
        return torch.compile(flex_attention, dynamic=False, recompile_limit=64)
    except TypeError:  # older torch: no per-function limit, dynamo's global one applies
        return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _cxx() -> str | None:
    """Why inductor cannot compile C++ for the CPU here, or None if it can."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "no usable compiler"
        return f"no C++ compiler for inductor's CPU code ({type(e).__name__}): install g++ or set CXX"


def flex_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether compiled flex attention can run on ``device`` (default: cuda if present, else cpu), and why not."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "needs CUDA"
        from torch.utils._triton import has_triton

        return (True, "") if has_triton() else (False, "needs Triton for flex attention on CUDA")
    if device.type == "cpu":
        reason = _cxx()
        return (reason is None), (reason or "")
    return False, f"flex attention does not run on {device.type}"


def flex_supported(pattern: Pattern, device: torch.device | str | None = None) -> bool:
    """Softmax patterns on CUDA or CPU (CPU: inference only); device None means not known yet."""
    return pattern.mechanism == "softmax" and (device is None or torch.device(device).type in ("cuda", "cpu"))


def _on_device(pattern: Pattern, device: torch.device) -> Pattern:
    """The pattern with its tensor fields (BlockLayout.blocks) on ``device``, so mask_mod does no copies."""
    moved = {
        f.name: getattr(pattern, f.name).to(device)
        for f in dataclasses.fields(pattern)
        if isinstance(getattr(pattern, f.name), torch.Tensor)
    }
    return dataclasses.replace(pattern, **moved) if moved else pattern


def _full_tiles(pattern: Pattern, active: torch.Tensor, head: int) -> torch.Tensor:
    """Of the active tiles ``active`` [nb, nb] of one head, those whose every pair is allowed.

    Only active tiles are evaluated, in chunks, so the cost follows the pattern's sparsity.
    Padding past T is included, which can only make a tile partial: always safe.
    """
    full = torch.zeros_like(active)
    tiles = active.nonzero()
    r = torch.arange(BLOCK)
    h = torch.tensor(head).view(1, 1, 1)
    for chunk in tiles.split(max(1, _CHECK_PAIRS // BLOCK**2)):
        q = chunk[:, 0].view(-1, 1, 1) * BLOCK + r.view(1, BLOCK, 1)
        k = chunk[:, 1].view(-1, 1, 1) * BLOCK + r.view(1, 1, BLOCK)
        ok = torch.broadcast_to(pattern.allowed(q, k, h), (len(chunk), BLOCK, BLOCK))
        full[chunk[:, 0], chunk[:, 1]] = ok.flatten(1).all(1)
    return full


def _kv_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, nb, nb] bool -> flex's (kv_num_blocks [1, H, nb], kv_indices [1, H, nb, nb]), listed tiles first."""
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
    return tiles.sum(-1, dtype=torch.int32)[None], order.to(torch.int32)[None]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _tiles(pattern: Pattern, T: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(active, full) tiles [H, nb, nb] of ``pattern`` at length ``T``: some pair allowed, every pair allowed."""
    layout = pattern.block_layout(T, BLOCK, H)
    full = torch.zeros_like(layout)
    for group in pattern.kernel_groups(H, T):  # heads of a group share a rule: check one, copy to all
        full[list(group.heads)] = _full_tiles(pattern, layout[group.heads[0]], group.heads[0])
    return layout, full


def block_mask(pattern: Pattern, T: int, H: int, device: torch.device | str) -> BlockMask:
    """The (cached) BlockMask of ``pattern`` for length ``T`` and ``H`` heads on ``device``."""
    device = torch.device(device)
    key = (pattern, T, H, device)
    if key in _masks:
        _masks.move_to_end(key)
        return _masks[key]
    layout, full = _tiles(pattern, T, H)
    live = _on_device(pattern, device)
    mask = BlockMask.from_kv_blocks(
        *_kv_blocks(layout & ~full),
        *_kv_blocks(full),
        BLOCK_SIZE=BLOCK,
        mask_mod=lambda b, h, q_idx, kv_idx: live.allowed(q_idx, kv_idx, h),
        seq_lengths=(T, T),
    ).to(device)
    _masks[key] = mask
    if len(_masks) > _CACHE_SIZE:
        _masks.popitem(last=False)
    return mask


def document_block_mask(pattern: Pattern, doc: torch.Tensor, H: int) -> BlockMask:
    """The BlockMask of ``pattern`` within documents ``doc`` [B, T] (T a multiple of BLOCK, ids never decreasing
    along a row): one per call, from the cached tiles, so only [B, H, nb, nb] block tables are built."""
    B, T = doc.shape
    layout, full = (t.to(doc.device) for t in _tiles(pattern, T, H))
    ranges = doc.view(B, T // BLOCK, BLOCK)
    lo, hi = ranges[..., 0], ranges[..., -1]  # [B, nb] first and last document of each tile's tokens
    meet = (lo[:, None, :] <= hi[:, :, None]) & (hi[:, None, :] >= lo[:, :, None])  # [B, q tile, kv tile]
    single = lo == hi
    one_doc = single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    active = layout[None] & meet[:, None]
    whole = full[None] & one_doc[:, None]
    live = _on_device(pattern, doc.device)
    return BlockMask.from_kv_blocks(
        *_kv_blocks_batched(active & ~whole),
        *_kv_blocks_batched(whole),
        BLOCK_SIZE=BLOCK,
        mask_mod=lambda b, h, q_idx, kv_idx: live.allowed(q_idx, kv_idx, h) & (doc[b, q_idx] == doc[b, kv_idx]),
        seq_lengths=(T, T),
    )


def _kv_blocks_batched(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, nb, nb] bool -> (kv_num_blocks [B, H, nb], kv_indices [B, H, nb, nb]), listed tiles first."""
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
    return tiles.sum(-1, dtype=torch.int32), order.to(torch.int32)


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    dropout_p: float = 0.0,
    training: bool = False,
    modifier=None,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention backend: compiled FlexAttention with the pattern's cached BlockMask (no T x T tensor),
    ``modifier`` (score modifiers) as its ``score_mod``; k and v may have fewer heads than q; ``doc``
    (document ids [B, T]) ANDs "same document" into the mask."""
    if pattern.mechanism != "softmax":
        raise ConfigError(
            f"attention.backend=flex cannot run {pattern.mechanism} attention ({pattern.name!r}): "
            f"use attention.backend=auto, linear or reference"
        )
    if training and dropout_p > 0.0:
        raise ConfigError(
            "attention.backend=flex has no attention dropout: use attention.backend=blocksparse "
            "or reference, or model.attn_dropout=0"
        )
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ConfigError(
            "attention.backend=flex runs on CPU for inference only: "
            "use attention.backend=blocksparse (or auto) for training"
        )
    if q.device.type == "cpu":  # no graph is recorded here; flex on CPU refuses inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    H, T = q.shape[1], q.shape[2]
    if k.shape[2] != T:
        raise ValueError(f"flex attention needs as many queries as keys (got {T} and {k.shape[2]})")
    pad = -T % BLOCK
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    extra = {} if modifier is None else {"score_mod": modifier.score_mod()}
    if k.shape[1] != H:
        extra["enable_gqa"] = True
    if doc is None:
        mask = block_mask(pattern, T + pad, H, q.device)
    else:  # padding is one more document, after the last: no real query sees it
        doc = doc.to(q.device, torch.long)
        doc = torch.cat([doc, (doc[:, -1:] + 1).expand(-1, pad)], dim=1) if pad else doc.contiguous()
        mask = document_block_mask(pattern, doc, H)
    out = _compiled()(q, k, v, block_mask=mask, **extra)
    return out[:, :, :T] if pad else out
