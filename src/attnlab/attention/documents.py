"""Documents in a row of tokens: ``<eos> doc <eos> doc <eos> ...``.

The document of position i is the number of ``<eos>`` tokens strictly before it
in the row, so the ``<eos>`` that ends a document belongs to it and the token
after it starts the next one. With ``attention.document_mask`` a query sees only
keys of its own document (intersected with its layer's pattern); with
``model.position_reset=document`` positions restart at each document's start.

Ids and starts are computed once per forward (``GPT``) from the input ids. A
KV cache continues them across calls through ``DocState`` (the last position's
document and whether it was an ``<eos>``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DocState(NamedTuple):
    """Where the previous call left off, per row [B]: the last position's document, its start, and its token."""

    last_id: torch.Tensor
    last_start: torch.Tensor
    last_eos: torch.Tensor  # bool: the last position was <eos>, so the next one starts a document


class Documents(NamedTuple):
    ids: torch.Tensor  # [B, T] document of each position (equal ids = same document)
    starts: torch.Tensor  # [B, T] absolute position where each position's document starts

    def positions(self, offset: int = 0) -> torch.Tensor:
        """[B, T] positions counted from each document's start (``model.position_reset=document``)."""
        T = self.ids.shape[1]
        return torch.arange(offset, offset + T, device=self.ids.device) - self.starts

    def state(self, idx: torch.Tensor, eos_id: int) -> DocState:
        return DocState(self.ids[:, -1], self.starts[:, -1], idx[:, -1] == eos_id)


def documents(idx: torch.Tensor, eos_id: int, offset: int = 0, prev: DocState | None = None) -> Documents:
    """The documents of ``idx`` [B, T], whose first column sits at absolute position ``offset``, continuing ``prev``."""
    eos = idx == eos_id
    before = eos.long().cumsum(1) - eos.long()  # <eos> tokens strictly before each position, in this call
    after_eos = torch.cat([eos.new_ones(idx.shape[0], 1) if prev is None else prev.last_eos[:, None], eos[:, :-1]], 1)
    if prev is not None:
        before = before + (prev.last_id + prev.last_eos.long())[:, None]
    pos = torch.arange(offset, offset + idx.shape[1], device=idx.device).expand_as(idx)
    floor = pos.new_zeros(idx.shape[0], 1) if prev is None else prev.last_start[:, None]
    starts = torch.where(after_eos, pos, floor).cummax(1).values.maximum(floor)
    return Documents(before, starts)


def same_document(doc_q: torch.Tensor, doc_k: torch.Tensor) -> torch.Tensor:
    """[B, 1, Tq, Tk] True where query and key share a document (doc_q [B, Tq], doc_k [B, Tk]): broadcasts over heads."""
    return doc_q[:, None, :, None] == doc_k[:, None, None, :]


__all__ = ["DocState", "Documents", "documents", "same_document"]
