"""``attnlab bench attention``: time and peak memory of attention alone, per pattern, backend and length.

For every (pattern, backend, seq_len, pass) the attention call runs on random
``q, k, v`` of shape [batch, heads, T, head_dim]: ``warmup`` untimed runs
(they also build and cache the block-sparse plan), then the median of
``repeats`` timed runs, then one more run that measures peak memory.

Passes: ``fwd`` is inference (forward under ``torch.no_grad``); ``fwdbwd`` is
forward with autograd plus ``backward`` of a fixed random output gradient
(the q/k/v gradients are freed before each run).

The baseline ``sdpa_causal`` is the raw ``F.scaled_dot_product_attention(q, k,
v, is_causal=True)``, measured once per length (pattern ``dense``); the speed-up
table divides its time by each row's time (> 1 means faster than dense SDPA).

Peak memory (``peak_mb``) is what the pass adds on top of what was resident
just before it (the inputs, the process, ...):

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus ``memory_allocated`` just before (tensor memory only).
- CPU (Linux): freed heap memory is first returned to the OS
  (``malloc_trim(0)``, so the pass cannot silently reuse pages left resident by
  earlier passes), then the process's peak RSS is reset by writing ``5`` to
  ``/proc/self/clear_refs``; after the pass, ``VmHWM`` (peak RSS since the
  reset) minus the ``VmRSS`` read just before is reported. It counts every page
  the pass touched, allocator and thread overhead included, at 4 KiB
  granularity. Where ``clear_refs`` is not writable (not Linux, some
  containers) ``peak_mb`` is NaN.

Every row is timed alternately with the baseline (baseline, row, baseline, row, ...):
speed-ups compare medians taken in the same stretch of time, so a shared machine's
slow phases do not bias them. The CSV keeps each row's own median.

``attnlab bench attention`` on CPU runs with attnlab's training allocator
setting (``runtime.tune_allocator``: freed blocks stay in the heap instead of
being page-faulted in again), for the baseline and every backend alike; from
Python, call ``tune_allocator()`` first to measure the same way.

``busy`` (``--busy N``) runs N competing processes, each spinning one core, for the
whole benchmark: the same rows on a loaded machine. N is recorded in every row.

Rows a backend cannot run (e.g. ``sdpa`` for a local pattern, ``flex``
backward on CPU, ``reference`` above T=4096 where its T x T scores dominate)
are skipped with a note, never failing the whole run. Results go to the CSV
(written row by row, so an interrupted run keeps what it measured),
``machine.json`` beside it, ``FILE.json`` (settings, memory method, skipped
rows, speed-ups) and a log-log plot.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.backends import BACKENDS, select_backend
from ..attention.patterns import Dense, Pattern, build_pattern
from ..config import Config, apply_pattern_spec
from ..errors import ConfigError, UserError
from .busy import spinners
from .measure import cpu_peak_supported, machine_info, params_label, peak_mb

COLUMNS = ("device", "pattern", "params", "backend", "seq_len", "pass", "median_ms", "peak_mb", "density", "busy")
PASSES = ("fwd", "fwdbwd")
BASELINE = "sdpa_causal"
# The reference backend builds [B, H, T, T] fp32 scores (several copies in backward): skip it above this.
REFERENCE_MAX_T = 4096
# Counting T^2 pairs for the density takes a noticeable time from about here.
_SLOW_DENSITY_T = 16384
_DENSITY_ROWS = 1024  # query rows per chunk when counting a density on a GPU
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the pass",
    "cpu": "malloc_trim(0); VmRSS before; write 5 to /proc/self/clear_refs (reset peak RSS); pass; VmHWM - VmRSS",
}


# ------------------------------------------------------------------ parsing


def parse_pattern_spec(spec: str, n_head: int) -> Pattern:
    """``name`` or ``name:key=value:key=value`` (attention keys, e.g. ``local:window=256``) -> Pattern."""
    cfg = apply_pattern_spec(Config(), spec)
    try:
        return build_pattern(cfg.attention, 0, 1, n_head)
    except ConfigError as e:
        raise ConfigError(f"pattern spec {spec!r}: {e}") from None


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"1024,2048"`` -> [1024, 2048]; every value must be a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r} is not a list of positive integers: write e.g. {flag} 1024,2048,4096")
    return values


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# ------------------------------------------------------------------ backends


def sdpa_causal(q, k, v, pattern=None, dropout_p=0.0, training=False):
    """The baseline: PyTorch's fused attention with its built-in causal mask, nothing of attnlab around it."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def resolve(backend: str, pattern: Pattern, T: int, pass_: str, device: torch.device) -> tuple[str, Callable]:
    """The row label and function for ``backend``; ConfigError (the skip note) if it cannot run this row."""
    if backend == BASELINE:
        return BASELINE, sdpa_causal
    if backend == "flex" and "flex" not in BACKENDS:
        raise ConfigError("backend 'flex' is not registered in this build")
    name, fn = select_backend(backend, pattern, device)
    if name == "flex" and device.type == "cpu" and pass_ != "fwd":
        raise ConfigError("flex runs forward only on CPU")
    if name == "reference" and T > REFERENCE_MAX_T:
        raise ConfigError(f"reference builds T x T scores: skipped above T={REFERENCE_MAX_T}")
    return (f"auto({name})" if backend == "auto" else name), fn


