"""Text sources: named datasets and local files, turned into a list of documents.

``load_documents(cfg)`` returns the documents in a deterministic order plus a
provenance record (``Documents.info``) that ``store.prepare`` writes into
meta.json. Named sources:

- ``python-stdlib``: the running Python's standard library ``.py`` files (no download).
- ``hn-titles``: Hacker News titles (hub dataset ``julien040/hacker-news-posts``,
  or ``data.path`` = a local copy).
- ``shakespeare``: karpathy's tiny-shakespeare ``input.txt`` (URL download with
  checksum, or ``data.path``); one document per blank-line separated speech.
- ``arxiv-abstracts``: arXiv metadata JSON lines (hub dataset
  ``gfissore/arxiv-abstracts-2021``, or ``data.path`` = a snapshot such as
  ``arxiv-metadata-oai-snapshot.json``); document = title + newline + abstract.

``hf:NAME`` is any Hugging Face dataset (``load_hf``): a hub name or a local
``save_to_disk`` folder / parquet files. Anything else is a local file or
folder read with ``data.format``.
The only text normalisation is removing NUL characters: NUL is the
document separator of the byte tokenizer.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import socket
import sys
import sysconfig
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from ..files import file_digests

NAMED_SOURCES = ("python-stdlib", "hn-titles", "shakespeare", "arxiv-abstracts")
HF_PREFIX = "hf:"  # hf:NAME = any Hugging Face dataset (hub name or local save_to_disk/parquet path)
ARXIV_META = ("id", "categories", "authors", "update_date", "doi")  # kept per document for --export-hf
FORMATS = ("text", "lines", "jsonl", "csv", "tsv", "parquet", "arxiv")

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
HN_HUB = "julien040/hacker-news-posts"
ARXIV_HUB = "gfissore/arxiv-abstracts-2021"

DOWNLOAD_TIMEOUT_S = 15.0  # a URL download must fail fast when offline
PROBE_TIMEOUT_S = 5.0  # `datasets` retries for ~25 s offline; probe the hub first

# stdlib folders that are not "library code" (tests, GUIs, demos, installed packages)
STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}

_EXT_FORMAT = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}


@dataclass
class Documents:
    docs: list[str]  # one string per document, deterministic order
    info: dict = field(default_factory=dict)  # provenance for meta.json
    meta: list[dict] | None = None  # per-document fields (arXiv id, categories, ...) for --export-hf


def load_documents(cfg: DataConfig) -> Documents:
    """Load the documents of ``cfg.source`` (a named source or a local path)."""
    loaders = {
        "python-stdlib": _python_stdlib,
        "hn-titles": _hn_titles,
        "shakespeare": _shakespeare,
        "arxiv-abstracts": _arxiv_abstracts,
    }
    if cfg.source in loaders:
        result = loaders[cfg.source](cfg)
    elif cfg.source.startswith(HF_PREFIX):
        result = load_hf(cfg)
    else:
        result = _local(cfg)
    return _finish(result, cfg)


def _finish(result: Documents, cfg: DataConfig) -> Documents:
    """Strip NULs, drop empty documents, record counts; 0 documents is an error."""
    docs = [d.replace("\x00", "") if "\x00" in d else d for d in result.docs]
    n_empty = sum(1 for d in docs if not d)
    meta = None if result.meta is None else [m for d, m in zip(docs, result.meta, strict=True) if d]
    docs = [d for d in docs if d]
    if not docs:
        where = f" in {result.info['path']}" if result.info.get("path") else ""
        raise DataError(
            f"data source {cfg.source!r} gave 0 documents{where}: check the file content, data.format/data.field"
            + (" and data.categories" if cfg.categories else "")
        )
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.encode("utf-8", "surrogatepass") + b"\0")
    info = {"name": cfg.source, **result.info, "documents": len(docs), "documents_sha256": digest.hexdigest()}
    if n_empty:
        info["empty_documents_dropped"] = n_empty
    return Documents(docs, info, meta)


# ------------------------------------------------------------------ file I/O


def _read_raw(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}): check the path and its permissions") from None


def _gunzip(raw: bytes, path: Path) -> bytes:
    """Decompress gzip data (detected by magic number, so a `.gz` suffix is optional). A `.gz` file that is not
    gzip is refused: it is most often a download gone wrong (an error page), which must not become a dataset."""
    if raw[:2] != b"\x1f\x8b":
        if path.name.lower().endswith(".gz"):
            raise DataError(
                f"{path} is named .gz but is not gzip data (it starts with {raw[:16]!r}): re-download it, "
                "or rename it without .gz if it is plain text"
            )
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a valid gzip file ({e}): re-download or re-compress it") from None


def _read_bytes(path: Path) -> bytes:
    return _gunzip(_read_raw(path), path)


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: a leading BOM is encoding, not text
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {e.start}): convert it to UTF-8 (e.g. iconv -t UTF-8)"
        ) from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _strip_gz(name: str) -> str:
    return name[:-3] if name.lower().endswith(".gz") else name


def infer_format(path: Path) -> str:
    """`auto` format of a path: by extension after stripping `.gz`; folders and unknown extensions are `text`."""
    if path.is_dir():
        return "text"
    return _EXT_FORMAT.get(Path(_strip_gz(path.name)).suffix.lower(), "text")


# ------------------------------------------------------------- local files


def _local(cfg: DataConfig) -> Documents:
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {cfg.source!r} is neither a named source ({', '.join(NAMED_SOURCES)}) "
            f"nor an existing file or folder: fix data.source"
        )
    fmt = infer_format(path) if cfg.format == "auto" else cfg.format
    metas = [] if fmt == "arxiv" else None
    docs, info = read_path(path, fmt, cfg.field or "text", cfg.categories, metas)
    return Documents(docs, {"kind": "local", "format": fmt, **info}, metas)


def read_path(
    path: Path, fmt: str, field_: str = "text", categories: Iterable[str] = (), metas: list | None = None
) -> tuple[list[str], dict]:
    """Documents of a file or a folder (its files, sorted by relative path) in format `fmt`.

    ``metas``, a list, receives each arXiv document's metadata (format ``arxiv`` only)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data.format {fmt!r}: use one of auto, {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path} does not exist: pass an existing file or folder as data.path / data.source")
    files = _folder_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"folder {path} holds no files: point data.source at a folder of text files")
    docs: list[str] = []
    digest = hashlib.sha256()  # over (relative name, stored bytes) so a folder has one hash too
    for f in files:
        stored = _read_raw(f)
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        digest.update(rel.encode() + b"\0" + stored + b"\0")
        docs += _parse_file(f, _gunzip(stored, f), fmt, field_, list(categories), metas)
    info = {"path": str(path.resolve()), "sha256": digest.hexdigest()}
    if path.is_dir():
        info["files"] = len(files)
    return docs, info


