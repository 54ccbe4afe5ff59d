"""Sampling controls on hand-made distributions: exact kept sets, order of composition, reproducibility."""

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from attnlab.errors import ConfigError
from attnlab.eval.generation.filters import (
    SamplingConfig,
    StopStrings,
    apply_repetition_penalty,
    filter_logits,
    min_p_filter,
    next_token,
    process_logits,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

pytestmark = pytest.mark.usefixtures("one_thread")

INF = float("inf")


def kept(logits: torch.Tensor) -> list[list[bool]]:
    return torch.isfinite(logits).tolist()


def logits_of(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()


# --- top-k / top-p -----------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [9.0, 0.0, 8.0, 7.0, 6.0]])
    assert kept(top_k_filter(logits, 2)) == [[False, True, False, True, False], [True, False, True, False, False]]
    assert torch.equal(top_k_filter(logits, 5), logits)


@pytest.mark.parametrize("p, n_kept", [(0.3, 1), (0.5, 1), (0.75, 2), (0.8, 2), (0.81, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, n_kept):
    # Masses 0.5, 0.8, 0.95, 1.0: keep up to and including the first token where the mass reaches p.
    out = top_p_filter(logits_of(0.5, 0.3, 0.15, 0.05), p)
    assert kept(out) == [[i < n_kept for i in range(4)]]


def test_top_p_is_order_free_within_a_row():
    out = top_p_filter(logits_of(0.05, 0.3, 0.15, 0.5), 0.8)
    assert kept(out) == [[False, True, False, True]]


def test_filter_logits_compat_applies_top_k_then_top_p():
    logits = logits_of(0.4, 0.3, 0.2, 0.1)
    # After top-2 the nucleus sees 0.4/0.7 = 0.57 >= 0.5 on its own.
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == [[True, False, False, False]]
    assert torch.equal(filter_logits(logits), logits)


# --- typical ---------------------------------------------------------------------------------


def test_typical_can_drop_the_most_probable_token():
    # H = -0.4 ln 0.4 - 5 * 0.12 ln 0.12 = 1.639. Surprisal of 0.4 is 0.916 (|.| = 0.72), of 0.12 is
    # 2.120 (|.| = 0.48): the five small tokens come first, mass 0.48 before the fifth < 0.5, so all
    # five stay; the 0.4 token comes after mass 0.6 >= 0.5 and is dropped.
    out = typical_filter(logits_of(0.4, *[0.12] * 5), 0.5)
    assert kept(out) == [[False, True, True, True, True, True]]


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.3, [False, True, False]),  # order 0.35 (|1.050-1.080|), 0.4 (0.164), 0.25 (0.306)
        (0.5, [True, True, False]),
        (0.8, [True, True, True]),
        (1.0, [True, True, True]),
    ],
)
def test_typical_keeps_the_most_typical_prefix(p, expected):
    assert kept(typical_filter(logits_of(0.4, 0.35, 0.25), p)) == [expected]


def test_typical_ignores_tokens_already_removed():
    base = logits_of(0.4, *[0.12] * 5)
    with_removed = torch.cat([base, torch.full((1, 3), -INF)], dim=1)
    out = typical_filter(with_removed, 0.5)
    assert kept(out) == [[False] + [True] * 5 + [False] * 3]


# --- min-p -----------------------------------------------------------------------------------


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    # Max logit 0 so the threshold is exactly log(0.25): prob ratio 0.25 stays, a hair below goes.
    logits = torch.tensor([[0.0, math.log(0.25), math.log(0.25) - 1e-3, -5.0]])
    assert kept(min_p_filter(logits, 0.25)) == [[True, True, False, False]]
    assert torch.equal(min_p_filter(logits, 0.0), logits)


def test_min_p_threshold_scales_with_each_rows_max():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    assert kept(min_p_filter(probs.log(), 0.5)) == [[True, True, False, False], [True, True, True, True]]


# --- repetition penalty ----------------------------------------------------------------------


def test_repetition_penalty_divides_positive_multiplies_negative_once_per_id():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    previous = torch.tensor([[0, 1, 0, 0], [2, 2, 2, 2]])
    out = apply_repetition_penalty(logits, previous, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 0.5, 0.5]]
    assert logits.tolist()[0] == [2.0, -2.0, 1.0, 0.5]  # input untouched


