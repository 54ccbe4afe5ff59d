"""Multi-process training under torchrun (CPU, gloo, 2 ranks): equivalence with one process, disjoint data,
distributed evaluation, resume across rank counts, killed workers and automatic restarts."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import config
from attnlab.data import store
from attnlab.data.batches import BatchIterator
from attnlab.errors import CheckpointError, ConfigError, UserError
from attnlab.eval.metrics.scoring import score_images, score_tokens, shard
from attnlab.run.open import load_run
from attnlab.training import checkpoint as ckpt
from attnlab.training.logs import read_events
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

SRC = Path(__file__).resolve().parents[1] / "src"
# dropout 0: the ranks' dropout masks cannot match one process's; an active clip checks the global grad norm
COMMON = ["model.dropout=0.0", "optim.grad_clip=0.1", "train.checkpoint_every=4", "train.eval_every=4"]

# Runs under torchrun: records the windows each rank reads, kills itself where told (first attempt only),
# and runs several `attnlab train` command lines in one process group (each launch costs seconds of imports).
WORKER = r"""
import json, os, signal, sys
import numpy as np
import torch.distributed as dist
from attnlab import cli
from attnlab.data import store
from attnlab.data.batches import BatchIterator
from attnlab.training import checkpoint as ckpt, trainer

rank = int(os.environ["RANK"])
first_try = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
kill = os.environ.get("KILL", "")  # "RANK:step:S" (dies during step S+1) or "RANK:save:N" (during its N-th save)
record = os.environ.get("RECORD")  # folder: <run>-rank<r>.json lists the window starts this rank read
seen, saves = [], [0]

real_starts = BatchIterator.window_starts
def window_starts(self, epoch, step):
    starts = real_starts(self, epoch, step)
    seen.append(starts.tolist())
    return starts
BatchIterator.window_starts = window_starts

def die():
    os.kill(os.getpid(), signal.SIGKILL)

who, what, n = (kill.split(":") + ["", "", "0"])[:3]
if kill and first_try and int(who) == rank:
    if what == "step":
        real_step = trainer.Trainer.train_step
        def train_step(self):
            if self.progress.step == int(n):
                die()
            return real_step(self)
        trainer.Trainer.train_step = train_step
    else:
        def on_stage(stage):
            if stage == "weights_written":
                saves[0] += 1
                if saves[0] == int(n):
                    die()
        ckpt._on_stage = on_stage

if len(json.loads(sys.argv[1])) > 1:  # one group for several runs (attnlab leaves a group it did not create)
    dist.init_process_group("gloo")
for line in json.loads(sys.argv[1]):
    seen.clear()
    rc = cli.main(["train", *line])
    if rc:
        sys.exit(rc)
    if record:
        name = [a for a in line if a.startswith("name=")] or [os.path.basename(line[line.index("--resume") + 1])]
        with open(os.path.join(record, f"{name[0].removeprefix('name=')}-rank{rank}.json"), "w") as f:
            json.dump(seen, f)
if dist.is_initialized():
    dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, env: dict | None = None, restarts: int = 0, timeout: int = 240):
    """``python -m torch.distributed.run --nproc_per_node 2 ...`` with one thread per worker."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "--max-restarts",
        str(restarts),
        *args,
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "ATTNLAB_DIST_TIMEOUT_S": "120",
        **(env or {}),
    }
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_worker(tmp_path: Path, lines: list[list[str]], **kw):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return torchrun([str(script), json.dumps(lines)], tmp_path, **kw)


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def overrides(tmp_path, corpus, *extra, name):
    """The tiny run's settings as command-line overrides (what tiny_config builds)."""
    cfg = tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *COMMON, *extra, name=name)
    return [f"{k}={v}" for k, v in config.flatten(config.to_dict(cfg)).items() if v is not None and v != []]


def single(tmp_path, corpus, *extra, name):
    train(tiny_config(corpus, tmp_path / "data", tmp_path / "runs", *COMMON, *extra, name=name))
    return tmp_path / "runs" / name


def losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir, "training_step")}  # a resumed step: its last value


def weights(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run_dir)[0]


