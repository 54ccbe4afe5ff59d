"""What document masking costs: each pattern's attention, forward + backward, with and without it.

``python -m attnlab.bench.docmask --out benchmarks/docmask-cpu`` times every pattern spec through the backend
``auto`` picks on the device (``spec@backend``: that backend), at each (batch, length), on rows holding
documents of random lengths (mean ``--doc-len`` tokens). The two variants are timed alternately, so drift
in a shared machine's load reaches both alike; the medians go to ``results.csv`` (with the ratio masked /
plain), ``results.png`` and ``machine.json``. ``dense-choice.csv`` times the two ways of masking dense
attention, SDPA with a boolean mask and the block-sparse kernel, alternately at several lengths: the
measurement behind ``backends.SDPA_DOC_MAX``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..attention import backends
from ..attention.backends import select_backend
from ..attention.blocksparse import blocksparse
from ..attention.documents import documents
from ..attention.patterns import Dense, Pattern
from .attention import parse_pattern_spec
from .measure import machine_info, params_label

# ``spec@backend`` forces a backend: dense through the block-sparse kernel is the alternative to SDPA's mask.
PATTERNS = [
    "dense",
    "dense@blocksparse",
    "local:window=64",
    "strided:local_attn_ctx=32",
    "sink_window:sinks=4:window=64",
    "linear",
]
SHAPES = [(8, 128), (1, 1024)]  # (batch, length)
COLUMNS = ["spec", "pattern", "params", "backend", "batch", "seq_len", "heads", "head_dim", "docs_per_row", "repeats"]
COLUMNS += ["plain_ms", "masked_ms", "ratio"]


def document_rows(B: int, T: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """Token rows [B, T] with <eos> (id 0) after documents of geometric lengths (mean ``mean_len``)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 100, (B, T))
    rows[rng.random((B, T)) < 1.0 / mean_len] = 0
    return torch.from_numpy(rows)


def _step(fn, q, k, v, pattern: Pattern, doc) -> float:
    for x in (q, k, v):
        x.grad = None
    t0 = time.perf_counter()
    out = fn(q, k, v, pattern, 0.0, True, **({} if doc is None else {"doc": doc}))
    out.backward(torch.ones_like(out))
    return time.perf_counter() - t0


