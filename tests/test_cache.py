"""KV caches: every cached step equals the full forward pass, and each cache keeps exactly what its pattern can reach."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.attention import Dense, Fixed, Linear, Local, SinkWindow, Strided, reference
from attnlab.attention.cache import LocalCache, SinkWindowCache, make_cache
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.model.embeddings import apply_rotary
from attnlab.model.gpt import GPT
from zoo import PLUGINS, ZOO

CONTEXT, VOCAB = 24, 50
# Every zoo pattern (plugins included) with its parameters, plus a per-layer schedule of two patterns.
PATTERNS = {
    **{label: {**spec, "plugins": PLUGINS} for label, spec in ZOO.items()},
    "schedule": dict(schedule=["local", "fixed"], window=3, local_attn_ctx=8, blocksize=4),
}
POSITIONS = ["learned", "sinusoidal", "rope", "none", "image", "image+learned"]


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    layout = rng.random((4, CONTEXT // 4, CONTEXT // 4)) < 0.5  # one random layout per head
    path = tmp_path_factory.mktemp("layout") / "layout.npy"
    np.save(path, layout)
    return str(path)


def model_for(attn: dict, position: str, context: int = CONTEXT, layout: str | None = None) -> GPT:
    torch.manual_seed(0)
    attn = dict(attn, layout=layout) if attn.get("pattern") == "block_layout" else attn
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, context=context, position=position, image_shape=[2, 3, 2])
    return GPT(cfg, AttentionConfig(**attn), VOCAB).eval()


@torch.no_grad()
def cached_logits(model: GPT, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Last-position logits after each position from prompt_len - 1 on: prefill, then one cached step per token."""
    cache = model.new_cache(seq.size(0), seq.size(1))
    out = [model(seq[:, :prompt_len], cache=cache)[:, -1]]
    for t in range(prompt_len, seq.size(1)):
        out.append(model(seq[:, t : t + 1], cache=cache)[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_cached_step_equals_full_forward_over_the_prefix(name, position, layout_file):
    model = model_for(PATTERNS[name], position, layout=layout_file)
    seq = torch.randint(VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    got = cached_logits(model, seq, prompt_len=3)  # crosses every window, stride and chunk boundary up to 24
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(2, CONTEXT)], 1)
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
        # unbatched, and a prompt that is already most of the context
        assert torch.allclose(cached_logits(model, seq[1:], prompt_len=20), want[1:, 17:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["rope", "none"])
@pytest.mark.parametrize("attn", [dict(pattern="local", window=3), dict(pattern="linear")], ids=["local", "linear"])
def test_bounded_caches_stream_past_the_context_exactly(attn, position):
    """local and linear past the training context equal the same weights run over the whole sequence."""
    small, big = model_for(attn, position, context=8), model_for(attn, position, context=40)
    big.load_state_dict(small.state_dict())
    seq = torch.randint(VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    got = cached_logits(small, seq, prompt_len=4)
    with torch.no_grad():
        want = torch.stack([big(seq[:, : t + 1])[:, -1] for t in range(3, 40)], 1)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def streaming_reference(model: GPT, seq: torch.Tensor) -> torch.Tensor:
    """The model run position by position over a full history of keys, as StreamingLLM positions them.

    Query i sees the sinks j < s and the window i - j < w; with RoPE a window key
    keeps its distance i - j and a sink is seen from position min(i, context - 1).
    Obviously correct and slow: no cache, no eviction, every key kept.
    """
    pattern, ctx = model.blocks[0].attn.core.pattern, model.context
    hist = [([], []) for _ in model.blocks]  # per layer: keys before RoPE, values
    logits = []
    for i in range(seq.size(1)):
        x = model.tok_emb(seq[:, i : i + 1])
        for layer, block in zip(hist, model.blocks):
            att, h = block.attn, block.norm1(x)
            B, _, C = h.shape
            q, k, v = (t.view(B, 1, att.n_head, -1).transpose(1, 2) for t in att.qkv(h).split(C, dim=2))
            layer[0].append(k), layer[1].append(v)
            keys, values = torch.cat(layer[0], 2), torch.cat(layer[1], 2)
            scores = []
            for j in range(i + 1):
                if not bool(pattern.allowed(torch.tensor(i), torch.tensor(j), torch.tensor(0))):
                    scores.append(torch.full_like(q[..., :1, :1], float("-inf")))
                    continue
                q_at = min(i, ctx - 1) if j < pattern.sinks else i
                rq = apply_rotary(q, *model.pos_emb(1, offset=q_at))
                rk = apply_rotary(keys[:, :, j : j + 1], *model.pos_emb(1, offset=j))
                scores.append(rq @ rk.transpose(-2, -1) * q.shape[-1] ** -0.5)
            y = torch.softmax(torch.cat(scores, -1), -1) @ values
            x = x + att.proj(y.transpose(1, 2).reshape(B, 1, C))
            x = x + block.mlp(block.norm2(x))
        logits.append(model.lm_head(model.norm_f(x))[:, -1])
    return torch.stack(logits, 1)


def test_sink_window_streams_past_the_context_as_streamingllm():
    model = model_for(dict(pattern="sink_window", sinks=2, window=3), "rope", context=8)
    seq = torch.randint(VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    got = cached_logits(model, seq, prompt_len=4)
    want = streaming_reference(model, seq)[:, 3:]
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # inside the context the reference is the ordinary full forward pass
        assert torch.allclose(want[:, :5], model(seq[:, :8])[:, 3:], atol=2e-5, rtol=1e-4)


patterns = st.one_of(
    st.builds(Dense),
    st.builds(Local, window=st.integers(1, 9)),
    st.builds(SinkWindow, sinks=st.integers(0, 4), window=st.integers(1, 7)),
    st.builds(
        Strided, local_attn_ctx=st.integers(1, 6), strided_mode=st.sampled_from(["split", "union"]), n_head=st.just(4)
    ),
    st.builds(
        Strided,
        local_attn_ctx=st.integers(1, 6),
        strided_mode=st.just("interleave"),
        part=st.sampled_from(["local", "stride"]),
    ),
    st.integers(1, 3).flatmap(
        lambda b: st.builds(
            Fixed,
            local_attn_ctx=st.sampled_from([2 * b, 4 * b]),
            blocksize=st.just(b),
            num_verts=st.sampled_from([1, 2]),
        )
    ),
)


@settings(max_examples=60, deadline=None)
@given(pattern=patterns, prompt_len=st.integers(1, 12), total=st.integers(13, 30))
def test_each_cache_holds_exactly_the_reachable_keys_and_attends_like_the_reference(pattern, prompt_len, total):
    H, D = 4, 8
    g = torch.Generator().manual_seed(prompt_len * 31 + total)
    q, k, v = (torch.randn(2, H, total, D, generator=g) for _ in range(3))
    cache = make_cache(pattern, 2, H, total)
    cache.prefill(k[:, :, :prompt_len], v[:, :, :prompt_len])
    for i in range(prompt_len, total):
        out = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], i)
        want = reference(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], pattern)
        assert torch.allclose(out, want, atol=1e-5), (i, (out - want).abs().max())
        # after step i the cache holds every key a later query can reach, and nothing query i could not reach
        held = cache.held()
        for h in range(H):
            assert reachable(pattern, i + 1, h, i + 1) <= held[h] <= reachable(pattern, i, h, i + 1), (i, h)


def reachable(pattern, first_query: int, head: int, written: int) -> set[int]:
    """Keys j < written that some query in [first_query, first_query + 2 * written + 8) may attend to."""
    queries = torch.arange(first_query, first_query + 2 * written + 8)[:, None]
    keys = torch.arange(written)[None, :]
    ok = pattern.allowed(queries, keys, torch.tensor(head)).expand(len(queries), keys.shape[1]).any(0)
    return set(torch.nonzero(ok).flatten().tolist())


def test_linear_cache_is_the_recurrent_state():
    q, k, v = (torch.randn(1, 2, 20, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    cache = make_cache(Linear(), 1, 2, 20)
    cache.prefill(k[:, :, :5], v[:, :, :5])
    size = cache.nbytes()
    for i in range(5, 20):
        out = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], i)
        assert torch.allclose(
            out, reference(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], Linear())[:, :, -1:], atol=1e-5
        )
    assert cache.nbytes() == size == 4 * 2 * (8 * 8 + 8)  # S [Dh x Dv] + z [Dh] per head, fp32


