"""``hf:NAME``: any Hugging Face dataset as a text source, through the `datasets` library.

NAME is a hub dataset (``hf:roneneldan/TinyStories``, with ``data.config`` and
``data.split``), or a local copy: a folder written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, a parquet file, or a folder of parquet files.
``data.path`` names a local copy of a hub dataset. ``data.field`` is the text
column (default ``text``); the other scalar columns travel with each document
as its metadata (``attnlab prepare --export-hf`` writes them back out).
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from .sources import HF_PREFIX, Documents, _missing_field, _probe_hub

SCALARS = (str, int, float, bool, type(None))
EXAMPLE = "a local copy (a save_to_disk folder or parquet files)"


def load_hf(cfg: DataConfig) -> Documents:
    name = cfg.source[len(HF_PREFIX):]
    if not name:
        raise DataError("data.source='hf:' names no dataset: use hf:NAME (a hub dataset) or hf:/path/to/folder")
    datasets = _import_datasets(cfg.source)
    local = Path(cfg.path or name).expanduser()
    if (cfg.path or name.startswith(("/", ".", "~"))) and not local.exists():
        raise DataError(f"{local} (for {cfg.source}) does not exist: pass an existing path, or data.path=/path/to/{EXAMPLE}")
    split = cfg.split or "train"
    if local.exists():
        ds, origin = _load_local(datasets, local, split, cfg.config), {"path": str(local.resolve())}
    else:
        ds, origin = _load_hub(datasets, cfg.source, name, split, cfg.config), {"hub_dataset": name}
    field_ = cfg.field or "text"
    if field_ not in ds.column_names:
        raise _missing_field(Path(cfg.source), field_, ds.column_names)
    docs, metas = _rows(ds, field_, cfg.source)
    info = {"kind": "hf", **origin, "split": split, "config": cfg.config, "field": field_, "rows": len(ds),
            "fingerprint": getattr(ds, "_fingerprint", None)}
    return Documents(docs, info, metas)


def _import_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source} needs the `datasets` package: pip install 'attnlab[data]'") from None
    return datasets


def _load_local(datasets, path: Path, split: str, config: str | None):
    """A save_to_disk folder (Dataset or DatasetDict), parquet file(s), or any folder `datasets` can read."""
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            return _pick_split(ds, split, path) if isinstance(ds, datasets.DatasetDict) else ds
        parquet = sorted(path.rglob("*.parquet")) if path.is_dir() else [path] if path.suffix == ".parquet" else []
        if parquet:
            return datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
        return datasets.load_dataset(str(path), config, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable folders
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise DataError(f"{path} is not a readable Hugging Face dataset ({reason}): pass a save_to_disk folder "
                        "or parquet files") from None


def _pick_split(dd, split: str, path: Path):
    if split not in dd:
        raise DataError(f"{path} has no split {split!r}: set data.split to one of {', '.join(dd)}")
    return dd[split]


def _load_hub(datasets, source: str, name: str, split: str, config: str | None):
    try:
        _probe_hub()
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline: ConnectionError, OSError, hub errors...
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise DataError(f"cannot load {source} from the Hugging Face hub (no network or no such dataset: {reason}): "
                        f"pass data.path=/path/to/{EXAMPLE}") from None


def _rows(ds, field_: str, source: str) -> tuple[list[str], list[dict]]:
    """The text column as documents; the other scalar columns as each document's metadata."""
    keep = [c for c, feature in ds.features.items() if c != field_ and _is_scalar_feature(feature)]
    texts = list(ds[field_])  # plain lists: indexing a `datasets` column row by row is slow
    bad = next((v for v in texts if not isinstance(v, (str, type(None)))), None)
    if bad is not None:
        raise DataError(f"{source}: column {field_!r} holds {type(bad).__name__}, not text: choose a text column with data.field")
    columns = {c: list(ds[c]) for c in keep}
    docs, metas = [], []
    for i, text in enumerate(texts):
        if text is None:
            continue
        docs.append(text)
        metas.append({c: columns[c][i] for c in keep})
    return docs, metas


def _is_scalar_feature(feature) -> bool:
    return type(feature).__name__ == "Value"
