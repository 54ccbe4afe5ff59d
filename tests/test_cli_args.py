"""Command-line arguments: key=value overrides anywhere among flags, what --resume accepts, outputs kept without --force."""

import json

import pytest

from attnlab import config
from attnlab.training.trainer import train
from runkit import digits_config, tiny_config, write_corpus
from safetykit import cli, one_line

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", n_docs=120)


def test_prepare_overrides_after_flags(tmp_path, corpus, capsys):
    rc, out, err = cli(
        capsys,
        "prepare",
        corpus,
        "--out",
        tmp_path / "d",
        "--format",
        "lines",
        "data.max_docs=50",
        "--tokenizer",
        "bytes",
        "val_frac=0.2",
    )
    assert rc == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["data_config"]["max_docs"] == 50 and meta["data_config"]["val_frac"] == 0.2
    assert meta["data_config"]["tokenizer"] == "bytes"


def test_train_overrides_after_flags_and_before_the_config(tmp_path, corpus, capsys):
    cfg = tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "model.n_layer=1", "train.max_steps=1")
    config.save(cfg, tmp_path / "c.yaml")
    rc, out, err = cli(capsys, "train", tmp_path / "c.yaml", "--force", "train.max_steps=2", "name=late")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
    rc, out, err = cli(capsys, "train", "name=early", tmp_path / "c.yaml", "--force", "train.max_steps=3")
    assert rc == 0, err
    assert config.load(tmp_path / "runs" / "early" / "config.yaml").train.max_steps == 3


def test_train_with_two_config_files_is_refused(tmp_path, capsys):
    rc, _, err = cli(capsys, "train", "a.yaml", "--force", "b.yaml")
    assert rc == 2
    one_line(err, "a.yaml", "b.yaml", "one config")


def test_unknown_flags_still_fail(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(capsys, "train", "c.yaml", "--forse")
    assert e.value.code == 2


def test_resume_takes_no_overrides_and_names_the_key(tmp_path, corpus, capsys):
    train(tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "model.n_layer=1", "train.max_steps=1"))
    run = tmp_path / "runs" / "t"
    before = (run / "events.jsonl").read_text()
    for args in (["--resume", run, "optim.lr=0.01"], ["optim.lr=0.01", "--resume", run]):
        rc, _, err = cli(capsys, "train", *args)
        assert rc == 2
        one_line(err, "--resume", "optim.lr", "no overrides")
    assert (run / "events.jsonl").read_text() == before


# ------------------------------------------------------------------ outputs are never replaced without --force


def test_viz_pattern_keeps_existing_files(tmp_path, capsys):
    png, npy = tmp_path / "keep.png", tmp_path / "keep.npy"
    png.write_bytes(b"mine")
    npy.write_bytes(b"mine too")
    base = ["viz", "pattern", "--seq-len", "8", "--heads", "1"]
    rc, _, err = cli(capsys, *base, "--out", png)
    assert rc == 2
    one_line(err, str(png), "--force")
    rc, _, err = cli(capsys, *base, "--out", tmp_path / "new.png", "--save-mask", npy)
    assert rc == 2
    one_line(err, str(npy), "--force")
    assert png.read_bytes() == b"mine" and npy.read_bytes() == b"mine too" and not (tmp_path / "new.png").exists()
    rc, _, err = cli(capsys, *base, "--out", png, "--save-mask", npy, "--force")
    assert rc == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG" and npy.read_bytes()[:6] == b"\x93NUMPY"


def test_sample_images_keeps_an_existing_file(tmp_path, capsys):
    train(digits_config(tmp_path, "train.max_steps=1"))
    run, keep = tmp_path / "runs" / "digits", tmp_path / "keep.png"
    keep.write_bytes(b"mine")
    for flags in (["--images", "2"], ["--complete", "2"]):
        rc, _, err = cli(capsys, "sample", run, *flags, "--out", keep)
        assert rc == 2
        one_line(err, str(keep), "--force")
    assert keep.read_bytes() == b"mine"
    rc, _, err = cli(capsys, "sample", run, "--images", "2", "--out", keep, "--force")
    assert rc == 0, err
    assert keep.read_bytes()[:4] == b"\x89PNG"