def _folder_files(root: Path) -> list[Path]:
    """Regular files under `root`, sorted by relative path, skipping hidden ones."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath, n) for n in filenames if not n.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _parse_file(
    path: Path, data: bytes, fmt: str, field_: str, categories: list[str], metas: list | None = None
) -> list[str]:
    if fmt == "parquet":
        return _parquet(path, data, field_)
    text = _decode(data, path)
    if fmt == "text":
        return [text]
    if fmt == "lines":
        return _lines(text)
    if fmt == "jsonl":
        return _jsonl_field(_jsonl(text, path), field_, path)
    if fmt in ("csv", "tsv"):
        return _csv(text, path, field_, fmt)
    return _arxiv_docs(_jsonl(text, path), categories, path, metas)


def _lines(text: str) -> list[str]:
    """One document per non-blank line (line ending removed, nothing else)."""
    return [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()]


def _jsonl(text: str, path: Path) -> Iterator[dict]:
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {i} is not valid JSON ({e.msg}): fix the line, or use data.format=lines/text"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{path} line {i} is a JSON {type(rec).__name__}, not an object: write one JSON object per line"
            )
        yield rec


def _missing_field(path: Path, field_: str, available: Iterable[str]) -> DataError:
    avail = ", ".join(map(str, available)) or "(none)"
    return DataError(f"{path} has no field {field_!r} (available: {avail}): set data.field to one of them")


def _as_text(value, field_: str, path: Path, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataError(
        f"{path} {where}: field {field_!r} holds a {type(value).__name__}, not text: "
        "choose a text field with data.field"
    )


def _jsonl_field(records: Iterable[dict], field_: str, path: Path) -> list[str]:
    docs = []
    for i, rec in enumerate(records, 1):
        if field_ not in rec:
            raise _missing_field(path, field_, rec.keys())
        value = _as_text(rec[field_], field_, path, f"record {i}")
        if value is not None:
            docs.append(value)
    return docs


def _csv(text: str, path: Path, field_: str, fmt: str) -> list[str]:
    csv.field_size_limit(1 << 30)  # documents can be far longer than csv's 128 KiB default
    # TSV has no quoting convention: a title like `"Memory foam" approach` must stay verbatim.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
    if reader.fieldnames is None:
        return []
    if field_ not in reader.fieldnames:
        raise _missing_field(path, field_, reader.fieldnames)
    return [row[field_] for row in reader if row.get(field_) is not None]


def _parquet(path: Path, data: bytes, field_: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a readable parquet file ({reason}): check the file or data.format") from None
    if field_ not in table.column_names:
        raise _missing_field(path, field_, table.column_names)
    values = table.column(field_).to_pylist()
    return [_as_text(v, field_, path, "column") for v in values if v is not None]


# ------------------------------------------------------------ python-stdlib


def _python_stdlib(cfg: DataConfig) -> Documents:
    """The `.py` files of the standard library (or of the folder `data.path`), one document each."""
    root = Path(cfg.path).expanduser() if cfg.path else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(
            f"python-stdlib folder {root} does not exist: pass data.path=/path/to/lib/python3.X or unset data.path"
        )
    docs, skipped = [], 0
    digest = hashlib.sha256()
    for rel, path in _stdlib_files(root):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1  # a few test-like files are latin-1 on purpose
            continue
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        docs.append(text)
    info = {
        "kind": "builtin",
        "path": str(root),
        "files": len(docs),
        "skipped_not_utf8": skipped,
        "sha256": digest.hexdigest(),
        "sha256_of": "relpath NUL content NUL, per file in order",
    }
    if not cfg.path:
        info["python_version"] = sys.version.split()[0]
        info["python_implementation"] = sys.implementation.name
    return Documents(docs, info)


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDE and not d.startswith(".")]
        for n in filenames:
            if n.endswith(".py"):
                p = Path(dirpath, n)
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


# -------------------------------------------------------------- hn-titles


def _hn_titles(cfg: DataConfig) -> Documents:
    field_ = cfg.field or "title"
    if cfg.path:
        path = _existing(cfg.path, "hn-titles", "titles.txt.gz")
        fmt = _named_format(cfg, path, default="lines")
        docs, info = read_path(path, fmt, field_)
        info["format"] = fmt
    else:
        docs, info = _hub_column("hn-titles", HN_HUB, field_, "titles.txt.gz (one title per line)")
    titles = [t.strip() for t in docs]
    return Documents([t for t in titles if t], {"kind": "hn-titles", **info})


# ------------------------------------------------------------ shakespeare


def _shakespeare(cfg: DataConfig) -> Documents:
    if cfg.path:
        path = _existing(cfg.path, "shakespeare", "input.txt")
        raw = _read_bytes(path)
        origin = {"path": str(path.resolve())}
    else:
        path = _download("shakespeare", SHAKESPEARE_URL, SHAKESPEARE_SHA256, "input.txt")
        raw = path.read_bytes()
        origin = {"url": SHAKESPEARE_URL, "path": str(path)}
    sha, md5 = _sha256(raw), hashlib.md5(raw).hexdigest()
    if sha != SHAKESPEARE_SHA256:
        raise DataError(
            f"{path} is not tiny-shakespeare input.txt (sha256 {sha[:12]}... != {SHAKESPEARE_SHA256[:12]}...): "
            f"use the original file from {SHAKESPEARE_URL}"
        )
    text = _decode(raw, path)
    # Speeches are separated by blank lines: documents at that level allow a document-level split.
    docs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    return Documents(
        docs,
        {
            "kind": "shakespeare",
            **origin,
            "sha256": sha,
            "md5": md5,
            "checksum_ok": True,
            "document_unit": "blank-line separated paragraph (speech)",
        },
    )


# --------------------------------------------------------- arxiv-abstracts


def _arxiv_abstracts(cfg: DataConfig) -> Documents:
    metas: list | None = []
    if cfg.path:
        path = _existing(cfg.path, "arxiv-abstracts", "arxiv-metadata-oai-snapshot.json")
        fmt = "arxiv" if cfg.format == "auto" else cfg.format
        metas = metas if fmt == "arxiv" else None
        docs, info = read_path(path, fmt, cfg.field or "abstract", cfg.categories, metas)
    else:
        records, info = _hub_records("arxiv-abstracts", ARXIV_HUB, "arxiv-metadata-oai-snapshot.json (JSON lines)")
        docs = _arxiv_docs(records, cfg.categories, Path(ARXIV_HUB), metas)
    info["categories_filter"] = list(cfg.categories)
    return Documents(docs, {"kind": "arxiv-abstracts", **info}, metas)


def _arxiv_docs(records: Iterable[dict], categories: list[str], path: Path, metas: list | None = None) -> list[str]:
    """Title + newline + abstract per record; ``metas`` (a list) also receives its ARXIV_META fields."""
    docs = []
    for rec in records:
        missing = [k for k in ("title", "abstract") if k not in rec]
        if missing:
            raise _missing_field(path, missing[0], rec.keys())
        if categories and not _category_match(rec.get("categories"), categories):
            continue
        title = " ".join((rec["title"] or "").split())
        docs.append(title + "\n" + (rec["abstract"] or "").strip())
        if metas is not None:
            metas.append({k: _meta_text(rec[k]) for k in ARXIV_META if k in rec})
    return docs


def _meta_text(value) -> str | None:
    """A metadata value as text: lists (the hub's categories) joined by spaces, as in the arXiv snapshot."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _category_match(cats, filters: list[str]) -> bool:
    """Any category equals a filter or lies under it (`cs` matches `cs.LG`, `math` does not match `math-ph`)."""
    if isinstance(cats, str):
        cats = cats.split()
    names = [c for item in (cats or []) for c in str(item).split()]
    return any(c == f or c.startswith(f + ".") for c in names for f in filters)


# --------------------------------------------------------------- helpers


def _existing(path: str, source: str, example: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"data.path {path!r} for {source} does not exist: pass data.path=/path/to/{example} (a local copy)"
        )
    return p


def _named_format(cfg: DataConfig, path: Path, default: str) -> str:
    """Format of a named source's local copy: explicit, else by extension, else the source's native one."""
    if cfg.format != "auto":
        return cfg.format
    fmt = infer_format(path)
    return default if fmt == "text" else fmt


def cache_dir() -> Path:
    """Download cache (``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``)."""
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab")


def _no_network(source: str, reason: str, example: str) -> DataError:
    reason = " ".join(str(reason).split())[:160]
    return DataError(
        f"cannot download {source} (no network: {reason}): pass data.path=/path/to/{example} (a local copy)"
    )


def _fetch(url: str, timeout: float) -> bytes:
    """GET `url` (kept separate so tests can simulate being offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _download(source: str, url: str, digest: str, filename: str, algorithm: str = "sha256") -> Path:
    """A copy of `url` in the cache whose `algorithm` digest is `digest`, downloading it once."""
    target = cache_dir() / source / filename
    if target.is_file() and file_digests(target, algorithm)[0] == digest:
        return target
    try:
        raw = _fetch(url, DOWNLOAD_TIMEOUT_S)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise _no_network(source, getattr(e, "reason", e), filename) from None
    got = hashlib.new(algorithm, raw).hexdigest()
    if got != digest:
        raise DataError(
            f"download of {url} has the wrong {algorithm} (got {got[:12]}...): "
            f"retry later or pass data.path=/path/to/{filename} (a verified local copy)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(raw)
    os.replace(tmp, target)  # atomic: a half-written download never looks cached
    return target


def _probe_hub() -> None:
    """Fail fast when the hub is unreachable (`datasets` itself retries for ~25 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "",
        "0",
    ):
        return  # offline mode: let `datasets` use its cache
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    with socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S):
        pass


