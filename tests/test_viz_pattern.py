"""`attnlab viz pattern`: pictures and saved masks of attention patterns.

The ASCII pictures below are worked out by hand from the definitions in
DESIGN.md (i = query row, j = key column, always j <= i), not by running the code.
"""

import numpy as np
import pytest

from attnlab.attention.patterns import Dense
from attnlab.cli import main
from attnlab.errors import ConfigError
from attnlab.eval.inspection.pattern_viz import ascii_pattern, draw_pattern, head_mask, pattern_from_overrides

# fixed, l=4, b=1, v=1, n_v=1: the same chunk of 4 (floor(j/4) == floor(i/4)) or j mod 4 == 3 (the summary column).
FIXED_16 = """\
x...............
xx..............
xxx.............
xxxx............
...xx...........
...xxx..........
...xxxx.........
...xxxxx........
...x...xx.......
...x...xxx......
...x...xxxx.....
...x...xxxxx....
...x...x...xx...
...x...x...xxx..
...x...x...xxxx.
...x...x...xxxxx"""

# strided, l=4, stride part (Child et al. A(2)): (i - j) mod 4 == 0.
STRIDE_16 = """\
x...............
.x..............
..x.............
...x............
x...x...........
.x...x..........
..x...x.........
...x...x........
x...x...x.......
.x...x...x......
..x...x...x.....
...x...x...x....
x...x...x...x...
.x...x...x...x..
..x...x...x...x.
...x...x...x...x"""

# strided, l=4, local part: i - j < 4.
LOCAL_16 = """\
x...............
xx..............
xxx.............
xxxx............
.xxxx...........
..xxxx..........
...xxxx.........
....xxxx........
.....xxxx.......
......xxxx......
.......xxxx.....
........xxxx....
.........xxxx...
..........xxxx..
...........xxxx.
............xxxx"""

# strided union, l=4: i - j < 4 or (i - j) mod 4 == 0.
UNION_16 = """\
x...............
xx..............
xxx.............
xxxx............
xxxxx...........
.xxxxx..........
..xxxxx.........
...xxxxx........
x...xxxxx.......
.x...xxxxx......
..x...xxxxx.....
...x...xxxxx....
x...x...xxxxx...
.x...x...xxxxx..
..x...x...xxxxx.
...x...x...xxxxx"""

FIXED = [
    "attention.pattern=fixed",
    "attention.local_attn_ctx=4",
    "attention.blocksize=1",
    "attention.vertsize=1",
    "attention.num_verts=1",
]


def strided(mode):
    return ["attention.pattern=strided", "attention.local_attn_ctx=4", f"attention.strided_mode={mode}"]


def test_fixed_picture():
    assert ascii_pattern(pattern_from_overrides(FIXED, n_head=1), 16) == FIXED_16


def test_strided_interleave_pictures():
    # interleave: even layers take the local part, odd layers the stride part
    assert ascii_pattern(pattern_from_overrides(strided("interleave"), 1, layer=1, n_layer=2), 16) == STRIDE_16
    assert ascii_pattern(pattern_from_overrides(strided("interleave"), 1, layer=0, n_layer=2), 16) == LOCAL_16


def test_strided_union_and_split_pictures():
    assert ascii_pattern(pattern_from_overrides(strided("union"), 2), 16) == UNION_16
    split = pattern_from_overrides(strided("split"), 2)  # head 0 local, head 1 stride
    assert ascii_pattern(split, 16, head=0) == LOCAL_16
    assert ascii_pattern(split, 16, head=1) == STRIDE_16


def test_overrides_as_dict_and_prefix_check():
    p = pattern_from_overrides({"attention.pattern": "local", "attention.window": 3}, 2)
    assert ascii_pattern(p, 4) == "x...\nxx..\nxxx.\n.xxx"
    with pytest.raises(ConfigError, match="only attention"):
        pattern_from_overrides(["model.n_head=3"], 2)
    with pytest.raises(ConfigError, match="--layer"):
        pattern_from_overrides([], 2, layer=2, n_layer=2)


