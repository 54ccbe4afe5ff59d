"""Every pattern in the zoo (built-ins and the examples/ plugin) through everything derived from its rule:
causality, block layouts, the block-sparse kernel and flex against the reference (outputs and gradients),
KV caches against the full forward pass, the picture and attention capture."""

import pytest
import torch

from attnlab.attention import PATTERNS, reference
from attnlab.attention.blocksparse import blocksparse, plan
from attnlab.attention.cache import make_cache
from attnlab.attention.flex import flex, flex_available
from attnlab.attention.linear import linear_backend
from attnlab.attention.modifiers import MODIFIERS, build_modifiers, parse_spec
from attnlab.attention.patterns import rule_block_layout
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.eval.inspection.pattern_viz import ascii_pattern, draw_pattern
from attnlab.model.gpt import GPT
from test_cache import cached_logits
from zoo import CONTEXT, MODIFIER_ZOO, N_HEAD, SOFTMAX, ZOO, attention_kwargs, document_ids, pattern

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
LABELS = list(ZOO)


def qkv(T, seed=0, requires_grad=True, B=2, D=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N_HEAD, T, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_every_registered_pattern_and_modifier_is_in_the_zoo():
    missing = set(PATTERNS) - {entry["pattern"] for entry in ZOO.values()}
    assert not missing, f"add parameter sets for {sorted(missing)} to tests/zoo.py"
    missing = set(MODIFIERS) - {parse_spec(s)[0].name for specs in MODIFIER_ZOO.values() for s in specs}
    assert not missing, f"add modifier specs for {sorted(missing)} to tests/zoo.py MODIFIER_ZOO"


def random_modifier(name: str):
    """The zoo's modifier with its learned parameters (if any) set to random values (they start at zero)."""
    mod = build_modifiers(MODIFIER_ZOO[name], N_HEAD)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return mod


@pytest.mark.parametrize("modifier", list(MODIFIER_ZOO))
@pytest.mark.parametrize("label", SOFTMAX)
def test_modified_blocksparse_equals_reference_outputs_and_gradients(label, modifier, tmp_path, one_thread):
    p, mod = pattern(label, tmp_path), random_modifier(modifier)
    q, k, v = qkv(37)
    dout = torch.randn(2, N_HEAD, 37, 8, generator=torch.Generator().manual_seed(5))
    results = []
    for fn in (reference, blocksparse):
        out = fn(q, k, v, p, 0.0, False, modifier=mod)
        results.append((out, *torch.autograd.grad(out, (q, k, v, *mod.parameters()), dout)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("modifier", list(MODIFIER_ZOO))
@pytest.mark.parametrize("label", SOFTMAX)
def test_modified_cache_equals_full_forward(label, modifier, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=N_HEAD, d_model=32, context=CONTEXT, position="none")
    attn = AttentionConfig(**attention_kwargs(label, tmp_path), modifiers=MODIFIER_ZOO[modifier])
    model = GPT(cfg, attn, 50).eval()
    with torch.no_grad():  # a learned bias starts at zero: give it values that matter
        for name, p in model.named_parameters():
            if ".modifier." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    seq = torch.randint(50, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    got = cached_logits(model, seq, prompt_len=3)
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(2, CONTEXT)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("label", LABELS)
def test_mask_is_causal_and_sees_itself(label, tmp_path):
    p = pattern(label, tmp_path)
    mask = p.dense_mask(40, N_HEAD)
    assert not (mask & ~torch.ones(40, 40, dtype=torch.bool).tril()).any()
    if label != "block_layout":  # a random layout may leave a query block empty
        assert mask.diagonal(dim1=1, dim2=2).all()
    assert 0 < p.density(40, N_HEAD) <= 1


@pytest.mark.parametrize("T", [24, 37])
@pytest.mark.parametrize("label", LABELS)
def test_block_layout_covers_exactly_the_blocks_the_rule_touches(label, T, tmp_path):
    p = pattern(label, tmp_path)
    for block in (4, 8):
        exact = torch.stack([rule_block_layout(p, h, T, block) for h in range(N_HEAD)])
        got = p.block_layout(T, block, N_HEAD)
        assert (got | ~exact).all(), "the layout misses blocks the rule allows"
        if p.head_groups(N_HEAD) is None:  # derived from the rule: nothing extra either
            assert torch.equal(got, exact)


@pytest.mark.parametrize("documents", [False, True], ids=["", "documents"])
@pytest.mark.parametrize("T", [24, 37, 130])
@pytest.mark.parametrize("label", SOFTMAX)
def test_blocksparse_equals_reference_outputs_and_gradients(label, T, documents, tmp_path, one_thread):
    """``documents``: with document masking (attention.document_mask) as well."""
    p = pattern(label, tmp_path)
    q, k, v = qkv(T)
    dout = torch.randn(2, N_HEAD, T, 8, generator=torch.Generator().manual_seed(5))
    doc = {"doc": document_ids(T)} if documents else {}
    grads = []
    for fn in (reference, blocksparse):
        out = fn(q, k, v, p, **doc)
        grads.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("documents", [False, True], ids=["", "documents"])
def test_linear_equals_reference(documents, tmp_path):
    p = pattern("linear", tmp_path)
    q, k, v = qkv(37)
    doc = {"doc": document_ids(37)} if documents else {}
    torch.testing.assert_close(linear_backend(q, k, v, p, **doc), reference(q, k, v, p, **doc), atol=1e-5, rtol=1e-4)


# Each entry compiles its own kernel (seconds on CPU): test_flex runs the built-ins at several lengths already.
FLEX_HERE = [
    k
    for k in SOFTMAX
    if k not in ("dense", "local", "strided_split", "strided_union", "fixed_v2", "sink_window", "block_layout")
]


@pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1] or "no flex on CPU")
@pytest.mark.parametrize("label", FLEX_HERE)
def test_flex_equals_reference(label, tmp_path, one_thread):
    p = pattern(label, tmp_path)
    q, k, v = (x.detach() for x in qkv(128, D=16, B=1))
    with torch.no_grad():
        torch.testing.assert_close(flex(q, k, v, p), reference(q, k, v, p), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not flex_available("cpu")[0], reason=flex_available("cpu")[1] or "no flex on CPU")
@pytest.mark.parametrize("label", FLEX_HERE)
def test_flex_within_documents_equals_reference(label, tmp_path, one_thread):
    """The mask_mod ANDs document equality (one more compile per pattern); new documents reuse the kernel."""
    p = pattern(label, tmp_path)
    q, k, v = (x.detach() for x in qkv(200, D=16))
    for seed in (0, 1):
        doc = document_ids(200, seed)
        with torch.no_grad():
            torch.testing.assert_close(flex(q, k, v, p, doc=doc), reference(q, k, v, p, doc=doc), atol=1e-5, rtol=1e-5)


def test_derived_kernel_cost_follows_density():
    """The plugin gives no head_groups: the plan visits as many key blocks as the hand-written local one."""

    def visited(p):
        return sum(
            int(ch.kv.numel()) for g in plan(p, 1024, 4, torch.device("cpu")) for c in g.components for ch in c.chunks
        )

    from attnlab.attention.patterns import LayerContext, Local, make_pattern

    dilated = make_pattern({"pattern": "dilated_window", "window": 16, "dilation": 2}, LayerContext(n_head=4))
    assert dilated.head_groups(4) is None
    assert visited(dilated) == visited(Local(32)) == 32


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("label", LABELS)
def test_cache_equals_full_forward(label, position, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=N_HEAD, d_model=32, context=CONTEXT, position=position)
    model = GPT(cfg, AttentionConfig(**attention_kwargs(label, tmp_path)), 50).eval()
    seq = torch.randint(50, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    got = cached_logits(model, seq, prompt_len=3)
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(2, CONTEXT)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("label", LABELS)
def test_cache_holds_only_reachable_keys(label, tmp_path):
    p = pattern(label, tmp_path)
    cache = make_cache(p, 1, N_HEAD, 64)
    T = 30
    k = torch.randn(1, N_HEAD, T, 8)
    cache.prefill(k, k)
    reach = p.reach()
    for h, held in enumerate(cache.held()):
        if reach is not None:
            assert held <= set(range(T - 1 - reach, T)), "keeps keys no later query can reach"
        if p.mechanism == "softmax":  # every key the next query may see is still there
            allowed = p.allowed(torch.tensor(T), torch.arange(T), torch.tensor(h))
            assert set(torch.nonzero(allowed).flatten().tolist()) <= held | {T}


@pytest.mark.parametrize("label", LABELS)
def test_picture_is_the_rule(label, tmp_path):
    p = pattern(label, tmp_path)
    rows = ascii_pattern(p, 12).splitlines()
    mask = p.dense_mask(12, N_HEAD)[0]
    assert rows == ["".join("x" if a else "." for a in row) for row in mask.tolist()]
    fig = draw_pattern(p, 32, N_HEAD, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert len(fig.axes) == len(p.kernel_groups(N_HEAD, 32))


@pytest.mark.parametrize("label", LABELS)
def test_attention_capture_is_normalised_over_the_allowed_keys(label, tmp_path, one_thread):
    from test_attention_maps import check_capture

    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=2, n_head=N_HEAD, d_model=32, context=16),
        AttentionConfig(**attention_kwargs(label, tmp_path)),
        40,
    ).eval()
    model.resolve_backends("cpu")
    check_capture(model, torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1)))
