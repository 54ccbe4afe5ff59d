"""Logit lens: every layer's residual read out by the model's own final norm and unembedding."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.cli import main
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.data.text import ByteTokenizer
from attnlab.errors import UserError
from attnlab.eval.inspection.logit_lens import lens_rows, logit_lens, token_label, token_texts
from attnlab.model.gpt import GPT
from attnlab.training.trainer import train
from runkit import digits_config, tiny_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, CTX = 40, 12


def tiny_gpt(norm_position="pre", tie=True, seed=0, vocab=VOCAB, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=3, n_head=2, d_model=16, context=CTX, norm_position=norm_position, tie_weights=tie, **kw)
    model = GPT(cfg, AttentionConfig(), vocab)
    with (
        torch.no_grad()
    ):  # a trained-looking model: norms and biases away from their 1/0 init, so a wrong read-out shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


MODELS = [("pre", True), ("pre", False), ("post", True), ("post", False)]


@pytest.mark.parametrize("norm_position,tie", MODELS)
def test_last_layer_is_the_models_own_prediction(norm_position, tie):
    model = tiny_gpt(norm_position, tie).train()  # dropout is 0; the lens must still restore train mode
    idx = torch.randint(0, VOCAB, (CTX,), generator=torch.Generator().manual_seed(1))
    lens = logit_lens(model, idx)
    assert model.training and lens.log_probs.shape == (4, CTX, VOCAB)  # embed + 3 blocks
    assert (model.norm_f is None) == (norm_position == "post") and (model.lm_head.weight is model.tok_emb.weight) == tie
    with torch.no_grad():
        want = F.softmax(model.eval()(idx[None]), dim=-1)[0]
    torch.testing.assert_close(lens.probs[-1], want, atol=1e-5, rtol=0)
    assert not model._forward_hooks and not any(b._forward_hooks or b._forward_pre_hooks for b in model.blocks)


@pytest.mark.parametrize("norm_position,tie", MODELS)
def test_every_layer_is_the_read_out_of_residuals_computed_by_hand(norm_position, tie):
    model = tiny_gpt(norm_position, tie, seed=2).eval()
    idx = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    lens = logit_lens(model, idx)
    with torch.no_grad():
        x = model.tok_emb(idx[0]) + model.pos_emb(9, offset=0)  # learned positions: added to the embeddings
        residuals = [x]
        for block in model.blocks:
            x = block(x[None])[0]
            residuals.append(x)
        norm = model.norm_f or torch.nn.Identity()
        want = torch.stack([F.log_softmax(model.lm_head(norm(r)), dim=-1) for r in residuals])
    torch.testing.assert_close(lens.log_probs, want, atol=1e-5, rtol=0)
    # The layers differ (the lens is not just repeating one read-out).
    assert all((lens.log_probs[i] - lens.log_probs[i + 1]).abs().max() > 1e-3 for i in range(3))


def test_rotary_model_reads_the_token_embedding_at_layer_zero():
    model = tiny_gpt(position="rope").eval()
    idx = torch.arange(6) % VOCAB
    lens = logit_lens(model, idx)
    with torch.no_grad():
        want = F.log_softmax(model.lm_head(model.norm_f(model.tok_emb(idx))), dim=-1)
    torch.testing.assert_close(lens.log_probs[0], want, atol=1e-5, rtol=0)


BYTE_MODEL = tiny_gpt(vocab=256, seed=5).eval()


@settings(max_examples=15, deadline=None)
@given(ids=st.lists(st.integers(0, 255), min_size=1, max_size=CTX), k=st.integers(1, 6))
def test_table_p_next_is_the_softmax_probability_and_top1_the_argmax(ids, k):
    idx = torch.tensor(ids)
    lens = logit_lens(BYTE_MODEL, idx)
    rows = lens_rows(lens, ByteTokenizer(), k)
    assert len(rows) == len(ids) * 4
    probs = lens.probs
    for r in rows:
        t, layer = r["position"], r["layer"]
        assert r["input_id"] == ids[t]
        if t + 1 < len(ids):
            assert r["next_id"] == ids[t + 1]
            assert r["p_next"] == pytest.approx(probs[layer, t, ids[t + 1]].item(), abs=1e-6)
        else:
            assert r["next_id"] is None and r["p_next"] is None
        assert [i for i, _, _ in r["top"]][0] == probs[layer, t].argmax().item()
        ps = [p for _, _, p in r["top"]]
        assert len(ps) == k and ps == sorted(ps, reverse=True)
        assert ps == pytest.approx(probs[layer, t].topk(k).values.tolist(), abs=1e-6)


def test_bad_inputs_are_refused():
    lens = logit_lens(BYTE_MODEL, torch.tensor([1, 2]))
    with pytest.raises(UserError, match=r"--top-k 257 is outside \[1, 256\]"):
        lens_rows(lens, ByteTokenizer(), 257)
    with pytest.raises(UserError, match="one non-empty sequence"):
        logit_lens(BYTE_MODEL, torch.zeros(2, 3, dtype=torch.long))


def test_token_labels_are_visible_and_short():
    assert token_label(" the") == "␣the"
    assert token_label("a\nb\t") == "a\\nb\\t"
    assert token_label("abcdefghijk") == "abcdefg…" and len(token_label("x" * 50, 5)) == 5
    assert token_texts(ByteTokenizer(), [104, 0xE2, 0]) == [
        "h",
        "\\xe2",
        "<eos>",
    ]  # a lone UTF-8 lead byte, the separator


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lens")
    corpus = write_corpus(tmp / "corpus.txt", n_docs=120)
    cfg = tiny_config(corpus, tmp / "data", tmp / "runs", "train.max_steps=4", "model.context=16", "model.dropout=0")
    train(cfg)
    return tmp / "runs" / "t"


def lens_cli(capsys, *args):
    code = main(["viz", "logit-lens", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnlab: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_writes_picture_markdown_and_csv(text_run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "lens"
    code, stdout, err = lens_cli(capsys, text_run, "--text", "the model", "--out", out, "--top-k", 3)
    assert code == 0, err
    info = json.loads(stdout.strip())
    assert info["tokens"] == 9 and info["layers"] == 3 and info["top_k"] == 3  # 9 bytes; embed + 2 blocks
    assert {info[k] for k in ("png", "md", "csv")} == {str(out / f) for f in ("lens.png", "lens.md", "lens.csv")}
    w, h = Image.open(out / "lens.png").size
    assert w > h > 100
    with open(out / "lens.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 3 and rows[0]["input"] == "t" and rows[0]["next"] == "h" and rows[3]["input"] == "h"
    assert all(r["top1"] == ByteTokenizer().decode([int(r["top_id1"])]) for r in rows if int(r["top_id1"]) < 128)
    assert all(1 >= float(r["p_top1"]) >= float(r["p_top2"]) >= float(r["p_top3"]) > 0 for r in rows)
    last = [r for r in rows if r["position"] == "8"]
    assert len(last) == 3 and all(r["p_next"] == "" and r["next"] == "" for r in last)
    md = (out / "lens.md").read_text(encoding="utf-8").splitlines()
    assert md[0].startswith("# Logit lens: t @ step_") and "| top-3 (p) |" in md[4]
    assert sum(line.startswith("| block 2 |") for line in md) == 9
    assert any(line.startswith("| embed | 3 | `␣` | `m` |") for line in md)
    # The CSV agrees with the library call on the same checkpoint.
    from attnlab.run.open import load_run

    lens = logit_lens(load_run(text_run).model, torch.tensor(list(b"the model")))
    assert float(rows[-4]["p_next"]) == pytest.approx(lens.p_next()[-1, 7].item(), rel=1e-5)  # layer 2, position 7
    # An existing non-empty folder is refused unless --force.
    code, _, err = lens_cli(capsys, text_run, "--text", "the", "--out", out)
    one_line_error(code, err, "already exists and is not empty", "--force")
    code, stdout, err = lens_cli(capsys, text_run, "--text", "the", "--out", out, "--force")
    assert code == 0 and json.loads(stdout)["tokens"] == 3, err
    assert (out / "lens.md").read_text().count("| embed |") == 3


def test_cli_refuses_too_long_text_and_bad_top_k(text_run, tmp_path, capsys):
    code, _, err = lens_cli(capsys, text_run, "--text", "x" * 17, "--out", tmp_path / "a")
    one_line_error(
        code, err, "--text is 17 tokens, longer than the model's context of 16", "shorten it to at most 16 tokens"
    )
    code, _, err = lens_cli(capsys, text_run, "--text", "", "--out", tmp_path / "a")
    one_line_error(code, err, "--text is empty")
    code, _, err = lens_cli(capsys, text_run, "--text", "ab", "--out", tmp_path / "a", "--top-k", 0)
    one_line_error(code, err, "--top-k 0 must be >= 1")
    assert not (tmp_path / "a").exists()


def test_cli_refuses_image_runs(tmp_path, capsys):
    cfg = digits_config(tmp_path, "model.n_head=1", "model.d_model=8", "train.max_steps=1")
    train(cfg)
    code, _, err = lens_cli(capsys, tmp_path / "runs" / "digits", "--text", "ab", "--out", tmp_path / "a")
    one_line_error(code, err, "is an image run: the logit lens is for text runs")
    assert not (tmp_path / "a").exists()
