"""The run's own copy of what sampling and export need from its dataset: the tokenizer and the vocabulary metadata.

A new run copies the dataset's ``tokenizer.json`` (text) into the run directory and writes ``dataset.json``: the
parts of the dataset's ``meta.json`` that the model and sampling read (kind, vocabulary size, token dtype,
document separator, tokenizer kind, image shape and bytes per image, class names, split names, source).
``identity.json`` records the sha256 of both copies. ``RunVocabulary`` stands in for the dataset where the
dataset folder is absent: it has the tokenizer and the metadata, and refuses to hand out a split's tokens
(those need the dataset itself, so ``attnlab eval`` still points at ``--data-dir``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data import store
from ..data.text import Tokenizer, load_tokenizer
from ..errors import CheckpointError, DataError
from ..files import file_sha256

META_COPY = "dataset.json"
TOKENIZER_COPY = "tokenizer.json"
# The dataset's meta.json entries a run keeps: what the model, the tokenizer and sampling read. Split names stay;
# split contents (token counts, hashes) belong to the dataset.
KEPT_KEYS = (
    "format_version",
    "kind",
    "source",
    "vocab_size",
    "dtype",
    "document_separator",
    "tokenizer",
    "image",
    "tokens_per_image",
    "classes",
)


def copy_into(run_dir: Path, ds: store.Dataset) -> dict:
    """Write ``dataset.json`` (and copy ``tokenizer.json`` for text) into a new run; identity.json's entries for them."""
    if ds.kind == "task":  # generated problems: the config says it all
        return {}
    run_dir = Path(run_dir)
    meta = {k: ds.meta[k] for k in KEPT_KEYS if k in ds.meta}
    meta["splits"] = list(ds.meta["splits"])
    meta["dataset_dir"] = str(Path(ds.dir).resolve())
    (run_dir / META_COPY).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    entries = {"vocabulary": {"file": META_COPY, "sha256": file_sha256(run_dir / META_COPY)}}
    if ds.kind != "image":
        name = (ds.meta.get("tokenizer") or {}).get("file", "tokenizer.json")
        shutil.copyfile(Path(ds.dir) / name, run_dir / TOKENIZER_COPY)
        entries["tokenizer"] = {"file": TOKENIZER_COPY, "sha256": file_sha256(run_dir / TOKENIZER_COPY)}
    return entries


@dataclass
class RunVocabulary:
    """What a run's dataset gives the model and sampling, from the run's own copies (see the module doc).

    ``missing`` is the error that a split's tokens raise: the dataset itself is not there."""

    dir: Path  # the run directory: where the copies are
    meta: dict
    tokenizer: Tokenizer | None  # None for image runs
    missing: DataError

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "text")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta.get("splits", []))

    def split_info(self, split: str) -> dict:
        raise self.missing

    def tokens(self, split: str):
        raise self.missing


def has_copies(record: dict | None) -> bool:
    """Whether the run (its identity.json ``record``) keeps its own vocabulary copies (runs from before do not)."""
    return bool(record and "vocabulary" in record)


def open_copies(run_dir: Path, record: dict, missing: DataError) -> RunVocabulary:
    """The run's copies, each checked against the sha256 in identity.json ``record``."""
    meta = json.loads(_checked(run_dir, record["vocabulary"]).read_text(encoding="utf-8"))
    tokenizer = None
    if "tokenizer" in record:
        tokenizer = load_tokenizer(_checked(run_dir, record["tokenizer"]))
        if tokenizer.vocab_size != int(meta["vocab_size"]):
            raise CheckpointError(
                f"{Path(run_dir) / record['tokenizer']['file']} has {tokenizer.vocab_size} tokens but "
                f"{Path(run_dir) / META_COPY} says {meta['vocab_size']}: restore the run's copies"
            )
    return RunVocabulary(Path(run_dir), meta, tokenizer, missing)


def _checked(run_dir: Path, entry: dict) -> Path:
    path = Path(run_dir) / entry["file"]
    if not path.is_file() or file_sha256(path) != entry["sha256"]:
        state = "is missing" if not path.is_file() else "changed after the run started"
        raise CheckpointError(
            f"the run's copy {path} {state} (sha256 recorded in {Path(run_dir) / 'identity.json'}): "
            "restore it from the original run directory"
        )
    return path
