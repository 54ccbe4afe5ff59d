"""Sampling filters and reproducibility."""

import torch
from hypothesis import example, given, strategies as st

from attnlab.config import AttentionConfig, ModelConfig
from attnlab.eval.sample import filter_logits, generate
from attnlab.model.gpt import GPT


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.75, 0.8 >= 0.75: stop after the second


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=30), st.floats(0.01, 0.99))
@example([0.0] * 17, 0.5)  # all tied: the kept top token need not be argmax's index 0
def test_top_p_always_keeps_the_top_token_and_enough_mass(values, p):
    logits = torch.tensor([values])
    kept = torch.isfinite(filter_logits(logits, top_p=p))
    assert logits[kept].max() == logits.max()  # a top token is kept (which one, among ties, is arbitrary)
    assert logits.softmax(-1)[kept].sum() >= p - 1e-6


def test_generate_is_reproducible_and_respects_context():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, context=8), AttentionConfig(), 20)
    prompt = torch.zeros(3, 5, dtype=torch.long)
    a = generate(model, prompt, 12, context=8, top_k=10, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 12, context=8, top_k=10, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 17) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    greedy = generate(model, prompt, 4, context=8, temperature=0)
    assert torch.equal(greedy[0], greedy[1])  # same prompt, no randomness


def test_generate_stops_at_stop_id():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, context=8), AttentionConfig(), 20)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    out = generate(model, torch.zeros(2, 1, dtype=torch.long), 50, context=8, stop_id=3,
                   generator=torch.Generator().manual_seed(0))
    assert out.size(1) < 51 and (out[:, -1] == 3).all()
