"""Run logging: events.jsonl (always) plus optional wandb and TensorBoard.

Every event is one JSON object per line with ``event``, ``time`` and its
fields; the optional loggers receive the numeric fields of training and
validation steps and the per-layer, per-head attention statistics (``sink_scalars``).

A resumed run continues the same runs there: TensorBoard writes into the run's
``tensorboard/`` folder again, and wandb resumes the run whose id the first
start stored in ``wandb.json`` (``id=..., resume="allow"``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import jsonout
from ..errors import CheckpointError, ConfigError


class EventLog:
    def __init__(self, run_dir: Path, cfg=None, enabled: bool = True, resumed_from: int | None = None):
        """``resumed_from``: the step of the checkpoint a resumed run restarts from (the steps after it run again)."""
        self.path = Path(run_dir) / "events.jsonl"
        self.enabled = enabled
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._sinks = _optional_sinks(run_dir, cfg, resumed_from) if (enabled and cfg is not None) else []

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
    """The run's events in order, without what a crashed process logged after the checkpoint a later
    ``run_resumed`` continues from: those steps ran again (as TensorBoard's ``purge_step`` hides them)."""
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
        if rec.get("event") == "run_resumed":
            out = [r for r in out if not _after(r, rec.get("step"))]
        if event is None or rec.get("event") == event:
            out.append(rec)
    return out


def _after(rec: dict, step: object) -> bool:
    return isinstance(step, int) and isinstance(rec.get("step"), int) and rec["step"] > step


class _TensorBoard:
    def __init__(self, run_dir: Path, resumed_from: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logging.tensorboard=true needs the tensorboard package: pip install tensorboard"
            ) from None
        # A resumed run writes into the same folder; purge_step hides what the crashed process logged
        # after its last checkpoint, since those steps run again.
        purge = None if resumed_from is None else resumed_from + 1
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


WANDB_ID = "wandb.json"  # the wandb run's id, so a resumed run logs into the same wandb run


class _Wandb:
    def __init__(self, run_dir: Path, cfg):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "logging.wandb needs the wandb package: pip install wandb (or set logging.wandb=off)"
            ) from None
        from ..config import to_dict

        stored = _stored_wandb_id(Path(run_dir))
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.name,
            dir=str(run_dir),
            mode=cfg.logging.wandb,
            config=to_dict(cfg),
            **({"id": stored, "resume": "allow"} if stored else {}),
        )
        if not stored:  # the first start: wandb (or a sweep agent) chose the id
            from .checkpoint import atomic_write_text

            atomic_write_text(Path(run_dir) / WANDB_ID, json.dumps({"id": self.run.id}) + "\n")

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _stored_wandb_id(run_dir: Path) -> str | None:
    path = run_dir / WANDB_ID
    if not path.exists():
        return None
    try:
        run_id = json.loads(path.read_text(encoding="utf-8"))["id"]
        if not isinstance(run_id, str) or not run_id:
            raise ValueError("not a run id")
        return run_id
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({type(e).__name__}): it holds the run's wandb id; restore it, or delete it "
            "to log the rest of the run as a new wandb run"
        ) from None


def validation_line(step: int, m: dict) -> str:
    """One console line for a validation result: bits/byte over the whole split, nats/token over a part of it
    (bits/byte needs every byte of the split), bits/dim for images, exact-match accuracy for a task."""
    extent = "partial" if m.get("partial") else "full"
    if "accuracy" in m:
        return f"step {step}: val accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f} ({m['problems']:,} problems)"
    if "bits_per_dim" in m:
        return f"step {step}: val {m['bits_per_dim']:.4f} bits/dim ({extent}, {m['images']:,} images)"
    if "bits_per_byte" in m:
        return f"step {step}: val {m['bits_per_byte']:.4f} bits/byte ({extent}, {m['tokens']:,} tokens)"
    return f"step {step}: val {m['nats_per_token']:.4f} nats/token ({extent}, {m['tokens']:,} tokens)"


def check_loggers(cfg) -> None:
    """Fail before the run directory exists when an enabled logger is not installed."""
    import importlib.util

    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard")
    if cfg.logging.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb needs the wandb package: pip install wandb (or set logging.wandb=off)")


def _optional_sinks(run_dir: Path, cfg, resumed_from: int | None = None) -> list:
    sinks = []
    if cfg.logging.tensorboard:
        sinks.append(_TensorBoard(run_dir, resumed_from))
    if cfg.logging.wandb != "off":
        sinks.append(_Wandb(run_dir, cfg))
    return sinks
