"""``attnlab.train(config, **overrides)``: training from Python, as `attnlab train PRESET key=value ...` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from .trainer import train as run_training


def train(config: str | Path | config_mod.Config | None = None, *, force: bool = False, **overrides: Any) -> dict:
    """Train a run, as `attnlab train PRESET key=value ...` does; returns summary.json's content.

    ``config``: a YAML preset's path or a ``Config`` (not changed). ``overrides`` are config keys: top-level
    ones by name (``name="nb"``), a section as a dict (``train={"max_steps": 50}``), dotted keys through
    ``**`` (``**{"model.n_layer": 2}``). Values are Python values; each is checked as on the command line.
    """
    args = [f"{key}={_as_text(value)}" for key, value in config_mod.flatten(overrides).items()]
    if isinstance(config, config_mod.Config):
        cfg = config_mod.from_dict(config_mod.to_dict(config), args)
    else:
        cfg = config_mod.load(config, args)
    return run_training(cfg, force=force)


def _as_text(value: Any) -> str:
    """A Python value as the command line writes it (the config coerces it back to the field's type)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (dict, list, tuple)) for v in value):  # attention.layers: a YAML flow list
            return yaml.safe_dump(list(value), default_flow_style=True, width=1 << 30).strip()
        return ",".join(_as_text(v) for v in value) if value else "[]"
    return str(value)
