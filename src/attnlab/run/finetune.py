"""Starting from another run: ``train.init_from=RUN[/checkpoints/step_N]`` copies that checkpoint's weights into a
new run (its optimizer and schedule start fresh) whose dataset must be encoded with the same tokenizer, and
``attnlab prepare SOURCE --tokenizer-from RUN`` encodes new data with a run's tokenizer."""

from __future__ import annotations

from pathlib import Path

from ..data import store
from ..errors import CheckpointError, ConfigError, DataError
from ..files import file_sha256
from ..training import checkpoint as ckpt
from . import identity
from .open import load_run_config

TOKENIZER = "tokenizer.json"


def source_run(spec: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint folder) of ``RUN`` (its newest complete checkpoint) or ``RUN/checkpoints/step_N``."""
    p = Path(spec).expanduser()
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else p
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"train.init_from={spec}: {run_dir} is not a run directory (no config.yaml): "
            "pass runs/NAME or runs/NAME/checkpoints/step_N"
        )
    path = p if p != run_dir else ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"train.init_from={spec}: {run_dir} has no complete checkpoint: train it first")
    return run_dir, path


def run_tokenizer(run_dir: str | Path) -> tuple[Path, str, str]:
    """(tokenizer.json, its sha256, its kind) of a run's dataset: the run's own copy if it has one, else the file in
    the dataset folder it recorded, checked against the sha256 the run recorded."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    recorded = identity.recorded_dataset(run_dir) or {}
    want = (recorded.get("files") or {}).get(TOKENIZER)
    kind = "bpe" if cfg.data.tokenizer_file else cfg.data.tokenizer
    candidates = [run_dir / TOKENIZER]
    if recorded.get("dir"):
        candidates.append(Path(recorded["dir"]) / TOKENIZER)
    if cfg.data.dir:
        candidates.append(Path(cfg.data.dir) / TOKENIZER)
    for path in candidates:
        if path.is_file():
            sha = file_sha256(path)
            if want is None or sha == want:
                return path, sha, kind
    raise DataError(
        f"{run_dir} has no tokenizer.json matching its record (looked in {', '.join(map(str, candidates))}): "
        "restore the run's dataset folder"
    )


def check_tokenizer(spec: str, run_dir: Path, ds: store.Dataset) -> None:
    """The new dataset must be encoded with the source run's tokenizer (same tokenizer.json sha256)."""
    if ds.kind != "text":  # images: bytes of pixels; tasks: generated with their own fixed vocabulary
        return
    _, want, _ = run_tokenizer(run_dir)
    have = (ds.meta.get("tokenizer") or {}).get("sha256") or file_sha256(Path(ds.dir) / TOKENIZER)
    if have != want:
        raise DataError(
            f"train.init_from={spec}: {ds.dir} is encoded with another tokenizer than {run_dir}'s "
            f"(tokenizer.json sha256 {have[:12]} vs {want[:12]}): prepare the data with "
            f"`attnlab prepare SOURCE --tokenizer-from {run_dir} --out DIR` and set data.dir=DIR"
        )


def init_weights(model, spec: str, ds: store.Dataset) -> dict:
    """Load the source checkpoint's weights into ``model`` (shapes must match: the error names the first that
    differs); what was loaded, for meta.json."""
    run_dir, path = source_run(spec)
    check_tokenizer(spec, run_dir, ds)
    try:
        weights, state = ckpt.load_checkpoint(path, model)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from={spec}: {e}") from None
    ckpt.check_finite(path, weights)
    return {"run": str(run_dir.resolve()), "checkpoint": str(Path(path).resolve()), "step": state.get("step")}
