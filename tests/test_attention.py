"""Attention patterns, backends and the interface: fast backends must match the reference spec."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.attention import (
    BACKENDS,
    PATTERNS,
    Attention,
    Dense,
    Local,
    Pattern,
    build_pattern,
    reference,
    sdpa,
    select_backend,
)
from attnlab.config import AttentionConfig
from attnlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head h sees only keys j with j % (h + 1) == 0 (and itself): a head-dependent test pattern."""

    name: ClassVar[str] = "test_per_head"

    def rule(self, q_idx, k_idx, head):
        return (k_idx % (head + 1) == 0) | (k_idx == q_idx)


def _qkv(B, H, T, Dh, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, Dh, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def _out_and_grads(fn, q, k, v, pattern):
    out = fn(q, k, v, pattern, 0.0, False)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # a generic upstream gradient
    grads = torch.autograd.grad(out, (q, k, v), grad_outputs=g_out)
    return out, grads


# ------------------------------------------------------------------ patterns


@pytest.mark.parametrize("T,H", [(1, 1), (5, 2), (16, 3)])
def test_dense_mask_is_lower_triangular(T, H):
    mask = Dense().dense_mask(T, H)
    assert mask.shape == (H, T, T) and mask.dtype == torch.bool
    expected = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(mask, expected.expand(H, T, T))


@pytest.mark.parametrize("T", [1, 7, 100, 3000])
def test_dense_density_is_one(T):
    assert Dense().density(T, 4) == 1.0
    # The generic pair counter (used by non-dense patterns) agrees, including across query chunks.
    assert Pattern.density(Dense(), T, 2) == pytest.approx(1.0)


def test_density_of_a_window_counts_allowed_over_causal_pairs():
    T, w = 10, 3
    allowed = sum(min(i + 1, w) for i in range(T))
    assert Local(w).density(T, 2) == pytest.approx(allowed / (T * (T + 1) / 2))


def test_every_pattern_is_causal():
    for pattern in (Dense(), Local(3), PerHead()):
        mask = pattern.dense_mask(9, 3)
        assert not mask.triu(diagonal=1).any(), pattern.name


def test_allowed_broadcasts_and_uses_head():
    q = torch.tensor(4).view(1, 1, 1)
    k = torch.arange(5).view(1, 1, 5)
    h = torch.arange(2).view(2, 1, 1)
    out = PerHead().allowed(q, k, h)
    assert out.shape == (2, 1, 5)
    assert out[0].all()  # head 0: every key
    assert out[1, 0].tolist() == [True, False, True, False, True]  # head 1: even keys and itself


def test_pattern_is_frozen_and_describes_itself():
    p = Local(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.window = 5  # frozen: a pattern is a value
    assert p.params() == {"window": 4}
    assert Dense().params() == {} and Dense().is_dense_causal and not p.is_dense_causal


def test_build_pattern_registry():
    assert "dense" in PATTERNS
    assert isinstance(build_pattern(AttentionConfig(pattern="dense"), 0, 2, 4), Dense)
    cfg = AttentionConfig()
    cfg.pattern = "no_such_pattern"  # bypasses config validation on purpose
    with pytest.raises(ConfigError, match="no_such_pattern"):
        build_pattern(cfg, 0, 2, 4)


# ------------------------------------------------------------------ backends


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 24), Dh=st.integers(1, 16), seed=st.integers(0, 1000))
def test_sdpa_matches_reference_outputs_and_gradients(B, H, T, Dh, seed):
    q, k, v = _qkv(B, H, T, Dh, seed)
    ref_out, ref_grads = _out_and_grads(reference, q, k, v, Dense())
    out, grads = _out_and_grads(sdpa, q, k, v, Dense())
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for g, rg, name in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_reference_matches_a_hand_computation():
    q, k, v = _qkv(2, 2, 6, 4)
    out = reference(q, k, v, Local(2), 0.0, False)
    scores = q @ k.transpose(-2, -1) / 2.0
    i, j = torch.arange(6).view(6, 1), torch.arange(6).view(1, 6)
    scores = scores.masked_fill(~((j <= i) & (i - j < 2)), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)


def test_reference_row_without_allowed_keys_is_zero():
    @dataclass(frozen=True)
    class SkipFirst(Pattern):
        name: ClassVar[str] = "skip_first"

        def rule(self, q_idx, k_idx, head):
            return q_idx > 0

    q, k, v = _qkv(1, 1, 4, 3)
    out = reference(q, k, v, SkipFirst(), 0.0, False)
    assert torch.isfinite(out).all() and (out[0, 0, 0] == 0).all()


def test_query_suffix_in_reference_matches_full_sequence():
    # The form a KV cache will use: queries are the last Tq of Tk positions.
    q, k, v = _qkv(1, 2, 7, 4)
    full = reference(q, k, v, Dense(), 0.0, False)
    tail = reference(q[:, :, -3:], k, v, Dense(), 0.0, False)
    torch.testing.assert_close(tail, full[:, :, -3:])


@pytest.mark.parametrize("fn", [reference, sdpa])
def test_dropout_only_when_training(fn):
    q, k, v = _qkv(2, 2, 8, 4)
    torch.testing.assert_close(fn(q, k, v, Dense(), 0.5, False), fn(q, k, v, Dense(), 0.0, False))
    torch.manual_seed(0)
    dropped = fn(q, k, v, Dense(), 0.5, True)
    assert not torch.allclose(dropped, fn(q, k, v, Dense(), 0.0, False))


def test_select_backend_auto_prefers_sdpa_for_dense():
    name, fn = select_backend("auto", Dense(), "cpu")
    assert name == "sdpa" and fn is sdpa
    assert select_backend("reference", Dense(), None) == ("reference", reference)
    assert list(BACKENDS)[-1] == "reference"  # the slow spec is the last resort


def test_select_backend_auto_falls_back_for_a_sparse_pattern():
    name, _ = select_backend("auto", Local(2), "cpu")
    assert name != "sdpa"


def test_forced_incompatible_backend_raises():
    with pytest.raises(ConfigError, match="sdpa.*cannot run pattern 'local'"):
        select_backend("sdpa", Local(2), "cpu")
    with pytest.raises(ConfigError, match="unknown"):
        select_backend("no_such_backend", Dense(), "cpu")
    q, k, v = _qkv(1, 1, 3, 2)
    with pytest.raises(ConfigError):
        sdpa(q, k, v, Local(2), 0.0, False)  # called directly, it refuses too


# ------------------------------------------------------------------ interface


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_attention_module(backend):
    attn = Attention(AttentionConfig(backend=backend), layer_idx=3, n_layer=4, n_head=2, dropout=0.0)
    assert attn.backend is None  # not chosen until a device is known
    q, k, v = _qkv(2, 2, 5, 4)
    torch.testing.assert_close(attn(q, k, v), reference(q, k, v, Dense(), 0.0, False), atol=1e-5, rtol=1e-4)
    assert attn.backend == ("sdpa" if backend == "auto" else backend)  # resolved by the first forward
    assert attn.resolve("cpu") == attn.backend
    assert attn.describe(64) == {"layer": 3, "pattern": "dense", "params": {}, "density": 1.0, "backend": attn.backend}
    assert list(attn.parameters()) == []
