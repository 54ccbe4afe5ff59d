"""Grouped-query / multi-query attention: n_kv_head shared key/value heads in every backend, cache and checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import config
from attnlab.attention import BlockLayout, Dense, Fixed, Linear, Local, SinkWindow, Strided
from attnlab.attention.backends import BACKENDS
from attnlab.attention.cache import AppendCache, FixedCache, StridedCache, make_cache
from attnlab.attention.flex import flex_available
from attnlab.attention.linear import linear_reference
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.errors import ConfigError
from attnlab.model.gpt import GPT
from zoo import PLUGINS, ZOO

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

H, KV, D = 8, 2, 8
_g = torch.Generator().manual_seed(0)
PATTERNS = {
    "dense": Dense(),
    "local": Local(7),
    "strided_split": Strided(4, "split", H),
    "strided_union": Strided(8, "union", H),
    "fixed": Fixed(8, 2, 1, 1),
    "fixed_2_verts": Fixed(8, 2, 1, 2),
    "sink_window": SinkWindow(3, 5),
    "block_layout": BlockLayout("x", 8, "", torch.rand(H, 10, 10, generator=_g) > 0.4),
}


def plain_gqa(q, k, v, pattern):
    """The spec, written out: repeat each key/value head for its group of query heads, then masked softmax."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    T = q.shape[2]
    if pattern.mechanism == "linear":
        return linear_reference(q, k, v, pattern.feature_map)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = pattern.dense_mask(T, q.shape[1])
    w = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0.0)
    return w @ v


def qkv(T, kv=KV, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    return q, *(torch.randn(B, kv, T, D, generator=g, requires_grad=True) for _ in range(2))


def out_and_grads(fn, q, k, v, pattern):
    out = fn(q, k, v, pattern)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def _backends_for(pattern):
    names = ["reference", "blocksparse"] if pattern.mechanism == "softmax" else ["reference", "linear"]
    return names + (["sdpa"] if pattern.is_dense_causal else [])


@pytest.mark.parametrize("kv", [KV, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("name", [*PATTERNS, "linear"])
def test_every_backend_equals_the_plain_grouped_reference(name, kv):
    pattern = Linear() if name == "linear" else PATTERNS[name]
    q, k, v = qkv(37, kv)
    want = out_and_grads(plain_gqa, q, k, v, pattern)
    for backend in _backends_for(pattern):
        got = out_and_grads(BACKENDS[backend].fn, q, k, v, pattern)
        assert got[2].shape == k.shape  # the shared heads get their groups' summed gradients
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, backend=backend: f"{backend}: {m}")


@pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1])
def test_flex_shares_heads_with_enable_gqa():
    from attnlab.attention.flex import flex

    q, k, v = (x.detach() for x in qkv(256, B=1))
    with torch.no_grad():
        torch.testing.assert_close(
            flex(q, k, v, Strided(16, "split", H)), plain_gqa(q, k, v, Strided(16, "split", H)), atol=1e-5, rtol=1e-5
        )


# ------------------------------------------------------------------ the model

