"""Open a finished (or running) run directory: its config, dataset and model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config
from .data import store
from .errors import CheckpointError
from .model.gpt import GPT
from .train import checkpoint as ckpt
from .train.memory import check_fits
from .train.runtime import pick_device
from .train.trainer import fit_model_to_data, load_run_config, open_run_dataset

EVAL_DATA_HINT = "--data-dir DIR"


@dataclass
class LoadedRun:
    dir: Path
    cfg: Config
    dataset: store.Dataset
    model: GPT
    checkpoint: Path
    device: torch.device


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "auto",
             data_dir: str | Path | None = None) -> LoadedRun:
    """A run's config, its own dataset (never prepared here; ``data_dir`` points at a copy) and a checkpoint's model.

    The config, dataset and block layout must be the ones the run recorded (identity.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist: pass a folder created by `attnlab train` (see runs/)")
    cfg = load_run_config(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet: wait for the first checkpoint or resume the run")
    dataset = open_run_dataset(run_dir, cfg.data, data_dir=data_dir, rebuild=False, hint=EVAL_DATA_HINT, progress=False)
    dev = pick_device(device)
    vocab, model_cfg = fit_model_to_data(cfg, dataset)
    check_fits(cfg, vocab, dev, training=False, batch_size=cfg.train.eval_batch_size, model_cfg=model_cfg)
    model = GPT(model_cfg, cfg.attention, vocab)
    ckpt.load_checkpoint(path, model)
    model.to(dev).eval().resolve_backends(dev)
    return LoadedRun(run_dir, cfg, dataset, model, path, dev)
