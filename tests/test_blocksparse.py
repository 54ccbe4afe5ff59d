"""The block-sparse backend equals the reference spec, for every pattern, forward and backward, with no T x T tensor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from attnlab.attention import (
    BACKENDS,
    BlockLayout,
    Dense,
    Fixed,
    Linear,
    Local,
    SinkWindow,
    Strided,
    reference,
    select_backend,
)
from attnlab.attention.blocksparse import blocksparse, plan
from attnlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = {
    "dense": Dense(),
    "local": Local(7),
    "local_wide": Local(100),
    "strided_split": Strided(4, "split", 4),
    "strided_union": Strided(8, "union", 4),
    "strided_interleave_stride": Strided(4, "interleave", 4, "stride"),
    "fixed": Fixed(8, 2, 1, 1),
    "fixed_heads": Fixed(16, 4, 1, 2),
    "sink_window": SinkWindow(3, 5),
    "block_layout": BlockLayout("x", 8, "", torch.rand(4, 10, 10, generator=torch.Generator().manual_seed(0)) > 0.4),
}


def qkv(B, H, T, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def out_and_grads(fn, q, k, v, pattern, **kw):
    out = fn(q, k, v, pattern, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("T", [1, 37, 80])
def test_equals_reference_outputs_and_gradients(name, T):
    pattern = PATTERNS[name]
    q, k, v = qkv(2, 4, T, 8)
    for got, want in zip(out_and_grads(blocksparse, q, k, v, pattern), out_and_grads(reference, q, k, v, pattern)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PATTERNS)
def test_changing_the_future_never_changes_the_past(name):
    pattern, T, t = PATTERNS[name], 48, 29
    q, k, v = (x.detach() for x in qkv(1, 4, T, 8))
    before = blocksparse(q, k, v, pattern)
    for x in (q, k, v):
        x[:, :, t:] += torch.randn_like(x[:, :, t:])
    after = blocksparse(q, k, v, pattern)
    assert torch.equal(before[:, :, :t], after[:, :, :t])
    assert not torch.allclose(before[:, :, t:], after[:, :, t:])


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["local", "strided", "fixed", "sink"]),
    st.integers(1, 9),
    st.integers(1, 70),
    st.sampled_from([1, 2, 4]),
    st.sampled_from(["split", "union", "interleave"]),
)
def test_any_parameters_and_length_match_the_reference(kind, a, T, H, mode):
    pattern = {
        "local": Local(a),
        "strided": Strided(a, mode, H if mode != "split" else 2 * (H // 2) or 2, "stride"),
        "fixed": Fixed(2 * a, 2, 1, 1),
        "sink": SinkWindow(a // 2, a),
    }[kind]
    H = 2 if kind == "strided" and mode == "split" and H == 1 else H
    q, k, v = (x.detach() for x in qkv(1, H, T, 4, seed=T))
    torch.testing.assert_close(blocksparse(q, k, v, pattern), reference(q, k, v, pattern), atol=2e-5, rtol=1e-4)


def test_head_transposed_inputs_as_the_model_gives_them():
    """q, k, v as views of a [B, T, 3, H, Dh] projection, T a whole number of blocks (no padding copy)."""
    x = torch.randn(2, 128, 3, 2, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not v.is_contiguous()
    for got, want in zip(out_and_grads(blocksparse, q, k, v, Local(70)), out_and_grads(reference, q, k, v, Local(70))):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 50), st.sampled_from([1, 2, 3]), st.integers(0, 1000))
def test_any_block_layout_and_block_size_match_the_reference(block, T, H, seed):
    nb = -(-T // block)
    blocks = torch.rand(H, nb, nb, generator=torch.Generator().manual_seed(seed)) > 0.5
    pattern = BlockLayout("x", block, "", blocks)
    q, k, v = (x.detach() for x in qkv(1, H, T, 4, seed=seed))
    torch.testing.assert_close(blocksparse(q, k, v, pattern), reference(q, k, v, pattern), atol=2e-5, rtol=1e-4)


def test_a_query_with_no_allowed_key_outputs_zero_and_finite_gradients():
    blocks = torch.zeros(1, 4, 4, dtype=torch.bool)
    blocks[0, 2, 0] = True  # only queries of block 2 see anything
    pattern = BlockLayout("x", 4, "", blocks)
    q, k, v = qkv(1, 2, 16, 4)
    out, *grads = out_and_grads(blocksparse, q, k, v, pattern)
    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
    torch.testing.assert_close(out, reference(q, k, v, pattern))
    assert all(g.isfinite().all() for g in grads)


def test_dropout_backward_matches_its_forward():
    """With attention dropout the kernel regenerates the same keep-mask in backward: gradcheck in float64."""
    q, k, v = qkv(1, 4, 20, 3, dtype=torch.float64)

    def fn(q, k, v):
        torch.manual_seed(5)  # the kernel draws its dropout seed from the global generator
        return blocksparse(q, k, v, Strided(4, "union", 4), dropout_p=0.3, training=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)
    dropped = fn(q, k, v)
    assert not torch.allclose(dropped, blocksparse(q, k, v, Strided(4, "union", 4)))  # dropout did act
    assert torch.equal(
        blocksparse(q, k, v, Local(3), 0.3, training=False), blocksparse(q, k, v, Local(3))
    )  # off in eval


def test_low_precision_inputs_keep_their_dtype():
    q, k, v = (x.detach().to(torch.bfloat16) for x in qkv(1, 2, 40, 8))
    out = blocksparse(q, k, v, Local(9))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q.float(), k.float(), v.float(), Local(9)), atol=2e-2, rtol=2e-2)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("pattern", [Local(64), Strided(32, "union", 2), Fixed(64, 16, 1, 1), SinkWindow(4, 64)])
def test_no_tensor_grows_with_t_squared(pattern):
    T, H = 2048, 2
    q, k, v = qkv(1, H, T, 16)
    plan(pattern, T, H, q.device)  # the cached plan is built once, outside the step
    with LargestTensor() as spy:
        blocksparse(q, k, v, pattern).sum().backward()
    assert spy.largest < T * T / 8, f"a tensor of {spy.largest} elements for T={T}"


def test_plan_is_cached_per_pattern_length_and_device():
    p = Local(5)
    assert plan(p, 64, 2, torch.device("cpu")) is plan(Local(5), 64, 2, torch.device("cpu"))
    assert plan(p, 65, 2, torch.device("cpu")) is not plan(p, 64, 2, torch.device("cpu"))


def test_auto_picks_the_fast_correct_backend_for_the_pattern():
    cpu = torch.device("cpu")
    assert select_backend("auto", Dense(), cpu)[0] == "sdpa"
    for p in [Local(4), Strided(4, "union", 2), Fixed(8, 2, 1, 1), SinkWindow(1, 4), PATTERNS["block_layout"]]:
        assert select_backend("auto", p, cpu)[0] == "blocksparse"
    assert select_backend("auto", Linear(), cpu)[0] == "linear"
    assert list(BACKENDS)[-1] == "reference"


def test_auto_avoids_flex_when_the_model_has_attention_dropout(monkeypatch):
    """On CUDA auto prefers flex, which has no dropout: a model with dropout gets blocksparse instead,
    and forcing flex on such a model is refused before any step."""
    from dataclasses import replace

    from attnlab.attention import Attention
    from attnlab.config import AttentionConfig

    monkeypatch.setitem(
        BACKENDS, "flex", replace(BACKENDS["flex"], preferred=lambda pattern, device: not pattern.is_dense_causal)
    )
    cfg = AttentionConfig(pattern="local", window=4)
    assert Attention(cfg, 0, 1, 2, dropout=0.0).resolve("cpu") == "flex"
    assert Attention(cfg, 0, 1, 2, dropout=0.1).resolve("cpu") == "blocksparse"
    with pytest.raises(ConfigError, match="backend='flex' has no attention dropout but the model's is 0.1"):
        Attention(AttentionConfig(pattern="local", window=4, backend="flex"), 0, 1, 2, dropout=0.1)


@pytest.mark.parametrize("name", ["local", "strided_split", "strided_union", "fixed_heads", "block_layout"])
@pytest.mark.parametrize("chunk_elems", [1, 300, 1 << 20])  # one query block per chunk .. one chunk in all
def test_any_chunk_size_equals_reference(name, chunk_elems, monkeypatch):
    from attnlab.attention import blocksparse as module

    monkeypatch.setattr(module, "_chunk_elems", lambda device: chunk_elems)
    pattern = PATTERNS[name]
    q, k, v = qkv(1, 4, 80, 8)
    for got, want in zip(out_and_grads(blocksparse, q, k, v, pattern), out_and_grads(reference, q, k, v, pattern)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_chunks_grow_with_cpu_threads():
    from attnlab.attention import blocksparse as module

    n, cpu = torch.get_num_threads(), torch.device("cpu")
    try:
        sizes = []
        for threads in (1, 2, 8):
            torch.set_num_threads(threads)
            sizes.append(module._chunk_elems(cpu))
    finally:
        torch.set_num_threads(n)
    base = module._CHUNK_ELEMS
    assert sizes == [base, 2 * base, module._MAX_CHUNK_THREADS * base]


@pytest.mark.parametrize("name", PATTERNS)
def test_bf16_autocast_computes_in_fp32_as_without_it(name):
    """Under CPU bf16 autocast (train.dtype=bfloat16) the kernel still computes in fp32: the same outputs and grads."""
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in qkv(2, 4, 37, 8))
    want = out_and_grads(blocksparse, q, k, v, PATTERNS[name])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = out_and_grads(blocksparse, q, k, v, PATTERNS[name])
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
