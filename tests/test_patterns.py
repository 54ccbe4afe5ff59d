"""Pattern definitions: hand-checked masks, per-head and per-layer differences, block layouts, config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import config
from attnlab.attention import BlockLayout, Dense, Fixed, Local, SinkWindow, Strided, build_pattern
from attnlab.config import AttentionConfig
from attnlab.errors import ConfigError


def keys(pattern, i, head=0, T=None):
    """The keys query i may attend, as a sorted list."""
    T = T or i + 1
    return torch.nonzero(pattern.dense_mask(T, head + 1)[head, i]).flatten().tolist()


def cfg(*overrides):
    base = ["model.n_layer=4", "model.n_head=4", "model.d_model=32", "model.context=64", "train.max_steps=1"]
    return config.load(None, base + list(overrides))


# ------------------------------------------------------------- definitions


def test_local_sees_the_last_window_keys():
    assert keys(Local(3), 10) == [8, 9, 10]
    assert keys(Local(3), 1) == [0, 1]
    assert keys(Local(1), 5) == [5]


def test_strided_parts_follow_child_et_al():
    union = Strided(4, "union", 2)
    assert keys(union, 13) == [1, 5, 9, 10, 11, 12, 13]  # the window of 4 and every 4th key
    split = Strided(4, "split", 4)
    assert keys(split, 13, head=0) == keys(split, 13, head=1) == [10, 11, 12, 13]  # first half: local
    assert keys(split, 13, head=2) == keys(split, 13, head=3) == [1, 5, 9, 13]  # second half: strided
    assert keys(Strided(4, "interleave", 2, "local"), 13) == [10, 11, 12, 13]
    assert keys(Strided(4, "interleave", 2, "stride"), 13) == [1, 5, 9, 13]


def test_fixed_summary_columns_differ_per_head_like_openai():
    # l=8, b=2: four blocks per chunk; num_verts=2 -> head group 0 summarises block 3 of each chunk, group 1 block 2.
    p = Fixed(local_attn_ctx=8, blocksize=2, vertsize=1, num_verts=2)
    assert keys(p, 19, head=0) == [6, 7, 14, 15, 16, 17, 18, 19]
    assert keys(p, 19, head=1) == [4, 5, 12, 13, 16, 17, 18, 19]
    assert keys(p, 19, head=2) == keys(p, 19, head=0)  # g = head mod num_verts
    # vertsize 2 with one set: the last two blocks (4 keys) of each chunk.
    assert keys(Fixed(8, 2, 2, 1), 17) == [4, 5, 6, 7, 12, 13, 14, 15, 16, 17]


def test_sink_window():
    assert keys(SinkWindow(2, 3), 10) == [0, 1, 8, 9, 10]
    assert keys(SinkWindow(0, 3), 10) == [8, 9, 10]
    assert keys(SinkWindow(4, 3), 2) == [0, 1, 2]


def test_block_layout_is_causal_inside_diagonal_blocks():
    blocks = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 1, 1]]], dtype=torch.bool)
    p = BlockLayout("x", 4, "", blocks)
    assert keys(p, 5) == [0, 1, 2, 3, 4, 5]
    assert keys(p, 9) == [4, 5, 6, 7, 8, 9]


def test_every_pattern_is_causal_and_sees_itself():
    for p in [Dense(), Local(5), Strided(4, "union", 2), Strided(4, "split", 2), Fixed(8, 2, 1, 1), SinkWindow(2, 3)]:
        mask = p.dense_mask(33, 2)
        assert not mask.triu(1).any(), p
        assert mask.diagonal(dim1=1, dim2=2).all(), p


def test_density_counts_allowed_pairs():
    T, w = 100, 10
    exact = sum(min(i + 1, w) for i in range(T)) / (T * (T + 1) / 2)
    assert Local(w).density(T, 2) == pytest.approx(exact)
    assert Strided(4, "split", 4).density(64, 4) == pytest.approx(
        (Local(4).density(64, 1) + Strided(4, "interleave", 1, "stride").density(64, 1)) / 2
    )


# ------------------------------------------------------- layers and heads


def test_schedule_gives_each_layer_its_pattern():
    a = AttentionConfig(
        schedule=["local", "local", "local", "strided"], window=16, local_attn_ctx=8, strided_mode="union"
    )
    names = [build_pattern(a, i, 8, 4).name for i in range(8)]
    assert names == ["local", "local", "local", "strided"] * 2
    assert build_pattern(a, 0, 8, 4) == Local(16)


def test_interleave_alternates_layers():
    a = AttentionConfig(pattern="strided", strided_mode="interleave", local_attn_ctx=4)
    parts = [build_pattern(a, i, 4, 2).part for i in range(4)]
    assert parts == ["local", "stride", "local", "stride"]


def test_head_groups_cover_every_head_once():
    for p, n in [(Strided(4, "split", 6), 6), (Fixed(8, 2, 1, 3), 6), (Dense(), 3)]:
        heads = sorted(h for g in p.head_groups(n) for h in g.heads)
        assert heads == list(range(n))
        for g in p.head_groups(n):  # heads in a group really share one mask
            mask = p.dense_mask(24, n)
            assert all(torch.equal(mask[h], mask[g.heads[0]]) for h in g.heads)


# ------------------------------------------------------------ block layouts

PATTERNS = st.one_of(
    st.builds(Dense),
    st.builds(Local, st.integers(1, 40)),
    st.builds(
        lambda l, mode, part: Strided(l, mode, 4, part),
        st.integers(1, 12),
        st.sampled_from(["split", "union", "interleave"]),
        st.sampled_from(["local", "stride"]),
    ),
    st.builds(
        lambda b, per, v, nv: Fixed(b * per, b, v, nv),
        st.integers(1, 4),
        st.integers(1, 4),
        st.integers(1, 2),
        st.integers(1, 2),
    ).filter(lambda p: p.vertsize * p.num_verts <= p.local_attn_ctx // p.blocksize),
    st.builds(SinkWindow, st.integers(0, 10), st.integers(1, 20)),
    st.builds(
        lambda bs, seed: BlockLayout(
            "x", bs, "", torch.rand(2, 80 // bs + 1, 80 // bs + 1, generator=torch.Generator().manual_seed(seed)) > 0.5
        ),
        st.integers(1, 9),
        st.integers(0, 100),
    ),
)


@settings(max_examples=120, deadline=None)
@given(PATTERNS, st.integers(1, 70), st.sampled_from([1, 2, 3, 4, 8, 16]))
def test_block_layout_is_exactly_the_blocks_with_an_allowed_pair(pattern, T, block):
    """Computed per block pair, it covers every allowed pair; it is exact when T fills whole blocks
    (a partial last block may be kept for pairs that only padding positions would form)."""
    H = 4
    mask = pattern.dense_mask(T, H)
    nb = -(-T // block)
    padded = torch.zeros(H, nb * block, nb * block, dtype=torch.bool)
    padded[:, :T, :T] = mask
    expected = padded.view(H, nb, block, nb, block).any(dim=(2, 4))
    layout = pattern.block_layout(T, block, H)
    assert not (expected & ~layout).any()
    if T % block == 0:
        assert torch.equal(layout, expected)


# ------------------------------------------------------------ config rules


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["attention.pattern=fixed", "attention.local_attn_ctx=16", "attention.blocksize=6"],
            "blocksize=6 must divide attention.local_attn_ctx=16",
        ),
        (
            [
                "attention.pattern=fixed",
                "attention.local_attn_ctx=16",
                "attention.blocksize=4",
                "attention.num_verts=3",
            ],
            "num_verts=3 must divide model.n_head=4",
        ),
        (
            [
                "attention.pattern=fixed",
                "attention.local_attn_ctx=16",
                "attention.blocksize=8",
                "attention.vertsize=2",
                "attention.num_verts=2",
            ],
            "exceeds the 2 blocks per chunk",
        ),
        (
            ["attention.pattern=strided", "attention.local_attn_ctx=48"],
            "local_attn_ctx=48 must divide model.context=64",
        ),
        (["attention.pattern=strided", "model.n_head=3", "model.d_model=24"], "n_head=3 is odd"),
        (["attention.pattern=linear", "attention.backend=blocksparse"], "cannot run pattern 'linear'"),
        (["attention.schedule=local,nope"], "unknown pattern 'nope'"),
        (["attention.pattern=block_layout"], "needs attention.layout"),
        (["attention.backend=sdpa", "attention.pattern=local"], "cannot run pattern 'local'"),
    ],
)
def test_invalid_combinations_name_the_rule(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        cfg(*overrides)


MAINRUN_FIXED = [
    "attention.pattern=fixed",
    "attention.num_verts=16",
    "attention.local_attn_ctx=32",
    "attention.blocksize=32",
    "attention.vertsize=64",
]


def test_fixed_names_every_broken_rule_and_the_nearest_valid_setting():
    with pytest.raises(ConfigError) as e:
        config.load("configs/mainrun.yaml", MAINRUN_FIXED)  # n_head 8, context 128
    assert str(e.value).splitlines() == [
        "attention.vertsize*num_verts=64*16=1024 exceeds the 1 block per chunk (local_attn_ctx/blocksize=32/32; "
        "vertsize counts blocks, not tokens): use vertsize*num_verts <= 1, or a smaller blocksize",
        "attention.num_verts=16 must divide model.n_head=8 (each summary-column set gets the same number of heads): "
        "use one of 1, 2, 4, 8",
        "nearest valid setting: attention.local_attn_ctx=32 attention.blocksize=4 attention.vertsize=1 "
        "attention.num_verts=8",
    ]
    nearest = str(e.value).splitlines()[-1].removeprefix("nearest valid setting: ").split()
    cfg_ok = config.load("configs/mainrun.yaml", MAINRUN_FIXED + nearest)  # later overrides win: it validates
    assert (
        build_pattern(cfg_ok.attention, 0, 6, 8).params() == config.load("configs/mainrun-fixed.yaml").attention.params
    )


def test_fixed_with_one_broken_rule_is_one_line():
    with pytest.raises(ConfigError) as e:
        cfg("attention.pattern=fixed", "attention.local_attn_ctx=48", "attention.blocksize=16")
    assert str(e.value) == (
        "attention.local_attn_ctx=48 must divide model.context=64 (the context is a whole number of chunks): "
        "use one of 1, 2, 4, 8, 16, 32, 64; nearest valid setting: attention.local_attn_ctx=64 attention.blocksize=16 "
        "attention.vertsize=1 attention.num_verts=1"
    )


@settings(max_examples=150, deadline=None)
@given(
    l=st.integers(1, 48),
    b=st.integers(1, 48),
    v=st.integers(1, 8),
    nv=st.integers(1, 12),
    n_head=st.sampled_from([1, 2, 3, 4, 6, 8, 12]),
    context=st.sampled_from([16, 24, 64, 96]),
)
def test_fixed_nearest_valid_setting_always_validates(l, b, v, nv, n_head, context):  # noqa: E741
    from attnlab.attention.patterns.base import LayerContext

    params = dict(local_attn_ctx=l, blocksize=b, vertsize=v, num_verts=nv)
    try:
        Fixed.create(params, LayerContext(0, 1, n_head, context))
    except ConfigError as e:
        lines = str(e).split("nearest valid setting: ")
        nearest = {kv.split("=")[0].removeprefix("attention."): int(kv.split("=")[1]) for kv in lines[-1].split()}
        Fixed.create(nearest, LayerContext(0, 1, n_head, context))  # the proposal breaks no rule
        broken = str(e).count("must divide") + str(e).count(" exceeds ")
        assert len(str(e).splitlines()) == (1 if broken == 1 else broken + 1)  # a line per rule, one for the fix
    else:
        assert l % b == 0 and v * nv <= l // b and n_head % nv == 0 and context % l == 0


def test_block_layout_file_is_checked(tmp_path):
    good = tmp_path / "layout.npy"
    np.save(good, np.tril(np.ones((4, 4), dtype=bool)))
    c = cfg("attention.pattern=block_layout", f"attention.layout={good}", "attention.layout_block=16")
    p = build_pattern(c.attention, 0, 4, 4)
    assert p.params()["shape"] == [1, 4, 4] and len(p.params()["sha256"]) == 64
    with pytest.raises(ConfigError, match="covers 4 blocks x layout_block=8 = 32 tokens, less than model.context=64"):
        cfg("attention.pattern=block_layout", f"attention.layout={good}", "attention.layout_block=8")
    np.save(tmp_path / "three.npy", np.ones((3, 4, 4), dtype=bool))
    with pytest.raises(ConfigError, match=r"shape \(3, 4, 4\): use \[nb, nb\] or \[4, nb, nb\]"):
        cfg("attention.pattern=block_layout", f"attention.layout={tmp_path / 'three.npy'}", "attention.layout_block=16")
    np.save(tmp_path / "values.npy", np.full((4, 4), 2))
    with pytest.raises(ConfigError, match="values other than 0/1"):
        cfg(
            "attention.pattern=block_layout", f"attention.layout={tmp_path / 'values.npy'}", "attention.layout_block=16"
        )
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="not a plain .npy array"):  # never unpickles
        cfg(
            "attention.pattern=block_layout",
            f"attention.layout={tmp_path / 'pickled.npy'}",
            "attention.layout_block=16",
        )
    per_head = np.stack([np.eye(4, dtype=bool), np.tril(np.ones((4, 4), dtype=bool))] * 2)
    np.save(tmp_path / "heads.npy", per_head)
    c = cfg("attention.pattern=block_layout", f"attention.layout={tmp_path / 'heads.npy'}", "attention.layout_block=16")
    p = build_pattern(c.attention, 0, 4, 4)
    assert [g.heads for g in p.head_groups(4)] == [(0, 2), (1, 3)]
    assert keys(p, 40, head=0) == list(range(32, 41)) and keys(p, 40, head=1) == list(range(41))
