"""What bf16 costs on this CPU: a training step with bf16 autocast and with Muon's bf16 Newton–Schulz step.

``python -m attnlab.bench.bf16_cpu --out benchmarks/bf16-cpu`` builds the config's model once per setting
(``train.dtype`` x ``optim.muon_ns_dtype``, float32 or bfloat16 each, everything else as in the config) and
steps them in turn, round after round, so drift in the machine's load reaches every setting alike. Each
step is timed in two parts, forward + backward and the optimizer step; the medians over the timed rounds go
to ``results.csv``, ``results.png`` and ``machine.json``, with this CPU's fp32 and bf16 matmul rates (the
measurement behind the warning ``attnlab train`` prints where bf16 is slow).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from .. import config as config_mod
from ..training.flops import measured_cpu_peak_tflops
from ..training.optim import build_optimizer
from ..training.runtime import pick_dtype
from .measure import machine_info
from .train import build, synthetic_batch, timed_step

DTYPES = ("float32", "bfloat16")
COLUMNS = ["train_dtype", "muon_ns_dtype", "rounds", "forward_backward_s", "optimizer_s", "step_s", "vs_float32"]


class Setting:
    """One (train.dtype, optim.muon_ns_dtype) model with its optimizer, stepped on a fixed batch."""

    def __init__(self, cfg, train_dtype: str, ns_dtype: str):
        cfg = config_mod.from_dict(
            config_mod.to_dict(cfg), [f"train.dtype={train_dtype}", f"optim.muon_ns_dtype={ns_dtype}"]
        )
        torch.manual_seed(0)
        self.key = (train_dtype, ns_dtype)
        self.model = build("attnlab", cfg).train()
        self.model.resolve_backends(torch.device("cpu"))
        self.opt = build_optimizer(self.model, cfg.optim)
        self.amp = pick_dtype(train_dtype, torch.device("cpu"))
        self.x, self.clip = synthetic_batch(cfg, "cpu"), cfg.optim.grad_clip or 1.0
        self.times: list[tuple[float, float]] = []

    def step(self) -> tuple[float, float]:
        return timed_step(self.model, self.model, self.opt, self.x, self.amp, self.clip)


def run(config: str, out: Path, rounds: int, warmup: int, overrides: list[str] | tuple = ()) -> list[dict]:
    cfg = config_mod.load(config, overrides)
    if cfg.optim.name != "muon":
        raise SystemExit(f"{config} does not use Muon (optim.name={cfg.optim.name}): pick a Muon config")
    settings = [Setting(cfg, a, b) for a in DTYPES for b in DTYPES]
    for r in range(warmup + rounds):
        for s in settings:
            fb, opt = s.step()
            print(f"round {r} {s.key}: forward+backward {fb:.2f} s, optimizer {opt:.2f} s", flush=True)
            if r >= warmup:
                s.times.append((fb, opt))
    rows = []
    for s in settings:
        fb, opt = (statistics.median(t[i] for t in s.times) for i in (0, 1))
        rows.append(dict(zip(COLUMNS, (*s.key, rounds, round(fb, 3), round(opt, 3), round(fb + opt, 3)))))
    for row in rows:
        row["vs_float32"] = round(row["step_s"] / rows[0]["step_s"], 2)
    _write(out, rows, config, warmup)
    return rows


def _write(out: Path, rows: list[dict], config: str, warmup: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    threads = torch.get_num_threads()
    info = machine_info(torch.device("cpu"))
    info["settings"] = {"config": config, "warmup_rounds": warmup, "threads": threads}
    info["matmul_tflops_1024"] = {d: measured_cpu_peak_tflops(threads, getattr(torch, d)) for d in DTYPES}
    (out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    plot(out, rows, f"{config} on {info['cpu']} ({info['cpu_capability']}), {threads} thread(s)")


def plot(out: Path, rows: list[dict], title: str) -> None:
    """results.png: each setting's step, forward + backward and optimizer step stacked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    labels = [f"train.dtype {r['train_dtype']}\nNewton–Schulz {r['muon_ns_dtype']}" for r in rows]
    fb = [float(r["forward_backward_s"]) for r in rows]
    ax.bar(labels, fb, label="forward + backward")
    ax.bar(labels, [float(r["optimizer_s"]) for r in rows], bottom=fb, label="optimizer step")
    ax.set_ylabel("seconds per training step (median)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m attnlab.bench.bf16_cpu", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/mainrun-best.yaml", help="a config that uses Muon")
    ap.add_argument("overrides", nargs="*", help="key=value settings applied to the config")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/bf16-cpu"))
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (every setting steps once per round)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a.config, a.out, a.rounds, a.warmup, a.overrides)


if __name__ == "__main__":
    main()
