"""Pictures of attention patterns: which keys each query may see.

``attnlab viz pattern`` draws one panel per group of identical heads
(``Pattern.head_groups``) with query rows and key columns, and can save the
dense boolean mask ``[H, N, N]`` (True = the query may attend to the key).
``ascii_pattern`` gives the same picture as text, for tests and docs::

    >>> from attnlab.attention.patterns import Local
    >>> print(ascii_pattern(Local(window=2), 4))
    x...
    xx..
    .xx.
    ..xx

Masks are built a block of query rows at a time, so only the picture itself
(N x N booleans per drawn head) is ever held; pictures are refused above
``MAX_PICTURE_LEN`` tokens. Above ``MAX_PIXELS`` rows the picture is shown
max-pooled (a pixel is dark when any pair in its cell may attend), so thin
strided lines stay visible.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch

from ...attention.patterns import Pattern, build_pattern
from ...config import Config, parse_override, set_key
from ...errors import ConfigError

# The picture and the saved mask are N x N per head: refuse sizes that would not fit comfortably.
MAX_PICTURE_LEN = 8192
# Cells drawn per panel side (about its size in pixels): larger masks are max-pooled down to at most this,
# since letting matplotlib subsample would drop thin strided lines.
MAX_PIXELS = 256
# Query rows per step when building a mask (bounds the index temporaries to ROWS x N).
_ROWS = 1024


def pattern_from_overrides(overrides: list[str] | dict, n_head: int, layer: int = 0, n_layer: int = 1) -> Pattern:
    """The pattern of layer ``layer`` (of ``n_layer``) for an AttentionConfig with ``attention.*`` overrides.

    ``overrides`` is a list of ``attention.key=value`` strings or a dict ``{"attention.key": value}``;
    any other key is refused with a one-line ConfigError.
    """
    if n_head < 1:
        raise ConfigError(f"--heads {n_head} must be >= 1")
    if not 0 <= layer < n_layer:
        raise ConfigError(
            f"--layer {layer} is outside [0, {n_layer}) (--layers {n_layer}): pick a layer index below --layers"
        )
    items = list(overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides))
    # vars(AttentionConfig) holds the pattern parameters in one `params` dict: they are set flat
    items = [
        kv
        for key, value in items
        for kv in ([(f"attention.{k}", v) for k, v in value.items()] if key == "attention.params" else [(key, value)])
    ]
    cfg = Config()
    for key, value in items:
        if not key.startswith("attention."):
            raise ConfigError(
                f"{key}={value} is not an attention setting: only attention.* overrides apply here, "
                f"e.g. attention.pattern=local attention.window=64"
            )
        set_key(cfg, key, value)
    return build_pattern(cfg.attention, layer, n_layer, n_head)


def _check_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ConfigError(f"--seq-len {seq_len} must be >= 1")
    if seq_len > MAX_PICTURE_LEN:
        raise ConfigError(
            f"--seq-len {seq_len} is too long to draw or save: the picture is N x N per head; "
            f"use --seq-len <= {MAX_PICTURE_LEN} (the pattern repeats, so a shorter one shows its shape)"
        )


def head_mask(pattern: Pattern, seq_len: int, head: int, pool: int = 1) -> np.ndarray:
    """Bool [ceil(N/pool), ceil(N/pool)] mask of one head; with ``pool`` > 1, True where any pair in the cell attends."""
    n = -(-seq_len // pool)
    out = np.zeros((n, n), dtype=bool)
    k = torch.arange(seq_len).view(1, 1, seq_len)
    h = torch.tensor(head).view(1, 1, 1)
    step = pool * max(1, _ROWS // pool)  # whole cells per step
    for start in range(0, seq_len, step):
        rows = min(step, seq_len - start)
        q = torch.arange(start, start + rows).view(1, rows, 1)
        m = pattern.allowed(q, k, h).expand(1, rows, seq_len)[0].numpy()
        if pool > 1:
            pad = np.zeros((-(-rows // pool) * pool, n * pool), dtype=bool)
            pad[:rows, :seq_len] = m
            m = pad.reshape(-1, pool, n, pool).any(axis=(1, 3))
        out[start // pool : start // pool + m.shape[0]] = m
    return out


def dense_mask(pattern: Pattern, seq_len: int, n_head: int) -> np.ndarray:
    """Bool [n_head, N, N], equal to ``pattern.dense_mask(N, n_head).numpy()`` but built row-block by row-block."""
    _check_len(seq_len)
    return np.stack([head_mask(pattern, seq_len, h) for h in range(n_head)])


def save_mask(pattern: Pattern, seq_len: int, n_head: int, path: str | Path) -> np.ndarray:
    """Write the dense boolean mask [n_head, N, N] (True = may attend) with ``numpy.save``; returns it."""
    mask = dense_mask(pattern, seq_len, n_head)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy.save would append .npy to a path without it
        np.save(f, mask, allow_pickle=False)
    return mask


def ascii_pattern(pattern: Pattern, seq_len: int, head: int = 0) -> str:
    """The mask of one head as text: one row per query, 'x' where it may attend to that key, '.' elsewhere."""
    mask = head_mask(pattern, seq_len, head)
    return "\n".join("".join("x" if a else "." for a in row) for row in mask)


def format_params(params: dict) -> str:
    """``key=value`` pairs of a pattern's parameters, separated by ';' (the form the benchmark CSV uses)."""
    return ";".join(f"{k}={v}" for k, v in params.items())


