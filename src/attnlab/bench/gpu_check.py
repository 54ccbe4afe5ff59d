"""``attnlab gpu-check``: every GPU path proved and the GPU's numbers recorded, in one command of a few minutes.

Six stages, in order of value, each in its own process under its own time
cap (``CAPS``: 9 minutes in all on one H200), each ending in one verdict line
``[stage] ok|failed|skipped|timed out: ...``:

1. ``cuda-tests``: ``pytest -m cuda`` (tests/test_cuda.py: flex and blocksparse
   vs the reference, caches, sampling, autocast, compile on CUDA);
2. ``attention``: attention alone, bf16, B=4 H=16 Dh=64, T=1k..32k, fwd and
   fwd+bwd: dense through attnlab vs raw SDPA, each sparse pattern through flex
   and blocksparse, the ideal speed-up 1/density beside the measured one;
3. ``train``: training tokens/s and MFU of the mainrun shape and a GPT-2-small
   shape, without and with ``torch.compile``;
4. ``mainrun``: the full mainrun protocol (7 epochs), its run records kept;
5. ``cifar10``: CIFAR-10, one mid-size model with dense vs strided attention for
   an equal training wall-clock each, bits/dim on the whole test split, samples;
6. ``generate``: per-token decoding time, KV cache vs recompute, per pattern up
   to 16k, and the decode step under ``torch.compile(mode="reduce-overhead")``.

Results go to ``benchmarks/gpu-<device>/`` (``--out`` to choose): machine.json,
one folder per stage (CSVs, plots, tables.md, log.txt, result.json) and
summary.md with every table and verdict, rewritten after every stage so a run
cut short still leaves its results. ``--dry-run`` is the same on CPU with tiny
sizes and caps of seconds (into a temporary folder unless ``--out``): the
test suite runs it, so the command cannot rot while no GPU is at hand.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .gpu_stages import REPO, STAGES

STAGE_TITLES = {
    "cuda-tests": "1. CUDA tests",
    "attention": "2. attention speed",
    "train": "3. training throughput and MFU",
    "mainrun": "4. the mainrun protocol",
    "cifar10": "5. CIFAR-10: dense vs strided",
    "generate": "6. generation",
}
CAPS = {"cuda-tests": 110, "attention": 80, "train": 80, "mainrun": 130, "cifar10": 70, "generate": 40}  # seconds
DRY_CAPS = {"cuda-tests": 90, "attention": 60, "train": 60, "mainrun": 60, "cifar10": 60, "generate": 60}
TOTAL_S = 510  # every stage on a GPU: with the install step and start-up, within 9 minutes
MIN_STAGE_S = 10  # a stage with less time left than this is skipped
VERDICTS = ("ok", "failed", "skipped", "timed out")


class StagesDidNotPass(UserError):
    """Some stages failed or ran out of time; the others' results are written all the same."""

    exit_code = 1


# ------------------------------------------------------------------ sizes


def _real_plan(hn_titles: str | None, cifar: str | None, workers: int) -> dict:
    sparse = ["local:window=256", "strided:local_attn_ctx=128", "fixed:local_attn_ctx=128:blocksize=32"]
    blocksparse = ":backend=blocksparse"  # prefill and recompute without a flex compile per length
    gpt2 = [
        "model.n_layer=12",
        "model.n_head=12",
        "model.d_model=768",
        "model.context=1024",
        "model.dropout=0",
        "model.attn_dropout=0",
        "data.vocab_size=50304",
        "train.batch_size=16",
        "optim.name=adamw",
    ]
    return {
        "cuda-tests": {"workers": workers, "paths": ["tests/test_cuda.py"]},  # other files may need what is missing
        "attention": {
            "seq_lens": [1024, 2048, 4096, 8192, 16384, 32768],
            "patterns": sparse,
            "backends": ["flex", "blocksparse"],
            "passes": ["fwd", "fwdbwd"],
            "repeats": 5,
            "warmup": 2,
            "batch": 4,
            "heads": 16,
            "head_dim": 64,
            "dtype": "bfloat16",
        },
        # GPT-2 small first: its compiled MFU is the number this stage exists for
        "train": {
            "shapes": {"gpt2-small": gpt2, "mainrun": []},
            "steps": 20,
            "warmup": 5,
            "compile": {"gpt2-small": [None, "inductor"], "mainrun": [None, "inductor"]},
        },
        "mainrun": {
            "presets": ["mainrun", "mainrun-best", "mainrun-fixed"],
            "overrides": [],
            "data_path": hn_titles or str(REPO.parent / "shared/data/hn_titles/titles.txt.gz"),
        },
        "cifar10": {
            "data_path": cifar or str(REPO.parent / "shared/data/cifar10"),
            "overrides": [
                "model.n_layer=16",
                "model.checkpoint_activations=false",
                "model.dropout=0",
                "optim.lr=1e-3",
                "optim.warmup_steps=50",
                "optim.schedule=constant",
                "train.epochs=none",
                "train.max_steps=1000000",
                "train.time_budget_s=15",
                "train.evals_per_epoch=none",
                "train.val_tokens=none",
                "train.eval_batch_size=64",
                "train.checkpoint_every=none",
                "logging.sample_images=16",
                "logging.attention_stats=0",
                "logging.log_every=20",
            ],
            "runs": {"strided": [], "dense": ["attention.pattern=dense"]},
        },
        "generate": {
            "overrides": [],
            "lengths": [1024, 16384],
            "window": 64,
            "repeats": 3,
            "specs": [
                "dense",
                *(
                    s + blocksparse
                    for s in ["local:window=256", "sink_window:sinks=4:window=256", sparse[1], sparse[2]]
                ),
                "linear",
            ],
            "compile_specs": ["sink_window:sinks=4:window=256" + blocksparse, "dense"],
            "compile_mode": "reduce-overhead",
            "compile_backend": "inductor",
        },
    }


