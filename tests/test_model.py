"""The GPT model: causality, initialisation, tying, embeddings, parameter count, compile and autocast."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnlab.config import AttentionConfig, ModelConfig
from attnlab.errors import ConfigError
from attnlab.model import GPT, Rotary, SinusoidalPositionalEmbedding, apply_rotary, mlp_hidden, sinusoidal_table

V = 23  # a small vocabulary that is not a power of two


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, d_model=16, context=8, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def make(seed=0, backend="auto", vocab=V, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw), AttentionConfig(backend=backend), vocab)


def tokens(B=2, T=8, seed=0, vocab=V) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = list(
    itertools.product(
        ["learned", "sinusoidal", "rope", "none"], ["layernorm", "rmsnorm"], ["pre", "post"], ["gelu", "relu", "swiglu"]
    )
)


# ------------------------------------------------------------------ causality


@pytest.mark.parametrize("position,norm,norm_position,mlp", VARIANTS)
def test_future_tokens_never_change_past_logits(position, norm, norm_position, mlp):
    qk_norm = (position, mlp) in {("rope", "swiglu"), ("learned", "gelu"), ("none", "relu")}  # cover qk_norm too
    for backend in ("sdpa", "reference"):
        model = make(
            backend=backend, position=position, norm=norm, norm_position=norm_position, mlp=mlp, qk_norm=qk_norm
        ).eval()
        idx = tokens()
        t = 5
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(8 - t)) % V
        with torch.no_grad():
            a, b = model(idx), model(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(a[:, t:], b[:, t:])  # the change is visible where it should be


def test_sdpa_and_reference_models_agree():
    idx = tokens()
    a = make(backend="sdpa", position="rope", qk_norm=True)
    b = make(backend="reference", position="rope", qk_norm=True)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(idx), b(idx), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ shapes and errors


def test_forward_shape_and_shorter_sequences():
    model = make()
    assert model(tokens()).shape == (2, 8, V)
    assert model(tokens(T=3)).shape == (2, 3, V)


def test_forward_raises_beyond_context():
    with pytest.raises(ValueError, match="context"):
        make()(tokens(T=9))


def test_bad_head_split_raises_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        make(d_model=18, n_head=4)
    with pytest.raises(ConfigError, match="even head size"):
        make(d_model=18, n_head=2, position="rope")


# ------------------------------------------------------------------ tying and init


def test_tied_weights_share_storage():
    model = make(tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_untied_and_zero_init_logits_do_not_share():
    for kw in (dict(tie_weights=False), dict(tie_weights=True, zero_init_logits=True)):
        model = make(**kw)
        assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def test_zero_init_logits_gives_uniform_predictions():
    model = make(zero_init_logits=True)
    logits = model(tokens())
    assert (logits == 0).all()
    torch.testing.assert_close(logits.softmax(-1), torch.full_like(logits, 1 / V))
    assert model.tok_emb.weight.std() > 0  # the embedding is still a useful random init


@pytest.mark.parametrize("init", ["gpt2", "xavier"])
def test_init_std(init):
    n_layer, std = 8, 0.02
    model = make(n_layer=n_layer, d_model=64, n_head=4, init=init, init_std=std, vocab=512)
    block = model.blocks[0]
    residual = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.proj.weight.flatten()]) for b in model.blocks])
    if init == "gpt2":
        assert residual.std().item() == pytest.approx(std / math.sqrt(2 * n_layer), rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
        assert block.mlp.fc.weight.std().item() == pytest.approx(std, rel=0.05)
    else:
        fan_in, fan_out = 64, 3 * 64
        assert block.attn.qkv.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
        assert block.attn.qkv.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.pos_emb.weight.std().item() == pytest.approx(std, rel=0.15)
    assert (block.attn.qkv.bias == 0).all() and (block.norm1.weight == 1).all() and (block.norm1.bias == 0).all()


# ------------------------------------------------------------------ embeddings


def test_sinusoidal_values_match_the_formula():
    d = 16
    table = sinusoidal_table(50, d)
    for pos, i in [(0, 0), (1, 0), (7, 3), (49, 7)]:
        angle = pos / 10000 ** (2 * i / d)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoidal_table(4, 9).shape == (4, 9)  # odd width works
    emb = SinusoidalPositionalEmbedding(50, d)
    torch.testing.assert_close(emb(3, offset=10), table[10:13])
    torch.testing.assert_close(emb(0, positions=torch.tensor([4, 2])), table[[4, 2]])
    torch.testing.assert_close(SinusoidalPositionalEmbedding(8, d)(4, offset=46), table[46:50])  # beyond its cache


def test_positions_past_the_cached_table_are_computed_exactly():
    # a window past the table (a long generation) whose positions restart per document: only those are computed
    pos = torch.tensor([[0, 1, 2, 0], [5, 6, 7, 8]])
    want = sinusoidal_table(50, 16)[pos]
    torch.testing.assert_close(SinusoidalPositionalEmbedding(8, 16)(4, offset=30, positions=pos), want)
    cos, sin = Rotary(16, context=8)(4, offset=30, positions=pos)
    full = Rotary(16, context=50)
    torch.testing.assert_close((cos, sin), (full.cos[pos], full.sin[pos]))


def test_rope_scores_depend_only_on_relative_position():
    Dh, rope = 8, Rotary(8, context=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(Dh, generator=g), torch.randn(Dh, generator=g)

    def score(m, n):  # q at position m, k at position n
        qm = apply_rotary(q.view(1, Dh), *rope(1, offset=m))
        kn = apply_rotary(k.view(1, Dh), *rope(1, offset=n))
        return (qm * kn).sum().item()

    for m, n, shift in [(5, 2, 7), (9, 9, 30), (3, 0, 60), (20, 11, 100)]:  # shift 100 leaves the cache
        assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)  # ...and they do depend on it
    # Rotation preserves norms, and position 0 is the identity.
    torch.testing.assert_close(apply_rotary(q.view(1, Dh), *rope(1)), q.view(1, Dh))


def test_rope_and_sinusoidal_buffers_are_not_saved():
    for position in ("rope", "sinusoidal"):
        keys = make(position=position).state_dict().keys()
        assert not any(k.startswith("pos_emb") for k in keys), position


def test_learned_positions_offset_and_positions():
    emb = make().pos_emb
    torch.testing.assert_close(emb(3, offset=2), emb.weight[2:5])
    torch.testing.assert_close(emb(0, positions=torch.tensor([[1, 0]])), emb.weight[[1, 0]].unsqueeze(0))


def test_qk_norm_gives_unit_rms_q_and_k():
    model = make(qk_norm=True, position="none", d_model=32, n_head=4)
    seen = []
    hook = model.blocks[1].attn.core.register_forward_pre_hook(lambda mod, args: seen.append(args))
    model(tokens())
    hook.remove()
    q, k, v = seen[0]
    for x in (q, k):
        rms = x.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    assert not torch.allclose(v.pow(2).mean(-1).sqrt(), torch.ones(1))


# ------------------------------------------------------------------ parameters


def test_param_count_matches_hand_calculation():
    # d=16, 2 layers, vocab 23, context 8, learned positions, layernorm with bias, GELU 4d, tied.
    d, L, ctx = 16, 2, 8
    per_block = (
        2 * (2 * d)  # two LayerNorms (weight + bias)
        + (d * 3 * d + 3 * d)  # fused qkv
        + (d * d + d)  # attention out-proj
        + (d * 4 * d + 4 * d)  # MLP up
        + (4 * d * d + d)  # MLP down
    )
    expected = V * d + ctx * d + L * per_block + 2 * d  # + final LayerNorm; lm_head is tied
    model = make()
    assert model.num_params() == expected == 7088
    assert model.num_params(non_embedding=True) == expected - V * d - ctx * d

    # SwiGLU, RMSNorm, no bias, QK-norm, RoPE, untied: hidden = ceil8(int(8/3*16)=42) = 48.
    h = 48
    per_block = (
        2 * d + d * 3 * d + d * d + d * 2 * h + h * d + 2 * (d // 2)
    )  # norms, qkv, proj, fc (gate+up), down, qk-norms
    expected = V * d + L * per_block + d + d * V  # token emb, blocks, final RMSNorm, untied lm_head
    model = make(mlp="swiglu", norm="rmsnorm", bias=False, qk_norm=True, position="rope", tie_weights=False)
    assert mlp_hidden(model.cfg) == h
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - V * d


def test_swiglu_default_hidden_width():
    assert mlp_hidden(ModelConfig(d_model=128, mlp="swiglu")) == 344  # int(341.33) -> 344
    assert mlp_hidden(ModelConfig(d_model=96, mlp="swiglu")) == 256
    assert mlp_hidden(ModelConfig(d_model=128, mlp="gelu")) == 512
    assert mlp_hidden(ModelConfig(d_model=128, mlp="swiglu", mlp_hidden=100)) == 100


def test_parameter_names_follow_the_optimizer_convention():
    for kw in (dict(), dict(position="rope", norm_position="post", tie_weights=False, qk_norm=True, mlp="swiglu")):
        names = [n for n, _ in make(**kw).named_parameters()]
        prefixes = ("tok_emb.weight", "pos_emb.", "blocks.", "norm_f.", "lm_head.weight")
        assert all(n.startswith(prefixes) for n in names), names
        assert "tok_emb.weight" in names


def test_describe_lists_every_layer():
    model = make(n_layer=3)
    model.resolve_backends("cpu")
    info = model.describe()
    assert info["n_params"] == make(n_layer=3).num_params()
    assert [a["layer"] for a in info["attention"]] == [0, 1, 2]
    assert info["attention"][0] == {"layer": 0, "pattern": "dense", "params": {}, "density": 1.0, "backend": "sdpa"}


def test_post_norm_has_no_final_norm():
    assert make(norm_position="post").norm_f is None
    assert make(norm_position="pre").norm_f is not None


# ------------------------------------------------------------------ determinism, autocast, compile


def test_deterministic_on_cpu_for_a_fixed_seed():
    def run():
        model = make(seed=3, dropout=0.2).train()
        torch.manual_seed(4)
        logits = model(tokens())
        logits.sum().backward()
        return logits, model.blocks[0].attn.qkv.weight.grad

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_dropout_is_active_only_in_training():
    model = make(dropout=0.5)
    idx = tokens()
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize(
    "kw", [dict(), dict(position="rope", qk_norm=True, norm="rmsnorm", mlp="swiglu"), dict(norm_position="post")]
)
def test_autocast_bf16(kw):
    model = make(**kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.fixture
def fresh_dynamo():
    """Forget earlier compilations: each test's recompiles of GPT.forward would add up to dynamo's limit."""
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "position,documents", [("learned", False), ("rope", False), ("rope", True), ("sinusoidal", True)]
)
def test_model_compiles_without_graph_breaks(position, documents, fresh_dynamo):
    # aot_eager traces the whole forward and backward like inductor does, without the slow C++ codegen.
    # Documents (masking, positions restarting) must not be read on the host: a device sync and a graph break.
    doc = dict(position_reset="document", eos_id=0) if documents else {}
    torch.manual_seed(0)
    model = GPT(tiny(position=position, qk_norm=True, dropout=0.1, **doc), AttentionConfig(document_mask=documents), V)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    idx = tokens()
    idx[:, 3] = 0  # a document boundary
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx))
    model.train()
    compiled(idx).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow  # inductor's C++ compilation takes ~30 s on 2 CPU cores
def test_inductor_compiled_model_matches_eager(fresh_dynamo):
    model = make(position="rope", qk_norm=True).eval()
    idx = tokens()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), atol=1e-5, rtol=1e-4)
