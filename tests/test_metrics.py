"""The evaluation scores every token exactly once, whatever the batching."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.config import AttentionConfig, ModelConfig
from attnlab.eval.metrics.scoring import LN2, Score, plan_windows, score_tokens, text_metrics
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
    m = text_metrics(Score(nll_nats=1000.0, tokens=400), {"bytes": 1200, "chars": 1100})
    assert m["bits_per_byte"] == pytest.approx(1000.0 / (LN2 * 1200))
    assert m["nats_per_token"] == 2.5 and m["mainrun_loss"] == pytest.approx(1000.0 / 1100)
    assert "bits_per_byte" not in text_metrics(Score(10.0, 4), {"bytes": 1, "chars": 1}, partial=True)