def test_repetition_penalty_of_one_or_no_history_is_a_no_op():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 1.0), logits)
    assert torch.equal(apply_repetition_penalty(logits, torch.zeros(1, 0, dtype=torch.long), 1.3), logits)


# --- next_token ------------------------------------------------------------------------------


def test_greedy_is_argmax_after_the_penalty():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0, top_k=3, typical_p=0.2)  # filters do not apply to greedy
    assert torch.equal(next_token(logits, cfg), logits.argmax(-1, keepdim=True))
    penalised = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert next_token(torch.tensor([[3.0, 2.0]]), penalised, torch.tensor([[0]])).tolist() == [[1]]


def test_same_seed_same_tokens_and_seeds_matter():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0.9, top_p=0.95)

    def draw(seed: int) -> torch.Tensor:
        return next_token(logits, cfg, generator=torch.Generator().manual_seed(seed))

    a = draw(1)
    assert a.shape == (64, 1) and a.dtype == torch.long
    assert torch.equal(a, draw(1)) and not torch.equal(a, draw(2))


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(top_k=1), SamplingConfig(min_p=0.5, temperature=0.5), SamplingConfig(top_p=0.01, temperature=3.0)],
)
def test_a_single_surviving_token_is_always_drawn(cfg):
    # Rows of 0/-3/-6: only the first survives each filter above, on any row order.
    base = torch.tensor([0.0, -3.0, -6.0])
    logits = torch.stack([base.roll(i % 3) for i in range(300)])
    expected = logits.argmax(-1, keepdim=True)
    assert torch.equal(next_token(logits, cfg, generator=torch.Generator().manual_seed(0)), expected)


def test_top_p_sees_the_distribution_left_by_top_k():
    cfg = SamplingConfig(top_k=2, top_p=0.5)
    assert kept(process_logits(logits_of(0.4, 0.3, 0.2, 0.1), cfg)) == [[True, False, False, False]]


def test_min_p_applies_after_temperature():
    logits = torch.tensor([[0.0, -1.0, -3.0]])
    # min_p = e^-2 drops the -3 token at temperature 1, but at temperature 2 it sits at -1.5 > -2.
    assert kept(process_logits(logits, SamplingConfig(min_p=math.exp(-2)))) == [[True, True, False]]
    hot = SamplingConfig(temperature=2.0, min_p=math.exp(-2))
    assert torch.allclose(process_logits(logits, hot), torch.tensor([[0.0, -0.5, -1.5]]))
    draws = next_token(logits.expand(500, 3), hot, generator=torch.Generator().manual_seed(0))
    assert (draws == 2).any()


def test_penalty_precedes_the_filters():
    # Penalised [1.5, 2.0, -inf...]: top-1 must then keep token 1, not the raw argmax 0.
    cfg = SamplingConfig(top_k=1, repetition_penalty=2.0)
    out = process_logits(torch.tensor([[3.0, 2.0, -1.0]]), cfg, torch.tensor([[0]]))
    assert kept(out) == [[False, True, False]]


