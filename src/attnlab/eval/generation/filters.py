"""Token-sampling controls: temperature, top-k, top-p, typical, min-p, repetition penalty, stop strings.

Every filter takes logits [B, V] and returns logits with removed tokens set to
-inf; none ever removes every token of a row. ``next_token`` composes them in
the order HF transformers uses, so settings mean the same thing here as there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...errors import ConfigError

_NEG_INF = float("-inf")


def _check_fraction(name: str, value: float, *, example: float, closed_at_one: bool) -> None:
    """Fractions live in (0, 1] (top_p, typical_p) or [0, 1) (min_p); NaN fails both."""
    ok = 0 < value <= 1 if closed_at_one else 0 <= value < 1
    if not ok:
        interval = "(0, 1]" if closed_at_one else "[0, 1)"
        raise ConfigError(f"{name}={value} is outside {interval}: use e.g. {name}={example}")


def _check_top_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"top_k={k!r} must be an integer >= 1: use e.g. top_k=50, or leave it unset")


def _check_repetition_penalty(penalty: float) -> None:
    if not penalty > 0:
        raise ConfigError(
            f"repetition_penalty={penalty} must be > 0 (1.0 disables it): use e.g. repetition_penalty=1.2"
        )


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``None`` disables a filter; temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and a fix."""
        if not (0 <= self.temperature < math.inf):
            raise ConfigError(
                f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy): use e.g. temperature=0.8"
            )
        if self.top_k is not None:
            _check_top_k(self.top_k)
        if self.top_p is not None:
            _check_fraction("top_p", self.top_p, example=0.9, closed_at_one=True)
        if self.typical_p is not None:
            _check_fraction("typical_p", self.typical_p, example=0.95, closed_at_one=True)
        if self.min_p is not None:
            _check_fraction("min_p", self.min_p, example=0.05, closed_at_one=False)
        _check_repetition_penalty(self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> dict:
        """Flat dict for run logs; ``strategy`` says whether the filters matter at all."""
        return {"strategy": "greedy" if self.greedy else "sample", **dataclasses.asdict(self)}


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th value are kept too)."""
    _check_top_k(k)
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, _NEG_INF)


def _keep_prefix_reaching(logits: torch.Tensor, order: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the shortest prefix of ``order`` (indices [B, V]) whose probability mass reaches p.

    A token is dropped when the mass strictly before it already reaches p; the mass
    before the first token is 0 < p, so it always stays.
    """
    probs = logits.softmax(-1).gather(-1, order)
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, _NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the most probable tokens until their mass reaches p."""
    _check_fraction("top_p", p, example=0.9, closed_at_one=True)
    if p >= 1:
        return logits
    order = torch.argsort(logits, dim=-1, descending=True)
    return _keep_prefix_reaching(logits, order, p)


def typical_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): keep tokens whose surprisal is closest to the entropy.

    Tokens are ranked by |-log p(x) - H| and the shortest prefix of that ranking
    reaching mass p is kept, so the most probable token can be dropped when it is
    far less surprising than the distribution is on average.
    """
    _check_fraction("typical_p", p, example=0.95, closed_at_one=True)
    if p >= 1:
        return logits
    logp = logits.log_softmax(-1)
    entropy = torch.special.entr(logp.exp()).sum(-1, keepdim=True)  # entr(0) = 0 for removed tokens
    order = torch.argsort((-logp - entropy).abs(), dim=-1)
    return _keep_prefix_reaching(logits, order, p)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with prob >= min_p * max prob.

    Compared in log space (logit - max logit >= log min_p), which needs no softmax
    and cannot underflow.
    """
    _check_fraction("min_p", min_p, example=0.05, closed_at_one=False)
    if min_p == 0:
        return logits
    threshold = logits.amax(-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, previous_tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019) for ids seen in each row of previous_tokens [B, T].

    Positive logits are divided by ``penalty`` and negative ones multiplied, so a
    penalty > 1 always makes a seen token less likely; each id counts once.
    """
    _check_repetition_penalty(penalty)
    if penalty == 1 or previous_tokens.size(-1) == 0:
        return logits
    seen = logits.gather(-1, previous_tokens)
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    # Duplicate ids scatter the same value computed from the original logit: penalised once.
    return logits.scatter(-1, previous_tokens, penalised)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Top-k then top-p; kept for callers written before SamplingConfig."""
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def process_logits(
    logits: torch.Tensor, cfg: SamplingConfig, previous_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """The float32 logits ``next_token`` draws from, in HF's order.

    1. repetition penalty on the raw logits (needs ``previous_tokens``);
    2. greedy (temperature 0) stops here: argmax ignores the filters;
    3. divide by temperature, then top-k, top-p, typical, min-p.
    """
    logits = logits.float()
    if previous_tokens is not None:
        logits = apply_repetition_penalty(logits, previous_tokens, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    # Shifting by the row max changes no filter or softmax, and keeps a tiny temperature from overflowing.
    logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.typical_p is not None:
        logits = typical_filter(logits, cfg.typical_p)
    if cfg.min_p is not None:
        logits = min_p_filter(logits, cfg.min_p)
    return logits


def next_token(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    previous_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token per row of logits [B, V]; returns [B, 1] long on the logits' device.

    Order (as in HF transformers): repetition penalty on the raw logits over
    ``previous_tokens`` [B, T] (prompt included); temperature 0 -> argmax; else
    divide by temperature, top-k, top-p, typical, min-p, softmax, multinomial.
    The draw happens on CPU with ``generator`` (a CPU generator), so one seed
    gives the same tokens whatever device the model runs on.
    """
    logits = process_logits(logits, cfg, previous_tokens)
    if cfg.greedy:
        return logits.argmax(-1, keepdim=True)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


class StopStrings:
    """Detects stop strings in the generated text of one row.

    Only the generated tokens are decoded (never the prompt), so a stop string
    that occurs only in the prompt does not stop generation. Decoding the tail on
    its own may differ from decoding it in context for tokenizers that merge
    across the boundary; that is accepted here.
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        if any(not s for s in stops):
            raise ConfigError("a stop string is empty and would stop at once: remove it")
        self.stops = tuple(stops)
        self.decode = decode

    def _found(self, ids: list[int]) -> bool:
        text = self.decode(ids)
        return any(s in text for s in self.stops)

    def check(self, row_ids: list[int], prompt_len: int) -> int | None:
        """Generated tokens to keep (through the one completing a stop string), or None to go on.

        Called every step, the stop string is usually completed by the last token,
        so walking back from the end costs one or two decodes.
        """
        generated = row_ids[prompt_len:]
        if not self._found(generated):
            return None
        n = len(generated)
        while n > 1 and self._found(generated[: n - 1]):
            n -= 1
        return n

    def trim(self, text: str) -> str:
        """Cut generated text at the first occurrence of any stop string."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        return text[:cut]
