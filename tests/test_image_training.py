"""Images end to end: whole-image batches from a start token, bits/dim over every image, data embeddings."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab import config
from attnlab.config import AttentionConfig, ModelConfig
from attnlab.data.batches import ImageBatches
from attnlab.errors import ConfigError
from attnlab.eval.metrics.scoring import image_metrics, score_images
from attnlab.model.embeddings import ImageEmbedding, image_coordinates
from attnlab.model.gpt import GPT
from attnlab.training.trainer import train
from runkit import digits_config

SOS = 256


def test_image_batches_are_whole_images_after_a_start_token_each_once_per_epoch():
    n_img, N = 10, 6
    tokens = np.arange(n_img * N, dtype=np.uint16) % 256
    batches = ImageBatches(tokens, batch_size=3, tokens_per_image=N, seed=0, sos=SOS)
    assert batches.steps_per_epoch == 3  # the last incomplete batch is dropped
    seen = []
    for _ in range(3):
        x, y = batches.next_batch()
        assert (x[:, 0] == SOS).all() and torch.equal(x[:, 1:], y[:, :-1])
        assert ((y[:, 0] % N) == 0).all() and torch.equal(
            y - y[:, :1], torch.arange(N).expand(3, N)
        )  # one image per row
        seen += (y[:, 0] // N).tolist()
    assert len(set(seen)) == 9 and batches.epoch == 1
    state = batches.state_dict()
    again = ImageBatches(tokens, batch_size=3, tokens_per_image=N, seed=0, sos=SOS)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), batches.next_batch()))


def tiny_image_model(position="image", shape=(2, 3, 2)):
    torch.manual_seed(0)
    n = math.prod(shape)
    return GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, context=n, position=position, image_shape=list(shape)),
        AttentionConfig(),
        257,
    ).eval()


def test_bits_per_dim_covers_every_image_once_whatever_the_batch_size():
    model, N = tiny_image_model(), 12
    tokens = np.random.default_rng(0).integers(0, 256, 7 * N).astype(np.uint16)
    scores = [score_images(model, tokens, tokens_per_image=N, sos=SOS, batch_size=b) for b in (1, 3, 7, 64)]
    assert {s.tokens for s in scores} == {7 * N}
    assert max(s.nll_nats for s in scores) - min(s.nll_nats for s in scores) < 1e-9 * scores[0].nll_nats
    # by hand: each image alone, from SOS
    with torch.no_grad():
        y = torch.from_numpy(tokens.astype(np.int64)).view(7, N)
        x = torch.cat([torch.full((7, 1), SOS), y[:, :-1]], 1)
        want = F.cross_entropy(model(x).transpose(1, 2), y, reduction="sum").item()
    assert scores[0].nll_nats == pytest.approx(want, rel=1e-6)
    m = image_metrics(scores[0], N)
    assert m["bits_per_dim"] == pytest.approx(want / (math.log(2) * 7 * N)) and m["images"] == 7
    assert m["nats_per_image"] == pytest.approx(want / 7)


def test_each_row_column_and_channel_has_its_own_embedding():
    emb = ImageEmbedding([2, 3, 2], 8, context=12)
    p = torch.arange(24)
    row, col, ch = image_coordinates(p, 2, 3, 2)
    assert (
        len(set(zip(row[:12].tolist(), col[:12].tolist(), ch[:12].tolist()))) == 12
    )  # every byte of an image distinct
    assert (row[12:] == row[:12]).all()  # the next image starts again at row 0
    assert (
        row.tolist()[:12] == [0] * 6 + [1] * 6
        and ch.tolist()[:4] == [0, 1, 0, 1]
        and col.tolist()[:6] == [0, 0, 1, 1, 2, 2]
    )
    with torch.no_grad():
        out = emb(12)
        assert torch.allclose(out[7], emb.row.weight[1] + emb.col.weight[0] + emb.channel.weight[1])
        assert torch.allclose(emb(1, offset=7), out[7:8])


@torch.no_grad()
def test_permuting_pixels_changes_the_output_only_with_data_embeddings():
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    swapped = x.clone()
    swapped[0, [2, 3, 4, 5]] = x[0, [4, 5, 2, 3]]  # exchange pixels 1 and 2 (both channels)
    for position, changes in (("none", False), ("image", True), ("image+learned", True)):
        model = tiny_image_model(position)
        a, b = model(x)[0, -1], model(swapped)[0, -1]
        assert (not torch.allclose(a, b, atol=1e-6)) == changes, position


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cfg = digits_config(
        root,
        "data.max_test=50",
        "model.d_model=32",
        "train.batch_size=16",
        "train.max_steps=6",
        "train.eval_every=3",
        "logging.sample_images=4",
    )
    return train(cfg), root / "runs" / "digits"


def test_training_on_images_reports_bits_per_dim_and_writes_sample_grids(digits_run):
    summary, run_dir = digits_run
    assert 0 < summary["val_bits_per_dim"] < 9 and summary["val_images_scored"] == 162
    assert 0 < summary["test_bits_per_dim"] < 9 and summary["test_images_scored"] == 50  # data.max_test of 180
    assert "val_bits_per_byte" not in summary
    assert config.load(run_dir / "config.yaml").model.image_shape == []  # the config as given, never changed
    evals = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    built = next(e for e in evals if e.get("event") == "model_configured")
    assert built["model"]["image_shape"] == [8, 8, 1]  # the model takes it from the dataset
    partial = [e for e in evals if e.get("event") == "validation_step" and not e.get("final")]
    assert [e["partial"] for e in partial] == [True, True] and all(e["val_images"] == 10 for e in partial)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert (run_dir / "plots" / "curves.png").stat().st_size > 1000  # the bits/dim curve


def test_image_context_must_be_one_image(digits_run, tmp_path):
    _, run_dir = digits_run
    cfg = config.load(run_dir / "config.yaml", [f"out_dir={tmp_path}", "model.context=32", "model.image_shape=[]"])
    with pytest.raises(ConfigError, match="model.context=32 must equal the bytes of one image .8x8x1 = 64."):
        train(cfg)


def test_cli_eval_and_sample_on_an_image_run(digits_run, tmp_path, capsys):
    from PIL import Image

    from attnlab.cli import main

    summary, run_dir = digits_run
    results = []
    for batch in ("7", "64"):
        assert main(["eval", str(run_dir), "--split", "test", "--batch-size", batch]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["test_bits_per_dim"] == results[1]["test_bits_per_dim"] == summary["test_bits_per_dim"]
    assert main(["sample", str(run_dir), "--images", "5", "--out", str(tmp_path / "g.png"), "--seed", "1"]) == 0
    assert Image.open(tmp_path / "g.png").size == (
        3 * (8 * 8 + 1) + 1,
        2 * (8 * 8 + 1) + 1,
    )  # 3 columns, scale 8, pad 1
    assert main(["sample", str(run_dir), "--complete", "3", "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size[1] == 3 * (8 * 8 + 1) + 1  # one row per image
    assert main(["sample", str(run_dir), "--prompt", "x"]) == 2
    assert "an image run samples pictures" in capsys.readouterr().err
