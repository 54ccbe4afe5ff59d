"""Images as byte sequences: the token format image models read and write.

Serialisation: an image [H, W, C] becomes H*W*C tokens in raster order with
the channels of a pixel interleaved (R, G, B of pixel 0, then pixel 1, ...),
so token p is channel p % C of pixel p // C, at row pixel // W and column
pixel % W. A model reads a start-of-image token ``SOS`` before the bytes, so
its vocabulary is ``IMAGE_VOCAB`` = 257. Datasets store the bytes as uint16
tokens (``TOKEN_DTYPE``) and one int16 label per image (``LABEL_DTYPE``).
"""

from __future__ import annotations

import numpy as np

VOCAB_SIZE = 256
# Models read a start-of-image token before the bytes: their vocabulary is the bytes plus SOS.
SOS = VOCAB_SIZE
IMAGE_VOCAB = VOCAB_SIZE + 1
TOKEN_DTYPE = np.dtype(np.uint16)  # the store's dtype for vocabularies <= 65536
LABEL_DTYPE = np.dtype(np.int16)


def to_sequence(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N, H*W*C]: raster order, channels interleaved per pixel."""
    images = np.asarray(images)
    return images.reshape(images.shape[0], -1)


def from_sequence(seq: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """Token rows (or one flat stream of whole images) -> [N, H, W, C]; inverse of `to_sequence`."""
    seq = np.asarray(seq)
    if seq.size % (height * width * channels):
        raise ValueError(f"{seq.size} tokens are not a whole number of {height}x{width}x{channels} images")
    return seq.reshape(-1, height, width, channels)


def position_triples(positions, height: int, width: int, channels: int):
    """(row, column, channel) of each token position (an int T means positions 0..T-1).

    Positions past one image wrap to the next image. Only ``%`` and ``//`` are
    used, so numpy arrays and torch tensors both work.
    """
    p = np.arange(positions) if isinstance(positions, int) else positions
    pixel = p // channels
    return (pixel // width) % height, pixel % width, p % channels
