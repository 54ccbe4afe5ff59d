"""Sweeps: one preset trained over a grid or a random sample of config values.

A sweep file (YAML, close to wandb's sweep format) names a base preset, fixed
overrides and the swept ``parameters``. ``load_sweep`` reads and validates it,
``expand`` turns it into one ``RunSpec`` per run (every run's config validated
before anything runs), ``run_sweep`` trains the runs as ``attnlab train``
subprocesses, N at a time, into ``<out_dir>/<name>/<run name>`` and builds one
report, and ``to_wandb`` writes the same sweep for ``wandb sweep``.

A parameter's values are config values, or *bundles*: mappings of several
config keys that vary together (``{attention.pattern: local, attention.window:
64}``), each with a short label used in run names and as wandb's value.
"""

from .runner import SweepRunsFailed, run_sweep, run_threads, train_command
from .spec import Param, RunSpec, Sweep, expand, load_sweep, run_name, sweep_from_dict
from .wandb_sweep import run_one, to_wandb, write_wandb

__all__ = [
    "Param",
    "RunSpec",
    "Sweep",
    "SweepRunsFailed",
    "expand",
    "load_sweep",
    "run_name",
    "run_one",
    "run_sweep",
    "run_threads",
    "sweep_from_dict",
    "to_wandb",
    "train_command",
    "write_wandb",
]