def test_half_precision_logits_are_processed_in_float32():
    out = process_logits(torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16), SamplingConfig(top_k=1))
    assert out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_the_same_tokens_on_cuda():
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0.8, top_k=40, min_p=0.02)
    on_cpu = next_token(logits, cfg, generator=torch.Generator().manual_seed(3))
    on_gpu = next_token(logits.cuda(), cfg, generator=torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


# --- properties ------------------------------------------------------------------------------

values = st.lists(st.one_of(st.floats(-5, 5), st.just(-INF)), min_size=2, max_size=30)
fractions = st.floats(0.01, 1.0)


def finite_row(vals: list[float]) -> torch.Tensor:
    assume(any(math.isfinite(v) for v in vals))
    return torch.tensor([vals])


@settings(max_examples=60, deadline=None)
@given(values, st.integers(1, 40), fractions)
@example([0.0] * 17, 3, 0.5)  # all tied: the kept top token need not be argmax's index 0
def test_filters_keep_a_top_token(vals, k, p):
    logits = finite_row(vals)
    for out in (
        top_k_filter(logits, k),
        top_p_filter(logits, p),
        min_p_filter(logits, min(p, 0.99)),
        filter_logits(logits, top_k=k, top_p=p),
    ):
        mask = torch.isfinite(out)
        assert mask.any() and logits[mask].max() == logits.max()
        assert torch.equal(out[mask], logits[mask])  # survivors are untouched


@settings(max_examples=60, deadline=None)
@given(values, fractions)
@example([0.0] * 17, 0.5)
def test_nucleus_and_typical_keep_enough_mass(vals, p):
    logits = finite_row(vals)
    probs = logits.softmax(-1)
    for out in (top_p_filter(logits, p), typical_filter(logits, p)):
        mask = torch.isfinite(out)
        assert mask.any() and probs[mask].sum() >= p - 1e-5


@settings(max_examples=60, deadline=None)
@given(values, fractions)
def test_typical_keeps_a_most_typical_token(vals, p):
    logits = finite_row(vals)
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).nan_to_num().sum()
    distance = (-logp - entropy).abs()
    mask = torch.isfinite(typical_filter(logits, p))
    assert distance[mask].min() <= distance.min() + 1e-5


@settings(max_examples=60, deadline=None)
@given(values, st.floats(0.0, 0.99))
def test_min_p_keeps_exactly_the_tokens_near_the_max(vals, min_p):
    logits = finite_row(vals)
    probs = logits.softmax(-1)
    mask = torch.isfinite(min_p_filter(logits, min_p))
    threshold = min_p * probs.max()
    assert (probs[mask] >= threshold * (1 - 1e-4)).all() and (probs[~mask] <= threshold * (1 + 1e-4)).all()


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", 0),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("typical_p", 0.0),
        ("typical_p", 1.01),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}=.*: use e\.g\. {field}=") as err:
        SamplingConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_config_defaults_are_valid_and_describe_themselves():
    assert SamplingConfig().describe() == {
        "strategy": "sample",
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
        "typical_p": None,
        "min_p": None,
        "repetition_penalty": 1.0,
    }
    assert SamplingConfig(temperature=0, top_p=1.0, min_p=0.0).describe()["strategy"] == "greedy"


def test_filter_functions_reject_out_of_range_arguments():
    logits = torch.zeros(1, 3)
    with pytest.raises(ConfigError, match="top_k"):
        top_k_filter(logits, 0)
    with pytest.raises(ConfigError, match="top_p"):
        top_p_filter(logits, 0.0)


# --- stop strings ----------------------------------------------------------------------------


def letters(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def test_stops_after_the_token_completing_a_multi_token_stop_string():
    stops = StopStrings(["cd"], letters)
    prompt = [0, 0]  # "aa"
    assert stops.check(prompt + [1, 2], len(prompt)) is None  # "bc"
    assert stops.check(prompt + [1, 2, 3], len(prompt)) == 3  # "bcd"
    assert stops.check(prompt + [1, 2, 3, 4, 2, 3], len(prompt)) == 3  # checked late: first occurrence


def test_stops_at_a_stop_string_inside_one_token():
    vocab = ["a", "b", "xSTOPy", "c"]
    stops = StopStrings(["OP", "zz"], lambda ids: "".join(vocab[i] for i in ids))
    assert stops.check([0, 1, 2, 3], 1) == 2  # generated "b" + "xSTOPy": keep both tokens


def test_a_stop_string_only_in_the_prompt_does_not_stop():
    stops = StopStrings(["cd"], letters)
    prompt = [2, 3]  # "cd"
    assert stops.check(prompt + [4, 5], len(prompt)) is None
    assert stops.check(prompt, len(prompt)) is None


def test_trim_cuts_at_the_earliest_stop_string():
    stops = StopStrings(["STOP", "lo"], letters)
    assert stops.trim("hello STOP world") == "hel"
    assert stops.trim("no stop here") == "no stop here"


def test_empty_stop_string_is_a_config_error():
    with pytest.raises(ConfigError, match="empty"):
        StopStrings(["ok", ""], letters)