def _load_hub(source: str, name: str, example: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"loading {source} from the hub needs the `datasets` package: pip install 'attnlab[data]', "
            f"or pass data.path=/path/to/{example.split()[0]} (a local copy)"
        ) from None
    try:
        _probe_hub()
        return datasets.load_dataset(name, split="train")
    except Exception as e:  # datasets raises many types (ConnectionError, hub errors, FileNotFoundError...)
        raise _no_network(source, f"{type(e).__name__}: {e}", example) from None


def _hub_info(ds, name: str) -> dict:
    return {"hub_dataset": name, "split": "train", "rows": len(ds), "fingerprint": getattr(ds, "_fingerprint", None)}


def _hub_column(source: str, name: str, field_: str, example: str) -> tuple[list[str], dict]:
    ds = _load_hub(source, name, example)
    if field_ not in ds.column_names:
        raise _missing_field(Path(name), field_, ds.column_names)
    docs = [v for v in ds[field_] if isinstance(v, str)]
    return docs, _hub_info(ds, name)


def _hub_records(source: str, name: str, example: str) -> tuple[Iterator[dict], dict]:
    ds = _load_hub(source, name, example)
    return iter(ds), _hub_info(ds, name)


# ------------------------------------------------------------------ hf:NAME
# Any Hugging Face dataset, through `datasets`: a hub name (data.config, data.split), or a local copy:
# a folder written by Dataset/DatasetDict.save_to_disk, a parquet file, or a folder of parquet files
# (data.path names a local copy of a hub dataset). data.field is the text column (default `text`);
# the other scalar columns travel with each document as its metadata (for --export-hf).

