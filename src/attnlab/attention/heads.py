"""Grouped-query attention: ``n_kv_head`` key/value heads shared by groups of ``n_head / n_kv_head`` query heads.

Query head h reads key/value head h // (n_head / n_kv_head) (consecutive query
heads share one, as in Llama's ``repeat_kv``). Backends without native support
expand keys and values at compute time; caches store only the shared heads.
"""

from __future__ import annotations

import torch


def expand_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, n_head, T, D], each key/value head repeated for its group of query heads."""
    groups = n_head // x.shape[1]
    if groups == 1:
        return x
    if groups * x.shape[1] != n_head:
        raise ValueError(f"{x.shape[1]} key/value heads do not divide {n_head} query heads")
    return x.repeat_interleave(groups, dim=1)
