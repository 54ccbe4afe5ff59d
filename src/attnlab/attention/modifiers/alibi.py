"""ALiBi (Press et al. 2022, "Train Short, Test Long"): a per-head linear penalty on distance.

bias = -slope_h * (i - j). For n heads a power of two the slopes are the
geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise the paper's
recipe: the slopes of the closest smaller power of two m, then every other
slope of 2m. No parameters to learn; it depends on i - j only, so a model
decodes past its training context with it.
"""

from __future__ import annotations

import math

import torch

from .base import Modifier, register_modifier


def alibi_slopes(n_head: int) -> torch.Tensor:
    """[n_head] fp32 slopes, largest first."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    m = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: n_head - m]
    return torch.tensor(slopes, dtype=torch.float32)


@register_modifier("alibi")
class ALiBi(Modifier):
    """scores - slope_h * (i - j)."""

    translation_invariant = True

    def __init__(self, n_head: int, **values):
        super().__init__(n_head, **values)
        self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)  # a function of n_head, not state

    def score(self, scores, q_idx, k_idx, head):
        return scores - self.slopes[head] * (q_idx - k_idx)
