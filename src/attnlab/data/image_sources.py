"""Image sources: readers of CIFAR-10, digits, image folders and downsampled ImageNet; split selection; writing.

Sources (``data.source``):

- ``cifar10``: CIFAR-10 from ``data.path``, which may be the official
  ``cifar-10-python.tar.gz`` or ``cifar-10-binary.tar.gz`` (MD5 checked), an
  extracted ``cifar-10-batches-py`` folder (pickled batches, read by an
  unpickler that only rebuilds numpy arrays), an extracted
  ``cifar-10-batches-bin`` folder (records of 1 label byte + 3072 pixel bytes),
  or a folder of ``.npz`` files with ``x`` [N, 3072] uint8 and ``y`` [N] (a
  file whose name contains ``test`` holds the test set). Every CIFAR row is
  1024 red, then 1024 green, then 1024 blue bytes, each plane 32x32 row-major.
  Without ``data.path`` the python archive is downloaded once into the cache.
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download);
  grey levels 0..16 become round(v * 255 / 16), one channel.
- ``image-folder``: ``data.path`` = a folder of png/jpg/jpeg/bmp/gif/webp files,
  converted to RGB, centre-cropped to a square and resized (LANCZOS) to
  ``data.image_size`` (default 32). First-level subfolders are classes; top-level
  ``train``/``val``/``test`` folders, when present, are the splits (and only they
  are read).
- ``imagenet-downsampled``: ``data.path`` = a folder (searched recursively) of
  Chrabaszcz et al.'s ``train_data_batch_*.npz`` and ``val_data.npz``, arrays
  ``data`` [N, 3*S*S] in R, G, B planes and 1-based ``labels``; S is inferred
  from the row length. Class names are those 1-based label numbers.

Splits: the source's own test set is ``test`` (digits carves a seeded
``DIGITS_TEST_FRAC`` of its images instead; an image folder without split
folders has no test split). The remaining training pool is shuffled with
``data.seed``, capped at ``data.max_docs`` images, and its first
round(val_frac * n) images become ``val`` (unless the source has a val folder).
``data.classes`` keeps only some classes (labels are renumbered in that order);
``data.image_size`` shrinks images by exact box averaging (never upsamples).

Writing: images are serialised by ``image_format.to_sequence`` and concatenated
with no separator into ``{split}.bin`` (uint16 tokens, vocabulary 256, the
store's format); ``{split}.labels.npy`` holds one int16 label per image (index
into meta ``classes``; -1 = unlabelled). Sources are read one part (file) at a
time, so only one part's pixels are in memory while writing. Reading a prepared
image split back: ``store.read_images`` / ``store.read_labels``.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import re
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..files import file_digests, file_sha256
from . import sources
from .image_format import LABEL_DTYPE, TOKEN_DTYPE, VOCAB_SIZE, to_sequence

IMAGE_SOURCES = ("cifar10", "digits", "image-folder", "imagenet-downsampled")
BLOCK_IMAGES = 4096  # images converted and written at a time

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",  # published on the CIFAR page
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
}
CIFAR_ROW = 3 * 32 * 32
CIFAR_PY_BATCH = re.compile(r"(data_batch_\d+|test_batch)")
CIFAR_BIN_BATCH = re.compile(r"(data_batch_\d+|test_batch)\.bin")
CIFAR_LAYOUTS = (
    "cifar-10-python.tar.gz, cifar-10-binary.tar.gz, a cifar-10-batches-py/-bin folder or a folder of .npz files"
)

DIGITS_TEST_FRAC = 0.1
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGENET_CLASSES = 1000
IMAGENET_SIZES = (8, 16, 32, 64)


@dataclass
class Part:
    """Images from one file or folder: labels up front, pixels on demand (one part in memory at a time)."""

    split: str | None  # the source's own split, None = training pool
    labels: np.ndarray  # int64 [N], index into ImageSource.classes, -1 = none
    blocks: Callable[[np.ndarray], Iterator[np.ndarray]]  # sorted rows -> uint8 [n, H, W, C] blocks in that order


@dataclass
class ImageSource:
    parts: list[Part]
    shape: tuple[int, int, int]  # (H, W, C) of the images the parts yield
    classes: list[str]  # label index -> name ([] = unlabelled)
    info: dict  # provenance for meta.json
    test_frac: float = 0.0  # carve this seeded fraction as test (sources without a test set)


# ----------------------------------------------------------- transforms


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Shrink square uint8 [N, S, S, C] images to size x size.

    Exact box averaging (rounded half up) when `size` divides S, so block-constant
    images keep their values; otherwise PIL's BOX filter.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    if size > min(h, w):
        raise ValueError(f"cannot downsample {h}x{w} images to {size}x{size}")
    if h % size == 0 and w % size == 0:
        fh, fw = h // size, w // size
        total = images.reshape(n, size, fh, size, fw, c).sum(axis=(2, 4), dtype=np.uint32)
        return ((total + fh * fw // 2) // (fh * fw)).astype(np.uint8)
    from PIL import Image

    out = [
        np.asarray(Image.fromarray(im[..., 0] if c == 1 else im).resize((size, size), Image.Resampling.BOX))
        for im in images
    ]
    return np.stack(out).reshape(n, size, size, c)


def _planes_to_hwc(rows: np.ndarray, size: int = 32) -> np.ndarray:
    """Rows of R, G and B planes (CIFAR's and downsampled ImageNet's layout) -> [N, S, S, 3]."""
    return rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


def _array_part(
    split: str | None, labels: np.ndarray, pixels: Callable[[], np.ndarray], to_hwc: Callable[[np.ndarray], np.ndarray]
) -> Part:
    """A part whose pixels are one array (`pixels()` loads it once per write), yielded in blocks."""

    def blocks(rows: np.ndarray) -> Iterator[np.ndarray]:
        x = pixels()
        for i in range(0, len(rows), BLOCK_IMAGES):
            yield to_hwc(x[rows[i : i + BLOCK_IMAGES]])

    return Part(split, labels.astype(np.int64), blocks)


# ------------------------------------------------------------------ cifar10


def _cifar10(cfg: DataConfig) -> ImageSource:
    path = Path(cfg.path).expanduser() if cfg.path else _cifar_download()
    if not path.exists():
        raise DataError(
            f"data.path {cfg.path!r} for cifar10 does not exist: pass data.path=/path/to/{CIFAR_ARCHIVE} "
            f"(or {CIFAR_LAYOUTS})"
        )
    parts, info = _cifar_archive(path) if path.is_file() else _cifar_folder(path)
    if not any(p.split == "train" for p in parts):
        raise DataError(
            f"{path} holds no CIFAR-10 training batch (data_batch_N / a train .npz): pass the complete "
            f"dataset as data.path ({CIFAR_LAYOUTS})"
        )
    return ImageSource(parts, (32, 32, 3), list(CIFAR_CLASSES), {"name": "cifar10", **info})


def _cifar_download() -> Path:
    """The official python archive from the cache, downloading (and MD5-checking) it once."""
    return sources._download("cifar10", CIFAR_URL, CIFAR_MD5[CIFAR_ARCHIVE], CIFAR_ARCHIVE, algorithm="md5")


def _cifar_archive(path: Path) -> tuple[list[Part], dict]:
    """The official tar.gz (python or binary version), checked against its published MD5."""
    md5, sha = file_digests(path, "md5", "sha256")
    if md5 not in CIFAR_MD5.values():
        raise DataError(
            f"{path} is not an official CIFAR-10 archive (md5 {md5} matches neither {' nor '.join(CIFAR_MD5)}): "
            "re-download it from https://www.cs.toronto.edu/~kriz/cifar.html or pass an extracted folder"
        )
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and (CIFAR_PY_BATCH.fullmatch(name) or CIFAR_BIN_BATCH.fullmatch(name)):
                    batches[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable tar.gz ({e}): re-download it") from None
    fmt = "cifar-10-binary" if any(CIFAR_BIN_BATCH.fullmatch(n) for n in batches) else "cifar-10-python"
    parts, files = _cifar_batches(batches, fmt, path)
    return parts, {"format": f"{fmt} archive", "path": str(path.resolve()), "md5": md5, "sha256": sha, "files": files}


def _cifar_folder(path: Path) -> tuple[list[Part], dict]:
    """An extracted batches folder (or its parent), or a folder of .npz files."""
    for sub in ("cifar-10-batches-py", "cifar-10-batches-bin"):
        if (path / sub).is_dir():
            path = path / sub
            break
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    info = {"path": str(path.resolve())}
    for fmt, pattern in (("cifar-10-binary", CIFAR_BIN_BATCH), ("cifar-10-python", CIFAR_PY_BATCH)):
        found = [n for n in names if pattern.fullmatch(n)]
        if found:
            parts, files = _cifar_batches({n: _read_file(path / n) for n in found}, fmt, path)
            return parts, {"format": f"{fmt} folder", **info, "files": files}
    npz = [n for n in names if n.endswith(".npz")]
    if not npz:
        raise DataError(
            f"{path} holds no CIFAR-10 files (data_batch_N, data_batch_N.bin or .npz): pass data.path = {CIFAR_LAYOUTS}"
        )
    parts, files = [], []
    for n in _natural_sorted(npz):
        part, record, _ = _npz_part(path / n, "x", "y", "test" if "test" in n else "train", _cifar_row_size)
        parts.append(part)
        files.append(record)
    return parts, {"format": "npz folder (x: R,G,B planes of 32x32; y: label)", **info, "files": files}


def _cifar_row_size(path: Path, width: int) -> int:
    if width != CIFAR_ROW:
        raise DataError(
            f"{path}: array 'x' has rows of {width} bytes, expected {CIFAR_ROW} (R, G, B planes of 32x32): "
            "the file is not CIFAR-10; pass a folder of CIFAR-10 .npz files"
        )
    return 32


def _cifar_batches(batches: dict[str, bytes], fmt: str, where: Path) -> tuple[list[Part], list[dict]]:
    """Parts of the named batch files (train batches in numeric order, then the test batch)."""
    parse = _parse_binary if fmt == "cifar-10-binary" else _parse_pickled
    parts, files = [], []
    for name in _natural_sorted(batches):
        x, y = parse(batches[name], where / name)
        _check_labels(y, len(CIFAR_CLASSES), where / name)
        split = "test" if name.startswith("test_batch") else "train"
        parts.append(_array_part(split, y, lambda x=x: x, _planes_to_hwc))
        files.append(
            {"name": name, "sha256": hashlib.sha256(batches[name]).hexdigest(), "images": len(y), "split": split}
        )
    return parts, files


def _parse_binary(raw: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes."""
    record = 1 + CIFAR_ROW
    if not raw or len(raw) % record:
        raise DataError(
            f"{path} is truncated or not a CIFAR-10 binary batch ({len(raw)} bytes is not a positive "
            f"multiple of {record}-byte records): re-download or re-extract cifar-10-binary.tar.gz"
        )
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return arr[:, 1:], arr[:, 0]


