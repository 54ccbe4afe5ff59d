"""Deterministic, resumable training batches over a flat token array.

An epoch cuts the token array into non-overlapping windows of ``context + 1``
tokens (x = w[:-1], y = w[1:]) that start every ``context`` tokens from a
per-epoch random offset in [0, context), and visits them in a per-epoch random
order. Both come from a generator seeded by (seed, epoch), never from global
RNG state, so the batch sequence depends only on (tokens, batch_size, context,
seed) and the cursor (epoch, step), which ``state_dict`` saves as plain ints.

The number of windows per epoch is the same for every offset (the count at
the largest offset), so ``steps_per_epoch`` is a constant; the last incomplete
global batch is dropped. Under data parallelism every rank computes the same
global batch and takes its contiguous slice, so ranks see disjoint windows.

``order="sequential"`` is the mainrun challenge's walk instead: offset 0 and the
windows in token order, so global batch k of every epoch is the k-th run of
``batch_size`` consecutive windows.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, DataError


class BatchIterator:
    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        name: str = "train.bin",
        order: str = "shuffled",
    ):
        if batch_size < 1 or context < 1:
            raise ValueError(f"batch_size and context must be >= 1, got {batch_size}, {context}")
        if order not in ("shuffled", "sequential"):
            raise ValueError(f"order must be 'shuffled' or 'sequential', got {order!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} is not divisible by the {world_size} data-parallel processes: "
                f"use a multiple of {world_size}"
            )
        self.tokens = tokens  # kept as is (a memmap stays a memmap)
        self.batch_size, self.context, self.seed, self.order = batch_size, context, seed, order
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.windows_per_epoch = self._count_windows(len(tokens))
        self.steps_per_epoch = self.windows_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(self._too_small(name))
        self.epoch, self.step = 0, 0
        self._plan_epoch = None  # (epoch, offset, order) cache
        self._arange = np.arange(context + 1, dtype=np.int64)

    def _count_windows(self, n: int) -> int:
        if self.order == "sequential":  # offset 0 only: k*C + C + 1 <= n
            return max(n - 1, 0) // self.context
        # Windows that fit at every offset in [0, context): off + k*C + C + 1 <= n for off = C - 1.
        return max(n - self.context, 0) // self.context

    def _too_small(self, name: str) -> str:
        n, b, c = len(self.tokens), self.batch_size, self.context
        return (
            f"{name} has {n} tokens, fewer than one batch of {b} x ({c}+1) (needs {b * c + c}): "
            "lower train.batch_size or model.context, or use more data"
        )

    def _random_offset(self, rng: np.random.Generator) -> int:
        return int(rng.integers(0, self.context))

    def _read(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Fancy indexing reads only these windows from a memmap, not the whole file.
        w = np.asarray(self.tokens[starts[:, None] + self._arange], dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))

    # -------------------------------------------------------------- plan
    def _plan(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._plan_epoch is None or self._plan_epoch[0] != epoch:
            if self.order == "sequential":
                offset, order = 0, np.arange(self.windows_per_epoch)
            else:
                rng = np.random.default_rng([self.seed, epoch])
                offset, order = self._random_offset(rng), rng.permutation(self.windows_per_epoch)
            self._plan_epoch = (epoch, offset, order)
        return self._plan_epoch[1], self._plan_epoch[2]

    def window_starts(self, epoch: int, step: int) -> np.ndarray:
        """Token index of each window of this rank's slice of global batch `step` in `epoch`."""
        offset, order = self._plan(epoch)
        lo = step * self.batch_size + self.rank * self.local_batch
        return offset + order[lo : lo + self.local_batch].astype(np.int64) * self.context

    # -------------------------------------------------------------- iterate
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape [batch_size // world_size, context]; y is x shifted by one."""
        starts = self.window_starts(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return self._read(starts)

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch_float(self) -> float:
        """Epochs completed, as a fraction (2.5 = halfway through the third epoch)."""
        return self.epoch + self.step / self.steps_per_epoch

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The cursor plus what it is only valid for; plain ints (JSON and weights_only safe)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "context": self.context,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, d: dict) -> None:
        """Continue from a saved cursor; refuses one saved for different data or batch shape."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "context", "n_tokens"):
            if key in d and int(d[key]) != mine[key]:
                raise DataError(
                    f"the saved batch position is for {key}={d[key]}, but this run has {key}={mine[key]}: "
                    "resume with the same dataset, train.batch_size, model.context and train.seed"
                )
        epoch, step = int(d["epoch"]), int(d["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise DataError(
                f"the saved batch position (epoch {epoch}, step {step}) is outside an epoch of "
                f"{self.steps_per_epoch} steps: resume with the same data and batch settings"
            )
        self.epoch, self.step = epoch, step


class ImageBatches(BatchIterator):
    """One whole image per row, images in a seeded random order per epoch: x = [SOS, image[:-1]], y = image.

    ``context`` is the bytes per image; the start-of-image token ``sos`` gives the
    first byte something to be predicted from, so every byte of an image is a
    target exactly once and no image sees another.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        tokens_per_image: int,
        seed: int,
        sos: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        name: str = "train.bin",
        order: str = "shuffled",
    ):
        self.sos = sos
        super().__init__(tokens, batch_size, tokens_per_image, seed, rank, world_size, name=name, order=order)

    def _count_windows(self, n: int) -> int:
        return n // self.context

    def _too_small(self, name: str) -> str:
        return (
            f"{name} has {len(self.tokens) // self.context} images, fewer than one batch of {self.batch_size}: "
            "lower train.batch_size or use more images"
        )

    def _random_offset(self, rng: np.random.Generator) -> int:
        return 0  # images start at multiples of their size

    def _read(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.from_numpy(np.asarray(self.tokens[starts[:, None] + self._arange[:-1]], dtype=np.int64))
        x = torch.cat([torch.full_like(y[:, :1], self.sos), y[:, :-1]], dim=1)
        return x, y