HF_EXAMPLE = "a local copy (a save_to_disk folder or parquet files)"


def load_hf(cfg: DataConfig) -> Documents:
    name = cfg.source[len(HF_PREFIX) :]
    if not name:
        raise DataError("data.source='hf:' names no dataset: use hf:NAME (a hub dataset) or hf:/path/to/folder")
    datasets = _import_datasets(cfg.source)
    local = Path(cfg.path or name).expanduser()
    if (cfg.path or name.startswith(("/", ".", "~"))) and not local.exists():
        raise DataError(
            f"{local} (for {cfg.source}) does not exist: pass an existing path, or data.path=/path/to/{HF_EXAMPLE}"
        )
    split = cfg.split or "train"
    if local.exists():
        ds, origin = _hf_load_local(datasets, local, split, cfg.config), {"path": str(local.resolve())}
    else:
        ds, origin = _hf_load_hub(datasets, cfg.source, name, split, cfg.config), {"hub_dataset": name}
    field_ = cfg.field or "text"
    if field_ not in ds.column_names:
        raise _missing_field(Path(cfg.source), field_, ds.column_names)
    docs, metas = _hf_rows(ds, field_, cfg.source)
    info = {
        "kind": "hf",
        **origin,
        "split": split,
        "config": cfg.config,
        "field": field_,
        "rows": len(ds),
        "fingerprint": getattr(ds, "_fingerprint", None),
    }
    return Documents(docs, info, metas)


