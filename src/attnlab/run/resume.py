"""What ``--resume`` accepts: no overrides beyond ``RESUME_OVERRIDES``, a config equal to the run's (in the form
the run saved it), and ``--auto-resume``'s choice between starting and continuing a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import config as config_mod
from ..config import Config
from ..errors import CheckpointError, ConfigError, UserError
from ..training import checkpoint as ckpt
from . import identity
from .open import load_run_config

# Overrides `attnlab train --resume RUN key=value` accepts: the stopping rule, which extends the run
# (run/extend.py); anything else would change what the run is.
RESUME_OVERRIDES: frozenset[str] = frozenset({"train.max_steps", "train.epochs", "train.time_budget_s"})


def check_resume_overrides(run_dir: Path, overrides: list[str]) -> None:
    """``--resume`` continues a run as configured (its stopping rule may grow): refuse overrides outside
    ``RESUME_OVERRIDES``, naming the first that would change the run (else the first given)."""
    refused = [arg for arg in overrides if arg.split("=", 1)[0].strip() not in RESUME_OVERRIDES]
    if not refused:
        return
    arg = next((a for a in refused if _changes(run_dir, a)), refused[0])
    key = arg.split("=", 1)[0].strip()
    raise ConfigError(
        f"--resume takes no overrides ({_short(arg)} given) except the stopping rule (train.max_steps, train.epochs, "
        f"train.time_budget_s); to change {key}, start a new run from {run_dir / 'config.yaml'} with name=..."
    )


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
    return text if len(text) <= n else text[: n - 3] + "..."


def _as_saved(run_dir: Path, saved: Config, cfg: Config) -> Config:
    """A config given on resume in the form the run saved it (a copy): where the data is and which copy of the
    block layout is read are not what the run is."""
    data = dataclasses.replace(cfg.data, dir=saved.data.dir)
    attention = cfg.attention
    if attention.layout != saved.attention.layout and identity.layout_overrides(run_dir):  # the run reads its copy
        if not identity.same_layout(run_dir, attention.layout):
            raise CheckpointError(
                f"--resume {run_dir} with attention.layout={attention.layout}: its content differs "
                f"from the run's copy {saved.attention.layout}: resume without config/overrides, or "
                "start a new run with another name"
            )
        attention = dataclasses.replace(attention, layout=saved.attention.layout)
    return dataclasses.replace(cfg, data=data, attention=attention)


def check_resume_config(run_dir: Path, cfg: Config | None) -> Config:
    saved = load_run_config(run_dir)
    if cfg is not None:
        cfg = _as_saved(run_dir, saved, cfg)
        if not cfg.model.image_shape and saved.model.image_shape:  # older runs saved the shape taken from the dataset
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_shape=saved.model.image_shape))
        changed = config_mod.diff(saved, cfg)
        if changed:
            flat_s, flat_c = (config_mod.flatten(config_mod.to_dict(c)) for c in (saved, cfg))
            k = changed[0]
            raise CheckpointError(
                f"--resume {run_dir} with a changed config ({k}: {flat_s.get(k)!r} -> {flat_c.get(k)!r}"
                f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}): "
                f"resume without config/overrides, or start a new run with another name"
            )
    return saved


def auto_resume_target(cfg: Config) -> tuple[Path | None, bool]:
    """``--auto-resume``: (run directory to resume or None, whether a fresh start may replace the folder).

    out_dir/name with a complete checkpoint is resumed (its config must match);
    with the same config.yaml but no complete checkpoint (it died before its
    first save) it is started again in place; otherwise a new run starts.
    """
    run_dir = Path(cfg.out_dir) / cfg.name
    if ckpt.latest_checkpoint(run_dir) is not None:
        return run_dir, False
    if (run_dir / "config.yaml").exists():
        check_resume_config(run_dir, cfg)  # refuses a different run of the same name
        return None, True
    return None, False
