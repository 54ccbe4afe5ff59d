"""SIGKILL at seeded random points of training, checkpoint saving and dataset preparation.

After each kill, ``attnlab train --resume`` either ends bit-identical to an
uninterrupted run (weights, losses, metrics) or refuses in one line because no
checkpoint is complete, after which a fresh start ends identical too; a killed
``prepare`` leaves either no dataset or a whole one, and the next prepare ends
with exactly the reference dataset. Nothing is left behind: no temporary
folders, no lock files.

A server process imports torch and attnlab once and forks one child per
command, so each trial costs a fork, not an interpreter start. A child kills
itself at its trial's point (the k-th training step, a stage of the n-th
checkpoint save, a stage of prepare), or the server kills it after a seeded delay.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from attnlab import config
from attnlab.data import store
from attnlab.training import checkpoint as ckpt
from attnlab.training.logs import read_events
from runkit import tiny_config, write_corpus
from safetykit import env, listing

SERVER = r"""
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)  # no thread pool exists when forking
from attnlab import cli
from attnlab.data import store
from attnlab.training import checkpoint as ck
from attnlab.training import trainer as trainer_mod

def warm_up(root):
    # One whole run here, before any fork: each child then starts with every lazy import and cache in place.
    import tempfile
    from pathlib import Path
    sys.path.insert(0, root)
    from runkit import tiny_config, write_corpus
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tiny_config(write_corpus(tmp / "c.txt", n_docs=20), tmp / "data", tmp / "runs", "model.n_layer=1",
                          "model.d_model=16", "train.max_steps=2", "train.eval_every=2", "logging.sample_tokens=2")
        trainer_mod.train(cfg)

warm_up(sys.argv[1])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def nth(n):
    calls = [0]
    def hit():
        calls[0] += 1
        return calls[0] == n
    return hit

def arm(kill):
    kind = kill["kind"]
    if kind == "step":  # before the training step that follows step k
        real = trainer_mod.Trainer.train_step
        def step(self):
            if self.progress.step == kill["k"]:
                die()
            return real(self)
        trainer_mod.Trainer.train_step = step
    elif kind == "save":  # at a stage of the n-th checkpoint save
        hit = nth(kill["n"])
        ck._on_stage = lambda stage: die() if stage == kill["stage"] and hit() else None
    elif kind == "split":  # while (before) or after writing the n-th split of a dataset
        real, hit = store._write_split, nth(kill["n"])
        def write_split(*a, **kw):
            if kill["when"] == "before" and hit():
                die()
            out = real(*a, **kw)
            if kill["when"] == "after" and hit():
                die()
            return out
        store._write_split = write_split
    elif kind == "rename":  # right after the n-th rename (a dataset or run folder moved into place)
        real, hit = os.replace, nth(kill["n"])
        def replace(*a, **kw):
            real(*a, **kw)
            if hit():
                die()
        os.replace = replace

print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if req["kill"] and req["kill"]["kind"] != "delay":
                arm(req["kill"])
            rc = cli.main(req["argv"])
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(locals().get("rc", 99))
    if req["kill"] and req["kill"]["kind"] == "delay":
        time.sleep(req["kill"]["seconds"])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Server:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(Path(__file__).parent)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env(),
        )
        self.lines = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()
        assert self.lines.get(timeout=120) == "READY"

    def run(self, argv, log: Path, kill: dict | None = None) -> tuple[int, str]:
        """Run ``attnlab ARGV`` in a forked child: (exit code, negative for a signal; its output)."""
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log), "kill": kill}) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.lines.get(timeout=120))["rc"]
        return rc, log.read_text(errors="replace") if log.exists() else ""

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


STEPS, EVERY = 8, 2  # checkpoints at steps 2, 4, 6 and 8
SAVE_STAGES = ["tmp_created", "weights_written", "state_written", "marker_written", "done"]