def _import_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source} needs the `datasets` package: pip install 'attnlab[data]'") from None
    return datasets


def _hf_load_local(datasets, path: Path, split: str, config: str | None):
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
        raise DataError(
            f"{path} is not a readable Hugging Face dataset ({reason}): pass a save_to_disk folder or parquet files"
        ) from None


def _pick_split(dd, split: str, path: Path):
    if split not in dd:
        raise DataError(f"{path} has no split {split!r}: set data.split to one of {', '.join(dd)}")
    return dd[split]


def _hf_load_hub(datasets, source: str, name: str, split: str, config: str | None):
    try:
        _probe_hub()
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline: ConnectionError, OSError, hub errors...
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise DataError(
            f"cannot load {source} from the Hugging Face hub (no network or no such dataset: {reason}): "
            f"pass data.path=/path/to/{HF_EXAMPLE}"
        ) from None


def _hf_rows(ds, field_: str, source: str) -> tuple[list[str], list[dict]]:
    """The text column as documents; the other scalar columns as each document's metadata."""
    keep = [c for c, feature in ds.features.items() if c != field_ and _is_scalar_feature(feature)]
    texts = list(ds[field_])  # plain lists: indexing a `datasets` column row by row is slow
    bad = next((v for v in texts if not isinstance(v, (str, type(None)))), None)
    if bad is not None:
        raise DataError(
            f"{source}: column {field_!r} holds {type(bad).__name__}, not text: choose a text column with data.field"
        )
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
