"""Document masking and position reset: a query sees only its own document, in every backend, cache and eval.

The rule (``attention.documents``): the document of position i is the number of ``<eos>`` tokens strictly
before it in the row. Every backend is checked against the reference (the pattern's dense mask AND "same
document"), outputs and gradients, for random boundaries (flex, and every zoo pattern once more, in
test_zoo); the model, its KV caches and scoring against the full forward pass and against each document
run alone.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab.attention import backends
from attnlab.attention.backends import BACKENDS, reference, register_backend, sdpa, select_backend
from attnlab.attention.blocksparse import blocksparse
from attnlab.attention.documents import documents
from attnlab.attention.linear import linear_backend, linear_chunked, linear_reference
from attnlab.attention.modifiers import build_modifiers
from attnlab.attention.patterns import Dense, Linear
from attnlab.config import AttentionConfig, ModelConfig, from_dict
from attnlab.errors import ConfigError
from attnlab.eval.generation.filters import SamplingConfig
from attnlab.eval.generation.loop import generate
from attnlab.eval.metrics.scoring import score_tokens
from attnlab.model.gpt import GPT
from attnlab.run.open import fit_model_to_data
from test_cache import cached_logits
from zoo import CONTEXT, N_HEAD, SOFTMAX, ZOO, attention_kwargs, pattern

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
EOS, VOCAB = 0, 40
LABELS = list(ZOO)


def rows_with_eos(eos: list[set[int]], T: int, seed: int = 0) -> torch.Tensor:
    """Token rows [B, T] of random non-separator ids with <eos> exactly at the given positions."""
    idx = torch.randint(1, VOCAB, (len(eos), T), generator=torch.Generator().manual_seed(seed))
    for b, where in enumerate(eos):
        idx[b, sorted(where)] = EOS
    return idx


def eos_sets(B: int, T: int):
    """B sets of <eos> positions: empty (one document longer than the row), at 0, dense, anything."""
    return st.lists(st.sets(st.integers(0, T - 1), max_size=T // 3), min_size=B, max_size=B)


def qkv(B, H, T, D=8, seed=0, dtype=torch.float32, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
    kv = [torch.randn(B, Hkv or H, T, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]
    return q, *kv


def outputs_and_grads(fn, q, k, v, *extra):
    out = fn(q, k, v)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v, *extra), dout))


def assert_all_close(got, want, atol=2e-5, rtol=1e-4):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def zoo_patterns(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    return {label: pattern(label, folder) for label in LABELS}


# ------------------------------------------------------------------ the rule


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda T: st.tuples(st.just(T), eos_sets(3, T), st.integers(0, T))))
def test_document_ids_count_the_eos_strictly_before(case):
    T, eos, split = case
    idx = rows_with_eos(eos, T)
    docs = documents(idx, EOS)
    for b in range(3):
        for i in range(T):
            assert docs.ids[b, i] == sum(1 for j in eos[b] if j < i)
            same = [j for j in range(T) if docs.ids[b, j] == docs.ids[b, i]]
            assert docs.starts[b, i] == min(same)
            assert docs.positions()[b, i] == i - min(same)
    # a cache continues them: two calls (prompt, then the rest) give what one call gives
    first = documents(idx[:, :split], EOS)
    if 0 < split < T:
        rest = documents(idx[:, split:], EOS, split, first.state(idx[:, :split], EOS))
        assert torch.equal(torch.cat([first.ids, rest.ids], 1), docs.ids)
        assert torch.equal(torch.cat([first.starts, rest.starts], 1), docs.starts)


def test_a_row_starting_with_eos_puts_it_in_a_document_of_its_own():
    docs = documents(torch.tensor([[EOS, 5, 6, EOS, 7]]), EOS)
    assert docs.ids.tolist() == [[0, 1, 1, 1, 2]]  # the <eos> ending a document belongs to it
    assert docs.positions().tolist() == [[0, 0, 1, 2, 0]]


def test_the_reference_is_each_document_run_alone():
    q, k, v = qkv(1, 2, 30)
    idx = rows_with_eos([{0, 9, 10, 21}], 30)
    doc = documents(idx, EOS).ids
    out = reference(q, k, v, Dense(), doc=doc)
    for lo, hi in [(0, 1), (1, 10), (10, 11), (11, 22), (22, 30)]:
        alone = reference(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], Dense())
        torch.testing.assert_close(out[:, :, lo:hi], alone)


# ------------------------------------------------------------------ backends against the reference


@pytest.mark.parametrize("label", SOFTMAX)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_blocksparse_equals_reference_within_documents(label, zoo_patterns, one_thread, data):
    T = data.draw(st.sampled_from([24, 37, 130]))
    eos = data.draw(eos_sets(2, T))
    p, doc = zoo_patterns[label], documents(rows_with_eos(eos, T), EOS).ids
    q, k, v = qkv(2, N_HEAD, T)
    want = outputs_and_grads(lambda *x: reference(*x, p, doc=doc), q, k, v)
    got = outputs_and_grads(lambda *x: blocksparse(*x, p, doc=doc), q, k, v)
    assert_all_close(got, want)


@pytest.mark.parametrize("label", ["dense", "local", "strided_union", "fixed_v2", "dilated_window"])
def test_blocksparse_composes_documents_with_a_score_modifier(label, zoo_patterns, one_thread):
    p, mod = zoo_patterns[label], build_modifiers(["alibi"], N_HEAD)
    doc = documents(rows_with_eos([{0, 5, 30}, set()], 37), EOS).ids
    q, k, v = qkv(2, N_HEAD, 37)
    want = outputs_and_grads(lambda *x: reference(*x, p, modifier=mod, doc=doc), q, k, v)
    got = outputs_and_grads(lambda *x: blocksparse(*x, p, modifier=mod, doc=doc), q, k, v)
    assert_all_close(got, want)


@pytest.mark.parametrize("T", [40, 300])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_sdpa_dense_within_documents_equals_reference(T, data):
    """Up to SDPA_DOC_MAX SDPA takes a boolean mask; longer rows go to the block-sparse kernel (T=300 here)."""
    eos = data.draw(eos_sets(2, T))
    doc = documents(rows_with_eos(eos, T), EOS).ids
    q, k, v = qkv(2, 4, T, Hkv=2)  # shared key/value heads too
    want = outputs_and_grads(lambda *x: reference(*x, Dense(), doc=doc), q, k, v)
    old, backends.SDPA_DOC_MAX = backends.SDPA_DOC_MAX, 128
    try:
        got = outputs_and_grads(lambda *x: sdpa(*x, Dense(), doc=doc), q, k, v)
    finally:
        backends.SDPA_DOC_MAX = old
    assert_all_close(got, want)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 70).flatmap(lambda T: st.tuples(st.just(T), eos_sets(2, T), st.sampled_from([1, 4, 16, 64]))))
def test_linear_resets_its_state_at_every_document(case):
    T, eos, chunk = case
    docs = documents(rows_with_eos(eos, T), EOS)
    doc = docs.ids
    q, k, v = qkv(2, 3, T, dtype=torch.float64)
    want = outputs_and_grads(lambda *x: linear_reference(*x, doc=doc), q, k, v)
    assert_all_close(outputs_and_grads(lambda *x: reference(*x, Linear(), doc=doc), q, k, v), want, 1e-12, 1e-10)
    chunked = outputs_and_grads(lambda *x: linear_chunked(*x, chunk=chunk, doc=doc), q, k, v)
    assert_all_close(chunked, want, 1e-12, 1e-10)
    backend = outputs_and_grads(lambda *x: linear_backend(*x, Linear(chunk=chunk), doc=doc), q, k, v)
    assert_all_close(backend, want, 1e-12, 1e-10)
    # the last document alone: the state starts from zero
    lo = int(docs.starts[0, -1])
    alone = linear_reference(q[:1, :, lo:], k[:1, :, lo:], v[:1, :, lo:])
    torch.testing.assert_close(want[0][:1, :, lo:], alone)


# ------------------------------------------------------------------ the model


def make_model(attn: dict, position="learned", reset="none", context=CONTEXT, **model) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=2,
        n_head=N_HEAD,
        d_model=32,
        context=context,
        position=position,
        position_reset=reset,
        eos_id=EOS,
        **model,
    )
    return GPT(cfg, AttentionConfig(**attn, document_mask=True), VOCAB).eval()


TRANSLATION_INVARIANT = ["dense", "local", "dilated_window", "linear"]


POSITIONS = [("learned", "document"), ("sinusoidal", "document"), ("rope", "document"), ("none", "none")]


@pytest.mark.parametrize(
    "label,position,reset",
    [(label, *pos) for label in TRANSLATION_INVARIANT for pos in POSITIONS]
    + [(label, "alibi", "none") for label in TRANSLATION_INVARIANT if label != "linear"],
)
def test_a_later_document_gets_the_logits_it_gets_alone(label, position, reset, tmp_path, one_thread):
    """With positions reset per document and document masking, a document's logits do not depend on what
    came before it in the row (alibi, a score modifier: relative scores need no reset)."""
    model = make_model(attention_kwargs(label, tmp_path), position, reset)
    second = rows_with_eos([set()], 9, seed=3)
    row = torch.cat([rows_with_eos([{0, 10}], 11, seed=4), second], 1)  # <eos> A <eos> B
    with torch.no_grad():
        torch.testing.assert_close(model(row)[:, 11:], model(second), atol=1e-5, rtol=1e-5)
        # and without masking the first document leaks into the second
        model.document_mask = False
        for block in model.blocks:
            block.attn.core.document_mask = False
        assert not torch.allclose(model(row)[:, 11:], model(second), atol=1e-3)


def test_position_reset_restarts_learned_positions_at_each_document(one_thread):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, context=16, position_reset="document", eos_id=EOS)
    model = GPT(cfg, AttentionConfig(), VOCAB).eval()
    idx = torch.tensor([[5, 6, EOS, 7, 8]])
    x = model.tok_emb(idx) + model.pos_emb.weight[[0, 1, 2, 0, 1]]
    seen = []
    model.drop.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        model(idx)
    torch.testing.assert_close(seen[0], x)


@pytest.mark.parametrize("position,reset", [("learned", "none"), ("rope", "document")])
@pytest.mark.parametrize("label", LABELS)
def test_cache_equals_full_forward_within_documents(label, position, reset, tmp_path):
    model = make_model(attention_kwargs(label, tmp_path), position, reset)
    seq = rows_with_eos([{0, 3, 4, 11}, {2, 17, 23}], CONTEXT, seed=1)  # <eos> in the prompt, at its end, later
    got = cached_logits(model, seq, prompt_len=4)
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(3, CONTEXT)], 1)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        if label in TRANSLATION_INVARIANT and reset == "document":  # after <eos> nothing before counts
            torch.testing.assert_close(got[0, 9:], model(seq[:1, 12:])[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("label", ["local", "strided_split", "fixed_v2", "sink_window", "linear", "dilated_window"])
def test_grouped_query_caches_mask_documents(label, tmp_path):
    model = make_model(attention_kwargs(label, tmp_path), "rope", "document", n_kv_head=2)
    seq = rows_with_eos([{0, 6, 13}, {9, 10}], CONTEXT, seed=2)
    got = cached_logits(model, seq, prompt_len=3)
    with torch.no_grad():
        want = torch.stack([model(seq[:, : t + 1])[:, -1] for t in range(2, CONTEXT)], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_sampling_with_the_cache_equals_recomputing(tmp_path):
    """``attnlab sample``'s loop: greedy tokens through the cache match full forwards, <eos> in the prompt."""
    model = make_model({"pattern": "local", "window": 6}, "rope", "document")
    prompt = rows_with_eos([{0, 4}], 6, seed=7)
    greedy = SamplingConfig(temperature=0)
    cached = generate(model, prompt, 12, sampling=greedy, use_cache=True)
    plain = generate(model, prompt, 12, sampling=greedy, use_cache=False)
    assert torch.equal(cached, plain)


