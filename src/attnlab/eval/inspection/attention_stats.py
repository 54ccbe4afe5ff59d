"""Per-layer, per-head attention statistics: computed from captured q/k/v/weights, logged during training, plotted.

For each layer and head (means over the queries of a fixed batch of validation sequences):

- ``entropy``: -sum_j w_ij ln w_ij in nats (0 = one key, ln(i+1) = uniform over i+1 keys);
- ``first_token_mass``: w_i0, the weight on the first position (attention-sink strength; SOS for images);
- ``distance``: sum_j w_ij (i - j), how far back a query looks on average;
- ``q_norm``, ``k_norm``, ``v_norm``: mean L2 norm of the vectors the attention core receives
  (after QK-norm and RoPE where the model has them).

The trainer logs ``attention_stats_event(...)`` at every evaluation (``logging.attention_stats`` sequences,
0 = off): eval mode, no autograd, no random numbers drawn, so training is bit-identical with or without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...data.image_format import SOS
from ...errors import UserError
from .attention_maps import LayerAttention, capture_attention

WEIGHT_STATS = ("entropy", "first_token_mass", "distance")
NORM_STATS = ("q_norm", "k_norm", "v_norm")
STATS = WEIGHT_STATS + NORM_STATS
UNITS = {
    "entropy": "nats",
    "first_token_mass": "weight on position 0",
    "distance": "tokens back",
    "q_norm": "L2 norm",
    "k_norm": "L2 norm",
    "v_norm": "L2 norm",
}


def weight_sums(weights: torch.Tensor, q_start: int) -> dict[str, torch.Tensor]:
    """Sums over batch and query rows, per head [H] (float64), of each weight statistic; rows are queries q_start, q_start+1, ...

    Each pass over the weights is one elementwise op or a matrix-vector product (no T x T temporaries beyond one):
    the distance sum_j w_ij (i - j) is i * sum_j w_ij - sum_j w_ij j.
    """
    w = weights.float()
    i = torch.arange(q_start, q_start + w.shape[2], device=w.device, dtype=w.dtype)
    j = torch.arange(w.shape[3], device=w.device, dtype=w.dtype)
    per_query = {
        "entropy": torch.special.entr(w).sum(-1),  # entr(0) = 0: masked keys add nothing
        "first_token_mass": w[..., 0],
        "distance": i * w.sum(-1) - w @ j,
    }
    return {k: v.double().sum(dim=(0, 2)) for k, v in per_query.items()}


def norm_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum over batch and positions of the L2 norm of each vector, per head [H]."""
    return torch.linalg.vector_norm(x.double(), dim=-1).sum(dim=(0, 2))


class StatsAccumulator:
    """An ``on_layer`` callback for ``capture_attention``: sums per layer and head, chunk by chunk; ``means()`` at the end."""

    def __init__(self, n_layer: int, n_head: int):
        self.sums = {s: torch.zeros(n_layer, n_head, dtype=torch.float64) for s in STATS}
        self.queries = torch.zeros(n_layer, dtype=torch.float64)
        self.keys = torch.zeros(n_layer, dtype=torch.float64)

    def __call__(self, la: LayerAttention) -> None:
        L = la.layer
        for name, total in weight_sums(la.weights, la.q_start).items():
            self.sums[name][L] += total.cpu()
        self.sums["q_norm"][L] += norm_sums(la.q).cpu()
        self.queries[L] += la.q.shape[0] * la.q.shape[2]
        if la.first_chunk:  # keys and values are whole in every chunk: count them once
            self.sums["k_norm"][L] += norm_sums(la.k).cpu()
            self.sums["v_norm"][L] += norm_sums(la.v).cpu()
            self.keys[L] += la.k.shape[0] * la.k.shape[2]

    def means(self) -> dict[str, list[list[float]]]:
        """stat -> [layer][head] means (queries for the weight statistics and q, keys for k and v)."""
        out = {}
        for name, total in self.sums.items():
            count = self.keys if name in ("k_norm", "v_norm") else self.queries
            out[name] = (total / count.clamp(min=1).view(-1, 1)).tolist()
        return out