def measure(
    pattern: Pattern, B: int, T: int, H: int, D: int, doc_len: int, repeats: int, warmup: int, backend: str = "auto"
) -> dict:
    """Median fwd+bwd ms of the pattern's ``backend`` on CPU without and with document masking."""
    backend, fn = select_backend(backend, pattern, torch.device("cpu"), document_mask=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
    ids = documents(document_rows(B, T, doc_len), 0).ids
    times: dict[str, list[float]] = {"plain": [], "masked": []}
    for i in range(warmup + repeats):
        for name, doc in (("plain", None), ("masked", ids)):  # alternately: drift reaches both alike
            dt = _step(fn, q, k, v, pattern, doc)
            if i >= warmup:
                times[name].append(dt)
    plain, masked = (statistics.median(times[n]) * 1000 for n in ("plain", "masked"))
    if backend == "sdpa" and T > backends.SDPA_DOC_MAX:  # rows this long are masked by the block-sparse kernel
        backend = "sdpa/blocksparse"
    return {
        "pattern": pattern.name,
        "params": params_label(pattern),
        "backend": backend,
        "batch": B,
        "seq_len": T,
        "heads": H,
        "head_dim": D,
        "docs_per_row": round(float(ids[:, -1].float().mean()) + 1, 2),
        "repeats": repeats,
        "plain_ms": round(plain, 3),
        "masked_ms": round(masked, 3),
        "ratio": round(masked / plain, 3),
    }


def _label(row: dict) -> str:
    """The pattern spec, broken at its parameters: ``local\nwindow=64``."""
    return row["spec"].replace(":", "\n", 1).replace(":", ", ").replace("@", "\n@")


def plot(rows: list[dict], path: Path) -> None:
    """Bars of masked / plain time per pattern, one group per (batch, length)."""
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(_label(r) for r in rows))
    shapes = list(dict.fromkeys((r["batch"], r["seq_len"]) for r in rows))
    fig = Figure(figsize=(1.6 + 1.4 * len(labels), 4.4))
    ax = fig.subplots()
    width = 0.8 / len(shapes)
    for s, (B, T) in enumerate(shapes):
        ratio = {_label(r): float(r["ratio"]) for r in rows if (r["batch"], r["seq_len"]) == (B, T)}
        ratios = [ratio.get(label, float("nan")) for label in labels]
        ax.bar([i + s * width for i in range(len(labels))], ratios, width, label=f"B={B}, T={T}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + width * (len(shapes) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("time with document masking / without")
    ax.set_title("document masking cost, fwd+bwd (CPU)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


CHOICE_SHAPES = [(8, 128), (4, 256), (2, 512), (1, 1024), (4, 1024)]


def dense_choice(shapes, H: int, D: int, doc_len: int, repeats: int, warmup: int) -> list[dict]:
    """Masked dense attention, fwd+bwd, through SDPA's boolean mask and through the block-sparse kernel."""
    dense = Dense()
    ways = {
        "sdpa_mask": lambda q, k, v, pattern, p, training, doc: backends._sdpa_documents(q, k, v, pattern, p, doc),
        "blocksparse": lambda q, k, v, pattern, p, training, doc: blocksparse(q, k, v, pattern, p, training, doc=doc),
    }
    rows = []
    for B, T in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
        ids = documents(document_rows(B, T, doc_len), 0).ids
        times: dict[str, list[float]] = {name: [] for name in ways}
        for i in range(warmup + repeats):
            for name, fn in ways.items():
                dt = _step(fn, q, k, v, dense, ids)
                if i >= warmup:
                    times[name].append(dt)
        ms = {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}
        rows.append({"batch": B, "seq_len": T, **{f"{n}_ms": m for n, m in ms.items()}, "faster": min(ms, key=ms.get)})
        print(", ".join(f"{k}={v}" for k, v in rows[-1].items()))
    return rows


def run(
    out: Path,
    patterns: list[str] = PATTERNS,
    shapes: list[tuple[int, int]] = SHAPES,
    heads: int = 8,
    head_dim: int = 64,
    doc_len: int = 128,
    repeats: int = 11,
    warmup: int = 2,
    choice: list[tuple[int, int]] | None = None,
) -> list[dict]:
    """``choice``: the (batch, length) shapes of ``dense-choice.csv`` (None: not written)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in patterns:
        spec, _, backend = spec.partition("@")
        pattern = parse_pattern_spec(spec, heads)
        for B, T in shapes:
            row = measure(pattern, B, T, heads, head_dim, doc_len, repeats, warmup, backend or "auto")
            rows.append({"spec": spec + (f"@{backend}" if backend else ""), **row})
            print(", ".join(f"{k}={rows[-1][k]}" for k in ("pattern", "backend", "batch", "seq_len", "ratio")))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "results.png")
    if choice:
        chosen = dense_choice(choice, heads, head_dim, doc_len, repeats, warmup)
        with open(out / "dense-choice.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(chosen[0]))
            writer.writeheader()
            writer.writerows(chosen)
    info = machine_info(torch.device("cpu"))
    info["settings"] = {"doc_len_mean": doc_len, "repeats": repeats, "warmup": warmup, "dtype": "float32"}
    (out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m attnlab.bench.docmask", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/docmask-cpu"))
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated pattern specs")
    ap.add_argument("--doc-len", type=int, default=128, help="mean document length in tokens")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-choice", action="store_true", help="skip dense-choice.csv")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(
        a.out,
        a.patterns.split(","),
        doc_len=a.doc_len,
        repeats=a.repeats,
        choice=None if a.no_choice else CHOICE_SHAPES,
    )


if __name__ == "__main__":
    main()