def test_memory_is_constant_for_bounded_caches_and_follows_the_pattern_otherwise():
    def sizes(pattern, n=64, H=4, D=8):
        cache = make_cache(pattern, 1, H, n)
        out = []
        for i in range(n):
            x = torch.randn(1, H, 1, D)
            cache.step(x, x, x, i)
            out.append(cache.nbytes())
        return out

    per_key = 2 * 4 * 8 * 4  # k and v, 4 heads, D=8, fp32
    assert set(sizes(Local(window=8))[8:]) == {8 * per_key}
    assert set(sizes(SinkWindow(sinks=2, window=6))[8:]) == {
        (2 + 6) * per_key + 2 * per_key // 2
    }  # + the sinks' keys as written
    fixed = sizes(Fixed(local_attn_ctx=8, blocksize=2))  # summary buffer preallocated: l + c * T / l keys
    assert fixed[-1] == (8 + 2 * 64 // 8) * per_key
    strided = sizes(
        Strided(local_attn_ctx=8, strided_mode="split", n_head=4)
    )  # ring of 8 for 2 heads, all 64 for 2 heads
    assert strided[-1] == (8 + 64) * per_key // 2


def test_cache_kinds_follow_the_layer_patterns():
    model = model_for(dict(schedule=["local", "sink_window"], window=3, sinks=1), "rope")
    kinds = [type(c) for c in model.new_cache(1, 10).layers]
    assert kinds == [LocalCache, SinkWindowCache]


def test_misuse_is_refused():
    model = model_for({}, "learned", context=8)
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one token per call"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="exceeds the model context 8"):  # dense cannot stream past its context
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
