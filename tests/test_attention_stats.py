"""Attention statistics: hand-computed values, logging at every evaluation without touching training, `viz stats`."""

import json
import math

import pytest
import torch

from attnlab import config
from attnlab.attention.backends import reference_weights
from attnlab.attention.patterns import Dense
from attnlab.cli import main
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.errors import ConfigError
from attnlab.eval.inspection.attention_maps import LayerAttention
from attnlab.eval.inspection.attention_stats import (
    STATS,
    StatsAccumulator,
    attention_stats_event,
    head_stats,
    model_attention_stats,
    stats_batch,
)
from attnlab.model.gpt import GPT
from attnlab.training.logs import read_events, sink_scalars
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus

T = 4


def hand_qkv():
    """Head 0: q = 0, so query i attends uniformly to its i+1 keys. Head 1: q_i = k_i = 30 e_i, so it attends to itself."""
    q = torch.zeros(1, 2, T, T)
    k = torch.randn(1, 2, T, T, generator=torch.Generator().manual_seed(0))
    q[0, 1] = k[0, 1] = 30 * torch.eye(T)
    v = torch.randn(1, 2, T, 3, generator=torch.Generator().manual_seed(1))
    return q, k, v


def test_statistics_equal_hand_computed_values():
    q, k, v = hand_qkv()
    w = reference_weights(q, k, Dense())
    assert torch.equal(w[0, 1], torch.eye(T))  # exp(-450) underflows: exactly one key
    s = head_stats(q, k, v, w)
    # uniform over i+1 keys: entropy ln(i+1), first-token mass 1/(i+1), distance i/2; averaged over i = 0..3
    assert s["entropy"][0] == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T, abs=1e-7)
    assert s["first_token_mass"][0] == pytest.approx(sum(1 / (i + 1) for i in range(T)) / T, abs=1e-7)
    assert s["distance"][0] == pytest.approx(sum(i / 2 for i in range(T)) / T, abs=1e-7)
    # attending to itself: no entropy, no distance, position 0's mass only for query 0
    assert s["entropy"][1] == 0.0 and s["distance"][1] == 0.0 and s["first_token_mass"][1] == 0.25
    for name, x in (("q_norm", q), ("k_norm", k), ("v_norm", v)):
        want = [torch.linalg.norm(x[0, h], dim=-1).mean().item() for h in range(2)]
        assert s[name] == pytest.approx(want, abs=1e-6), name


def test_chunks_add_up_to_the_whole():
    q, k, v = hand_qkv()
    w = reference_weights(q, k, Dense())
    acc = StatsAccumulator(1, 2)
    for start, end in ((0, 1), (1, 3), (3, 4)):
        acc(LayerAttention(0, q[:, :, start:end], k, v, w[:, :, start:end], start, start == 0))
    whole = head_stats(q, k, v, w)
    for name, rows in acc.means().items():
        assert rows[0] == pytest.approx(whole[name], abs=1e-12), name


@torch.no_grad()
def test_a_model_with_zero_queries_attends_uniformly_and_its_norms_match_the_captured_vectors():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=8, context=T, dropout=0.0), AttentionConfig(), 20).eval()
    dqk = model.blocks[0].attn.sizes[0]
    model.blocks[0].attn.qkv.weight[:dqk] = 0  # q = 0 (the bias is zero too)
    x = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    seen = []
    handle = model.blocks[0].attn.core.register_forward_hook(lambda mod, args, out: seen.append(args))
    stats = model_attention_stats(model, x)
    handle.remove()
    ((q, k, v),) = seen
    assert stats["entropy"][0] == pytest.approx([sum(math.log(i + 1) for i in range(T)) / T] * 2, abs=1e-6)
    assert stats["distance"][0] == pytest.approx([0.75, 0.75], abs=1e-6)
    assert stats["q_norm"][0] == [0.0, 0.0]
    for name, t in (("k_norm", k), ("v_norm", v)):
        assert stats[name][0] == pytest.approx(torch.linalg.norm(t, dim=-1).mean(dim=(0, 2)).tolist(), abs=1e-6)
    assert not model.training  # left as it was


def test_stats_batch_is_the_first_windows_or_images():
    import numpy as np

    tokens = np.arange(100, dtype=np.uint16)
    assert stats_batch(tokens, 8, 3, image=False).tolist() == [
        list(range(0, 8)),
        list(range(8, 16)),
        list(range(16, 24)),
    ]
    assert stats_batch(tokens[:5], 8, 3, image=False).tolist() == [[0, 1, 2, 3, 4]]  # a split shorter than the context
    img = stats_batch(tokens, 10, 20, image=True, sos=256)
    assert img.shape == (10, 10) and img[1].tolist() == [256, *range(10, 19)]  # SOS, then all but the last byte