def _dry_plan() -> dict:
    tiny = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.d_model=32",
        "model.context=32",
        "data.tokenizer=bytes",
        "train.batch_size=4",
    ]
    return {
        "cuda-tests": {"workers": 1, "paths": ["tests/test_cuda.py"]},
        "attention": {
            "seq_lens": [128, 256],
            "patterns": ["local:window=32", "strided:local_attn_ctx=16"],
            "backends": ["blocksparse", "sdpa"],
            "passes": ["fwd", "fwdbwd"],
            "repeats": 2,
            "warmup": 1,
            "batch": 1,
            "heads": 2,
            "head_dim": 16,
            "dtype": "float32",
        },
        "train": {
            "shapes": {"gpt2-small": tiny + ["model.n_layer=2", "optim.name=adamw"], "mainrun": tiny},
            "steps": 2,
            "warmup": 1,
            "compile": {"gpt2-small": [None, "eager"], "mainrun": [None]},
        },
        "mainrun": {
            "presets": ["mainrun"],
            "overrides": tiny
            + [
                "train.max_steps=4",
                "train.evals_per_epoch=none",
                "train.eval_every=2",
                "train.eval_batch_size=8",
                "train.checkpoint_every=none",
                "train.device=cpu",
            ],
        },
        "cifar10": {
            "overrides": [
                "data.source=digits",
                "data.path=none",
                "data.val_frac=0.1",
                "data.max_test=20",
                "model.n_layer=1",
                "model.d_model=16",
                "model.context=64",
                "model.checkpoint_activations=false",
                "model.dropout=0",
                "optim.warmup_steps=2",
                "optim.schedule=constant",
                "train.epochs=none",
                "train.max_steps=10",
                "train.time_budget_s=0.5",
                "train.evals_per_epoch=none",
                "train.val_tokens=none",
                "train.batch_size=8",
                "train.eval_batch_size=64",
                "train.checkpoint_every=none",
                "train.device=cpu",
                "logging.sample_images=4",
                "logging.attention_stats=0",
                "logging.log_every=5",
            ],
            "runs": {"strided": ["attention.local_attn_ctx=8"], "dense": ["attention.pattern=dense"]},
        },
        "generate": {
            "overrides": ["data.tokenizer=bytes", "model.n_layer=1", "model.n_head=2", "model.d_model=32"],
            "lengths": [64, 128],
            "window": 8,
            "repeats": 2,
            "specs": ["dense", "local:window=16", "sink_window:sinks=2:window=16"],
            "compile_specs": ["sink_window:sinks=2:window=16"],
            "compile_mode": None,
            "compile_backend": "eager",
        },
    }


def plan(
    dry: bool,
    *,
    hn_titles: str | None = None,
    cifar10: str | None = None,
    workers: int = 4,
    caps: dict[str, float] | None = None,
) -> dict:
    """Everything the stages need to know, JSON-serialisable: sizes, device, caps (dry: tiny, CPU, seconds)."""
    p = _dry_plan() if dry else _real_plan(hn_titles, cifar10, workers)
    p.update(dry_run=dry, device="cpu" if dry else "cuda", caps={**(DRY_CAPS if dry else CAPS), **(caps or {})})
    return p


