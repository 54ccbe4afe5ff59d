"""Golden loss curves: two tiny CPU runs whose first 50 training losses are committed as JSON.

Each golden file holds the complete override list (paths as {corpus}/{data_dir}/{out_dir}
placeholders), so it reproduces its run without depending on any other test helper's defaults.
The corpus comes from runkit.write_corpus; its SHA-256 is recorded so a changed corpus is named
as such instead of showing up as a mysterious loss drift.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ for runkit, also when run as a script

from attnlab import config  # noqa: E402
from attnlab.training.logs import read_events  # noqa: E402
from attnlab.training.trainer import train  # noqa: E402
from runkit import write_corpus  # noqa: E402

STEPS = 50
REGENERATE = "python tests/golden/regenerate.py"

_COMMON = [
    "out_dir={out_dir}",
    "data.source={corpus}",
    "data.format=lines",
    "data.tokenizer=bytes",
    "data.val_frac=0.1",
    "data.seed=1",
    "data.dir={data_dir}",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.context=32",
    "model.dropout=0.1",
    "optim.name=adamw",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "train.batch_size=4",
    f"train.max_steps={STEPS}",
    "train.eval_batch_size=8",
    "train.seed=7",
    "train.device=cpu",
    "train.dtype=float32",
    "train.threads=1",  # one thread: one reduction order
    "logging.progress=false",
    "logging.log_every=1",
]

# dense runs through SDPA; strided (split heads, l=8 on a 32-token context) through the blocksparse backend.
SPECS: dict[str, list[str]] = {
    "dense": ["name=golden-dense", *_COMMON, "attention.pattern=dense"],
    "strided": [
        "name=golden-strided",
        *_COMMON,
        "attention.pattern=strided",
        "attention.strided_mode=split",
        "attention.local_attn_ctx=8",
        "attention.backend=blocksparse",
    ],
}


def golden_path(name: str) -> Path:
    return HERE / f"{name}.json"


def corpus_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_curve(overrides: list[str], workdir: Path) -> dict:
    """Train one golden run in-process under `workdir`; return its record (corpus hash, losses, val bits/byte)."""
    corpus = write_corpus(workdir / "corpus.txt")
    paths = {"corpus": str(corpus), "data_dir": str(workdir / "data"), "out_dir": str(workdir / "runs")}
    cfg = config.load(None, [o.format(**paths) for o in overrides])
    summary = train(cfg)
    steps = read_events(Path(cfg.out_dir) / cfg.name, "training_step")
    return {
        "corpus_sha256": corpus_sha256(corpus),
        "losses": [e["loss"] for e in steps],
        "val_bits_per_byte": summary["val_bits_per_byte"],
    }


def record(name: str, workdir: Path | None = None) -> dict:
    """The JSON content of golden file `name`, freshly trained."""
    overrides = SPECS[name]
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return record(name, Path(tmp))
    return {
        "name": name,
        "steps": STEPS,
        "torch": torch.__version__,
        "overrides": overrides,
        **run_curve(overrides, workdir),
    }


def differences(old: dict, new: dict, rtol: float) -> list[str]:
    """One line per value that moved beyond rtol (losses by step, then the final val bits/byte)."""
    out = []
    if len(old["losses"]) != len(new["losses"]):
        out.append(f"{len(new['losses'])} training losses logged, golden has {len(old['losses'])}")
    for step, (a, b) in enumerate(zip(old["losses"], new["losses"]), start=1):
        if not math.isclose(a, b, rel_tol=rtol, abs_tol=0.0):
            out.append(f"step {step}: golden loss {a!r}, now {b!r} (rel. change {abs(b - a) / abs(a):.2e})")
    a, b = old["val_bits_per_byte"], new["val_bits_per_byte"]
    if not math.isclose(a, b, rel_tol=rtol, abs_tol=0.0):
        out.append(f"final val_bits_per_byte: golden {a!r}, now {b!r}")
    return out


def load(name: str) -> dict:
    return json.loads(golden_path(name).read_text(encoding="utf-8"))
