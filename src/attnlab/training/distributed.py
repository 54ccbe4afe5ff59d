"""Data-parallel training under torchrun: process group, DDP / FSDP2 wrapping, reductions, full state dicts.

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them (or
with ``WORLD_SIZE=1``) every helper here is a no-op, so a single-process run
takes exactly the code path it always took.

Under torchrun every rank builds the same model from the same seed, draws the
same global batch and trains on its contiguous rows of it; gradients are
averaged across ranks (DDP all-reduce, or FSDP2 reduce-scatter), which with
equal rows per rank is the gradient of the global mean loss. Checkpoints hold
the full, unsharded model and optimizer in the single-process format, so a
run can resume with any number of ranks and either wrapper.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = [
    "Dist",
    "from_env",
    "init",
    "shutdown",
    "barrier",
    "main_first",
    "wrap",
    "grad_sync",
    "agree",
    "all_reduce_sum",
    "check_config",
    "reseed_for_step",
    "full_state",
    "load_full_state",
    "is_fsdp",
]

TIMEOUT_ENV = "ATTNLAB_DIST_TIMEOUT_S"  # how long a rank waits for the others at a collective
DEFAULT_TIMEOUT_S = 1800
_owns_group = False  # whether init() created the default process group


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers: launch with torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world}): launch with torchrun")
    return Dist(rank, world, local)


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds: e.g. {TIMEOUT_ENV}=600") from None
    return timedelta(seconds=seconds)


def init(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if not d.enabled:
        return device
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"multi-process training runs on CPU or CUDA, not {device.type}: set train.device=cpu or cuda"
        )
    if device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={d.local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                f"use --nproc_per_node {torch.cuda.device_count()} or fewer"
            )
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        global _owns_group
        # A rank that dies makes torchrun stop the others; the timeout bounds a wait that nobody ends.
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=_attempt_store(d),
            rank=d.rank,
            world_size=d.world_size,
            timeout=_timeout(),
            device_id=device if device.type == "cuda" else None,
        )
        _owns_group = True
    return device


def _attempt_store(d: Dist) -> dist.Store:
    """torchrun's key-value store, with keys private to this attempt of the job.

    After a failure, ``torchrun --max-restarts`` starts new workers against the
    same store; without a per-attempt prefix they can read the dead workers'
    addresses and fail to connect.
    """
    store, _, _ = next(dist.rendezvous("env://", d.rank, d.world_size, timeout=_timeout()))
    return dist.PrefixStore(f"attnlab/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown(d: Dist) -> None:
    """Leave the process group if ``init`` created it (a caller's own group stays up for its next run)."""
    global _owns_group
    if d.enabled and _owns_group and dist.is_initialized():
        dist.destroy_process_group()
        _owns_group = False


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first(d: Dist):
    """Rank 0 runs the body first (e.g. prepares the dataset on disk), then the others do."""
    if not d.is_main:
        barrier(d)
    yield
    if d.is_main:
        barrier(d)


# ------------------------------------------------------------ wrapping


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_config(cfg, d: Dist) -> None:
    """Settings this many ranks cannot train, refused before joining the process group."""
    if not d.enabled:
        return
    if cfg.train.batch_size % d.world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {d.world_size} "
            f"data-parallel processes: use a multiple of {d.world_size}"
        )
    if cfg.train.parallel != "fsdp":
        return
    if cfg.optim.name == "muon":
        raise ConfigError(
            "optim.name=muon orthogonalises whole matrices, which FSDP shards across ranks: "
            "use train.parallel=ddp with muon (or another optimizer with fsdp)"
        )
    if cfg.train.dtype == "float16":
        raise ConfigError(
            "train.parallel=fsdp does not support train.dtype=float16 (its loss scaler is per rank): "
            "use train.dtype=bfloat16 or float32"
        )


def wrap(model: nn.Module, d: Dist, parallel: str, device: torch.device) -> nn.Module:
    """The module to call for training steps: ``model`` itself, DDP around it, or it sharded in place by FSDP2.

    Build the optimizer after this: FSDP2 replaces the parameters with sharded DTensors.
    """
    if not d.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (d.world_size,))
        for block in model.blocks:  # one all-gather per block; the root holds embeddings, final norm, lm_head
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ConfigError(f"train.parallel={parallel!r} is not allowed: use ddp or fsdp")


def grad_sync(wrapped: nn.Module, sync: bool):
    """Context for one micro-step: gradients are reduced across ranks only when ``sync`` (the last micro-step)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ------------------------------------------------------------ agreement between ranks


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(d: Dist, values: list[float]) -> list[float]:
    """Element-wise sums over ranks, in float64 (every rank receives the same numbers)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.tolist()


def agree(d: Dist, loss: float, seconds: float, stop: bool) -> tuple[float, float, bool]:
    """One reduction per step so every rank logs the global mean loss and takes the same decisions.

    The step time is the ranks' mean (time budgets stop all ranks at the same
    step); ``stop`` (an interrupt seen by any rank) becomes everyone's.
    """
    if not d.enabled:
        return loss, seconds, stop
    total, secs, stops = all_reduce_sum(d, [loss, seconds, float(stop)])
    return total / d.world_size, secs / d.world_size, stops > 0


def reseed_for_step(d: Dist, seed: int, step: int) -> None:
    """Under torchrun, each rank's dropout stream is reseeded from (seed, rank, step) at every step.

    Ranks then draw different masks, and a resumed run repeats the
    uninterrupted one exactly without saving every rank's generator.
    Single-process runs keep their one continuous stream.
    """
    if d.enabled:
        digest = hashlib.sha256(f"{seed}:{d.rank}:{step}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ------------------------------------------------------------ full (unsharded) state

_FULL = dict(full_state_dict=True, cpu_offload=True)


def _param_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, int], list[str]]:
    """Every name of each optimized parameter (tied ones have two) -> its index in ``optimizer.state_dict()``."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    names = [""] * len(index)
    by_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in index:
            by_name[name] = index[id(p)]
            names[index[id(p)]] = names[index[id(p)]] or name
    return by_name, names


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
    """(full weights or None, optimizer state dict in the single-process format) for a checkpoint.

    Unsharded models give (None, ``optimizer.state_dict()``): the checkpoint
    reads the module itself. FSDP2 gathers both on rank 0 (a collective: every
    rank calls it); other ranks receive empty dicts.
    """
    if not is_fsdp(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(**_FULL)
    weights = get_model_state_dict(model, options=options)
    named = get_optimizer_state_dict(model, optimizer, options=options)
    if not named:
        return weights, {}
    by_name, _ = _param_index(model, optimizer)
    indexed = {
        "state": {by_name[n]: s for n, s in named["state"].items()},
        "param_groups": [{**g, "params": [by_name[n] for n in g["params"]]} for g in named["param_groups"]],
    }
    return weights, indexed


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Load a checkpoint's full weights and optimizer state into an FSDP2 model (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    _, names = _param_index(model, optimizer)
    named = {
        "state": {names[int(i)]: s for i, s in optim_state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=options)
