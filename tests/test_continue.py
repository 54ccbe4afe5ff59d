"""Continuing runs: extending the stopping rule on --resume, train.init_from, prepare --tokenizer-from."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from attnlab import cli
from attnlab import config as config_mod
from attnlab.data import store
from attnlab.errors import CheckpointError, ConfigError, DataError
from attnlab.files import file_sha256
from attnlab.run import identity
from attnlab.run.resume import check_resume_overrides
from attnlab.training import checkpoint as ckpt
from attnlab.training import trainer as trainer_mod
from attnlab.training.logs import read_events
from attnlab.training.optim import UNPLANNED, Continuation, lr_factor
from attnlab.training.trainer import Trainer, train
from runkit import crash_after_step, tiny_config, write_corpus

LR = 3e-3


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def cfg_for(tmp_path, corpus, *overrides, name="t", data="data"):
    return tiny_config(corpus, tmp_path / data, tmp_path / "runs", *overrides, name=name)


def lrs(run_dir) -> dict[int, float]:
    """The lr logged after each step (the lr of the next step), the last value logged for a step winning."""
    return {e["step"]: e["lr"] for e in read_events(run_dir, "training_step")}


# ------------------------------------------------------------------ extending a run


def test_extending_a_finished_wsd_run_follows_the_new_total(tmp_path, corpus):
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=6", "optim.schedule=wsd", "optim.decay_frac=0.5")
    run = tmp_path / "runs" / "t"
    assert train(cfg)["steps"] == 6
    summary = train(None, resume=run, extend=["train.max_steps=10"])
    assert summary["steps"] == 10 and summary["planned_steps"] == 10
    got = lrs(run)
    for step in range(7, 11):  # stable until the last half of the new total, then linear to min_lr_frac
        assert got[step] == pytest.approx(LR * lr_factor(step, cfg.optim, 10), rel=1e-9), step
    assert got[7] == pytest.approx(LR * (1 - 0.9 * (7 - 5) / 5))
    saved = config_mod.load(run / "config.yaml")
    assert saved.train.max_steps == 10
    identity.check_config_file(run)  # the rewritten config.yaml is the recorded one
    (event,) = read_events(run, "run_extended")
    assert event["old"] == {"train.max_steps": 6} and event["new"] == {"train.max_steps": 10}
    assert event["step"] == 6 and event["continuation"] is None


def test_extending_a_finished_cosine_run_stays_annealed(tmp_path, corpus):
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=6", "optim.schedule=cosine", "optim.min_lr_frac=0.2")
    run = tmp_path / "runs" / "t"
    train(cfg)
    train(None, resume=run, extend=["train.max_steps=9"])
    got = lrs(run)
    assert [got[s] for s in (7, 8, 9)] == pytest.approx([LR * 0.2] * 3)  # the factor reached was min_lr_frac
    (event,) = read_events(run, "run_extended")
    assert event["continuation"] == {"step": 6, "factor": pytest.approx(0.2), "start": pytest.approx(6 / 9)}


def test_extending_a_constant_schedule_stays_constant(tmp_path, corpus):
    run = tmp_path / "runs" / "t"
    train(cfg_for(tmp_path, corpus, "train.max_steps=4", "optim.schedule=constant"))
    train(None, resume=run, extend=["train.max_steps=7"])
    assert [lrs(run)[s] for s in (5, 6, 7)] == [LR] * 3


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_extending_mid_run_replans_from_the_current_factor(tmp_path, corpus, monkeypatch, schedule):
    opts = ("train.max_steps=8", f"optim.schedule={schedule}", "optim.min_lr_frac=0.1", "train.checkpoint_every=2")
    cfg = cfg_for(tmp_path, corpus, *opts)
    run = tmp_path / "runs" / "t"
    crash_after_step(monkeypatch, 4, lambda: train(cfg))
    f0 = lr_factor(4, cfg.optim, 8)
    assert train(None, resume=run, extend=["train.max_steps=12"])["steps"] == 12
    after = Continuation(4, f0, 4 / 12)
    got = lrs(run)
    for step in range(5, 13):
        progress = (step - 4) / 8
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        assert got[step] == pytest.approx(LR * (0.1 + (f0 - 0.1) * shape), rel=1e-9), step
        assert got[step] == pytest.approx(LR * lr_factor(step, cfg.optim, 12, after=after), rel=1e-12)
    assert got[12] == pytest.approx(LR * 0.1)


def test_a_second_extension_continues_from_the_first(tmp_path, corpus, monkeypatch):
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=8", "optim.min_lr_frac=0.1", "train.checkpoint_every=2")
    run = tmp_path / "runs" / "t"
    crash_after_step(monkeypatch, 4, lambda: train(cfg))
    crash_after_step(monkeypatch, 6, lambda: train(None, resume=run, extend=["train.max_steps=10"]))
    train(None, resume=run, extend=["train.max_steps=16"])
    first = Continuation(4, lr_factor(4, cfg.optim, 8), 4 / 10)
    second = Continuation(6, lr_factor(6, cfg.optim, 10, after=first), 6 / 16)
    got = lrs(run)
    assert [got[s] for s in (5, 6)] == pytest.approx([LR * lr_factor(s, cfg.optim, 10, after=first) for s in (5, 6)])
    assert [got[s] for s in range(7, 17)] == pytest.approx(
        [LR * lr_factor(s, cfg.optim, 16, after=second) for s in range(7, 17)], rel=1e-9
    )
    assert [e["new"] for e in read_events(run, "run_extended")] == [{"train.max_steps": 10}, {"train.max_steps": 16}]
    assert len(json.loads((run / "extensions.json").read_text())) == 2


def test_an_extended_run_resumes_exactly(tmp_path, corpus, monkeypatch):
    opts = ("train.max_steps=6", "optim.schedule=cosine", "train.checkpoint_every=2", "optim.min_lr_frac=0.1")
    for name in ("straight", "broken"):
        crash_after_step(monkeypatch, 4, lambda name=name: train(cfg_for(tmp_path, corpus, *opts, name=name)))
    straight, broken = tmp_path / "runs" / "straight", tmp_path / "runs" / "broken"
    want = train(None, resume=straight, extend=["train.max_steps=12"])
    crash_after_step(monkeypatch, 8, lambda: train(None, resume=broken, extend=["train.max_steps=12"]))
    got = train(None, resume=broken)  # the extension is in its config.yaml now
    assert got["val_bits_per_byte"] == want["val_bits_per_byte"]
    assert got["final_lr"] == want["final_lr"] and got["steps"] == 12
    assert lrs(broken) == lrs(straight)
    w_straight, _ = ckpt.load_checkpoint(straight)
    w_broken, _ = ckpt.load_checkpoint(broken)
    assert all(torch.equal(w_straight[k], w_broken[k]) for k in w_straight)


def test_extending_by_epochs(tmp_path, corpus):
    run = tmp_path / "runs" / "t"
    train(cfg_for(tmp_path, corpus, "train.max_steps=4"))
    first = train(None, resume=run, extend=["train.max_steps=none", "train.epochs=0.05"])
    assert first["steps"] > 4 and first["stop_reason"] == "epochs"
    assert config_mod.load(run / "config.yaml").train.epochs == 0.05


def test_extending_a_time_budget_replans_over_the_fraction_left(tmp_path, corpus, monkeypatch):
    ticks = itertools.count()  # every step takes exactly one second
    monkeypatch.setattr(trainer_mod, "step_timer", lambda: float(next(ticks)))
    opts = ("train.max_steps=null", "train.time_budget_s=8", "optim.min_lr_frac=0.1", "train.checkpoint_every=2")
    cfg = cfg_for(tmp_path, corpus, *opts)
    run = tmp_path / "runs" / "t"
    crash_after_step(monkeypatch, 4, lambda: train(cfg))
    with pytest.raises(ConfigError, match=r"the run has trained 4.0 s already; give a larger train.time_budget_s"):
        train(None, resume=run, extend=["train.time_budget_s=3"])
    summary = train(None, resume=run, extend=["train.time_budget_s=12"])
    assert (summary["steps"], summary["stop_reason"]) == (12, "time_budget")
    f0 = lr_factor(4, cfg.optim, UNPLANNED, 4 / 8)
    got = lrs(run)
    for step in range(5, 13):
        progress = (step / 12 - 4 / 12) / (1 - 4 / 12)
        assert got[step] == pytest.approx(LR * (0.1 + (f0 - 0.1) * 0.5 * (1 + math.cos(math.pi * progress)))), step
    assert got[12] == pytest.approx(LR * 0.1)


def test_shrinking_is_refused_and_nothing_changes(tmp_path, corpus):
    run = tmp_path / "runs" / "t"
    train(cfg_for(tmp_path, corpus, "train.max_steps=6"))
    before = (run / "config.yaml").read_text(), (run / "summary.json").read_text()
    with pytest.raises(ConfigError, match=r"train.max_steps=3: that stops at step 3, but the run has done 6 steps"):
        train(None, resume=run, extend=["train.max_steps=3"])
    assert ((run / "config.yaml").read_text(), (run / "summary.json").read_text()) == before
    assert not (run / "extensions.json").exists()


def test_only_stopping_keys_are_accepted_on_resume(tmp_path, corpus, capsys):
    run = tmp_path / "runs" / "t"
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    check_resume_overrides(run, ["train.max_steps=5", "train.epochs=2", "train.time_budget_s=60"])
    with pytest.raises(ConfigError, match=r"--resume takes no overrides \(optim.lr=0.1 given\).*to change optim.lr"):
        check_resume_overrides(run, ["train.max_steps=5", "optim.lr=0.1"])
    assert cli.main(["train", "--resume", str(run), "model.n_layer=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(model.n_layer=3 given)" in err[0]
    assert cli.main(["train", "--resume", str(run), "train.max_steps=3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3


# ------------------------------------------------------------------ init_from


def source_run(tmp_path, corpus, *overrides) -> tuple:
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=3", *overrides, name="src")
    train(cfg)
    return tmp_path / "runs" / "src", cfg


def test_init_from_copies_weights_and_starts_fresh(tmp_path, corpus):
    src, _ = source_run(tmp_path, corpus)
    other = write_corpus(tmp_path / "other.txt", seed=5)
    cfg = cfg_for(tmp_path, other, f"train.init_from={src}", name="ft", data="data2")
    trainer = Trainer(cfg, tmp_path / "runs" / "ft")
    trainer.setup()
    weights, _ = ckpt.load_checkpoint(src)
    state = trainer.model.state_dict()
    assert set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.scheduler.last_epoch == 0
    assert trainer.progress.step == 0
    summary = train(cfg)
    assert summary["init_from"] == str(src) and summary["steps"] == 8
    meta = json.loads((tmp_path / "runs" / "ft" / "meta.json").read_text())
    assert meta["init_from"]["step"] == 3 and meta["init_from"]["checkpoint"].endswith("step_00000003")


def test_init_from_a_named_checkpoint(tmp_path, corpus):
    src, _ = source_run(tmp_path, corpus, "train.checkpoint_every=1")
    step2 = sorted((src / "checkpoints").glob("step_*"))[0]
    cfg = cfg_for(tmp_path, corpus, f"train.init_from={step2}", name="ft")
    trainer = Trainer(cfg, tmp_path / "runs" / "ft")
    trainer.setup()
    weights, state = ckpt.load_checkpoint(step2)
    assert all(torch.equal(trainer.model.state_dict()[k], weights[k]) for k in weights)
    assert trainer.init_from["step"] == state["step"]


def test_init_from_refuses_another_tokenizer(tmp_path, corpus):
    src, _ = source_run(tmp_path, corpus)
    cfg = cfg_for(tmp_path, corpus, f"train.init_from={src}", "data.tokenizer=char", name="ft", data="chars")
    with pytest.raises(DataError, match=r"encoded with another tokenizer .*--tokenizer-from"):
        train(cfg)
    assert not (tmp_path / "runs" / "ft").exists()


def test_init_from_refuses_other_shapes_naming_the_first(tmp_path, corpus):
    src, _ = source_run(tmp_path, corpus)
    cfg = cfg_for(tmp_path, corpus, f"train.init_from={src}", "model.d_model=48", name="ft")
    with pytest.raises(CheckpointError, match=r"train.init_from=.*different model \(tok_emb.weight: checkpoint"):
        train(cfg)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizer_from_gives_the_runs_token_ids(tmp_path, corpus, capsys, kind):
    src, _ = source_run(tmp_path, corpus, f"data.tokenizer={kind}", "data.vocab_size=300")
    other = write_corpus(tmp_path / "other.txt", seed=9)
    out = tmp_path / "new"
    args = ["prepare", str(other), "--format", "lines", "--val-frac", "0.1", "--seed", "1"]
    assert cli.main([*args, "--tokenizer-from", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    new, old = store.load(out), store.load(tmp_path / "data")
    text = other.read_text().splitlines()[3]
    assert new.tokenizer.encode(text) == old.tokenizer.encode(text)
    assert new.meta["tokenizer"]["sha256"] == file_sha256(tmp_path / "data" / "tokenizer.json")
    first = other.read_text().splitlines()
    ids = new.tokens("train")[:400].tolist()
    docs = [d for d in first if d]
    assert any(old.tokenizer.encode(d) == ids[1 : 1 + len(old.tokenizer.encode(d))] for d in docs)
    cfg = cfg_for(tmp_path, other, f"train.init_from={src}", f"data.dir={out}", f"data.tokenizer={kind}", name="ft")
    assert train(cfg)["init_from"] == str(src)  # the same tokenizer: accepted


def test_tokenizer_from_and_tokenizer_file_together_are_refused(tmp_path, corpus, capsys):
    src, _ = source_run(tmp_path, corpus)
    args = ["prepare", str(corpus), "--format", "lines", "--tokenizer-from", str(src), "--tokenizer-file", "x.json"]
    assert cli.main([*args, "--out", str(tmp_path / "n")]) == 2
    assert "--tokenizer-from and --tokenizer-file" in capsys.readouterr().err