def test_checkpointed_training_gradients_equal_plain_ones(one_thread):
    idx = rows_with_eos([{0, 7}, {3}], 16, seed=1)
    grads = []
    for recompute in (False, True):
        model = make_model({"pattern": "local", "window": 5}, "rope", "document", checkpoint_activations=recompute)
        model.train()
        model(idx).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert_all_close(grads[1], grads[0], 1e-6, 1e-5)


@pytest.mark.parametrize("stride", [None, 5])
def test_scoring_with_documents_is_batch_invariant(stride, one_thread):
    model = make_model({"pattern": "dense"}, "rope", "document", context=16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, 200)
    tokens[rng.random(200) < 0.08] = EOS
    tokens[0] = EOS
    scores = [score_tokens(model, tokens, context=16, stride=stride, batch_size=b) for b in (1, 4)]
    assert scores[0].tokens == scores[1].tokens == 199  # every target once
    assert scores[0].nll_nats == pytest.approx(scores[1].nll_nats, rel=1e-6)


# ------------------------------------------------------------------ configuration and refusals


def test_document_mask_is_a_typed_config_key():
    cfg = from_dict({"train": {"max_steps": 1}}, ["attention.document_mask=true", "model.position_reset=document"])
    assert cfg.attention.document_mask is True and cfg.model.position_reset == "document"
    with pytest.raises(ConfigError, match="attention.document_mask expects true or false"):
        from_dict({"train": {"max_steps": 1}}, ["attention.document_mask=maybe"])


