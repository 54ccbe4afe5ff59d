"""Training batches: windows, determinism, resumption, data-parallel slices."""

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attnlab.data.batches import BatchIterator
from attnlab.errors import ConfigError, DataError

N, B, C = 5000, 8, 16


def ramp(n=N):
    """tokens[i] == i, so every token tells where it came from."""
    return np.arange(n, dtype=np.int64)


def take(it, k):
    return [it.next_batch() for _ in range(k)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_shapes_and_shift():
    tokens = np.random.default_rng(0).integers(0, 1000, N).astype(np.uint16)
    it = BatchIterator(tokens, B, C, seed=0)
    x, y = it.next_batch()
    assert x.shape == y.shape == (B, C) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = it.window_starts(0, 0)
    for row, s in enumerate(starts):
        assert torch.equal(x[row], torch.from_numpy(tokens[s : s + C].astype(np.int64)))
        assert torch.equal(y[row], torch.from_numpy(tokens[s + 1 : s + C + 1].astype(np.int64)))


def test_epoch_is_non_overlapping_windows_at_a_random_offset():
    it = BatchIterator(ramp(), B, C, seed=3)
    assert it.windows_per_epoch == (N - C) // C and it.steps_per_epoch == it.windows_per_epoch // B
    offsets = set()
    for epoch in range(4):
        starts = np.concatenate([x[:, 0].numpy() for x, _ in take(it, it.steps_per_epoch)])
        assert it.epoch == epoch + 1 and it.step == 0
        offset = int(starts.min() % C)
        offsets.add(offset)
        assert 0 <= offset < C and np.all(starts % C == offset)  # windows start every C tokens
        assert len(set(starts.tolist())) == len(starts) == it.steps_per_epoch * B  # each window once
        assert starts.max() + C + 1 <= N
        assert not np.all(np.diff(starts) == C)  # shuffled order
    assert len(offsets) > 1


def test_deterministic_and_seeded():
    a = take(BatchIterator(ramp(), B, C, seed=1), 50)
    b = take(BatchIterator(ramp(), B, C, seed=1), 50)
    c = take(BatchIterator(ramp(), B, C, seed=2), 50)
    assert same(a, b) and not same(a, c)


def test_independent_of_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    a = take(BatchIterator(ramp(), B, C, seed=1), 5)
    torch.manual_seed(1)
    np.random.seed(1)
    assert same(a, take(BatchIterator(ramp(), B, C, seed=1), 5))


@pytest.mark.parametrize("stop", [0, 7, 38, 39, 80])
def test_resume_from_state_dict_matches_uninterrupted(stop):
    full = take(BatchIterator(ramp(), B, C, seed=5), stop + 60)
    first = BatchIterator(ramp(), B, C, seed=5)
    take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = BatchIterator(ramp(), B, C, seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch_float == first.epoch_float
    assert same(take(resumed, 60), full[stop:])  # crosses epoch boundaries (38 steps per epoch)


def test_state_dict_rejects_a_different_setup():
    state = BatchIterator(ramp(), B, C, seed=5).state_dict()
    with pytest.raises(DataError, match="batch_size=8, but this run has batch_size=4"):
        BatchIterator(ramp(), 4, C, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="n_tokens"):
        BatchIterator(ramp(N + 100), B, C, seed=5).load_state_dict(state)


def test_ranks_take_disjoint_slices_of_the_global_batch():
    world = 4
    glob = BatchIterator(ramp(), B, C, seed=9)
    ranks = [BatchIterator(ramp(), B, C, seed=9, rank=r, world_size=world) for r in range(world)]
    assert all(r.steps_per_epoch == glob.steps_per_epoch for r in ranks)
    for _ in range(glob.steps_per_epoch + 3):
        gx, gy = glob.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(x.shape == (B // world, C) for x, _ in parts)
        assert torch.equal(torch.cat([x for x, _ in parts]), gx) and torch.equal(torch.cat([y for _, y in parts]), gy)
        starts = [set(x[:, 0].tolist()) for x, _ in parts]
        assert sum(map(len, starts)) == len(set().union(*starts)) == B


def test_batch_size_must_divide_by_world_size():
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the 4"):
        BatchIterator(ramp(), 6, C, seed=0, rank=0, world_size=4)


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(DataError) as e:
        BatchIterator(ramp(100), 8, 16, seed=0)
    msg = str(e.value)
    assert "train.bin has 100 tokens" in msg and "8 x (16+1)" in msg and "train.batch_size" in msg
    BatchIterator(ramp(8 * 16 + 16), 8, 16, seed=0)  # exactly enough


def test_epoch_float():
    it = BatchIterator(ramp(), B, C, seed=0)
    assert it.epoch_float == 0.0
    take(it, it.steps_per_epoch + it.steps_per_epoch // 2)
    assert it.epoch_float == pytest.approx(1 + (it.steps_per_epoch // 2) / it.steps_per_epoch)


def test_reads_from_memmap(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 60000, N).astype(np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    it = BatchIterator(mm, B, C, seed=4)
    assert it.tokens is mm  # no copy of the whole file
    assert same(take(it, 10), take(BatchIterator(tokens, B, C, seed=4), 10))


def challenge_walk(tokens, batch_size, context, steps):
    """The mainrun challenge's get_batch loop, written out: consecutive spans of B*C+1 tokens, back to 0 at the end."""
    t, span, ptr, out = torch.from_numpy(tokens), batch_size * context + 1, 0, []
    for _ in range(steps):
        if ptr + span >= len(t):
            ptr = 0
        batch = t[ptr : ptr + span]
        out.append((batch[:-1].view(batch_size, context), batch[1:].view(batch_size, context)))
        ptr += batch_size * context
    return out


@settings(max_examples=40, deadline=None)
@given(batch_size=st.integers(1, 6), context=st.integers(1, 12), epochs=st.integers(1, 3), data=st.data())
def test_sequential_order_is_the_mainrun_challenges_walk(batch_size, context, epochs, data):
    span = batch_size * context
    # The challenge's loop repeats its first batch early when the stream ends 0 or 1 tokens past a span.
    assume(span >= 3)
    n = data.draw(st.integers(1, 5)) * span + data.draw(st.integers(2, span - 1))
    it = BatchIterator(ramp(n), batch_size, context, seed=0, order="sequential")
    assert it.steps_per_epoch == n // span  # the challenge's batches per epoch
    steps = epochs * it.steps_per_epoch
    assert same(take(it, steps), challenge_walk(ramp(n), batch_size, context, steps))
