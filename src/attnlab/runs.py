"""Opening a run directory (its config, dataset and model), and what ``--resume`` accepts.

Writing run directories (locks, ownership, creation) is ``folders``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_mod
from .errors import CheckpointError, ConfigError, UserError
from .folders import check_run_dir

if TYPE_CHECKING:
    import torch

    from .config import Config
    from .data.store import Dataset
    from .model.gpt import GPT

EVAL_DATA_HINT = "--data-dir DIR"

# Overrides `attnlab train --resume RUN key=value` accepts: a resumed run continues exactly as configured.
RESUME_OVERRIDES: frozenset[str] = frozenset()


def check_resume_overrides(run_dir: Path, overrides: list[str]) -> None:
    """``--resume`` continues a run exactly as configured: refuse overrides outside ``RESUME_OVERRIDES``,
    naming the first that would change the run (else the first given)."""
    refused = [arg for arg in overrides if arg.split("=", 1)[0].strip() not in RESUME_OVERRIDES]
    if not refused:
        return
    arg = next((a for a in refused if _changes(run_dir, a)), refused[0])
    key = arg.split("=", 1)[0].strip()
    raise ConfigError(f"--resume takes no overrides ({_short(arg)} given): a resumed run continues exactly as "
                      f"configured; to change {key}, start a new run from {run_dir / 'config.yaml'} with name=...")


def _changes(run_dir: Path, arg: str) -> bool:
    """Whether the override ``arg`` would change the run's saved config (unknown keys and bad values do)."""
    try:
        cfg = config_mod.load(Path(run_dir) / "config.yaml")
        before = config_mod.to_dict(cfg)
        config_mod.set_key(cfg, *config_mod.parse_override(arg))
        return config_mod.to_dict(cfg) != before
    except UserError:
        return True


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


# ------------------------------------------------------------------ opening a run

@dataclass
class LoadedRun:
    dir: Path
    cfg: Config
    dataset: Dataset
    model: GPT
    checkpoint: Path
    device: torch.device


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "auto",
             data_dir: str | Path | None = None) -> LoadedRun:
    """A run's config, its own dataset (never prepared here; ``data_dir`` points at a copy) and a checkpoint's model.

    The config, dataset and block layout must be the ones the run recorded (identity.json)."""
    from .model.gpt import GPT  # here: `import attnlab.runs` for the resume rules stays light
    from .training import checkpoint as ckpt
    from .training.memory import check_fits
    from .training.runtime import pick_device
    from .training.trainer import fit_model_to_data, load_run_config, open_run_dataset

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint yet: wait for the first checkpoint or resume the run")
    dataset = open_run_dataset(run_dir, cfg.data, data_dir=data_dir, rebuild=False, hint=EVAL_DATA_HINT, progress=False)
    dev = pick_device(device)
    vocab, model_cfg = fit_model_to_data(cfg, dataset)
    check_fits(cfg, vocab, dev, training=False, batch_size=cfg.train.eval_batch_size, model_cfg=model_cfg)
    model = GPT(model_cfg, cfg.attention, vocab)
    weights, _ = ckpt.load_checkpoint(path, model)
    ckpt.check_finite(path, weights)
    model.to(dev).eval().resolve_backends(dev)
    return LoadedRun(run_dir, cfg, dataset, model, path, dev)

