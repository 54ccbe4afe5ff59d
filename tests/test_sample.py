"""Generation: reproducibility, cached == uncached, context window, stop ids and strings (filters: test_sampling.py)."""

import torch

from attnlab.config import AttentionConfig, ModelConfig
from attnlab.eval.generation.filters import SamplingConfig
from attnlab.eval.generation.loop import TextStreamer, generate
from attnlab.model.gpt import GPT


def tiny(position="learned", **attn):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, context=8, position=position), AttentionConfig(**attn), 20)


def test_generate_is_reproducible_and_cached_equals_recomputed():
    model, prompt = tiny(), torch.zeros(3, 5, dtype=torch.long)
    top_k = SamplingConfig(top_k=10)
    runs = [
        generate(model, prompt, 12, sampling=top_k, generator=torch.Generator().manual_seed(1), use_cache=c)
        for c in (True, True, False)
    ]
    assert runs[0].shape == (3, 17) and torch.equal(runs[0][:, :5], prompt)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])  # 12 steps: 4 cached, then past the context
    greedy = generate(model, prompt, 4, sampling=SamplingConfig(temperature=0))
    assert torch.equal(greedy[0], greedy[1])  # same prompt, no randomness


def test_streaming_model_decodes_past_the_context_with_its_cache():
    model = tiny("rope", pattern="sink_window", sinks=1, window=3)
    prompt = torch.randint(20, (2, 11))  # longer than the context: the tail is fed through the cache
    out = generate(model, prompt, 10, sampling=SamplingConfig(temperature=0))
    assert out.shape == (2, 21) and torch.equal(out[:, :11], prompt)
    cache = model.new_cache(2, 21)
    assert model.can_stream(cache) and not tiny("learned", pattern="sink_window").can_stream(cache)


def test_generate_stops_at_stop_id_and_at_a_stop_test():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution
    out = generate(
        model, torch.zeros(2, 1, dtype=torch.long), 50, stop_id=3, generator=torch.Generator().manual_seed(0)
    )
    assert out.size(1) < 51 and (out[:, -1] == 3).all()
    seen = []
    out = generate(
        model,
        torch.zeros(2, 1, dtype=torch.long),
        50,
        stop=lambda idx: (idx[:, 1:] < 4).any(1),
        generator=torch.Generator().manual_seed(0),
        on_token=seen.append,
    )
    assert out.size(1) < 51 and (out[:, 1:] < 4).any(1).all() and len(seen) == out.size(1) - 1
    assert (out[:, -1] < 4).any()  # it stopped at the step the last row finished


def test_text_streamer_holds_back_a_split_character():
    table = {1: b"h", 2: b"\xc3", 3: b"\xa9", 4: b"!"}
    decode = lambda ids: b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
    printed = []
    streamer = TextStreamer(decode, printed.append)
    for i in (1, 2, 3, 4):
        streamer(torch.tensor([[i]]))
    assert printed == ["h", "é", "!"]