def test_pooled_mask_is_any_over_cells():
    p = pattern_from_overrides(strided("union"), 2)
    full = p.dense_mask(10, 2)[0].numpy()
    padded = np.zeros((12, 12), dtype=bool)
    padded[:10, :10] = full
    np.testing.assert_array_equal(head_mask(p, 10, 0, pool=3), padded.reshape(4, 3, 4, 3).any(axis=(1, 3)))


@pytest.mark.parametrize(
    "overrides, heads, panels",
    [
        ([], 4, 1),  # dense: one group
        (strided("split"), 4, 2),  # local heads, stride heads
        (
            ["attention.pattern=fixed", "attention.local_attn_ctx=8", "attention.blocksize=2", "attention.num_verts=2"],
            4,
            2,
        ),
        (strided("union"), 3, 1),
    ],
)
def test_one_panel_per_head_group(tmp_path, overrides, heads, panels):
    p = pattern_from_overrides(overrides, heads)
    assert len(p.head_groups(heads)) == panels
    fig = draw_pattern(p, 32, heads, tmp_path / "m.png")
    assert len(fig.axes) == panels
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_png_and_mask(tmp_path, capsys):
    import matplotlib.image

    out, mask = tmp_path / "pics" / "mask.png", tmp_path / "mask.npy"
    rc = main(
        [
            "viz",
            "pattern",
            "--seq-len",
            "48",
            "--heads",
            "4",
            *strided("split"),
            "--out",
            str(out),
            "--save-mask",
            str(mask),
        ]
    )
    assert rc == 0
    img = matplotlib.image.imread(out)  # a readable image
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    saved = np.load(mask)
    assert saved.dtype == bool and saved.shape == (4, 48, 48)
    expected = pattern_from_overrides(strided("split"), 4).dense_mask(48, 4).numpy()
    np.testing.assert_array_equal(saved, expected)
    assert '"panels": 2' in capsys.readouterr().out


def test_cli_mask_of_fixed_with_layers(tmp_path):
    mask = tmp_path / "m.npy"
    args = ["attention.pattern=fixed", "attention.local_attn_ctx=8", "attention.blocksize=2", "attention.num_verts=2"]
    assert (
        main(
            [
                "viz",
                "pattern",
                "--seq-len",
                "40",
                "--heads",
                "2",
                *args,
                "--layer",
                "1",
                "--layers",
                "3",
                "--out",
                str(tmp_path / "m.png"),
                "--save-mask",
                str(mask),
            ]
        )
        == 0
    )
    p = pattern_from_overrides(args, 2, layer=1, n_layer=3)
    np.testing.assert_array_equal(np.load(mask), p.dense_mask(40, 2).numpy())


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnlab: error: "), err
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["model.n_head=8"], "only attention.* overrides"),
        (["attention.windw=8"], "did you mean attention.window"),
        (["attention.pattern=nope"], "attention.pattern"),
        (["--seq-len", "100000"], "--seq-len 100000"),
        (["--layer", "3"], "--layer 3"),
        (["attention.pattern=strided", "--heads", "3"], "odd"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    argv = ["viz", "pattern", "--seq-len", "16", *args, "--out", str(tmp_path / "x.png")]
    if "--seq-len" in args:
        argv = ["viz", "pattern", *args, "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "x.png").exists()


def test_unknown_picture_format(tmp_path, capsys):
    assert main(["viz", "pattern", "--seq-len", "8", "--out", str(tmp_path / "x.nope")]) == 2
    one_line_error(capsys, "x.nope")


def test_draw_pattern_refuses_huge(tmp_path):
    with pytest.raises(ConfigError, match="8192"):
        draw_pattern(Dense(), 8193, 1, tmp_path / "x.png")


def test_overrides_from_a_loaded_attention_config():
    """vars(AttentionConfig) keeps pattern parameters in `params`: they count as flat attention.* keys."""
    from attnlab import config

    a = config.load(None, ["attention.pattern=local", "attention.window=4", "train.max_steps=1"]).attention
    p = pattern_from_overrides({f"attention.{k}": v for k, v in vars(a).items()}, 2)
    assert p.name == "local" and p.params()["window"] == 4
