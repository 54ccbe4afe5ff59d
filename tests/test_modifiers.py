"""Score modifiers: one definition, exact in the reference, blocksparse (forward and backward), flex and KV caches."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from attnlab import config
from attnlab.attention import Attention, Dense, Fixed, Local, SinkWindow, Strided, reference, select_backend
from attnlab.attention.blocksparse import blocksparse, plan
from attnlab.attention.cache import make_cache
from attnlab.attention.flex import flex, flex_available
from attnlab.attention.modifiers import MODIFIERS, build_modifiers, modifier_specs, parse_spec
from attnlab.attention.modifiers.alibi import alibi_slopes
from attnlab.attention.modifiers.relpos import relative_bucket
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.errors import ConfigError
from attnlab.model.gpt import GPT
from attnlab.training.optim import param_groups

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

H = 4
MODS = {
    "alibi": ["alibi"],
    "softcap": ["softcap(cap=2)"],
    "relpos": ["relpos(buckets=8,max_distance=20)"],
    "all": ["alibi", "softcap(cap=3)", "relpos(buckets=6,max_distance=12)"],
}
PATTERNS = {
    "dense": Dense(),
    "local": Local(7),
    "strided_split": Strided(4, "split", H),
    "strided_union": Strided(8, "union", H),  # two merged components per head
    "fixed": Fixed(8, 2, 1, 2),
    "sink_window": SinkWindow(3, 5),
}


def modifier(name: str, seed: int = 0):
    """The modifiers of ``MODS[name]``, a learned bias set to random values (it starts at zero)."""
    mod = build_modifiers(MODS[name], H)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return mod


def qkv(B, T, D=8, seed=0, heads=H, kv_heads=H):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, T, D, generator=g, requires_grad=True)
    return q, *(torch.randn(B, kv_heads, T, D, generator=g, requires_grad=True) for _ in range(2))


def out_and_grads(fn, q, k, v, pattern, mod):
    out = fn(q, k, v, pattern, 0.0, False, modifier=mod)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return (out, *torch.autograd.grad(out, (q, k, v, *mod.parameters()), g))


# ------------------------------------------------------------------ definitions


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0 ** -(2 * i) for i in range(1, 5)]
    # not a power of two: the 4 slopes of 4 heads, then every other slope of 8 heads
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_relative_buckets_are_t5s_causal_buckets():
    d = torch.tensor([0, 1, 15, 16, 17, 31, 32, 64, 127, 128, 1000, -5])
    got = relative_bucket(d, 32, 128).tolist()
    # T5 (unidirectional): exact below 16, then 16 + log(n/16)/log(128/16) * 16, capped at 31
    want = [
        n if n < 16 else min(31, 16 + int(math.log(n / 16) / math.log(8) * 16)) for n in [max(x, 0) for x in d.tolist()]
    ]
    assert got == want == [0, 1, 15, 16, 16, 21, 21, 26, 31, 31, 31, 0]


def test_reference_applies_each_definition_before_the_mask():
    q, k, v = (x.detach() for x in qkv(1, 6))
    i, j = torch.arange(6).view(6, 1), torch.arange(6).view(1, 6)
    raw = q @ k.transpose(-2, -1) / math.sqrt(8)
    slopes = alibi_slopes(H).view(H, 1, 1)
    rel = modifier("relpos")
    bias = rel.items[0].bias.detach().view(8, H)[relative_bucket(i - j, 8, 20)].permute(2, 0, 1)
    hand = {"alibi": raw - slopes * (i - j), "softcap": 2 * torch.tanh(raw / 2), "relpos": raw + bias}
    for name, scores in hand.items():
        mod = rel if name == "relpos" else modifier(name)
        want = torch.softmax(scores.masked_fill(j > i, float("-inf")), -1) @ v
        torch.testing.assert_close(reference(q, k, v, Dense(), modifier=mod), want, msg=name)


def test_every_registered_modifier_is_tested_here():
    assert set(MODIFIERS) == {"alibi", "softcap", "relpos"}  # a new built-in needs its MODS entry and hand check


def test_softcap_keeps_scores_inside_the_cap():
    mod = build_modifiers(["softcap(cap=30)"], 1)
    s = torch.tensor([-1e4, -30.0, 0.0, 1.0, 1e4])
    out = mod.score(s, None, None, None)
    assert out.abs().max() <= 30 and out[2] == 0 and abs(float(out[3]) - 1.0) < 1e-3


# ------------------------------------------------------------------ backends


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mods", MODS)
def test_blocksparse_equals_reference_outputs_and_gradients(mods, pattern):
    """Including the gradient of relpos's learned bias, through the kernel's recomputing backward."""
    mod = modifier(mods)
    q, k, v = qkv(2, 37)
    got = out_and_grads(blocksparse, q, k, v, PATTERNS[pattern], mod)
    want = out_and_grads(reference, q, k, v, PATTERNS[pattern], mod)
    assert len(got) == 3 + 1 + ("relpos" in MODS[mods][-1])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_changing_the_future_never_changes_the_past(pattern):
    q, k, v = (x.detach() for x in qkv(1, 48))
    mod, t = modifier("all"), 29
    before = blocksparse(q, k, v, PATTERNS[pattern], modifier=mod)
    for x in (q, k, v):
        x[:, :, t:] += torch.randn_like(x[:, :, t:])
    after = blocksparse(q, k, v, PATTERNS[pattern], modifier=mod)
    assert torch.equal(before[:, :, :t], after[:, :, :t]) and not torch.allclose(before[:, :, t:], after[:, :, t:])


def test_dropout_backward_matches_its_forward_with_modifiers():
    """Attention dropout and modifiers together: the recomputing backward is the forward's gradient (float64)."""
    q, k, v = (x.detach().double().requires_grad_() for x in qkv(1, 12, 2, heads=2, kv_heads=2))
    mod = build_modifiers(MODS["all"], 2)
    torch.nn.init.normal_(mod.items[2].bias)

    def fn(q, k, v):
        torch.manual_seed(5)  # the kernel draws its dropout seed from the global generator
        return blocksparse(q, k, v, Strided(4, "union", 2), dropout_p=0.3, training=True, modifier=mod)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["dense", "local", "strided", "fixed", "sink"]),
    a=st.integers(1, 9),
    T=st.integers(1, 70),
    mods=st.sampled_from(list(MODS)),
    kv=st.sampled_from([1, 2, 4]),
)
def test_any_length_and_parameters_match_the_reference(kind, a, T, mods, kv):
    pattern = {
        "dense": Dense(),
        "local": Local(a),
        "strided": Strided(a, "split", H),
        "fixed": Fixed(2 * a, 2, 1, 1),
        "sink": SinkWindow(a // 2, a),
    }[kind]
    q, k, v = (x.detach() for x in qkv(1, T, 4, seed=T, kv_heads=kv))
    mod = modifier(mods)
    torch.testing.assert_close(
        blocksparse(q, k, v, pattern, modifier=mod), reference(q, k, v, pattern, modifier=mod), atol=2e-5, rtol=1e-4
    )


class LargestTensor(TorchDispatchMode):
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_modifiers_add_no_t_squared_tensor():
    """The modified kernel's largest tensor is a chunk of blocks, far below T x T (the plain kernel's, fused, is
    smaller still: it never stores a chunk's probabilities)."""
    T, pattern, mod = 2048, Local(64), modifier("all")
    q, k, v = qkv(1, T, 16)
    plan(pattern, T, H, q.device)
    largest = []
    for m in (None, mod):
        with LargestTensor() as spy:
            blocksparse(q, k, v, pattern, modifier=m).sum().backward()
        largest.append(spy.largest)
    assert largest[0] <= largest[1] < T * T / 4 and mod.items[2].bias.grad.abs().sum() > 0


cpu_flex = pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1])
cuda_flex = pytest.mark.skipif(not flex_available("cuda")[0], reason="needs CUDA with Triton")


