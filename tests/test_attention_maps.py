"""Attention maps: captured weights through the reference path, for every pattern; `attnlab viz attention`."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.attention.backends import reference, reference_weights
from attnlab.attention.patterns import Dense, Local
from attnlab.cli import main
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.data.image_format import SOS
from attnlab.errors import UserError
from attnlab.eval.inspection.attention_maps import (
    capture_attention,
    image_query_map,
    model_weights,
    parse_pixel,
    parse_selection,
    pixel_query,
)
from attnlab.model.gpt import GPT
from attnlab.run.open import load_run
from attnlab.training.trainer import train
from runkit import digits_config, tiny_config, write_corpus
from zoo import PLUGINS, ZOO

T = 16
PATTERNS = {label: {**spec, "plugins": PLUGINS} for label, spec in ZOO.items()}  # every zoo pattern, sparse at T=16


def attn_config(kind: str, tmp_path, **params) -> AttentionConfig:
    params = {**PATTERNS[kind], **params}
    pattern = params.pop("pattern", kind)
    if pattern == "block_layout":
        layout = np.tril(np.random.default_rng(0).random((4, 4)) < 0.6) | np.eye(4, dtype=bool)
        np.save(tmp_path / "layout.npy", layout)
        params["layout"] = str(tmp_path / "layout.npy")
    return AttentionConfig(pattern=pattern, **params)


def tiny_model(attn: AttentionConfig, context: int = T, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=4, d_model=32, context=context, dropout=0.0), attn, 40).eval()
    model.resolve_backends("cpu")
    return model


def check_capture(model: GPT, x: torch.Tensor, **capture_kw) -> dict:
    """Logits unchanged by the capture; weights sum to 1 over the allowed keys and are exactly 0 elsewhere."""
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model, **capture_kw) as captured:
            through_reference = model(x)
    torch.testing.assert_close(through_reference, plain, atol=1e-5, rtol=0)
    n = x.shape[1]
    for layer, w in captured.items():
        pattern = model.blocks[layer].attn.core.pattern
        allowed = pattern.dense_mask(n, w.shape[1])  # linear: its dense mask is the causal one
        if pattern.mechanism == "linear":
            assert torch.equal(allowed, torch.ones(n, n, dtype=torch.bool).tril().expand_as(allowed))
        assert w.shape == (x.shape[0], w.shape[1], n, n) and w.dtype == torch.float32
        assert (w.masked_select(~allowed.expand_as(w)) == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)
        assert (w >= 0).all()
    return captured


@pytest.mark.parametrize("kind", list(PATTERNS))
def test_every_pattern_captures_normalised_masked_weights_and_unchanged_logits(kind, tmp_path, one_thread):
    model = tiny_model(attn_config(kind, tmp_path))
    x = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(1))
    captured = check_capture(model, x)
    assert sorted(captured) == [0, 1]


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(["local", "strided_split", "strided_union", "fixed_v2", "sink_window"]),
    size=st.integers(1, 5),
    ctx_pow=st.integers(2, 5),
    seed=st.integers(0, 99),
)
def test_random_parameters_and_lengths(kind, size, ctx_pow, seed, tmp_path_factory):
    context = 2**ctx_pow  # 4..32; strided/fixed strides must divide it
    l = 2 ** min(ctx_pow, 1 + size % 3)
    params = {
        "local": {"window": size},
        "strided_split": {"local_attn_ctx": l},
        "strided_union": {"local_attn_ctx": l},
        "fixed_v2": {"local_attn_ctx": max(l, 2), "blocksize": 1},
        "sink_window": {"sinks": size % 3, "window": size},
    }[kind]
    model = tiny_model(attn_config(kind, tmp_path_factory.getbasetemp(), **params), context=context, seed=seed)
    n = 1 + seed % context  # any length up to the context
    check_capture(model, torch.randint(0, 40, (1, n), generator=torch.Generator().manual_seed(seed)))


def test_chunked_rows_and_kept_layers_give_the_same_weights(tmp_path):
    model = tiny_model(attn_config("sink_window", tmp_path))
    x = torch.randint(0, 40, (2, T), generator=torch.Generator().manual_seed(2))
    whole = check_capture(model, x)
    seen = []
    chunked = check_capture(
        model,
        x,
        keep=[1],
        on_layer=lambda la: seen.append((la.layer, la.q_start, la.first_chunk)),
        chunk_elements=2 * 4 * T * 5,
    )  # 5 query rows at a time
    assert list(chunked) == [1]
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-6, rtol=0)  # matmuls of other shapes round differently
    assert seen == [(layer, s, s == 0) for layer in (0, 1) for s in (0, 5, 10, 15)]


def test_reference_uses_reference_weights():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    w = reference_weights(q, k, Local(2))
    torch.testing.assert_close(reference(q, k, v, Local(2)), w @ v)
    # rows for any query range: the queries 3..4 of 6 positions
    torch.testing.assert_close(reference_weights(q[:, :, 3:5], k, Local(2), q_start=3), w[:, :, 3:5])
    torch.testing.assert_close(reference_weights(q[:, :, -2:], k, Dense()), reference_weights(q, k, Dense())[:, :, -2:])


# ------------------------------------------------------------------ images: the SOS offset


def test_image_keys_map_to_the_bytes_they_hold():
    shape = (3, 4, 2)
    n = 24
    for byte in (0, 5, 22):  # the last byte (23) is a target only, never an input
        row = np.zeros(n)
        row[1 + byte] = 1.0  # key position 1 + b holds byte b (key 0 is SOS)
        amap, sos = image_query_map(row, shape)
        r, c = divmod(byte // 2, 4)
        assert amap[r, c] == 1.0 and amap.sum() == 1.0 and sos == 0.0
    sos_row = np.zeros(n)
    sos_row[0] = 1.0
    assert image_query_map(sos_row, shape)[1] == 1.0
    assert pixel_query((1, 2, 1), shape) == (1 * 4 + 2) * 2 + 1  # the position that predicts this byte
    assert parse_pixel(None, shape) == (1, 2, 1)  # centre pixel, last channel


def test_a_local_image_model_attends_to_exactly_the_previous_window_of_bytes():
    shape, window = (3, 4, 2), 5
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, context=24, position="image", image_shape=list(shape)),
        AttentionConfig(pattern="local", window=window),
        257,
    ).eval()
    image = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.tensor([SOS]), image[:-1]])[None]
    w = model_weights(model, x, [0])[0][0].numpy()
    for pixel in [(0, 1, 0), (1, 2, 1), (2, 3, 1)]:
        b = pixel_query(pixel, shape)
        amap, sos = image_query_map(w[0, b], shape)
        seen_bytes = [p for p in range(b - window, b) if p >= 0]  # keys b-w+1..b hold bytes b-w..b-1 (and SOS)
        want = np.zeros(shape)
        want.reshape(-1)[seen_bytes] = 1
        assert ((amap > 0) == want.any(-1)).all(), pixel
        assert (sos > 0) == (b - window + 1 <= 0)
        assert amap.sum() + sos == pytest.approx(1.0, abs=1e-5)


def test_selections_are_checked():
    assert parse_selection(None, 3, "layers") == [0, 1, 2] and parse_selection("2,0", 3, "layers") == [0, 2]
    assert parse_selection("1-3", 4, "heads") == [1, 2, 3]
    with pytest.raises(UserError, match=r"--layers 5 is outside \[0, 3\) \(the model has 3 layers\)"):
        parse_selection("5", 3, "layers")
    with pytest.raises(UserError, match="is not a list of indices"):
        parse_selection("x", 3, "heads")
    with pytest.raises(UserError, match="outside the 3x4x2 image"):
        parse_pixel("3,0", (3, 4, 2))


# ------------------------------------------------------------------ the CLI on trained runs


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    corpus = write_corpus(root / "corpus.txt")
    cfg = tiny_config(
        corpus,
        root / "data",
        root / "runs",
        "attention.pattern=sink_window",
        "attention.sinks=1",
        "attention.window=8",
        "train.max_steps=2",
        "logging.attention_stats=0",
    )
    train(cfg)
    return root / "runs" / "t"


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out.strip().splitlines()[-1] if out.strip() else "", err.strip()


def test_viz_attention_on_text_writes_maps_and_the_captured_weights(text_run, tmp_path, capsys):
    text = "the model\nattends to it"
    code, line, _ = run_cli(
        ["viz", "attention", str(text_run), "--text", text, "--out", str(tmp_path / "maps")], capsys
    )
    assert code == 0
    info = json.loads(line)
    assert info["layers"] == [0, 1] and info["heads"] == [0, 1] and info["tokens"] == len(text.encode())
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "attention.json",
        "layer00.png",
        "layer01.png",
        "weights.npy",
    ]
    assert all((tmp_path / "maps" / f"layer0{i}.png").stat().st_size > 5000 for i in (0, 1))
    saved = np.load(tmp_path / "maps" / "weights.npy")
    run = load_run(text_run)
    ids = run.dataset.tokenizer.encode(text)
    direct = model_weights(run.model, torch.tensor([ids]), [0, 1])
    assert saved.shape == (2, 2, len(ids), len(ids))
    np.testing.assert_array_equal(saved, np.stack([direct[0][0].numpy(), direct[1][0].numpy()]))
    labels = json.loads((tmp_path / "maps" / "attention.json").read_text())["labels"]
    assert labels[:4] == ["t", "h", "e", "␣"] and "\\n" in labels

    code, line, _ = run_cli(
        [
            "viz",
            "attention",
            str(text_run),
            "--text",
            text,
            "--layers",
            "1",
            "--heads",
            "0",
            "--out",
            str(tmp_path / "one"),
        ],
        capsys,
    )
    assert code == 0 and json.loads(line)["shape"] == [1, 1, len(ids), len(ids)]
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "weights.npy")[0, 0], direct[1][0, 0].numpy())


def test_viz_attention_errors_are_one_line(text_run, tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["--image", "0"], "models text: use --text"),
        ([], "nothing to look at: pass --text"),
        (["--text", "the", "--layers", "2"], "--layers 2 is outside [0, 2) (the model has 2 layers)"),
        (["--text", "the", "--heads", "0,7"], "--heads 7 is outside [0, 2)"),
        (
            ["--text", "x" * 33],
            "--text is 33 tokens, longer than the model's context of 32: shorten it to at most 32 tokens",
        ),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["viz", "attention", str(text_run), "--out", out, *extra], capsys)
        assert code == 2 and err.startswith("attnlab: error: ") and message in err and len(err.splitlines()) == 1, (
            extra,
            err,
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = run_cli(
        ["viz", "attention", str(text_run), "--text", "the", "--out", str(tmp_path / "full")], capsys
    )
    assert code == 2 and "already exists and is not empty" in err and "--force" in err
    assert (
        run_cli(
            ["viz", "attention", str(text_run), "--text", "the", "--out", str(tmp_path / "full"), "--force"], capsys
        )[0]
        == 0
    )
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cfg = digits_config(root, "attention.pattern=local", "attention.window=12", "logging.attention_stats=2")
    train(cfg)
    return root / "runs" / "digits"


def test_viz_attention_on_an_image_overlays_the_query_pixel(digits_run, tmp_path, capsys):
    code, line, _ = run_cli(
        ["viz", "attention", str(digits_run), "--image", "3", "--pixel", "4,5", "--out", str(tmp_path / "img")], capsys
    )
    assert code == 0
    info = json.loads(line)
    assert (
        info["pixel"] == [4, 5, 0]
        and info["query"] == 4 * 8 + 5
        and info["image_shape"] == [8, 8, 1]
        and info["image"] == 3
    )
    assert info["shape"] == [1, 2, 64, 64]
    assert (tmp_path / "img" / "layer00.png").stat().st_size > 3000
    run = load_run(digits_run)
    y = run.dataset.tokens("val")[3 * 64 : 4 * 64].astype(np.int64)
    x = torch.cat([torch.tensor([SOS]), torch.from_numpy(y[:-1])])[None]  # as score_images reads it
    direct = model_weights(run.model, x, [0])[0][0].numpy()
    saved = np.load(tmp_path / "img" / "weights.npy")
    np.testing.assert_array_equal(saved[0], direct)
    amap, sos = image_query_map(saved[0, 0, info["query"]], (8, 8, 1))
    assert (amap > 0).sum() == 12 and sos == 0.0  # window 12: keys 25..36 hold bytes 24..35, no SOS

    for extra, message in [
        (["--text", "hi"], "models images: use --image K"),
        (["--image", "99999"], "--image 99999 is outside [0, "),
        (["--image", "0", "--pixel", "8,0"], "--pixel 8,0 is outside the 8x8x1 image"),
        (["--image", "0", "--split", "nope"], "--split 'nope' is not in"),
    ]:
        code, _, err = run_cli(["viz", "attention", str(digits_run), "--out", str(tmp_path / "e"), *extra], capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
