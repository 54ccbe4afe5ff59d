"""Schedules that follow a time budget: a budgeted run ends annealed at min_lr_frac, whichever of steps and
budget ends it, and a resumed run continues the same schedule. Step times come from a fake clock."""

import itertools
import math

import pytest

from attnlab.config import OptimConfig
from attnlab.training import trainer as trainer_mod
from attnlab.training.logs import read_events
from attnlab.training.optim import RunClock, lr_factor
from attnlab.training.trainer import train
from runkit import crash_after_step, tiny_config, write_corpus

LR, MIN = 3e-3, 0.1


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def one_second_steps(monkeypatch):
    """Every training step takes exactly one second."""
    ticks = itertools.count()
    monkeypatch.setattr(trainer_mod, "step_timer", lambda: float(next(ticks)))  # read at a step's start and end


def run(tmp_path, corpus, *overrides, name="t"):
    cfg = tiny_config(corpus, tmp_path / "data", tmp_path / "runs", f"optim.min_lr_frac={MIN}", *overrides, name=name)
    return train(cfg), tmp_path / "runs" / name


def lrs(run_dir):
    return [e["lr"] for e in read_events(run_dir, "training_step")]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_a_budget_alone_ends_annealed(tmp_path, corpus, one_second_steps, schedule):
    summary, run_dir = run(
        tmp_path,
        corpus,
        "train.max_steps=null",
        "train.time_budget_s=10",
        f"optim.schedule={schedule}",
        "optim.warmup_steps=2",
    )
    assert summary["steps"] == 10 and summary["stop_reason"] == "time_budget"
    assert summary["schedule_follows"] == "time_budget" and summary["planned_steps"] is None
    assert summary["final_lr"] == pytest.approx(LR * MIN, rel=1e-12)
    cfg = OptimConfig(lr=LR, min_lr_frac=MIN, schedule=schedule, warmup_steps=2)
    want = [LR * lr_factor(s, cfg, 10**12, min(1.0, s / 10)) for s in range(1, 11)]
    assert lrs(run_dir) == pytest.approx(want, rel=1e-12)


def test_a_budget_that_ends_during_warmup_still_ends_annealed(tmp_path, corpus, one_second_steps):
    summary, run_dir = run(tmp_path, corpus, "train.max_steps=null", "train.time_budget_s=5", "optim.warmup_steps=50")
    assert summary["steps"] == 5 and summary["final_lr"] == pytest.approx(LR * MIN, rel=1e-12)
    ramp = [LR * (s + 1) / 51 for s in range(1, 6)]  # events log the lr of the step after
    assert lrs(run_dir)[:2] == pytest.approx(ramp[:2], rel=1e-12)  # the ramp while the budget is young


def test_a_budget_that_ends_first_anneals_and_says_so(tmp_path, corpus, one_second_steps, capsys):
    summary, _ = run(tmp_path, corpus, "train.max_steps=100", "train.time_budget_s=6")
    assert (summary["steps"], summary["planned_steps"], summary["stop_reason"]) == (6, 100, "time_budget")
    assert summary["schedule_follows"] == "steps_or_time_budget"
    assert summary["final_lr"] == pytest.approx(LR * MIN, rel=1e-12)
    assert (
        "attnlab: warning: train.time_budget_s=6 ended the run at step 6 of 100 planned (the lr schedule followed "
        "the budget and is annealed)"
    ) in capsys.readouterr().err


def test_steps_that_end_first_give_the_step_schedule(tmp_path, corpus, one_second_steps, capsys):
    with_budget, a = run(tmp_path, corpus, "train.max_steps=8", "train.time_budget_s=1000", name="a")
    steps_only, b = run(tmp_path, corpus, "train.max_steps=8", name="b")
    assert with_budget["stop_reason"] == "max_steps" and with_budget["final_lr"] == pytest.approx(LR * MIN)
    assert lrs(a) == pytest.approx(lrs(b), rel=1e-12)
    assert steps_only["schedule_follows"] == "steps" and "warning" not in capsys.readouterr().err


def test_resume_mid_budget_continues_the_schedule(tmp_path, corpus, one_second_steps, monkeypatch):
    common = ["train.max_steps=null", "train.time_budget_s=10", "train.checkpoint_every=4"]
    full, full_dir = run(tmp_path, corpus, *common, name="full")
    crash_after_step(monkeypatch, 6, lambda: run(tmp_path, corpus, *common, name="cut"))
    resumed = train(resume=tmp_path / "runs" / "cut")
    assert resumed["steps"] == full["steps"] == 10 and resumed["train_seconds"] == full["train_seconds"] == 10
    assert resumed["final_train_loss"] == full["final_train_loss"] and resumed["final_lr"] == full["final_lr"]
    assert lrs(tmp_path / "runs" / "cut")[-6:] == lrs(full_dir)[-6:]


def test_the_clock_takes_whichever_is_further():
    seconds = [0.0]
    clock = RunClock(total_steps=100, budget_s=10.0, seconds=lambda: seconds[0])
    seconds[0] = 5.0
    assert clock.fraction(20) == 0.5 and clock.fraction(80) == 0.8
    seconds[0] = 20.0
    assert clock.fraction(1) == 1.0
    assert RunClock(None, 10.0, lambda: 2.5).fraction(3) == 0.25
    assert math.isclose(lr_factor(50, OptimConfig(schedule="cosine", min_lr_frac=0.0), 10**12, 0.5), 0.5)
