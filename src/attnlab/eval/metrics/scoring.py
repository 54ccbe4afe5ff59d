"""Honest language-model metrics over a whole token split (text) or image split (images).

Every target token of the split is scored exactly once. Windows of
``context`` tokens slide by ``stride``: the first window scores all of its
targets, each later one only its last ``stride`` targets, so every token is
predicted from at least ``context - stride`` tokens of left context (all of
it where the split is shorter). The windows are fixed by (context, stride)
alone and their NLL sums are accumulated in float64 in window order, so the
batch size only groups windows and cannot change the result.

Images are scored one whole image per row, from a start-of-image token
(``score_images``): every byte of every image is a target exactly once, and
bits per dimension divide by the split's bytes (H*W*C per image).

Under data parallelism (``rank``, ``world_size``) each rank scores a
contiguous share of the batches and returns its partial Score; the trainer
sums the partial Scores over ranks (float64), which equals the
single-process Score up to the order of float64 additions.

The Maincode "mainrun" number (``mainrun_loss``) is the summed NLL divided by
``len("<eos>".join(docs) + "<eos>")``, the challenge's denominator.
``mainrun_windows`` is the challenge's own window rule, which scores only whole
spans of batch_size * context + 1 tokens (``attnlab eval --mainrun-exact``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Window:
    start: int  # first input position
    length: int  # input tokens; targets are start+1 .. start+length
    scored: int  # how many of the last targets this window scores


def plan_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows that score targets 1..n_tokens-1 exactly once each."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, {context}], got {stride}")
    n_targets = n_tokens - 1
    if n_targets < 1:
        return []
    first = min(context, n_targets)
    windows = [Window(0, first, first)]
    done = first  # targets 1..done are scored
    while done < n_targets:
        end = min(done + stride, n_targets)
        windows.append(Window(end - context, context, end - done))
        done = end
    return windows


def shard(items: list, rank: int = 0, world_size: int = 1) -> list[tuple[object, bool]]:
    """This rank's contiguous share of ``items`` as (item, counted) pairs.

    Shorter shares are padded with uncounted repeats of the first item, so every
    rank makes the same number of model calls: FSDP gathers weights inside each
    call, and a rank that skipped one would leave the others waiting.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    per_rank = -(-len(items) // world_size)
    mine = items[rank * per_rank : (rank + 1) * per_rank]
    return [(x, True) for x in mine] + [(items[0], False)] * (per_rank - len(mine))


@dataclass
class Score:
    nll_nats: float  # summed over scored tokens
    tokens: int


def score_tokens(
    model,
    tokens: np.ndarray,
    *,
    context: int,
    stride: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Score:
    """Sum of next-token NLL (nats) over the split, each target scored once.

    ``max_tokens`` limits scoring to the first targets (periodic evals during
    training); the final metrics always pass None to score the whole split.
    With ``world_size > 1`` only this rank's share of the windows is scored.
    """
    stride = stride or context
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    return score_windows(
        model,
        tokens,
        plan_windows(n, context, stride),
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        progress=progress,
        rank=rank,
        world_size=world_size,
    )


def score_windows(
    model,
    tokens: np.ndarray,
    windows: list[Window],
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Score:
    """Sum of next-token NLL (nats) over the targets the windows score, accumulated in float64 in window order."""
    total, count = 0.0, 0
    groups = shard(_group(windows, batch_size), rank, world_size) if windows else []
    bar = tqdm(groups, desc="eval", unit="batch", disable=not progress, leave=False)
    with _scoring(model, device, autocast_dtype):
        for group, counted in bar:
            x, y = _stack(tokens, group, device)
            logits = model(x)
            if not counted:
                continue
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
            for row, w in zip(nll, group):
                total += row[-w.scored :].double().sum().item()
                count += w.scored
    return Score(total, count)


@contextlib.contextmanager
def _scoring(model, device, autocast_dtype: torch.dtype | None):
    """Eval mode (restored after), no autograd, and autocast when a dtype is given."""
    was_training = model.training
    model.eval()
    amp = (
        torch.autocast(torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), amp:
            yield
    finally:
        model.train(was_training)


def _group(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most batch_size per group."""
    groups: list[list[Window]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].length == w.length:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def _stack(tokens: np.ndarray, group: list[Window], device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[w.start : w.start + w.length + 1], dtype=np.int64) for w in group])
    t = torch.from_numpy(rows).to(device)
    return t[:, :-1], t[:, 1:]


def text_metrics(score: Score, split_meta: dict, *, partial: bool = False) -> dict:
    """Metrics for a text split. Bits/byte divides by the split's UTF-8 bytes,
    so it is comparable across tokenizers; only meaningful over the whole split."""
    m = {
        "nats_per_token": score.nll_nats / score.tokens,
        "perplexity": math.exp(min(score.nll_nats / score.tokens, 700.0)),
        "tokens": score.tokens,
    }
    if not partial:
        m["bits_per_byte"] = score.nll_nats / (LN2 * split_meta["bytes"])
        m["mainrun_loss"] = score.nll_nats / mainrun_chars(split_meta)
        m["bytes"] = split_meta["bytes"]
        m["chars"] = split_meta["chars"]
    return m


# ------------------------------------------------------------------ the Maincode "mainrun" challenge's number

MAINRUN_SEPARATOR = "<eos>"  # the challenge joins the titles with this string and counts it as 5 characters


def mainrun_chars(split_meta: dict) -> int:
    """``len("<eos>".join(docs) + "<eos>")`` of the split: what the challenge divides its summed NLL by."""
    return split_meta["chars"] + len(MAINRUN_SEPARATOR) * split_meta["documents"]


def mainrun_windows(n_tokens: int, context: int, batch_size: int) -> list[Window]:
    """The rows the challenge's ``evaluate()`` scores, on a split of ``n_tokens`` (``[eos] d1 [eos] d2 [eos] ...``).

    Its token stream is ours without the leading ``eos``. It takes whole spans of
    ``batch_size * context + 1`` tokens at steps of that span (a trailing partial
    span is dropped) and scores each as ``batch_size`` rows of ``context`` targets,
    every row predicted from its own start.
    """
    stream, span = n_tokens - 1, batch_size * context + 1
    return [
        Window(1 + ptr + row * context, context, context)
        for ptr in range(0, stream - span + 1, span)
        for row in range(batch_size)
    ]


def mainrun_exact_metrics(score: Score, split_meta: dict) -> dict:
    """The challenge's loss (NLL of the scored windows / characters of the whole split) and the share scored."""
    return {
        "loss": score.nll_nats / mainrun_chars(split_meta),
        "coverage": score.tokens / (split_meta["tokens"] - 1),
        "tokens": score.tokens,
    }


def score_images(
    model,
    tokens: np.ndarray,
    *,
    tokens_per_image: int,
    sos: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    max_images: int | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Score:
    """Sum of NLL (nats) of every byte of every image, each image predicted from SOS alone.

    Per-image sums are accumulated in float64 in image order, so the batch size
    cannot change the result. ``max_images`` limits periodic evals to the first images.
    With ``world_size > 1`` only this rank's share of the batches is scored.
    """
    n = len(tokens) // tokens_per_image
    n = n if max_images is None else min(n, max_images)
    total, count = 0.0, 0
    starts = shard(list(range(0, n, batch_size)), rank, world_size) if n else []
    with _scoring(model, device, autocast_dtype):
        for first, counted in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
            rows = np.asarray(
                tokens[first * tokens_per_image : min(first + batch_size, n) * tokens_per_image], dtype=np.int64
            )
            y = torch.from_numpy(rows.reshape(-1, tokens_per_image)).to(device)
            x = torch.cat([torch.full_like(y[:, :1], sos), y[:, :-1]], dim=1)
            logits = model(x)
            if not counted:
                continue
            nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
            for per_image in nll.double().sum(1).tolist():
                total += per_image
            count += y.numel()
    return Score(total, count)


def image_metrics(score: Score, tokens_per_image: int) -> dict:
    """Bits per dimension (the images' bytes), nats per image and per dimension."""
    images = score.tokens // tokens_per_image
    return {
        "bits_per_dim": score.nll_nats / (LN2 * score.tokens),
        "nats_per_dim": score.nll_nats / score.tokens,
        "nats_per_image": score.nll_nats / images,
        "images": images,
        "tokens": score.tokens,
    }