def heads_label(heads: tuple[int, ...]) -> str:
    """'head 3', 'heads 0-3' or 'heads 0,2,4' (lists of more than 8 heads are shortened)."""
    hs = list(heads)
    if len(hs) == 1:
        return f"head {hs[0]}"
    if hs == list(range(hs[0], hs[-1] + 1)):
        return f"heads {hs[0]}-{hs[-1]}"
    if len(hs) > 8:
        return "heads " + ",".join(map(str, hs[:6])) + f",...,{hs[-1]} ({len(hs)})"
    return "heads " + ",".join(map(str, hs))


def draw_pattern(pattern: Pattern, seq_len: int, n_head: int, path: str | Path, *, subtitle: str = ""):
    """Draw one panel per group of identical heads to ``path`` (PNG); returns the matplotlib Figure (not registered with pyplot).

    ``fig.axes`` holds exactly one Axes per head group. The title names the
    pattern, its parameters and its density (allowed pairs / causal pairs).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, rendered by the Agg canvas

    _check_len(seq_len)
    path = Path(path)
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise ConfigError(
            f"cannot save a picture as {path.name!r}: use one of .{', .'.join(sorted(formats))} (e.g. mask.png)"
        )
    groups = pattern.kernel_groups(n_head, seq_len)
    density = pattern.density(seq_len, n_head)
    pool = max(1, math.ceil(seq_len / MAX_PIXELS))
    cols = min(len(groups), 4)
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows + 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    extent = (-0.5, seq_len - 0.5, seq_len - 0.5, -0.5)  # axes in token positions, query 0 at the top
    for ax, group in zip(axes.flat, groups):
        ax.imshow(
            head_mask(pattern, seq_len, group.heads[0], pool),
            cmap="Greys",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=extent,
        )
        ax.set_title(heads_label(group.heads), fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        fig.delaxes(ax)
    params = format_params(pattern.params()).replace(";", ", ")
    title = f"{pattern.name}({params})" if params else pattern.name
    detail = f"N={seq_len}, H={n_head}, density {density:.4g}"
    if pool > 1:
        detail += f", 1 cell = {pool}x{pool} tokens, dark if any pair attends"
    if subtitle:
        detail += f", {subtitle}"
    fig.suptitle(textwrap.fill(title, 90) + "\n" + detail, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig
