"""``attnlab bench train``: training tokens/s and peak memory, attnlab vs the nanoGPT baseline.

Each measurement runs in a fresh subprocess (so peak resident memory belongs
to one model), and the two implementations alternate across repeats so that
drift in machine speed hits both alike. Both use the same step: forward,
cross-entropy, backward, grad clipping, optimizer step. The attnlab side runs
with attnlab's CPU runtime setting (``keep_freed_memory``), as ``attnlab
train`` does; ``--plain-runtime`` drops it to compare the models alone.
With ``train.compile=true`` both models run through ``torch.compile``, as
``attnlab train`` runs its model.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
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
from ..attention.heads import expand_kv
from ..openmp import describe as describe_openmp

IMPLS = ("attnlab", "nanogpt")
IDENTITY = "identity"  # the benchmark's attention-free step (``identity_attention``), not a pattern
DENSE = "dense"


def _vocab(cfg) -> int:
    return cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 256


EOS_ID = 0  # <eos> in every tokenizer attnlab builds (bytes, char, BPE)
MEAN_DOC_TOKENS = 16  # synthetic documents for configs that read them: about an HN title's length in BPE tokens


def _reads_documents(cfg) -> bool:
    return cfg.attention.document_mask or cfg.model.position_reset == "document"


def _separator(cfg) -> int:
    """The config's <eos> id, else attnlab's: there is no dataset here to take it from."""
    return EOS_ID if cfg.model.eos_id is None else cfg.model.eos_id


def build(impl: str, cfg):
    if impl == "attnlab":
        from ..model.gpt import GPT

        model_cfg = dataclasses.replace(cfg.model, eos_id=_separator(cfg)) if _reads_documents(cfg) else cfg.model
        return GPT(model_cfg, cfg.attention, _vocab(cfg))
    from .nanogpt import NanoGPT

    m = cfg.model
    return NanoGPT(_vocab(cfg), m.context, m.d_model, m.n_layer, m.n_head, m.dropout)


def synthetic_batch(cfg, device) -> torch.Tensor:
    """Random tokens (batch, context + 1); an <eos> about every MEAN_DOC_TOKENS where the model reads documents."""
    B, T = cfg.train.batch_size, cfg.model.context
    x = torch.randint(0, _vocab(cfg), (B, T + 1), device=device)
    if _reads_documents(cfg):
        x[torch.rand(x.shape, device=device) < 1 / MEAN_DOC_TOKENS] = _separator(cfg)
    return x


def identity_attention(q, k, v, pattern=None, dropout_p=0.0, training=False, **kw):
    """Attention that takes no time: the values themselves (expanded to the query heads), still differentiable.

    Benchmark-only: it is not a registered backend (no config can select it); ``bench train`` puts it in
    the model's layers to time a step without attention, the floor of any pattern's step."""
    return expand_kv(v, q.shape[1])


def _use_identity_attention(model) -> None:
    for block in model.blocks:
        block.attn.core.backend, block.attn.core._fn = IDENTITY, identity_attention


def timed_step(forward, model, opt, x: torch.Tensor, amp: torch.dtype | None, clip: float) -> tuple[float, float]:
    """One training step on the batch ``x`` (batch, context + 1) as ``attnlab train`` takes it: forward under
    autocast where ``amp`` asks for it, cross-entropy, backward, grad clipping, optimizer step. Returns the seconds
    spent in forward + backward and in the optimizer step (on CUDA, what was queued: synchronise to time it)."""
    t0 = time.perf_counter()
    with torch.autocast(x.device.type, dtype=amp) if amp else contextlib.nullcontext():
        logits = forward(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, time.perf_counter() - t1


def measure(
    impl: str,
    cfg,
    steps: int,
    warmup: int,
    plain_runtime: bool = False,
    compile: str | None = None,
    identity: bool = False,
) -> dict:
    """Run in the child process: time `steps` training steps after `warmup`.

    As ``attnlab train`` runs them: under autocast where ``cfg.train.dtype`` asks for it (auto: bf16 on
    GPUs that have it), and through ``torch.compile(backend=compile)`` when ``compile`` names a backend.
    ``identity``: attnlab's model with attention replaced by ``identity_attention``.
    """
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
        if identity:
            _use_identity_attention(model)
    opt = build_optimizer(model, cfg.optim)
    forward = torch.compile(model, backend=compile) if compile else model
    amp = pick_dtype(cfg.train.dtype, device)
    B, T = cfg.train.batch_size, cfg.model.context
    x = synthetic_batch(cfg, device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        timed_step(forward, model, opt, x, amp, cfg.optim.grad_clip or 1.0)
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


def _child(impl: str, cfg, steps: int, warmup: int, plain_runtime: bool, identity: bool = False) -> dict:
    backend = "inductor" if cfg.train.compile else None  # train.compile: torch.compile's default, as `attnlab train`
    code = (
        "import json,sys; from attnlab import config; from attnlab.bench.train import measure; "
        "cfg = config.from_dict(json.loads(sys.argv[1])); "
        f"print(json.dumps(measure({impl!r}, cfg, {steps}, {warmup}, {plain_runtime}, {backend!r}, {identity})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config_mod.to_dict(cfg))], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpuinfo(key: str) -> str | None:
    """The value of ``key`` on /proc/cpuinfo's first such line (Linux); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict:
    flags = (_cpuinfo("flags") or "").split()
    info = {
        "cpu": _cpuinfo("model name") or platform.processor(),
        # the widest vector instruction set torch uses, and the AVX/AMX flags that say whether the CPU has bf16
        # matrix units: CPUs alike by name can train at very different speeds (benchmarks/bf16-cpu)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vector_flags": sorted(f for f in flags if f.startswith(("avx", "amx"))),
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


def _run_info(cfg, steps: int, warmup: int, repeats: int, plain_runtime: bool) -> dict:
    """What every bench train result starts with: the machine, the config's shape and the timing settings."""
    return {
        "machine": machine(),
        "config": cfg.name,
        "batch_size": cfg.train.batch_size,
        "context": cfg.model.context,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "compile": cfg.train.compile,
        "attnlab_runtime": "plain" if plain_runtime else "keep_freed_memory",
    }


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
        **_run_info(cfg, steps, warmup, repeats, plain_runtime),
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


def _write_records(out: Path, rows: list[dict], result: dict) -> None:
    """results.csv (every measurement), summary.json and machine.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    (out / "machine.json").write_text(json.dumps(result["machine"], indent=2))


def _write(out: Path, rows: list[dict], result: dict) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to select

    _write_records(out, rows, result)
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


# ------------------------------------------------------------------ patterns and their Amdahl bound


def pattern_config(cfg, spec: str):
    """A copy of ``cfg`` whose every layer uses the pattern ``spec`` (``name`` or ``name:key=value:...``)."""
    return config_mod.apply_pattern_spec(config_mod.from_dict(config_mod.to_dict(cfg)), spec).validate()


def mean_density(cfg) -> float:
    """Allowed pairs / causal pairs at the model's context, averaged over the layers."""
    from ..attention.patterns import build_pattern

    m = cfg.model
    patterns = [build_pattern(cfg.attention, i, m.n_layer, m.n_head, m.context) for i in range(m.n_layer)]
    for p in patterns:
        p.check(m.context)
    by_pattern = {p: p.density(m.context, m.n_head) for p in set(patterns)}  # layers usually share one
    return statistics.fmean(by_pattern[p] for p in patterns)


def amdahl_bound(step_ms: dict[str, float], density: dict[str, float], tokens_per_step: int) -> dict[str, dict]:
    """Per pattern: its step against the step it would take if attention cost exactly its density's share of
    dense attention. ``step_ms`` holds medians for ``identity`` (attention taking no time), ``dense`` and
    each pattern; bound = identity + (dense - identity) x density; fraction_of_bound = bound / measured."""
    identity, dense = step_ms[IDENTITY], step_ms[DENSE]
    attention = dense - identity
    out = {}
    for label, ms in step_ms.items():
        if label == IDENTITY:
            continue
        bound = identity + attention * density[label]
        out[label] = {
            "step_ms": ms,
            "tokens_per_second": tokens_per_step * 1e3 / ms,
            "density": density[label],
            "bound_step_ms": bound,
            "fraction_of_bound": bound / ms,
            "speedup_vs_dense": dense / ms,
        }
    return out


def bench_train_patterns(
    cfg, specs: list[str], *, steps: int, warmup: int, repeats: int, out: str | None, plain_runtime: bool = False
) -> dict:
    """attnlab's training step for each pattern of ``specs``, with dense and the attention-free step measured in
    the same run (each in a fresh process, the order reversed every other repeat), and each pattern's Amdahl
    bound (``amdahl_bound``)."""
    variants = {IDENTITY: (pattern_config(cfg, DENSE), True), DENSE: (pattern_config(cfg, DENSE), False)}
    for spec in specs:
        variants.setdefault(spec, (pattern_config(cfg, spec), False))
    density = {label: 0.0 if identity else mean_density(c) for label, (c, identity) in variants.items()}
    rows = []
    for r in range(repeats):
        labels = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for label in labels:
            c, identity = variants[label]
            measured = _child("attnlab", c, steps, warmup, plain_runtime, identity)
            row = {"repeat": r, "pattern": label, "density": round(density[label], 6), **measured}
            rows.append(row)
            print(json.dumps(row), flush=True)
    med = {k: {m: statistics.median(r[m] for r in rows if r["pattern"] == k) for m in _METRICS} for k in variants}
    tokens = cfg.train.batch_size * cfg.model.context
    bound = amdahl_bound({k: v["step_ms"] for k, v in med.items()}, density, tokens)
    for label, b in bound.items():
        b["peak_memory_mb"] = med[label]["peak_memory_mb"]
        b["memory_vs_dense"] = med[label]["peak_memory_mb"] / med[DENSE]["peak_memory_mb"]
    result = {
        **_run_info(cfg, steps, warmup, repeats, plain_runtime),
        "identity": {**med[IDENTITY], "tokens_per_second": tokens * 1e3 / med[IDENTITY]["step_ms"]},
        "dense_attention_ms": med[DENSE]["step_ms"] - med[IDENTITY]["step_ms"],
        "patterns": bound,
        "bound": "bound_step_ms = identity step + (dense step - identity step) x density; "
        "fraction_of_bound = bound_step_ms / step_ms (medians over repeats)",
    }
    if out:
        _write_patterns(Path(out), rows, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    return result


_METRICS = ("step_ms", "tokens_per_second", "peak_memory_mb")


def _write_patterns(out: Path, rows: list[dict], result: dict) -> None:
    from matplotlib.figure import Figure

    _write_records(out, rows, result)
    labels = list(result["patterns"])
    pats = result["patterns"]
    fig = Figure(figsize=(max(8, 1.6 * len(labels)), 3.6))
    ax_t, ax_m = fig.subplots(1, 2)
    xs = range(len(labels))
    ax_t.bar(xs, [pats[k]["tokens_per_second"] for k in labels], color="tab:blue", alpha=0.8, label="measured")
    tokens = result["batch_size"] * result["context"]
    ax_t.scatter(xs, [tokens * 1e3 / pats[k]["bound_step_ms"] for k in labels], marker="_", s=400, color="k",
                 zorder=3, label="Amdahl bound")  # fmt: skip
    ax_t.axhline(result["identity"]["tokens_per_second"], color="grey", ls="--", lw=1, label="attention-free step")
    ax_t.set_title("training tokens/s (median)", fontsize=9)
    ax_t.legend(fontsize=7)
    ax_m.bar(xs, [pats[k]["peak_memory_mb"] for k in labels], color="tab:orange", alpha=0.8)
    ax_m.set_title("peak memory MB (median)", fontsize=9)
    for ax in (ax_t, ax_m):
        ax.set_xticks(list(xs), [k.replace(":", "\n") for k in labels], fontsize=6)
    fig.suptitle(
        f"{result['config']}: batch {result['batch_size']} x context {result['context']} on {result['machine']['cpu']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out / "train_patterns.png", dpi=120)
