"""Seeds and significance for the run comparison report.

Runs whose resolved configs differ only in ``name``, ``out_dir``,
``train.seed``, ``train.checkpoint_every`` or ``logging.*`` are seeds of one config and form a group.
A group is labelled by the config keys that differ between groups
(``attention.pattern=local``). For groups with at least two finished seeds the
report gives mean ± sample standard deviation (n - 1) of the final metric, and
between every two such groups (same metric) Welch's t-test.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np

from ... import config as config_mod
from .run_data import RunData

# ... and every logging.* key; how often a run checkpoints never changes what it computes (exact resume)
SEED_KEYS = ("name", "out_dir", "train.seed", "train.checkpoint_every")
ALPHA = 0.05
MAX_LABEL = 60  # longer labels are shown as "config N" outside the seeds table


def _ignored(key: str) -> bool:
    return key in SEED_KEYS or key.startswith("logging.")


def config_identity(run: RunData) -> dict:
    """The flattened config without the keys that only distinguish seeds."""
    return {k: v for k, v in config_mod.flatten(config_mod.to_dict(run.cfg)).items() if not _ignored(k)}


@dataclass
class Group:
    label: str  # every differing key=value
    runs: list[RunData]
    short: str = ""  # for legends and sentences: the label, or "config N" when the label is long

    def __post_init__(self):
        self.short = self.short or self.label

    @property
    def metric(self) -> str:
        return self.runs[0].metric

    @property
    def values(self) -> list[float]:
        """Final full-split metrics of the finished runs."""
        return [r.final_value for r in self.runs if r.final_value is not None]


@dataclass
class Stats:
    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof=1); None for one value


@dataclass
class Comparison:
    a: Group
    b: Group
    diff: float  # mean(a) - mean(b)
    t: float
    p: float  # NaN when both groups have zero variance


def _format_value(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) if v else "[]"
    return str(v)


def differing_keys(runs: list[RunData]) -> list[str]:
    """Config keys (seed keys excluded) whose values are not the same in every run, via config.diff."""
    keys: set[str] = set()
    for r in runs[1:]:
        keys.update(k for k in config_mod.diff(runs[0].cfg, r.cfg) if not _ignored(k))
    return sorted(keys)


def attention_label(run: RunData, *, short: bool = False) -> str:
    """The pattern layer 0 builds, with the parameters it uses (``local(window=64)``): the attention.*
    keys a pattern ignores (a dense run's window) do not make configs look different. ``short`` also
    leaves out parameters at their declared defaults."""
    from ..inspection.pattern_viz import format_params, pattern_from_overrides

    cfg = run.cfg
    attn = {f"attention.{k}": v for k, v in config_mod.to_dict(cfg)["attention"].items()}
    pattern = pattern_from_overrides(attn, cfg.model.n_head, 0, cfg.model.n_layer)
    declared = pattern.parameters()
    values = {
        k: v
        for k, v in pattern.params().items()
        if k != "n_head" and not (short and k in declared and v == declared[k].default)
    }
    params = format_params(values).replace(";", ", ")
    return f"{pattern.name}({params})" if params else pattern.name


_ATTENTION_FIELDS = {f.name for f in dataclasses.fields(config_mod.AttentionConfig)}


def _in_pattern_label(key: str) -> bool:
    """attention.pattern and the flat pattern parameters, which ``attention_label`` summarises; the other
    attention fields (schedule, layers, modifiers, document_mask, ...) are listed as they are."""
    name = key.removeprefix("attention.")
    return key.startswith("attention.") and (name == "pattern" or name not in _ATTENTION_FIELDS)


def _label(run: RunData, keys: list[str], *, short: bool = False, raw: bool = False) -> str:
    flat = config_identity(run)
    summarised = not raw and any(_in_pattern_label(k) for k in keys)
    parts = [f"{k}={_format_value(flat.get(k))}" for k in keys if not (summarised and _in_pattern_label(k))]
    if summarised:
        parts.insert(0, f"attention={attention_label(run, short=short)}")
    return ", ".join(parts) or "one config"


def group_runs(runs: list[RunData]) -> list[Group]:
    """Seed groups in order of first appearance, each labelled by the keys that differ between groups."""
    buckets: dict[str, list[RunData]] = {}
    for r in runs:
        buckets.setdefault(json.dumps(config_identity(r), sort_keys=True, default=str), []).append(r)
    keys = differing_keys(runs)
    firsts = [members[0] for members in buckets.values()]
    # layer 0's pattern can look the same for configs whose other layers differ: then every key is spelled out
    raw = len({_label(r, keys) for r in firsts}) < len(firsts)
    groups = []
    for i, members in enumerate(buckets.values()):
        label, short = _label(members[0], keys, raw=raw), _label(members[0], keys, short=True, raw=raw)
        groups.append(Group(label, members, short if len(short) <= MAX_LABEL else f"config {i + 1}"))
    return groups


def stats(values: list[float]) -> Stats:
    a = np.asarray(values, dtype=float)
    return Stats(len(a), float(a.mean()), float(a.std(ddof=1)) if len(a) >= 2 else None)


def welch(a: Group, b: Group) -> Comparison:
    """Welch's t-test; when neither group has any spread, t and p are NaN (reported as untestable)."""
    from scipy import stats as sps

    diff = float(np.mean(a.values) - np.mean(b.values))
    if np.ptp(a.values) == 0 and np.ptp(b.values) == 0:  # scipy would give t = ±inf, p = 0
        return Comparison(a, b, diff, math.nan, math.nan)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical seeds: scipy warns, the numbers stand
        r = sps.ttest_ind(a.values, b.values, equal_var=False)
    return Comparison(a, b, diff, float(r.statistic), float(r.pvalue))


def comparisons(groups: list[Group]) -> list[Comparison]:
    """Welch's t-test between every two groups with >= 2 finished seeds that report the same metric."""
    testable = [g for g in groups if len(g.values) >= 2]
    return [welch(a, b) for a, b in itertools.combinations(testable, 2) if a.metric == b.metric]


def verdict(c: Comparison) -> str:
    if math.isnan(c.p):
        return "no significance test is possible (every seed of both configs gave the same value)"
    return f"significant at p<{ALPHA:g}" if c.p < ALPHA else f"not significant at p<{ALPHA:g}"


def seed_notes(groups: list[Group]) -> list[str]:
    """Plain sentences on what could not be tested, and why."""
    testable = [g for g in groups if len(g.values) >= 2]
    notes = []
    if not testable:
        notes.append(
            "Every config has a single finished seed: no significance test is possible "
            "(train each config with several train.seed values to compare them)."
        )
        return notes
    for g in groups:
        if len(g.values) < 2:
            notes.append(f"{g.short}: {len(g.values)} finished seed(s), so no significance test is possible for it.")
    if len(testable) == 1:
        notes.append("Only one config has several seeds: no significance test between configs is possible.")
    return notes
