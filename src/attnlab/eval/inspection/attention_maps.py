"""Attention maps: capture each layer's attention weights through the reference path, and draw them.

``capture_attention(model)`` replaces every layer's ``Attention`` forward: the
layer's output is ``weights @ v`` with the weights of the slow
reference spec (``reference_weights``: dense scores, the pattern's mask,
softmax in fp32; linear attention's implicit weights), so what is captured is
exactly what the forward used. Training code is untouched; the original forwards are back
when the ``with`` block ends. Weights are computed a chunk of query rows at a
time: an ``on_layer`` callback can reduce them on the fly (attention
statistics of a 3072-token image model) while only the ``keep`` layers'
full ``[B, H, T, T]`` weights are held.

``write_attention_maps`` is ``attnlab viz attention``: heat maps of a text's
attention (token labels on both axes), or the attention of one query pixel
over an image, plus the raw weights as ``weights.npy``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...attention.backends import reference_weights
from ...attention.heads import expand_kv
from ...errors import UserError
from .viz_inputs import check_out_dir, encode_text, token_label, token_texts

# Query rows per reference call are chosen so one chunk of weights holds about this many floats.
CHUNK_ELEMENTS = 1 << 24
# Axis labels per heat map side: longer inputs label every k-th token.
MAX_LABELS = 48


@dataclass
class LayerAttention:
    """What an ``on_layer`` callback sees: one layer's q [B,H,Tq,D] for a chunk of query rows, all k and v,
    and the weights [B,H,rows,Tk] (fp32) of those rows, whose first query sits at position ``q_start``."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    weights: torch.Tensor
    q_start: int
    first_chunk: bool


LayerCallback = Callable[[LayerAttention], None]


@contextlib.contextmanager
def capture_attention(
    model,
    keep: Iterable[int] | None = None,
    *,
    on_layer: LayerCallback | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Iterator[dict[int, torch.Tensor]]:
    """Route every layer of ``model`` (a GPT) through the reference path while the block runs.

    Yields a dict filled by each forward: layer -> weights [B, H, Tq, Tk] (fp32, on CPU) for the layers in
    ``keep`` (default: all layers without ``on_layer``, none with it). ``on_layer`` is called for every chunk of
    query rows of every layer. Use the model in eval mode: the reference path here applies no dropout.
    """
    blocks = list(model.blocks)
    keep = set(range(len(blocks)) if keep is None and on_layer is None else keep or ())
    bad = sorted(i for i in keep if not 0 <= i < len(blocks))
    if bad:
        raise UserError(f"layer {bad[0]} is outside [0, {len(blocks)}): the model has {len(blocks)} layers")
    captured: dict[int, torch.Tensor] = {}
    cores = [block.attn.core for block in blocks]
    # Each layer's forward is replaced (an instance attribute shadows the class method) rather than hooked:
    # a forward hook would run the fast backend first and throw its output away.
    for i, core in enumerate(cores):
        core.forward = _reference_forward(core, i, i in keep, captured, on_layer, chunk_elements)
    try:
        yield captured
    finally:
        for core in cores:
            del core.forward


def _reference_forward(
    core, layer: int, keep: bool, captured: dict, on_layer: LayerCallback | None, chunk_elements: int
):
    def forward(q, k, v, doc=None):
        if core.training and core.dropout > 0:
            raise ValueError(
                "capture_attention needs the model in eval mode (model.eval()): the reference path applies no dropout"
            )
        B, H, Tq, Tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        k, v = expand_kv(k, H), expand_kv(v, H)  # shared key/value heads (grouped-query): one per query head
        rows = max(1, chunk_elements // max(1, B * H * Tk))
        outs, kept = [], []
        for s in range(0, Tq, rows):
            qc = q[:, :, s : s + rows]
            w = reference_weights(qc, k, core.pattern, q_start=Tk - Tq + s, modifier=core.modifier, doc=doc)
            outs.append((w @ v.to(w.dtype)).to(v.dtype))
            if on_layer is not None:
                on_layer(LayerAttention(layer, qc, k, v, w, Tk - Tq + s, s == 0))
            if keep:
                kept.append(w.detach().float().cpu())
        if keep:
            captured[layer] = torch.cat(kept, dim=2)
        return torch.cat(outs, dim=2)

    return forward


@torch.no_grad()
def model_weights(model, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each chosen layer's weights [B, H, T, T] for input ids ``x`` [B, T], from one eval-mode forward."""
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model, layers) as captured:
            model(x)
    finally:
        model.train(was_training)
    return captured


# ------------------------------------------------------------------ selections and inputs


def parse_selection(spec: str | None, n: int, what: str) -> list[int]:
    """``None``/``all`` -> 0..n-1; ``"0,2"`` or ``"1-3"`` -> those indices, each checked against [0, n)."""
    if spec is None or spec.strip().lower() == "all":
        return list(range(n))
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi) + 1) if hi else [int(lo)]
    except ValueError:
        raise UserError(
            f"--{what} {spec!r} is not a list of indices: write e.g. --{what} 0,2 or --{what} 0-3 or all"
        ) from None
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out:
        raise UserError(
            f"--{what} {bad[0] if bad else spec!r} is outside [0, {n}) (the model has {n} {what}): "
            f"pick indices below {n}"
        )
    return sorted(set(out))


