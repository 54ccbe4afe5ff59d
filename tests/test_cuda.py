"""The CUDA paths: flex and blocksparse against the reference (outputs and gradients) for every softmax pattern
at T in {128, 1000, 4096} in fp32 and bf16; KV caches and sampling on CUDA equal the full forward; bf16
autocast training; torch.compile.

Every test needs a CUDA GPU (elsewhere each skips with "needs CUDA"). ``pytest -m cuda`` selects them;
``attnlab gpu-check`` runs them as its first stage. They use only pytest and torch (no hypothesis), so a
fresh GPU machine without the test extras still runs them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention.backends import reference, sdpa
from attnlab.attention.blocksparse import blocksparse
from attnlab.attention.flex import flex
from attnlab.attention.patterns import BlockLayout
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.eval import generate
from attnlab.eval.generation.filters import SamplingConfig, next_token
from attnlab.model.gpt import GPT
from test_flex import PATTERNS as FLEX_PATTERNS
from test_flex import B, D, H
from zoo import PLUGINS, ZOO, document_ids

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    # Importing inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

LENGTHS = (128, 1000, 4096)  # 1000 is padded inside flex (not a multiple of its 128-token tile)
_gen = torch.Generator().manual_seed(0)
# test_flex's softmax patterns; its block layouts cover 384 tokens, so here they cover the longest length.
PATTERNS = {name: p for name, p in FLEX_PATTERNS.items() if not name.startswith("block_layout")}
PATTERNS["block_layout"] = BlockLayout(
    layout="x", layout_block=64, sha256="", blocks=torch.rand(H, 64, 64, generator=_gen) > 0.5
)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2.5e-2}  # relative error of the whole tensor (norm of difference)


def qkv(T: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to("cuda", dtype).requires_grad_(True) for _ in range(3)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def check_against_reference(backend, pattern, T: int, dtype: torch.dtype, **kw) -> None:
    """Output and q/k/v gradients of ``backend`` vs the reference on the same (bf16-rounded) inputs, in fp32;
    ``kw`` (e.g. ``doc=``) goes to both."""
    q, k, v = qkv(T, dtype)
    out = backend(q, k, v, pattern, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = reference(q32, k32, v32, pattern, **kw)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    tol = TOLERANCE[dtype]
    assert relative_error(out, ref) < tol
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert relative_error(g, rg) < tol, f"d{name}"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


CASES = [(name, T, dtype) for T in LENGTHS for dtype in (torch.float32, torch.bfloat16) for name in PATTERNS]
IDS = [f"{name}-{T}-{str(dtype)[6:]}" for name, T, dtype in CASES]


@pytest.mark.parametrize("name,T,dtype", CASES, ids=IDS)
def test_flex_outputs_and_gradients_match_reference(name, T, dtype):
    check_against_reference(flex, PATTERNS[name], T, dtype)


# Each flex case compiles one more kernel: four patterns keep the stage short; blocksparse compiles nothing.
DOC_CASES = (
    [(name, "flex", 1000) for name in ("dense", "local", "strided_split", "block_layout")]
    + [(name, "blocksparse", 1000) for name in PATTERNS]
    + [("dense", "sdpa", 300), ("dense", "sdpa", 1000)]
)


@pytest.mark.parametrize("name,backend,T", DOC_CASES, ids=[f"{n}-{b}-{t}" for n, b, t in DOC_CASES])
def test_document_masking_matches_reference(name, backend, T):
    """attention.document_mask: flex's mask_mod and per-call BlockMask, blocksparse's per-block mask, sdpa's
    boolean mask (T=300) or flex beyond SDPA_DOC_MAX (T=1000)."""
    fn = {"flex": flex, "blocksparse": blocksparse, "sdpa": sdpa}[backend]
    doc = document_ids(T)[:B].to("cuda")
    check_against_reference(fn, PATTERNS[name], T, torch.float32, doc=doc)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_blocksparse_outputs_and_gradients_match_reference_on_cuda(name):
    check_against_reference(blocksparse, PATTERNS[name], 1000, torch.float32)


# ------------------------------------------------------------------ the model on CUDA

CACHE_PATTERNS = {label: {**spec, "plugins": PLUGINS} for label, spec in ZOO.items()}  # every zoo pattern
CONTEXT, VOCAB = 24, 50


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    import numpy as np

    layout = np.random.default_rng(0).random((4, CONTEXT // 4, CONTEXT // 4)) < 0.5  # one random layout per head
    path = tmp_path_factory.mktemp("layout") / "layout.npy"
    np.save(path, layout)
    return str(path)


def cuda_model(attn: dict, position: str = "rope", context: int = CONTEXT, **model) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 4, "d_model": 32, "context": context, "position": position, **model})
    net = GPT(cfg, AttentionConfig(**attn), VOCAB).cuda().eval()
    net.resolve_backends("cuda")
    return net


@torch.no_grad()
def cached_logits(model: GPT, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Last-position logits after each position from prompt_len - 1 on: prefill, then one cached step per token."""
    cache = model.new_cache(seq.size(0), seq.size(1))
    out = [model(seq[:, :prompt_len], cache=cache)[:, -1]]
    for t in range(prompt_len, seq.size(1)):
        out.append(model(seq[:, t : t + 1], cache=cache)[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("name", list(CACHE_PATTERNS))
def test_cached_decoding_on_cuda_equals_the_full_forward(name, position, layout_file):
    attn = dict(CACHE_PATTERNS[name], **({"layout": layout_file} if name == "block_layout" else {}))
    model = cuda_model(attn, position)
    seq = torch.randint(VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1)).cuda()
    got = cached_logits(model, seq, prompt_len=3)
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(2, CONTEXT)], 1)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "attn,kept",
    [(dict(pattern="local", window=5), 5), (dict(pattern="sink_window", sinks=2, window=5), 7)],
    ids=["local", "sink_window"],
)
def test_bounded_caches_on_cuda_read_only_their_window(attn, kept):
    """Streaming 4x past the context, a local / sink_window cache holds (and attends over) only its window."""
    model = cuda_model(attn, "rope", context=8)
    cache = model.new_cache(1, 32)
    seq = torch.randint(VOCAB, (1, 32), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        model(seq[:, :4], cache=cache)
        sizes = []
        for t in range(4, 32):
            model(seq[:, t : t + 1], cache=cache)
            sizes.append(cache.nbytes())
    layer = cache.layers[0]
    assert all(len(h) == kept for h in layer.held()) and len(set(sizes[kept:])) == 1
    assert all(t.device.type == "cuda" for t in layer._tensors())
    window = set(range(31 - 4, 32)) | (set(range(2)) if attn["pattern"] == "sink_window" else set())
    assert layer.held()[0] == window


def test_sampling_on_cuda_cached_equals_recomputed_and_matches_cpu_draws():
    model = cuda_model({}, "learned", context=16)
    prompt = torch.zeros(3, 5, dtype=torch.long, device="cuda")
    cfg = SamplingConfig(top_k=10)
    runs = [
        generate(model, prompt, 20, sampling=cfg, generator=torch.Generator().manual_seed(1), use_cache=c)
        for c in (True, False)
    ]
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1])  # 20 steps: past the context too
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    hot = SamplingConfig(temperature=0.8, top_k=40, min_p=0.02)
    on_cpu = next_token(logits, hot, generator=torch.Generator().manual_seed(3))
    on_gpu = next_token(logits.cuda(), hot, generator=torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


def loss_and_grads(model: GPT, idx: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "attn,backend",
    [({}, "sdpa"), (dict(pattern="local", window=16), "flex"), (dict(pattern="strided", local_attn_ctx=16), "flex")],
    ids=["dense", "local", "strided"],
)
def test_bf16_autocast_training_step_follows_fp32(attn, backend):
    model = cuda_model(attn, "learned", context=128).train()
    assert model.resolve_backends("cuda") == [backend, backend]
    idx = torch.randint(VOCAB, (4, 129), generator=torch.Generator().manual_seed(3)).cuda()
    loss32, grads32 = loss_and_grads(model, idx, autocast=False)
    loss16, grads16 = loss_and_grads(model, idx, autocast=True)
    assert abs(float(loss16 - loss32)) < 2e-2 * float(loss32)
    for g16, g32 in zip(grads16, grads32):
        assert torch.isfinite(g16).all() and relative_error(g16, g32) < 0.1


def test_torch_compile_matches_eager_forward_and_gradients():
    """One compiled graph over a dense (SDPA) and a local (flex) layer."""
    model = cuda_model(dict(schedule=["dense", "local"], window=16), "learned", context=128).train()
    assert model.resolve_backends("cuda") == ["sdpa", "flex"]
    idx = torch.randint(VOCAB, (2, 129), generator=torch.Generator().manual_seed(4)).cuda()
    loss, grads = loss_and_grads(model, idx, autocast=False)
    compiled = torch.compile(model)
    model.zero_grad(set_to_none=True)
    logits = compiled(idx[:, :-1])
    closs = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
    closs.backward()
    torch.testing.assert_close(closs.detach(), loss, atol=1e-4, rtol=1e-4)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)


def test_training_run_on_cuda_logs_bf16_and_mfu(tmp_path):
    from attnlab.training import flops
    from attnlab.training.logs import read_events
    from attnlab.training.trainer import train
    from runkit import tiny_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = tiny_config(
        corpus,
        tmp_path / "data",
        tmp_path / "runs",
        "train.device=cuda",
        "train.dtype=auto",
        "attention.pattern=local",
        "attention.window=8",
        "model.attn_dropout=0",
        "train.max_steps=4",
    )
    summary = train(cfg)
    run = tmp_path / "runs" / "t"
    (device,) = read_events(run, "device_info")
    assert device["autocast_dtype"] == "torch.bfloat16" and device["gpu"] == torch.cuda.get_device_name()
    assert [a["backend"] for a in summary["attention"]] == ["flex", "flex"] and summary["attn_dropout"] == 0.0
    steps = read_events(run, "training_step")
    assert all(("mfu" in e) == (flops.device_peak_tflops(torch.device("cuda")) is not None) for e in steps)