class _BatchUnpickler(pickle.Unpickler):
    """Reads CIFAR batches: the only globals allowed rebuild numpy arrays and bytes, nothing else."""

    _reconstruct = np.zeros(0).__reduce__()[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # pickled by numpy 1.x (the official files)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # pickled by numpy 2.x
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }  # bytes, as Python 3 pickles them

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _parse_pickled(raw: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A pickled batch: a dict with b'data' [N, 3072] uint8 and b'labels' (list of N ints)."""
    fix = "re-download or re-extract cifar-10-python.tar.gz"
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # corrupt pickles raise anything (EOFError, UnpicklingError, ValueError, struct.error, ...)
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise DataError(
            f"{path} is not a readable CIFAR-10 batch ({reason[:160]}): the file is truncated or corrupted; {fix}"
        ) from None
    if isinstance(batch, dict):
        batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch (no dict with 'data' and 'labels'): {fix}")
    x, y = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != CIFAR_ROW or y.shape != (len(x),):
        raise DataError(
            f"{path} has data {x.dtype}{list(x.shape)} and {y.size} labels, expected uint8 [N, {CIFAR_ROW}] "
            f"and N labels: the file is truncated or not CIFAR-10; {fix}"
        )
    return x, y


def _check_labels(y: np.ndarray, n_classes: int, path: Path, first: int = 0) -> None:
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < first or y.max() >= first + n_classes):
        raise DataError(
            f"{path} has labels outside {first}..{first + n_classes - 1} (found {y.min()}..{y.max()}): "
            "the file is corrupted or from another dataset"
        )


# ------------------------------------------------------------------- npz


def _npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz, read from its header without decompressing the data."""
    try:
        with zipfile.ZipFile(path) as z:
            if f"{key}.npy" not in z.namelist():
                have = ", ".join(n[:-4] for n in z.namelist() if n.endswith(".npy")) or "none"
                raise DataError(f"{path} has no array {key!r} (arrays: {have}): pass .npz files of the expected layout")
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = getattr(np.lib.format, "read_array_header_{}_{}".format(*version))(f)
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise DataError(
            f"{path} is not a readable .npz file ({type(e).__name__}: {e}): the file is truncated or "
            "corrupted; replace it"
        ) from None
    return shape, dtype


def _npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:  # bad CRC/zlib data, pickled objects, ...
        raise DataError(
            f"{path}: array {key!r} cannot be read ({type(e).__name__}: {e}): the file is truncated or "
            "corrupted; replace it"
        ) from None


def _npz_part(
    path: Path,
    x_key: str,
    y_key: str,
    split: str,
    row_size: Callable[[Path, int], int],
    label_base: int = 0,
    n_classes: int = len(CIFAR_CLASSES),
) -> tuple[Part, dict, int]:
    """A part from one .npz (pixel rows `x_key` in R, G, B planes, read lazily; labels `y_key`), its record and S."""
    (x_shape, x_dtype), (y_shape, _) = _npz_header(path, x_key), _npz_header(path, y_key)
    if len(x_shape) != 2 or x_dtype != np.uint8:
        raise DataError(
            f"{path}: array {x_key!r} is {x_dtype}{list(x_shape)}, expected uint8 [N, 3*S*S] rows: "
            "pass .npz files of the expected layout"
        )
    size = row_size(path, x_shape[1])
    if y_shape != (x_shape[0],):
        raise DataError(
            f"{path}: {x_shape[0]} images but {y_key!r} has shape {list(y_shape)}: the file is corrupted; replace it"
        )
    y = _npz_array(path, y_key)
    _check_labels(y, n_classes, path, label_base)
    part = _array_part(
        split, y.astype(np.int64) - label_base, lambda: _npz_array(path, x_key), lambda rows: _planes_to_hwc(rows, size)
    )
    return part, {"name": path.name, "sha256": file_sha256(path), "images": int(x_shape[0]), "split": split}, size


def _natural_sorted(names) -> list[str]:
    """`batch_2` before `batch_10`, test files after the training files."""

    def key(n: str):
        return ("test" in n, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])

    return sorted(names, key=key)


