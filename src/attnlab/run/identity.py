"""What a run depends on, recorded when it starts and checked whenever it is used again.

``identity.json`` in the run directory holds the sha256 of the run's
``config.yaml``, the dataset's absolute location and the sha256 of each of its
files (``train.bin``, ``val.bin``, ``test.bin``, image labels,
``tokenizer.json``), and the block layout, which is copied into the run as
``attention_layout.npy`` so that later edits of the original cannot change it, and the sha256 of the
run's own copies of the tokenizer and vocabulary metadata (``tokenizer.json``, ``dataset.json``: see
``vocabulary.py``), which let a run sample and export without its dataset folder.
Resume, eval and sample compare what they find with this record and refuse
anything else in one line that names what differs.

Runs from before this record have no ``identity.json``; they are used as they are.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ..config import Config
from ..data import store
from ..data.image_sources import IMAGE_SOURCES
from ..data.sources import NAMED_SOURCES
from ..errors import CheckpointError, DataError
from ..files import file_sha256
from . import vocabulary

IDENTITY = "identity.json"
LAYOUT_COPY = "attention_layout.npy"


# ------------------------------------------------------------------ record


def dataset_record(ds: store.Dataset) -> dict:
    """Where the dataset is and the sha256 of every file it is made of (from its verified meta.json)."""
    if ds.kind == "task":  # generated problems: no folder, no files; the settings say it all
        return {"dir": None, "kind": "task", "vocab_size": ds.vocab_size, "files": {}, "task": ds.meta["source"]}
    files = {}
    for name, info in ds.meta["splits"].items():
        files[info.get("file", f"{name}.bin")] = info.get("sha256")
        if "labels_file" in info:
            files[info["labels_file"]] = info.get("labels_sha256")
    tok = ds.meta.get("tokenizer") or {}
    if ds.kind != "image":
        name = tok.get("file", "tokenizer.json")
        files[name] = tok.get("sha256") or file_sha256(Path(ds.dir) / name)
    return {"dir": str(Path(ds.dir).resolve()), "kind": ds.kind, "vocab_size": ds.vocab_size, "files": files}


def _absolute(value: str | None, named: tuple = ()) -> str | None:
    """A local path made absolute (against the directory the run started in); names and None stay."""
    if not value or value in named or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def rebuild_settings(ds: store.Dataset, data_cfg) -> dict:
    """The data settings the dataset was prepared with, local paths absolute: a rebuild must not depend on the cwd."""
    settings = dict(ds.meta.get("data_config") or store.config_record(data_cfg))
    settings["source"] = _absolute(settings.get("source"), NAMED_SOURCES + IMAGE_SOURCES)
    settings["path"] = _absolute(settings.get("path"))
    return settings


def record(run_dir: Path, cfg: Config, ds: store.Dataset) -> dict:
    """Copy the layout, tokenizer and vocabulary metadata into the run and write identity.json (after config.yaml)."""
    from ..training.checkpoint import atomic_write_text  # late import: train depends on this module

    rec = {
        "config": {"file": "config.yaml", "sha256": file_sha256(run_dir / "config.yaml")},
        "dataset": {**dataset_record(ds), "settings": rebuild_settings(ds, cfg.data)},
        **vocabulary.copy_into(run_dir, ds),
    }
    if cfg.attention.layout:
        copy = run_dir / LAYOUT_COPY
        shutil.copyfile(cfg.attention.layout, copy)
        rec["layout"] = {"file": LAYOUT_COPY, "sha256": file_sha256(copy), "original": _absolute(cfg.attention.layout)}
    atomic_write_text(run_dir / IDENTITY, json.dumps(rec, indent=2) + "\n")
    return rec


def record_config(run_dir: Path) -> None:
    """Record a config.yaml that attnlab itself rewrote (e.g. extending a run), so its new hash is the expected one."""
    from ..training.checkpoint import atomic_write_text

    rec = read(run_dir)
    if rec is not None:
        rec["config"]["sha256"] = file_sha256(Path(run_dir) / "config.yaml")
        atomic_write_text(Path(run_dir) / IDENTITY, json.dumps(rec, indent=2) + "\n")


def read(run_dir: Path) -> dict | None:
    path = Path(run_dir) / IDENTITY
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rec, dict) or not isinstance(rec.get("config", {}), dict):
            raise ValueError("not an object")
        return rec
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({type(e).__name__}): the run's record of its data and config "
            "is damaged; start a new run from its config.yaml (name=...)"
        ) from None


# ------------------------------------------------------------------ checks


def check_config_file(run_dir: Path) -> None:
    """config.yaml must be the file the run started with."""
    rec = read(run_dir)
    path = Path(run_dir) / "config.yaml"
    if rec is None or "config" not in rec or not path.exists():
        return
    if file_sha256(path) != rec["config"].get("sha256"):
        raise CheckpointError(
            f"{path} was edited after the run started (its sha256 differs from the one in "
            f"{Path(run_dir) / IDENTITY}): restore the original to continue or evaluate the run, or "
            f"start a new run from the edited file with `attnlab train {path} name=NEW_NAME`"
        )


def layout_overrides(run_dir: Path) -> list[str]:
    """``attention.layout=<the run's copy>`` after checking the copy is unchanged (nothing when the run has none)."""
    rec = read(run_dir)
    layout = (rec or {}).get("layout")
    if not layout:
        return []
    copy = Path(run_dir) / layout["file"]
    if not copy.is_file() or file_sha256(copy) != layout["sha256"]:
        state = "is missing" if not copy.is_file() else "changed after the run started"
        raise CheckpointError(
            f"the run's block layout {copy} {state} (sha256 recorded in {Path(run_dir) / IDENTITY}): "
            f"restore it (the run started from {layout.get('original')}) or start a new run"
        )
    return [f"attention.layout={copy}"]


