"""Length extrapolation: bits/byte over a whole split with evaluation windows shorter and longer than the
training context (``attnlab eval RUN --context-sweep 256,512,...``).

Each window length N scores every token of the split once, in windows of N tokens (stride N), so a
point is comparable with ``attnlab eval --context N``. Past the training context only models whose
positions extrapolate (RoPE or none) are evaluated; their patterns run as they would at that length.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .scoring import score_tokens, text_metrics

FIELDS = ["context", "bits_per_byte", "nats_per_token", "tokens_scored", "past_training_context"]


def context_sweep(run, split: str, contexts: list[int], *, batch_size: int, progress: bool = False) -> list[dict]:
    """One row per window length: the split's metrics with windows of that many tokens."""
    rows = []
    tokens, split_meta = run.dataset.tokens(split), run.dataset.meta["splits"][split]
    for n in contexts:
        with run.model.longer_windows(n):
            score = score_tokens(
                run.model, tokens, context=n, stride=n, batch_size=batch_size, device=run.device, progress=progress
            )
        m = text_metrics(score, split_meta)
        rows.append(
            {
                "context": n,
                "bits_per_byte": m["bits_per_byte"],
                "nats_per_token": m["nats_per_token"],
                "tokens_scored": m["tokens"],
                "past_training_context": n > run.model.context,
            }
        )
    return rows


def write_context_sweep(rows: list[dict], out: Path, title: str) -> dict:
    """``context-sweep.csv`` and ``context-sweep.png`` (bits/byte against window length) in ``out``."""
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "context-sweep.csv", out / "context-sweep.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    ax.plot([r["context"] for r in rows], [r["bits_per_byte"] for r in rows], marker="o")
    trained = [r["context"] for r in rows if not r["past_training_context"]]
    if trained:
        ax.axvline(max(trained), color="grey", linestyle=":", label="training context")
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation window (tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return {"csv": str(csv_path), "plot": str(png_path)}
