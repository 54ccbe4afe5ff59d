"""Samples from image models, completions of half images, and grids of images with exact pixels.

Convention: an image model has vocabulary ``IMAGE_VOCAB`` = 257, the byte
values 0..255 and a start-of-image token ``SOS`` = 256. One image is one
sequence: the input is [SOS, x_0, ..., x_{N-2}] and the targets are
[x_0, ..., x_{N-1}], where N = H*W*C = ``model.context`` and the bytes are in
raster order with the channels of a pixel interleaved (``data.image_format.to_sequence``).
Sampling therefore starts from SOS (followed by the kept bytes when completing),
generates the remaining bytes with the KV cache, and bans SOS from the output.

Reproducibility: one CPU generator seeded with ``seed`` draws every token of the
batches in order, so the same seed, ``batch_size``, ``sampling`` and inputs give
the same images on any device (up to the model's own numerics); the first
images agree for any ``n`` that covers their whole batches. A different
``batch_size`` gives different, equally valid samples.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...data.image_format import IMAGE_VOCAB, SOS, from_sequence, to_sequence
from ...errors import ConfigError
from .filters import SamplingConfig
from .loop import generate

MARKER = (255, 0, 0)  # completion grids: ticks in the padding where the kept rows end

Shape = tuple[int, int, int]


# ------------------------------------------------------------------ sampling


def sample_images(
    model,
    n: int,
    shape: Shape,
    *,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """``n`` unconditional samples, uint8 [n, H, W, C] for ``shape`` = (H, W, C).

    The model must already be on ``device``; see the module docstring for what ``seed`` reproduces.
    """
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one image")
    prefixes = np.zeros((n, 0), dtype=np.uint8)
    return _sample(model, prefixes, tuple(shape), sampling, seed, batch_size, device, progress)


def complete_images(
    model,
    images: np.ndarray,
    *,
    keep_rows: int | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Keep the top ``keep_rows`` rows (default H // 2) of each image [K, H, W, C] and sample the rest, as in Image GPT.

    The kept rows are the first keep_rows*W*C bytes of each sequence, so they are
    returned unchanged; only the rows below are new.
    """
    images = _as_images(images)
    _, h, w, c = images.shape
    keep_rows = _keep_rows(keep_rows, h)
    prefixes = to_sequence(images)[:, : keep_rows * w * c]
    return _sample(model, prefixes, (h, w, c), sampling, seed, batch_size, device, progress)


def _sample(
    model,
    prefixes: np.ndarray,
    shape: Shape,
    sampling: SamplingConfig | None,
    seed: int,
    batch_size: int,
    device: torch.device | str,
    progress: bool,
) -> np.ndarray:
    """Extend [SOS] + each prefix [K, P] to a whole image, ``batch_size`` sequences at a time."""
    n_bytes = _check_model(model, shape)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use at least 1")
    generator = torch.Generator().manual_seed(seed)
    n_new = n_bytes - prefixes.shape[1]
    out = []
    with tqdm(total=len(prefixes), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(prefixes), batch_size):
            prefix = torch.from_numpy(prefixes[start : start + batch_size].astype(np.int64)).to(device)
            prompt = torch.cat([torch.full((len(prefix), 1), SOS, device=device), prefix], dim=1)
            seq = generate(
                model, prompt, n_new, sampling=sampling, generator=generator, banned_ids=(SOS,), progress=progress
            )
            out.append(seq[:, 1:].cpu().numpy().astype(np.uint8))
            bar.update(len(prefix))
    return from_sequence(np.concatenate(out), *shape)


def _check_model(model, shape: Shape) -> int:
    """Bytes per image; refuses a model that does not follow the SOS convention for this shape."""
    n_bytes = math.prod(shape)
    if model.vocab_size != IMAGE_VOCAB:
        raise ConfigError(
            f"the model has vocabulary {model.vocab_size}, not {IMAGE_VOCAB} (bytes + start-of-image): "
            "sample from a model trained on an image dataset"
        )
    if model.context != n_bytes:
        h, w, c = shape
        raise ConfigError(
            f"the model's context {model.context} is not one {h}x{w}x{c} image ({n_bytes} bytes): "
            "pass the shape of the images it was trained on"
        )
    return n_bytes