def assert_same_training(a: Path, b: Path, exact: bool = False) -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == set(range(1, 9))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    if exact:
        assert la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)
    else:  # fp32: only the order of the additions differs
        assert all(abs(la[s] - lb[s]) < 1e-5 for s in la), (la, lb)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def back_to_step_4(run: Path, to: Path) -> Path:
    """A copy of a finished run as it stood after its step-4 checkpoint."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / "step_00000008")
    (to / "summary.json").unlink()
    return to


def ranks_read(record: Path, name: str) -> list[list[list[int]]]:
    return [json.loads((record / f"{name}-rank{r}.json").read_text()) for r in range(2)]


# ------------------------------------------------------------------ end to end


def test_ddp_and_fsdp_equal_one_process_and_resume_across_rank_counts(tmp_path, corpus):
    s1 = single(tmp_path, corpus, name="s1")  # grad_accum 1, ddp
    s2 = single(tmp_path, corpus, "train.grad_accum=2", "train.parallel=fsdp", name="s2")
    ga2 = ["train.grad_accum=2"]
    lines = [
        overrides(tmp_path, corpus, name="ddp1"),
        overrides(tmp_path, corpus, *ga2, name="ddp2"),
        overrides(tmp_path, corpus, "train.parallel=fsdp", name="fsdp1"),
        overrides(tmp_path, corpus, *ga2, "train.parallel=fsdp", "logging.sample_tokens=16", name="fsdp2"),
        ["--resume", str(back_to_step_4(s1, tmp_path / "runs" / "s1to2"))],  # 1 -> 2 ranks, DDP
        ["--resume", str(back_to_step_4(s2, tmp_path / "runs" / "s2to2"))],
    ]  # 1 -> 2 ranks, FSDP
    record = tmp_path / "record"
    record.mkdir()
    ok(run_worker(tmp_path, lines, env={"RECORD": str(record)}))
    runs = tmp_path / "runs"

    # Same losses and weights as one process, for DDP and FSDP, with and without gradient accumulation.
    for name, ref in [("ddp1", s1), ("ddp2", s2), ("fsdp1", s1), ("fsdp2", s2), ("s1to2", s1), ("s2to2", s2)]:
        assert_same_training(runs / name, ref)
    assert [e["event"] for e in read_events(runs / "s2to2", "run_resumed")] == ["run_resumed"]
    assert read_events(runs / "s2to2", "run_resumed")[0]["world_size"] == 2
    # Only rank 0 writes: one line per step, one summary, samples once.
    assert [e["step"] for e in read_events(runs / "ddp2", "training_step")] == list(range(1, 9))
    assert json.loads((runs / "ddp2" / "meta.json").read_text())["distributed"] == {"world_size": 2, "parallel": "ddp"}
    assert sorted(p.name for p in (runs / "fsdp2" / "samples").iterdir()) == ["step-0000004.txt", "step-0000008.txt"]

    # Each rank read its half of every global batch: disjoint, and together the one-process batch.
    tokens = store.load(tmp_path / "data").tokens("train")
    for name, micro_steps in [("ddp1", 8), ("fsdp2", 16)]:
        whole = BatchIterator(tokens, 4, 32, seed=7)
        r0, r1 = ranks_read(record, name)
        assert len(r0) == len(r1) == micro_steps
        for a, b in zip(r0, r1):
            assert len(a) == len(b) == 2 and not set(a) & set(b)
            assert a + b == whole.window_starts(whole.epoch, whole.step).tolist()
            whole.next_batch()

    # Distributed evaluation (each rank scores half the windows, sums reduced in float64) equals one process's.
    for name in ("ddp2", "fsdp2"):
        summary = json.loads((runs / name / "summary.json").read_text())
        run = load_run(runs / name, device="cpu")
        score = score_tokens(run.model, run.dataset.tokens("val"), context=32, batch_size=8)
        assert summary["val_tokens_scored"] == score.tokens
        assert summary["val_nats_per_token"] == pytest.approx(score.nll_nats / score.tokens, rel=1e-9)

    # 2 ranks -> 1 process, from DDP's and from FSDP's checkpoints (the same single-process format).
    for name in ("ddp2", "fsdp2"):
        train(resume=back_to_step_4(runs / name, runs / f"{name}to1"))
        assert_same_training(runs / f"{name}to1", s2)


def test_killed_worker_leaves_last_checkpoint_and_runs_resume_exactly(tmp_path, corpus):
    ga2 = ["train.grad_accum=2"]
    full, crash = overrides(tmp_path, corpus, *ga2, name="full"), overrides(tmp_path, corpus, *ga2, name="crash")
    runs = tmp_path / "runs"
    # Rank 0 dies while writing the step-8 checkpoint (after the weights, before the marker): torchrun stops the job.
    proc = run_worker(tmp_path, [full, crash], env={"KILL": "0:save:4"})  # full saves at 4 and 8, crash at 4, 8
    assert proc.returncode != 0
    assert not (runs / "crash" / "summary.json").exists()
    assert ckpt.latest_checkpoint(runs / "crash") == runs / "crash" / "checkpoints" / "step_00000004"
    assert [p.name.split(".tmp-")[0] for p in (runs / "crash" / "checkpoints").glob("*.tmp-*")] == ["step_00000008"]

    ok(torchrun(["-m", "attnlab", "train", "--resume", str(runs / "crash")], tmp_path))
    assert_same_training(runs / "crash", runs / "full", exact=True)
    assert not list((runs / "crash" / "checkpoints").glob("*.tmp-*"))  # the dead save was cleaned up

    # torchrun --max-restarts re-runs the same command; --auto-resume picks up the step-4 checkpoint.
    auto = overrides(tmp_path, corpus, *ga2, name="auto") + ["--auto-resume"]
    ok(run_worker(tmp_path, [auto], env={"KILL": "1:step:5"}, restarts=1))  # rank 1 dies during step 6
    assert_same_training(runs / "auto", runs / "full", exact=True)
    assert [e["step"] for e in read_events(runs / "auto", "run_resumed")] == [4]


# ------------------------------------------------------------------ in one process


def test_batch_size_must_divide_by_the_ranks(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"train.batch_size=4 is not divisible by the 3 .*use a multiple of 3"):
        train(tiny_config(corpus, tmp_path / "data", tmp_path / "runs"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="optim.name=muon .* use train.parallel=ddp"):
        train(tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "train.parallel=fsdp", "optim.name=muon"))
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_auto_resume_starts_then_resumes_and_refuses_other_runs(tmp_path, corpus):
    cfg = lambda *o: tiny_config(corpus, tmp_path / "data", tmp_path / "runs", "train.max_steps=2", *o)  # noqa: E731
    with pytest.raises(UserError, match="--auto-resume .* drop --resume/--force"):
        train(cfg(), auto_resume=True, force=True)
    first = train(cfg(), auto_resume=True)  # nothing there: starts
    again = train(cfg(), auto_resume=True)  # complete checkpoint at step 2: resumes, finds the run finished
    assert first["steps"] == again["steps"] == 2 and again == first
    assert read_events(tmp_path / "runs" / "t", "run_resumed") == []  # a finished run is left as it was
    with pytest.raises(CheckpointError, match=r"changed config \(optim.lr"):
        train(cfg("optim.lr=1e-4"), auto_resume=True)


class Bigram(torch.nn.Module):
    """A tiny deterministic model that counts its calls."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.table(x)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 300),
    context=st.integers(2, 16),
    stride_frac=st.floats(0.1, 1.0),
    batch=st.integers(1, 7),
    world=st.integers(1, 4),
)
def test_ranks_score_shares_that_sum_to_the_whole_split(n, context, stride_frac, batch, world):
    tokens = np.random.default_rng(n).integers(0, 11, n).astype(np.uint16)
    stride = max(1, int(context * stride_frac))
    whole = score_tokens(Bigram(11), tokens, context=context, stride=stride, batch_size=batch)
    models = [Bigram(11) for _ in range(world)]
    parts = [
        score_tokens(m, tokens, context=context, stride=stride, batch_size=batch, rank=r, world_size=world)
        for r, m in enumerate(models)
    ]
    assert sum(p.tokens for p in parts) == whole.tokens == n - 1
    assert sum(p.nll_nats for p in parts) == pytest.approx(whole.nll_nats, rel=1e-12)
    assert len({m.calls for m in models}) == 1  # lockstep: FSDP ranks must all call the model equally often