MODEL_PATTERNS = {label: {**spec, "plugins": PLUGINS} for label, spec in ZOO.items()}  # every zoo pattern
CONTEXT = 24


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("layout") / "layout.npy"
    np.save(path, np.random.default_rng(0).random((H, CONTEXT // 4, CONTEXT // 4)) < 0.5)
    return str(path)


def model_for(attn: dict, n_kv_head=KV, position="rope", layout=None, **kw) -> GPT:
    torch.manual_seed(0)
    attn = dict(attn, layout=layout) if attn.get("pattern") == "block_layout" else attn
    cfg = ModelConfig(n_layer=2, n_head=H, n_kv_head=n_kv_head, d_model=32, context=CONTEXT, position=position, **kw)
    return GPT(cfg, AttentionConfig(**attn), 50).eval()


def as_mha(gqa: GPT) -> GPT:
    """The multi-head model computing the same function: each shared key/value projection copied to its group."""
    mha = model_for({**vars(gqa.attn_cfg)}, n_kv_head=None, position=gqa.cfg.position, layout=gqa.attn_cfg.layout)
    group = H // gqa.cfg.n_kv_head
    state = gqa.state_dict()
    for i, blk in enumerate(gqa.blocks):
        dq, dk, dv = blk.attn.sizes
        for suffix in ("weight", "bias"):
            w = state[f"blocks.{i}.attn.qkv.{suffix}"]
            q, k, v = w.split((dq, dk, dv))
            k, v = (
                x.view(gqa.cfg.n_kv_head, -1, *x.shape[1:]).repeat_interleave(group, 0).flatten(0, 1) for x in (k, v)
            )
            state[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    return mha


@pytest.mark.parametrize("name", MODEL_PATTERNS)
def test_a_gqa_model_is_the_mha_model_with_copied_key_value_heads(name, layout_file):
    """In the auto backend and the reference: the (n_head 8, n_kv_head 2) model equals an 8-head model whose
    key/value projections repeat per group, and the projection holds only the 2 shared heads."""
    gqa = model_for(MODEL_PATTERNS[name], layout=layout_file)
    assert gqa.blocks[0].attn.qkv.weight.shape == (32 + 2 * 8, 32)  # q: 8 heads of 4, k and v: 2 heads of 4
    mha = as_mha(gqa)
    seq = torch.randint(50, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mha(seq)
        torch.testing.assert_close(gqa(seq), want, atol=2e-5, rtol=1e-4)
        for blk in gqa.blocks:
            blk.attn.core.requested = "reference"
            blk.attn.core.resolve("cpu")
        torch.testing.assert_close(gqa(seq), want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def cached_logits(model: GPT, seq: torch.Tensor, prompt_len: int):
    cache = model.new_cache(seq.size(0), seq.size(1))
    out = [model(seq[:, :prompt_len], cache=cache)[:, -1]]
    for t in range(prompt_len, seq.size(1)):
        out.append(model(seq[:, t : t + 1], cache=cache)[:, -1])
    return torch.stack(out, 1), cache


@pytest.mark.parametrize("kv", [KV, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("name", MODEL_PATTERNS)
def test_cached_decoding_equals_the_full_forward(name, kv, layout_file):
    model = model_for(MODEL_PATTERNS[name], kv, layout=layout_file)
    seq = torch.randint(50, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    got, _ = cached_logits(model, seq, prompt_len=3)
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(2, CONTEXT)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", [dict(pattern="local", window=3), dict(pattern="linear")], ids=["local", "linear"])
def test_shared_head_caches_stream_past_the_context_exactly(attn):
    small = GPT(
        ModelConfig(n_layer=2, n_head=H, n_kv_head=KV, d_model=32, context=8, position="rope"),
        AttentionConfig(**attn),
        50,
    ).eval()
    big = GPT(
        ModelConfig(n_layer=2, n_head=H, n_kv_head=KV, d_model=32, context=40, position="rope"),
        AttentionConfig(**attn),
        50,
    ).eval()
    big.load_state_dict(small.state_dict())
    seq = torch.randint(50, (2, 40), generator=torch.Generator().manual_seed(2))
    got, cache = cached_logits(small, seq, prompt_len=4)
    assert small.can_stream(cache)
    with torch.no_grad():
        want = torch.stack([big(seq[:, : t + 1])[:, -1] for t in range(3, 40)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _cache_bytes(name, kv, layout):
    seq = torch.randint(50, (1, CONTEXT), generator=torch.Generator().manual_seed(2))
    return cached_logits(model_for(MODEL_PATTERNS[name], kv, layout=layout), seq, prompt_len=5)[1].nbytes()


@pytest.mark.parametrize("name", [n for n in MODEL_PATTERNS if n != "fixed_v2"])
def test_caches_store_only_the_shared_heads(name, layout_file):
    """Same sequence, same positions: the cache of n_kv_head 2 holds exactly a quarter of the 8-head model's bytes."""
    assert _cache_bytes(name, None, layout_file) == 4 * _cache_bytes(name, KV, layout_file) > 0


def test_a_group_of_heads_with_different_summary_columns_keeps_their_union(layout_file):
    """fixed with 2 summary sets: neighbouring heads see different columns, so a shared head keeps both sets
    (2c per chunk instead of c) and masks each query head to its own; still exact (see above)."""
    per_key = 2 * 4 * 4  # k and v of one head of size 4, fp32
    l, c, layers = 8, 2, 2
    mha = layers * H * (l + c * (CONTEXT // l)) * per_key
    gqa = layers * KV * (l + 2 * c * (CONTEXT // l)) * per_key
    assert (_cache_bytes("fixed_v2", None, layout_file), _cache_bytes("fixed_v2", KV, layout_file)) == (
        mha,
        gqa,
    )
    assert type(make_cache(Fixed(8, 2, 1, 2), 1, H, 16, n_kv_head=KV)) is FixedCache


def test_a_group_spanning_both_strided_halves_keeps_every_position():
    """strided split with fewer key/value heads than halves: one shared head serves local and strided query
    heads, so the layer keeps every position and masks with the rule (exact, see above)."""
    assert type(make_cache(Strided(4, "split", H), 1, H, 16, n_kv_head=KV)) is StridedCache  # halves are whole groups
    assert type(make_cache(Strided(4, "split", H), 1, H, 16, n_kv_head=1)) is AppendCache


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["dense", "local", "sink", "split", "union", "fixed"]),
    a=st.integers(1, 6),
    kv=st.sampled_from([1, 2, 4, 8]),
    prompt_len=st.integers(1, 10),
    total=st.integers(11, 26),
    nv=st.sampled_from([1, 2]),
)
def test_each_cache_step_with_shared_heads_equals_the_reference(kind, a, kv, prompt_len, total, nv):
    pattern = {
        "dense": Dense(),
        "local": Local(a),
        "sink": SinkWindow(a // 2, a),
        "split": Strided(a, "split", H),
        "union": Strided(a, "union", H),
        "fixed": Fixed(2 * a, a, 1, nv),
    }[kind]
    g = torch.Generator().manual_seed(total)
    q = torch.randn(2, H, total, D, generator=g)
    k, v = (torch.randn(2, kv, total, D, generator=g) for _ in range(2))
    cache = make_cache(pattern, 2, H, total, n_kv_head=kv)
    cache.prefill(k[:, :, :prompt_len], v[:, :, :prompt_len])
    for i in range(prompt_len, total):
        out = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], i)
        want = plain_gqa(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], pattern)[:, :, -1:]
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert max(t.shape[1] for t in cache._tensors()) <= kv  # only the shared heads are stored


def test_attention_maps_see_the_grouped_modified_weights():
    """The reference path of ``viz``/attention statistics runs GQA layers with modifiers as the model does."""
    from attnlab.eval.inspection.attention_maps import capture_attention

    model = model_for(dict(pattern="local", window=5, modifiers=["alibi", "softcap(cap=2)"]), position="none")
    seq = torch.randint(50, (2, CONTEXT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(seq)
        with capture_attention(model, [1]) as captured:
            got = model(seq)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    w = captured[1]
    assert w.shape == (2, H, CONTEXT, CONTEXT) and torch.allclose(w.sum(-1), torch.ones(2, H, CONTEXT))


def test_bad_n_kv_head_is_refused():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["train.max_steps=1", "model.n_head=8", "model.d_model=64", "model.n_kv_head=3"])
    assert str(e.value) == (
        "model.n_kv_head=3 does not divide model.n_head=8: choose a divisor of 8 "
        "(1 = multi-query attention) or leave n_kv_head unset"
    )
    with pytest.raises(ConfigError, match="out of range"):
        config.load(None, ["train.max_steps=1", "model.n_kv_head=0"])


def test_a_gqa_run_saves_and_loads(tmp_path):
    from attnlab.run.open import load_run
    from attnlab.training.trainer import train
    from runkit import tiny_config, write_corpus

    cfg = tiny_config(
        write_corpus(tmp_path / "c.txt"),
        tmp_path / "data",
        tmp_path / "runs",
        "model.n_head=4",
        "model.n_kv_head=1",
        "train.max_steps=2",
    )
    train(cfg)
    run = load_run(tmp_path / "runs" / "t", device="cpu")
    assert run.cfg.model.n_kv_head == 1 and run.model.describe()["n_kv_head"] == 1
    attn = run.model.blocks[0].attn
    assert attn.qkv.weight.shape[0] == attn.sizes[0] + 2 * (attn.sizes[0] // 4)  # q: 4 heads, k and v: 1 each


def test_bench_generate_shows_the_four_times_smaller_cache(tmp_path, one_thread):
    from pathlib import Path

    from attnlab.bench.generate import bench_generate

    cfg = config.load(
        Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
        ["model.n_layer=1", "model.d_model=32", "model.n_head=8", "data.vocab_size=300"],
    )
    rows = bench_generate(
        cfg,
        ["dense", "dense:n_kv_head=2", "local:window=8:n_kv_head=2", "local:window=8"],
        [16],
        prompt_len=4,
        window=4,
        repeats=1,
        recompute_max=0,
        out=tmp_path / "g.csv",
        log=lambda s: None,
    )
    mb = {r["spec"]: r["cache_mb"] for r in rows if r["mode"] == "cache"}
    assert mb["dense"] == 4 * mb["dense:n_kv_head=2"] and mb["local:window=8"] == 4 * mb["local:window=8:n_kv_head=2"]
    assert {r["params"] for r in rows if r["spec"] == "dense:n_kv_head=2"} == {"n_kv_head=2"}
    import csv

    with open(tmp_path / "g.csv", newline="") as f:
        params = [(r["pattern"], r["params"]) for r in csv.DictReader(f)]
    assert params == [("dense", ""), ("dense", "n_kv_head=2"), ("local", "window=8;n_kv_head=2"), ("local", "window=8")]
