"""What a run comparison report reads from each run directory.

A run directory (``attnlab train``'s output) holds ``config.yaml``,
``events.jsonl``, usually ``meta.json`` and, once finished, ``summary.json``.
A run without ``summary.json`` is still running or was stopped: it is kept,
with its curves, and marked unfinished (it has no final full-split metric, so
it takes no part in the seed statistics).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ... import config as config_mod
from ...config import Config
from ...errors import CheckpointError, ConfigError, UserError
from ...training.logs import read_events

# Headline metric keys, most specific first; val_loss (nats/token) is the fallback.
METRICS = ("val_bits_per_dim", "val_bits_per_byte")
UNITS = {"val_bits_per_dim": "val bits/dim", "val_bits_per_byte": "val bits/byte", "val_loss": "val loss (nats/token)"}


@dataclass
class Point:
    """One validation result: where training was (step, tokens, seconds) and the metric."""

    step: int
    tokens: int
    seconds: float | None  # training seconds; None for runs that predate train_seconds
    value: float
    final: bool = False


@dataclass
class RunData:
    dir: Path
    name: str  # unique among the report's runs
    cfg: Config
    summary: dict | None
    meta: dict
    metric: str
    val: list[Point] = field(default_factory=list)
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    sample_text: str | None = None
    sample_png: Path | None = None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def final_value(self) -> float | None:
        """The full-split final metric from summary.json (None when unfinished or missing)."""
        v = (self.summary or {}).get(self.metric)
        return v if _number(v) else None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path, what: str) -> dict | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}): restore the run's {what} or leave the run out"
        ) from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: restore the run's {what} or leave the run out")
    return d


def _load_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not run_dir.is_dir() or not path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a run directory (no config.yaml): pass folders created by `attnlab train`"
        )
    try:
        return config_mod.load(path)
    except ConfigError as e:
        raise CheckpointError(f"{path} cannot be read ({e}); fix it or leave this run out of the report") from None


def headline_metric(summary: dict | None, events: list[dict]) -> str:
    """bits/dim for image runs, bits/byte for text runs, val_loss when neither was logged."""
    for key in METRICS:
        if key in (summary or {}) or any(key in e for e in events):
            return key
    return "val_loss"


def validation_points(events: list[dict], metric: str, cfg: Config) -> list[Point]:
    """Validation results sorted by step; at a step evaluated twice the final (full-split) one wins.

    Older runs lack ``tokens`` (derived from the config's tokens per step) and
    ``train_seconds`` (left None: such runs are left out of wall-clock plots).
    """
    t = cfg.train
    per_step = t.batch_size * t.grad_accum * cfg.model.context
    by_step: dict[int, Point] = {}
    for e in events:
        value = e.get(metric)
        if not _number(e.get("step")) or not _number(value):
            continue  # a non-finite loss is logged as a string
        tokens = e["tokens"] if _number(e.get("tokens")) else e["step"] * per_step
        seconds = e["train_seconds"] if _number(e.get("train_seconds")) else None
        point = Point(int(e["step"]), int(tokens), seconds, float(value), bool(e.get("final")))
        if point.final or int(e["step"]) not in by_step or not by_step[int(e["step"])].final:
            by_step[point.step] = point
    return [by_step[s] for s in sorted(by_step)]


def training_points(events: list[dict]) -> list[tuple[int, float]]:
    return sorted(
        (int(e["step"]), float(e["loss"])) for e in events if _number(e.get("step")) and _number(e.get("loss"))
    )


def _last(run_dir: Path, pattern: str) -> Path | None:
    files = sorted((run_dir / "samples").glob(pattern))  # step-NNNNNNN names sort by step
    return files[-1] if files else None


def load_run_data(run_dir: str | Path) -> RunData:
    """Everything the report shows about one run; CheckpointError when ``run_dir`` is not a run directory."""
    run_dir = Path(run_dir)
    cfg = _load_config(run_dir)
    summary = _read_json(run_dir / "summary.json", "summary.json")
    meta = _read_json(run_dir / "meta.json", "meta.json") or {}
    events = read_events(run_dir, "validation_step")
    metric = headline_metric(summary, events)
    text = _last(run_dir, "*.txt")
    return RunData(
        dir=run_dir,
        name=run_dir.name,
        cfg=cfg,
        summary=summary,
        meta=meta,
        metric=metric,
        val=validation_points(events, metric, cfg),
        train=training_points(read_events(run_dir, "training_step")),
        sample_text=text.read_text(encoding="utf-8", errors="replace") if text else None,
        sample_png=_last(run_dir, "*.png"),
    )


def load_runs(run_dirs: list[str | Path]) -> list[RunData]:
    """Load every run, refusing an empty list and a directory listed twice; names are made unique."""
    if not run_dirs:
        raise UserError("no run directories given: pass one or more folders created by `attnlab train`")
    seen: dict[Path, str] = {}
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            raise UserError(f"run directory {d} is listed twice ({seen[key]}): list each run once")
        seen[key] = str(d)
    runs = [load_run_data(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:  # same name in different out_dirs: say which
            r.name = f"{r.dir.resolve().parent.name}/{r.dir.name}"
    return runs
