"""The on-disk dataset: ``train.bin``, ``val.bin`` (``test.bin``), ``meta.json``, and ``tokenizer.json`` for text.

Each ``.bin`` is a flat array of token ids (uint16, or uint32 for vocabularies
above 65536): ``[eos] doc1 [eos] doc2 [eos] ...``. The leading ``eos`` gives
the first token of a split a context; every document is followed by ``eos``.
``meta.json`` records the source provenance, the data config, the tokenizer,
and per split the number of documents, tokens, UTF-8 bytes and characters of
the documents (separators excluded: the denominator of bits/byte), unknown
tokens, and the sha256 of the file. The tokenizer is fit on the training
documents only, unless ``data.tokenizer_fit=train+val`` (recorded in
``data_config``) lets it see the validation documents too.

Image datasets (``meta["kind"] == "image"``, see ``image_format.py`` and ``image_sources.py``) hold images
as concatenated byte tokens (vocabulary 256, no separator) plus
``{split}.labels.npy``; they have no tokenizer.

``prepare`` builds the folder atomically (temp folder beside it, then rename);
``load`` checks every file against meta.json before handing out memmaps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__, folders
from ..config import DataConfig
from ..errors import DataError
from ..files import file_sha256
from . import hf_export, image_sources, tasks
from .image_format import from_sequence
from .sources import load_documents
from .text import EOS, Tokenizer, load_tokenizer, token_dtype, tokenizer_from_file, train_tokenizer

FORMAT_VERSION = 1
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SPLITS = ("train", "val", "test")
ENCODE_CHUNK_DOCS = 512  # documents per encode_batch call
ENCODE_CHUNK_CHARS = 4 << 20  # ... or fewer, to bound memory on long documents
ID_CHECK_CHUNK = 1 << 24  # tokens read at a time when checking the id range


@dataclass
class Dataset:
    dir: Path
    meta: dict
    tokenizer: Tokenizer | None  # None for image datasets
    _memmaps: dict = field(default_factory=dict, repr=False, compare=False)

    def split_info(self, split: str) -> dict:
        """meta.json's entry for `split`, or a DataError naming the splits there are."""
        if split not in self.meta["splits"]:
            have = ", ".join(self.meta["splits"])
            hint = " (prepared with data.val_frac=0: set val_frac > 0 and re-prepare)" if split == "val" else ""
            raise DataError(f"dataset {self.dir} has no {split!r} split{hint}: use one of {have}")
        return self.meta["splits"][split]

    def tokens(self, split: str) -> np.ndarray:
        """Read-only memmap of a split's token ids."""
        info = self.split_info(split)
        if split not in self._memmaps:
            self._memmaps[split] = np.memmap(
                self.dir / info["file"], dtype=DTYPES[self.meta["dtype"]], mode="r", shape=(info["tokens"],)
            )
        return self._memmaps[split]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def kind(self) -> str:
        """ "text" or "image" (datasets from before images have no kind: text)."""
        return self.meta.get("kind", "text")


# -------------------------------------------------------------- prepare

# Keys added after the format was fixed: recorded only when set, so older datasets (and their default
# data/<name>-<hash> folders) still match configs that leave them at their defaults.
LATER_KEYS = (
    "split",
    "config",
    "tokenizer_file",
    "tokenizer_fit",
    "task",
    "digits",
    "eval_digits",
    "eval_problems",
    "reverse_answer",
)


def config_record(cfg: DataConfig) -> dict:
    """The data config as recorded in meta.json (``dir`` is where, not what)."""
    d = dataclasses.asdict(cfg)
    d.pop("dir", None)
    defaults = dataclasses.asdict(DataConfig())
    for k in LATER_KEYS:
        if k in d and d[k] == defaults[k]:
            d.pop(k)
    return d


def is_prepared_for(dir, cfg: DataConfig) -> bool:
    """True when `dir` holds a dataset prepared from exactly this data config (ignoring cfg.dir)."""
    try:
        meta = json.loads((Path(dir) / "meta.json").read_text(encoding="utf-8"))
        return meta.get("data_config") == config_record(cfg)
    except (OSError, ValueError, AttributeError):
        return False


def select_documents(docs: list[str], cfg: DataConfig) -> list[str]:
    """Seeded shuffle, then the max_docs / max_bytes caps (keeping the shuffled prefix)."""
    return [docs[i] for i in select_indices(docs, cfg)]


