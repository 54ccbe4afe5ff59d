"""Process-wide settings are applied by the CLI (or on request), never by the library: the glibc allocator tuning."""

import pytest

from attnlab import config
from attnlab.cli import main
from attnlab.training import runtime
from attnlab.training.trainer import train
from runkit import write_corpus


@pytest.fixture
def applied(monkeypatch):
    """Count calls of the allocator setting instead of changing this test process's allocator."""
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(runtime.NO_MALLOC_TUNING, raising=False)
    return calls


def test_tune_allocator_applies_unless_opted_out(applied, monkeypatch):
    assert runtime.tune_allocator() is True and applied == [1]
    monkeypatch.setenv(runtime.NO_MALLOC_TUNING, "0")  # 0 or empty: not opted out
    assert runtime.tune_allocator() is True and applied == [1, 1]
    monkeypatch.setenv(runtime.NO_MALLOC_TUNING, "1")
    assert runtime.tune_allocator() is False and applied == [1, 1]


def test_training_from_python_leaves_the_allocator_and_the_cli_tunes_it(applied, tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=60)
    args = [
        f"data.source={corpus}",
        "data.format=lines",
        "data.tokenizer=bytes",
        f"data.dir={tmp_path / 'data'}",
        f"out_dir={tmp_path / 'runs'}",
        "model.n_layer=1",
        "model.n_head=1",
        "model.d_model=16",
        "model.context=16",
        "train.batch_size=2",
        "train.max_steps=1",
        "logging.progress=false",
        "logging.attention_stats=0",
    ]
    train(config.load(None, [*args, "name=library"]))
    assert applied == []
    assert main(["train", *args, "name=cli"]) == 0
    assert applied == [1]
    monkeypatch.setenv(runtime.NO_MALLOC_TUNING, "1")
    assert main(["train", *args, "name=cli-opted-out"]) == 0
    assert applied == [1]
    capsys.readouterr()
