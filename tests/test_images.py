"""Image sources, their splits and the on-disk image dataset, on tiny fixtures built in the real formats."""

import hashlib
import json
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.config import DataConfig
from attnlab.data import image_sources, sources, store
from attnlab.data.image_format import from_sequence, position_triples, to_sequence
from attnlab.data.store import read_images, read_labels
from attnlab.errors import DataError

CIFAR_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


# ---------------------------------------------------------------- fixtures


def cifar_rows(n: int, offset: int = 0) -> np.ndarray:
    """CIFAR rows whose R, G and B planes differ: pixel (r, c) of image i holds 7i + r + 2c (+ 80 for G, + 160 for B)."""
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    planes = [(7 * (i + offset) + r + 2 * c + 80 * ch) % 256 for i in range(n) for ch in range(3)]
    return np.stack(planes).astype(np.uint8).reshape(n, 3072)


def hwc(rows: np.ndarray, size: int = 32) -> np.ndarray:
    return rows.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


BATCHES = {
    "data_batch_1": (cifar_rows(6), [0, 1, 2, 3, 4, 5]),
    "data_batch_2": (cifar_rows(4, offset=6), [6, 7, 8, 9]),
    "test_batch": (cifar_rows(5, offset=10), [3, 3, 1, 0, 9]),
}
TRAIN_ROWS = np.concatenate([BATCHES["data_batch_1"][0], BATCHES["data_batch_2"][0]])
TRAIN_LABELS = BATCHES["data_batch_1"][1] + BATCHES["data_batch_2"][1]


def pickled_batch(name: str, numpy1_names: bool = False) -> bytes:
    """A batch pickled with protocol 2 and bytes keys, as the official files; optionally with numpy 1.x global names."""
    x, y = BATCHES[name]
    batch = {
        b"batch_label": name.encode(),
        b"labels": y,
        b"data": x,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(y))],
    }
    raw = pickle.dumps(batch, protocol=2)
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if numpy1_names else raw


def python2_pickled_batch(name: str) -> bytes:
    """The opcodes Python 2's cPickle writes for the official batches: str as (SHORT_)BINSTRING, numpy 1.x globals."""
    x, y = BATCHES[name]

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def k(i: int) -> bytes:
        return b"K" + bytes([i]) if i < 256 else b"M" + struct.pack("<H", i)

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + s(b"b")
        + b"\x87R"
        + b"(K\x01"
        + k(len(y))
        + k(3072)
        + b"\x86cnumpy\ndtype\n"
        + s(b"u1")
        + b"K\x00K\x01\x87R"
        + b"(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + s(x.tobytes())
        + b"tb"
    )
    return (
        b"\x80\x02}("
        + s(b"batch_label")
        + s(name.encode())
        + s(b"labels")
        + b"]("
        + b"".join(map(k, y))
        + b"e"
        + s(b"data")
        + array
        + s(b"filenames")
        + b"]("
        + b"".join(s(f"img_{i}.png".encode()) for i in range(len(y)))
        + b"eu."
    )


def binary_batch(name: str) -> bytes:
    x, y = BATCHES[name]
    return np.concatenate([np.array(y, dtype=np.uint8)[:, None], x], axis=1).tobytes()


@pytest.fixture
def cifar_py(tmp_path) -> Path:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(pickled_batch("data_batch_1"))
    (d / "data_batch_2").write_bytes(python2_pickled_batch("data_batch_2"))
    (d / "test_batch").write_bytes(pickled_batch("test_batch", numpy1_names=True))
    (d / "readme.html").write_text("not a batch")
    return d


@pytest.fixture
def cifar_bin(tmp_path) -> Path:
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for name in BATCHES:
        (d / f"{name}.bin").write_bytes(binary_batch(name))
    return d