# ------------------------------------------------------------------ measuring


def _pass(fn, q, k, v, pattern, pass_, grad) -> Callable[[], None]:
    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                fn(q, k, v, pattern, 0.0, False)
    else:

        def run():
            q.grad = k.grad = v.grad = None
            fn(q, k, v, pattern, 0.0, True).backward(grad)

    return run


def measure(
    run: Callable[[], None], device: torch.device, repeats: int, warmup: int, baseline: Callable[[], None] | None = None
) -> tuple[float, float, float | None]:
    """(median ms over ``repeats`` timed runs after ``warmup``, peak MB of one more run, baseline median ms).

    With ``baseline`` the two are timed alternately (A B A B ...), so a slow phase of a shared
    machine hits both alike and their ratio stays honest.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        run()
    sync()
    times, base_times = [], []
    for _ in range(repeats):
        if baseline is not None:
            base_times.append(timed(baseline))
        times.append(timed(run))
    base_ms = statistics.median(base_times) if base_times else None
    return statistics.median(times), peak_mb(run, device), base_ms


def pattern_density(pattern: Pattern, T: int, heads: int, device: torch.device) -> float:
    """``pattern.density`` (allowed pairs / causal pairs), counted on the benchmark's device: a GPU counts the
    32k x 32k pairs of every head in a moment, where the CPU takes minutes."""
    if device.type == "cpu" or pattern.is_dense_causal:
        return pattern.density(T, heads)
    return count_density(pattern, T, heads, device)


def count_density(pattern: Pattern, T: int, heads: int, device: torch.device | str) -> float:
    """Allowed pairs / causal pairs of ``pattern``, counted in chunks of query rows on ``device``."""
    k, h = torch.arange(T, device=device).view(1, 1, T), torch.arange(heads, device=device).view(heads, 1, 1)
    allowed = 0
    for start in range(0, T, _DENSITY_ROWS):
        q = torch.arange(start, min(T, start + _DENSITY_ROWS), device=device).view(1, -1, 1)
        allowed += int(pattern.allowed(q, k, h).expand(heads, q.shape[1], T).sum())
    return allowed / (heads * T * (T + 1) / 2)


def _check(
    seq_lens, passes, repeats, warmup, batch, heads, head_dim, dtype, device, busy=0
) -> tuple[torch.dtype, torch.device]:
    if not seq_lens or min(seq_lens) < 1:
        raise ConfigError(f"seq_lens {seq_lens} must be positive integers, e.g. --seq-lens 1024,2048")
    bad = [p for p in passes if p not in PASSES]
    if bad or not passes:
        raise ConfigError(f"unknown pass {bad[0] if bad else ''!r}: use --passes fwd, fwdbwd or fwd,fwdbwd")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"--repeats {repeats} must be >= 1 (5 or more for real numbers) and --warmup {warmup} >= 0")
    for flag, value in (("--batch", batch), ("--heads", heads), ("--head-dim", head_dim)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if busy < 0:
        raise ConfigError(f"--busy {busy} must be >= 0 (the number of competing CPU-spinning processes)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype!r} is not supported: use float32 or bfloat16")
        dtype = DTYPES[dtype]
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device.type!r} is not supported: use cpu or cuda")
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("--dtype float16 is not supported on CPU: use float32 or bfloat16")
    return dtype, device


def _measure_length(T: int, jobs, shapes: dict, timing: dict, emit, skipped: list, noted: set, log) -> None:
    """Time every (pattern, backend, pass) of ``jobs`` at length ``T``; each measured row goes to ``emit``."""
    device, dtype, passes = shapes["device"], shapes["dtype"], timing["passes"]
    gen = torch.Generator().manual_seed(T)
    size = (shapes["batch"], shapes["heads"], T, shapes["head_dim"])
    q, k, v = (torch.randn(size, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3))
    grad = torch.randn(size, generator=gen).to(device, dtype)
    density: dict[int, float] = {}
    for spec, pattern, backend in jobs:
        for pass_ in passes:
            try:
                label, fn = resolve(backend, pattern, T, pass_, device)
                base_run = None if backend == BASELINE else _pass(sdpa_causal, q, k, v, Dense(), pass_, grad)
                run = _pass(fn, q, k, v, pattern, pass_, grad)
                ms, mb, base_ms = measure(run, device, timing["repeats"], timing["warmup"], base_run)
            except (UserError, RuntimeError) as e:  # RuntimeError: e.g. out of memory, dtype not implemented
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                skipped.append({"pattern": spec, "backend": backend, "seq_len": T, "pass": pass_, "reason": reason})
                if (spec, backend, reason) not in noted:
                    noted.add((spec, backend, reason))
                    log(f"  skip {spec} / {backend} (T={T} {pass_}): {reason}")
                continue
            finally:
                q.grad = k.grad = v.grad = None
            if id(pattern) not in density:
                if T >= _SLOW_DENSITY_T and not pattern.is_dense_causal and device.type == "cpu":
                    log(f"  density of {spec} at T={T}: counting T^2 pairs, this may take a while")
                density[id(pattern)] = pattern_density(pattern, T, shapes["heads"], device)
            row = {
                "device": device.type,
                "pattern": pattern.name,
                "params": params_label(pattern),
                "backend": label,
                "seq_len": T,
                "pass": pass_,
                "median_ms": round(ms, 4),
                "peak_mb": round(mb, 3),
                "density": round(density[id(pattern)], 6),
                "busy": timing["busy"],
            }
            emit(row if base_ms is None else {**row, "baseline_ms": round(base_ms, 4)})
            log(
                f"  {spec:<28} {label:<20} T={T:<6} {pass_:<6} {ms:10.3f} ms {mb:10.2f} MB  density {row['density']:.4g}"
            )


def bench_attention(
    patterns: list[str | Pattern],
    seq_lens: list[int],
    backends: list[str],
    passes=PASSES,
    repeats: int = 5,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    dtype="float32",
    device="cpu",
    out: str | Path | None = None,
    *,
    warmup: int = 2,
    plot: str | Path | bool | None = None,
    log: Callable[[str], None] = print,
    busy: int = 0,
) -> list[dict]:
    """Measure every (pattern, backend, seq_len, pass) that can run; returns the CSV rows as dicts.

    ``patterns`` are spec strings (``local:window=256``) or Pattern objects;
    ``backends`` are registered names, ``auto``, ``flex`` or ``sdpa_causal``
    (the baseline, always measured once per length). With ``out`` the CSV,
    ``machine.json``, ``<out>.json`` and the plot (``plot`` or ``<out>.png``; ``plot=False``: none) are written.
    ``busy`` processes spin on the CPU for the whole run (a loaded machine, to compare with a quiet one).
    """
    dtype, device = _check(seq_lens, passes, repeats, warmup, batch, heads, head_dim, dtype, device, busy)
    known = {"auto", "flex", BASELINE, *BACKENDS}
    for b in backends:
        if b not in known:
            raise ConfigError(f"unknown backend {b!r}: use auto, {BASELINE} or one of {', '.join(BACKENDS)}")
    specs = [
        (p if isinstance(p, str) else p.name, p if isinstance(p, Pattern) else parse_pattern_spec(p, heads))
        for p in patterns
    ]
    pattern_backends = [b for b in dict.fromkeys(backends) if b != BASELINE]  # the baseline runs once per length

    writer = None
    if out is not None:
        out = Path(out)
        if out.suffix.lower() != ".csv":
            raise ConfigError(
                f"--out {str(out)!r} must be a .csv file (machine.json, FILE.json and FILE.png go beside it)"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        f_csv = open(out, "w", newline="")
        writer = csv.DictWriter(f_csv, fieldnames=COLUMNS)
        writer.writeheader()
    rows, skipped, noted = [], [], set()
    log(
        f"attention benchmark on {device}: batch {batch}, heads {heads}, head_dim {head_dim}, {str(dtype)[6:]}, "
        f"warmup {warmup}, median of {repeats}" + (f", {busy} competing CPU-spinning processes" if busy else "")
    )
    shapes = dict(batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device)
    timing = dict(passes=passes, repeats=repeats, warmup=warmup, busy=busy)

    def emit(row: dict) -> None:
        rows.append(row)
        if writer is not None:
            writer.writerow({c: row[c] for c in COLUMNS})
            f_csv.flush()

    try:
        with spinners(busy):  # started before the first timed row, stopped however the run ends
            for T in seq_lens:
                jobs = [(BASELINE, Dense(), BASELINE)] + [(s, p, b) for s, p in specs for b in pattern_backends]
                _measure_length(T, jobs, shapes, timing, emit, skipped, noted, log)
    finally:
        if writer is not None:
            f_csv.close()
    ups = speedups(rows)
    log(format_speedups(ups, seq_lens))
    if out is not None:
        plot_path = None if plot is False else Path(plot) if plot else out.with_suffix(".png")
        _write_side_files(
            out,
            plot_path,
            rows,
            skipped,
            ups,
            device,
            dict(
                patterns=[s for s, _ in specs],
                seq_lens=list(seq_lens),
                backends=list(backends),
                passes=list(passes),
                repeats=repeats,
                warmup=warmup,
                batch=batch,
                heads=heads,
                head_dim=head_dim,
                dtype=str(dtype)[6:],
                device=device.type,
                busy=busy,
            ),
        )
    elif plot:
        plot_attention(rows, plot)
    return rows


# ------------------------------------------------------------------ reporting


def _curve(row: dict) -> tuple[str, str, str]:
    return row["pattern"], row["params"], row["backend"]


def speedups(rows: list[dict]) -> list[dict]:
    """Per row (baseline excluded): sdpa_causal time / row time at the same length and pass (> 1 = faster),
    using the baseline timed alternately with the row where there is one."""
    base = {(r["seq_len"], r["pass"]): r["median_ms"] for r in rows if r["backend"] == BASELINE}
    out = []
    for r in rows:
        b = r.get("baseline_ms") or base.get((r["seq_len"], r["pass"]))  # prefer the interleaved baseline
        if r["backend"] != BASELINE and b and r["median_ms"] > 0:
            out.append(
                {
                    "pattern": r["pattern"],
                    "params": r["params"],
                    "backend": r["backend"],
                    "pass": r["pass"],
                    "seq_len": r["seq_len"],
                    "speedup_vs_sdpa_causal": round(b / r["median_ms"], 4),
                }
            )
    return out


def format_speedups(ups: list[dict], seq_lens: list[int]) -> str:
    """A text table: one line per pattern/backend/pass, one column per length."""
    if not ups:
        return f"no rows to compare with {BASELINE}"
    table: dict[tuple, dict[int, float]] = {}
    for u in ups:
        table.setdefault((u["pattern"], u["params"], u["backend"], u["pass"]), {})[u["seq_len"]] = u[
            "speedup_vs_sdpa_causal"
        ]
    names = {key: f"{key[0]}({key[1]}) {key[2]} {key[3]}" if key[1] else f"{key[0]} {key[2]} {key[3]}" for key in table}
    width = max(len(n) for n in names.values())
    lines = [
        f"speed-up vs {BASELINE} (its time / this time; > 1 is faster)",
        f"{'':<{width}}" + "".join(f"{'T=' + str(T):>10}" for T in seq_lens),
    ]
    for key, by_t in table.items():
        lines.append(
            f"{names[key]:<{width}}" + "".join(f"{by_t[T]:>9.2f}x" if T in by_t else f"{'-':>10}" for T in seq_lens)
        )
    return "\n".join(lines)


def plot_attention(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Log-log time vs seq_len: one panel per pass, one line per pattern/backend (colour = pattern, marker and
    line style = backend, the sdpa_causal baseline dashed black); one legend below the panels."""
    from matplotlib.figure import Figure

    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)] or ["fwd"]
    keys = list(dict.fromkeys(_curve(r) for r in rows))
    patterns = list(dict.fromkeys((k[0], k[1]) for k in keys if k[2] != BASELINE))
    backends = list(dict.fromkeys(k[2] for k in keys if k[2] != BASELINE))
    colors = [f"C{i}" for i in range(10)]
    styles = [("-", "o"), (":", "s"), ("-.", "^"), ((0, (5, 1)), "D"), ((0, (1, 1, 3, 1)), "v"), ("-", "x")]
    n_legend = len(keys)
    legend_h = 0.15 * math.ceil(n_legend / 2) + 0.3
    fig = Figure(figsize=(5.2 * len(passes), 4.0 + legend_h))
    axes = fig.subplots(1, len(passes), squeeze=False)[0]
    handles = {}
    for ax, pass_ in zip(axes, passes):
        for key in keys:
            pts = sorted(
                (int(r["seq_len"]), float(r["median_ms"]))
                for r in rows
                if r["pass"] == pass_ and _curve(r) == key and math.isfinite(float(r["median_ms"]))
            )
            if not pts:
                continue
            xs, ys = zip(*pts)
            pattern, params, backend = key
            if backend == BASELINE:
                (line,) = ax.plot(xs, ys, color="k", ls="--", marker="o", ms=3, lw=1.8, zorder=3)
                label = f"dense {BASELINE} (baseline)"
            else:
                ls, marker = styles[backends.index(backend) % len(styles)]
                (line,) = ax.plot(
                    xs,
                    ys,
                    color=colors[patterns.index((pattern, params)) % len(colors)],
                    ls=ls,
                    marker=marker,
                    ms=3.5,
                    lw=1.2,
                )
                label = f"{pattern}({params.replace(';', ', ')}) {backend}" if params else f"{pattern} {backend}"
            handles.setdefault(label, line)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(pass_, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=6.5, frameon=False)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, legend_h / (4.0 + legend_h), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _write_side_files(out: Path, plot: Path | None, rows, skipped, ups, device, settings) -> None:
    info = {**machine_info(device), "busy": settings["busy"]}
    (out.parent / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    summary = {
        "settings": settings,
        "memory_method": MEMORY_METHOD[device.type],
        "peak_mb_available": device.type == "cuda" or cpu_peak_supported(),
        "timing": f"median of {settings['repeats']} runs after {settings['warmup']} warm-up runs; "
        "fwd under torch.no_grad, fwdbwd = forward + backward(random grad)",
        "skipped": skipped,
        "speedups": ups,
        "machine": info,
        "argv": sys.argv,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    s = settings
    if plot is not None:
        plot_attention(
            rows,
            plot,
            f"attention, batch {s['batch']} x heads {s['heads']} x head_dim {s['head_dim']}, "
            f"{s['dtype']}, on {info['device_name']}" + (f", {s['busy']} busy processes" if s["busy"] else ""),
        )
