"""Evaluation past the training context: exact where it is defined (RoPE or no positions), refused in one
line where it is not, and the context sweep's CSV and plot."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from attnlab.config import AttentionConfig, ModelConfig
from attnlab.eval.metrics.scoring import score_tokens
from attnlab.model.gpt import GPT
from runkit import write_corpus

SHORT, LONG, VOCAB = 8, 32, 40
CLI = [sys.executable, "-m", "attnlab"]


def pair(attn: dict, position: str):
    """The same weights as a model trained at context 8 and one built for context 32."""
    models = []
    for context in (SHORT, LONG):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, context=context, position=position)
        models.append(GPT(cfg, AttentionConfig(**attn), VOCAB).eval())
    models[1].load_state_dict(models[0].state_dict())
    return models


@pytest.mark.parametrize("position", ["rope", "none"])
@pytest.mark.parametrize(
    "attn",
    [
        {"pattern": "local", "window": 3},
        {"pattern": "sink_window", "sinks": 2, "window": 3},
        {"pattern": "linear"},
        {"pattern": "dense"},
    ],
    ids=["local", "sink_window", "linear", "dense"],
)
def test_longer_windows_equal_the_full_forward_of_a_longer_model(attn, position):
    short, long = pair(attn, position)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.uint16)
    with short.longer_windows(LONG):
        got = score_tokens(short, tokens, context=LONG)
    want = score_tokens(long, tokens, context=LONG)
    assert got.tokens == want.tokens == 199
    assert got.nll_nats == pytest.approx(want.nll_nats, rel=1e-6)
    with pytest.raises(ValueError, match="exceeds the model context 8"):
        short(torch.zeros(1, LONG, dtype=torch.long))  # only inside longer_windows


def test_learned_positions_cannot_extrapolate():
    torch.manual_seed(0)
    short = GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, context=SHORT, position="learned"),
        AttentionConfig(pattern="local", window=3),
        VOCAB,
    )
    assert short.extrapolation_refusal() == (
        "model.position=learned has no positions past the training context 8 (only rope and none extrapolate)"
    )
    with pytest.raises(ValueError):
        with short.longer_windows(LONG):
            pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("extrapolation")
    corpus = write_corpus(root / "corpus.txt")
    common = [
        f"out_dir={root / 'runs'}",
        f"data.source={corpus}",
        "data.format=lines",
        "data.tokenizer=bytes",
        f"data.dir={root / 'data'}",
        "model.n_layer=1",
        "model.n_head=2",
        "model.d_model=16",
        "model.context=16",
        "attention.pattern=local",
        "attention.window=4",
        "train.max_steps=2",
        "logging.progress=false",
    ]
    for name, position in (("rope", "rope"), ("learned", "learned")):
        out = subprocess.run(
            CLI + ["train", f"name={name}", f"model.position={position}", *common],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
    return root


def test_cli_refuses_longer_windows_without_relative_positions(runs):
    out = subprocess.run(CLI + ["eval", runs / "runs" / "learned", "--context", "64"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == (
        "attnlab: error: --context 64 exceeds the training context 16 and model.position=learned has no positions past "
        "the training context 16 (only rope and none extrapolate): use a window <= 16"
    )


def test_context_sweep_writes_csv_and_plot_and_matches_eval(runs, tmp_path):
    run_dir = runs / "runs" / "rope"
    out = subprocess.run(
        CLI + ["eval", run_dir, "--context-sweep", "8,16,64", "--out", tmp_path / "sweep"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    with open(tmp_path / "sweep" / "context-sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["context"]) for r in rows] == [8, 16, 64]
    assert [r["past_training_context"] for r in rows] == ["False", "False", "True"]
    assert (tmp_path / "sweep" / "context-sweep.png").stat().st_size > 0
    for n in (16, 64):
        plain = subprocess.run(
            CLI + ["eval", run_dir, "--context", str(n)], capture_output=True, text=True, timeout=300
        )
        assert plain.returncode == 0, plain.stderr
        row = next(r for r in result["context_sweep"] if r["context"] == n)
        assert json.loads(plain.stdout)["val_bits_per_byte"] == pytest.approx(row["bits_per_byte"], rel=1e-9)
    again = subprocess.run(
        CLI + ["eval", run_dir, "--context-sweep", "8", "--out", tmp_path / "sweep"], capture_output=True, text=True
    )
    assert again.returncode != 0 and "--force" in again.stderr  # nothing overwritten