@pytest.fixture
def cifar_npz(tmp_path) -> Path:
    d = tmp_path / "npz"
    d.mkdir()
    np.savez_compressed(
        d / "cifar10_train_part1.npz", x=BATCHES["data_batch_1"][0], y=np.uint8(BATCHES["data_batch_1"][1])
    )
    np.savez_compressed(
        d / "cifar10_train_part2.npz", x=BATCHES["data_batch_2"][0], y=np.uint8(BATCHES["data_batch_2"][1])
    )
    np.savez_compressed(d / "cifar10_test.npz", x=BATCHES["test_batch"][0], y=np.uint8(BATCHES["test_batch"][1]))
    return d


def tar_gz(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


def prepare(tmp_path, name="ds", **kw) -> store.Dataset:
    store.prepare(DataConfig(**kw), tmp_path / name, progress=False)
    return store.load(tmp_path / name)


def check_cifar_splits(ds: store.Dataset) -> None:
    """Every train image lands in train or val exactly once with its label; test is the test batch in order."""
    got = np.concatenate([read_images(ds, "train"), read_images(ds, "val")])
    got_labels = np.concatenate([read_labels(ds, "train"), read_labels(ds, "val")])
    want = hwc(TRAIN_ROWS)
    order = [int(np.flatnonzero((want == im).all(axis=(1, 2, 3)))[0]) for im in got]
    assert sorted(order) == list(range(len(want)))
    assert got_labels.tolist() == [TRAIN_LABELS[i] for i in order]
    assert np.array_equal(read_images(ds, "test"), hwc(BATCHES["test_batch"][0]))
    assert read_labels(ds, "test").tolist() == BATCHES["test_batch"][1]


# ---------------------------------------------------------- serialisation


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_sequence_round_trip_and_positions(n, h, w, c, seed):
    x = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    seq = to_sequence(x)
    assert seq.shape == (n, h * w * c)
    assert np.array_equal(from_sequence(seq, h, w, c), x)
    assert np.array_equal(from_sequence(seq.ravel(), h, w, c), x)  # one flat stream of whole images
    row, col, ch = position_triples(n * h * w * c, h, w, c)  # positions run on across images
    assert np.array_equal(seq.ravel(), x[np.arange(n * h * w * c) // (h * w * c), row, col, ch])


def test_channels_are_interleaved_per_pixel():
    x = hwc(cifar_rows(1))  # R = r + 2c, G = R + 80, B = R + 160
    seq = to_sequence(x)[0]
    assert seq[:6].tolist() == [0, 80, 160, 2, 82, 162]  # R, G, B of pixel (0, 0), then of pixel (0, 1)
    assert seq[3 * 32 : 3 * 32 + 3].tolist() == [1, 81, 161]  # pixel (1, 0) starts the second row
    assert [int(v[0]) for v in position_triples(np.array([100]), 32, 32, 3)] == [1, 1, 1]  # pixel 33, channel G
    import torch  # tensors work too (the model's image embeddings use them)

    assert [t.tolist() for t in position_triples(torch.arange(100, 103), 32, 32, 3)] == [
        [1, 1, 1],
        [1, 1, 2],
        [1, 2, 0],
    ]
    with pytest.raises(ValueError, match="not a whole number"):
        from_sequence(seq[:-1], 32, 32, 3)


def test_downsample_box_average():
    blocks = np.array([[10, 20], [30, 41]], dtype=np.uint8)
    x = np.kron(blocks, np.ones((2, 2), dtype=np.uint8))[None, :, :, None]  # 4x4, block-constant
    assert image_sources.downsample(x, 2)[0, :, :, 0].tolist() == [[10, 20], [30, 41]]
    y = np.array([[1, 2], [2, 2]], dtype=np.uint8)[None, :, :, None]
    assert image_sources.downsample(y, 1).item() == 2  # mean 1.75 rounds to 2; 1.5 would round up too
    odd = np.full((2, 6, 6, 3), 77, dtype=np.uint8)  # 6 -> 4: no exact factor, PIL's BOX filter
    assert np.array_equal(image_sources.downsample(odd, 4), np.full((2, 4, 4, 3), 77, dtype=np.uint8))


# ----------------------------------------------------------------- cifar10


def test_cifar_python_folder(tmp_path, cifar_py):
    ds = prepare(tmp_path, source="cifar10", path=str(cifar_py), val_frac=0.2, seed=3)
    check_cifar_splits(ds)
    m = ds.meta
    assert ds.tokenizer is None and ds.kind == "image" and m["vocab_size"] == 256 and m["dtype"] == "uint16"
    assert m["image"] == {"height": 32, "width": 32, "channels": 3} and m["tokens_per_image"] == 3072
    assert {s: v["images"] for s, v in m["splits"].items()} == {"train": 8, "val": 2, "test": 5}
    assert m["splits"]["train"]["tokens"] == 8 * 3072 == ds.tokens("train").size
    assert m["classes"] == list(image_sources.CIFAR_CLASSES) and m["source"]["format"] == "cifar-10-python folder"
    files = {f["name"]: f for f in m["source"]["files"]}
    assert list(files) == ["data_batch_1", "data_batch_2", "test_batch"]  # readme.html is no batch
    assert files["test_batch"]["sha256"] == hashlib.sha256((cifar_py / "test_batch").read_bytes()).hexdigest()
    assert m["data_config"]["source"] == "cifar10" and m["data_config"]["image_size"] is None
    assert sorted(p.name for p in ds.dir.iterdir()) == sorted(
        ["meta.json"] + [f"{s}{ext}" for s in ("train", "val", "test") for ext in (".bin", ".labels.npy")]
    )


def test_cifar_splits_are_seeded_and_val_frac_zero(tmp_path, cifar_py):
    a = prepare(tmp_path, "a", source="cifar10", path=str(cifar_py), val_frac=0.3, seed=1)
    b = prepare(tmp_path, "b", source="cifar10", path=str(cifar_py), val_frac=0.3, seed=1)
    c = prepare(tmp_path, "c", source="cifar10", path=str(cifar_py), val_frac=0.3, seed=2)
    assert a.meta["splits"] == b.meta["splits"] and a.meta["splits"] != c.meta["splits"]
    pool = np.random.default_rng(1).permutation(10)  # the seeded shuffle of the 10 training images
    assert np.array_equal(read_images(a, "val"), hwc(TRAIN_ROWS[pool[:3]]))
    assert np.array_equal(read_images(a, "train"), hwc(TRAIN_ROWS[pool[3:]]))
    d = prepare(tmp_path, "d", source="cifar10", path=str(cifar_py), val_frac=0.0, max_docs=4)
    assert d.splits == ["train", "test"] and d.meta["splits"]["train"]["images"] == 4
    with pytest.raises(DataError, match="no 'val' split.*val_frac"):
        read_images(d, "val")


def test_cifar_binary_folder_and_archives(tmp_path, cifar_py, cifar_bin, monkeypatch):
    check_cifar_splits(prepare(tmp_path, "bin", source="cifar10", path=str(cifar_bin)))
    py_tar = tar_gz(cifar_py, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(
        DataError, match=r"cifar-10-python\.tar\.gz is not an official CIFAR-10 archive \(md5 .*re-download"
    ):
        prepare(tmp_path, "x", source="cifar10", path=str(py_tar))
    assert not (tmp_path / "x").exists()
    for out, tar in [("tpy", py_tar), ("tbin", tar_gz(cifar_bin, tmp_path / "cifar-10-binary.tar.gz"))]:
        monkeypatch.setitem(image_sources.CIFAR_MD5, tar.name, hashlib.md5(tar.read_bytes()).hexdigest())
        ds = prepare(tmp_path, out, source="cifar10", path=str(tar))
        check_cifar_splits(ds)
        assert ds.meta["source"]["md5"] == image_sources.CIFAR_MD5[tar.name]
    assert ds.meta["source"]["format"] == "cifar-10-binary archive"


def test_cifar_npz_folder(tmp_path, cifar_npz):
    ds = prepare(tmp_path, source="cifar10", path=str(cifar_npz))
    check_cifar_splits(ds)
    assert [f["name"] for f in ds.meta["source"]["files"]] == [
        "cifar10_train_part1.npz",
        "cifar10_train_part2.npz",
        "cifar10_test.npz",
    ]


def test_cifar_download_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sources, "_fetch", offline)
    with pytest.raises(
        DataError, match=r"^cannot download cifar10 \(no network.*data\.path=/path/to/cifar-10-python\.tar\.gz"
    ):
        prepare(tmp_path, source="cifar10")


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncate_pickle", r"data_batch_1 is not a readable CIFAR-10 batch \(.*truncated or corrupted; re-download"),
        (
            "evil_pickle",
            r"data_batch_1 is not a readable CIFAR-10 batch \(UnpicklingError: refusing to load global (os|posix)\.system",
        ),
        ("wrong_shape_pickle", r"data_batch_1 has data uint8\[6, 3000\] and 6 labels, expected uint8 \[N, 3072\]"),
        ("bad_label", r"test_batch has labels outside 0\.\.9 \(found 0\.\.12\)"),
    ],
)
def test_cifar_python_damage(tmp_path, cifar_py, damage, match):
    path = cifar_py / "data_batch_1"
    if damage == "truncate_pickle":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "evil_pickle":

        class Evil:
            def __reduce__(self):
                import os

                return os.system, ("echo pwned",)

        path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    elif damage == "wrong_shape_pickle":
        path.write_bytes(pickle.dumps({b"data": np.zeros((6, 3000), np.uint8), b"labels": [0] * 6}, protocol=2))
    else:
        x, _ = BATCHES["test_batch"]
        (cifar_py / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": [0, 1, 2, 12, 3]}, protocol=2))
    with pytest.raises(DataError, match=match):
        prepare(tmp_path, source="cifar10", path=str(cifar_py))


def test_cifar_binary_and_npz_damage(tmp_path, cifar_bin, cifar_npz):
    (cifar_bin / "data_batch_2.bin").write_bytes(binary_batch("data_batch_2")[:-100])
    with pytest.raises(
        DataError, match=r"data_batch_2\.bin is truncated .*multiple of 3073-byte records\): re-download"
    ):
        prepare(tmp_path, source="cifar10", path=str(cifar_bin))
    np.savez(cifar_npz / "cifar10_train_part2.npz", x=np.zeros((4, 1024), np.uint8), y=np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"cifar10_train_part2\.npz: array 'x' has rows of 1024 bytes, expected 3072"):
        prepare(tmp_path, source="cifar10", path=str(cifar_npz))
    np.savez(cifar_npz / "cifar10_train_part2.npz", x=np.zeros((4, 3072), np.uint8), y=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"cifar10_train_part2\.npz: 4 images but 'y' has shape \[3\]"):
        prepare(tmp_path, source="cifar10", path=str(cifar_npz))
    (cifar_npz / "cifar10_train_part2.npz").write_bytes((cifar_npz / "cifar10_test.npz").read_bytes()[:-200])
    with pytest.raises(DataError, match=r"cifar10_train_part2\.npz is not a readable \.npz file .*truncated"):
        prepare(tmp_path, source="cifar10", path=str(cifar_npz))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty holds no CIFAR-10 files"):
        prepare(tmp_path, source="cifar10", path=str(empty))


def test_class_filter_and_image_size(tmp_path, cifar_py):
    ds = prepare(tmp_path, source="cifar10", path=str(cifar_py), classes=["cat", "1"], val_frac=0.0, image_size=16)
    assert ds.meta["classes"] == ["automobile", "cat"]  # kept in label order, renumbered 0, 1
    assert ds.meta["image"] == {"height": 16, "width": 16, "channels": 3} and ds.meta["tokens_per_image"] == 768
    assert sorted(read_labels(ds, "train").tolist()) == [0, 1] and read_labels(ds, "test").tolist() == [1, 1, 0]
    assert np.array_equal(read_images(ds, "test"), image_sources.downsample(hwc(BATCHES["test_batch"][0][:3]), 16))
    with pytest.raises(
        DataError,
        match=r"unknown class 'kitten' for cifar10: use class names \(airplane, .*truck\) "
        r"or label numbers 0\.\.9",
    ):
        prepare(tmp_path, "b", source="cifar10", path=str(cifar_py), classes=["kitten"])
    with pytest.raises(
        DataError, match=r"image_size=64 is larger than the 32x32 images of cifar10 and upsampling is refused"
    ):
        prepare(tmp_path, "c", source="cifar10", path=str(cifar_py), image_size=64)
    with pytest.raises(DataError, match=r"only 1 image\(s\) left, too few to carve a val split"):
        prepare(tmp_path, "d", source="cifar10", path=str(cifar_py), classes=["airplane"])
    with pytest.raises(DataError, match=r"max_bytes caps text sources: for images use data\.max_docs"):
        prepare(tmp_path, "e", source="cifar10", path=str(cifar_py), max_bytes=100)


def test_load_checks_image_labels(tmp_path, cifar_py):
    ds = prepare(tmp_path, source="cifar10", path=str(cifar_py))
    val_labels = read_labels(ds, "val")
    np.save(ds.dir / "val.labels.npy", np.zeros(5, np.int16))
    with pytest.raises(DataError, match=r"val\.labels\.npy holds int16\[5\], expected int16 \[1\]"):
        store.load(ds.dir)
    np.save(ds.dir / "val.labels.npy", (val_labels + 1) % 10)
    with pytest.raises(DataError, match=r"val\.labels\.npy does not match meta\.json \(sha256 differs\)"):
        store.load(ds.dir)
    (ds.dir / "val.labels.npy").unlink()
    with pytest.raises(DataError, match=r"val\.labels\.npy cannot be read .*--force"):
        store.load(ds.dir)
    text = tmp_path / "t.txt"
    text.write_text("a\nb\nc\n")
    store.prepare(DataConfig(source=str(text), format="lines", tokenizer="bytes"), tmp_path / "text", progress=False)
    with pytest.raises(DataError, match="holds text, not images"):
        read_images(tmp_path / "text", "train")


# ------------------------------------------------------------------ digits


def test_digits(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    ds = prepare(tmp_path, source="digits", val_frac=0.1, seed=5)
    d = load_digits()
    assert ds.meta["image"] == {"height": 8, "width": 8, "channels": 1} and ds.meta["classes"] == [
        str(i) for i in range(10)
    ]
    sizes = {s: v["images"] for s, v in ds.meta["splits"].items()}
    assert sizes == {"test": 180, "val": 162, "train": 1455}  # test: 10% of 1797; val: 10% of the other 1617
    order = np.random.default_rng(5).permutation(1797)
    want = np.floor(d.images[order[:180]] * 255 / 16 + 0.5)[..., None]
    assert (
        np.array_equal(read_images(ds, "test"), want)
        and read_labels(ds, "test").tolist() == d.target[order[:180]].tolist()
    )
    assert read_images(ds, "train").max() == 255 and set(np.unique(read_images(ds, "train"))) <= {
        round(v * 255 / 16) for v in range(17)
    }
    again = prepare(tmp_path, "again", source="digits", val_frac=0.1, seed=5)
    assert again.meta["splits"] == ds.meta["splits"]


# ------------------------------------------------------------ image-folder


def png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_classes_crop_and_resize(tmp_path):
    root = tmp_path / "imgs"
    wide = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high: the centre 8x8 square is columns 4..11
    wide[:, 4:12] = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    png(root / "cat" / "a.png", wide)
    png(root / "cat" / "b.png", np.full((32, 32, 3), (200, 100, 50), np.uint8))  # 32 -> 8, a uniform colour stays exact
    png(root / "dog" / "c.png", np.full((8, 8, 3), 9, np.uint8))
    (root / "dog" / "notes.txt").write_text("ignored")
    ds = prepare(tmp_path, source="image-folder", path=str(root), image_size=8, val_frac=0.0)
    assert ds.meta["classes"] == ["cat", "dog"] and ds.splits == ["train"]
    got = {int(lbl): [] for lbl in read_labels(ds, "train")}
    for im, lbl in zip(read_images(ds, "train"), read_labels(ds, "train")):
        got[int(lbl)].append(im)
    cats = sorted(got[0], key=lambda im: int(im[0, 0, 0]))
    assert np.array_equal(cats[0], wide[:, 4:12]) and np.array_equal(cats[1], np.full((8, 8, 3), (200, 100, 50)))
    assert np.array_equal(got[1][0], np.full((8, 8, 3), 9)) and ds.meta["source"]["files"] == 3
    with pytest.raises(DataError, match=r"cat/a\.png is 16x8, smaller than 16x16 and upsampling is refused"):
        prepare(tmp_path, "big", source="image-folder", path=str(root), image_size=16, val_frac=0.0)


def test_image_folder_split_folders_and_errors(tmp_path):
    root = tmp_path / "imgs"
    for split, n in [("train", 5), ("test", 2)]:
        for i in range(n):
            png(root / split / f"{i}.png", np.full((4, 4, 3), 10 * i + (split == "test"), np.uint8))
    cfg = dict(source="image-folder", path=str(root), val_frac=0.2)
    with pytest.raises(DataError, match=r"0\.png is 4x4, smaller than 32x32"):
        prepare(tmp_path, "x", **cfg)
    for split, n in [("train", 5), ("test", 2)]:
        for i in range(n):
            png(root / split / f"{i}.png", np.full((32, 32, 3), 10 * i + (split == "test"), np.uint8))
    ds = prepare(tmp_path, **cfg)
    assert {s: v["images"] for s, v in ds.meta["splits"].items()} == {"train": 4, "val": 1, "test": 2}
    assert read_images(ds, "test")[:, 0, 0, 0].tolist() == [1, 11] and ds.meta["classes"] == []
    assert set(read_labels(ds, "train").tolist()) == {-1}
    with pytest.raises(DataError, match="have no classes, so data.classes cannot select any"):
        prepare(tmp_path, "y", **cfg, classes=["cat"])
    (root / "train" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(
        DataError, match=r"^cannot read image .*train/3\.png \(UnidentifiedImageError.*remove or replace"
    ):
        prepare(tmp_path, "z", **cfg)
    png(root / "train" / "cat" / "c.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"imgs/train mixes loose images \(0\.png, \.\.\.\) with class folders"):
        prepare(tmp_path, "m", **cfg)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty/train holds no images \(\.png"):
        prepare(tmp_path, "e", source="image-folder", path=str(empty))
    (empty / "train").rename(empty / "test")
    with pytest.raises(DataError, match=r"empty has test folders but no train folder"):
        prepare(tmp_path, "e", source="image-folder", path=str(empty))


# ---------------------------------------------------- imagenet-downsampled


def imagenet_rows(n: int, size: int, offset: int) -> np.ndarray:
    return ((np.arange(n * 3 * size * size) + offset) % 251).astype(np.uint8).reshape(n, 3 * size * size)


def test_imagenet_downsampled(tmp_path):
    root = tmp_path / "Imagenet8"
    (root / "val").mkdir(parents=True)
    batches = {
        "train_data_batch_1.npz": (imagenet_rows(3, 8, 0), [1, 2, 1000]),
        "train_data_batch_2.npz": (imagenet_rows(2, 8, 5), [3, 3]),
        "val/val_data.npz": (imagenet_rows(2, 8, 9), [2, 1]),
    }
    for name, (x, y) in batches.items():
        np.savez(root / name, data=x, labels=np.array(y), mean=np.zeros(3 * 64))
    ds = prepare(tmp_path, source="imagenet-downsampled", path=str(root), val_frac=0.0)
    assert ds.meta["image"] == {"height": 8, "width": 8, "channels": 3} and len(ds.meta["classes"]) == 1000
    assert np.array_equal(read_images(ds, "test"), hwc(batches["val/val_data.npz"][0], 8))
    assert read_labels(ds, "test").tolist() == [1, 0]  # 1-based file labels -> index into classes "1".."1000"
    order = np.random.default_rng(1337).permutation(5)
    train = np.concatenate([batches["train_data_batch_1.npz"][0], batches["train_data_batch_2.npz"][0]])
    assert np.array_equal(read_images(ds, "train"), hwc(train[order], 8))
    small = prepare(
        tmp_path, "small", source="imagenet-downsampled", path=str(root), val_frac=0.0, classes=["3", "2"], image_size=4
    )
    assert small.meta["classes"] == ["2", "3"] and small.meta["splits"]["train"]["images"] == 3
    assert np.array_equal(
        read_images(small, "test"), image_sources.downsample(hwc(batches["val/val_data.npz"][0][:1], 8), 4)
    )
    np.savez(root / "train_data_batch_2.npz", data=np.zeros((2, 100), np.uint8), labels=np.array([1, 1]))
    with pytest.raises(DataError, match=r"train_data_batch_2\.npz: array 'data' has rows of 100 bytes, not 3\*S\*S"):
        prepare(tmp_path, "bad", source="imagenet-downsampled", path=str(root))
    np.savez(root / "train_data_batch_2.npz", data=imagenet_rows(2, 8, 0), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"train_data_batch_2\.npz has labels outside 1\.\.1000 \(found 0\.\.1\)"):
        prepare(tmp_path, "bad", source="imagenet-downsampled", path=str(root))


# --------------------------------------------------------------- real data


def test_real_cifar10_npz_folder(tmp_path):
    """The shared CIFAR-10 npz copy, read through the npz-folder reader.

    Decompressing one 28 MB part takes ~1 s, so the dataset folder links only
    train part 1 and the test file (the reader is the same for five parts):
    200 train+val images drawn from part 1 are compared exactly, and the full
    10,000-image test split is checked against PROVENANCE.md's sha256 of the
    raw x / y arrays.
    """
    if not (CIFAR_SHARED / "cifar10_test.npz").is_file():
        pytest.skip(f"shared CIFAR-10 copy not found at {CIFAR_SHARED} (../shared/data/cifar10 beside the checkout)")
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for name in ("cifar10_train_part1.npz", "cifar10_test.npz"):
        (folder / name).symlink_to(CIFAR_SHARED / name)
    ds = prepare(tmp_path, source="cifar10", path=str(folder), max_docs=200, val_frac=0.25, seed=11)
    assert {s: v["images"] for s, v in ds.meta["splits"].items()} == {"train": 150, "val": 50, "test": 10000}
    files = {f["name"]: f["sha256"] for f in ds.meta["source"]["files"]}
    assert files == {
        "cifar10_test.npz": "82844eac90b186b5dc657fc1f8e11bdcbbcecea6d991b6ab7d68b5f15e386a6a",
        "cifar10_train_part1.npz": "7878f71400bcfd1039bd33ffb42662252908503fdf8a522d3bed1209edb50cf9",
    }
    test = read_images(ds, "test")
    assert (
        hashlib.sha256(test.transpose(0, 3, 1, 2).tobytes()).hexdigest()
        == "aebe03e709cc89b1b64cda94e31929b81b702fa3a5263865a4aa890722cd6824"
    )
    assert (
        hashlib.sha256(read_labels(ds, "test").astype(np.uint8).tobytes()).hexdigest()
        == "373ad1e16d19b153befb51ae8039a8f702cd843a330c85999adaace5d85e03c0"
    )
    with np.load(folder / "cifar10_train_part1.npz") as z:
        x, y = z["x"], z["y"]
    pool = np.random.default_rng(11).permutation(10000)[:200]
    assert np.array_equal(read_images(ds, "val"), hwc(x[pool[:50]]))
    assert np.array_equal(read_images(ds, "train"), hwc(x[pool[50:]]))
    assert read_labels(ds, "train").tolist() == y[pool[50:]].tolist()
    assert (
        json.loads((ds.dir / "meta.json").read_text())["classes"][y[pool[0]]]
        == (CIFAR_SHARED / "label_names.txt").read_text().split()[y[pool[0]]]
    )
