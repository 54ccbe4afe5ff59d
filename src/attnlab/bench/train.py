"""``attnlab bench train``: training tokens/s and peak memory, attnlab vs the nanoGPT baseline.

Each measurement runs in a fresh subprocess (so peak resident memory belongs
to one model), and the two implementations alternate across repeats so that
drift in machine speed hits both alike. Both use the same step: forward,
cross-entropy, backward, grad clipping, optimizer step. The attnlab side runs
with attnlab's CPU runtime setting (``keep_freed_memory``), as ``attnlab
train`` does; ``--plain-runtime`` drops it to compare the models alone.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import config as config_mod
from ..openmp import describe as describe_openmp

IMPLS = ("attnlab", "nanogpt")


def _vocab(cfg) -> int:
    return cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 256


def build(impl: str, cfg):
    if impl == "attnlab":
        from ..model.gpt import GPT

        return GPT(cfg.model, cfg.attention, _vocab(cfg))
    from .nanogpt import NanoGPT

    m = cfg.model
    return NanoGPT(_vocab(cfg), m.context, m.d_model, m.n_layer, m.n_head, m.dropout)


def measure(impl: str, cfg, steps: int, warmup: int, plain_runtime: bool = False, compile: str | None = None) -> dict:
    """Run in the child process: time `steps` training steps after `warmup`.

    As ``attnlab train`` runs them: under autocast where ``cfg.train.dtype`` asks for it (auto: bf16 on
    GPUs that have it), and through ``torch.compile(backend=compile)`` when ``compile`` names a backend.
    """
    import contextlib

    from ..training.optim import build_optimizer
    from ..training.runtime import keep_freed_memory, peak_memory_mb, pick_device, pick_dtype

    torch.manual_seed(0)
    device = pick_device(cfg.train.device)
    if impl == "attnlab" and device.type == "cpu" and not plain_runtime:
        keep_freed_memory()  # what `attnlab train` does on CPU; the baseline runs as plain PyTorch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build(impl, cfg).to(device).train()
    if impl == "attnlab":
        model.resolve_backends(device)
    opt = build_optimizer(model, cfg.optim)
    forward = torch.compile(model, backend=compile) if compile else model
    amp = pick_dtype(cfg.train.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    B, T, V = cfg.train.batch_size, cfg.model.context, _vocab(cfg)
    x = torch.randint(0, V, (B, T + 1), device=device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast():
            logits = forward(x[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "impl": impl,
        "step_ms": step_s * 1e3,
        "tokens_per_second": B * T / step_s,
        "peak_memory_mb": peak_memory_mb(device),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _child(impl: str, cfg, steps: int, warmup: int, plain_runtime: bool) -> dict:
    code = (
        "import json,sys; from attnlab import config; from attnlab.bench.train import measure; "
        "cfg = config.from_dict(json.loads(sys.argv[1])); "
        f"print(json.dumps(measure({impl!r}, cfg, {steps}, {warmup}, {plain_runtime})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config_mod.to_dict(cfg))], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **describe_openmp(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_train(
    cfg, *, steps: int, warmup: int, repeats: int, out: str | None, baseline: bool = True, plain_runtime: bool = False
) -> dict:
    impls = IMPLS if baseline else IMPLS[:1]
    rows = []
    for r in range(repeats):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            row = {"repeat": r, **_child(impl, cfg, steps, warmup, plain_runtime)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "machine": machine(),
        "config": cfg.name,
        "batch_size": cfg.train.batch_size,
        "context": cfg.model.context,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "attnlab_runtime": "plain" if plain_runtime else "keep_freed_memory",
    }
    for impl in impls:
        sel = [r for r in rows if r["impl"] == impl]
        result[impl] = {
            k: statistics.median(r[k] for r in sel) for k in ("tokens_per_second", "step_ms", "peak_memory_mb")
        }
    if baseline:
        result["speed_ratio_attnlab_over_nanogpt"] = (
            result["attnlab"]["tokens_per_second"] / result["nanogpt"]["tokens_per_second"]
        )
        result["memory_ratio_attnlab_over_nanogpt"] = (
            result["attnlab"]["peak_memory_mb"] / result["nanogpt"]["peak_memory_mb"]
        )
    if out:
        _write(Path(out), rows, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return result


def _write(out: Path, rows: list[dict], result: dict) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to select

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    (out / "machine.json").write_text(json.dumps(result["machine"], indent=2))
    impls = [i for i in IMPLS if i in result]
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(
        axes, ("tokens_per_second", "peak_memory_mb"), ("training tokens/s (median)", "peak memory MB (median)")
    ):
        for i, impl in enumerate(impls):
            pts = [r[key] for r in rows if r["impl"] == impl]
            ax.scatter([i] * len(pts), pts, s=12, color="grey", zorder=3)
            ax.bar(i, result[impl][key], color=("tab:blue", "tab:orange")[i], alpha=0.8)
        ax.set_xticks(range(len(impls)), impls)
        ax.set_title(label, fontsize=9)
    fig.suptitle(
        f"{result['config']}: batch {result['batch_size']} x context {result['context']} on {result['machine']['cpu']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out / "train_throughput.png", dpi=120)
