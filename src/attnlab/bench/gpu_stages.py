"""The six stages of ``attnlab gpu-check``; each runs in its own process and writes its files as it goes.

``python -m attnlab.bench.gpu_stages STAGE FOLDER PLAN_JSON`` runs one stage
(``gpu_check`` starts it and enforces the stage's time cap). A stage writes
into FOLDER: its CSVs and plots, ``tables.md`` (its Markdown tables, rewritten
after every measurement, so a stage cut short still leaves what it measured)
and last ``result.json`` (``status``: ok, failed, skipped or timed out, and a
one-line ``detail``). ``PLAN_JSON`` holds the sizes (``gpu_check.plan``): the
real ones on a GPU, tiny ones on CPU for the dry run.

Stages that train (``mainrun``, ``cifar10``) or test (``cuda-tests``) start
``attnlab train`` / ``pytest`` themselves; shortly before their cap they
interrupt it (SIGINT: the trainer saves and stops), copy what it wrote and
report "timed out".
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..training.logs import read_events

REPO = Path(__file__).resolve().parents[3]  # src/attnlab/bench/ -> the checkout
MAINRUN_TARGET, MAINRUN_TOLERANCE = 1.753, 0.03  # the organisers' baseline, in the challenge's own number
WRAP_UP_S = 15.0  # what a stage keeps for itself after stopping its subprocess (copying, tables)


# ------------------------------------------------------------------ a stage's surroundings


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


@dataclass
class Stage:
    """One stage's folder, plan and deadline, and its Markdown tables (rewritten to tables.md on every change)."""

    name: str
    folder: Path
    plan: dict
    deadline: float  # time.monotonic() by which the stage must have finished
    sections: dict[str, str] = field(default_factory=dict)

    @property
    def dry(self) -> bool:
        return self.plan["dry_run"]

    @property
    def device(self) -> str:
        return self.plan["device"]

    @property
    def p(self) -> dict:
        return self.plan[self.name]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def table(self, title: str, body: str) -> None:
        self.sections[title] = body
        text = "\n\n".join(f"**{t}**\n\n{b}" for t, b in self.sections.items())
        (self.folder / "tables.md").write_text(text + "\n")


def run_logged(cmd: list[str], log: Path, timeout: float, cwd: Path = REPO) -> tuple[int | None, bool]:
    """Run ``cmd`` with its output in ``log``; past ``timeout`` s interrupt it (SIGINT, then kill). (rc, timed out)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            return proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=WRAP_UP_S / 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return None, True


def attnlab_train(
    stage: Stage, preset: str, name: str, overrides: list[str], out_dir: Path
) -> tuple[dict | None, bool]:
    """``attnlab train`` of a preset into out_dir/name within the stage's time; (summary or None, timed out)."""
    cmd = [
        sys.executable,
        "-m",
        "attnlab",
        "train",
        str(REPO / "configs" / preset),
        f"name={name}",
        f"out_dir={out_dir}",
        "logging.progress=false",
        *overrides,
    ]
    stage.log(" ".join(cmd))
    rc, timed_out = run_logged(cmd, stage.folder / f"{name}.log", stage.remaining() - WRAP_UP_S)
    summary = out_dir / name / "summary.json"
    if not timed_out and rc != 0:
        tail = (stage.folder / f"{name}.log").read_text().strip().splitlines()[-1:] or [f"exit code {rc}"]
        raise RuntimeError(f"attnlab train {name} failed: {tail[0]}")
    return (json.loads(summary.read_text()) if summary.exists() else None), timed_out


def keep_run(run: Path, dest: Path) -> None:
    """Copy a run directory's records (config, meta, events, summary, plots, samples), not its checkpoints."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("config.yaml", "meta.json", "events.jsonl", "summary.json", "plots", "samples"):
        src = run / item
        if src.is_dir():
            shutil.copytree(src, dest / item, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dest / item)


def write_tiny_corpus(path: Path, n_docs: int = 400) -> Path:
    """A small seeded text of short lines, for the dry run's training stages (no dataset needed)."""
    import random

    words = "the a model attention head layer token sparse dense window stride block learns predicts next byte".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ 1. CUDA tests

_PROGRESS = re.compile(r"\[\s*\d+%\]")
_OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"^=+ (.+?) in [\d.]+s")