def image_input(tokens: np.ndarray, index: int, n_bytes: int, sos: int) -> torch.Tensor:
    """The model input of image ``index`` as scored: [SOS, byte 0, ..., byte n-2] (position p predicts byte p)."""
    image = np.asarray(tokens[index * n_bytes : (index + 1) * n_bytes], dtype=np.int64)
    return torch.from_numpy(np.concatenate([[sos], image[:-1]]))[None]


def pixel_query(pixel: tuple[int, ...], shape: tuple[int, int, int]) -> int:
    """The query position that predicts byte (row, col, channel): its raster index (SOS shifts inputs by one)."""
    H, W, C = shape
    row, col, ch = pixel
    return (row * W + col) * C + ch


def image_query_map(weights_row: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """A query's weights over key positions -> (H x W map summed over channels, weight on SOS).

    Key 0 is SOS; key p >= 1 holds byte p - 1 of the image (raster order, channels interleaved).
    """
    H, W, C = shape
    per_byte = np.zeros(H * W * C, dtype=np.float64)
    n = min(len(weights_row) - 1, H * W * C)
    per_byte[:n] = weights_row[1 : n + 1]
    return per_byte.reshape(H, W, C).sum(-1), float(weights_row[0])


def parse_pixel(spec: str | None, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """``ROW,COL[,CHANNEL]`` (default: the centre pixel, last channel), checked against the image shape."""
    H, W, C = shape
    if spec is None:
        return H // 2, W // 2, C - 1
    try:
        parts = [int(p) for p in spec.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise UserError(f"--pixel {spec!r} is not ROW,COL or ROW,COL,CHANNEL: write e.g. --pixel {H // 2},{W // 2}")
    row, col, ch = (*parts, C - 1) if len(parts) == 2 else parts
    if not (0 <= row < H and 0 <= col < W and 0 <= ch < C):
        raise UserError(f"--pixel {spec} is outside the {H}x{W}x{C} image: use row < {H}, col < {W}, channel < {C}")
    return row, col, ch


# ------------------------------------------------------------------ pictures


def _figure(n_panels: int, size: float, max_cols: int = 4):
    from matplotlib.figure import Figure  # no pyplot: no global state

    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(size * cols + 0.8, size * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in list(axes.flat)[n_panels:]:
        fig.delaxes(ax)
    return fig, list(axes.flat)[:n_panels]


def draw_text_maps(weights: np.ndarray, heads: list[int], labels: list[str], path: Path, title: str):
    """One heat map per head (weights [len(heads), T, T]: row = query, column = key), token labels on both axes."""
    import matplotlib
    from matplotlib.colors import PowerNorm

    T = weights.shape[-1]
    step = max(1, math.ceil(T / MAX_LABELS))
    ticks = list(range(0, T, step))
    size = max(3.2, 0.12 * len(ticks) + 1.6)  # about 9 points per labelled token
    fig, axes = _figure(len(heads), size, max_cols=4 if len(ticks) <= 24 else 2)
    font = 7
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")  # grey: weight exactly 0 (outside the pattern)
    shown = [
        labels[i] if step == 1 else f"{i} {labels[i]}" for i in ticks
    ]  # positions, when some tokens are unlabelled
    for ax, h, w in zip(axes, heads, weights):
        im = ax.imshow(
            np.ma.masked_equal(w, 0.0), cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest"
        )
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(ticks, shown, rotation=90, fontsize=font)
        ax.set_yticks(ticks, shown, fontsize=font)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight (sqrt scale)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return fig


def draw_image_maps(
    image: np.ndarray, maps: list[tuple[int, np.ndarray, float]], pixel: tuple[int, int, int], path: Path, title: str
):
    """The image, then per head the query pixel's attention (summed over channels) over the image."""
    shown = image[..., 0] if image.shape[-1] == 1 else image
    cmap = "gray" if image.shape[-1] == 1 else None
    fig, axes = _figure(len(maps) + 1, 2.8, max_cols=5)
    axes[0].imshow(shown, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    for ax, (h, amap, sos) in zip(axes[1:], maps):
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=255, interpolation="nearest", alpha=0.35)
        ax.imshow(amap, cmap="magma", vmin=0.0, vmax=max(float(amap.max()), 1e-12), interpolation="nearest", alpha=0.75)
        ax.set_title(f"head {h} (SOS {sos:.2f})", fontsize=9)
    for ax in axes:
        ax.plot([pixel[1]], [pixel[0]], marker="s", ms=6, mfc="none", mec="cyan", mew=1.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        title + "\nbright: the weight on each pixel's bytes (summed over channels, each panel scaled "
        "to its maximum); cyan: the query pixel",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return fig


# ------------------------------------------------------------------ attnlab viz attention


def write_attention_maps(
    run,
    out: str | Path,
    *,
    text: str | None = None,
    image: int | None = None,
    split: str = "val",
    pixel: str | None = None,
    layers: str | None = None,
    heads: str | None = None,
    force: bool = False,
) -> dict:
    """``attnlab viz attention``: per chosen layer a PNG, and ``weights.npy`` [layers, heads, T, T]; returns a description."""
    is_image = run.dataset.kind == "image"
    _check_source(run, text, image, is_image)
    m = run.cfg.model
    layer_ids, head_ids = parse_selection(layers, m.n_layer, "layers"), parse_selection(heads, m.n_head, "heads")
    x, info, picture = _image_source(run, image, split, pixel) if is_image else _text_source(run, text)
    out = Path(out)
    check_out_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    weights = model_weights(run.model, x.to(run.device), layer_ids)
    T = x.shape[1]
    raw = np.lib.format.open_memmap(
        out / "weights.npy", mode="w+", dtype=np.float32, shape=(len(layer_ids), len(head_ids), T, T)
    )
    pngs = []
    for n, layer in enumerate(layer_ids):
        raw[n] = w = weights.pop(layer)[0, head_ids].numpy()  # freed layer by layer
        pngs.append(str(_draw_layer(run, out, layer, w, head_ids, info, picture)))
    raw.flush()
    del raw
    desc = {
        "out": str(out),
        "pngs": pngs,
        "weights": str(out / "weights.npy"),
        "shape": [len(layer_ids), len(head_ids), T, T],
        "layers": layer_ids,
        "heads": head_ids,
        "tokens": T,
        **info,
    }
    (out / "attention.json").write_text(json.dumps(desc, indent=2, ensure_ascii=False), encoding="utf-8")
    return desc


def _draw_layer(run, out: Path, layer: int, w: np.ndarray, head_ids: list[int], info: dict, picture) -> Path:
    path = out / f"layer{layer:02d}.png"
    title = f"{run.dir.name}: layer {layer} ({run.model.blocks[layer].attn.core.pattern.name})"
    if picture is None:
        draw_text_maps(w, head_ids, info["labels"], path, title)
    else:
        maps = [(h, *image_query_map(w[i, info["query"]], info["image_shape"])) for i, h in enumerate(head_ids)]
        draw_image_maps(
            picture, maps, info["pixel"], path, title + f", query pixel {info['pixel']} (row, col, channel)"
        )
    return path


def _check_source(run, text, image, is_image: bool) -> None:
    if text is not None and image is not None:
        raise UserError("pass either --text (text runs) or --image K (image runs), not both")
    if is_image and text is not None:
        raise UserError(f"{run.dir} models images: use --image K (image K of the split) instead of --text")
    if not is_image and image is not None:
        raise UserError(f'{run.dir} models text: use --text "..." instead of --image')
    if text is None and image is None:
        raise UserError('nothing to look at: pass --text "..." for a text run or --image K for an image run')


def _text_source(run, text: str) -> tuple[torch.Tensor, dict, None]:
    ids = encode_text(run, text).tolist()
    labels = [token_label(t) for t in token_texts(run.dataset.tokenizer, ids)]
    return torch.tensor([ids]), {"text": text, "token_ids": ids, "labels": labels}, None


def _image_source(run, index: int, split: str, pixel: str | None) -> tuple[torch.Tensor, dict, np.ndarray]:
    """Image ``index`` of ``split`` as the model reads it, the query that predicts the chosen pixel, and its pixels."""
    from ...data.image_format import SOS
    from ...data.store import read_images

    splits = run.dataset.meta["splits"]
    if split not in splits:
        raise UserError(f"--split {split!r} is not in {run.dataset.dir}: use one of {', '.join(splits)}")
    shape = tuple(run.model.cfg.image_shape)
    n_bytes = math.prod(shape)
    tokens = run.dataset.tokens(split)
    n_images = len(tokens) // n_bytes
    if not 0 <= index < n_images:
        raise UserError(
            f"--image {index} is outside [0, {n_images}) (the {split} split has {n_images} images): pick a smaller index"
        )
    px = parse_pixel(pixel, shape)
    info = {
        "split": split,
        "image": index,
        "image_shape": list(shape),
        "pixel": list(px),
        "query": pixel_query(px, shape),
    }
    return image_input(tokens, index, n_bytes, SOS), info, read_images(run.dataset, split)[index]
