"""A sweep file: its typed, validated form (Sweep, Param) and its expansion into runs (RunSpec)."""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from ..config import Config
from ..errors import ConfigError

METHODS = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform")
TOP_KEYS = ("name", "base", "overrides", "method", "count", "seed", "metric", "parameters", "parallel", "out_dir")
PARAM_KEYS = ("values", "labels", "distribution", "min", "max")
RESERVED = ("name", "out_dir")  # the sweep sets these for every run
NAME_MAX = 100


# ------------------------------------------------------------------ the sweep


@dataclass(frozen=True)
class Param:
    """One swept parameter: values (plain, or bundles of overrides with labels) or a distribution (random only)."""

    key: str
    values: tuple = ()
    labels: tuple[str, ...] = ()
    distribution: str | None = None
    min: float | None = None
    max: float | None = None

    @property
    def bundles(self) -> bool:
        return bool(self.values) and isinstance(self.values[0], dict)

    @property
    def choices(self) -> tuple:
        """What a run picks: a bundle's label, or a value."""
        return self.labels if self.bundles else self.values

    def config_keys(self) -> list[str]:
        return sorted({k for b in self.values for k in b}) if self.bundles else [self.key]

    def overrides(self, choice) -> list[str]:
        if self.bundles:
            return [f"{k}={override_text(v)}" for k, v in self.values[self.labels.index(choice)].items()]
        return [f"{self.key}={override_text(choice)}"]

    def sample(self, rng: random.Random):
        if self.choices:
            return rng.choice(self.choices)
        if self.distribution == "int_uniform":
            return rng.randint(int(self.min), int(self.max))
        if self.distribution == "log_uniform_values":
            v = math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
            return min(max(v, self.min), self.max)  # exp(log(x)) may round past a bound
        return rng.uniform(self.min, self.max)

    def to_dict(self) -> dict:
        if self.bundles:
            return {"values": [dict(b) for b in self.values], "labels": list(self.labels)}
        if self.values:
            return {"values": list(self.values)}
        return {"distribution": self.distribution, "min": self.min, "max": self.max}


@dataclass
class Sweep:
    name: str
    base: str
    parameters: list[Param]
    overrides: list[str] = field(default_factory=list)
    method: str = "grid"
    count: int | None = None
    seed: int | None = None
    metric: str = "val_bits_per_byte"
    parallel: int = 1
    out_dir: str = "runs/sweeps"
    path: Path | None = None  # the sweep file (the wandb command names it)
    base_config: Config | None = field(default=None, repr=False, compare=False)  # base + overrides, validated

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict:
        """The resolved sweep, as written to <folder>/sweep.yaml."""
        d = {"name": self.name, "base": self.base, "overrides": list(self.overrides), "method": self.method}
        if self.method == "random":
            d.update(count=self.count, seed=self.seed)
        d.update(
            metric=self.metric,
            parallel=self.parallel,
            out_dir=self.out_dir,
            parameters={p.key: p.to_dict() for p in self.parameters},
        )
        return d


@dataclass
class RunSpec:
    name: str
    choices: dict[str, Any]  # parameter key -> value (a bundle's label)
    overrides: list[str]  # the swept key=value overrides (after the sweep's fixed ones)
    config: Config | None = field(default=None, repr=False, compare=False)


# ------------------------------------------------------------------ loading and validation


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; ConfigError naming the key and the fix."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {str(p)!r} not found: pass a YAML file such as configs/sweeps/patterns.yaml")
    try:
        d = yaml.load(p.read_text(encoding="utf-8"), Loader=config_mod._Loader)  # YAML 1.2 booleans, as presets
    except yaml.YAMLError as e:
        raise ConfigError(
            f"sweep file {str(p)!r} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax"
        ) from None
    if not isinstance(d, dict):
        raise ConfigError(
            f"sweep file {str(p)!r} must hold a mapping (name, base, parameters, ...): see configs/sweeps/patterns.yaml"
        )
    return sweep_from_dict(d, path=p)


