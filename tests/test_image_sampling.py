"""Image sampling with the SOS convention (samples, completions, the sequence -> image mapping) and exact-pixel grids."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from attnlab.config import AttentionConfig, ModelConfig
from attnlab.errors import ConfigError
from attnlab.eval.generation.filters import SamplingConfig
from attnlab.eval.generation.image_samples import (
    IMAGE_VOCAB,
    MARKER,
    SOS,
    complete_images,
    completion_grid,
    image_grid,
    sample_images,
    save_completion_grid,
    save_grid,
)
from attnlab.eval.generation.loop import generate
from attnlab.model.gpt import GPT

SHAPE = (2, 2, 3)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(shape=SHAPE):
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=1, n_head=2, d_model=16, context=int(np.prod(shape)), position="image", image_shape=list(shape)
    )
    return GPT(cfg, AttentionConfig(), IMAGE_VOCAB)


class Forced(nn.Module):
    """A GPT (cache and all) whose next byte is fixed: 7 after SOS, then the previous byte + 1 (mod 256).

    Byte p of a sample is then 7 + p, which pins down where each sequence position lands in the image.
    ``sos_logit`` is added to SOS's logit, to check that SOS is never sampled however likely.
    """

    def __init__(self, gpt: GPT, sos_logit: float = 0.0):
        super().__init__()
        self.gpt, self.sos_logit = gpt, sos_logit
        self.vocab_size, self.context = gpt.vocab_size, gpt.context
        self.new_cache, self.can_stream = gpt.new_cache, gpt.can_stream

    def forward(self, idx, cache=None, last_only=False):
        logits = self.gpt(idx, cache=cache, last_only=last_only)
        last = idx[:, -logits.size(1) :]
        nxt = torch.where(last == SOS, 7, (last + 1) % 256)
        forced = torch.full_like(logits, -1e4).scatter(-1, nxt[..., None], 0.0)
        forced[..., SOS] += self.sos_logit
        return forced


def random_images(n, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ------------------------------------------------------------------ sampling


def test_samples_have_the_shape_never_sos_and_follow_the_seed():
    model = tiny()
    a = sample_images(model, 5, SHAPE, seed=1, batch_size=2, progress=False)
    assert a.shape == (5, *SHAPE) and a.dtype == np.uint8
    assert np.array_equal(a, sample_images(model, 5, SHAPE, seed=1, batch_size=2, progress=False))
    assert not np.array_equal(a, sample_images(model, 5, SHAPE, seed=2, batch_size=2, progress=False))
    first_batches = sample_images(model, 4, SHAPE, seed=1, batch_size=2, progress=False)
    assert np.array_equal(a[:4], first_batches)  # whole batches do not depend on n
    assert model.training  # generate restores the mode


def test_sos_is_never_sampled_even_when_it_is_the_likeliest_token():
    model = Forced(tiny(), sos_logit=2e4)  # SOS would win every greedy step and almost every draw
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0), SamplingConfig(top_k=2, repetition_penalty=1.3)):
        out = sample_images(model, 3, SHAPE, sampling=sampling, progress=False)
        assert np.array_equal(out, np.broadcast_to(np.arange(7, 19, dtype=np.uint8).reshape(SHAPE), out.shape))
    seq = generate(
        tiny(), torch.full((4, 1), SOS), 11, banned_ids=[SOS, 0, 5], generator=torch.Generator().manual_seed(0)
    )
    assert not np.isin(seq[:, 1:].numpy(), [SOS, 0, 5]).any()


def test_bytes_land_in_raster_order_with_channels_interleaved():
    shape = (2, 3, 2)
    out = sample_images(Forced(tiny(shape)), 2, shape, progress=False)
    for row, col, channel in np.ndindex(*shape):
        assert (out[:, row, col, channel] == 7 + (row * 3 + col) * 2 + channel).all()


def test_completion_keeps_the_top_rows_and_samples_the_rest():
    images = random_images(5, (3, 2, 3))
    model = tiny((3, 2, 3))
    out = complete_images(model, images, keep_rows=2, seed=3, batch_size=2, progress=False)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.array_equal(out[:, :2], images[:, :2]) and not np.array_equal(out[:, 2:], images[:, 2:])
    assert np.array_equal(out, complete_images(model, images, keep_rows=2, seed=3, batch_size=2, progress=False))
    forced = complete_images(Forced(model), images, progress=False)  # default keep_rows = 3 // 2 = 1
    assert np.array_equal(forced[:, :1], images[:, :1])
    tail = (images[:, 0, -1, -1].astype(int)[:, None] + 1 + np.arange(12)) % 256  # goes on from the last kept byte
    assert np.array_equal(forced[:, 1:].reshape(5, -1), tail)
    assert np.array_equal(complete_images(model, images, keep_rows=3, progress=False), images)


def test_models_and_arguments_that_break_the_convention_are_refused():
    text_model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, context=12), AttentionConfig(), 256)
    with pytest.raises(ConfigError, match="vocabulary 256"):
        sample_images(text_model, 1, SHAPE, progress=False)
    with pytest.raises(ConfigError, match="context 12"):
        sample_images(tiny(), 1, (4, 4, 1), progress=False)
    with pytest.raises(ValueError, match="keep_rows=3"):
        complete_images(tiny(), random_images(1), keep_rows=3, progress=False)


# ------------------------------------------------------------------ grids


@pytest.mark.parametrize(
    "n, ncol, scale, pad, channels",
    [(1, None, 1, 1, 3), (5, None, 2, 1, 1), (5, 2, 3, 0, 3), (7, 7, 1, 2, 1), (3, 5, 4, 3, 3), (16, 4, 8, 1, 1)],
)
def test_grid_has_the_exact_pixel_size(n, ncol, scale, pad, channels):
    h, w = 3, 5
    grid = image_grid(random_images(n, (h, w, channels)), ncol=ncol, scale=scale, pad=pad)
    cols = ncol or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    assert grid.shape == (rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, 3) and grid.dtype == np.uint8


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_places_image_i_at_its_row_and_column(channels):
    images, scale, pad, ncol = random_images(5, (2, 3, channels)), 2, 1, 3
    grid = image_grid(images, ncol=ncol, scale=scale, pad=pad, pad_value=200)
    for i, image in enumerate(images):
        top, left = pad + (i // ncol) * (2 * scale + pad), pad + (i % ncol) * (3 * scale + pad)
        cell = grid[top : top + 2 * scale, left : left + 3 * scale]
        zoomed = np.broadcast_to(image.repeat(scale, 0).repeat(scale, 1), cell.shape)
        assert np.array_equal(cell, zoomed)
    assert (grid[0] == 200).all() and (grid[:, 0] == 200).all()  # padding
    assert (grid[pad + 2 * scale + pad :, pad + 2 * (3 * scale + pad) :] == 200).all()  # the empty sixth cell


def test_completion_grid_pairs_each_original_with_its_completion_and_marks_the_cut():
    originals, completions = random_images(2, (4, 3, 3), seed=1), random_images(2, (4, 3, 3), seed=2)
    grid = completion_grid(originals, completions, keep_rows=1, scale=2, pad=1)
    expected = image_grid(np.stack([originals, completions], 1).reshape(4, 4, 3, 3), ncol=2, scale=2, pad=1)
    ticks = [1 + row * 9 + 2 for row in range(2)]  # pad + row * (H*scale + pad) + keep_rows*scale
    expected[np.ix_(ticks, [0, 7, 14])] = MARKER  # the padding left of, between and right of each pair
    assert np.array_equal(grid, expected)
    assert np.array_equal(
        completion_grid(originals, completions, keep_rows=0, scale=2, pad=1),
        image_grid(np.stack([originals, completions], 1).reshape(4, 4, 3, 3), ncol=2, scale=2, pad=1),
    )  # nothing kept: no ticks


def test_saved_pngs_round_trip_exactly(tmp_path):
    images = random_images(3, (8, 8, 1))
    path = save_grid(images, tmp_path / "sub" / "grid.png", ncol=2)
    assert path.exists() and np.array_equal(np.asarray(Image.open(path)), image_grid(images, ncol=2, scale=8))
    path = save_completion_grid(images, images[::-1], tmp_path / "completion.png")
    assert np.array_equal(np.asarray(Image.open(path)), completion_grid(images, images[::-1], scale=8))
