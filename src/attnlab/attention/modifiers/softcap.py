"""Logit soft-capping (as in Gemma 2): cap * tanh(score / cap) keeps every score inside (-cap, cap).

Smooth, close to the identity for |score| << cap; no positions, so it streams with any pattern.
"""

from __future__ import annotations

import torch

from .base import Modifier, Param, register_modifier


@register_modifier("softcap")
class SoftCap(Modifier):
    """cap * tanh(scores / cap)."""

    params = {"cap": Param(float, 50.0, above=0.0, help="scores are squashed into (-cap, cap)")}
    position_free = True

    def score(self, scores, q_idx, k_idx, head):
        cap = self.values["cap"]
        return torch.tanh(scores / cap) * cap