# ------------------------------------------------------------------ the machine


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200': the results folder's name part."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s) or "gpu"


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(dry: bool) -> dict:
    """GPU, driver, CUDA, torch and Triton versions (CPU facts in a dry run), attnlab's commit, date."""
    import torch

    from .. import __version__
    from ..training.runtime import git_dirty, git_sha
    from .train import machine

    info = machine()
    gpu = torch.cuda.is_available() and not dry
    props = torch.cuda.get_device_properties(0) if gpu else None
    info.update(
        {
            "dry_run": dry,
            "device": "cuda" if gpu else "cpu",
            "device_name": torch.cuda.get_device_name(0) if gpu else info["cpu"],
            "gpu": torch.cuda.get_device_name(0) if gpu else None,
            "gpu_count": torch.cuda.device_count() if gpu else 0,
            "gpu_memory_gb": round(props.total_memory / 2**30, 1) if props else None,
            "compute_capability": f"{props.major}.{props.minor}" if props else None,
            "driver": _nvidia_smi("driver_version") if gpu else None,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if gpu else None,
            "triton": _version("triton") or _version("pytorch-triton"),
            "attnlab": __version__,
            "git_sha": git_sha(),
            "git_dirty": git_dirty(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    return info


# ------------------------------------------------------------------ running the stages


def run_stage(name: str, folder: Path, stage_plan: dict, cap: float) -> dict:
    """Run one stage in its own process group, killed at ``cap`` seconds; its verdict as a dict."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, "-m", "attnlab.bench.gpu_stages", name, str(folder), json.dumps(stage_plan)]
    t0 = time.monotonic()
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and whatever it started (pytest, attnlab train)
            proc.wait()
            return {
                "stage": name,
                "status": "timed out",
                "seconds": round(time.monotonic() - t0, 1),
                "cap": cap,
                "detail": f"stopped at its {cap:g} s cap; what it wrote is in {folder.name}/",
            }
    seconds = round(time.monotonic() - t0, 1)
    result = folder / "result.json"
    if result.exists():
        return {"stage": name, **json.loads(result.read_text()), "seconds": seconds, "cap": cap}
    tail = (folder / "log.txt").read_text().strip().splitlines()[-1:] or [""]
    return {
        "stage": name,
        "status": "failed",
        "seconds": seconds,
        "cap": cap,
        "detail": f"exit code {rc} without a result: {tail[0]} (see {folder.name}/log.txt)",
    }


def verdict_line(r: dict) -> str:
    return f"[{r['stage']}] {r['status']}: {r['detail']}"


def write_summary(out: Path, machine: dict, results: list[dict], stages: list[str]) -> Path:
    """summary.md: the machine, each stage's verdict, then every stage's tables."""
    m = machine
    head = [f"# attnlab GPU check: {m['device_name']}", ""]
    if m["dry_run"]:
        head += [
            "Dry run on CPU: tiny sizes and caps of seconds; it proves the command works, its numbers mean nothing.",
            "",
        ]
    head += [
        f"{m['time']}; attnlab {m['attnlab']} at {(m['git_sha'] or 'unknown')[:12]}"
        f"{' (uncommitted changes)' if m['git_dirty'] else ''}; torch {m['torch']}, CUDA {m['cuda']}, "
        f"Triton {m['triton']}, driver {m['driver']}; {m['cores']} CPU cores ({m['cpu']}).",
        "",
    ]
    done = {r["stage"]: r for r in results}
    rows = ["| stage | verdict | detail | seconds | cap |", "|---|---|---|---|---|"]
    for s in stages:
        r = done.get(s)
        rows.append(
            f"| {STAGE_TITLES[s]} | {r['status'] if r else 'not run yet'} | "
            f"{(r['detail'] if r else '').replace('|', '/')} | {r['seconds'] if r else ''} | {r['cap'] if r else ''} |"
        )
    body = []
    for s in stages:
        tables = out / s / "tables.md"
        body += [f"## {STAGE_TITLES[s]}", "", tables.read_text().strip() if tables.exists() else "(no tables)", ""]
    path = out / "summary.md"
    path.write_text("\n".join(head + ["## Verdicts", ""] + rows + [""] + body))
    return path


def default_out(dry: bool, device_name: str) -> Path:
    if dry:
        return Path(tempfile.mkdtemp(prefix="attnlab-gpu-check-"))
    return REPO / "benchmarks" / f"gpu-{slug(device_name)}"


def gpu_check(
    *,
    dry_run: bool = False,
    out: str | Path | None = None,
    stages: list[str] | None = None,
    caps: dict[str, float] | None = None,
    hn_titles: str | None = None,
    cifar10: str | None = None,
    workers: int = 4,
    install: dict | None = None,
    total_s: float | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the stages (default: all, in order) and return {"out", "machine", "results"}; see the module doc."""
    import torch

    start = time.monotonic()
    stages = stages or list(STAGES)
    if not dry_run and not torch.cuda.is_available():
        raise UserError(
            "no CUDA GPU is visible: run attnlab gpu-check on a GPU machine, or add --dry-run for the "
            "CPU rehearsal with tiny sizes"
        )
    the_plan = plan(dry_run, hn_titles=hn_titles, cifar10=cifar10, workers=workers, caps=caps)
    machine = machine_info(dry_run)
    machine["install"] = install
    out = Path(out) if out else default_out(dry_run, machine["device_name"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    (out / "plan.json").write_text(json.dumps(the_plan, indent=2) + "\n")
    log(
        f"attnlab gpu-check{' --dry-run' if dry_run else ''} on {machine['device_name']}: stages {', '.join(stages)}; "
        f"results in {out}"
    )
    total = total_s if total_s is not None else (None if dry_run else TOTAL_S)
    results: list[dict] = []
    write_summary(out, machine, results, stages)
    for name in stages:
        cap = float(the_plan["caps"][name])
        if total is not None:
            cap = min(cap, total - (time.monotonic() - start))
        if cap < MIN_STAGE_S and total is not None:
            result = {
                "stage": name,
                "status": "skipped",
                "seconds": 0.0,
                "cap": round(cap, 1),
                "detail": f"no time left in the {total:g} s budget",
            }
        else:
            stage_plan = copy.deepcopy(the_plan)
            stage_plan["caps"][name] = cap
            result = run_stage(name, out / name, stage_plan, cap)
        results.append(result)
        log(verdict_line(result))
        write_summary(out, machine, results, stages)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"summary: {out / 'summary.md'} ({time.monotonic() - start:.0f} s)")
    return {"out": out, "machine": machine, "results": results}


# ------------------------------------------------------------------ the command line


def parse_caps(items: list[str]) -> dict[str, float]:
    """``["attention=60", ...]`` -> {"attention": 60.0}; a stage name and seconds > 0 each."""
    caps = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if name not in STAGES or seconds <= 0:
            raise UserError(
                f"--cap {item!r} is not STAGE=SECONDS with a stage among {', '.join(STAGES)}: "
                "write e.g. --cap attention=60"
            )
        caps[name] = seconds
    return caps


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("gpu-check", help="prove every GPU path and record the GPU's numbers (--dry-run: on CPU)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="the same stages on CPU, tiny sizes, caps of seconds (results in a temporary folder unless --out)",
    )
    p.add_argument("--out", help="results folder (default benchmarks/gpu-<device>/)")
    p.add_argument(
        "--stages",
        nargs="+",
        choices=list(STAGES),
        metavar="STAGE",
        help=f"run only these, in this order (default all: {' '.join(STAGES)})",
    )
    p.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS", help="change a stage's time cap")
    p.add_argument("--hn-titles", help="mainrun: the HN titles file (default the preset's data.path)")
    p.add_argument(
        "--cifar10", help="CIFAR-10: the archive, its folder or the npz parts (default the preset's data.path)"
    )
    p.add_argument("--workers", type=int, default=4, help="pytest-xdist workers for the CUDA tests (if installed)")
    p.add_argument(
        "--install-report", help="JSON written by `python -m attnlab.deps --report FILE`, kept in machine.json"
    )
    return p


def run(args: argparse.Namespace) -> None:
    install = None
    if args.install_report and Path(args.install_report).is_file():
        install = json.loads(Path(args.install_report).read_text())
    result = gpu_check(
        dry_run=args.dry_run,
        out=args.out,
        stages=args.stages,
        caps=parse_caps(args.cap),
        hn_titles=args.hn_titles,
        cifar10=args.cifar10,
        workers=args.workers,
        install=install,
    )
    bad = [r for r in result["results"] if r["status"] in ("failed", "timed out")]
    if bad:
        raise StagesDidNotPass(
            f"{len(bad)} stage(s) did not pass ({', '.join(r['stage'] for r in bad)}): see their "
            f"verdicts in {result['out'] / 'summary.md'} and their log.txt"
        )
