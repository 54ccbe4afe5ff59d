"""The evaluation scores every token exactly once, whatever the batching."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from attnlab.config import AttentionConfig, DataConfig, ModelConfig
from attnlab.data import store
from attnlab.eval.metrics.scoring import (
    LN2,
    Score,
    mainrun_exact_metrics,
    mainrun_windows,
    plan_windows,
    score_tokens,
    score_windows,
    text_metrics,
)
from attnlab.model.gpt import GPT


@given(n=st.integers(0, 400), context=st.integers(1, 64), data=st.data())
def test_windows_score_each_target_once(n, context, data):
    stride = data.draw(st.integers(1, context))
    windows = plan_windows(n, context, stride)
    scored = []
    for w in windows:
        assert w.start >= 0 and w.start + w.length <= max(n - 1, 0) and 1 <= w.scored <= w.length <= context
        scored += range(w.start + w.length - w.scored + 1, w.start + w.length + 1)
    assert scored == list(range(1, n))  # targets 1..n-1, in order, once each
    for w in windows[1:]:  # later windows give every scored target >= context - stride tokens of context
        assert w.length - w.scored >= context - stride


def _model(vocab=50, context=16):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, context=context), AttentionConfig(), vocab)


def _naive_nll(model, tokens, context, stride):
    """Score target by target with an explicit loop: the obviously-correct spec."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(tokens)):
            if t <= context:
                start = 0
            else:  # the window that scores t ends at the first stride boundary at or after t
                k = -(-(t - context) // stride)
                start = min(context + k * stride, len(tokens) - 1) - context
            x = torch.tensor(tokens[start:t], dtype=torch.long)[None]
            logp = torch.log_softmax(model(x)[0, -1].double(), -1)
            total -= logp[tokens[t]].item()
    return total


@pytest.mark.parametrize("stride", [16, 5])
def test_score_matches_naive_loop(stride):
    model = _model().eval()
    tokens = np.random.default_rng(0).integers(0, 50, 71).astype(np.uint16)
    s = score_tokens(model, tokens, context=16, stride=stride, batch_size=3)
    assert s.tokens == 70
    assert s.nll_nats == pytest.approx(_naive_nll(model, tokens, 16, stride), rel=1e-5)


def test_identical_for_any_batch_size():
    model = _model()
    tokens = np.random.default_rng(1).integers(0, 50, 500).astype(np.uint16)
    results = {b: score_tokens(model, tokens, context=16, stride=8, batch_size=b) for b in (1, 4, 7, 64)}
    assert len({(r.nll_nats, r.tokens) for r in results.values()}) == 1  # bit-identical
    assert results[1].tokens == 499


def test_max_tokens_limits_scoring():
    tokens = np.random.default_rng(2).integers(0, 50, 300).astype(np.uint16)
    assert score_tokens(_model(), tokens, context=16, max_tokens=100).tokens == 100


def test_bits_per_byte_definition():
    m = text_metrics(Score(nll_nats=1000.0, tokens=400), {"bytes": 1200, "chars": 1100, "documents": 20})
    assert m["bits_per_byte"] == pytest.approx(1000.0 / (LN2 * 1200))  # the documents' bytes, separators excluded
    assert m["nats_per_token"] == 2.5 and m["mainrun_loss"] == pytest.approx(1000.0 / (1100 + 5 * 20))
    assert "bits_per_byte" not in text_metrics(Score(10.0, 4), {"bytes": 1, "chars": 1}, partial=True)


# ------------------------------------------------------------ the Maincode mainrun challenge's number

DOCS = [f"Titre {i}: héllo wörld 🙂" if i % 3 == 0 else f"Show HN: plain title {i}" for i in range(30)]


def test_mainrun_loss_divides_by_the_eos_joined_val_text(tmp_path):
    corpus = tmp_path / "titles.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    cfg = DataConfig(source=str(corpus), format="lines", tokenizer="bytes", val_frac=0.2, seed=3)
    store.prepare(cfg, tmp_path / "ds", progress=False)
    val_docs = store.split_documents(store.select_documents(DOCS, cfg), cfg.val_frac)["val"]
    val_text = "<eos>".join(val_docs) + "<eos>"  # the challenge's val_text
    info = store.load(tmp_path / "ds").meta["splits"]["val"]
    m = text_metrics(Score(nll_nats=123.0, tokens=info["tokens"] - 1), info)
    assert m["mainrun_loss"] == 123.0 / len(val_text)
    assert m["bits_per_byte"] == 123.0 / (LN2 * len("".join(val_docs).encode("utf-8")))  # unchanged: documents only
    assert mainrun_exact_metrics(Score(50.0, 7), info) == {
        "loss": 50.0 / len(val_text),  # the whole split's characters, however few tokens were scored
        "coverage": 7 / (info["tokens"] - 1),
        "tokens": 7,
    }


def challenge_batches(n_tokens: int, context: int, batch_size: int) -> list[tuple[list[int], list[int]]]:
    """The challenge's evaluate() loop over our split's positions: its stream is ours without the leading eos;
    spans of batch_size*context+1 tokens at steps of the span, each split into rows of context (x, y) positions."""
    stream = list(range(1, n_tokens))
    span = batch_size * context + 1
    rows = []
    for ptr in range(0, len(stream) - span + 1, span):
        batch = stream[ptr : ptr + span]
        x, y = batch[:-1], batch[1:]
        for r in range(batch_size):
            rows.append((x[r * context : (r + 1) * context], y[r * context : (r + 1) * context]))
    return rows


@given(n=st.integers(0, 300), context=st.integers(1, 12), batch_size=st.integers(1, 5))
def test_mainrun_windows_are_the_challenges_rows(n, context, batch_size):
    windows = mainrun_windows(n, context, batch_size)
    rows = [
        (list(range(w.start, w.start + w.length)), list(range(w.start + 1, w.start + w.length + 1))) for w in windows
    ]
    assert rows == challenge_batches(n, context, batch_size)
    assert all(w.scored == w.length == context for w in windows)  # every target of every row counts
    if n > 1:
        span = batch_size * context + 1
        expected = (n - 1) // span * batch_size * context
        assert sum(w.scored for w in windows) == expected  # the coverage numerator; trailing partial span dropped


def test_mainrun_exact_score_equals_the_challenges_loop():
    model, context, batch_size = _model(context=8).eval(), 8, 3
    tokens = np.random.default_rng(4).integers(0, 50, 90).astype(np.uint16)  # 89 targets: 3 spans of 25, 14 left
    s = score_windows(model, tokens, mainrun_windows(len(tokens), context, batch_size), batch_size=2)
    total = 0.0
    with torch.no_grad():
        for ptr in range(0, 89 - 25 + 1, 25):  # the challenge's evaluate(), over the stream without our leading eos
            batch = torch.tensor(tokens[1 + ptr : 1 + ptr + 25], dtype=torch.long)
            x, y = batch[:-1].view(batch_size, context), batch[1:].view(batch_size, context)
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    assert s.tokens == 3 * 24 and s.nll_nats == pytest.approx(total, rel=1e-5)
