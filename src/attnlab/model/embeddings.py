"""Positional encodings: learned, sinusoidal (added to the token embeddings) and rotary (applied to q, k).

Every encoding is queried for ``T`` positions starting at ``offset`` (or for an
explicit ``positions`` tensor, none of them past ``offset + T - 1``: positions
counted from each document's start), so a KV cache can ask for positions past
the prompt. Whether they fit the cached table is decided from ``offset + T``,
never from the positions' values: reading those would sync the device and
break a compiled graph at every forward. Past the table, only the positions
asked for are computed. The token embedding itself is a plain ``nn.Embedding``
in the model.
"""

from __future__ import annotations

import torch
from torch import nn


class LearnedPositionalEmbedding(nn.Embedding):
    """A trained vector per position, up to ``context`` positions."""

    def __init__(self, context: int, d_model: int):
        super().__init__(context, d_model)

    def forward(self, T: int, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[T, d_model] (or positions.shape + [d_model]) to add to the token embeddings."""
        if positions is not None:
            return super().forward(positions)
        return self.weight[offset : offset + T]  # a slice: no index tensor, cheaper than an embedding lookup


def _angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """positions.shape + [ceil(dim/2)] angles p * base^(-2i/dim), computed in float64 (on the CPU where the
    device has no float64, as MPS)."""
    device = positions.device if positions.device.type != "mps" else torch.device("cpu")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return positions.to(device, torch.float64).unsqueeze(-1) * inv_freq


def sinusoidal_encoding(positions: torch.Tensor, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)).
    positions.shape + [d_model], fp32, on the positions' device."""
    angles = _angles(positions, d_model, base)
    out = angles.new_zeros(*positions.shape, d_model)
    out[..., 0::2] = torch.sin(angles)
    out[..., 1::2] = torch.cos(angles[..., : d_model // 2])  # an odd d_model has one more sin than cos column
    return out.to(positions.device, torch.float32)


def sinusoidal_table(n_pos: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """``sinusoidal_encoding`` of positions 0 .. n_pos - 1: [n_pos, d_model]."""
    return sinusoidal_encoding(torch.arange(n_pos), d_model, base)


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal encodings (no parameters; the table is a non-persistent buffer)."""

    def __init__(self, context: int, d_model: int, base: float = 10000.0):
        super().__init__()
        self.base = base
        self.register_buffer("table", sinusoidal_table(context, d_model, base), persistent=False)

    def forward(self, T: int, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        if offset + T > self.table.shape[0]:  # may be past the table (e.g. generation beyond context)
            if positions is None:
                positions = torch.arange(offset, offset + T, device=self.table.device)
            return sinusoidal_encoding(positions, self.table.shape[1], self.base)
        return self.table[positions] if positions is not None else self.table[offset : offset + T]


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, Su et al.), in the half-split (GPT-NeoX) layout.

    Channel i of the first half and channel i of the second half of each head
    form a pair rotated by angle p * base^(-2i/Dh), so q.k depends only on the
    relative position. cos/sin are cached for ``context`` positions as
    non-persistent buffers (they are a function of the config, not state).
    """

    def __init__(self, head_dim: int, context: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        cos, sin = self._cos_sin(torch.arange(context))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = _angles(positions, self.head_dim, self.base)
        cos, sin = torch.cos(angles), torch.sin(angles)
        return cos.to(positions.device, torch.float32), sin.to(positions.device, torch.float32)

    def forward(
        self, T: int, offset: int = 0, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [T, head_dim/2] (or positions.shape + [head_dim/2]), for ``apply_rotary``."""
        if offset + T > self.cos.shape[0]:  # may be past the cache (e.g. generation beyond context)
            if positions is None:
                positions = torch.arange(offset, offset + T, device=self.cos.device)
            return self._cos_sin(positions)
        if positions is not None:
            return self.cos[positions], self.sin[positions]
        return self.cos[offset : offset + T], self.sin[offset : offset + T]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, Dh] by (cos, sin) [T, Dh/2] (or [B, T, Dh/2]: positions per row); keeps x's dtype
    (cos/sin are cast, not x)."""
    if cos.dim() == 3:  # one row of positions per sequence: broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def image_coordinates(positions: torch.Tensor, height: int, width: int, channels: int) -> tuple[torch.Tensor, ...]:
    """(row, column, channel) of each byte of raster-order, channel-interleaved images; wraps every H*W*C bytes."""
    pixel = positions // channels
    return (pixel // width) % height, pixel % width, positions % channels


class ImageEmbedding(nn.Module):
    """The Sparse Transformer's data embeddings: learned row, column and channel vectors, summed per byte.

    Byte p of an image serialised in raster order with channels interleaved is
    channel p mod C of pixel p div C; ``absolute`` adds a learned per-position
    table as well (``model.position=image+learned``).
    """

    def __init__(self, shape: list[int], d_model: int, context: int, absolute: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        height, width, channels = self.shape
        self.row, self.col, self.channel = (nn.Embedding(n, d_model) for n in (height, width, channels))
        self.absolute = LearnedPositionalEmbedding(context, d_model) if absolute else None

    def forward(self, T: int, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(offset, offset + T, device=self.row.weight.device)
        row, col, channel = image_coordinates(positions, *self.shape)
        out = self.row(row) + self.col(col) + self.channel(channel)
        return out if self.absolute is None else out + self.absolute(T, positions=positions)


def build_positional(
    position: str, context: int, d_model: int, rope_dim: int, image_shape: list[int] | None = None
) -> nn.Module | None:
    """The positional module for ``ModelConfig.position`` (None for ``none``); RoPE rotates ``rope_dim``-wide q/k heads."""
    if position in ("image", "image+learned"):
        return ImageEmbedding(image_shape, d_model, context, absolute=position == "image+learned")
    if position == "learned":
        return LearnedPositionalEmbedding(context, d_model)
    if position == "sinusoidal":
        return SinusoidalPositionalEmbedding(context, d_model)
    if position == "rope":
        return Rotary(rope_dim, context)
    if position in ("none", "alibi"):  # alibi positions live in the attention scores (a score modifier)
        return None
    raise ValueError(f"unknown position encoding {position!r}")


__all__ = [
    "LearnedPositionalEmbedding",
    "SinusoidalPositionalEmbedding",
    "Rotary",
    "apply_rotary",
    "sinusoidal_table",
    "ImageEmbedding",
    "image_coordinates",
    "build_positional",
]
