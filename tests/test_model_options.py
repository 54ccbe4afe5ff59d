"""The Sparse Transformer's deep-model options: MLP ratio, narrow query/key projections, recomputation, its init."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab import config
from attnlab.attention import Dense, Linear, reference, sdpa
from attnlab.attention.blocksparse import blocksparse
from attnlab.attention.linear import linear_backend
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.errors import ConfigError
from attnlab.model.gpt import GPT, mlp_hidden, qk_head_size
from test_blocksparse import PATTERNS as BLOCKSPARSE_PATTERNS
from test_blocksparse import out_and_grads
from test_cache import CONTEXT, cached_logits
from test_cache import PATTERNS as CACHE_PATTERNS

pytestmark = pytest.mark.usefixtures("one_thread")

V = 50


def model(seed: int = 0, attn: dict | None = None, vocab: int = V, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, d_model=32, context=32, dropout=0.0)
    return GPT(ModelConfig(**{**cfg, **kw}), AttentionConfig(**(attn or {})), vocab)


def tokens(B: int = 2, T: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def load(*overrides: str) -> config.Config:
    return config.load(None, ["train.max_steps=1", *overrides])


# ------------------------------------------------------------------ config keys


def test_new_keys_have_help_and_keep_the_old_defaults():
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for key in ("mlp_ratio", "qk_ratio", "checkpoint_activations", "init"):
        assert fields[key].metadata["help"], key
    cfg = ModelConfig()
    assert (cfg.mlp_ratio, cfg.qk_ratio, cfg.checkpoint_activations, cfg.init) == (None, 1.0, False, "gpt2")
    assert "sparse_transformer" in fields["init"].metadata["choices"]


def test_mlp_ratio_sets_the_hidden_width():
    assert mlp_hidden(ModelConfig(d_model=128, mlp_ratio=2)) == 256  # the paper's half-size feed-forward
    assert mlp_hidden(ModelConfig(d_model=100, mlp_ratio=2.5, mlp="swiglu")) == 250  # each SwiGLU input projection
    assert mlp_hidden(ModelConfig(d_model=128, mlp_hidden=100)) == 100
    m = model(mlp_ratio=2)
    assert m.blocks[0].mlp.fc.weight.shape == (64, 32) and m.blocks[0].mlp.proj.weight.shape == (32, 64)
    assert load("model.mlp_ratio=0.5", "model.d_model=64").model.mlp_ratio == 0.5


def test_mlp_hidden_and_mlp_ratio_together_are_refused_naming_both():
    with pytest.raises(ConfigError) as err:
        load("model.mlp_hidden=64", "model.mlp_ratio=2")
    message = str(err.value)
    assert "model.mlp_hidden" in message and "model.mlp_ratio" in message and "\n" not in message
    with pytest.raises(ConfigError, match="both set"):
        model(mlp_hidden=64, mlp_ratio=2.0)


def test_qk_ratio_narrows_queries_and_keys_in_the_one_fused_projection():
    default, half = model(), model(qk_ratio=0.5)
    assert default.blocks[0].attn.qkv.weight.shape == (3 * 32, 32)
    assert half.blocks[0].attn.qkv.weight.shape == (2 * 16 + 32, 32)
    assert list(half.state_dict()) == list(default.state_dict())  # same names: optimizer groups, checkpoints
    assert qk_head_size(half.cfg) == 4 and half.blocks[0].attn.v_head == 8
    seen = []
    half.blocks[0].attn.core.register_forward_pre_hook(lambda mod, args: seen.append([x.shape[-1] for x in args]))
    assert half(tokens()).shape == (2, 32, V)
    assert seen == [[4, 4, 8]]
    with pytest.raises(ConfigError, match=r"qk_ratio=0.3 gives a query/key head size of 2.4"):
        load("model.d_model=32", "model.n_head=4", "model.qk_ratio=0.3")
    with pytest.raises(ConfigError, match="even head size for queries and keys"):
        load("model.d_model=24", "model.n_head=4", "model.qk_ratio=0.5", "model.position=rope")
    assert load("model.d_model=24", "model.n_head=4", "model.qk_ratio=0.5").model.qk_ratio == 0.5


def test_describe_reports_the_sizes_and_checkpointing():
    info = model(mlp_ratio=2, qk_ratio=0.5, checkpoint_activations=True).describe()
    assert (info["mlp_hidden"], info["qk_head_size"], info["v_head_size"], info["checkpoint_activations"]) == (
        64,
        4,
        8,
        True,
    )
    info = model().describe()
    assert (info["mlp_hidden"], info["qk_head_size"], info["v_head_size"], info["checkpoint_activations"]) == (
        128,
        8,
        8,
        False,
    )


# ------------------------------------------------------------------ backends and caches with Dqk != Dv


def qkv(B: int, H: int, T: int, dqk: int, dv: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=dtype, requires_grad=True) for d in (dqk, dqk, dv)]


def assert_same(fn, pattern, q, k, v) -> None:
    for got, want in zip(out_and_grads(fn, q, k, v, pattern), out_and_grads(reference, q, k, v, pattern)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", BLOCKSPARSE_PATTERNS)
@pytest.mark.parametrize("dqk,dv", [(4, 10), (8, 3)])
def test_blocksparse_equals_the_reference_when_value_heads_differ(name, dqk, dv):
    assert_same(blocksparse, BLOCKSPARSE_PATTERNS[name], *qkv(2, 4, 37, dqk, dv))


def test_sdpa_and_linear_equal_the_reference_when_value_heads_differ():
    assert_same(sdpa, Dense(), *qkv(2, 4, 37, 4, 10))
    assert_same(linear_backend, Linear(), *qkv(2, 4, 37, 4, 10))
    assert_same(sdpa, Dense(), *qkv(1, 2, 1, 8, 3))


def test_blocksparse_dropout_backward_matches_its_forward_when_value_heads_differ():
    q, k, v = qkv(1, 4, 12, 2, 5, dtype=torch.float64)

    def fn(q, k, v):
        torch.manual_seed(5)
        return blocksparse(q, k, v, BLOCKSPARSE_PATTERNS["strided_union"], dropout_p=0.3, training=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_wrapper_passes_value_heads_of_their_own_size(monkeypatch):
    """flex's padding and BlockMask with Dqk != Dv, through eager flex_attention: compiling costs ~20 s on CPU
    (the compiled kernels take Ev != E, forward and backward: inductor's flex templates size V_HEAD_DIM apart)."""
    from torch.nn.attention.flex_attention import flex_attention

    from attnlab.attention import flex as flex_mod

    monkeypatch.setattr(flex_mod, "_compiled", lambda: flex_attention)
    q, k, v = (x.detach() for x in qkv(1, 4, 100, 8, 16))
    for pattern in (BLOCKSPARSE_PATTERNS["local_wide"], BLOCKSPARSE_PATTERNS["strided_union"]):
        torch.testing.assert_close(flex_mod.flex(q, k, v, pattern), reference(q, k, v, pattern), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "attn",
    [
        dict(pattern="local", window=5),
        dict(pattern="strided", local_attn_ctx=4, strided_mode="union"),
        dict(pattern="fixed", local_attn_ctx=8, blocksize=2, num_verts=2),
        dict(pattern="linear"),
    ],
    ids=["local", "strided_union", "fixed", "linear"],
)
def test_half_size_qk_model_trains_the_same_through_the_fast_backend(attn):
    fast, ref = (
        model(attn=attn, qk_ratio=0.5, position="rope"),
        model(attn={**attn, "backend": "reference"}, qk_ratio=0.5, position="rope"),
    )
    assert fast.resolve_backends("cpu")[0] in ("blocksparse", "linear")
    idx = tokens()
    for m in (fast, ref):
        F.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("name", list(CACHE_PATTERNS))
def test_cached_decoding_equals_the_full_forward_with_half_size_qk(name, position, tmp_path):
    attn = CACHE_PATTERNS[name]
    if attn.get("pattern") == "block_layout":
        np.save(tmp_path / "layout.npy", np.random.default_rng(0).random((4, CONTEXT // 4, CONTEXT // 4)) < 0.5)
        attn = dict(attn, layout=str(tmp_path / "layout.npy"))
    m = model(attn=attn, qk_ratio=0.5, position=position, context=CONTEXT).eval()
    assert m.blocks[0].attn.qkv.weight.shape[0] == 2 * 16 + 32
    seq = tokens(T=CONTEXT)
    got = cached_logits(m, seq, prompt_len=3)
    with torch.no_grad():
        want = torch.stack([m(seq[:, : t + 1])[:, -1] for t in range(2, CONTEXT)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ activation checkpointing


def loss_grads_and_calls(checkpointing: bool, attn: dict, seed: int = 1) -> tuple[torch.Tensor, dict, int]:
    """Loss and gradients of one training step with dropout everywhere, and how often blocks ran."""
    m = model(attn=attn, n_layer=3, dropout=0.2, checkpoint_activations=checkpointing).train()
    calls = []
    for block in m.blocks:
        block.register_forward_pre_hook(lambda mod, args: calls.append(1))
    idx = tokens()
    torch.manual_seed(seed)
    loss = F.cross_entropy(m(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}, len(calls)


@pytest.mark.parametrize(
    "attn",
    [
        dict(),
        dict(pattern="local", window=5),
        dict(pattern="strided", local_attn_ctx=4, strided_mode="union"),
        dict(pattern="fixed", local_attn_ctx=8, blocksize=2, num_verts=2),
    ],
    ids=["dense-sdpa", "local", "strided_union", "fixed"],
)
def test_checkpointing_recomputes_blocks_with_the_same_dropout_masks(attn):
    assert model(attn=attn, dropout=0.2).resolve_backends("cpu")[0] == ("sdpa" if not attn else "blocksparse")
    loss, grads, calls = loss_grads_and_calls(False, attn)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_grads_and_calls(True, attn)
    assert (calls, calls_ckpt) == (3, 6)  # every block ran again in backward
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.allclose(
        loss_grads_and_calls(False, attn, seed=2)[0], loss
    )  # dropout acts: the masks had to match


def test_checkpointing_is_off_outside_training():
    m = model(checkpoint_activations=True, dropout=0.2)
    calls = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    m.eval()
    m(tokens()).sum().backward()
    m.train()
    with torch.no_grad():
        m(tokens())
    assert len(calls) == 2


def test_checkpointed_model_compiles_without_graph_breaks():
    m = model(checkpoint_activations=True, dropout=0.1, position="rope", qk_ratio=0.5).train()
    m.resolve_backends("cpu")  # as the trainer does before compiling
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    compiled(tokens()).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def saved_bytes(m: GPT, idx: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward of one training step."""
    params = {p.data_ptr() for p in m.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(m(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    return sum(saved.values())


def test_checkpointing_saves_far_fewer_activations():
    idx = tokens(B=4, T=64)
    plain = saved_bytes(model(n_layer=4, d_model=64, context=64, dropout=0.1).train(), idx)
    ckpt = saved_bytes(model(n_layer=4, d_model=64, context=64, dropout=0.1, checkpoint_activations=True).train(), idx)
    assert ckpt < plain / 5, (ckpt, plain)


# ------------------------------------------------------------------ the Sparse Transformer's initialisation


def test_sparse_transformer_init_follows_the_paper_in_every_layer():
    """Child et al. 2019: N(0, 0.125/sqrt(fan_in)) weights, W_p and W_2 also / sqrt(2N), embeddings 0.125/sqrt(d*n_emb)."""
    d, n_layer, ratio = 256, 6, 2
    m = model(
        d_model=d,
        n_layer=n_layer,
        n_head=4,
        mlp_ratio=ratio,
        qk_ratio=0.5,
        context=64,
        vocab=512,
        init="sparse_transformer",
        position="image+learned",
        image_shape=[16, 16, 3],
    )
    depth = 1 / math.sqrt(2 * n_layer)
    for i, block in enumerate(m.blocks):
        expected = {
            "attn.qkv": 0.125 / math.sqrt(d),
            "attn.proj": 0.125 / math.sqrt(d) * depth,
            "mlp.fc": 0.125 / math.sqrt(d),
            "mlp.proj": 0.125 / math.sqrt(ratio * d) * depth,
        }
        for name, std in expected.items():
            linear = block.get_submodule(name)
            assert linear.weight.std().item() == pytest.approx(std, rel=0.03), (i, name)
            assert abs(linear.weight.mean().item()) < std / 10 and (linear.bias == 0).all(), (i, name)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.125 / math.sqrt(d), rel=0.03)
    for table in (m.pos_emb.row, m.pos_emb.col, m.pos_emb.channel, m.pos_emb.absolute):  # n_emb = 4 summed tables
        assert table.weight.std().item() == pytest.approx(0.125 / math.sqrt(4 * d), rel=0.1)
    assert (m.lm_head.weight == 0).all() and not m.tied  # the output logits start at zero, so the embedding is untied
    assert (m.blocks[0].norm1.weight == 1).all() and (m.blocks[0].norm1.bias == 0).all()


def test_sparse_transformer_init_scales_learned_positions_as_one_table():
    m = model(d_model=256, context=256, init="sparse_transformer")
    assert m.pos_emb.weight.std().item() == pytest.approx(0.125 / math.sqrt(256), rel=0.03)


def test_mainrun_init_is_the_challenges_train_py():
    """The mainrun challenge's train.py: every weight N(0, 0.02), no residual scaling, positions start at zero."""
    m = model(d_model=256, n_layer=6, context=64, init="mainrun")
    for block in m.blocks:
        for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
            assert block.get_submodule(name).weight.std().item() == pytest.approx(0.02, rel=0.03), name
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.03) and m.tied
    assert (m.pos_emb.weight == 0).all()