def select_indices(docs: list[str], cfg: DataConfig) -> list[int]:
    """The indices of ``select_documents``'s result (so per-document metadata can follow the documents)."""
    order = np.random.default_rng(cfg.seed).permutation(len(docs)).tolist()
    if cfg.max_docs is not None:
        order = order[: cfg.max_docs]
    if cfg.max_bytes is not None:
        total, keep = 0, 0
        for i in order:
            total += len(docs[i].encode("utf-8"))
            if total > cfg.max_bytes:
                break
            keep += 1
        if keep == 0 and order:
            raise DataError(
                f"data.max_bytes={cfg.max_bytes} is smaller than the first (shuffled) document "
                f"({len(docs[order[0]].encode('utf-8'))} bytes): raise data.max_bytes"
            )
        order = order[:keep]
    return order


def split_documents(docs: list[str], val_frac: float) -> dict[str, list[str]]:
    """val = the first round(val_frac * n) shuffled documents (at least 1 when possible), train = the rest."""
    n = len(docs)
    n_val = round(val_frac * n)
    if val_frac > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    elif val_frac > 0:
        raise DataError(
            f"only {n} document after the caps, so no validation split is possible: "
            "raise data.max_docs/data.max_bytes, use a source with more documents, or set data.val_frac=0"
        )
    splits = {"train": docs[n_val:]}
    if n_val:
        splits["val"] = docs[:n_val]
    return splits