def _keep_rows(keep_rows: int | None, height: int) -> int:
    keep_rows = height // 2 if keep_rows is None else keep_rows
    if not 0 <= keep_rows <= height:
        raise ValueError(f"keep_rows={keep_rows} is outside [0, {height}]: keep at most the image's {height} rows")
    return keep_rows


def _as_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C]; integer arrays are accepted when every value is a byte."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected images [N, H, W, C] with N >= 1, got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise ValueError(f"images of dtype {images.dtype} are not bytes: pass uint8 values 0..255")
        images = images.astype(np.uint8)
    return images


# ------------------------------------------------------------------ grids


def default_scale(width: int) -> int:
    """Integer zoom that makes small images (8x8 digits) about 64 pixels wide when saved."""
    return max(1, 64 // width)


def image_grid(
    images: np.ndarray, ncol: int | None = None, scale: int = 1, pad: int = 1, pad_value: int = 255
) -> np.ndarray:
    """Images [N, H, W, C] (C = 1 or 3) tiled row by row into one RGB uint8 picture [Hg, Wg, 3].

    Exact pixels: each image is zoomed by repeating pixels ``scale`` times and
    separated by ``pad`` pixels of ``pad_value``, so with rows = ceil(N / ncol),
    Hg = rows*(H*scale + pad) + pad and Wg = ncol*(W*scale + pad) + pad.
    ``ncol`` defaults to ceil(sqrt(N)).
    """
    images = _as_images(images)
    n, h, w, c = images.shape
    if c not in (1, 3):
        raise ValueError(f"images have {c} channels: a grid shows 1 (grey) or 3 (RGB)")
    ncol = math.ceil(math.sqrt(n)) if ncol is None else ncol
    if ncol < 1 or scale < 1 or pad < 0:
        raise ValueError(f"ncol={ncol}, scale={scale}, pad={pad}: ncol and scale must be >= 1, pad >= 0")
    rgb = np.broadcast_to(images, (n, h, w, 3))
    zoomed = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    rows = math.ceil(n / ncol)
    grid = np.full((rows * cell_h + pad, ncol * cell_w + pad, 3), pad_value, dtype=np.uint8)
    for i, image in enumerate(zoomed):
        top, left = pad + (i // ncol) * cell_h, pad + (i % ncol) * cell_w
        grid[top : top + h * scale, left : left + w * scale] = image
    return grid


def completion_grid(
    originals: np.ndarray, completions: np.ndarray, keep_rows: int | None = None, scale: int = 1, pad: int = 1
) -> np.ndarray:
    """One row per image, original | completion, with red ticks in the padding beside the first sampled row.

    The ticks (only when pad > 0 and 0 < keep_rows < H) leave every image pixel as it is.
    """
    originals, completions = _as_images(originals), _as_images(completions)
    if originals.shape != completions.shape:
        raise ValueError(f"originals {originals.shape} and completions {completions.shape} differ in shape")
    n, h = originals.shape[:2]
    keep_rows = _keep_rows(keep_rows, h)
    pairs = np.stack([originals, completions], axis=1).reshape(2 * n, *originals.shape[1:])
    grid = image_grid(pairs, ncol=2, scale=scale, pad=pad)
    if pad and 0 < keep_rows < h:
        cell_w = originals.shape[2] * scale + pad
        ticks = pad + np.arange(n) * (h * scale + pad) + keep_rows * scale
        for left in range(0, grid.shape[1], cell_w):  # the three vertical padding strips
            grid[ticks, left : left + pad] = MARKER
    return grid


def save_grid(images: np.ndarray, path: str | PathLike, **grid_kw) -> Path:
    """Write ``image_grid(images, **grid_kw)`` as a PNG (scale defaults to ``default_scale``); returns the path."""
    grid_kw.setdefault("scale", default_scale(np.shape(images)[2]))
    return _save_png(image_grid(images, **grid_kw), path)


def save_completion_grid(
    originals: np.ndarray,
    completions: np.ndarray,
    path: str | PathLike,
    keep_rows: int | None = None,
    scale: int | None = None,
    pad: int = 1,
) -> Path:
    """Write ``completion_grid`` as a PNG (scale defaults to ``default_scale``); returns the path."""
    scale = default_scale(np.shape(originals)[2]) if scale is None else scale
    return _save_png(completion_grid(originals, completions, keep_rows, scale, pad), path)


def _save_png(grid: np.ndarray, path: str | PathLike) -> Path:
    """PIL writes the array's pixels as they are (no resampling, unlike a matplotlib figure)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path