@settings(max_examples=15, deadline=None)
@given(images=st.integers(1, 20), batch=st.integers(1, 6), world=st.integers(1, 4))
def test_image_scores_split_across_ranks(images, batch, world):
    per_image = 12
    tokens = np.random.default_rng(images).integers(0, 256, images * per_image).astype(np.uint8)
    whole = score_images(Bigram(257), tokens, tokens_per_image=per_image, sos=256, batch_size=batch)
    models = [Bigram(257) for _ in range(world)]
    parts = [
        score_images(m, tokens, tokens_per_image=per_image, sos=256, batch_size=batch, rank=r, world_size=world)
        for r, m in enumerate(models)
    ]
    assert sum(p.tokens for p in parts) == whole.tokens == images * per_image
    assert sum(p.nll_nats for p in parts) == pytest.approx(whole.nll_nats, rel=1e-12)
    assert len({m.calls for m in models}) == 1


def test_shard_is_contiguous_and_padded():
    assert shard([1, 2, 3, 4, 5], 0, 2) == [(1, True), (2, True), (3, True)]
    assert shard([1, 2, 3, 4, 5], 1, 2) == [(4, True), (5, True), (1, False)]
    assert shard([1], 2, 3) == [(1, False)]
    assert shard([7, 8], 0, 1) == [(7, True), (8, True)]
