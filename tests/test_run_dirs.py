"""Run directories and dataset folders: one writer at a time (a lock), --force only on attnlab's own folders,
one-line errors for folders that cannot be written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from attnlab import config, folders
from attnlab.errors import CheckpointError, InUse
from attnlab.training import checkpoint as ckpt
from attnlab.training.logs import read_events
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus
from safetykit import cli, env, listing, lock_holder, one_line, read_only

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", n_docs=120)


def cfg_for(tmp_path, corpus, *overrides, name="t"):
    return tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "model.n_layer=1", *overrides, name=name)


def train_args(cfg) -> list[str]:
    return [
        f"{k}={v}" for k, v in config.flatten(config.to_dict(cfg)).items() if v is not None and k != "data.categories"
    ]


def prepare_args(corpus, out):
    return ["prepare", corpus, "--out", out, "--format", "lines", "--tokenizer", "bytes"]


# ------------------------------------------------------------------ the lock


def test_two_trainings_started_together_never_share_a_directory(tmp_path, corpus):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1", name="warm"))  # the dataset exists: both race for the run dir
    procs = []
    for seed in (1, 2):
        cfg = cfg_for(tmp_path, corpus, "train.max_steps=20", f"train.seed={seed}", "train.checkpoint_every=5")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "attnlab", "train", *train_args(cfg)],
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(ok) == 1 and len(refused) == 1, results
    rc, _, err = refused[0]
    # either it found the directory busy (lock) or already made (the other finished first)
    assert rc in (InUse.exit_code, CheckpointError.exit_code)
    one_line(err, "runs/t")
    run = tmp_path / "runs" / "t"
    winner_seed = config.load(run / "config.yaml").train.seed
    assert json.loads(ok[0][1].strip().splitlines()[-1]) == json.loads((run / "summary.json").read_text())
    assert [e["config"]["train"]["seed"] for e in read_events(run, "hyperparameters_configured")] == [winner_seed]
    assert json.loads((run / "meta.json").read_text())["seed"] == winner_seed
    assert len(read_events(run, "summary")) == 1


def test_two_runs_preparing_one_dataset_together_share_it(tmp_path, corpus):
    procs = []
    for name in ("a", "b"):
        cfg = cfg_for(tmp_path, corpus, "train.max_steps=1", name=name)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "attnlab", "train", *train_args(cfg)],
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert {read_events(tmp_path / "runs" / n, "dataset_info")[0]["dir"] for n in "ab"} == {str(tmp_path / "data")}
    assert [x for x in listing(tmp_path) if x.startswith(".") or "/." in x] == []


def test_a_held_run_directory_is_refused_naming_the_holder(tmp_path, corpus, capsys):
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=2")
    train(cfg)
    run = tmp_path / "runs" / "t"
    before = listing(run)
    with lock_holder(run) as holder:
        rc, _, err = cli(capsys, "train", "--resume", run)
        assert rc == InUse.exit_code
        one_line(err, f"PID {holder.pid}", str(run))
        rc, _, err = cli(capsys, "train", *train_args(cfg), "--force")
        assert rc == InUse.exit_code
        one_line(err, f"PID {holder.pid}")
        with pytest.raises(InUse, match=f"PID {holder.pid}"):
            train(cfg_for(tmp_path, corpus, "train.max_steps=2"), auto_resume=True)
    assert listing(run) == before


def test_resume_while_the_run_is_training_is_refused(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1", name="warm"))
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=100000", "train.checkpoint_every=2")
    p = subprocess.Popen(
        [sys.executable, "-m", "attnlab", "train", *train_args(cfg)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "runs" / "t"
    try:
        deadline = time.time() + 60
        while ckpt.latest_checkpoint(run) is None and time.time() < deadline:
            time.sleep(0.05)
        rc, _, err = cli(capsys, "train", "--resume", run)
        assert rc == InUse.exit_code
        one_line(err, f"PID {p.pid}")
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    assert len(read_events(run, "run_resumed")) == 0 and len(read_events(run, "hyperparameters_configured")) == 1


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path, corpus, capsys):
    out = tmp_path / "d"
    with lock_holder(out) as holder:
        rc, _, err = cli(capsys, *prepare_args(corpus, out))
        assert rc == InUse.exit_code
        one_line(err, f"PID {holder.pid}", "dataset")
        assert not out.exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (tmp_path / ".d.lock").exists()  # the dead holder could not clean up ...
        rc, _, err = cli(capsys, *prepare_args(corpus, out))
        assert rc == 0, err  # ... yet its lock is gone with it
    assert (out / "meta.json").is_file() and not (tmp_path / ".d.lock").exists()


def test_lock_is_reentrant_for_nobody_and_released(tmp_path):
    with folders.locked(tmp_path / "x", "run directory"):
        with pytest.raises(InUse, match=f"PID {os.getpid()}"):
            with folders.locked(tmp_path / "x", "run directory"):
                pass
    with folders.locked(tmp_path / "x", "run directory"):
        pass
    assert listing(tmp_path) == []


def test_a_sweep_folder_is_locked(tmp_path, corpus):
    from attnlab import sweep as sw

    base = tmp_path / "base.yaml"
    config.save(cfg_for(tmp_path, corpus, "train.max_steps=1"), base)
    sweep = sw.sweep_from_dict(
        {
            "name": "s",
            "base": str(base),
            "out_dir": str(tmp_path / "sweeps"),
            "parameters": {"train.seed": {"values": [0, 1]}},
        }
    )
    (tmp_path / "sweeps").mkdir()
    with lock_holder(tmp_path / "sweeps" / "s") as holder:
        with pytest.raises(InUse, match=rf"sweep folder .* \(PID {holder.pid}\)"):
            sw.run_sweep(sweep, report=False)
    assert not (tmp_path / "sweeps" / "s").exists()


# ------------------------------------------------------------------ --force replaces only attnlab's own folders


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path, corpus, capsys):
    project = tmp_path / "fakeproj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "code.py").write_text("x\n")
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=1", f"out_dir={tmp_path}", name="fakeproj")
    rc, _, err = cli(capsys, "train", *train_args(cfg), "--force")
    assert rc == CheckpointError.exit_code
    one_line(err, str(project), "--force", "not an attnlab run")
    assert (project / "src" / "code.py").read_text() == "x\n"


def test_force_refuses_a_dataset_as_a_run_and_a_run_as_a_dataset(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1"))
    cfg = cfg_for(tmp_path, corpus, "train.max_steps=1", f"out_dir={tmp_path}", name="data")
    rc, _, err = cli(capsys, "train", *train_args(cfg), "--force")
    one_line(err, "is an attnlab dataset")
    rc, _, err = cli(capsys, *prepare_args(corpus, tmp_path / "runs" / "t"), "--force")
    assert rc == 3
    one_line(err, "is an attnlab run")
    assert (tmp_path / "data" / "meta.json").is_file() and (tmp_path / "runs" / "t" / "summary.json").is_file()


def test_force_replaces_a_run_and_a_dataset(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.max_steps=2"))
    assert train(cfg_for(tmp_path, corpus, "train.max_steps=1"), force=True)["steps"] == 1
    assert cli(capsys, *prepare_args(corpus, tmp_path / "data"), "--force")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data", "runs"]


def test_prepare_force_refuses_unrelated_files(tmp_path, corpus, capsys):
    out = tmp_path / "nonempty"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    rc, _, err = cli(capsys, *prepare_args(corpus, out), "--force")
    assert rc == 3
    one_line(err, str(out), "not an attnlab dataset")
    assert listing(out) == ["notes.txt"]


@pytest.mark.parametrize("force", [False, True])
def test_prepare_into_the_working_directory_never_touches_it(tmp_path, corpus, capsys, monkeypatch, force):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    for out in (".", "./", str(tmp_path), ".."):
        rc, _, err = cli(capsys, *prepare_args(corpus, out), *(["--force"] if force else []))
        assert rc == 3
        one_line(err, "current directory")
    assert listing(tmp_path) == before


# ------------------------------------------------------------------ read-only locations


def test_read_only_out_dir_for_train(tmp_path, corpus, capsys):
    train(cfg_for(tmp_path, corpus, "train.max_steps=1", name="warm"))
    with read_only(tmp_path / "ro"):
        cfg = cfg_for(tmp_path, corpus, "train.max_steps=1", f"out_dir={tmp_path / 'ro'}")
        rc, _, err = cli(capsys, "train", *train_args(cfg))
        assert rc == CheckpointError.exit_code
        one_line(err, str(tmp_path / "ro"), "cannot write")
        assert listing(tmp_path / "ro") == []


def test_read_only_run_dir_for_resume(tmp_path, corpus, capsys, monkeypatch):
    from attnlab.training import trainer as trainer_mod

    real = trainer_mod.Trainer.train_step

    def crash(self):
        if self.progress.step == 2:
            raise RuntimeError("crash")
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError):
        train(cfg_for(tmp_path, corpus, "train.max_steps=4", "train.checkpoint_every=2"))
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real)
    run = tmp_path / "runs" / "t"
    before = listing(run)
    with read_only(run):
        rc, _, err = cli(capsys, "train", "--resume", run)
        assert rc == CheckpointError.exit_code
        one_line(err, str(run), "cannot write")
    assert listing(run) == before
    with read_only(tmp_path / "runs"):
        rc, _, err = cli(capsys, "train", "--resume", run)
        one_line(err, "cannot write")


def test_read_only_out_for_prepare(tmp_path, corpus, capsys):
    with read_only(tmp_path / "ro"):
        rc, _, err = cli(capsys, *prepare_args(corpus, tmp_path / "ro" / "d"))
        assert rc == 3
        one_line(err, str(tmp_path / "ro"), "cannot write")
    assert listing(tmp_path / "ro") == []