# ---------------------------------------------------------------- digits


def _digits(cfg: DataConfig) -> ImageSource:
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits source needs scikit-learn: pip install 'attnlab[data]' (or scikit-learn)") from None
    if cfg.path:
        raise DataError("digits is bundled with scikit-learn and reads no file: unset data.path")
    d = load_digits()
    x = ((d.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)[..., None]  # round(v * 255 / 16), half up
    part = _array_part(None, d.target, lambda: x, lambda rows: rows)
    info = {
        "name": "digits",
        "format": "sklearn.datasets.load_digits (grey 0..16 -> round(v*255/16))",
        "sklearn_version": sklearn.__version__,
        "images": len(x),
        "sha256": hashlib.sha256(x.tobytes()).hexdigest(),
        "test_split": f"seeded {DIGITS_TEST_FRAC:.0%} carved before max_docs and val (no official test set)",
    }
    return ImageSource([part], (8, 8, 1), [str(i) for i in range(10)], info, test_frac=DIGITS_TEST_FRAC)


# ---------------------------------------------------------- image-folder


def _image_folder(cfg: DataConfig) -> ImageSource:
    if not cfg.path:
        raise DataError(
            "image-folder needs data.path=/path/to/folder (of images, optionally in class or train/val/test folders)"
        )
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.path {cfg.path!r} for image-folder is not a folder: pass data.path=/path/to/folder of images"
        )
    size = cfg.image_size or 32
    groups = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()} or {None: root}
    if "train" not in groups and None not in groups:
        raise DataError(
            f"{root} has {'/'.join(groups)} folders but no train folder: add {root / 'train'} or flatten the splits"
        )
    listed = {split: _image_files(folder) for split, folder in groups.items()}
    classes = sorted({cls for files in listed.values() for _, cls in files if cls is not None})
    index = {c: i for i, c in enumerate(classes)}
    parts, digest, n_files = [], hashlib.sha256(), 0
    for split, files in listed.items():
        labels = np.array([index.get(c, -1) for _, c in files], dtype=np.int64)
        paths = [p for p, _ in files]
        for p in paths:
            digest.update(p.relative_to(root).as_posix().encode() + b"\0" + _read_file(p) + b"\0")
        parts.append(Part(split, labels, lambda rows, paths=paths: _decode_blocks(paths, rows, size)))
        n_files += len(paths)
    info = {
        "name": "image-folder",
        "format": f"image files -> RGB, centre square crop, LANCZOS to {size}x{size}",
        "path": str(root.resolve()),
        "files": n_files,
        "splits_from_folders": None not in groups,
        "sha256": digest.hexdigest(),
        "sha256_of": "relpath NUL content NUL, per file in order",
    }
    return ImageSource(parts, (size, size, 3), classes, info)