@pytest.mark.parametrize(
    "position,has",
    [("none", "has none"), ("alibi", "has none"), ("image", "gives image coordinates, not token positions")],
)
def test_position_reset_needs_positions(position, has):
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"max_steps": 1}}, [f"model.position={position}", "model.position_reset=document"])
    assert str(e.value) == (
        f"model.position_reset=document needs positions to reset, but model.position={position} {has}: "
        "use model.position=learned, sinusoidal or rope, or model.position_reset=none"
    )


def test_the_model_needs_the_separator():
    with pytest.raises(ConfigError, match=r"attention.document_mask=true needs the id of the document separator"):
        GPT(ModelConfig(n_layer=1, n_head=2, d_model=16), AttentionConfig(document_mask=True), VOCAB)


def _config(*overrides):
    return from_dict({"train": {"max_steps": 1}}, list(overrides))


def test_fitting_to_data_takes_the_datasets_separator():
    text = SimpleNamespace(kind="text", dir="data/x", vocab_size=300, meta={"tokenizer": {"eos_id": 7}})
    assert fit_model_to_data(_config("attention.document_mask=true"), text)[1].eos_id == 7
    with pytest.raises(ConfigError, match=r"model.eos_id=3 is not the document separator of the dataset data/x \(7\)"):
        fit_model_to_data(_config("model.eos_id=3"), text)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "attention.document_mask=true",
            "attention.document_mask=true needs documents separated by <eos>, but the image dataset data/img has no "
            "<eos> between its images: set it false",
        ),
        (
            "model.position_reset=document",
            "model.position_reset=document needs documents separated by <eos>, but the image dataset data/img has "
            "no <eos> between its images: set model.position_reset=none",
        ),
    ],
)
def test_image_data_has_no_documents(override, message):
    image = SimpleNamespace(kind="image", dir="data/img", meta={})
    with pytest.raises(ConfigError) as e:
        fit_model_to_data(_config(override), image)
    assert str(e.value) == message


