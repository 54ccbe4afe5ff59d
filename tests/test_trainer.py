"""Training runs: resume equivalence, run-directory safety, divergence, summaries."""

import json
import math

import pytest
import torch

from attnlab import config
from attnlab.errors import CheckpointError, DataError, TrainingDiverged
from attnlab.training import checkpoint as ckpt
from attnlab.training import trainer as trainer_mod
from attnlab.training.logs import read_events
from attnlab.training.trainer import train
from runkit import crash_after_step, tiny_config, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def cfg_for(tmp_path, corpus, *overrides, name="t"):
    return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *overrides, name=name)


def losses(run_dir):
    return {e["step"]: e["loss"] for e in read_events(run_dir, "training_step")}


def weights(run_dir):
    w, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    return w


def test_summary_has_honest_metrics(tmp_path, corpus):
    s = train(cfg_for(tmp_path, corpus, "train.eval_every=4"))
    run = tmp_path / "runs" / "t"
    for key in (
        "val_bits_per_byte",
        "val_nats_per_token",
        "val_perplexity",
        "mainrun_val_loss",
        "tokens_per_second",
        "peak_memory_mb",
        "params",
        "steps",
        "wall_seconds",
    ):
        assert key in s
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert s["val_tokens_scored"] == meta["splits"]["val"]["tokens"] - 1  # every val target, once
    assert s["steps"] == 8 and json.loads((run / "summary.json").read_text()) == s
    names = {e["event"] for e in read_events(run)}
    assert {
        "hyperparameters_configured",
        "device_info",
        "dataset_info",
        "model_configured",
        "model_info",
        "training_step",
        "validation_step",
        "checkpoint_saved",
    } <= names
    assert config.load(run / "config.yaml") == cfg_for(tmp_path, corpus, "train.eval_every=4")


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, corpus, monkeypatch):
    # samples written at each eval use their own generator: they must not disturb the training streams
    common = [
        "train.max_steps=10",
        "train.checkpoint_every=4",
        "train.grad_accum=2",
        "train.eval_every=5",
        "logging.sample_tokens=20",
    ]
    full = train(cfg_for(tmp_path, corpus, *common, name="full"))

    # dies in the middle of step 7, after the step-4 checkpoint
    crash_after_step(monkeypatch, 6, lambda: train(cfg_for(tmp_path, corpus, *common, name="crash")))
    resumed = train(resume=tmp_path / "runs" / "crash")

    a, b = tmp_path / "runs" / "full", tmp_path / "runs" / "crash"
    assert losses(a) == losses(b)  # steps 5..10 were recomputed after the resume and match exactly
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["val_bits_per_byte"] == full["val_bits_per_byte"]
    samples = sorted((a / "samples").iterdir())
    assert [f.name for f in samples] == ["step-0000005.txt", "step-0000010.txt"]
    assert [f.read_text() for f in samples] == [(b / "samples" / f.name).read_text() for f in samples]


def test_run_directory_is_never_reused(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    before = (tmp_path / "runs" / "t" / "summary.json").read_text()
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        train(cfg_for(tmp_path, corpus, "train.max_steps=3"))
    assert (tmp_path / "runs" / "t" / "summary.json").read_text() == before
    assert train(cfg_for(tmp_path, corpus, "train.max_steps=3"), force=True)["steps"] == 3


def test_resume_with_changed_config_is_refused(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"changed config \(model.n_layer: 2 -> 3\)"):
        train(cfg_for(tmp_path, corpus, "train.max_steps=2", "model.n_layer=3"), resume=tmp_path / "runs" / "t")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, corpus, monkeypatch):
    real_step = trainer_mod.Trainer.train_step

    def exploding(self):
        loss = real_step(self)
        return math.nan if self.progress.step >= 4 else loss

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", exploding)
    with pytest.raises(
        TrainingDiverged, match=r"loss became nan at step 5 \(kept the last good checkpoint .*step_0*3\)"
    ):
        train(cfg_for(tmp_path, corpus, "train.checkpoint_every=3"))
    run = tmp_path / "runs" / "t"
    assert ckpt.latest_checkpoint(run).name.endswith("3")
    weights(run)  # still loads


def test_data_config_mismatch_is_explained(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1"))
    with pytest.raises(DataError, match="prepared with data.val_frac=0.1"):
        train(cfg_for(tmp_path, corpus, "train.max_steps=1", "data.val_frac=0.2", name="other"))


def test_epochs_and_time_budget_stop(tmp_path, corpus):
    s = train(cfg_for(tmp_path, corpus, "train.max_steps=none", "train.epochs=1"))
    assert s["stop_reason"] == "epochs" and 1.0 <= s["epochs"] < 1.5
    s = train(cfg_for(tmp_path, corpus, "train.max_steps=1000", "train.time_budget_s=0", name="tb"))
    assert s["stop_reason"] == "time_budget" and s["steps"] == 0


def test_early_stopping(tmp_path, corpus):
    s = train(
        cfg_for(
            tmp_path,
            corpus,
            "train.max_steps=100",
            "optim.lr=0",
            "optim.warmup_steps=0",
            "train.eval_every=1",
            "train.early_stopping_patience=2",
        )
    )
    assert s["stop_reason"] == "early_stopping" and s["steps"] == 3


def test_cli_reports_divergence_in_one_line(tmp_path, corpus, monkeypatch, capsys):
    from attnlab import cli

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", lambda self: math.inf)
    cfg = cfg_for(tmp_path, corpus)
    overrides = [
        f"{k}={v}" for k, v in config.flatten(config.to_dict(cfg)).items() if v is not None and k != "data.categories"
    ]
    assert cli.main(["train", *overrides]) == TrainingDiverged.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("attnlab: error: loss became inf at step 1 (no checkpoint was saved yet)")
    assert "Traceback" not in "\n".join(err)


def test_tensorboard_logger_writes_scalars(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(cfg_for(tmp_path, corpus, "train.max_steps=3", "train.eval_every=3", "logging.tensorboard=true"))
    acc = EventAccumulator(str(tmp_path / "runs" / "t" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "training/loss" in tags and "validation/val_loss" in tags
    assert [e.step for e in acc.Scalars("training/loss")] == [1, 2, 3]


def test_missing_wandb_fails_before_the_run_directory_exists(tmp_path, corpus, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(config.ConfigError, match="pip install wandb"):
        train(cfg_for(tmp_path, corpus, "logging.wandb=offline"))
    assert not (tmp_path / "runs" / "t").exists()
