"""A checkpoint save that runs out of room (a file-size limit, as ``ulimit -f`` sets): one line naming the path and
the room needed, the last complete checkpoint kept, no temporary folder left, and --resume later finishes the run."""

import subprocess
import sys

import pytest
import torch

from attnlab import config
from attnlab.training import checkpoint as ckpt
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus
from safetykit import env, one_line

# Train until a crash after the step-4 checkpoint, then resume under a file-size limit below a checkpoint's size.
SCRIPT = """
import resource, signal, sys
from attnlab import config
from attnlab.cli import main
from attnlab.training import trainer as trainer_mod
cfg = config.load(sys.argv[1])
real = trainer_mod.Trainer.train_step
def crash(self):
    if self.progress.step == 5:
        raise SystemExit(9)
    return real(self)
trainer_mod.Trainer.train_step = crash
try:
    trainer_mod.train(cfg)
except SystemExit:
    pass
trainer_mod.Trainer.train_step = real
limit = int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["train", "--resume", sys.argv[3]]))
"""


def test_checkpoint_save_beyond_the_file_size_limit(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=120)
    common = [
        "model.n_layer=1",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "train.threads=1",
    ]  # same sums in every process
    cfg = tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *common)
    config.save(cfg, tmp_path / "c.yaml")
    run = tmp_path / "runs" / "t"
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "c.yaml"), str(20_000), str(run)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert p.returncode == 4, p.stderr
    line = one_line(p.stderr.strip().splitlines()[-1], "step_00000008", "needs about", "free")
    assert "ulimit -f" in line
    root = run / "checkpoints"
    assert sorted(x.name for x in root.iterdir()) == ["step_00000004"]  # no .tmp- folder left
    assert ckpt.latest_checkpoint(run) == root / "step_00000004"
    ckpt.load_checkpoint(root / "step_00000004")  # complete and verified

    train(resume=run)  # with room again, the run finishes as if nothing had happened
    full = tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *common, name="full")
    train(full)
    wa, _ = ckpt.load_checkpoint(run)
    wb, _ = ckpt.load_checkpoint(tmp_path / "runs" / "full")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from attnlab.errors import CheckpointError
    from tiny_models import TinyGPT

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"step_00000001.*needs about .* free"):
        ckpt.save_checkpoint(tmp_path, 1, TinyGPT(), {"step": 1})
    assert list((tmp_path / "checkpoints").iterdir()) == []
