"""A run directory samples and exports without its dataset folder: it keeps its own tokenizer and vocabulary.

A copied run with the dataset deleted gives the same samples (CLI and Python API), prepares nothing in the
current directory, and still needs the data for eval (one line naming --data-dir). Damaged copies are one line.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import attnlab
from attnlab import cli
from attnlab.errors import CheckpointError, DataError
from attnlab.files import file_sha256
from attnlab.run import identity
from attnlab.run.open import load_run
from attnlab.run.vocabulary import RunVocabulary
from attnlab.training.trainer import train
from runkit import digits_config, tiny_config, write_corpus

SRC = Path(attnlab.__file__).resolve().parents[1]
SAMPLE = ["--prompt", "the ", "--max-new-tokens", "20", "--temperature", "0", "--seed", "3", "--device", "cpu"]


def attnlab_cli(*argv, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "attnlab", *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    """A tiny text run, its samples before the copy, and a copy of the run with the dataset folder deleted."""
    root = tmp_path_factory.mktemp("selfcontained")
    corpus = write_corpus(root / "corpus.txt")
    train(tiny_config(corpus, root / "data", root / "runs", "train.max_steps=3", "model.dropout=0"))
    run = root / "runs" / "t"
    before = cli_sample(run)
    copy = root / "elsewhere" / "t"
    shutil.copytree(run, copy)
    shutil.rmtree(root / "data")
    return root, run, copy, before


def cli_sample(run: Path) -> str:
    """`attnlab sample RUN` in a fresh process, from the folder that holds the run."""
    p = attnlab_cli("sample", run, *SAMPLE, cwd=run.parent)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_run_keeps_its_tokenizer_and_vocabulary_recorded_by_hash(copied):
    root, run, _, _ = copied
    rec = identity.read(run)
    assert rec["tokenizer"] == {"file": "tokenizer.json", "sha256": file_sha256(run / "tokenizer.json")}
    assert rec["vocabulary"] == {"file": "dataset.json", "sha256": file_sha256(run / "dataset.json")}
    assert rec["dataset"]["files"]["tokenizer.json"] == rec["tokenizer"]["sha256"]  # the dataset's own file
    meta = json.loads((run / "dataset.json").read_text())
    assert meta["kind"] == "text" and meta["vocab_size"] == 256 and meta["tokenizer"]["kind"] == "bytes"
    assert meta["splits"] == ["train", "val"] and meta["document_separator"] == "<eos>"
    assert meta["dataset_dir"] == str(root / "data")


def test_a_copied_run_samples_the_same_text_without_its_dataset(copied):
    root, _, copy, before = copied
    cwd = root / "elsewhere"
    assert before.startswith("the ") and len(before) > len("the ")
    assert cli_sample(copy) == before
    assert attnlab.load(copy, device="cpu").generate("the ", 20, temperature=0, seed=3) + "\n" == before
    assert sorted(p.name for p in cwd.iterdir()) == ["t"]  # no data/ prepared here
    assert not (root / "data").exists()


def test_the_python_api_loads_the_copies_and_eval_needs_the_data(copied):
    _, _, copy, _ = copied
    run = attnlab.load(copy, device="cpu")
    assert isinstance(run.dataset, RunVocabulary) and run.tokenizer.vocab_size == 256
    assert run.logits("the").shape == (4, 256)
    with pytest.raises(DataError) as e:
        run.evaluate()
    msg = str(e.value)
    assert "\n" not in msg and "is missing" in msg and "attnlab.load(RUN, data_dir=DIR)" in msg


def test_eval_of_the_copy_points_at_data_dir_in_one_line(copied):
    root, _, copy, _ = copied
    p = attnlab_cli("eval", copy, "--device", "cpu", cwd=root / "elsewhere")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == DataError.exit_code and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"attnlab: error: dataset {root / 'data'} of {copy} is missing")
    assert "--data-dir DIR" in lines[0]
    with pytest.raises(DataError, match="is missing"):  # load_run's default: the dataset is needed
        load_run(copy, device="cpu")


def test_export_of_the_copy_needs_no_dataset(copied, tmp_path, capsys):
    _, _, copy, _ = copied
    assert cli.main(["export", str(copy), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0, capsys.readouterr()
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "config.json").is_file()


def test_a_changed_copy_is_one_line(copied, tmp_path):
    _, _, copy, _ = copied
    damaged = tmp_path / "t"
    shutil.copytree(copy, damaged)
    (damaged / "tokenizer.json").write_text('{"kind": "bytes", "note": "edited"}')
    with pytest.raises(CheckpointError) as e:
        load_run(damaged, device="cpu", need_data=False)
    msg = str(e.value)
    assert "\n" not in msg and f"the run's copy {damaged / 'tokenizer.json'} changed after the run started" in msg


def test_a_run_without_copies_still_needs_its_dataset(copied, tmp_path):
    """Runs from before the copies: sampling without the dataset is the missing-dataset line, as it was."""
    _, _, copy, _ = copied
    old = tmp_path / "t"
    shutil.copytree(copy, old)
    rec = identity.read(old)
    for key in ("tokenizer", "vocabulary"):
        del rec[key]
    (old / "identity.json").write_text(json.dumps(rec))
    with pytest.raises(DataError, match="is missing"):
        load_run(old, device="cpu", need_data=False)


def test_an_image_run_samples_a_grid_from_a_copy(tmp_path):
    cfg = digits_config(tmp_path)
    train(cfg)
    copy = tmp_path / "elsewhere" / "digits"
    shutil.copytree(tmp_path / "runs" / "digits", copy)
    shutil.rmtree(tmp_path / "data")
    meta = json.loads((copy / "dataset.json").read_text())
    assert meta["kind"] == "image" and meta["tokens_per_image"] == 64 and not (copy / "tokenizer.json").exists()
    grids = []
    for i in range(2):
        out = tmp_path / f"grid{i}.png"
        args = ["sample", str(copy), "--images", "4", "--out", str(out), "--seed", "1", "--device", "cpu"]
        assert cli.main(args) == 0
        grids.append(out.read_bytes())
    assert grids[0] == grids[1] and len(grids[0]) > 100  # seeded
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "grid0.png")).ndim >= 2
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["digits"]