def sweep_from_dict(d: dict, *, path: Path | None = None) -> Sweep:
    """A validated Sweep from the mapping a sweep file holds (its base preset is loaded to check every key)."""
    for k in d:
        if k not in TOP_KEYS:
            close = difflib.get_close_matches(str(k), TOP_KEYS, n=1, cutoff=0.5)
            raise ConfigError(
                f"unknown sweep key {k!r}: "
                + (f"did you mean {close[0]}?" if close else "valid keys: " + ", ".join(TOP_KEYS))
            )
    for k in ("name", "base", "parameters"):
        if d.get(k) in (None, "", {}, []):
            raise ConfigError(f"sweep key {k!r} is missing: see configs/sweeps/patterns.yaml for a complete sweep")
    method = d.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(f"sweep method {method!r} is not supported: use grid or random")
    overrides = _fixed_overrides(d.get("overrides") or [])
    base_cfg = _load_base(d["base"], overrides)
    sweep = Sweep(
        name=_sweep_name(d["name"]),
        base=str(d["base"]),
        overrides=overrides,
        method=method,
        count=_count(d, method),
        seed=_seed(d, method),
        metric=_metric(d.get("metric", "val_bits_per_byte")),
        parallel=_int_at_least("parallel", d.get("parallel", 1), 1),
        out_dir=_text("out_dir", d.get("out_dir", "runs/sweeps")),
        path=path,
        base_config=base_cfg,
        parameters=[],
    )
    if not isinstance(d["parameters"], dict):
        raise ConfigError(
            "sweep key 'parameters' must map config keys to {values: [...]} or {distribution: ..., min: ..., max: ...}"
        )
    sweep.parameters = [_param(str(k), spec, method, base_cfg) for k, spec in d["parameters"].items()]
    _check_overlaps(sweep)
    return sweep


def _text(key: str, v) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"sweep key {key!r} must be a non-empty string, got {v!r}")
    return v


def _int_at_least(key: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"sweep key {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def _sweep_name(v) -> str:
    name = _text("name", str(v) if isinstance(v, (int, float)) else v)
    if _safe(name) != name:
        raise ConfigError(
            f"sweep name {name!r} is not a plain folder name: use letters, digits, '-', '_' or '.' (e.g. {_safe(name)!r})"
        )
    return name


def _count(d: dict, method: str) -> int | None:
    if method == "grid":
        if "count" in d:
            raise ConfigError(
                "sweep key 'count' applies to method: random (a grid runs every combination): remove it or use method: random"
            )
        return None
    if "count" not in d:
        raise ConfigError("method: random needs 'count', the number of runs to sample: add e.g. count: 8")
    return _int_at_least("count", d["count"], 1)


def _seed(d: dict, method: str) -> int | None:
    if method == "grid":
        if "seed" in d:
            raise ConfigError(
                "sweep key 'seed' seeds the random sampler: remove it for method: grid (sweep train.seed as a parameter instead)"
            )
        return None
    return _int_at_least("seed", d.get("seed", 0), 0)


def _metric(v) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"val_\w+", v):
        raise ConfigError(
            f"sweep metric {v!r} is not a validation metric: use a summary key such as val_bits_per_byte "
            "(text) or val_bits_per_dim (images)"
        )
    return v


def _fixed_overrides(v) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(
            f"sweep key 'overrides' must be a list of key=value strings, got {v!r}: write e.g. [train.max_steps=300]"
        )
    for arg in v:
        key, _ = config_mod.parse_override(arg)
        if key in RESERVED:
            raise ConfigError(
                f"sweep overrides set {key!r}, which the sweep sets for every run: "
                "remove it (runs go to <out_dir>/<sweep name>/<run name>)"
            )
    return list(v)