def _image_files(folder: Path) -> list[tuple[Path, str | None]]:
    """Image files under `folder` (sorted, hidden skipped) with their class: the first-level subfolder, if any."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, n) for n in filenames if not n.startswith(".") and n.lower().endswith(IMAGE_EXTS)]
    if not found:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)}): point data.path at a folder of images")
    files = [
        (p, p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None)
        for p in sorted(found, key=lambda p: p.relative_to(folder).as_posix())
    ]
    loose = [p for p, c in files if c is None]
    if loose and len(loose) < len(files):
        raise DataError(
            f"{folder} mixes loose images ({loose[0].name}, ...) with class folders: "
            "move every image into a class folder, or use no class folders"
        )
    return files


def _decode_blocks(paths: list[Path], rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(rows), BLOCK_IMAGES):
        yield np.stack([_decode(paths[r], size) for r in rows[i : i + BLOCK_IMAGES]])


def _decode(path: Path, size: int) -> np.ndarray:
    """RGB, centre-cropped to a square, LANCZOS-resized to size x size (never upsampled)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}): remove or replace the file") from None
    w, h = im.size
    side = min(w, h)
    if side < size:
        raise DataError(
            f"image {path} is {w}x{h}, smaller than {size}x{size} and upsampling is refused: "
            "remove the image or lower data.image_size"
        )
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS, box=box), dtype=np.uint8)


