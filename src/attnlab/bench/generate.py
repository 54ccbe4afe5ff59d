"""``attnlab bench generate``: per-token time and memory of generation, KV-cached vs recomputed, per pattern.

Every pattern spec gets a fresh model of the configured size (random weights,
``torch.manual_seed(seed)`` before each build, so rows differ only by the
pattern) and, for every length L in ``lengths``:

- ``cache``: one generation of L positions as ``attnlab sample`` runs it: a
  cache sized for L (``model.new_cache(batch, L)``), a random prompt of
  ``prompt_len`` tokens filled in one forward pass, then greedy decoding
  (argmax, one position per call) until the cache holds L positions. The
  reported time is the median over the last ``window`` steps before L (each
  step = argmax + one cached forward): the cost per token *at* L, robust to the
  odd slow step of a shared machine. ``ms_per_token_p10`` is their 10th
  percentile: a shared machine's slow phases last longer than one pass and move
  medians of separate passes by ±20% here, while the fast steps of every pass
  show the cost of the computation itself; flatness is judged on it. ``cache_mb`` is ``cache.nbytes()`` at L,
  the exact bytes held by every layer's cache. Each L is its own pass because
  caches preallocate for their ``max_len``: a dense cache sized for 16k holds
  16k positions from its first step, so one pass to the longest length would
  show the same memory at every L.
- ``recompute``: the uncached baseline (nanoGPT's ``generate``): one full
  forward ``model(idx[:, -context:], last_only=True)`` plus argmax per token,
  on a random sequence of length L; the median of ``repeats`` such forwards
  (the median also discards the cold first one). Skipped above
  ``recompute_max`` with a note. It runs right after the cached pass at the
  same L, so the speed-up (recompute / cache) compares timings taken in the
  same stretch of time.

Before anything is measured, every model runs a short prompt, one cached
step and one full forward once (this also checks every spec), so one-time
costs such as lazy imports land in no row.

Memory is the process's resident memory (weights, libraries, Python
included), so it shows what a user of the machine sees: before every pass
freed heap memory goes back to the OS (``malloc_trim(0)``) and the peak RSS is
reset (write ``5`` to ``/proc/self/clear_refs``); after it, ``peak_rss_mb`` is
``VmHWM`` (the pass's peak) and ``rss_mb`` is ``VmRSS`` with the cache still
alive. Where ``clear_refs`` is not writable, ``peak_rss_mb`` is NaN.

The model context of a row is the longest length unless its spec sets
``context=N``; a shorter context is allowed only for a model that can stream
past it (``model.can_stream``: bounded caches with RoPE, ALiBi or no positions), e.g.
``sink_window:sinks=4:window=256:context=1024`` generating 16x its context.
A spec may also set ``n_kv_head=N`` (grouped-query attention: N key/value
heads shared by the query heads, so the cache holds n_head / N times fewer
bytes), e.g. ``dense dense:n_kv_head=2`` compares both in one run; any
``model.KEY=value`` works the same way.

Results: the CSV (``COLUMNS``, written as rows are measured), ``machine.json``,
``results.json`` beside the CSV (rows, settings, skipped rows and the
``targets`` summary), a plot (``<out>.png``) and a summary table on stdout.
Threads are left as torch sets them (recorded in ``machine.json``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import Config, apply_pattern_spec, set_key
from ..errors import ConfigError
from ..model.gpt import GPT
from .attention import parse_int_list
from .measure import cpu_peak_supported, machine_info, params_label, reset_peak_rss, rss_mb
from .train import _vocab

COLUMNS = (
    "pattern",
    "params",
    "context",
    "length",
    "mode",
    "ms_per_token",
    "ms_per_token_p10",
    "tokens_per_s",
    "cache_mb",
    "peak_rss_mb",
    "rss_mb",
    "speedup",
)
DEFAULT_CONFIG = "configs/quickstart.yaml"
DEFAULT_PATTERNS = (
    "dense",
    "local:window=256",
    "sink_window:sinks=4:window=256",
    "strided:local_attn_ctx=128",
    "fixed:local_attn_ctx=128:blocksize=32",
    "linear",
)
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384"
SPEEDUP_TARGET = 10.0  # cached decoding at the shortest length should beat recomputation by this factor
FLAT_TOLERANCE = 0.10  # bounded caches: 16k/1k ratios of time and memory within 10% of 1
MEMORY_METHOD = (
    "gc.collect; malloc_trim(0); write 5 to /proc/self/clear_refs (reset peak RSS); pass; "
    "peak_rss_mb = VmHWM, rss_mb = VmRSS at the end of the pass (whole process)"
)


# ------------------------------------------------------------------ settings

MODEL_KEYS = ("context", "n_kv_head")  # spec keys that set the model, not the attention


def row_config(base: Config, spec: str, context: int) -> Config:
    """A copy of ``base`` whose every layer uses the pattern of ``spec`` (``name:key=value:...``, attention keys
    plus ``context=N``, ``n_kv_head=N`` or ``model.KEY=value``) with model context ``context`` unless the spec
    sets one; validated."""
    cfg = copy.deepcopy(base)
    set_key(cfg, "model.context", context)
    apply_pattern_spec(cfg, spec, aliases={key: f"model.{key}" for key in MODEL_KEYS})
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"pattern spec {spec!r}: {e}") from None


def build_model(cfg: Config, seed: int) -> GPT:
    """The benchmarked model: seeded random weights (decoding speed does not depend on training), eval, CPU backends."""
    torch.manual_seed(seed)
    model = GPT(cfg.model, cfg.attention, _vocab(cfg)).eval()
    model.resolve_backends("cpu")
    return model


def _check_stream(model: GPT, spec: str, batch: int, longest: int) -> None:
    """Refuse a context shorter than the longest length unless the model can decode past its context."""
    if model.context < longest and not model.can_stream(model.new_cache(batch, longest)):
        raise ConfigError(
            f"pattern spec {spec!r}: context={model.context} is below the longest length {longest}, but "
            f"this model cannot decode past its context (only local, sink_window and linear with "
            f"model.position rope, alibi or none can): drop context= or raise it to {longest}"
        )


@torch.no_grad()
def _warm_up(model: GPT, prompt: torch.Tensor) -> None:
    """Prefill, one cached step and one full forward, untimed: one-time costs (lazy imports, thread pools) are
    paid here rather than in the peak RSS or time of whichever row would come first."""
    cache = model.new_cache(prompt.size(0), prompt.size(1) + 1)
    model(model(prompt, cache=cache, last_only=True).argmax(-1), cache=cache, last_only=True)
    model(prompt, last_only=True)


def _check(lengths: Sequence[int], prompt_len: int, window: int, batch: int, repeats: int, recompute_max: int) -> None:
    """Reject settings that cannot give a median over ``window`` decoding steps after the prompt."""
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"lengths {list(lengths)} must be positive integers, e.g. --lengths 1024,2048")
    for flag, value in (("--prompt-len", prompt_len), ("--window", window), ("--batch", batch), ("--repeats", repeats)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if recompute_max < 0:
        raise ConfigError(f"--recompute-max {recompute_max} must be >= 0 (0 skips the recompute baseline)")
    if min(lengths) < prompt_len + window:
        raise ConfigError(
            f"the shortest length {min(lengths)} must be >= --prompt-len + --window = "
            f"{prompt_len + window} (the timed steps follow the prompt): lower them or raise --lengths"
        )


# ------------------------------------------------------------------ memory

# ------------------------------------------------------------------ measuring


@torch.no_grad()
def cached_pass(model: GPT, prompt: torch.Tensor, length: int, window: int) -> dict:
    """Generate up to ``length`` positions with a cache sized for them; time, cache bytes and RSS at ``length``."""
    peak_ok = reset_peak_rss()
    cache = model.new_cache(prompt.size(0), length)
    logits = model(prompt, cache=cache, last_only=True)
    times = []
    while cache.length < length:
        t0 = time.perf_counter()
        logits = model(logits.argmax(-1), cache=cache, last_only=True)
        times.append((time.perf_counter() - t0) * 1e3)
    last = times[-window:]
    return {
        "ms_per_token": statistics.median(last),
        "ms_per_token_p10": statistics.quantiles(last, n=10)[0],
        "cache_mb": cache.nbytes() / 2**20,
        **rss_mb(peak_ok),
    }


@torch.no_grad()
def recompute_pass(model: GPT, idx: torch.Tensor, repeats: int) -> dict:
    """The uncached baseline: median of ``repeats`` full forwards over the last ``context`` tokens (+ argmax)."""
    peak_ok = reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(idx[:, -model.context :], last_only=True).argmax(-1)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_per_token": statistics.median(times), **rss_mb(peak_ok)}


def _row(spec: str, model: GPT, length: int, mode: str, batch: int, m: dict, speedup: float | None = None) -> dict:
    ms = m["ms_per_token"]
    params = params_label(model.blocks[0].attn.core.pattern)
    if model.cfg.n_kv_head not in (None, model.cfg.n_head):  # grouped-query rows must not read as the MHA rows
        params = ";".join(p for p in (params, f"n_kv_head={model.cfg.n_kv_head}") if p)
    return {
        "spec": spec,
        "pattern": model.blocks[0].attn.core.pattern.name,
        "params": params,
        "context": model.context,
        "length": length,
        "mode": mode,
        "ms_per_token": round(ms, 4),
        "ms_per_token_p10": None if "ms_per_token_p10" not in m else round(m["ms_per_token_p10"], 4),
        "tokens_per_s": round(batch * 1e3 / ms, 2),
        "cache_mb": m.get("cache_mb"),
        "peak_rss_mb": round(m["peak_rss_mb"], 3),
        "rss_mb": round(m["rss_mb"], 3),
        "speedup": None if speedup is None else round(speedup, 3),
    }


# ------------------------------------------------------------------ reporting


def targets(rows: list[dict], bounded: dict[str, bool]) -> dict:
    """The checks the benchmark exists for: speed-up at the shortest length (>= SPEEDUP_TARGET), and for bounded
    caches (``bounded[spec]``) time (its 10th percentile; the median ratio is reported too), cache and peak RSS
    at the longest length vs the shortest (within FLAT_TOLERANCE)."""
    cache = {(r["spec"], r["length"]): r for r in rows if r["mode"] == "cache"}
    lengths = sorted({L for _, L in cache})
    lo, hi = lengths[0], lengths[-1]
    speedups, flat = [], []
    for spec in bounded:
        s = cache[(spec, lo)]["speedup"]
        if s is not None:  # no recompute baseline (--recompute-max): no speed-up to report
            speedups.append({"spec": spec, "length": lo, "speedup": s, "met": s >= SPEEDUP_TARGET})
        if bounded[spec] and hi > lo:
            a, b = cache[(spec, lo)], cache[(spec, hi)]
            ratios = {
                f"{key}_ratio": round(b[key] / a[key], 4) if a[key] else math.nan
                for key in ("ms_per_token", "ms_per_token_p10", "cache_mb", "peak_rss_mb")
            }
            judged = [v for k, v in ratios.items() if k != "ms_per_token_ratio"]
            flat.append(
                {"spec": spec, "from": lo, "to": hi, **ratios, "met": all(abs(r - 1) <= FLAT_TOLERANCE for r in judged)}
            )
    return {"speedup_min": SPEEDUP_TARGET, "speedup": speedups, "flat_tolerance": FLAT_TOLERANCE, "flat": flat}


def format_summary(rows: list[dict], tg: dict) -> str:
    """Text table: one line per spec and length (cached vs recompute), then the targets."""
    rec = {(r["spec"], r["length"]): r["ms_per_token"] for r in rows if r["mode"] == "recompute"}
    width = max(len(r["spec"]) for r in rows)
    lines = [
        f"{'pattern':<{width}} {'length':>7} {'cached ms/tok':>14} {'recompute':>10} {'speed-up':>9} "
        f"{'cache MB':>10} {'peak RSS MB':>12}"
    ]
    for r in (r for r in rows if r["mode"] == "cache"):
        recompute = rec.get((r["spec"], r["length"]))
        recompute_s = "-" if recompute is None else f"{recompute:.2f}"
        speedup_s = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(
            f"{r['spec']:<{width}} {r['length']:>7} {r['ms_per_token']:>14.3f} {recompute_s:>10} "
            f"{speedup_s:>9} {r['cache_mb']:>10.3f} {r['peak_rss_mb']:>12.1f}"
        )
    for t in tg["speedup"]:
        got = "-" if t["speedup"] is None else f"{t['speedup']:.1f}x"
        lines.append(
            f"target speed-up >= {tg['speedup_min']:g}x at {t['length']}: {t['spec']} {got} "
            f"{'met' if t['met'] else 'NOT met'}"
        )
    for t in tg["flat"]:
        lines.append(
            f"target flat {t['from']}->{t['to']} (within {tg['flat_tolerance']:.0%}): {t['spec']} time p10 x"
            f"{t['ms_per_token_p10_ratio']:.3f} (median x{t['ms_per_token_ratio']:.3f}), "
            f"cache x{t['cache_mb_ratio']:.3f}, peak RSS "
            f"x{t['peak_rss_mb_ratio']:.3f} {'met' if t['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def plot_generate(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Log-x panels vs length, one colour per spec: ms/token (solid cached, dashed recompute), cache MB (log-y)
    and peak RSS (solid cached, dashed recompute)."""
    from matplotlib.figure import Figure

    specs = list(dict.fromkeys(r["spec"] for r in rows))
    panels = (
        ("ms_per_token", "ms per token", True),
        ("cache_mb", "KV cache (MB)", True),
        ("peak_rss_mb", "peak RSS of the pass (MB)", False),
    )
    legend_h = 0.18 * math.ceil(len(specs) / 3) + 0.35
    fig = Figure(figsize=(15, 4.2 + legend_h))
    axes = fig.subplots(1, len(panels))
    handles = {}
    for ax, (key, ylabel, log_y) in zip(axes, panels):
        for i, spec in enumerate(specs):
            for mode, ls in (("cache", "-"), ("recompute", "--")):
                pts = sorted(
                    (r["length"], r[key])
                    for r in rows
                    if r["spec"] == spec and r["mode"] == mode and r[key] is not None and math.isfinite(r[key])
                )
                if pts:
                    (line,) = ax.plot(*zip(*pts), color=f"C{i % 10}", ls=ls, marker="o", ms=3, lw=1.3)
                    if mode == "cache":
                        handles.setdefault(spec, line)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("generated length L (positions)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("solid: KV cache, dashed: recompute", fontsize=9)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, legend_h / (4.2 + legend_h), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _write_side_files(out: Path, plot: Path, rows: list[dict], skipped: list[dict], tg: dict, settings: dict) -> None:
    info = machine_info(torch.device("cpu"))
    (out.parent / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    summary = {
        "settings": settings,
        "memory_method": MEMORY_METHOD,
        "peak_rss_available": cpu_peak_supported(),
        "timing": f"cache: median (and 10th percentile) of the last {settings['window']} decoding steps before "
        f"each length (argmax + one cached forward); recompute: median of {settings['repeats']} forwards over "
        "the last context tokens (+ argmax)",
        "targets": tg,
        "skipped": skipped,
        "rows": rows,
        "machine": info,
        "argv": sys.argv,
    }
    (out.parent / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    s = settings
    plot_generate(
        rows,
        plot,
        f"generation on {info['device_name']}, {info['torch_threads']} threads: {s['n_layer']} "
        f"layers, d_model {s['d_model']}, {s['n_head']} heads, vocab {s['vocab_size']}, "
        f"batch {s['batch']}, prompt {s['prompt_len']}",
    )


# ------------------------------------------------------------------ entry points


def bench_generate(
    cfg: Config,
    patterns: Sequence[str],
    lengths: Sequence[int],
    *,
    prompt_len: int = 64,
    window: int = 64,
    batch: int = 1,
    repeats: int = 3,
    recompute_max: int = 16384,
    seed: int = 0,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Measure cached and recomputed generation for every pattern spec and length; returns the rows as dicts.

    ``cfg`` sets the model size (its attention section is replaced by each spec). Rows carry the
    ``COLUMNS`` plus ``spec``. With ``out`` (a .csv) the CSV, ``machine.json``, ``results.json`` and the plot
    (``plot`` or ``<out>.png``) are written.
    """
    lengths = sorted(set(lengths))
    _check(lengths, prompt_len, window, batch, repeats, recompute_max)
    if out is not None and Path(out).suffix.lower() != ".csv":
        raise ConfigError(
            f"--out {str(out)!r} must be a .csv file (machine.json, results.json and the plot go beside it)"
        )
    configs = {spec: row_config(cfg, spec, lengths[-1]) for spec in dict.fromkeys(s.strip() for s in patterns)}
    vocab = _vocab(cfg)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen)
    sequence = torch.randint(0, vocab, (batch, lengths[-1]), generator=gen)  # the recompute inputs: its prefixes
    bounded = {}
    for spec, c in configs.items():  # fail on a bad spec before measuring anything
        if prompt_len > c.model.context:
            raise ConfigError(f"--prompt-len {prompt_len} exceeds the context {c.model.context} of {spec!r}")
        model = build_model(c, seed)
        _check_stream(model, spec, batch, lengths[-1])
        bounded[spec] = model.new_cache(batch, lengths[-1]).streams
        _warm_up(model, prompt)
        del model

    writer = None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        f_csv = open(out, "w", newline="")
        writer = csv.DictWriter(f_csv, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
    rows, skipped = [], []
    log(
        f"generate benchmark on cpu ({torch.get_num_threads()} threads): batch {batch}, prompt {prompt_len}, "
        f"cached = median of the last {window} steps, recompute = median of {repeats} forwards"
    )
    try:
        for spec, c in configs.items():
            model = build_model(c, seed)
            for L in lengths:
                m = cached_pass(model, prompt, L, window)
                if L > recompute_max:
                    skipped.append(
                        {
                            "spec": spec,
                            "length": L,
                            "mode": "recompute",
                            "reason": f"length above --recompute-max {recompute_max}",
                        }
                    )
                    log(f"  skip recompute {spec} L={L}: above --recompute-max {recompute_max}")
                    rec, new = None, [_row(spec, model, L, "cache", batch, m)]
                else:
                    rec = recompute_pass(model, sequence[:, :L], repeats)
                    new = [
                        _row(spec, model, L, "cache", batch, m, rec["ms_per_token"] / m["ms_per_token"]),
                        _row(spec, model, L, "recompute", batch, rec),
                    ]
                rows += new
                if writer is not None:
                    writer.writerows(new)
                    f_csv.flush()
                log(
                    f"  {spec:<40} L={L:<6} cached {m['ms_per_token']:8.3f} ms/tok  "
                    f"recompute {'-' if rec is None else format(rec['ms_per_token'], '.2f'):>8} ms/tok  "
                    f"cache {m['cache_mb']:9.3f} MB  peak RSS {m['peak_rss_mb']:8.1f} MB"
                )
            del model
    finally:
        if writer is not None:
            f_csv.close()
    tg = targets(rows, bounded)
    log(format_summary(rows, tg))
    if out is not None:
        m = cfg.model
        settings = dict(
            patterns=list(configs),
            lengths=lengths,
            prompt_len=prompt_len,
            window=window,
            batch=batch,
            repeats=repeats,
            recompute_max=recompute_max,
            seed=seed,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_kv_head=m.n_kv_head or m.n_head,
            d_model=m.d_model,
            position=m.position,
            vocab_size=vocab,
            threads=torch.get_num_threads(),
        )
        _write_side_files(out, Path(plot) if plot else out.with_suffix(".png"), rows, skipped, tg, settings)
    elif plot:
        plot_generate(rows, plot)
    return rows


def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``generate`` to the ``attnlab bench`` subcommands."""
    p = bench_subparsers.add_parser(
        "generate", help="generation per token: KV cache vs recompute, time and memory per pattern and length"
    )
    p.add_argument("overrides", nargs="*", help="config overrides before --patterns, e.g. model.n_layer=2")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"model size preset (default {DEFAULT_CONFIG})")
    p.add_argument(
        "--patterns",
        nargs="+",
        default=list(DEFAULT_PATTERNS),
        metavar="SPEC",
        help="name or name:key=value:..., plus context=N for a streaming model and n_kv_head=N for "
        "grouped-query attention, e.g. dense dense:n_kv_head=2 local:window=256 "
        "sink_window:sinks=4:window=256:context=1024 (default: " + " ".join(DEFAULT_PATTERNS) + ")",
    )
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"comma-separated lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--prompt-len", type=int, default=64, help="random prompt filled in one pass (default 64)")
    p.add_argument("--window", type=int, default=64, help="decoding steps before each length whose median is reported")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="recompute forwards per length; the median is reported")
    p.add_argument("--recompute-max", type=int, default=16384, help="skip the recompute baseline above this length")
    p.add_argument("--seed", type=int, default=0, help="weights and tokens")
    p.add_argument("--out", required=True, help="results CSV; machine.json, results.json and the plot go beside it")
    p.add_argument("--plot", help="plot (default: the CSV path with .png)")
    return p


def run(args: argparse.Namespace) -> None:
    """``attnlab bench generate``: load the config and run ``bench_generate``."""
    from .. import config

    bench_generate(
        config.load(args.config, args.overrides),
        args.patterns,
        parse_int_list(args.lengths, "--lengths"),
        prompt_len=args.prompt_len,
        window=args.window,
        batch=args.batch,
        repeats=args.repeats,
        recompute_max=args.recompute_max,
        seed=args.seed,
        out=args.out,
        plot=args.plot,
    )