def test_a_backend_without_document_masking_is_refused_when_forced():
    register_backend("plain", lambda q, k, v, pattern, p=0.0, training=False: q, lambda pattern, device: True)
    try:
        assert select_backend("auto", Dense(), "cpu", document_mask=True)[0] == "sdpa"
        with pytest.raises(ConfigError) as e:
            select_backend("plain", Dense(), "cpu", document_mask=True)
        assert str(e.value).startswith("attention.backend='plain' cannot apply attention.document_mask: use ")
    finally:
        BACKENDS.pop("plain")


@pytest.mark.parametrize("label", ["dense", "strided_union", "linear"])
def test_attention_capture_keeps_to_the_document(label, tmp_path, one_thread):
    """``attnlab viz``/attention statistics read the reference path: it is masked by documents too."""
    from attnlab.eval.inspection.attention_maps import capture_attention

    model = make_model(attention_kwargs(label, tmp_path))
    x = rows_with_eos([{0, 7}, {12}], 16, seed=3)
    same = documents(x, EOS).ids
    same = same[:, None, :, None] == same[:, None, None, :]
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as captured:
            torch.testing.assert_close(model(x), plain, atol=1e-5, rtol=0)
    for w in captured.values():
        assert (w.masked_select(~same.expand_as(w)) == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)


def test_the_cost_benchmark_writes_its_table_plot_and_machine(tmp_path, one_thread):
    from attnlab.bench.docmask import run

    specs = ["dense", "dense@blocksparse", "local:window=8", "linear"]
    rows = run(tmp_path, specs, [(2, 16)], heads=2, head_dim=8, doc_len=4, repeats=1, choice=[(2, 16)])
    assert [r["backend"] for r in rows] == ["sdpa", "blocksparse", "blocksparse", "linear"]
    assert all(r["ratio"] > 0 for r in rows)
    assert {p.name for p in tmp_path.iterdir()} == {"results.csv", "results.png", "machine.json", "dense-choice.csv"}
    assert (tmp_path / "dense-choice.csv").read_text().splitlines()[
        0
    ] == "batch,seq_len,sdpa_mask_ms,blocksparse_ms,faster"


def test_blocksparse_skips_the_blocks_no_document_reaches(one_thread):
    """Per row and block, the document ranges: a long row of short documents visits far fewer blocks."""
    from attnlab.attention.blocksparse import _doc_order, _doc_ranges, _live, plan

    T = 1024
    doc = documents(rows_with_eos([set(range(0, T, 100))], T), EOS).ids
    for p in (Dense(), pattern("local")):
        cp = plan(p, T, N_HEAD, torch.device("cpu"))[0].components[0]
        ranges = _doc_ranges(_doc_order(doc, cp), cp)
        visited = sum(int(_live(ch, cp, ranges).kv.numel()) for ch in cp.chunks)
        assert visited <= sum(int(ch.kv.numel()) for ch in cp.chunks) / (2 if p.is_dense_causal else 1)
    q, k, v = qkv(1, N_HEAD, T, D=4)
    want = outputs_and_grads(lambda *x: reference(*x, Dense(), doc=doc), q, k, v)
    assert_all_close(outputs_and_grads(lambda *x: blocksparse(*x, Dense(), doc=doc), q, k, v), want)
