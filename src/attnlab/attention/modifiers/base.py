"""Score modifiers: small, pure, named changes of the attention scores before the softmax.

A modifier answers one question, ``score(scores, q_idx, k_idx, head) -> scores``,
vectorised over broadcasting index tensors of absolute positions (the same
convention as ``Pattern.allowed``). ``scores`` are the scaled scores
q.k / sqrt(Dqk) of the pairs the indices name; the result broadcasts against
them. The pattern's mask is applied afterwards, so a modifier never sees (or
needs to care about) masked pairs. Every backend and cache that runs
modifiers calls this one definition: the reference on the dense scores, the
block-sparse kernel on each computed block (forward and backward, through
autograd of the definition), flex as its ``score_mod``, the KV caches on the
kept keys with their absolute positions.

A modifier is an ``nn.Module``: one with parameters (a learned bias) is owned
by the attention layer, trained and saved in checkpoints like any weight.
``translation_invariant`` (the score depends on i - j only) and
``position_free`` (no positions at all) say whether decoding may stream past
the training context exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn


@dataclass(frozen=True)
class Param:
    """One parameter of a modifier: its type, default, allowed range and a one-line description."""

    kind: type
    default: Any
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    help: str = ""
    above: float | None = None  # exclusive lower bound (e.g. a cap > 0)

    def describe(self, name: str) -> str:
        """``cap (float > 0, default 50)``, ``buckets (int in [2, 1024], default 32)``."""
        if self.lo is not None and self.hi is not None:
            bounds = f" in [{_num(self.lo)}, {_num(self.hi)}]"
        elif self.above is not None:
            bounds = f" > {_num(self.above)}"
        elif self.lo is not None:
            bounds = f" >= {_num(self.lo)}"
        else:
            bounds = ""
        return f"{name} ({self.kind.__name__}{bounds}, default {_num(self.default)})"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class Modifier(nn.Module):
    """Base class of score modifiers. Subclasses set ``name`` (via ``register_modifier``), ``params``,
    the two invariance flags, and write ``score``; their constructor takes ``n_head`` and the params."""

    name: ClassVar[str] = "modifier"
    params: ClassVar[dict[str, Param]] = {}
    translation_invariant: ClassVar[bool] = False  # depends on q_idx - k_idx only
    position_free: ClassVar[bool] = False  # ignores q_idx and k_idx

    def __init__(self, n_head: int, **values: Any):
        super().__init__()
        self.n_head = n_head
        self.values = dict(values)

    def score(self, scores: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self) -> None:
        """Rules that tie the parameters together (raise ConfigError); the ranges in ``params`` are checked already."""

    @property
    def spec(self) -> str:
        """The spec string that builds this modifier: ``name`` or ``name(key=value,...)``."""
        items = ",".join(f"{k}={_num(v)}" for k, v in self.values.items() if v != self.params[k].default)
        return f"{self.name}({items})" if items else self.name

    def extra_repr(self) -> str:
        return self.spec


MODIFIERS: dict[str, type[Modifier]] = {}


def register_modifier(name: str) -> Callable[[type[Modifier]], type[Modifier]]:
    """Class decorator: register a ``Modifier`` subclass under ``name`` (the name of its spec)."""

    def deco(cls: type[Modifier]) -> type[Modifier]:
        if name in MODIFIERS:
            raise ValueError(f"score modifier {name!r} is registered twice")
        cls.name = name
        MODIFIERS[name] = cls
        return cls

    return deco


class ScoreModifiers(nn.Module):
    """A layer's modifiers, applied in the order listed: the one object backends and caches receive."""

    def __init__(self, modifiers: list[Modifier]):
        super().__init__()
        self.items = nn.ModuleList(modifiers)

    def score(self, scores: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        for m in self.modifiers:
            scores = m.score(scores, q_idx, k_idx, head)
        return scores

    @property
    def modifiers(self) -> list[Modifier]:
        return [cast(Modifier, m) for m in self.items]

    def score_mod(self) -> Callable:
        """The modifiers as FlexAttention's ``score_mod(score, batch, head, q_idx, kv_idx)`` (a bound method, so the
        model stays picklable and copyable; layers with equal modifiers share one compiled kernel)."""
        return self._flex_score

    def _flex_score(self, score, b, h, q_idx, kv_idx):
        return self.score(score, q_idx, kv_idx, h)

    @property
    def streams(self) -> bool:
        """Decoding past the training context stays exact: every modifier is relative or position-free."""
        return all(m.translation_invariant or m.position_free for m in self.modifiers)

    @property
    def specs(self) -> list[str]:
        return [m.spec for m in self.modifiers]

    def __len__(self) -> int:
        return len(self.items)

    def extra_repr(self) -> str:
        return ", ".join(self.specs)
