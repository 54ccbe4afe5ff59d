"""FlexAttention backend: equals the reference, builds sparse cached BlockMasks, refuses what it cannot do.

Every (pattern, padded length) compiles one kernel (seconds each on CPU), so the
CPU tests share one small shape and compile each pattern once.
"""

import pytest
import torch

from attnlab.attention.backends import reference
from attnlab.attention.flex import BLOCK, block_mask, flex, flex_available, flex_supported
from attnlab.attention.patterns import BlockLayout, Dense, Fixed, Linear, Local, SinkWindow, Strided
from attnlab.errors import ConfigError

# Importing inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

B, H, D = 1, 4, 16
_gen = torch.Generator().manual_seed(0)
PATTERNS = {
    "dense": Dense(),
    "local": Local(window=40),
    "strided_split": Strided(local_attn_ctx=16, strided_mode="split", n_head=H),
    "strided_union": Strided(local_attn_ctx=16, strided_mode="union", n_head=H),
    "fixed": Fixed(local_attn_ctx=32, blocksize=8, vertsize=1, num_verts=2),
    "sink_window": SinkWindow(sinks=4, window=40),
    # Random layouts leave some query blocks with no key at all: the output there is zero.
    "block_layout": BlockLayout(
        layout="x", layout_block=64, sha256="", blocks=torch.rand(H, 6, 6, generator=_gen) > 0.5
    ),
    "block_layout_shared": BlockLayout(
        layout="y", layout_block=64, sha256="", blocks=torch.rand(1, 6, 6, generator=_gen) > 0.5
    ),
}
# 320 is not a multiple of flex's 128-token tile: padded to 384 inside flex.
CASES = [(name, 256) for name in PATTERNS if name != "block_layout_shared"] + [
    ("local", 320),
    ("block_layout_shared", 320),
]

cpu_ok, cpu_why = flex_available("cpu")
needs_cpu_flex = pytest.mark.skipif(not cpu_ok, reason=cpu_why)
needs_cuda = pytest.mark.skipif(not flex_available("cuda")[0], reason=flex_available("cuda")[1] or "needs CUDA")


def qkv(T, device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3)]


def tiles(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """flex's (num_blocks [1, H, nq], indices [1, H, nq, nk]) -> bool [H, nq, nk]."""
    nq, nk = idx.shape[-2:]
    listed = torch.arange(nk).view(1, 1, nk) < num[0].unsqueeze(-1).long()
    out = torch.zeros(idx.shape[1], nq, nk, dtype=torch.bool)
    return out.scatter_(-1, idx[0].long(), listed)


def exact_tiles(pattern, T):
    """From the dense mask (small T only): tiles with some allowed pair, and tiles where all pairs are."""
    m = pattern.dense_mask(T, H).reshape(H, T // BLOCK, BLOCK, T // BLOCK, BLOCK)
    return m.any(4).any(2), m.all(4).all(2)


@needs_cpu_flex
@pytest.mark.parametrize("name,T", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_cpu_inference_matches_reference(name, T, one_thread):
    pattern = PATTERNS[name]
    q, k, v = qkv(T)
    with torch.no_grad():
        out = flex(q, k, v, pattern)
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference(q, k, v, pattern), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_block_mask_is_exact_and_split_into_full_and_partial_tiles(name):
    pattern, T = PATTERNS[name], 384
    bm = block_mask(pattern, T, H, "cpu")
    partial, full = tiles(bm.kv_num_blocks, bm.kv_indices), tiles(bm.full_kv_num_blocks, bm.full_kv_indices)
    some, every = exact_tiles(pattern, T)
    assert not (partial & full).any()
    assert torch.equal(partial | full, some)  # no tile visited in vain, none missed
    assert torch.equal(full, every)  # mask_mod skipped exactly where nothing is masked
    assert bm.seq_lengths == (T, T)


def test_block_mask_cache():
    pattern = Local(window=40)
    first = block_mask(pattern, 256, H, "cpu")
    assert block_mask(Local(window=40), 256, H, "cpu") is first  # equal patterns share it
    assert block_mask(pattern, 384, H, "cpu") is not first
    assert block_mask(pattern, 256, 2, "cpu") is not first
    # BlockLayouts that differ only in their blocks tensor (not part of equality) must not share a mask.
    a = BlockLayout(layout="x", layout_block=64, sha256="", blocks=torch.ones(1, 4, 4, dtype=torch.bool))
    b = BlockLayout(layout="x", layout_block=64, sha256="", blocks=torch.eye(4, dtype=torch.bool)[None])
    assert block_mask(a, 256, H, "cpu") is not block_mask(b, 256, H, "cpu")


def test_no_more_tiles_than_the_pattern_block_layout():
    for pattern in (Dense(), Local(window=40), PATTERNS["strided_union"], SinkWindow(sinks=4, window=40)):
        bm = block_mask(pattern, 1024, H, "cpu")
        n = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
        assert n <= int(pattern.block_layout(1024, BLOCK, H).sum())
    local = block_mask(Local(window=40), 1024, H, "cpu")
    assert int(local.kv_num_blocks.sum() + local.full_kv_num_blocks.sum()) == H * (8 + 7)  # diagonal + one below


def test_cpu_training_is_refused():
    q, k, v = qkv(256, requires_grad=True)
    with pytest.raises(ConfigError, match="runs on CPU for inference only: use attention.backend=blocksparse"):
        flex(q, k, v, Dense())


def test_dropout_in_training_is_refused():
    q, k, v = qkv(256)
    with pytest.raises(ConfigError, match="blocksparse or reference, or model.attn_dropout=0"):
        flex(q, k, v, Dense(), dropout_p=0.1, training=True)


def test_linear_patterns_are_refused():
    assert not flex_supported(Linear(), "cuda")
    assert flex_supported(Dense(), None) and flex_supported(Local(), "cpu") and flex_supported(Local(), "cuda")
    assert not flex_supported(Local(), "meta")
    q, k, v = qkv(256)
    with pytest.raises(ConfigError, match="linear"):
        flex(q, k, v, Linear())


@needs_cuda
@pytest.mark.parametrize("name,T", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_cuda_outputs_and_gradients_match_reference(name, T):
    pattern = PATTERNS[name]
    q, k, v = qkv(T, "cuda", requires_grad=True)
    out = flex(q, k, v, pattern)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference(q, k, v, pattern)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=5e-4, rtol=1e-3)


@needs_cuda
@pytest.mark.parametrize("name", ["dense", "local", "strided_split", "block_layout"])
def test_cuda_bf16_forward(name):
    pattern = PATTERNS[name]
    q, k, v = qkv(256, "cuda", torch.bfloat16)
    out = flex(q, k, v, pattern)
    assert out.dtype == torch.bfloat16
    ref = reference(q.float(), k.float(), v.float(), pattern)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