def _load_base(base, overrides: list[str]) -> Config:
    base = _text("base", base)
    if not Path(base).is_file():
        raise ConfigError(
            f"sweep base {base!r} not found (it is relative to the current directory): "
            "run from the project root or give the preset's absolute path"
        )
    try:
        return config_mod.load(base, overrides)
    except ConfigError as e:
        raise ConfigError(f"sweep base {base} with its overrides: {e}") from None


def _try_set(base_cfg: Config, where: str, key: str, value) -> None:
    """Check one config key and value on a copy of the base config."""
    if key in RESERVED:
        raise ConfigError(f"{where} sets {key!r}, which the sweep sets for every run: remove it")
    try:
        config_mod.set_key(copy.deepcopy(base_cfg), key, value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _param(key: str, spec, method: str, base_cfg: Config) -> Param:
    where = f"sweep parameter {key!r}"
    if isinstance(spec, list):
        spec = {"values": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where} must be {{values: [...]}} or {{distribution: ..., min: ..., max: ...}}, got {spec!r}"
        )
    for k in spec:
        if k not in PARAM_KEYS:
            raise ConfigError(
                f"{where} has an unknown key {k!r}: use values (with labels for bundles), or distribution, min and max"
            )
    if "values" in spec:
        return _values_param(key, spec, where, base_cfg)
    if method == "grid":
        raise ConfigError(
            f"{where}: method grid needs a list of values, not a distribution: give values: [...] or use method: random"
        )
    return _distribution_param(key, spec, where, base_cfg)


def _values_param(key: str, spec: dict, where: str, base_cfg: Config) -> Param:
    values = spec["values"]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: values must be a non-empty list")
    if any(k in spec for k in ("distribution", "min", "max")):
        raise ConfigError(f"{where} has both values and a distribution: keep one of them")
    texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
    if len(set(texts)) < len(texts):
        raise ConfigError(f"{where} lists a value twice: remove the repeat")
    if any(isinstance(v, dict) for v in values):
        return _bundle_param(key, spec, where, base_cfg)
    if "labels" in spec:
        raise ConfigError(f"{where}: labels name bundles of overrides (values that are mappings): remove labels")
    for v in values:
        _try_set(base_cfg, where, key, v)
    return Param(key, tuple(values))


def _bundle_param(key: str, spec: dict, where: str, base_cfg: Config) -> Param:
    values = spec["values"]  # an empty bundle ({}) is the base config itself: an ablation's control run
    if not all(isinstance(v, dict) for v in values):
        raise ConfigError(
            f"{where} mixes override bundles and plain values: make every value a mapping of config keys to values"
        )
    for bundle in values:
        for k, v in bundle.items():
            _try_set(base_cfg, where, str(k), v)
    labels = spec.get("labels") or _default_labels(values, where)
    if not isinstance(labels, list) or len(labels) != len(values):
        raise ConfigError(f"{where}: labels must be a list with one short name per bundle ({len(values)})")
    labels = [str(x) for x in labels]
    if any(_safe(x) != x for x in labels) or len(set(labels)) < len(labels):
        raise ConfigError(
            f"{where}: labels {labels} must be distinct plain names (letters, digits, '-', '_', '.', '+')"
        )
    return Param(key, tuple({str(k): v for k, v in b.items()} for b in values), tuple(labels))


def _default_labels(bundles: list[dict], where: str) -> list[str]:
    """Name bundles after the first key whose values tell them all apart (attention.pattern: dense, local, ...)."""
    keys = list(dict.fromkeys(k for b in bundles for k in b))
    for k in keys:
        names = [_safe(_name_text(b.get(k))) for b in bundles]
        if len(set(names)) == len(names):
            return names
    raise ConfigError(
        f"{where}: no single key tells its bundles apart: add labels: [...] with one short name per bundle"
    )