# -------------------------------------------------- imagenet-downsampled


def _imagenet(cfg: DataConfig) -> ImageSource:
    example = "Imagenet32_train_npz (folder of train_data_batch_*.npz and val_data.npz)"
    if not cfg.path:
        raise DataError(f"imagenet-downsampled needs data.path=/path/to/{example}")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.path {cfg.path!r} for imagenet-downsampled is not a folder: pass data.path=/path/to/{example}"
        )
    found = {p.relative_to(root).as_posix(): p for p in root.rglob("*.npz")}
    train = _natural_sorted([n for n, p in found.items() if p.name.startswith("train_data_batch")])
    test = _natural_sorted([n for n, p in found.items() if p.name.startswith("val_data")])
    if not train:
        raise DataError(f"{root} holds no train_data_batch_*.npz: pass data.path=/path/to/{example}")
    parts, files, sizes = [], [], set()
    for name in train + test:
        part, record, size = _npz_part(
            found[name],
            "data",
            "labels",
            "test" if name in test else "train",
            _imagenet_size,
            label_base=1,
            n_classes=IMAGENET_CLASSES,
        )
        sizes.add(size)
        parts.append(part)
        files.append({**record, "name": name})
    if len(sizes) > 1:
        raise DataError(f"{root} mixes image sizes {sorted(sizes)}: keep the batches of one resolution in the folder")
    size = sizes.pop()
    info = {
        "name": "imagenet-downsampled",
        "format": f"downsampled-ImageNet npz ({size}x{size}; labels 1..1000)",
        "path": str(root.resolve()),
        "files": files,
    }
    return ImageSource(parts, (size, size, 3), [str(i) for i in range(1, IMAGENET_CLASSES + 1)], info)


