"""A run's life from the outside: names, interrupts (train and prepare), finished runs, file modes, honest timings."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from attnlab import config
from attnlab.errors import CheckpointError, ConfigError
from attnlab.training import checkpoint as ckpt
from attnlab.training import trainer as trainer_mod
from attnlab.training.trainer import train
from runkit import crash_after_step, tiny_config, write_corpus
from safetykit import cli, env, listing, one_line

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", n_docs=120)


def cfg_for(tmp_path, corpus, *overrides, name="t"):
    return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "model.n_layer=1", *overrides, name=name)


@pytest.mark.parametrize("name", ["a\x07b", "line\nbreak", "tab\there", "nul\x00byte", "esc\x1b[31m"])
def test_run_names_with_control_characters_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="not a valid run name|contains a NUL character"):
        config.load(None, [f"name={name}", "train.max_steps=1"])


# ------------------------------------------------------------------ interrupting prepare

# prepare, paused inside the temporary folder until the test signals it
PREPARE = """
import sys, time
from attnlab.cli import main
from attnlab.data import store
real = store._write_split
def slow(path, *a, **kw):
    print("WRITING", flush=True)
    time.sleep(60)
    return real(path, *a, **kw)
store._write_split = slow
sys.exit(main(["prepare", sys.argv[1], "--out", sys.argv[2], "--format", "lines", "--tokenizer", "bytes"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_prepare_leaves_nothing_behind(tmp_path, corpus, sig):
    out = tmp_path / "data" / "d"
    p = subprocess.Popen(
        [sys.executable, "-c", PREPARE, str(corpus), str(out)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "WRITING"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "checkpoint" not in err
    assert err.strip().splitlines()[-1] == f"attnlab: interrupted: {out} was not written (nothing was changed)"
    assert listing(tmp_path / "data") == []


def test_leftovers_of_a_killed_prepare_are_removed_by_the_next(tmp_path, corpus, capsys):
    out = tmp_path / "data" / "d"
    p = subprocess.Popen(
        [sys.executable, "-c", PREPARE, str(corpus), str(out)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "WRITING"
    p.kill()
    p.wait()
    assert any(".d.tmp-" in x for x in listing(tmp_path / "data"))
    rc, _, err = cli(capsys, "prepare", corpus, "--out", out, "--format", "lines", "--tokenizer", "bytes")
    assert rc == 0, err
    assert [x for x in listing(tmp_path / "data") if "/" not in x] == ["d"]


# ------------------------------------------------------------------ interrupting and finishing training


def test_the_interrupt_message_names_the_run(tmp_path, corpus, capsys, monkeypatch):
    real = trainer_mod.Trainer.train_step

    def ctrl_c(self):
        if self.progress.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the trainer, which stops after this step
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", ctrl_c)
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=8")
    config.save(cfg, tmp_path / "c.yaml")
    rc, _, err = cli(capsys, "train", tmp_path / "c.yaml")
    run = tmp_path / "runs" / "t"
    assert rc == 130
    assert err.strip().splitlines()[-1] == (
        f"attnlab: interrupted: checkpoint {run / 'checkpoints' / 'step_00000003'} "
        f"saved: continue with attnlab train --resume {run}"
    )


def test_resuming_a_finished_run_changes_nothing(tmp_path, corpus):
    first = train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    run = tmp_path / "runs" / "t"
    before = {p: (run / p).read_bytes() for p in listing(run) if (run / p).is_file()}
    assert train(resume=run) == first
    assert {p: (run / p).read_bytes() for p in listing(run) if (run / p).is_file()} == before


def test_a_damaged_checkpoint_is_reported_and_never_trained_over(tmp_path, corpus, capsys, monkeypatch):
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=4", "train.checkpoint_every=2")
    crash_after_step(monkeypatch, 3, lambda: train(cfg))  # its only checkpoint is step 2
    run = tmp_path / "runs" / "t"
    os.truncate(ckpt.latest_checkpoint(run) / "model.safetensors", 100)  # a disk or a copy cut it short
    before = {p: (run / p).read_bytes() for p in listing(run) if (run / p).is_file()}
    rc, _, err = cli(capsys, "eval", run)
    assert rc == 4
    one_line(err, "step_00000002 is damaged (model.safetensors has 100 bytes where COMPLETE records", "delete that")
    with pytest.raises(CheckpointError, match="step_00000002 is damaged"):
        train(cfg, auto_resume=True)  # not a run that died before its first save: never started again over it
    assert {p: (run / p).read_bytes() for p in listing(run) if (run / p).is_file()} == before


def test_checkpoint_files_share_the_mode_of_the_run_files(tmp_path, corpus):
    old = os.umask(0o022)
    try:
        train(cfg_for(tmp_path, corpus, "train.max_steps=1"))
    finally:
        os.umask(old)
    run = tmp_path / "runs" / "t"
    path = ckpt.latest_checkpoint(run)
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode) for p in [*path.iterdir(), run / "config.yaml", run / "summary.json"]
    }
    assert set(modes.values()) == {0o644}, modes


def test_an_unsafe_state_is_refused_without_suggesting_unsafe_loading(tmp_path):
    from pathlib import Path

    import torch

    from attnlab.errors import CheckpointError
    from attnlab.files import file_sha256
    from tiny_models import TinyGPT

    path = ckpt.save_checkpoint(tmp_path, 1, TinyGPT(), {})
    torch.save({"obj": Path("x")}, path / "state.pt")
    marker = json.loads((path / "COMPLETE").read_text())
    marker["files"]["state.pt"] = {
        "bytes": (path / "state.pt").stat().st_size,
        "sha256": file_sha256(path / "state.pt"),
    }
    (path / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(path)
    message = str(e.value)
    assert "cannot be read safely" in message and "PosixPath" in message
    assert "weights_only" not in message and "False" not in message and "\n" not in message


def test_wall_seconds_include_the_final_evaluation_and_samples(tmp_path, corpus, monkeypatch):
    real = trainer_mod.Trainer.write_samples

    def slow(self, log):
        time.sleep(0.6)
        return real(self, log)

    monkeypatch.setattr(trainer_mod.Trainer, "write_samples", slow)
    t0 = time.time()
    s = train(cfg_for(tmp_path, corpus, "train.max_steps=2", "logging.sample_tokens=4"))
    elapsed = time.time() - t0
    assert elapsed - 0.15 < s["wall_seconds"] <= elapsed
    assert 0.6 <= s["final_seconds"] <= s["wall_seconds"] - s["train_seconds"]
