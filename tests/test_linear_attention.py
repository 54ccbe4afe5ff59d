"""Causal linear attention: the chunked (training) and recurrent (decoding) forms must match the dense spec."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.attention.linear import (
    FEATURE_MAPS,
    LinearState,
    feature_map,
    linear_backend,
    linear_chunked,
    linear_recurrent,
    linear_reference,
    linear_step,
)
from attnlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

MAPS = sorted(FEATURE_MAPS)
# (T, chunk): T not a multiple of chunk, chunk 1, chunk > T, exact multiple, a single position.
SHAPES = [(13, 4), (13, 1), (5, 16), (16, 4), (1, 3)]


def qkv(B=2, H=3, T=13, Dh=4, Dv=None, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, Dh), (B, H, T, Dh), (B, H, T, Dv or Dh)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def close(actual, expected, tol):
    """Equal up to ``tol`` relative to the size of ``expected`` (outputs are weighted means of v)."""
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


def test_unknown_feature_map_names_the_choices():
    with pytest.raises(ConfigError) as err:
        feature_map("softmax")
    msg = str(err.value)
    assert "elu1" in msg and "relu" in msg and "softmax" in msg and "\n" not in msg
    q, k, v = qkv(T=3)
    with pytest.raises(ConfigError):
        linear_chunked(q, k, v, "nope")


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("T,chunk", SHAPES)
def test_chunked_matches_reference(fmap, T, chunk):
    q, k, v = qkv(T=T, Dv=5)
    out = linear_chunked(q, k, v, fmap, chunk=chunk)
    assert out.shape == (2, 3, T, 5) and out.dtype == torch.float32
    close(out, linear_reference(q, k, v, fmap), 1e-5)


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("T,chunk", SHAPES)
def test_chunked_gradients_match_reference(fmap, T, chunk):
    q, k, v = qkv(T=T, Dv=5, dtype=torch.float64, grad=True)
    g = torch.randn(2, 3, T, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, fn in [("ref", linear_reference), ("chunked", lambda *a: linear_chunked(*a, chunk=chunk))]:
        (fn(q, k, v, fmap) * g).sum().backward()
        grads[name] = [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
    for a, b in zip(grads["chunked"], grads["ref"]):
        close(a, b, 1e-9)


def test_chunked_gradients_fp32():
    q, k, v = qkv(T=11, grad=True)
    (linear_chunked(q, k, v, chunk=4) ** 2).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    (linear_reference(qd, kd, vd) ** 2).sum().backward()
    for a, b in zip(got, (qd.grad, kd.grad, vd.grad)):
        close(a, b.float(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_their_dtype(dtype):
    q, k, v = qkv(T=9, dtype=dtype)
    out = linear_chunked(q, k, v, chunk=4)
    assert out.dtype == dtype
    # Computed in fp32 internally: only the final rounding to the half dtype differs.
    expected = linear_reference(q.float(), k.float(), v.float())
    close(out.float(), expected, 1e-2)


@pytest.mark.parametrize("fmap", MAPS)
def test_recurrent_matches_chunked(fmap):
    q, k, v = qkv(T=13, Dv=3)
    close(linear_recurrent(q, k, v, fmap), linear_chunked(q, k, v, fmap, chunk=4), 1e-5)


def test_recurrent_is_differentiable():
    q, k, v = qkv(T=6, dtype=torch.float64, grad=True)
    torch.autograd.gradcheck(lambda *a: linear_recurrent(*a, "elu1"), (q, k, v))


@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("pieces", [[1, 3, 2, 7], [13], [5, 1, 1, 6], [0, 4, 9]])
def test_steps_in_pieces_equal_one_pass(fmap, pieces):
    B, H, T, Dh, Dv = 2, 3, sum(pieces), 4, 5
    q, k, v = qkv(B, H, T, Dh, Dv)
    state = LinearState.zeros(B, H, Dh, Dv, q.device)
    outs, start = [], 0
    for n in pieces:
        before = (state.s.clone(), state.z.clone())
        out, new = linear_step(
            q[:, :, start : start + n], k[:, :, start : start + n], v[:, :, start : start + n], state, fmap
        )
        assert out.shape == (B, H, n, Dv)
        assert torch.equal(state.s, before[0]) and torch.equal(state.z, before[1])  # not updated in place
        outs.append(out)
        state, start = new, start + n
    close(torch.cat(outs, dim=-2), linear_chunked(q, k, v, fmap, chunk=4), 1e-5)
    # The final state is the whole sequence's sums, whatever the pieces were.
    phi_k = FEATURE_MAPS[fmap](k)
    assert state.s.dtype == state.z.dtype == torch.float32
    close(state.s, phi_k.transpose(-2, -1) @ v, 1e-5)
    close(state.z, phi_k.sum(-2), 1e-5)


@pytest.mark.parametrize("form", ["reference", "chunked", "recurrent"])
@pytest.mark.parametrize("fmap", MAPS)
def test_future_positions_never_change_earlier_outputs(form, fmap):
    fn = {
        "reference": linear_reference,
        "recurrent": linear_recurrent,
        "chunked": lambda *a: linear_chunked(*a, chunk=4),
    }[form]
    q, k, v = qkv(T=12)
    base = fn(q, k, v, fmap)
    for p in [0, 3, 4, 7, 11]:
        for which in range(3):
            changed = [x.clone() for x in (q, k, v)]
            changed[which][:, :, p:] += 10 * torch.randn_like(changed[which][:, :, p:])
            out = fn(*changed, fmap)
            torch.testing.assert_close(out[:, :, :p], base[:, :, :p], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(out[:, :, p:], base[:, :, p:])  # the change did reach later positions


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 20),
    Dh=st.integers(1, 6),
    Dv=st.integers(1, 5),
    chunk=st.integers(1, 24),
    fmap=st.sampled_from(MAPS),
    seed=st.integers(0, 2**16),
)
def test_forms_agree_on_random_shapes(B, H, T, Dh, Dv, chunk, fmap, seed):
    q, k, v = qkv(B, H, T, Dh, Dv, seed=seed)
    expected = linear_reference(q, k, v, fmap)
    close(linear_chunked(q, k, v, fmap, chunk=chunk), expected, 1e-5)
    close(linear_recurrent(q, k, v, fmap), expected, 1e-5)


def test_backend_reads_pattern_and_ignores_dropout():
    q, k, v = qkv(T=10)
    pattern = SimpleNamespace(name="linear", feature_map="relu", chunk=3)
    out = linear_backend(q, k, v, pattern, dropout_p=0.5, training=True)
    torch.testing.assert_close(out, linear_chunked(q, k, v, "relu", chunk=3))
    torch.testing.assert_close(out, linear_backend(q, k, v, pattern, dropout_p=0.5, training=True))
    # Without a chunk attribute the default chunk is used (same result: the chunk size never changes the answer).
    close(linear_backend(q, k, v, SimpleNamespace(feature_map="elu1")), linear_reference(q, k, v), 1e-5)


def test_bad_chunk_and_mismatched_lengths_are_refused():
    q, k, v = qkv(T=6)
    with pytest.raises(ConfigError):
        linear_chunked(q, k, v, chunk=0)
    with pytest.raises(ValueError, match="linear_step"):
        linear_chunked(q[:, :, :2], k, v)


def test_backend_recomputes_head_by_head_with_the_same_gradients():
    """The training path keeps only q, k, v and recomputes each head in backward: same outputs and gradients."""
    from attnlab.attention import Linear

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 21, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    upstream = torch.randn(2, 3, 21, 5, generator=g, dtype=torch.float64)
    want = linear_reference(q, k, v, "elu1")
    got = linear_backend(q, k, v, Linear("elu1", chunk=4))
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), upstream), torch.autograd.grad(want, (q, k, v), upstream)):
        torch.testing.assert_close(a, b)
