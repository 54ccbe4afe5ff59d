"""Process-wide settings are applied by the CLI (or on request), never by the library: the glibc allocator tuning."""

import pytest
import torch

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


# ------------------------------------------------------------ bf16 on a CPU without bf16 matrix units


@pytest.fixture
def bf16_rate(monkeypatch):
    """Set this 'CPU's bf16 matmul rate (fp32: 1 TFLOPS) and record which dtypes were measured."""
    measured, rate = [], {"bf16": 0.1}

    def fake(threads, dtype):
        measured.append(dtype)
        return rate["bf16"] if dtype == torch.bfloat16 else 1.0

    monkeypatch.setattr(runtime.flops, "measured_cpu_peak_tflops", fake)
    return rate, measured


def cfg(*overrides):
    return config.load(None, ["train.max_steps=1", *overrides])


SLOW = "attnlab: warning: this CPU multiplies bf16 matrices 10x slower than float32 (it has no bf16 matrix units), "


def test_slow_bf16_warning_names_each_setting_that_avoids_it(bf16_rate):
    cpu = torch.device("cpu")
    both = cfg("optim.name=muon", "train.dtype=bfloat16")
    assert runtime.slow_bf16_warning(both, cpu) == SLOW + (
        "so this run will be slow: train.dtype=float32 optim.muon_ns_dtype=float32 makes it much faster "
        "(its losses differ slightly from bf16's)"
    )
    muon = cfg("optim.name=muon")
    assert "slow: optim.muon_ns_dtype=float32 makes" in runtime.slow_bf16_warning(muon, cpu)
    assert runtime.slow_bf16_warning(cfg("train.dtype=bfloat16"), cpu).endswith(
        "slow: train.dtype=float32 makes it much faster (its losses differ slightly from bf16's)"
    )


def test_no_slow_bf16_warning_without_bf16_matmuls_a_slow_cpu_or_a_cpu(bf16_rate):
    rate, measured = bf16_rate
    cpu = torch.device("cpu")
    fp32 = cfg("optim.name=muon", "optim.muon_ns_dtype=float32")
    assert runtime.slow_bf16_warning(fp32, cpu) is None and measured == []  # nothing to measure
    both = cfg("optim.name=muon", "train.dtype=bfloat16")
    assert runtime.slow_bf16_warning(both, torch.device("cuda")) is None and measured == []
    rate["bf16"] = 0.5  # 2x slower: a CPU with bf16 units, or a slow one
    assert runtime.slow_bf16_warning(both, cpu) is None and measured


def test_training_on_such_a_cpu_prints_the_warning_once(bf16_rate, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=60)
    args = [f"data.source={corpus}", "data.format=lines", "data.tokenizer=bytes", f"data.dir={tmp_path / 'data'}"]
    args += [f"out_dir={tmp_path / 'runs'}", "model.n_layer=1", "model.n_head=1", "model.d_model=16"]
    args += ["model.context=16", "train.batch_size=2", "train.max_steps=1", "logging.progress=false"]
    assert main(["train", *args, "optim.name=muon", "logging.attention_stats=0"]) == 0
    assert capsys.readouterr().err.count(SLOW) == 1


def test_bench_train_on_such_a_cpu_prints_the_warning_before_measuring(bf16_rate, monkeypatch, capsys):
    import attnlab.bench

    measured = []
    monkeypatch.setattr(attnlab.bench, "bench_train", lambda cfg, **kw: measured.append(cfg.name))
    assert main(["bench", "train", "configs/mainrun-best.yaml", "--no-baseline"]) == 0
    assert capsys.readouterr().err.count(SLOW) == 1 and measured == ["mainrun-best"]
