"""Small shared builders for tests that train: a tiny corpus and config."""

from __future__ import annotations

import random
from pathlib import Path

from attnlab import config

WORDS = "the a model attention head layer token sparse dense window stride block learns predicts next byte".split()


def write_corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?"])
        for _ in range(n_docs)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(corpus: Path, data_dir: Path, out_dir: Path, *overrides: str, name: str = "t") -> config.Config:
    base = [
        f"name={name}",
        f"out_dir={out_dir}",
        f"data.source={corpus}",
        "data.format=lines",
        "data.tokenizer=bytes",
        "data.val_frac=0.1",
        "data.seed=1",
        f"data.dir={data_dir}",
        "model.n_layer=2",
        "model.n_head=2",
        "model.d_model=32",
        "model.context=32",
        "model.dropout=0.1",
        "optim.name=adamw",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "train.batch_size=4",
        "train.max_steps=8",
        "train.eval_batch_size=8",
        "train.seed=7",
        "logging.progress=false",
        "logging.log_every=1",
    ]
    return config.load(None, base + list(overrides))


def crash_after_step(monkeypatch, step: int, start) -> None:
    """Run ``start()`` (a training call) with training dying just after step ``step``: what a crash mid-run
    leaves, for resume tests. Training steps work normally again afterwards."""
    import pytest

    from attnlab.training import trainer as trainer_mod

    real_step = trainer_mod.Trainer.train_step

    def crashing(self):
        if self.progress.step == step:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crashing)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            start()
    finally:
        monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)


def digits_config(root: Path, *overrides: str) -> config.Config:
    """A tiny run on the built-in digits images (8x8, 64 bytes): one layer, image embeddings; skips without sklearn."""
    import pytest

    pytest.importorskip("sklearn", reason="digits needs scikit-learn")
    base = [
        "name=digits",
        f"out_dir={root / 'runs'}",
        "data.source=digits",
        f"data.dir={root / 'data'}",
        "data.val_frac=0.1",
        "data.max_test=20",
        "model.n_layer=1",
        "model.n_head=2",
        "model.d_model=16",
        "model.context=64",
        "model.position=image",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.eval_batch_size=64",
        "train.val_tokens=640",
        "logging.progress=false",
    ]
    return config.load(None, base + list(overrides))


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def first_hn_titles(out: Path, n: int = 2000) -> tuple[Path, list[str]]:
    """Write the first n shared HN titles to `out` (one per line); skip when shared data is absent."""
    import gzip

    import pytest

    src = SHARED / "hn_titles" / "titles.txt.gz"
    if not src.is_file():
        pytest.skip(f"shared HN titles not found at {src} (../shared/data beside the checkout)")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        titles = [next(f).rstrip("\n") for _ in range(n)]
    out.write_text("\n".join(titles) + "\n", encoding="utf-8")
    return out, titles
