"""Extending a run: ``attnlab train --resume RUN train.max_steps=N`` (or ``train.epochs``, ``train.time_budget_s``).

Only the stopping rule changes. The new value is written into the run's config.yaml (and identity.json
re-recorded), each extension is appended to ``extensions.json`` with the schedule's ``Continuation``, and the
lr schedule goes on as ``optim.lr_factor`` defines: ``wsd`` follows the new total (stable, then its decay over
the last ``decay_frac`` of the new total), ``cosine``/``linear`` continue from the factor reached down to
``min_lr_frac`` at the new end, ``constant`` stays constant. A resume reads the continuation back, so an
extended run resumes exactly like any other.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .. import config as config_mod
from ..config import Config
from ..errors import CheckpointError, ConfigError
from ..training.optim import Continuation, build_scheduler
from . import identity

EXTENSIONS = "extensions.json"
STOPPING_KEYS = ("train.max_steps", "train.epochs", "train.time_budget_s")


def extended_config(saved: Config, overrides: list[str]) -> Config:
    """``saved`` with the stopping-rule ``overrides`` applied (a copy), validated."""
    cfg = copy.deepcopy(saved)
    for arg in overrides:
        config_mod.set_key(cfg, *config_mod.parse_override(arg))
    cfg.validate()
    return cfg


def changes(saved: Config, cfg: Config) -> dict[str, tuple]:
    """The stopping-rule keys whose value differs: {key: (old, new)}."""
    old, new = (config_mod.flatten(config_mod.to_dict(c)) for c in (saved, cfg))
    return {k: (old.get(k), new.get(k)) for k in STOPPING_KEYS if old.get(k) != new.get(k)}


def read(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / EXTENSIONS
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise ValueError("not a list")
        return entries
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({type(e).__name__}): the record of the run's extensions is damaged; "
            "start a new run from its config.yaml (name=...)"
        ) from None


def continuation(run_dir: Path) -> Continuation | None:
    """The schedule's continuation after the run's latest extension (None: the schedule as configured)."""
    entries = read(run_dir)
    c = entries[-1].get("continuation") if entries else None
    return Continuation(int(c["step"]), float(c["factor"]), float(c["start"])) if c else None


def apply(trainer, saved: Config) -> dict | None:
    """Extend the restored ``trainer`` (built with the extended config) beyond ``saved``'s stopping rule: refuse a
    rule that ends before the work already done, record the extension, re-plan the schedule from the current
    step. Returns the ``run_extended`` event's fields (None: nothing changed)."""
    changed = changes(saved, trainer.cfg)
    if not changed:
        return None
    _check_not_shrinking(trainer, changed)
    step, cfg = trainer.progress.step, trainer.cfg
    after = None
    if cfg.optim.schedule in ("cosine", "linear") and step >= cfg.optim.warmup_steps:
        group = trainer.optimizer.param_groups[0]
        after = Continuation(step, group["lr"] / group["initial_lr"], trainer.clock.fraction(step))
    if trainer.dist.is_main:
        _record(trainer.run_dir, changed, step, after)
    _replan(trainer, after)
    return {
        "step": step,
        "old": {k: v[0] for k, v in changed.items()},
        "new": {k: v[1] for k, v in changed.items()},
        "planned_steps": trainer.clock.total_steps,
        "schedule": cfg.optim.schedule,
        "continuation": vars(after) if after else None,
    }


def _check_not_shrinking(trainer, changed: dict[str, tuple]) -> None:
    p, t = trainer.progress, trainer.cfg.train
    given = " ".join(f"{k}={v[1]}" for k, v in changed.items())
    if trainer.total_steps < p.step:
        raise ConfigError(
            f"--resume {trainer.run_dir} with {given}: that stops at step {trainer.total_steps}, but the run has "
            f"done {p.step} steps already; give a larger value (a run is extended, never shortened)"
        )
    if t.time_budget_s is not None and t.time_budget_s < p.train_seconds:
        raise ConfigError(
            f"--resume {trainer.run_dir} with {given}: the run has trained {p.train_seconds:.1f} s already; "
            "give a larger train.time_budget_s (a run is extended, never shortened)"
        )


def _record(run_dir: Path, changed: dict[str, tuple], step: int, after: Continuation | None) -> None:
    """extensions.json first (what a resume re-plans from), then config.yaml and its hash in identity.json."""
    from ..training.checkpoint import atomic_write_text  # late import, as identity does

    entries = read(run_dir) + [
        {
            "step": step,
            "changed": {k: list(v) for k, v in changed.items()},
            "continuation": vars(after) if after else None,
        }
    ]
    atomic_write_text(Path(run_dir) / EXTENSIONS, json.dumps(entries, indent=2) + "\n")
    path = Path(run_dir) / "config.yaml"
    raw = config_mod.load(path)  # the file as written (not the run's layout copy the loaded config reads)
    for key, (_, new) in changed.items():
        config_mod.set_key(raw, key, new)
    atomic_write_text(path, config_mod.dump(raw))
    identity.record_config(run_dir)


def _replan(trainer, after: Continuation | None) -> None:
    """A scheduler for the new stopping rule at the restored step, the optimizer's lrs set to its factor there."""
    state = trainer.scheduler.state_dict()
    cfg = trainer.cfg
    scheduler = build_scheduler(trainer.optimizer, cfg.optim, trainer.total_steps, trainer.clock, after)
    scheduler.load_state_dict(state)
    factor = scheduler.lr_lambdas[0](trainer.progress.step)
    for group, base in zip(trainer.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]
    trainer.scheduler = scheduler
