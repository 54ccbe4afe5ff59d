"""Non-finite numbers: never written into a checkpoint, refused at eval/sample, never NaN/Infinity in JSON."""

import json
import math

import pytest
import safetensors.torch
import torch

from attnlab.errors import CheckpointError, TrainingDiverged
from attnlab.files import file_sha256
from attnlab.training import checkpoint as ckpt
from attnlab.training import trainer as trainer_mod
from attnlab.training.logs import read_events
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus
from safetykit import cli, listing, one_line
from tiny_models import TinyGPT

pytestmark = pytest.mark.usefixtures("one_thread")


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (which Python's json writes by default)."""

    def refuse(name):
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", n_docs=120)


def cfg_for(tmp_path, corpus, *overrides, name="t"):
    return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "model.n_layer=1", *overrides, name=name)


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_a_checkpoint_with_non_finite_numbers_is_never_written(tmp_path, where):
    model = TinyGPT()
    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}}
    if where == "weights":
        with torch.no_grad():
            model.blocks[1].mlp.weight[0, 0] = math.inf
    else:
        state["optimizer"]["state"][0]["exp_avg"][1] = math.nan
    ckpt.save_checkpoint(tmp_path, 1, TinyGPT(), {"step": 1})
    with pytest.raises(CheckpointError, match="blocks.1.mlp.weight" if where == "weights" else r"optimizer.*exp_avg"):
        ckpt.save_checkpoint(tmp_path, 3, model, state)
    assert listing(tmp_path / "checkpoints") == ["step_00000001"] + [
        f"step_00000001/{n}" for n in ("COMPLETE", "model.safetensors", "state.pt")
    ]


def test_training_whose_weights_overflow_stops_and_keeps_a_finite_checkpoint(tmp_path, corpus, monkeypatch):
    real = trainer_mod.Trainer.train_step

    def overflow(self):
        loss = real(self)
        if self.progress.step == 3:  # the 4th step leaves an infinite weight (its loss was still finite)
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = math.inf
        return loss

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", overflow)
    with pytest.raises(TrainingDiverged, match=r"not finite at step 4 .*tok_emb.weight.*step_0*2"):
        train(cfg_for(tmp_path, corpus, "train.checkpoint_every=2"))
    run = tmp_path / "runs" / "t"
    assert ckpt.latest_checkpoint(run).name == "step_00000002"
    weights, _ = ckpt.load_checkpoint(run)
    assert all(torch.isfinite(w).all() for w in weights.values())
    for line in (run / "events.jsonl").read_text().splitlines():
        strict_json(line)


def rewrite_weights(path, change) -> None:
    """Edit a checkpoint's weights in place and re-sign COMPLETE (what a damaged or foreign checkpoint looks like)."""
    with safetensors.safe_open(str(path / ckpt.WEIGHTS), framework="pt") as f:
        weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(weights)
    safetensors.torch.save_file(weights, str(path / ckpt.WEIGHTS), metadata=metadata)
    marker = json.loads((path / ckpt.MARKER).read_text())
    marker["files"][ckpt.WEIGHTS] = {
        "bytes": (path / ckpt.WEIGHTS).stat().st_size,
        "sha256": file_sha256(path / ckpt.WEIGHTS),
    }
    (path / ckpt.MARKER).write_text(json.dumps(marker))


@pytest.fixture
def trained(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    return tmp_path / "runs" / "t"


def test_eval_and_sample_refuse_non_finite_weights(trained, capsys):
    def poison(w):
        w[sorted(w)[0]].view(-1)[0] = math.nan

    rewrite_weights(ckpt.latest_checkpoint(trained), poison)
    for cmd in (["eval", trained], ["sample", trained, "--max-new-tokens", "3"]):
        rc, out, err = cli(capsys, *cmd)
        assert rc == CheckpointError.exit_code
        one_line(err, "not finite", "earlier checkpoint")
        assert out == ""


def test_eval_of_overflowing_weights_is_refused_not_printed_as_nan(trained, capsys):
    def blow_up(w):
        for t in w.values():
            t.mul_(1e30)

    rewrite_weights(ckpt.latest_checkpoint(trained), blow_up)
    rc, out, err = cli(capsys, "eval", trained)
    assert rc == CheckpointError.exit_code
    one_line(err.replace("\r", "\n").strip().splitlines()[-1], "loss is not finite", "earlier checkpoint")
    assert "NaN" not in out and "Infinity" not in out


def test_summary_and_events_never_hold_nan(tmp_path, corpus):
    s = train(cfg_for(tmp_path, corpus, "train.max_steps=1000", "train.time_budget_s=0"))
    assert s["steps"] == 0
    run = tmp_path / "runs" / "t"
    summary = strict_json((run / "summary.json").read_text())
    assert summary["final_train_loss"] is None and "final_train_loss" in summary["null_reasons"]
    for line in (run / "events.jsonl").read_text().splitlines():
        strict_json(line)


def test_diverged_loss_is_null_with_a_reason_in_events(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", lambda self: math.nan)
    with pytest.raises(TrainingDiverged):
        train(cfg_for(tmp_path, corpus))
    (event,) = read_events(tmp_path / "runs" / "t", "training_diverged")
    assert event["loss"] is None and event["null_reasons"] == {"loss": "nan"}
    for line in (tmp_path / "runs" / "t" / "events.jsonl").read_text().splitlines():
        strict_json(line)
