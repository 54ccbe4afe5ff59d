"""A learned relative-position bias per head, bucketed as in T5 (Raffel et al. 2020), causal form.

Distance n = i - j >= 0 falls in bucket n for n < buckets/2 (exact), and in
logarithmically wider buckets up to ``max_distance``; every farther distance
shares the last bucket. Each (bucket, head) has one learned scalar, added to
the score. It depends on i - j only, so decoding may stream past the context.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import ConfigError
from .base import Modifier, Param, register_modifier


def relative_bucket(distance: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each distance i - j (negative distances, never attended causally, count as 0)."""
    n = distance.clamp(min=0)
    exact = buckets // 2
    far = n.clamp(min=exact).float()  # the log branch only matters where n >= exact; avoid log(0)
    log_bucket = exact + (torch.log(far / exact) / math.log(max_distance / exact) * (buckets - exact)).to(n.dtype)
    return torch.where(n < exact, n, log_bucket.clamp(max=buckets - 1))


@register_modifier("relpos")
class RelativePositionBias(Modifier):
    """scores + b[bucket(i - j), h], b learned (starts at zero: no bias)."""

    params = {
        "buckets": Param(int, 32, lo=2, hi=1024, help="distance buckets per head"),
        "max_distance": Param(int, 128, lo=2, hi=1 << 20, help="distances from here on share the last bucket"),
    }
    translation_invariant = True

    def __init__(self, n_head: int, **values):
        super().__init__(n_head, **values)
        # Flat [buckets * n_head]: a 1-D table is a bias to the optimizers (AdamW, no decay), not a matrix for Muon.
        self.bias = nn.Parameter(torch.zeros(int(self.values["buckets"]) * n_head))

    def check(self):
        b, d = int(self.values["buckets"]), int(self.values["max_distance"])
        if d <= b // 2:
            raise ConfigError(
                f"attention.modifiers entry 'relpos(buckets={b},max_distance={d})': max_distance must "
                f"exceed buckets/2 = {b // 2} (the exact buckets): raise max_distance or lower buckets"
            )

    def score(self, scores, q_idx, k_idx, head):
        bucket = relative_bucket(q_idx - k_idx, int(self.values["buckets"]), int(self.values["max_distance"]))
        return scores + self.bias[bucket * self.n_head + head]
