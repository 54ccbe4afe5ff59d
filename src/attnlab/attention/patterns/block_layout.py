"""``block_layout``: a user's boolean block layout [H or 1, nb, nb], causal inside diagonal blocks.

a [3, 3] layout of 2-token blocks (eye(3) | first column), N=6
x.....
xx....
xxx...
xxxx..
xx..x.
xx..xx
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ...errors import ConfigError
from .base import Component, HeadGroup, LayerContext, Pattern, param
from .registry import register_pattern


@register_pattern
@dataclass(frozen=True)
class BlockLayout(Pattern):
    """A user's boolean block layout [H or 1, nb, nb] of ``layout_block``-token blocks, causal inside diagonal blocks."""

    name: ClassVar[str] = "block_layout"
    cache: ClassVar[str] = "append"
    layout: str | None = param(None, help=".npy boolean block layout [nb, nb] or [n_head, nb, nb]")
    layout_block: int = param(64, lo=1, help="tokens per layout block")
    sha256: str = field(default="")
    # [H or 1, nb, nb]; the default, one block visible everywhere, is only a placeholder: create() loads the file
    blocks: torch.Tensor = field(
        default_factory=lambda: torch.ones(1, 1, 1, dtype=torch.bool), compare=False, repr=False
    )

    def __post_init__(self):
        if not self.sha256:  # identity (equality, hashing, plan caches) follows the layout's contents
            object.__setattr__(
                self,
                "sha256",
                hashlib.sha256(
                    self.blocks.cpu().numpy().tobytes() + str(tuple(self.blocks.shape)).encode()
                ).hexdigest(),
            )

    @classmethod
    def create(cls, params, layer: LayerContext):
        path = params.get("layout")
        blocks, sha = load_layout(path, layer.n_head)
        return cls(path, params.get("layout_block", 64), sha, blocks)

    def check(self, context):
        covered = self.blocks.shape[-1] * self.layout_block
        if covered < context:
            raise ConfigError(
                f"attention.layout covers {self.blocks.shape[-1]} blocks x layout_block={self.layout_block} = "
                f"{covered} tokens, less than model.context={context}: use a larger layout or layout_block"
            )

    @property
    def path(self) -> str | None:
        return self.layout

    @property
    def block(self) -> int:
        return self.layout_block

    def rule(self, q_idx, k_idx, head):
        blocks = self.blocks.to(q_idx.device)
        last = blocks.shape[-1] - 1  # check() guarantees the layout covers the context
        h = head % blocks.shape[0]
        return blocks[h, (q_idx // self.block).clamp(max=last), (k_idx // self.block).clamp(max=last)]

    def params(self) -> dict:
        return {"path": self.layout, "block": self.block, "sha256": self.sha256, "shape": list(self.blocks.shape)}

    def head_groups(self, n_head):
        groups: dict[bytes, list[int]] = {}
        for h in range(n_head):
            groups.setdefault(self.blocks[h % self.blocks.shape[0]].cpu().numpy().tobytes(), []).append(h)

        def layout_for(h):
            # Prefix sums over the (causal part of the) layout answer "any layout block inside this
            # rectangle?" for kernel blocks of any size.
            lay = self.blocks[h % self.blocks.shape[0]].tril()
            sums = torch.nn.functional.pad(lay.int().cumsum(0).cumsum(1), (1, 0, 1, 0))
            last = lay.shape[0]

            def layout(qb, kb, block, T):
                q_lo, q_hi = (qb * block // self.block).clamp(max=last), ((qb + 1) * block - 1) // self.block + 1
                k_lo, k_hi = (kb * block // self.block).clamp(max=last), ((kb + 1) * block - 1) // self.block + 1
                q_hi, k_hi = q_hi.clamp(max=last), k_hi.clamp(max=last)
                count = sums[q_hi, k_hi] - sums[q_lo, k_hi] - sums[q_hi, k_lo] + sums[q_lo, k_lo]
                return (count > 0) & (kb <= qb)

            return layout

        return [HeadGroup(tuple(hs), (Component(layout_for(hs[0]), block=self.block),)) for hs in groups.values()]


def load_layout(path: str | None, n_head: int) -> tuple[torch.Tensor, str]:
    """A boolean block layout [H, nb, nb] (H = 1 or n_head) from a .npy file, without executing code."""
    if not path:
        raise ConfigError(
            "attention.pattern=block_layout needs attention.layout=FILE.npy (a boolean [nb, nb] or [n_head, nb, nb] array)"
        )
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"attention.layout={path!r} not found: pass a .npy file saved with numpy.save")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(
            f"attention.layout={path!r} is not a plain .npy array ({e}): save it with numpy.save(path, bool_array)"
        ) from None
    if not isinstance(arr, np.ndarray):  # np.load opens .npz (zip) archives as a lazy dict of arrays
        arr.close()
        raise ConfigError(
            f"attention.layout={path!r} is an .npz archive, not a .npy array: save one array with "
            "numpy.save(path, bool_array)"
        )
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[0] not in (1, n_head):
        raise ConfigError(
            f"attention.layout={path!r} has shape {arr.shape}: use [nb, nb] or [{n_head}, nb, nb] (one per head)"
        )
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ConfigError(f"attention.layout={path!r} holds values other than 0/1: use a boolean array")
    return torch.from_numpy(arr.astype(bool)), hashlib.sha256(p.read_bytes()).hexdigest()