# One compile each (seconds on CPU): full and partial tiles, per-head rules, per-head summary columns.
FLEX_PATTERNS = {"local": Local(40), "strided_split": Strided(16, "split", H), "fixed": Fixed(32, 8, 1, 2)}


@cpu_flex
@pytest.mark.parametrize("name", FLEX_PATTERNS)
def test_flex_score_mod_equals_reference(name):
    """All three modifiers as one score_mod, with grouped key/value heads (one compile per pattern on CPU)."""
    pattern, mod = FLEX_PATTERNS[name], modifier("all")
    q, k, v = (x.detach() for x in qkv(1, 256, 16, kv_heads=2))
    with torch.no_grad():
        torch.testing.assert_close(
            flex(q, k, v, pattern, modifier=mod), reference(q, k, v, pattern, modifier=mod), atol=1e-5, rtol=1e-5
        )


@cuda_flex
@pytest.mark.parametrize("pattern", ["local", "strided_split", "sink_window"])
def test_flex_cuda_outputs_and_gradients_equal_reference(pattern):
    mod = modifier("all").cuda()
    q, k, v = (x.detach().cuda().requires_grad_() for x in qkv(1, 256, 16))
    got = out_and_grads(flex, q, k, v, PATTERNS[pattern], mod)
    want = out_and_grads(reference, q, k, v, PATTERNS[pattern], mod)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-3)


