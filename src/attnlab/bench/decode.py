"""Per-token decoding time at a given length, on any device: the prompt in one pass, then timed cached steps.

``attnlab bench generate`` decodes every position up to each length (a CPU
benchmark of memory and time together); at 16k positions that is 16k steps.
Here a cache sized for L is filled by one forward over L - window random
tokens (``prefill``), then ``window`` cached steps are timed one by one
(synchronising the GPU after each): the median is the cost per token at L.
The recompute baseline is the median of full forwards over the last context
tokens at L, as in ``bench generate``.

A compiled row (``mode`` "cache+compile") runs the same cached steps through
``torch.compile(model, mode=..., backend=...)`` (``reduce-overhead``: CUDA
graphs where the step allows them); its first steps (compilation and
recompilations as the cache grows) are reported apart as ``compile_s``.

What a step reads is the cache's business (``attention.cache``): local and
sink_window keep only their window, so their time stays flat in L.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..config import Config
from ..model.gpt import GPT
from .generate import row_config
from .measure import params_label
from .train import _vocab

COLUMNS = (
    "spec",
    "pattern",
    "params",
    "backend",
    "length",
    "mode",
    "ms_per_token",
    "tokens_per_s",
    "cache_mb",
    "speedup",
    "compile_s",
)
FLAT_SPECS = ("local", "sink_window")  # bounded caches: time per token should not grow with L
FLAT_TOLERANCE = 0.10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg: Config, spec: str, context: int, device: torch.device, seed: int = 0) -> GPT:
    """The model of ``spec`` at ``context`` on ``device``, random weights, eval mode, backends resolved."""
    c = row_config(cfg, spec, context)
    torch.manual_seed(seed)
    model = GPT(c.model, c.attention, _vocab(c)).to(device).eval()
    model.resolve_backends(device)
    return model


@torch.no_grad()
def _timed_steps(step: Callable, cache, token: torch.Tensor, n: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        token = step(token, cache).argmax(-1)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@torch.no_grad()
def decode_ms(
    model: GPT,
    length: int,
    window: int,
    device: torch.device,
    step: Callable | None = None,
    warm: int = 0,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(median ms per cached step at ``length``, cache MB, seconds of the ``warm`` untimed steps before)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.vocab_size, (1, length - window - warm), generator=gen).to(device)
    cache = model.new_cache(1, length)
    token = model(prompt, cache=cache, last_only=True).argmax(-1)
    step = step or (lambda tok, c: model(tok, cache=c, last_only=True))
    _sync(device)
    t0 = time.perf_counter()
    if warm:
        _timed_steps(step, cache, token, warm, device)
    warm_s = time.perf_counter() - t0
    times = _timed_steps(step, cache, token, window, device)
    return statistics.median(times), cache.nbytes() / 2**20, warm_s


@torch.no_grad()
def recompute_ms(model: GPT, length: int, repeats: int, device: torch.device, seed: int = 1) -> float:
    """Median ms of one full forward over the last ``context`` of ``length`` random tokens (+ argmax)."""
    idx = torch.randint(
        0, model.vocab_size, (1, min(length, model.context)), generator=torch.Generator().manual_seed(seed)
    )
    idx = idx.to(device)
    times = []
    for _ in range(repeats + 1):  # the first one is untimed (one-time costs)
        t0 = time.perf_counter()
        model(idx, last_only=True).argmax(-1)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def _row(
    spec: str,
    model: GPT,
    length: int,
    mode: str,
    ms: float,
    cache_mb: float | None = None,
    speedup: float | None = None,
    compile_s: float | None = None,
) -> dict:
    core = model.blocks[0].attn.core
    return {
        "spec": spec,
        "pattern": core.pattern.name,
        "params": params_label(core.pattern),
        "backend": core.backend,
        "length": length,
        "mode": mode,
        "ms_per_token": round(ms, 4),
        "tokens_per_s": round(1e3 / ms, 1),
        "cache_mb": None if cache_mb is None else round(cache_mb, 3),
        "speedup": None if speedup is None else round(speedup, 2),
        "compile_s": None if compile_s is None else round(compile_s, 2),
    }


def bench_decode(
    cfg: Config,
    specs: Sequence[str],
    lengths: Sequence[int],
    *,
    window: int = 32,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    compile_specs: Sequence[str] = (),
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    compile_warm: int = 8,
    on_row: Callable[[dict], None] = lambda row: None,
) -> list[dict]:
    """Cached and recomputed per-token time for every spec and length, then compiled cached steps for
    ``compile_specs`` at the shortest length; each row goes to ``on_row`` as soon as it is measured."""
    device, lengths = torch.device(device), sorted(set(lengths))
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        on_row(row)

    for spec in specs:
        model = build(cfg, spec, lengths[-1], device)
        for L in lengths:
            ms, mb, _ = decode_ms(model, L, window, device)
            rec = recompute_ms(model, L, repeats, device)
            emit(_row(spec, model, L, "cache", ms, mb, speedup=rec / ms))
            emit(_row(spec, model, L, "recompute", rec))
        del model
    for spec in compile_specs:
        model = build(cfg, spec, lengths[-1], device)
        compiled = torch.compile(model, mode=compile_mode, backend=compile_backend)

        def step(tok, c, f=compiled):
            return f(tok, cache=c, last_only=True)

        ms, mb, warm_s = decode_ms(model, lengths[0], window, device, step=step, warm=compile_warm)
        emit(_row(spec, model, lengths[0], "cache+compile", ms, mb, compile_s=warm_s))
        del model, compiled
    return rows


def flatness(rows: list[dict]) -> list[dict]:
    """For the bounded-cache specs: cached ms/token at the longest length over the shortest (1 = flat)."""
    cache = {(r["spec"], r["length"]): r["ms_per_token"] for r in rows if r["mode"] == "cache"}
    out = []
    for spec in dict.fromkeys(r["spec"] for r in rows):
        lengths = sorted(L for s, L in cache if s == spec)
        if spec.split(":")[0] in FLAT_SPECS and len(lengths) > 1:
            ratio = cache[(spec, lengths[-1])] / cache[(spec, lengths[0])]
            out.append(
                {
                    "spec": spec,
                    "from": lengths[0],
                    "to": lengths[-1],
                    "ratio": round(ratio, 3),
                    "met": ratio <= 1 + FLAT_TOLERANCE,
                }
            )
    return out
