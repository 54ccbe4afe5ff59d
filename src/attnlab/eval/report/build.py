"""``attnlab report``: compare finished runs on one offline page.

``build_report(run_dirs, out)`` writes ``out/index.html`` (self-contained:
every picture is a base64 PNG data URI, CSS inline, no scripts, no external
URLs) and ``out/report.md`` with the same content, referring to PNG files
written beside it. It holds validation curves against steps, training tokens
and training seconds, training loss, a table of final full-split metrics,
seed statistics with Welch's t-tests (``report.stats``), one attention
pattern picture per distinct attention config, and each run's last sample.

A run without ``summary.json`` (still running, or stopped) is included with
its curves and marked unfinished; it has no final metric and no part in the
seed statistics.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from pathlib import Path

from ... import __version__
from ...errors import UserError
from .figures import curve_png, pattern_pictures
from .render import Block, Figure, Heading, Para, Pre, Table, render_html, render_markdown
from .run_data import UNITS, RunData, load_runs
from .stats import SEED_KEYS, Group, comparisons, group_runs, seed_notes, stats, verdict

SAMPLE_CHARS = 1200  # text samples are cut here
OWN_FILES = ("index.html", "report.md")
OWN_PNG = re.compile(r"^(curve-|train-loss|pattern-|sample-).*\.png$")  # what --force may replace
NONE = "—"


# ------------------------------------------------------------------ formatting (tests use these too)


def fmt_metric(v: float | None) -> str:
    return NONE if v is None else f"{v:.4f}"


def fmt_int(v) -> str:
    return NONE if v is None else f"{int(v):,}"


def fmt_float(v, digits: int = 1) -> str:
    return NONE if not isinstance(v, (int, float)) else f"{v:,.{digits}f}"


def fmt_p(p: float) -> str:
    return f"{p:.3g}"


# ------------------------------------------------------------------ output folder


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder for the report")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(
                f"--out {out} already exists and is not empty: choose another folder or pass --force to replace its report"
            )
        for f in out.iterdir():  # only the files a report writes; anything else stays
            if f.is_file() and (f.name in OWN_FILES or OWN_PNG.match(f.name)):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------ sections


def _machine(meta: dict) -> str:
    if not meta:
        return NONE
    dev = meta.get("device", "?")
    return f"{dev} ({meta['gpu']})" if meta.get("gpu") else f"{dev} ({meta.get('cpu', '?')})"


def header_section(runs: list[RunData], groups: list[Group], n_figures: int) -> list[Block]:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    intro = (
        f"Generated {date} by attnlab {__version__}: {len(runs)} run(s) in {len(groups)} config(s). "
        f"This report has {n_figures} figure(s)."
    )
    rows = []
    for r in runs:
        v = r.meta.get("versions", {})
        rows.append(
            [
                r.name,
                str(r.dir),
                "finished" if r.finished else "unfinished",
                _machine(r.meta),
                v.get("torch", NONE),
                v.get("attnlab", NONE),
                (r.meta.get("git_sha") or NONE)[:10] + ("+dirty" if r.meta.get("git_dirty") else ""),
                r.meta.get("started", NONE),
            ]
        )
    return [
        Para(intro),
        Heading(2, "Runs"),
        Table(["run", "directory", "state", "device", "torch", "attnlab", "git sha", "started"], rows),
    ]


def _nats_per_token(s: dict) -> float | None:
    if "val_nats_per_token" in s:
        return s["val_nats_per_token"]
    if "val_bits_per_dim" in s:  # an image token is one byte (dimension)
        return s["val_bits_per_dim"] * math.log(2)
    return None


def _test_value(r: RunData) -> float | None:
    return (r.summary or {}).get(r.metric.replace("val_", "test_", 1))


def metrics_section(runs: list[RunData], label: dict[str, str]) -> list[Block]:
    has_test = any(_test_value(r) is not None for r in runs)
    headers = (
        ["run", "config", "metric", "final (full split)"]
        + (["test"] if has_test else [])
        + ["nats/token", "params", "tokens/s", "peak memory MB", "steps", "training seconds", "stop reason"]
    )
    rows = []
    for r in runs:
        s = r.summary or {}
        final = fmt_metric(r.final_value) if r.finished else "unfinished"
        last_step = max([p.step for p in r.val] + [st for st, _ in r.train], default=None)
        rows.append(
            [r.name, label[r.name], UNITS[r.metric], final]
            + ([fmt_metric(_test_value(r))] if has_test else [])
            + [
                fmt_metric(_nats_per_token(s)),
                fmt_int(s.get("params")),
                fmt_float(s.get("tokens_per_second"), 0),
                fmt_float(s.get("peak_memory_mb")),
                fmt_int(s.get("steps", last_step)),
                fmt_float(s.get("train_seconds")),  # every sitting of a resumed run
                s.get("stop_reason", NONE) if r.finished else "unfinished (no summary.json)",
            ]
        )
    blocks = [Heading(2, "Final metrics"), Table(headers, rows)]
    unfinished = [r.name for r in runs if not r.finished]
    if unfinished:
        blocks.append(
            Para(f"Unfinished (no summary.json, so no final full-split metric; curves only): {', '.join(unfinished)}.")
        )
    return blocks


def _group_row(g: Group, long: bool) -> list[str]:
    st = stats(g.values) if g.values else None
    if st is None:
        summary = NONE
    elif st.std is None:
        summary = f"{fmt_metric(st.mean)} (single seed)"
    else:
        summary = f"{fmt_metric(st.mean)} ± {fmt_metric(st.std)}"
    return (
        [g.short]
        + ([g.label] if long else [])
        + [
            UNITS[g.metric],
            ", ".join(r.name for r in g.runs),
            str(len(g.values)),
            summary,
            ", ".join(fmt_metric(v) for v in g.values) or NONE,
        ]
    )


def seeds_section(groups: list[Group]) -> list[Block]:
    long = any(g.short != g.label for g in groups)  # then a column spells out each "config N"
    headers = ["config"] + (["settings"] if long else []) + ["metric", "runs", "n", "mean ± std", "values"]
    blocks = [
        Heading(2, "Seeds and significance"),
        Para(
            f"Runs whose configs differ only in {', '.join(SEED_KEYS)} or logging.* "
            "are seeds of one config, labelled by the settings that differ between configs. "
            "Mean ± sample standard deviation (n−1) of the "
            "final full-split metric; Welch's t-test (unequal variances) between configs with at least two finished seeds."
        ),
        Table(headers, [_group_row(g, long) for g in groups]),
    ]
    for c in comparisons(groups):
        blocks.append(
            Para(
                f"{c.a.short} vs {c.b.short}: difference of means {c.diff:+.4f} {UNITS[c.a.metric]} "
                f"(Welch's t = {c.t:.3f}, p = {fmt_p(c.p)}): {verdict(c)}."
            )
        )
    blocks += [Para(n) for n in seed_notes(groups)]
    return blocks


def printable(text: str) -> str:
    """Control and unassigned characters as visible escapes (\\x07), so a raw sample cannot break the page."""
    return "".join(
        c
        if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs", "Co", "Cn")
        else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        for c in text
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def curves_section(groups: list[Group]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Validation curves")]
    for metric in dict.fromkeys(g.metric for g in groups):
        mg = [g for g in groups if g.metric == metric]
        unit = UNITS[metric]
        for x, what in (("step", "steps"), ("tokens", "training tokens"), ("seconds", "training seconds")):
            png = curve_png(mg, x, unit, f"{unit} against {what}")
            if png is None:
                blocks.append(Para(f"No run logged {what} with its evaluations ({unit}): no plot against {what}."))
                continue
            blocks.append(Figure(f"curve-{_slug(metric)}-{x}.png", png, f"{unit} against {what}"))
        no_seconds = [r.name for g in mg for r in g.runs if r.val and any(p.seconds is None for p in r.val)]
        if no_seconds:
            blocks.append(
                Para(f"Left out of the wall-clock plot (their logs predate train_seconds): {', '.join(no_seconds)}.")
            )
    partial = [r.name for g in groups for r in g.runs if r.cfg.train.val_tokens]
    if partial:
        blocks.append(
            Para(
                f"Periodic evaluations of {', '.join(partial)} score only train.val_tokens tokens (estimates); "
                "each run's last point is the full split."
            )
        )
    png = curve_png(groups, "step", "training loss (nats/token)", "training loss against steps", train=True)
    if png is not None:
        blocks += [
            Heading(2, "Training loss"),
            Figure("train-loss.png", png, "training loss (nats/token) against steps"),
        ]
    return blocks


def patterns_section(runs: list[RunData], out: Path) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Attention patterns")]
    for i, pic in enumerate(pattern_pictures(runs, out)):
        blocks.append(Figure(f"pattern-{i:02d}.png", pic.png, pic.caption))
    return blocks


def samples_section(runs: list[RunData]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Samples")]
    for i, r in enumerate(runs):
        if r.sample_png is not None:
            blocks += [
                Heading(3, r.name),
                Figure(
                    f"sample-{i:02d}.png",
                    r.sample_png.read_bytes(),
                    f"{r.name}: last sample grid ({r.sample_png.name})",
                ),
            ]
        elif r.sample_text is not None:
            text = r.sample_text
            cut = printable(text[:SAMPLE_CHARS]) + (
                f"\n[... cut at {SAMPLE_CHARS} of {len(text)} characters]" if len(text) > SAMPLE_CHARS else ""
            )
            blocks += [Heading(3, r.name), Pre(cut)]
    if len(blocks) == 1:
        blocks.append(Para("No run wrote samples (set logging.sample_tokens or logging.sample_images when training)."))
    return blocks


# ------------------------------------------------------------------ the report


def build_report(run_dirs: list[str | Path], out: str | Path, *, title: str | None = None, force: bool = False) -> Path:
    """Write ``out/index.html`` and ``out/report.md`` (+ PNGs) comparing ``run_dirs``; returns the HTML path."""
    out = Path(out)
    runs = load_runs(run_dirs)  # all input checked before anything is written
    _prepare_out(out, force)
    groups = group_runs(runs)
    label = {r.name: g.short for g in groups for r in g.runs}
    body = (
        metrics_section(runs, label)
        + seeds_section(groups)
        + curves_section(groups)
        + patterns_section(runs, out)
        + samples_section(runs)
    )
    blocks = header_section(runs, groups, sum(isinstance(b, Figure) for b in body)) + body
    title = title or f"attnlab report: {len(runs)} run(s)"
    for b in blocks:
        if isinstance(b, Figure):
            (out / b.filename).write_bytes(b.png)
    (out / "report.md").write_text(render_markdown(title, blocks), encoding="utf-8")
    page = out / "index.html"
    page.write_text(render_html(title, blocks), encoding="utf-8")
    return page