def plan(seed: int = 16) -> list[dict]:
    """The trials: where each one's process is killed."""
    rng = random.Random(seed)
    trials = [{"kind": "step", "k": rng.randrange(STEPS)} for _ in range(7)]
    trials += [
        {"kind": "save", "n": rng.randint(1, STEPS // EVERY), "stage": rng.choice(SAVE_STAGES)} for _ in range(7)
    ]
    trials += [{"kind": "delay", "seconds": round(rng.uniform(0.05, 0.7), 3)} for _ in range(3)]
    # prepare inside `train` (a fresh data folder), then the run folder's creation: rename 1 moves the dataset
    # into place, rename 2 the run directory
    trials += [{"kind": "split", "n": rng.randint(1, 2), "when": rng.choice(["before", "after"])} for _ in range(2)]
    trials += [{"kind": "rename", "n": n} for n in (1, 2)]
    return trials


PREPARE_TRIALS = [{"kind": "split", "n": n, "when": w} for n, w in [(1, "before"), (2, "after")]] + [
    {"kind": "rename", "n": n} for n in (1, 2)
]  # `prepare --force` over another dataset: both renames


def trial_id(t: dict) -> str:
    return "-".join(str(v) for v in t.values())


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server):
    """An uninterrupted run and dataset, from the same server."""
    root = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(root / "corpus.txt", n_docs=80)
    cfg_path = write_config(root, corpus)
    rc, out = server.run(["train", cfg_path], root / "train.log")
    assert rc == 0, out
    return {"corpus": corpus, "run": root / "runs" / "t", "data": root / "data"}


def write_config(root: Path, corpus: Path) -> Path:
    cfg = tiny_config(
        corpus,
        root / "data",
        root / "runs",
        "model.n_layer=1",
        "model.d_model=16",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={EVERY}",
        "train.eval_every=4",
        "logging.sample_tokens=6",
    )
    config.save(cfg, root / "config.yaml")
    return root / "config.yaml"


def last_losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run, "training_step")}  # a step logged twice: the later one


def assert_same_run(run: Path, ref: Path) -> None:
    wa, _ = ckpt.load_checkpoint(run)
    wb, _ = ckpt.load_checkpoint(ref)
    assert ckpt.latest_checkpoint(run).name == ckpt.latest_checkpoint(ref).name == f"step_{STEPS:08d}"
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert last_losses(run) == last_losses(ref)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert sa["val_bits_per_byte"] == sb["val_bits_per_byte"] and sa["steps"] == STEPS


def assert_nothing_left(root: Path) -> None:
    """No temporary or displaced folders; lock files a killed process could not remove are free."""
    from attnlab import folders

    left = [p for p in listing(root) if ".tmp-" in p or ".old-" in p or ".write-check" in p]
    assert left == [], left
    for lock in root.rglob(".*.lock"):
        with folders.locked(lock.with_name(lock.name[1:-5])):
            pass


def assert_clean_refusal(rc: int, out: str) -> None:
    lines = out.strip().splitlines()
    assert rc == 4 and lines and "Traceback" not in out, out
    assert lines[-1].startswith("attnlab: error: "), out
    assert "no complete checkpoint" in lines[-1] or "does not exist" in lines[-1], lines[-1]


@pytest.mark.parametrize("kill", plan(), ids=trial_id)
def test_killed_training_resumes_bit_identical_or_refuses_cleanly(tmp_path, server, reference, kill):
    cfg_path = write_config(tmp_path, reference["corpus"])
    run = tmp_path / "runs" / "t"
    rc, out = server.run(["train", cfg_path], tmp_path / "killed.log", kill)
    assert rc in (0, -signal.SIGKILL), out
    rc, out = server.run(["train", "--resume", run], tmp_path / "resume.log")
    if rc != 0:
        assert_clean_refusal(rc, out)
        assert ckpt.latest_checkpoint(run) is None
        rc, out = server.run(["train", cfg_path, "--force"], tmp_path / "fresh.log")  # start again in its place
        assert rc == 0, out
    assert_same_run(run, reference["run"])
    assert store.load(tmp_path / "data").meta["splits"] == store.load(reference["data"]).meta["splits"]
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("kill", PREPARE_TRIALS, ids=trial_id)
def test_killed_prepare_leaves_no_dataset_or_a_whole_one(tmp_path, server, reference, kill):
    out_dir = tmp_path / "d"
    args = [
        "prepare",
        reference["corpus"],
        "--out",
        out_dir,
        "--format",
        "lines",
        "--tokenizer",
        "bytes",
        "--val-frac",
        "0.1",
        "--seed",
        "1",
    ]
    rc, out = server.run([*args[:-1], "2"], tmp_path / "old.log")  # another dataset that --force replaces
    assert rc == 0, out
    old = store.load(out_dir).meta["splits"]
    rc, out = server.run([*args, "--force"], tmp_path / "killed.log", kill)
    assert rc == -signal.SIGKILL, out
    try:
        found = store.load(out_dir).meta["splits"]  # whole: the old dataset or the new one, verified
        assert found in (old, store.load(reference["data"]).meta["splits"])
    except Exception as e:  # noqa: BLE001 - only the clean "no dataset here" answer is acceptable
        assert type(e).__name__ == "DataError" and "does not exist" in str(e), e
    rc, out = server.run([*args, "--force"], tmp_path / "again.log")
    assert rc == 0, out
    assert store.load(out_dir).meta["splits"] == store.load(reference["data"]).meta["splits"]
    assert_nothing_left(tmp_path)


def test_the_plan_has_enough_trials():
    assert len(plan()) + len(PREPARE_TRIALS) >= 20
    assert len({trial_id(t) for t in PREPARE_TRIALS}) == len(PREPARE_TRIALS)