def head_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor) -> dict[str, list[float]]:
    """The statistics of one layer's q, k [B,H,T,Dqk], v [B,H,T,Dv] and weights [B,H,T,T]: stat -> per-head means."""
    acc = StatsAccumulator(1, q.shape[1])
    acc(LayerAttention(0, q, k, v, weights, k.shape[2] - q.shape[2], True))
    return {name: rows[0] for name, rows in acc.means().items()}


@torch.no_grad()
def model_attention_stats(
    model, x: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> dict[str, list[list[float]]]:
    """Run ``model`` on ids ``x`` [B, T] in eval mode through the reference path; stat -> [layer][head] means."""
    from ..metrics.scoring import _scoring

    acc = StatsAccumulator(len(model.blocks), model.cfg.n_head)
    with _scoring(model, x.device, autocast_dtype), capture_attention(model, keep=(), on_layer=acc):
        model(x)
    return acc.means()


# ------------------------------------------------------------------ during training


def stats_batch(tokens: np.ndarray, context: int, n: int, *, image: bool, sos: int | None = None) -> torch.Tensor:
    """The fixed validation batch: text, the first ``n`` windows of ``context`` tokens (one shorter window if the
    split is shorter); images, the first ``n`` images each read from its start token."""
    if image:
        n = min(n, len(tokens) // context)
        y = np.asarray(tokens[: n * context], dtype=np.int64).reshape(n, context)
        return torch.from_numpy(np.concatenate([np.full((n, 1), sos), y[:, :-1]], axis=1))
    if len(tokens) < context:
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
    n = min(n, len(tokens) // context)
    return torch.from_numpy(np.asarray(tokens[: n * context], dtype=np.int64).reshape(n, context))


def attention_stats_event(
    model,
    val_tokens: np.ndarray,
    n: int,
    *,
    context: int,
    image: bool,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """The fields of one ``attention_stats`` event: ``model`` on the first ``n`` validation sequences
    (``stats_batch``); sequences, tokens, then stat -> [layer][head] means."""
    x = stats_batch(val_tokens, context, n, image=image, sos=SOS)
    stats = model_attention_stats(model, x.to(device), autocast_dtype)
    return {"sequences": x.shape[0], "tokens": x.shape[1], **stats}


# ------------------------------------------------------------------ attnlab viz stats


def plot_attention_stats(run_dir: str | Path, out: str | Path, force: bool = False) -> dict:
    """One panel per statistic against step: per layer its mean over heads (thick) and each head (thin)."""
    from matplotlib.figure import Figure

    from ...training.logs import read_events

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "events.jsonl").is_file():
        raise UserError(f"{run_dir} is not a run directory (no events.jsonl): pass a folder created by `attnlab train`")
    events = _by_step(read_events(run_dir, "attention_stats"))
    if not events:
        raise UserError(
            f"{run_dir} has no attention_stats events: train with logging.attention_stats=N "
            f"(N validation sequences, e.g. 4; 0 turns them off) and an evaluation schedule (train.eval_every)"
        )
    if out.exists() and not force:
        raise UserError(f"{out} already exists: choose another --out or pass --force to replace it")
    steps = [e["step"] for e in events]
    n_layer, n_head = len(events[0]["entropy"]), len(events[0]["entropy"][0])
    fig = Figure(figsize=(13, 7))
    axes = list(fig.subplots(2, 3).flat)
    colors = [f"C{i % 10}" for i in range(n_layer)]
    for ax, name in zip(axes, STATS):
        values = np.array([e[name] for e in events], dtype=float)  # [steps, layers, heads]
        for L in range(n_layer):
            for h in range(n_head):
                ax.plot(steps, values[:, L, h], color=colors[L], lw=0.6, alpha=0.35)
            ax.plot(steps, values[:, L].mean(-1), color=colors[L], lw=2, marker="o", ms=3, label=f"layer {L}")
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(UNITS[name], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="mean over heads\n(thin: each head)", title_fontsize=7)
    fig.suptitle(
        f"{run_dir.name}: attention statistics over {events[0]['sequences']} validation sequences "
        f"of {events[0]['tokens']} tokens",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return {"out": str(out), "events": len(events), "steps": steps, "layers": n_layer, "heads": n_head}


def _by_step(events: list[dict]) -> list[dict]:
    """One event per step, in step order (the final evaluation may repeat the last periodic one's step)."""
    return [e for _, e in sorted({e["step"]: e for e in events}.items())]
