"""The report's pictures, as PNG bytes: learning curves per seed group and attention patterns.

A group with one run is drawn as that run's line; a group of several seeds as
the mean over seeds with a min–max band, per step (x is the mean over seeds,
which matters only for wall-clock).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import config as config_mod
from ..inspection.pattern_viz import draw_pattern, pattern_from_overrides
from .run_data import RunData
from .stats import Group

PATTERN_MAX_LEN = 256  # pattern pictures are min(context, this) tokens on a side
X_AXES = {"step": "step", "tokens": "training tokens", "seconds": "training seconds (wall-clock)"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _series(run: RunData, x: str, train: bool) -> dict[int, tuple[float, float]]:
    """step -> (x, y) for one run; wall-clock points without train_seconds are dropped."""
    if train:
        return {s: (float(s), loss) for s, loss in run.train}
    return {p.step: (float(getattr(p, x)), p.value) for p in run.val if getattr(p, x) is not None}


def _line(ax, series: dict, color: str, label: str, marker: str) -> None:
    pts = sorted(series.values())
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=3, color=color, label=label)


def _draw_group(ax, group: Group, color: str, x: str, train: bool) -> bool:
    """Draw one group (a run's line, or the mean of its seeds with a min–max band); False if nothing to draw.

    Each step's mean and band use the seeds that reached it, so an unfinished seed does not cut the curve short.
    """
    series = [s for s in (_series(r, x, train) for r in group.runs) if s]
    marker = "" if train else "o"
    if len(series) == 1:
        name = group.runs[0].name if len(group.runs) == 1 else f"1 of {len(group.runs)} seeds"
        _line(ax, series[0], color, f"{group.short} ({name})", marker)
    elif series:
        steps = sorted(set().union(*series))
        at = [[s[k] for s in series if k in s] for k in steps]  # (x, y) of every seed that reached the step
        xs = np.array([np.mean([p[0] for p in a]) for a in at])
        ys = [np.array([p[1] for p in a]) for a in at]
        ax.plot(
            xs,
            [y.mean() for y in ys],
            marker=marker,
            ms=3,
            color=color,
            label=f"{group.short} (mean of {len(series)} seeds, band min–max)",
        )
        ax.fill_between(xs, [y.min() for y in ys], [y.max() for y in ys], color=color, alpha=0.2, lw=0)
    return bool(series)


def curve_png(groups: list[Group], x: str, ylabel: str, title: str, *, train: bool = False) -> bytes | None:
    """One line (or mean + band) per group against ``x`` (step, tokens or seconds); None when no run has the data."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    drawn = [_draw_group(ax, g, f"C{i % 10}", x, train) for i, g in enumerate(groups)]
    if not any(drawn):
        return None
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


@dataclass
class PatternPicture:
    png: bytes
    caption: str
    runs: list[str]


def _pattern_key(run: RunData) -> str:
    cfg = run.cfg
    return json.dumps(
        [cfg.model.n_head, cfg.model.n_layer, cfg.model.context, config_mod.to_dict(cfg)["attention"]],
        sort_keys=True,
        default=str,
    )


def pattern_pictures(runs: list[RunData], scratch: Path) -> list[PatternPicture]:
    """One picture per distinct attention config (with the run's n_head, seq_len = min(context, 256)).

    Patterns that change from layer to layer (a schedule, strided interleave)
    are drawn for layer 0, and the caption says so.
    """
    by_key: dict[str, list[RunData]] = {}
    for r in runs:
        by_key.setdefault(_pattern_key(r), []).append(r)
    out = []
    for i, members in enumerate(by_key.values()):
        cfg = members[0].cfg
        h, n_layer = cfg.model.n_head, cfg.model.n_layer
        attn = {f"attention.{k}": v for k, v in config_mod.to_dict(cfg)["attention"].items()}
        layers = [pattern_from_overrides(attn, h, layer, n_layer) for layer in range(n_layer)]
        per_layer = len({(p.name, repr(p.params())) for p in layers}) > 1
        seq_len = min(cfg.model.context, PATTERN_MAX_LEN)
        note = f"layer 0 of {n_layer}; the pattern differs per layer" if per_layer else ""
        path = scratch / f"pattern-{i:02d}.png"
        draw_pattern(layers[0], seq_len, h, path, subtitle=note)
        caption = (
            f"{layers[0].name}: N={seq_len}, {h} heads"
            + (f" ({note})" if note else "")
            + "; used by "
            + ", ".join(r.name for r in members)
        )
        out.append(PatternPicture(path.read_bytes(), caption, [r.name for r in members]))
        path.unlink()
    return out