def parse_pytest(text: str) -> dict:
    """Counts of each outcome from pytest -v output (progress lines), its final summary line and failed ids."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if _PROGRESS.search(line) and (m := _OUTCOME.search(line)):
            counts[m.group(1).lower()] = counts.get(m.group(1).lower(), 0) + 1
    summaries = [m.group(1) for line in text.splitlines() if (m := _SUMMARY.match(line.strip()))]
    failed = [
        line.split()[1]
        for line in text.splitlines()
        if line.startswith(("FAILED ", "ERROR ")) and len(line.split()) > 1
    ]
    return {"counts": counts, "summary": summaries[-1] if summaries else None, "failed": failed}


def cuda_tests(stage: Stage) -> tuple[str, str]:
    if importlib.util.find_spec("pytest") is None:
        return "skipped", "pytest is not installed and could not be installed: pip install pytest, then rerun"
    tests = REPO / "tests"
    if not (tests / "test_cuda.py").is_file():
        return "skipped", f"no tests at {tests}: run the check from a checkout of attnlab"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        *(str(REPO / t) for t in stage.p["paths"]),
        "-v",
        "-rfEs",
        "-o",
        "addopts=",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={stage.folder / 'junit.xml'}",
    ]
    workers = stage.p["workers"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    stage.log(" ".join(cmd))
    rc, timed_out = run_logged(cmd, stage.folder / "pytest.txt", stage.remaining() - WRAP_UP_S)
    result = parse_pytest((stage.folder / "pytest.txt").read_text())
    counts = result["counts"]
    stage.table("pytest -m cuda", md_table(["outcome", "tests"], sorted(counts.items())) if counts else "no test ran")
    if result["failed"]:
        stage.table("failed", "\n".join(f"- `{t}`" for t in result["failed"]))
    said = result["summary"] or ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing ran"
    skipped_why = "; all skipped: needs CUDA" if counts and set(counts) == {"skipped"} else ""
    if timed_out:
        return "timed out", f"{said} before the cap (see pytest.txt)"
    if rc == 0 and skipped_why and not stage.dry:
        return "failed", f"{said}: no CUDA test ran on this GPU machine (see pytest.txt for the skip reasons)"
    if rc == 0:
        return "ok", said + skipped_why
    if rc == 5:
        return "failed", "no test carries the cuda marker"
    return "failed", f"{said}: {', '.join(result['failed'][:3])}" if result["failed"] else said


# ------------------------------------------------------------------ 2. attention speed


def attention(stage: Stage) -> tuple[str, str]:
    from .attention import BASELINE, bench_attention, plot_attention

    p, rows, skipped = stage.p, [], []
    common = dict(
        repeats=p["repeats"],
        warmup=p["warmup"],
        batch=p["batch"],
        heads=p["heads"],
        head_dim=p["head_dim"],
        dtype=p["dtype"],
        device=stage.device,
        log=stage.log,
    )
    for T in p["seq_lens"]:
        for group, patterns, backends in (("dense", ["dense"], ["auto"]), ("sparse", p["patterns"], p["backends"])):
            raw = stage.folder / "raw" / f"{group}-{T}.csv"
            got = bench_attention(
                patterns, [T], backends, p["passes"], out=raw, plot=False, **common
            )  # one plot at the end
            rows += [r for r in got if group == "dense" or r["backend"] != BASELINE]  # one baseline per length
            skipped += json.loads(raw.with_suffix(".json").read_text())["skipped"]  # rows a backend could not run
        attention_tables(stage, rows, skipped)  # after every length: a stage cut short keeps the lengths it finished
    plot_attention(
        rows,
        stage.folder / "attention.png",
        f"attention, batch {p['batch']} x heads {p['heads']} x head_dim {p['head_dim']}, {p['dtype']}",
    )
    return "ok", (
        f"{len(rows)} rows, T={','.join(map(str, p['seq_lens']))}"
        + (f", {len(skipped)} not measured (see the summary)" if skipped else "")
        + "; see attention.csv"
    )


def attention_rows(rows: list[dict]) -> list[dict]:
    """Each measured row with its speed-up over raw SDPA (timed alternately with it) and the ideal 1/density."""
    from .attention import BASELINE

    base = {(r["seq_len"], r["pass"]): r["median_ms"] for r in rows if r["backend"] == BASELINE}
    out = []
    for r in rows:
        b = r.get("baseline_ms") or base.get((r["seq_len"], r["pass"]))
        speedup = b / r["median_ms"] if b and r["backend"] != BASELINE else None
        ideal = 1 / r["density"] if r["density"] else None
        out.append(
            {
                **r,
                "sdpa_ms": b,
                "speedup": speedup,
                "ideal_speedup": ideal,
                "of_ideal": speedup / ideal if speedup and ideal and r["pattern"] != "dense" else None,
            }
        )
    return out


def attention_tables(stage: Stage, rows: list[dict], skipped: list[dict]) -> None:
    import csv

    table = attention_rows(rows)
    with open(stage.folder / "attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    dense = [r for r in table if r["pattern"] == "dense" and r["speedup"] is not None]
    stage.table(
        "dense through attnlab vs raw SDPA (sdpa ms / attnlab ms; target >= 0.95 fwd+bwd)",
        md_table(
            ["T", "pass", "backend", "attnlab ms", "SDPA ms", "ratio"],
            [[r["seq_len"], r["pass"], r["backend"], r["median_ms"], r["sdpa_ms"], r["speedup"]] for r in dense],
        ),
    )
    sparse = [r for r in table if r["pattern"] != "dense" and r["speedup"] is not None]
    stage.table(
        "sparse patterns: measured speed-up over dense SDPA beside the ideal 1/density",
        md_table(
            ["pattern", "params", "backend", "T", "pass", "ms", "density", "ideal", "measured", "of ideal"],
            [
                [
                    r["pattern"],
                    r["params"],
                    r["backend"],
                    r["seq_len"],
                    r["pass"],
                    r["median_ms"],
                    r["density"],
                    r["ideal_speedup"],
                    r["speedup"],
                    r["of_ideal"],
                ]
                for r in sparse
            ],
        ),
    )
    if skipped:
        stage.table(
            "not measured (the backend refused or failed)",
            md_table(
                ["pattern", "backend", "T", "pass", "reason"],
                [[r["pattern"], r["backend"], r["seq_len"], r["pass"], r["reason"]] for r in skipped],
            ),
        )
    stage.table("targets", attention_targets(table, stage.dry))


def attention_targets(table: list[dict], dry: bool) -> str:
    if dry:
        return "not judged in a dry run (CPU, tiny sizes)"
    lines = []
    dense = [r for r in table if r["pattern"] == "dense" and r["pass"] == "fwdbwd" and r["speedup"] is not None]
    if dense:
        worst = min(dense, key=lambda r: r["speedup"])
        lines.append(
            f"- dense through attnlab >= 0.95x raw SDPA fwd+bwd at every T: worst {worst['speedup']:.3f}x at "
            f"T={worst['seq_len']}: {'met' if worst['speedup'] >= 0.95 else 'NOT met'}"
        )
    for name in ("local", "strided", "fixed"):
        sel = [
            r
            for r in table
            if r["pattern"] == name
            and r["backend"] == "flex"
            and r["seq_len"] >= 8192
            and r["pass"] == "fwdbwd"
            and r["of_ideal"] is not None
        ]
        if sel:
            worst = min(sel, key=lambda r: r["of_ideal"])
            lines.append(
                f"- {name} through flex >= 0.6 of its ideal speed-up at T >= 8k (fwd+bwd): worst "
                f"{worst['of_ideal']:.2f} at T={worst['seq_len']}: {'met' if worst['of_ideal'] >= 0.6 else 'NOT met'}"
            )
    return "\n".join(lines) or "no rows to judge"


# ------------------------------------------------------------------ 3. training throughput and MFU


def train_throughput(stage: Stage) -> tuple[str, str]:
    import torch

    from .. import config
    from ..model.gpt import GPT
    from ..training import flops
    from .train import _vocab, measure

    p, rows = stage.p, []
    peak = flops.device_peak_tflops(torch.device(stage.device))
    for shape, overrides in p["shapes"].items():
        cfg = config.load(REPO / "configs" / "mainrun.yaml", [f"train.device={stage.device}", *overrides])
        with torch.device("meta"):
            per_token = flops.flops_per_token(GPT(cfg.model, cfg.attention, _vocab(cfg)), cfg.model.context)
        for backend in p["compile"][shape]:
            m = measure("attnlab", cfg, p["steps"], p["warmup"], compile=backend)
            rows.append(
                {
                    "shape": shape,
                    "compile": backend or "off",
                    "layers": cfg.model.n_layer,
                    "d_model": cfg.model.d_model,
                    "context": cfg.model.context,
                    "batch": cfg.train.batch_size,
                    "params": m["params"],
                    "tokens_per_s": m["tokens_per_second"],
                    "step_ms": m["step_ms"],
                    "peak_mb": m["peak_memory_mb"],
                    "flops_per_token": per_token,
                    "mfu": flops.mfu(per_token, m["tokens_per_second"], peak),
                }
            )
            stage.log(json.dumps(rows[-1]))
            train_tables(stage, rows, peak)
    return "ok", "; ".join(
        f"{r['shape']} compile={r['compile']}: {r['tokens_per_s']:,.0f} tok/s"
        + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
        for r in rows
    )


def train_tables(stage: Stage, rows: list[dict], peak: float | None) -> None:
    import csv

    with open(stage.folder / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    stage.table(
        f"training throughput (bf16 peak: {f'{peak:g} TFLOPS' if peak else 'unknown here'}; "
        "MFU = FLOPs/token x tokens/s / peak)",
        md_table(
            [
                "shape",
                "compile",
                "layers",
                "d_model",
                "context",
                "batch",
                "params",
                "tokens/s",
                "step ms",
                "peak MB",
                "GFLOPs/token",
                "MFU",
            ],
            [
                [
                    r["shape"],
                    r["compile"],
                    r["layers"],
                    r["d_model"],
                    r["context"],
                    r["batch"],
                    r["params"],
                    r["tokens_per_s"],
                    r["step_ms"],
                    r["peak_mb"],
                    r["flops_per_token"] / 1e9,
                    None if r["mfu"] is None else f"{r['mfu']:.1%}",
                ]
                for r in rows
            ],
        ),
    )
    best = [r for r in rows if r["shape"] == "gpt2-small" and r["compile"] != "off" and r["mfu"] is not None]
    if best and not stage.dry:
        stage.table(
            "targets",
            f"- MFU >= 40% bf16 for the GPT-2-small shape with compile: {best[0]['mfu']:.1%}: "
            f"{'met' if best[0]['mfu'] >= 0.40 else 'NOT met'}",
        )


# ------------------------------------------------------------------ 4. the mainrun protocol


def mainrun(stage: Stage) -> tuple[str, str]:
    """The mainrun preset (and mainrun-best where that preset exists), each a whole run; records kept."""
    p = stage.p
    presets = [name for name in p["presets"] if (REPO / "configs" / f"{name}.yaml").is_file()]
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(p["overrides"])
        if stage.dry:
            corpus = write_tiny_corpus(Path(tmp) / "titles.txt")
            overrides = [
                f"data.source={corpus}",
                "data.path=none",
                "data.format=lines",
                f"data.dir={Path(tmp) / 'data'}",
                *overrides,
            ]
        else:
            data = Path(p["data_path"])
            if not data.exists():
                return "skipped", f"the HN titles are not at {data}: pass --hn-titles PATH (titles.txt.gz)"
            overrides = [f"data.path={data.resolve()}", *overrides]
        for name in presets:
            if stage.remaining() < 2 * WRAP_UP_S:
                return "timed out", f"no time left for {name}" + (f" after {'; '.join(details)}" if details else "")
            summary, timed_out = attnlab_train(stage, f"{name}.yaml", name, overrides, Path(tmp))
            folder = stage.folder / ("run" if name == "mainrun" else f"run-{name}")
            keep_run(Path(tmp) / name, folder)
            if summary is not None and not timed_out:
                summary = {**summary, **mainrun_exact(stage, Path(tmp) / name, folder)}
            mainrun_table(stage, name, folder, summary)
            steps = read_events(folder, "training_step")
            if timed_out or summary is None:
                return (
                    "timed out",
                    f"{name} stopped at step {steps[-1]['step'] if steps else 0} before the cap; "
                    f"records in {folder.name}/",
                )
            details.append(
                f"{name}: mainrun val loss {summary['mainrun_val_loss']:.4f} in "
                f"{summary['train_seconds'] / 60:.1f} min of training"
            )
    return "ok", "; ".join(details) + f" (target {MAINRUN_TARGET} +- {MAINRUN_TOLERANCE})"


def mainrun_exact(stage: Stage, run: Path, folder: Path) -> dict:
    """``attnlab eval RUN --mainrun-exact``: the challenge's own number beside attnlab's; {} if it could not run."""
    cmd = [sys.executable, "-m", "attnlab", "eval", str(run), "--mainrun-exact", "--device", stage.device]
    log = folder / "eval-mainrun-exact.log"
    rc, _ = run_logged(cmd, log, stage.remaining() - WRAP_UP_S)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")] if rc == 0 else []
    if not lines:
        stage.log(f"attnlab eval --mainrun-exact failed; see {log.name}")
        return {}
    result = json.loads(lines[-1])
    (folder / "eval-mainrun-exact.json").write_text(json.dumps(result, indent=2) + "\n")
    return {k: v for k, v in result.items() if k.startswith("mainrun_exact_")}


def mainrun_table(stage: Stage, name: str, folder: Path, summary: dict | None) -> None:
    evals, steps = read_events(folder, "validation_step"), read_events(folder, "training_step")
    mfu = [e["mfu"] for e in steps if "mfu" in e]
    rows = [
        ["evaluations", len(evals)],
        ["last logged step", steps[-1]["step"] if steps else None],
        ["median MFU", statistics.median(mfu) if mfu else None],
    ]
    if summary:
        rows = [
            ["val bits/byte", summary["val_bits_per_byte"]],
            ["mainrun val loss (nats per char of the <eos>-joined titles)", summary["mainrun_val_loss"]],
            ["the challenge's own number (`eval --mainrun-exact`)", summary.get("mainrun_exact_val_loss")],
            ["share of the split it scores", summary.get("mainrun_exact_val_coverage")],
            ["epochs", summary["epochs"]],
            ["steps", summary["steps"]],
            ["train minutes", summary["train_seconds"] / 60],
            ["wall minutes", summary["wall_seconds"] / 60],
            ["tokens/s", summary["tokens_per_second"]],
            ["peak MB", summary["peak_memory_mb"]],
        ] + rows
    stage.table(f"{name} (run records in {folder.name}/)", md_table(["", "value"], rows))
    number = (summary or {}).get("mainrun_exact_val_loss")
    if number is not None and name == "mainrun" and not stage.dry:
        within = abs(number - MAINRUN_TARGET) <= MAINRUN_TOLERANCE
        stage.table(
            "against the organisers' baseline",
            f"- the challenge's number {number:.4f} vs the organisers' {MAINRUN_TARGET}: {number - MAINRUN_TARGET:+.4f} "
            f"({'within' if within else 'outside'} +-{MAINRUN_TOLERANCE})",
        )


# ------------------------------------------------------------------ 5. CIFAR-10 dense vs strided


def cifar10(stage: Stage) -> tuple[str, str]:
    p = stage.p
    with tempfile.TemporaryDirectory() as tmp:
        common = list(p["overrides"])
        if stage.dry:
            if importlib.util.find_spec("sklearn") is None:
                return "skipped", "the dry run's stand-in images (digits) need scikit-learn"
            common = [f"data.dir={Path(tmp) / 'data'}", *common]
        else:
            data = Path(p["data_path"])
            if not data.exists():
                return "skipped", (
                    f"CIFAR-10 is not at {data}: pass --cifar10 PATH (the official archive, its "
                    "extracted folder or the npz parts)"
                )
            common = [f"data.path={data.resolve()}", *common]
        rows, stopped = [], False
        for pattern, extra in p["runs"].items():
            if stage.remaining() < WRAP_UP_S * 2:
                stopped = True
                break
            summary, timed_out = attnlab_train(
                stage, "cifar10-sparse-transformer.yaml", f"cifar10-{pattern}", common + extra, Path(tmp)
            )
            run = Path(tmp) / f"cifar10-{pattern}"
            keep_run(run, stage.folder / f"cifar10-{pattern}")
            grids = sorted((run / "samples").glob("*.png")) if (run / "samples").exists() else []
            if grids:
                shutil.copy2(grids[-1], stage.folder / f"samples-{pattern}.png")
            rows.append(cifar_row(pattern, summary, bool(grids)))
            stage.table(
                "equal training wall-clock each; bits/dim of the whole test split",
                md_table(
                    [
                        "pattern",
                        "backend",
                        "steps",
                        "train s",
                        "val bits/dim",
                        "test bits/dim",
                        "test images",
                        "samples",
                    ],
                    rows,
                ),
            )
            if timed_out or summary is None:
                stopped = True
                break
    if stopped:
        return "timed out", f"{len(rows)} of {len(p['runs'])} runs finished before the cap"
    return "ok", "; ".join(f"{r[0]}: test {r[5]:.3f} bits/dim in {r[2]} steps" for r in rows)


def cifar_row(pattern: str, summary: dict | None, grid: bool) -> list:
    if summary is None:
        return [pattern, None, None, None, None, None, None, "-"]
    backends = ",".join(dict.fromkeys(a["backend"] for a in summary["attention"]))
    return [
        pattern,
        backends,
        summary["steps"],
        summary["train_seconds"],
        summary.get("val_bits_per_dim"),
        summary.get("test_bits_per_dim"),
        summary.get("test_images_scored"),
        f"samples-{pattern}.png" if grid else "-",
    ]


# ------------------------------------------------------------------ 6. generation


def generate(stage: Stage) -> tuple[str, str]:
    import csv

    from .. import config
    from .decode import COLUMNS, bench_decode, flatness

    p, rows = stage.p, []
    cfg = config.load(REPO / "configs" / "quickstart.yaml", p["overrides"])
    with open(stage.folder / "generate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()

        def on_row(row: dict) -> None:  # written as soon as measured: a stage cut short keeps its rows
            rows.append(row)
            writer.writerow(row)
            f.flush()
            stage.log(json.dumps(row))
            generate_tables(stage, rows, flatness(rows))

        bench_decode(
            cfg,
            p["specs"],
            p["lengths"],
            window=p["window"],
            repeats=p["repeats"],
            device=stage.device,
            compile_specs=p["compile_specs"],
            compile_mode=p["compile_mode"],
            compile_backend=p["compile_backend"],
            on_row=on_row,
        )
    flat = flatness(rows)
    return "ok", "; ".join(
        f"{t['spec']} {t['from']}->{t['to']}: x{t['ratio']:.2f}" for t in flat
    ) or f"{len(rows)} rows"


def generate_tables(stage: Stage, rows: list[dict], flat: list[dict]) -> None:
    rec = {(r["spec"], r["length"]): r["ms_per_token"] for r in rows if r["mode"] == "recompute"}
    cached = [r for r in rows if r["mode"] == "cache"]
    stage.table(
        "per-token time: KV cache (prefill, then timed steps) vs recompute",
        md_table(
            [
                "spec",
                "backend",
                "length",
                "cached ms/token",
                "cached tokens/s",
                "recompute ms/token",
                "speed-up",
                "cache MB",
            ],
            [
                [
                    r["spec"],
                    r["backend"],
                    r["length"],
                    r["ms_per_token"],
                    r["tokens_per_s"],
                    rec.get((r["spec"], r["length"])),
                    r["speedup"],
                    r["cache_mb"],
                ]
                for r in cached
            ],
        ),
    )
    compiled = [r for r in rows if r["mode"] == "cache+compile"]
    if compiled:
        eager = {(r["spec"], r["length"]): r["ms_per_token"] for r in cached}
        stage.table(
            f"decode step compiled (mode={stage.p['compile_mode']}, backend={stage.p['compile_backend']})",
            md_table(
                ["spec", "length", "eager ms/token", "compiled ms/token", "compile + warm-up s"],
                [
                    [r["spec"], r["length"], eager.get((r["spec"], r["length"])), r["ms_per_token"], r["compile_s"]]
                    for r in compiled
                ],
            ),
        )
    if flat:
        stage.table(
            "bounded caches: ms/token at the longest length over the shortest (flat: within 10%)",
            md_table(
                ["spec", "from", "to", "ratio", "flat"],
                [[t["spec"], t["from"], t["to"], t["ratio"], "met" if t["met"] else "NOT met"] for t in flat],
            ),
        )


STAGES: dict[str, Callable[[Stage], tuple[str, str]]] = {
    "cuda-tests": cuda_tests,
    "attention": attention,
    "train": train_throughput,
    "mainrun": mainrun,
    "cifar10": cifar10,
    "generate": generate,
}


def main(argv: list[str]) -> int:
    """Run one stage: STAGE FOLDER PLAN_JSON; the result goes to FOLDER/result.json."""
    name, folder, plan = argv[0], Path(argv[1]), json.loads(argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    stage = Stage(name, folder, plan, time.monotonic() + plan["caps"][name] - 2.0)
    try:
        status, detail = STAGES[name](stage)
    except Exception as e:
        traceback.print_exc()
        status, detail = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    (folder / "result.json").write_text(json.dumps({"status": status, "detail": detail}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
