"""``attnlab prepare ... --export-hf DIR``: the documents of each split as a Hugging Face dataset.

``datasets.load_from_disk(DIR)`` gives a ``DatasetDict`` with ``train`` and
``validation`` (the same documents, in the same order, as train.bin and
val.bin) and ``test`` where the source has one. Each row has ``text`` and the
source's per-document metadata (arXiv ``id``, ``categories``, ...; the other
columns of an ``hf:`` source).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DataError

HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def check_export_target(out, force: bool) -> Path:
    """Refuse, before any work, a target that exists (unless ``force``) or that `datasets` cannot write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--export-hf {out} exists and is not a folder: choose another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DataError(f"--export-hf {out} already exists: choose another folder or pass --force")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError("--export-hf needs the `datasets` package: pip install 'attnlab[data]'") from None
    return out


def export_splits(out, docs: list[str], metas: list[dict] | None, split_indices: dict[str, list[int]]) -> Path:
    """Write every split's documents (by index into ``docs``) with their metadata; atomic folder replace."""
    import datasets

    out = Path(out)
    columns = _meta_columns(metas)
    features = _features(datasets, metas or [], columns)  # one schema for every split
    parts = {}
    for split, idx in split_indices.items():
        rows = {"text": [docs[i] for i in idx]}
        for c in columns:
            rows[c] = [metas[i].get(c) for i in idx]
        parts[HF_SPLIT_NAMES[split]] = datasets.Dataset.from_dict(rows, features=features)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # attnlab's own progress is enough
    try:
        datasets.DatasetDict(parts).save_to_disk(str(tmp / "d"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "d", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()
    return out


def _meta_columns(metas: list[dict] | None) -> list[str]:
    """Every metadata key, in first-seen order (a record lacking one gets None)."""
    seen: dict[str, None] = {}
    for m in metas or []:
        seen.update(dict.fromkeys(m))
    return [c for c in seen if c != "text"]


def _features(datasets, metas: list[dict], columns: list[str]):
    """Explicit types, so an all-None or empty column still has one (string unless its values say otherwise)."""
    feats = {"text": datasets.Value("string")}
    for c in columns:
        sample = next((m[c] for m in metas if m.get(c) is not None), "")
        kind = (
            "bool"
            if isinstance(sample, bool)
            else "int64"
            if isinstance(sample, int)
            else "float64"
            if isinstance(sample, float)
            else "string"
        )
        feats[c] = datasets.Value(kind)
    return datasets.Features(feats)