def _distribution_param(key: str, spec: dict, where: str, base_cfg: Config) -> Param:
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where} needs values: [...] or distribution: {' | '.join(DISTRIBUTIONS)} with min and max "
            f"(got distribution {dist!r})"
        )
    lo, hi = spec.get("min"), spec.get("max")
    for name, v in (("min", lo), ("max", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}: {name} must be a number, got {v!r}")
    if lo > hi:
        raise ConfigError(f"{where}: min {lo} > max {hi}: swap them")
    if dist == "log_uniform_values" and lo <= 0:
        raise ConfigError(
            f"{where}: log_uniform_values needs min > 0, got {lo}: use a positive lower bound or distribution: uniform"
        )
    if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}: int_uniform needs integer min and max, got {lo} and {hi}")
    for v in (lo, hi):
        _try_set(base_cfg, where, key, v)
    return Param(key, distribution=dist, min=lo, max=hi)


def _check_overlaps(sweep: Sweep) -> None:
    fixed = {config_mod.parse_override(a)[0] for a in sweep.overrides}
    seen: dict[str, str] = {}
    for p in sweep.parameters:
        for k in p.config_keys():
            if k in fixed:
                raise ConfigError(f"{k} is both a fixed override and swept by parameter {p.key!r}: keep one of them")
            if k in seen:
                raise ConfigError(f"{k} is swept by parameters {seen[k]!r} and {p.key!r}: keep it in one of them")
            seen[k] = p.key


# ------------------------------------------------------------------ expansion


def expand(sweep: Sweep) -> list[RunSpec]:
    """One RunSpec per run, named from its swept values; every run's config is validated here."""
    combos = _grid(sweep) if sweep.method == "grid" else _random(sweep)
    names = _unique_names([run_name(sweep, c) for c in combos])
    specs = [RunSpec(n, c, [o for p in sweep.parameters for o in p.overrides(c[p.key])]) for n, c in zip(names, combos)]
    for spec in specs:
        spec.config = run_config(sweep, spec)
    return specs


def _grid(sweep: Sweep) -> list[dict]:
    keys = [p.key for p in sweep.parameters]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(p.choices for p in sweep.parameters))]


def _random(sweep: Sweep) -> list[dict]:
    rng = random.Random(sweep.seed)
    return [{p.key: p.sample(rng) for p in sweep.parameters} for _ in range(sweep.count)]


def run_config(sweep: Sweep, spec: RunSpec, extra: list[str] = ()) -> Config:
    """What ``attnlab train BASE <fixed> <extra> <swept> name=... out_dir=...`` will load, validated.

    Starts from a copy of the loaded base (base + fixed overrides): parsing the YAML again for every run is slow.
    """
    try:
        cfg = copy.deepcopy(sweep.base_config) if sweep.base_config else config_mod.load(sweep.base, sweep.overrides)
        for arg in [*extra, *spec.overrides, f"name={spec.name}", f"out_dir={sweep.folder}"]:
            config_mod.set_key(cfg, *config_mod.parse_override(arg))
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"sweep run {spec.name!r} ({' '.join(spec.overrides)}): {e}") from None


def run_name(sweep: Sweep, choices: dict) -> str:
    """``pattern=local,seed=1``: the last part of each key (the whole key where two share it) and the value."""
    keys = [p.key for p in sweep.parameters]
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    return _safe(",".join(f"{short[k]}={_name_text(choices[k])}" for k in keys))[:NAME_MAX]


def _unique_names(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        name, i = n, 2
        while name in out:
            name, i = f"{n}-{i}", i + 1
        out.append(name)
    return out


def _name_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "+".join(map(_name_text, v))
    return "none" if v is None else str(v)


def override_text(v) -> str:
    """A YAML value as attnlab's key=value text (lists as a,b,c)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return ",".join(map(override_text, v))
    return "none" if v is None else str(v)


def _safe(s: str) -> str:
    """A file-system-safe name: letters, digits and . _ - = , + (anything else becomes _)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", s).strip("._-") or "run"