def prepare(
    cfg: DataConfig, out_dir, *, force: bool = False, progress: bool = True, wait: bool = False, export_hf=None
) -> dict:
    """Load, shuffle, split, encode and write a dataset folder (text or images); returns its meta.

    The folder is locked while it is written (another process preparing it
    makes this one fail, or with ``wait`` wait and reuse its dataset when that
    was prepared from the same config); ``force`` replaces only an attnlab dataset.
    ``export_hf``: also write each split's documents as a Hugging Face dataset folder there.
    """
    out = Path(out_dir)
    if tasks.is_task(cfg):
        raise DataError(
            f"{cfg.source} problems are generated while training, so there is nothing to prepare: "
            f"train with data.source={cfg.source}"
        )
    if export_hf is not None:
        if cfg.source in image_sources.IMAGE_SOURCES:
            raise DataError(f"--export-hf writes text documents; {cfg.source} holds images: drop --export-hf")
        hf_export.check_export_target(export_hf, force)
    _check_not_prepared(cfg)
    folders.refuse_working_directory(out, "dataset folder", "pass a new folder, e.g. --out data/NAME", DataError)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    folders.make_parent(out, "dataset folder", DataError)
    try:
        with folders.locked(out, "dataset folder", wait=wait, error=DataError):
            if wait and is_prepared_for(out, cfg):
                return json.loads((out / "meta.json").read_text(encoding="utf-8"))
            folders.check_target(out, "dataset", force, "choose another --out")
            with folders.sigterm_as_interrupt():
                return _prepare_locked(cfg, out, progress, export_hf)
    except BaseException:
        for folder in created:  # the folders made for the dataset, deepest first, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _prepare_locked(cfg: DataConfig, out: Path, progress: bool, export_hf=None) -> dict:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise folders.cannot_write(out.parent, e, "choose a writable --out", DataError) from None
    try:
        if cfg.source in image_sources.IMAGE_SOURCES:
            body = image_sources.write_dataset(cfg, tmp, progress)
        else:
            body = _write_text(cfg, tmp, progress, export_hf)
        meta = {
            "format_version": FORMAT_VERSION,
            "attnlab_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kind": body.pop("kind"),
            "source": body.pop("source"),
            "data_config": config_record(cfg),
            **body,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        folders.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def is_prepared_dataset(path) -> bool:
    """A folder that `prepare` wrote (its meta.json beside train.bin)."""
    p = Path(path)
    return (p / "meta.json").is_file() and (p / "train.bin").is_file()


def _check_not_prepared(cfg: DataConfig) -> None:
    """A prepared folder given as the raw source: say where it belongs instead of reading its .bin files as text."""
    for key in ("path", "source"):
        value = getattr(cfg, key)
        if value and is_prepared_dataset(Path(value).expanduser()):
            raise DataError(
                f"data.{key}={value!r} is a prepared dataset: use data.dir={value} "
                "(data.source and data.path name the raw text or images)"
            )


def _write_text(cfg: DataConfig, tmp: Path, progress: bool, export_hf=None) -> dict:
    """Load, shuffle and split the documents, fit the tokenizer (on train), write the splits; meta entries."""
    documents = load_documents(cfg)
    split_idx = split_documents(select_indices(documents.docs, cfg), cfg.val_frac)  # lists of document indices
    splits = {name: [documents.docs[i] for i in idx] for name, idx in split_idx.items()}
    tok = _tokenizer(cfg, splits)
    split_meta = {name: _write_split(tmp / f"{name}.bin", name, docs, tok, progress) for name, docs in splits.items()}
    tok.save(tmp / "tokenizer.json")
    if export_hf is not None:
        hf_export.export_splits(export_hf, documents.docs, documents.meta, split_idx)
    tok_meta = {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "file": "tokenizer.json",
        "sha256": file_sha256(tmp / "tokenizer.json"),
    }
    if cfg.tokenizer_file:
        tok_meta.update(from_file=str(Path(cfg.tokenizer_file).resolve()), eos_token=getattr(tok, "eos_token", EOS))
    return {
        "kind": "text",
        "source": documents.info,
        "tokenizer": tok_meta,
        "vocab_size": tok.vocab_size,
        "dtype": tok.dtype.name,
        "document_separator": getattr(tok, "eos_token", EOS),
        "documents_selected": sum(len(d) for d in splits.values()),
        "splits": split_meta,
    }


def _tokenizer(cfg: DataConfig, splits: dict[str, list[str]]) -> Tokenizer:
    """The tokenizer file, or one fit on the training documents (data.tokenizer_fit=train+val: on val's too)."""
    if cfg.tokenizer_file:
        if cfg.tokenizer_fit != "train":
            raise DataError(
                f"data.tokenizer_fit={cfg.tokenizer_fit} fits a new tokenizer, but data.tokenizer_file gives one: "
                "drop one of them"
            )
        return tokenizer_from_file(cfg.tokenizer_file, cfg.tokenizer)
    if cfg.tokenizer_fit != "train" and cfg.tokenizer == "bytes":
        raise DataError(
            f"data.tokenizer_fit={cfg.tokenizer_fit} chooses what a bpe or char tokenizer is fit on; "
            "data.tokenizer=bytes is not fit on anything: drop data.tokenizer_fit"
        )
    docs = splits["train"]
    if cfg.tokenizer_fit == "train+val":
        print(
            "attnlab: warning: data.tokenizer_fit=train+val: the tokenizer is fit on the validation documents "
            "too (as the mainrun challenge does), so it has seen the validation text",
            file=sys.stderr,
        )
        docs = docs + splits.get("val", [])
    return train_tokenizer(cfg.tokenizer, docs, cfg.vocab_size)


def _chunks(docs: list[str]):
    start, size = 0, 0
    for i, d in enumerate(docs):
        size += len(d)
        if i + 1 - start >= ENCODE_CHUNK_DOCS or size >= ENCODE_CHUNK_CHARS:
            yield docs[start : i + 1]
            start, size = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def _write_split(path: Path, name: str, docs: list[str], tok: Tokenizer, progress: bool) -> dict:
    """Encode `docs` as [eos] d1 [eos] d2 [eos] ... into `path`, streaming chunk by chunk."""
    from tqdm.auto import tqdm

    dtype, eos = tok.dtype, tok.eos_id
    digest, n_tokens, n_unk = hashlib.sha256(), 0, 0
    bar = tqdm(total=len(docs), desc=f"encode {name}", unit="doc", disable=not progress, file=sys.stderr, leave=False)
    with open(path, "wb") as f:
        for chunk in _chunks(docs):
            stream = [eos] if n_tokens == 0 else []
            for ids in tok.encode_batch(chunk):
                stream.extend(ids)
                stream.append(eos)
            arr = np.asarray(stream, dtype=dtype)
            if tok.kind == "char":
                n_unk += int(np.count_nonzero(arr == tok.unk_id))
            buf = arr.tobytes()
            f.write(buf)
            digest.update(buf)
            n_tokens += arr.size
            bar.update(len(chunk))
    bar.close()
    return {
        "file": path.name,
        "documents": len(docs),
        "tokens": n_tokens,
        "bytes": sum(len(d.encode("utf-8")) for d in docs),
        "chars": sum(len(d) for d in docs),
        "unk_tokens": n_unk,
        "sha256": digest.hexdigest(),
    }


# ----------------------------------------------------------------- load


def _fix(dir: Path) -> str:
    return f"re-create it with `attnlab prepare ... --out {dir} --force`"


def load(dir, *, verify: bool = True) -> Dataset:
    """Open a prepared dataset, checking sizes (and sha256 when `verify`) against meta.json."""
    d = Path(dir)
    meta_path = d / "meta.json"
    if not d.is_dir():
        raise DataError(
            f"dataset folder {d} does not exist: create it with `attnlab prepare --out {d}` (or set data.dir)"
        )
    meta = _read_meta(meta_path, d)
    dtype = _meta_dtype(meta, meta_path, d)
    for name, info in meta["splits"].items():
        _check_split(d, name, info, dtype, verify)
        if meta.get("kind") == "image":
            _check_labels(d, name, info, int(meta["tokens_per_image"]), verify)
        _check_ids(d / info.get("file", f"{name}.bin"), int(info["tokens"]), dtype, meta["vocab_size"], d)
    if meta.get("kind") == "image":
        return Dataset(d, meta, None)
    tok_info = meta.get("tokenizer") or {}
    tok_path = _local_file(d, tok_info.get("file", "tokenizer.json"), "the tokenizer")
    if verify and tok_info.get("sha256") and tok_path.is_file() and file_sha256(tok_path) != tok_info["sha256"]:
        raise DataError(f"{tok_path} does not match meta.json (sha256 differs): the tokenizer was changed; {_fix(d)}")
    tok = load_tokenizer(tok_path)
    if tok.vocab_size != meta["vocab_size"]:
        raise DataError(
            f"{d / 'tokenizer.json'} has {tok.vocab_size} tokens but meta.json says {meta['vocab_size']}: "
            f"the files do not belong together; {_fix(d)}"
        )
    return Dataset(d, meta, tok)


def _read_meta(meta_path: Path, d: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{meta_path} is missing, so {d} is not a prepared dataset: "
            f"run `attnlab prepare --out {d}` (add --force to replace the folder)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(
            f"{meta_path} is not valid JSON ({type(e).__name__}): the dataset is corrupted; {_fix(d)}"
        ) from None
    required = ("format_version", "vocab_size", "dtype", "splits")
    if not isinstance(meta, dict) or any(k not in meta for k in required) or not isinstance(meta["splits"], dict):
        raise DataError(f"{meta_path} lacks required entries ({', '.join(required)}): {_fix(d)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{meta_path} has format_version {_show(meta['format_version'])}, this attnlab reads "
            f"{FORMAT_VERSION}: {_fix(d)}"
        )
    _check_structure(meta, meta_path, d)
    if "train" not in meta["splits"]:
        raise DataError(f"{meta_path} lists no train split: {_fix(d)}")
    return meta


def _show(value) -> str:
    from ..config import show

    return show(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_structure(meta: dict, meta_path: Path, d: Path) -> None:
    """The types load() relies on, so a tampered meta.json is one line, not a traceback deep inside."""

    def bad(what: str) -> DataError:
        return DataError(f"{meta_path} is damaged: {what}; {_fix(d)}")

    if not _count(meta["vocab_size"]) or meta["vocab_size"] < 1:
        raise bad(f"vocab_size {_show(meta['vocab_size'])} is not a positive integer")
    if not isinstance(meta["dtype"], str):
        raise bad(f"dtype {_show(meta['dtype'])} is not a name")
    for name, info in meta["splits"].items():
        if not isinstance(info, dict):
            raise bad(f"the {name} split is not an object ({_show(info)})")
        for key, ok, kind in (
            ("tokens", _count, "a count"),
            ("file", lambda v: isinstance(v, str), "a file name"),
            ("sha256", lambda v: isinstance(v, str), "a hex digest"),
        ):
            if key not in info and key != "file":
                raise bad(f"the {name} split has no {key!r}")
            if key in info and not ok(info[key]):
                raise bad(f"the {name} split's {key!r} {_show(info[key])} is not {kind}")
        for key in ("file", "labels_file"):
            if key in info:
                _local_file(d, info[key], f"the {name} split")
        for key in ("documents", "bytes", "chars") if meta.get("kind", "text") == "text" else ():
            if not _count(info.get(key)):  # the denominators of bits/byte and the mainrun number
                raise bad(f"the {name} split's {key!r} {_show(info.get(key))} is not a count")
    tok = meta.get("tokenizer") or {}  # image datasets have none
    if not isinstance(tok, dict):
        raise bad(f"tokenizer {_show(tok)} is not an object")
    if "file" in tok:
        _local_file(d, tok["file"], "the tokenizer")


def _local_file(d: Path, name, what: str) -> Path:
    """`d / name` for a plain file name from meta.json; anything that could leave the folder is refused."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\x00" in name:
        raise DataError(
            f"{d / 'meta.json'} names a file outside the dataset folder for {what} ({_show(name)}): "
            f"only plain file names inside {d} are read; {_fix(d)}"
        )
    return d / name


def _meta_dtype(meta: dict, meta_path: Path, d: Path) -> np.dtype:
    name = meta["dtype"]
    if name not in DTYPES:
        raise DataError(f"{meta_path} has unknown token dtype {name!r} (expected uint16 or uint32): {_fix(d)}")
    if np.dtype(name) != token_dtype(int(meta["vocab_size"])):
        raise DataError(
            f"{meta_path} says dtype {name} for vocab_size {meta['vocab_size']} "
            f"(expected {token_dtype(int(meta['vocab_size'])).name}): {_fix(d)}"
        )
    return np.dtype(name)


def _check_split(d: Path, name: str, info: dict, dtype: np.dtype, verify: bool) -> None:
    path = _local_file(d, info.get("file", f"{name}.bin"), f"the {name} split")
    if not path.is_file():
        raise DataError(f"{path} is missing (meta.json lists the {name} split): {_fix(d)}")
    size, expected = path.stat().st_size, int(info["tokens"]) * dtype.itemsize
    if size != expected:
        raise DataError(
            f"{path} does not match meta.json (size {size} bytes, expected {expected} = "
            f"{info['tokens']} tokens x {dtype.itemsize}): the file is truncated or corrupted; {_fix(d)}"
        )
    if verify and file_sha256(path) != info.get("sha256"):
        raise DataError(f"{path} does not match meta.json (sha256 differs): the file is corrupted; {_fix(d)}")


def _check_ids(path: Path, n_tokens: int, dtype: np.dtype, vocab_size: int, d: Path) -> None:
    """Every token id < vocab_size (an id beyond it would crash training at the step that reads it), chunk by chunk."""
    if not n_tokens:
        return
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))
    for start in range(0, n_tokens, ID_CHECK_CHUNK):
        chunk = ids[start : start + ID_CHECK_CHUNK]
        top = int(chunk.max())
        if top >= vocab_size:
            where = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{path} holds token id {top} (first bad one at position {where}) but the dataset's "
                f"vocab_size {vocab_size} allows ids 0..{vocab_size - 1}: the file is corrupted; {_fix(d)}"
            )
    del ids


def _check_labels(d: Path, name: str, info: dict, tokens_per_image: int, verify: bool) -> None:
    """An image split: whole images, a labels file with one int16 label per image, and (with `verify`) its sha256."""
    if info["tokens"] != info["images"] * tokens_per_image:
        raise DataError(
            f"meta.json says the {name} split has {info['tokens']} tokens, not {info['images']} images x "
            f"{tokens_per_image}: the dataset is corrupted; {_fix(d)}"
        )
    path = _local_file(d, info.get("labels_file", f"{name}.labels.npy"), f"the {name} split's labels")
    try:
        labels = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path} cannot be read ({type(e).__name__}): the labels of the {name} split are missing or "
            f"corrupted; {_fix(d)}"
        ) from None
    if labels.shape != (info["images"],) or labels.dtype != np.int16:
        raise DataError(
            f"{path} holds {labels.dtype}{list(labels.shape)}, expected int16 [{info['images']}]: "
            f"the file is corrupted; {_fix(d)}"
        )
    if verify and file_sha256(path) != info.get("labels_sha256"):
        raise DataError(f"{path} does not match meta.json (sha256 differs): the file is corrupted; {_fix(d)}")


def read_images(dataset, split: str) -> np.ndarray:
    """The images of a prepared split as uint8 [N, H, W, C] (`dataset`: a store.Dataset or its folder)."""
    ds = _image_dataset(dataset)
    img = ds.meta["image"]
    return from_sequence(ds.tokens(split), img["height"], img["width"], img["channels"]).astype(np.uint8)


def read_labels(dataset, split: str) -> np.ndarray:
    """The int16 labels of a prepared split (index into meta ``classes``, -1 = unlabelled)."""
    ds = _image_dataset(dataset)
    return np.load(ds.dir / ds.split_info(split)["labels_file"], allow_pickle=False)


def _image_dataset(dataset):
    ds = load(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    if ds.kind != "image":
        raise DataError(f"dataset {ds.dir} holds text, not images: prepare an image source (data.source=cifar10, ...)")
    return ds