def test_auto_never_picks_sdpa_for_modified_scores():
    assert select_backend("auto", Dense(), "cpu", modifiers=["alibi"])[0] == "blocksparse"
    assert select_backend("auto", Dense(), "cpu")[0] == "sdpa"
    with pytest.raises(ConfigError) as e:
        select_backend("sdpa", Dense(), "cpu", modifiers=["alibi"])
    assert str(e.value) == (
        "attention.backend='sdpa' cannot apply score modifiers ['alibi']: "
        "use attention.backend=auto or one of flex, blocksparse, reference"
    )


# ------------------------------------------------------------------ caches and models


def model_for(attn: dict, position="none", context=24, seed=0, **model) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=H, d_model=32, context=context, position=position, **model)
    m = GPT(cfg, AttentionConfig(**attn), 50).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a learned bias starts at zero: give it values that show
        for name, p in m.named_parameters():
            if ".modifier." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return m


@torch.no_grad()
def cached_logits(model: GPT, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    cache = model.new_cache(seq.size(0), seq.size(1))
    out = [model(seq[:, :prompt_len], cache=cache)[:, -1]]
    for t in range(prompt_len, seq.size(1)):
        out.append(model(seq[:, t : t + 1], cache=cache)[:, -1])
    return torch.stack(out, 1)


CACHE_PATTERNS = {
    "dense": {},
    "local": dict(pattern="local", window=5),
    "strided-split": dict(pattern="strided", local_attn_ctx=4),
    "strided-union": dict(pattern="strided", local_attn_ctx=4, strided_mode="union"),
    "fixed-2-verts": dict(pattern="fixed", local_attn_ctx=8, blocksize=2, num_verts=2),
    "sink_window": dict(pattern="sink_window", sinks=2, window=5),
}
CACHE_MODS = {"alibi+relpos": ["alibi", "relpos(buckets=8,max_distance=16)"], "softcap": ["softcap(cap=1.5)"]}


@pytest.mark.parametrize("mods", CACHE_MODS)
@pytest.mark.parametrize("name", CACHE_PATTERNS)
def test_cached_decoding_equals_the_full_forward(name, mods):
    model = model_for(dict(CACHE_PATTERNS[name], modifiers=CACHE_MODS[mods]), position="rope")
    seq = torch.randint(50, (2, 24), generator=torch.Generator().manual_seed(1))
    got = cached_logits(model, seq, prompt_len=3)
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(2, 24)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["dense", "local", "sink", "strided", "fixed"]),
    a=st.integers(1, 6),
    prompt_len=st.integers(1, 10),
    total=st.integers(11, 26),
    mods=st.sampled_from(list(MODS)),
)
def test_each_cache_step_equals_the_reference_with_modifiers(kind, a, prompt_len, total, mods):
    pattern = {
        "dense": Dense(),
        "local": Local(a),
        "sink": SinkWindow(a // 2, a),
        "strided": Strided(a, "union", H),
        "fixed": Fixed(2 * a, a, 1, 2),
    }[kind]
    mod = modifier(mods)
    q, k, v = (x.detach() for x in qkv(2, total, seed=total))
    cache = make_cache(pattern, 2, H, total, modifier=mod)
    cache.prefill(k[:, :, :prompt_len], v[:, :, :prompt_len])
    for i in range(prompt_len, total):
        out = cache.step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], i)
        want = reference(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], pattern, modifier=mod)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_alibi_local_streams_past_the_context_exactly():
    """Past its context, local + ALiBi decodes as the same weights with a long context do over the whole sequence."""
    small, big = (model_for(dict(pattern="local", window=3), "alibi", context=c) for c in (8, 40))
    big.load_state_dict(small.state_dict())
    seq = torch.randint(50, (2, 40), generator=torch.Generator().manual_seed(2))
    cache = small.new_cache(2, 40)
    assert small.can_stream(cache)
    got = cached_logits(small, seq, prompt_len=4)
    with torch.no_grad():
        want = torch.stack([big(seq[:, : t + 1])[:, -1] for t in range(3, 40)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def alibi_streaming_reference(model: GPT, seq: torch.Tensor) -> torch.Tensor:
    """Position by position over every key (no cache): query i sees the sinks j < s from position min(i, context - 1)
    and the window i - j < w from i, with ALiBi's -slope * distance on each. Obviously correct and slow."""
    pattern, ctx = model.blocks[0].attn.core.pattern, model.context
    slopes = alibi_slopes(H).view(1, H, 1, 1)
    hist = [([], []) for _ in model.blocks]
    logits = []
    for i in range(seq.size(1)):
        x = model.tok_emb(seq[:, i : i + 1])
        for (ks, vs), block in zip(hist, model.blocks):
            att, h = block.attn, block.norm1(x)
            B, _, C = h.shape
            q, k, v = (t.view(B, 1, H, -1).transpose(1, 2) for t in att.qkv(h).split(C, dim=2))
            ks.append(k), vs.append(v)
            keys, values = torch.cat(ks, 2), torch.cat(vs, 2)
            j = torch.arange(i + 1)
            seen_from = torch.where(j < pattern.sinks, min(i, ctx - 1), i)
            scores = q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1]) - slopes * (seen_from - j)
            scores = scores.masked_fill(~pattern.allowed(torch.tensor(i), j, torch.tensor(0)), float("-inf"))
            y = torch.softmax(scores, -1) @ values
            x = x + att.proj(y.transpose(1, 2).reshape(B, 1, C))
            x = x + block.mlp(block.norm2(x))
        logits.append(model.lm_head(model.norm_f(x))[:, -1])
    return torch.stack(logits, 1)