def same_layout(run_dir: Path, path: str | None) -> bool:
    """Whether the layout file `path` holds exactly the run's recorded layout."""
    layout = (read(run_dir) or {}).get("layout")
    return bool(layout and path and Path(path).is_file() and file_sha256(Path(path)) == layout["sha256"])


def recorded_dataset(run_dir: Path) -> dict | None:
    return (read(run_dir) or {}).get("dataset")


def rebuild_config(run_dir: Path, data_cfg):
    """The data config to rebuild the run's dataset from: its recorded settings (absolute paths), else ``data_cfg``."""
    settings = (recorded_dataset(run_dir) or {}).get("settings")
    if not settings:
        return data_cfg
    known = {f.name for f in dataclasses.fields(data_cfg)}
    return dataclasses.replace(data_cfg, **{k: v for k, v in settings.items() if k in known and k != "dir"})


def check_dataset(run_dir: Path, ds: store.Dataset, hint: str, rebuilt_from: str | None = None) -> None:
    """The dataset must be the one the run trained on: same files, byte for byte (their sha256)."""
    want = recorded_dataset(run_dir)
    if want is None:
        return
    have = dataset_record(ds)["files"]
    differ = sorted(n for n in want["files"].keys() | have.keys() if want["files"].get(n) != have.get(n))
    if not differ:
        return
    what = f"dataset {ds.dir}" + (
        f" (rebuilt from data.source={rebuilt_from!r}, as it was missing)" if rebuilt_from else ""
    )
    cause = "the source changed since the run started" if rebuilt_from else "it holds other data"
    where = "" if Path(want["dir"]) == Path(ds.dir).resolve() else f" ({want['dir']})"
    raise DataError(
        f"{what} is not the one {run_dir} was trained on: {', '.join(differ)} differ from the run's "
        f"{IDENTITY} ({cause}); point at a copy of the run's data{where} with {hint}"
    )


def missing_dataset(run_dir: Path, path: Path, hint: str) -> DataError:
    want = recorded_dataset(run_dir)
    origin = f" (recorded at {want['dir']})" if want and Path(want["dir"]) != Path(path).resolve() else ""
    return DataError(
        f"dataset {path} of {run_dir} is missing{origin}: point at a copy of the run's data with {hint}, "
        "or re-create it with `attnlab prepare` from the run's config.yaml data settings"
    )
