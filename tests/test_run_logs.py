"""Run continuity and efficiency in the logs: a resumed run continues its wandb run and TensorBoard folder,
each validation result is one console line, and MFU is logged against a measured peak on a CPU."""

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from attnlab.errors import CheckpointError
from attnlab.model.gpt import GPT
from attnlab.training import flops
from attnlab.training.logs import read_events, validation_line
from attnlab.training.trainer import train
from runkit import crash_after_step, tiny_config, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def cfg_for(tmp_path, corpus, *overrides, name="t"):
    return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *overrides, name=name)


def crash_then_resume(cfg, monkeypatch, at_step: int = 3) -> Path:
    """Train until step ``at_step`` (checkpoints every 2 steps), crash, then resume to the end."""
    crash_after_step(monkeypatch, at_step, lambda: train(cfg))
    run = Path(cfg.out_dir) / cfg.name
    train(resume=run)
    return run


# ------------------------------------------------------------------ wandb


class FakeWandb(types.ModuleType):
    """Records every ``wandb.init`` call's keywords and the scalars each run logs."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importlib.util.find_spec finds it
        self.inits, self.logged = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake, logged = self, self.logged
        run_id = kwargs.get("id") or f"fake{len(self.inits)}"

        class Run:
            id = run_id

            def log(self, scalars, step):
                logged.append((run_id, step, sorted(scalars)))

            def finish(self):
                fake.finished = True

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, corpus, monkeypatch, fake_wandb):
    cfg = cfg_for(tmp_path, corpus, "train.checkpoint_every=2", "logging.wandb=offline")
    run = crash_then_resume(cfg, monkeypatch)
    first, resumed = fake_wandb.inits
    assert "id" not in first and "resume" not in first  # wandb (or a sweep agent) picks the id at the start
    assert first["mode"] == "offline" and first["dir"] == str(run) and first["name"] == "t"
    assert json.loads((run / "wandb.json").read_text()) == {"id": "fake1"}
    assert resumed["id"] == "fake1" and resumed["resume"] == "allow"
    steps = [step for run_id, step, names in fake_wandb.logged if "training/loss" in names]
    assert {run_id for run_id, _, _ in fake_wandb.logged} == {"fake1"}
    # step 3 ran before the crash (in step 4) and again after resuming from step 2's checkpoint; wandb keeps
    # the first of a repeated step (the same numbers: resuming reproduces the run)
    assert steps == [1, 2, 3, 3, 4, 5, 6, 7, 8]


def test_a_damaged_wandb_id_is_one_line(tmp_path, corpus, monkeypatch, fake_wandb):
    cfg = cfg_for(tmp_path, corpus, "train.checkpoint_every=2", "logging.wandb=offline")
    run = crash_then_resume(cfg, monkeypatch)
    (run / "wandb.json").write_text("{not json")
    (run / "summary.json").unlink()  # so that resuming opens the loggers again
    with pytest.raises(CheckpointError) as e:
        train(resume=run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{run / 'wandb.json'} is unreadable (JSONDecodeError)")


# ------------------------------------------------------------------ TensorBoard


def test_a_resumed_run_writes_into_the_same_tensorboard_folder(tmp_path, corpus, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = cfg_for(tmp_path, corpus, "train.checkpoint_every=2", "logging.tensorboard=true")
    run = crash_then_resume(cfg, monkeypatch)
    folders = [p for p in run.rglob("*") if p.is_file() and "tfevents" in p.name]
    assert len(folders) == 2 and {p.parent for p in folders} == {run / "tensorboard"}  # one file per process
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    # step 3 ran before the crash and again after resuming from step 2: the first one is purged
    assert [e.step for e in acc.Scalars("training/loss")] == [1, 2, 3, 4, 5, 6, 7, 8]
    losses = {e["step"]: e["loss"] for e in read_events(run, "training_step")}  # the last of each step
    assert [e.value for e in acc.Scalars("training/loss")] == pytest.approx([losses[s] for s in range(1, 9)])


def test_reading_a_resumed_runs_log_drops_the_steps_that_ran_again(tmp_path, corpus, monkeypatch):
    cfg = cfg_for(tmp_path, corpus, "train.checkpoint_every=2")
    run = crash_then_resume(cfg, monkeypatch)
    raw = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in raw if e["event"] == "training_step"] == [1, 2, 3, 3, 4, 5, 6, 7, 8]
    steps = read_events(run, "training_step")
    assert [e["step"] for e in steps] == list(range(1, 9))
    rerun = [e for e in raw if e["event"] == "training_step" and e["step"] == 3]
    assert steps[2] == rerun[1] and steps[2]["loss"] == rerun[0]["loss"]  # the kept one is the resumed process's
    assert sum(e["event"] == "run_resumed" for e in read_events(run)) == 1


# ------------------------------------------------------------------ console


def test_each_validation_result_is_one_console_line(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.eval_every=4", "train.val_tokens=40", "logging.progress=true"))
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n") if "val " in line]  # what a terminal shows
    evals = read_events(tmp_path / "runs" / "t", "validation_step")
    assert [e["step"] for e in evals] == [4, 8, 8] and [e["partial"] for e in evals] == [True, True, False]
    partial = [
        f"step {e['step']}: val {e['val_nats_per_token']:.4f} nats/token (partial, 40 tokens)" for e in evals[:2]
    ]
    full = evals[2]
    whole = f"step 8: val {full['val_bits_per_byte']:.4f} bits/byte (full, {full['val_tokens']:,} tokens)"
    assert lines == [*partial, whole]  # the bar is cleared before each line and drawn again below it


def test_validation_lines_for_images_and_tasks():
    image = {"bits_per_dim": 3.14159, "images": 1200, "partial": True}
    assert validation_line(10, image) == "step 10: val 3.1416 bits/dim (partial, 1,200 images)"
    task = {"accuracy": 0.5, "loss": 1.23456, "problems": 2000, "partial": False}
    assert validation_line(3, task) == "step 3: val accuracy 0.5000, loss 1.2346 (2,000 problems)"
    text = {"bits_per_byte": 1.46021, "tokens": 65536, "partial": False}
    assert validation_line(100, text) == "step 100: val 1.4602 bits/byte (full, 65,536 tokens)"


# ------------------------------------------------------------------ MFU on a CPU


def test_cpu_training_logs_mfu_against_a_measured_peak(tmp_path, corpus):
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=2")
    train(cfg)
    run = tmp_path / "runs" / "t"
    (device,) = read_events(run, "device_info")
    peak = flops.measured_cpu_peak_tflops(torch.get_num_threads(), torch.float32)  # cached: the value training used
    assert device["mfu_peak"] == "measured fp32 matmul" and device["mfu_peak_tflops"] == peak > 0
    assert device["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2: what the speed depends on
    per_token = flops.flops_per_token(GPT(cfg.model, cfg.attention, 256), 32)
    steps = read_events(run, "training_step")
    assert len(steps) == 2
    for e in steps:
        assert "mfu" not in e  # a GPU's data-sheet MFU only
        assert e[flops.CPU_MFU_KEY] == round(per_token * e["tokens_per_second"] / (peak * 1e12), 5)


def test_a_bf16_cpu_run_measures_its_peak_in_bf16(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1", "train.dtype=bfloat16"))
    (device,) = read_events(tmp_path / "runs" / "t", "device_info")
    assert device["mfu_peak"] == "measured bf16 matmul"
    assert device["mfu_peak_tflops"] == flops.measured_cpu_peak_tflops(torch.get_num_threads(), torch.bfloat16)


def test_the_cpu_peak_is_measured_once_and_leaves_the_rng_alone(monkeypatch):
    flops.measured_cpu_peak_tflops.cache_clear()
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(a.shape) or real_mm(a, b))
    state = torch.get_rng_state()
    first = flops.measured_cpu_peak_tflops(1)
    assert calls == [(1024, 1024)] * 4  # one warm-up, three timed
    assert flops.measured_cpu_peak_tflops(1) == first and len(calls) == 4
    assert torch.equal(torch.get_rng_state(), state) and 0 < first < 1e3


def test_no_console_lines_without_progress(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.eval_every=4", "logging.progress=false"))
    assert "val " not in capsys.readouterr().err