def test_alibi_sink_window_streams_as_streamingllm():
    model = model_for(dict(pattern="sink_window", sinks=2, window=3), "alibi", context=8)
    seq = torch.randint(50, (2, 30), generator=torch.Generator().manual_seed(3))
    got = cached_logits(model, seq, prompt_len=4)
    want = alibi_streaming_reference(model, seq)[:, 3:]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # inside the context the reference is the ordinary full forward pass
        torch.testing.assert_close(want[:, :5], model(seq[:, :8])[:, 3:], atol=2e-5, rtol=1e-4)


def test_position_alibi_is_position_none_with_the_alibi_modifier():
    a = model_for(dict(pattern="local", window=5), "alibi")
    b = model_for(dict(pattern="local", window=5, modifiers=["alibi"]), "none")
    c = model_for(dict(pattern="local", window=5, modifiers=["alibi"]), "alibi")  # listed once, applied once
    assert a.pos_emb is None and a.state_dict().keys() == b.state_dict().keys() == c.state_dict().keys()
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    seq = torch.randint(50, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(a(seq), b(seq)) and torch.equal(a(seq), c(seq))
    assert [blk.attn.core.specs for blk in a.blocks] == [["alibi"]] * 2
    assert a.describe()["attention"][0]["modifiers"] == ["alibi"]


def test_relpos_is_a_trained_saved_parameter_of_the_layer():
    mods = ["softcap(cap=5)", "relpos(buckets=8,max_distance=16)"]
    model = model_for(dict(pattern="local", window=5, modifiers=mods), "none", seed=3)
    names = [n for n, _ in model.named_parameters() if "modifier" in n]
    assert names == ["blocks.0.attn.core.modifier.items.1.bias", "blocks.1.attn.core.modifier.items.1.bias"]
    assert model.state_dict()[names[0]].shape == (8 * H,)
    # a bias, not a matrix: AdamW without decay, never Muon
    groups = {
        g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, config.OptimConfig(name="muon"), muon=True)
    }
    assert all(id(p) in groups["no_decay"] for n, p in model.named_parameters() if "modifier" in n)
    seq = torch.randint(50, (2, 24), generator=torch.Generator().manual_seed(5))
    grads = []
    for backend in ("blocksparse", "reference"):
        for blk in model.blocks:
            blk.attn.core.requested = backend
            blk.attn.core.resolve("cpu")
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(seq).flatten(0, 1), seq.flatten()).backward()
        grads.append(model.get_parameter(names[0]).grad.clone())
    assert model.blocks[0].attn.core.backend == "reference" and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_a_run_trains_saves_and_loads_its_learned_bias(tmp_path):
    from attnlab.run.open import load_run
    from attnlab.training.trainer import train
    from runkit import tiny_config, write_corpus

    cfg = tiny_config(
        write_corpus(tmp_path / "c.txt"),
        tmp_path / "data",
        tmp_path / "runs",
        "model.position=alibi",
        "attention.pattern=local",
        "attention.window=6",
        "attention.modifiers=relpos(buckets=8,max_distance=16)",
        "train.max_steps=2",
    )
    assert cfg.attention.modifiers == ["relpos(buckets=8,max_distance=16)"]
    summary = train(cfg)
    assert summary["attention"][0]["modifiers"] == ["alibi", "relpos(buckets=8,max_distance=16)"]
    assert summary["attention"][0]["backend"] == "blocksparse"
    run = load_run(tmp_path / "runs" / "t", device="cpu")
    bias = run.model.blocks[0].attn.core.modifier.items[1].bias
    assert bias.abs().sum() > 0  # trained away from its zero start, and loaded back


