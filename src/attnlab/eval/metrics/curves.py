"""The learning curves of a run, drawn from its events.jsonl into plots/curves.png.

Training loss and validation loss share one unit: bits per dimension for
image runs (both are nats per byte of image, divided by ln 2), nats per token
for text (bits per byte needs the split's byte count, so only validation has
it; the final value is in the title).
"""

from __future__ import annotations

import math
from pathlib import Path

from ...training.logs import read_events


def plot_curves(run_dir: str | Path, image: bool) -> Path:
    """Write ``plots/curves.png`` (loss against step) and return its path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to select

    run_dir = Path(run_dir)
    scale, unit = (1 / math.log(2), "bits/dim") if image else (1.0, "nats/token")
    train = read_events(run_dir, "training_step")
    val = read_events(run_dir, "validation_step")
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot([e["step"] for e in train], [e["loss"] * scale for e in train], lw=1, alpha=0.7, label="train (batch)")
    periodic = [e for e in val if not e.get("final")]
    ax.plot([e["step"] for e in periodic], [e["val_loss"] * scale for e in periodic], "o-", label="val (periodic)")
    final = [e for e in val if e.get("final")]
    if final:
        key = "val_bits_per_dim" if image else "val_bits_per_byte"
        key = key if key in final[-1] else "val_accuracy"  # a generated arithmetic task
        ax.plot([final[-1]["step"]], [final[-1]["val_loss"] * scale], "k*", ms=10, label="val (whole split)")
        ax.set_title(f"{run_dir.name}: final {key.replace('_', ' ')} {final[-1][key]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "plots" / "curves.png"
    out.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out
