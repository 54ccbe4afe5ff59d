"""Run logging: events.jsonl (always) plus optional wandb and TensorBoard.

Every event is one JSON object per line with ``event``, ``time`` and its
fields; the optional loggers receive the numeric fields of training and
validation steps and the per-layer, per-head attention statistics (``sink_scalars``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import jsonout
from ..errors import CheckpointError, ConfigError


class EventLog:
    def __init__(self, run_dir: Path, cfg=None, enabled: bool = True):
        self.path = Path(run_dir) / "events.jsonl"
        self.enabled = enabled
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._sinks = _optional_sinks(run_dir, cfg) if (enabled and cfg is not None) else []

    def log(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": time.time(), **fields}
        self._file.write(jsonout.dumps(record) + "\n")  # NaN/inf become null, with null_reasons
        self._file.flush()
        scalars = sink_scalars(event, fields) if self._sinks else {}
        if scalars:
            for sink in self._sinks:
                sink.log(scalars, fields["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        for sink in self._sinks:
            sink.close()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def sink_scalars(event: str, fields: dict) -> dict[str, float]:
    """The scalars wandb/TensorBoard receive for an event: ``train/loss``, ``validation/val_loss``, ...,
    and for ``attention_stats`` one per layer, head and statistic, ``attention/L0H1/entropy``."""
    if "step" not in fields:
        return {}
    if event in ("training_step", "validation_step"):
        return {f"{event.split('_')[0]}/{k}": v for k, v in fields.items() if _number(v) and k != "step"}
    if event == "attention_stats":
        return {
            f"attention/L{layer}H{head}/{k}": x
            for k, v in fields.items()
            if isinstance(v, list)
            for layer, row in enumerate(v)
            for head, x in enumerate(row)
            if _number(x)
        }
    return {}


def read_events(run_dir: Path, event: str | None = None) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    out = []
    data = path.read_bytes()
    lines = data.splitlines()
    for i, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if i == len(lines) and not data.endswith(b"\n"):
                continue  # a line cut by a crash inside a character
            raise CheckpointError(
                f"{path} line {i} is not valid UTF-8 (byte {e.start}): the run's log was altered or "
                "damaged; restore it or delete that line"
            ) from None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if event is None or rec.get("event") == event:
            out.append(rec)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logging.tensorboard=true needs the tensorboard package: pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, cfg):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "logging.wandb needs the wandb package: pip install wandb (or set logging.wandb=off)"
            ) from None
        from ..config import to_dict

        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.name,
            dir=str(run_dir),
            mode=cfg.logging.wandb,
            config=to_dict(cfg),
        )

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def check_loggers(cfg) -> None:
    """Fail before the run directory exists when an enabled logger is not installed."""
    import importlib.util

    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard")
    if cfg.logging.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb needs the wandb package: pip install wandb (or set logging.wandb=off)")


def _optional_sinks(run_dir: Path, cfg) -> list:
    sinks = []
    if cfg.logging.tensorboard:
        sinks.append(_TensorBoard(run_dir))
    if cfg.logging.wandb != "off":
        sinks.append(_Wandb(run_dir, cfg))
    return sinks