# ------------------------------------------------------------------ errors


def err(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(None, ["train.max_steps=1", *overrides])
    return str(e.value)


def test_bad_specs_are_refused_in_one_line():
    assert (
        err("attention.modifiers=alibo")
        == "attention.modifiers entry 'alibo' names unknown modifier 'alibo': use one of alibi, relpos, softcap"
    )
    assert err("attention.modifiers=softcap(cp=3)") == (
        "attention.modifiers entry 'softcap(cp=3)': softcap has no parameter 'cp'; "
        "its parameters are cap (float > 0, default 50)"
    )
    assert err("attention.modifiers=softcap(cap=-1)") == (
        "attention.modifiers entry 'softcap(cap=-1)': cap='-1' is not allowed; "
        "softcap takes cap (float > 0, default 50)"
    )
    assert err("attention.modifiers=relpos(buckets=2.5)") == (
        "attention.modifiers entry 'relpos(buckets=2.5)': buckets='2.5' is not allowed; relpos takes "
        "buckets (int in [2, 1024], default 32), max_distance (int in [2, 1048576], default 128)"
    )
    assert (
        err("attention.modifiers=alibi(slope=1)")
        == "attention.modifiers entry 'alibi(slope=1)': alibi has no parameter 'slope'; its parameters are none"
    )
    assert (
        err("attention.modifiers=soft cap")
        == "attention.modifiers entry 'soft cap' is not name or name(key=value,...): write e.g. softcap(cap=30)"
    )
    assert err("attention.modifiers=relpos(buckets=32,max_distance=10)") == (
        "attention.modifiers entry 'relpos(buckets=32,max_distance=10)': max_distance must exceed buckets/2 = 16 "
        "(the exact buckets): raise max_distance or lower buckets"
    )


def test_linear_attention_and_sdpa_refuse_modifiers():
    assert err("attention.pattern=linear", "attention.modifiers=alibi") == (
        "attention.modifiers=['alibi'] change softmax scores, but pattern 'linear' (layer 0) is linear attention, "
        "which has none: drop attention.modifiers or use a softmax pattern"
    )
    assert err("model.position=alibi", "attention.pattern=linear").startswith("attention.modifiers=['alibi'] change")
    assert "cannot apply score modifiers ['softcap(cap=30)']" in err(
        "attention.backend=sdpa", "attention.modifiers=softcap(cap=30)"
    )
    with pytest.raises(ConfigError, match="pattern 'linear'"):
        Attention(AttentionConfig(pattern="linear", modifiers=["alibi"]), 0, 1, 2, 0.0)


def test_specs_parse_from_the_command_line_and_yaml(tmp_path):
    cfg = config.load(
        None, ["train.max_steps=1", "attention.modifiers=alibi,relpos(buckets=16,max_distance=64),softcap"]
    )
    assert cfg.attention.modifiers == ["alibi", "relpos(buckets=16,max_distance=64)", "softcap"]
    assert [parse_spec(s)[1] for s in cfg.attention.modifiers] == [
        {},
        {"buckets": 16, "max_distance": 64},
        {"cap": 50.0},
    ]
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path).attention.modifiers == cfg.attention.modifiers
    assert modifier_specs(cfg.attention, ModelConfig(position="alibi"))[0] == "alibi"
    assert build_modifiers(["softcap(cap=30)"], 2).specs == ["softcap(cap=30)"]
