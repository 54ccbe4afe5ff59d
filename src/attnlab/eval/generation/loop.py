"""Autoregressive generation with a KV cache per attention pattern.

The prompt fills the caches in one forward pass; each new token is then one
cached step (``GPT.forward(tok, cache=...)``), equal to a full forward pass over
the whole prefix. Past the training context, models whose caches are bounded
(local, sink_window, linear with RoPE, ALiBi or no positions) keep streaming; any
other model falls back to recomputing the last ``context`` tokens per step, as
uncached generation does. Randomness comes only from the explicit generator, so
a seed reproduces a sample exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from ...errors import CheckpointError
from .filters import SamplingConfig, StopStrings, next_token

# A stop test sees the sequences so far [B, T] and returns the rows that are finished [B].
StopTest = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    stop: StopTest | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    progress: bool = False,
    banned_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Extend ``prompt`` [B, T] by up to ``max_new_tokens`` tokens; returns [B, T + n].

    A row that produced ``stop_id`` (or that ``stop`` reports) is finished: it is
    padded with ``stop_id`` (or its last token) until every row is. ``on_token``
    receives each step's new tokens [B, 1] (streaming output). ``banned_ids`` are
    never sampled (their logits are -inf before any filter): tokens that may only
    appear in a prompt, such as an image model's start-of-image token.
    """
    sampling = sampling or SamplingConfig()
    banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long, device=prompt.device)
    was_training = model.training
    model.eval()
    try:
        decoder = _Decoder(model, prompt, max_new_tokens, use_cache)
        idx, logits = prompt, decoder.start()
        finished = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
        for step in tqdm(range(max_new_tokens), desc="sampling", unit="tok", disable=not progress, leave=False):
            _check_finite(logits)
            if banned.numel():
                logits = logits.index_fill(-1, banned, float("-inf"))
            nxt = next_token(logits, sampling, idx, generator)
            nxt = torch.where(finished[:, None], idx[:, -1:] if stop_id is None else torch.full_like(nxt, stop_id), nxt)
            idx = torch.cat([idx, nxt], dim=1)
            if on_token is not None:
                on_token(nxt)
            if stop_id is not None:
                finished |= nxt[:, 0] == stop_id
            if stop is not None:
                finished |= stop(idx)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = decoder.next(idx)
    finally:
        model.train(was_training)
    return idx


def _check_finite(logits: torch.Tensor) -> None:
    """Sampling from NaN/inf logits would crash deep in torch.multinomial: say what it means instead."""
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            "the model's predictions are not finite (NaN or infinite logits): its weights come from a "
            "run that diverged; sample an earlier checkpoint (--checkpoint) or retrain with a lower "
            "optim.lr"
        )


class _Decoder:
    """Next-token logits for a growing sequence: cached while it can be, recomputed otherwise."""

    def __init__(self, model, prompt: torch.Tensor, max_new_tokens: int, use_cache: bool):
        self.model, self.prompt, self.context = model, prompt, model.context
        self.cache = model.new_cache(prompt.size(0), prompt.size(1) + max_new_tokens) if use_cache else None

    def start(self) -> torch.Tensor:
        """Fill the cache from the prompt (the part past the context token by token, if the model streams)."""
        if self.cache is None:
            return self._recompute(self.prompt)
        streams = self.model.can_stream(self.cache)
        head = self.prompt[:, : self.context] if streams else self.prompt[:, -self.context :]
        logits = self.model(head, cache=self.cache, last_only=True)[:, -1].float()
        for t in range(head.size(1), self.prompt.size(1) if streams else 0):
            logits = self.model(self.prompt[:, t : t + 1], cache=self.cache, last_only=True)[:, -1].float()
        return logits

    def next(self, idx: torch.Tensor) -> torch.Tensor:
        if self.cache is not None and (self.cache.length < self.context or self.model.can_stream(self.cache)):
            return self.model(idx[:, -1:], cache=self.cache, last_only=True)[:, -1].float()
        self.cache = None  # past the context without a bounded cache: free it and recompute from here on
        return self._recompute(idx)

    def _recompute(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx[:, -self.context :], last_only=True)[:, -1].float()


class TextStreamer:
    """Prints one row's new tokens as text as they come, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        self.decode, self.write, self.pending = decode, write, []

    def __call__(self, nxt: torch.Tensor) -> None:
        self.pending.append(int(nxt[0, 0]))
        text = self.decode(self.pending)
        if not text.endswith("\ufffd"):  # a byte-level token may end inside a character
            self.write(text)
            self.pending = []


def sample_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    stops: list[str] = (),
    stop_at_eos: bool = True,
    use_cache: bool = True,
    stream: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[str], int]:
    """``num_samples`` continuations of ``prompt`` (batched), each cut at the end of its document or a stop string.

    Returns the texts (prompt included) and the number of decoding steps taken.
    """
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)  # eos = start of a document, as in training
    x = torch.tensor([ids] * num_samples, device=device)
    stopper = StopStrings(stops, tokenizer.decode) if stops else None
    stop = None
    if stopper is not None:
        stop = lambda idx: torch.tensor(
            [stopper.check(row, len(ids)) is not None for row in idx.tolist()], device=idx.device
        )
    out = generate(
        model,
        x,
        max_new_tokens,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
        stop_id=tokenizer.eos_id if stop_at_eos else None,
        stop=stop,
        use_cache=use_cache,
        on_token=None if stream is None else TextStreamer(tokenizer.decode, stream),
    )
    texts = []
    for row in out[:, len(ids) :].tolist():
        if stop_at_eos and tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        text = tokenizer.decode(row)
        texts.append(prompt + (stopper.trim(text) if stopper else text))
    return texts, out.size(1) - len(ids)