def _imagenet_size(path: Path, width: int) -> int:
    size = int(round((width / 3) ** 0.5))
    if size not in IMAGENET_SIZES or 3 * size * size != width:
        raise DataError(
            f"{path}: array 'data' has rows of {width} bytes, not 3*S*S for S in {IMAGENET_SIZES}: "
            "the file is not a downsampled-ImageNet batch; pass a folder of them"
        )
    return size


# ------------------------------------------------------------- selection

LOADERS = {"cifar10": _cifar10, "digits": _digits, "image-folder": _image_folder, "imagenet-downsampled": _imagenet}


def load_source(cfg: DataConfig) -> ImageSource:
    """The image source named by ``cfg.source`` (labels read, pixels on demand)."""
    return LOADERS[cfg.source](cfg)


def class_ids(wanted: list, classes: list[str], source: str) -> list[int]:
    """Label indices for `data.classes` entries: a class name, or else a label number (unless names are numbers)."""
    if wanted and not classes:
        raise DataError(
            f"{source} images have no classes, so data.classes cannot select any: unset data.classes "
            "(or put the images into class folders)"
        )
    numeric = all(c.isdigit() for c in classes)
    ids = []
    for w in map(str, wanted):
        if w in classes:
            ids.append(classes.index(w))
        elif w.isdigit() and not numeric and int(w) < len(classes):
            ids.append(int(w))
        else:
            shown = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
            numbers = "" if numeric else f" or label numbers 0..{len(classes) - 1}"
            raise DataError(f"unknown class {w!r} for {source}: use class names ({shown}){numbers} in data.classes")
    return sorted(set(ids))


def select(src: ImageSource, cfg: DataConfig) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """Split -> global image indices (over the concatenated parts), the kept class names, and every image's new label.

    test: the source's test part(s), or a seeded `test_frac` of the pool, cut to its first
    data.max_test images if set; the pool
    (training parts) is shuffled with data.seed, capped at data.max_docs, and val
    is its first round(val_frac * n) images unless the source has a val part.
    """
    labels = np.concatenate([p.labels for p in src.parts])
    ids = class_ids(cfg.classes, src.classes, cfg.source) if cfg.classes else list(range(len(src.classes)))
    remap = np.full(len(src.classes) + 1, -1, dtype=np.int64)  # the extra last slot maps label -1 to -1
    remap[ids] = np.arange(len(ids))
    keep = labels < 0 if not src.classes else np.isin(labels, ids)
    split_of = np.concatenate([np.full(len(p.labels), p.split or "train") for p in src.parts])
    pool = np.flatnonzero(keep & (split_of == "train"))
    pool = pool[np.random.default_rng(cfg.seed).permutation(len(pool))]
    splits = {"test": np.flatnonzero(keep & (split_of == "test")), "val": np.flatnonzero(keep & (split_of == "val"))}
    if src.test_frac:
        splits["test"], pool = _carve(pool, src.test_frac, "test", "select more data.classes")
    splits["test"] = splits["test"][: cfg.max_test]
    if cfg.max_docs is not None:
        pool = pool[: cfg.max_docs]
    if not len(splits["val"]):
        splits["val"], pool = _carve(
            pool, cfg.val_frac, "val", "raise data.max_docs, select more data.classes or set data.val_frac=0"
        )
    if not len(pool):
        raise DataError(
            f"no training images left from {cfg.source} after data.classes/data.max_docs: "
            "select more classes or raise data.max_docs"
        )
    splits["train"] = pool
    order = {s: splits[s] for s in ("train", "val", "test") if len(splits[s])}
    return order, [src.classes[i] for i in ids], remap[labels]