@torch.no_grad()
def test_the_event_is_the_model_on_the_stats_batch_from_explicit_arguments():
    import numpy as np

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=8, context=6, dropout=0.0), AttentionConfig(), 257).eval()
    tokens = np.arange(30, dtype=np.uint16) * 7 % 256
    event = attention_stats_event(model, tokens, 3, context=6, image=True, device=torch.device("cpu"))
    want = model_attention_stats(model, stats_batch(tokens, 6, 3, image=True, sos=256))
    assert event == {"sequences": 3, "tokens": 6, **want}


def test_attention_stats_reach_tensorboard_and_wandb_as_per_head_scalars():
    fields = {"step": 5, "sequences": 2, "entropy": [[0.5, 0.25]], "q_norm": [[1.0, 2.0]]}
    assert sink_scalars("attention_stats", fields) == {
        "attention/L0H0/entropy": 0.5,
        "attention/L0H1/entropy": 0.25,
        "attention/L0H0/q_norm": 1.0,
        "attention/L0H1/q_norm": 2.0,
    }
    assert sink_scalars("training_step", {"step": 1, "loss": 2.0, "flag": True}) == {"training/loss": 2.0}
    assert sink_scalars("checkpoint_saved", {"step": 1}) == {}


def test_config_key_is_validated(tmp_path):
    assert config.load(None, ["train.max_steps=1"]).logging.attention_stats == 4
    with pytest.raises(ConfigError, match=r"logging.attention_stats=-1 is out of range: use a value in \[0, 64\]"):
        config.load(None, ["train.max_steps=1", "logging.attention_stats=-1"])


# ------------------------------------------------------------------ during training


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    corpus = write_corpus(root / "corpus.txt")
    common = ["train.max_steps=6", "train.eval_every=3", "train.val_tokens=64"]  # model.dropout=0.1: RNG in training
    on = tiny_config(
        corpus,
        root / "data",
        root / "runs",
        *common,
        "logging.attention_stats=2",
        "logging.tensorboard=true",
        name="on",
    )
    off = tiny_config(corpus, root / "data", root / "runs", *common, "logging.attention_stats=0", name="off")
    train(on)
    train(off)
    return root / "runs" / "on", root / "runs" / "off"


def test_one_event_per_evaluation_with_per_head_lists(runs):
    on, _ = runs
    stats = read_events(on, "attention_stats")
    evals = read_events(on, "validation_step")
    assert [e["step"] for e in stats] == [e["step"] for e in evals] == [3, 6, 6]
    assert [e.get("final", False) for e in stats] == [False, False, True]
    for e in stats:
        assert e["sequences"] == 2 and e["tokens"] == 32
        for name in STATS:
            assert len(e[name]) == 2 and all(len(row) == 2 for row in e[name]), name  # 2 layers x 2 heads
        assert all(0 < x <= math.log(32) for row in e["entropy"] for x in row)
        assert all(0 < x <= 1 for row in e["first_token_mass"] for x in row)
    assert stats[1]["entropy"] == stats[2]["entropy"]  # same weights, same batch


def test_training_is_bit_identical_with_or_without_stats(runs):
    on, off = runs
    loss = lambda run: [(e["step"], e["loss"]) for e in read_events(run, "training_step")]
    assert loss(on) == loss(off) and len(loss(on)) == 6
    summary = lambda run: json.loads((run / "summary.json").read_text())["val_bits_per_byte"]
    assert summary(on) == summary(off)
    assert not read_events(off, "attention_stats")


def test_tensorboard_receives_the_per_head_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    on, _ = runs
    acc = EventAccumulator(str(on / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {f"attention/L{l}H{h}/{s}" for l in range(2) for h in range(2) for s in STATS} <= set(tags)
    assert [e.step for e in acc.Scalars("attention/L1H0/entropy")] == [3, 6, 6]


def test_viz_stats_plots_and_explains_a_run_without_stats(runs, tmp_path, capsys):
    on, off = runs
    assert main(["viz", "stats", str(on), "--out", str(tmp_path / "s.png")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info == {"out": str(tmp_path / "s.png"), "events": 2, "steps": [3, 6], "layers": 2, "heads": 2}
    assert (tmp_path / "s.png").stat().st_size > 20000
    assert main(["viz", "stats", str(on), "--out", str(tmp_path / "s.png")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["viz", "stats", str(off), "--out", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"attnlab: error: {off} has no attention_stats events: train with logging.attention_stats=N")
    assert len(err.splitlines()) == 1 and not (tmp_path / "t.png").exists()
