"""The same sweep for wandb agents: the sweep config, and the one run an agent trains (`attnlab sweep --one`)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from .. import config as config_mod
from ..errors import UserError
from .spec import Param, RunSpec, Sweep, override_text, run_config, run_name


def to_wandb(sweep: Sweep) -> dict:
    """The same sweep as a wandb sweep config. Each agent run calls ``attnlab sweep --one SWEEP key=value ...``,
    which names the run like a local sweep and expands bundle labels into their overrides."""
    if sweep.path is None:
        raise UserError("to_wandb needs a sweep loaded from a file (the wandb command names it): use load_sweep(path)")
    d = {
        "name": sweep.name,
        "method": sweep.method,
        "metric": {"name": f"validation/{sweep.metric}", "goal": "minimize"},
        "parameters": {p.key: _wandb_param(p) for p in sweep.parameters},
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "attnlab",
            "sweep",
            "--one",
            str(sweep.path),  # --one first: argparse
            "logging.wandb=online",
            "${args_no_hyphens}",
        ],
    }  # reads what follows as choices
    if sweep.method == "random":
        d["run_cap"] = sweep.count
    return d


def _wandb_param(p: Param) -> dict:
    if p.bundles:
        return {"values": list(p.labels)}
    if p.values:  # lists as a,b,c: wandb passes values with str(), attnlab reads a,b,c as a list
        return {"values": [override_text(v) if isinstance(v, list) or v is None else v for v in p.values]}
    return {"distribution": p.distribution, "min": p.min, "max": p.max}


def write_wandb(sweep: Sweep, out: str | Path, *, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists: choose another --to-wandb file or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(to_wandb(sweep), sort_keys=False), encoding="utf-8")
    return out


def run_one(sweep: Sweep, assignments: list[str], *, argv: list[str] | None = None) -> dict:
    """Train one run of the sweep in this process, from ``key=value`` choices (as a wandb agent passes them).

    Keys that are sweep parameters pick a value (a bundle by its label); any other key=value is an extra override.
    The run goes to <out_dir>/<sweep name>/<run name> (-2, -3, ... when that name is taken).
    """
    params = {p.key: p for p in sweep.parameters}
    choices, extra = {}, []
    for arg in assignments:
        key, text = config_mod.parse_override(arg)
        if key in params:
            choices[key] = _parse_choice(params[key], text)
        else:
            extra.append(arg)
    missing = [k for k in params if k not in choices]
    if missing:
        raise UserError(f"--one needs a value for every sweep parameter; missing {missing[0]}: pass {missing[0]}=VALUE")
    base_name = name = run_name(sweep, {k: choices[k] for k in params})
    i = 2
    while (sweep.folder / name).exists():  # a repeated choice (random search) gets its own run
        name, i = f"{base_name}-{i}", i + 1
    spec = RunSpec(name, choices, [o for p in sweep.parameters for o in p.overrides(choices[p.key])])
    cfg = run_config(sweep, spec, extra)
    from ..training.trainer import train

    return train(cfg, argv=argv or sys.argv)


def _parse_choice(p: Param, text: str):
    if p.bundles:
        if text not in p.labels:
            raise UserError(f"sweep parameter {p.key!r} has no bundle {text!r}: use one of {', '.join(p.labels)}")
        return text
    for v in p.values:  # the value as written in the sweep (keeps run names identical to a local sweep's)
        if override_text(v) == text or str(v) == text:
            return v
    return yaml.load(text, Loader=config_mod._Loader) if text else text