def _carve(pool: np.ndarray, frac: float, name: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """The first round(frac * n) of the shuffled pool (at least 1 when frac > 0), and the rest."""
    n = len(pool)
    k = round(frac * n)
    if frac > 0:
        if n < 2:
            raise DataError(f"only {n} image(s) left, too few to carve a {name} split: {fix}")
        k = min(max(k, 1), n - 1)
    return pool[:k], pool[k:]


# ----------------------------------------------------------------- write


def write_dataset(cfg: DataConfig, out: Path, progress: bool = True) -> dict:
    """Read ``cfg.source``, select the splits and write ``{split}.bin`` + ``{split}.labels.npy`` into `out`.

    Returns the meta.json entries of an image dataset (the store adds the common header).
    """
    if cfg.max_bytes is not None:
        raise DataError("data.max_bytes caps text sources: for images use data.max_docs (a number of training images)")
    src = load_source(cfg)
    h, w, c = src.shape
    size = cfg.image_size or h
    if size > h:
        raise DataError(
            f"data.image_size={size} is larger than the {h}x{w} images of {cfg.source} and upsampling "
            f"is refused: use data.image_size <= {h} or unset it"
        )
    splits, classes, labels = select(src, cfg)
    split_meta = _write_splits(src, splits, labels, out, (size, size, c), progress)
    return {
        "kind": "image",
        "source": src.info,
        "image": {"height": size, "width": size, "channels": c},
        "tokens_per_image": size * size * c,
        "classes": classes,
        "vocab_size": VOCAB_SIZE,
        "dtype": TOKEN_DTYPE.name,
        "tokenizer": None,
        "splits": split_meta,
    }


def _write_splits(
    src: ImageSource,
    splits: dict[str, np.ndarray],
    labels: np.ndarray,
    out: Path,
    shape: tuple[int, int, int],
    progress: bool,
) -> dict:
    """Fill the split files part by part (each part's pixels loaded once), then label files and hashes."""
    from tqdm.auto import tqdm

    tokens = int(np.prod(shape))
    names = list(splits)
    split_id = np.full(len(labels), -1)  # per global image: which split it goes to, and where in it
    slot = np.zeros(len(labels), dtype=np.int64)
    for i, g in enumerate(splits.values()):
        split_id[g], slot[g] = i, np.arange(len(g))
    files = [np.memmap(out / f"{s}.bin", dtype=TOKEN_DTYPE, mode="w+", shape=(len(splits[s]), tokens)) for s in names]
    bar = tqdm(
        total=sum(map(len, splits.values())),
        desc="write images",
        unit="img",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    start = 0
    for part in src.parts:
        rows = np.flatnonzero(split_id[start : start + len(part.labels)] >= 0)
        done = 0
        for block in part.blocks(rows) if len(rows) else ():
            seq = to_sequence(downsample(block, shape[0]))
            g = start + rows[done : done + len(seq)]
            for i, f in enumerate(files):
                mine = split_id[g] == i
                f[slot[g[mine]]] = seq[mine]
            done += len(seq)
            bar.update(len(seq))
        start += len(part.labels)
    bar.close()
    for f in files:
        f.flush()
    del files
    meta = {}
    for s, g in splits.items():
        np.save(out / f"{s}.labels.npy", labels[g].astype(LABEL_DTYPE), allow_pickle=False)
        meta[s] = {
            "file": f"{s}.bin",
            "images": len(g),
            "tokens": len(g) * tokens,
            "bytes": len(g) * tokens,
            "sha256": file_sha256(out / f"{s}.bin"),
            "labels_file": f"{s}.labels.npy",
            "labels_sha256": file_sha256(out / f"{s}.labels.npy"),
        }
    return meta


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}): check the path and its permissions") from None
