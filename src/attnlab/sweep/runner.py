"""Running a sweep: each run an `attnlab train` subprocess, N at a time, recorded in runs.json, then one report."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import config as config_mod
from .. import folders
from ..errors import UserError
from .spec import RunSpec, Sweep, expand


class SweepRunsFailed(UserError):
    """Some runs of a sweep failed; the others finished and are recorded in runs.json."""

    exit_code = 1


def run_sweep(
    sweep: Sweep,
    *,
    parallel: int | None = None,
    resume: bool = False,
    force: bool = False,
    report: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Train every run of the sweep (N at a time), record each in runs.json and build one report."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    parallel = sweep.parallel if parallel is None else parallel
    if parallel < 1:
        raise UserError(f"--parallel {parallel}: run at least 1 process at a time")
    if resume and force:
        raise UserError("--resume and --force exclude each other: --resume finishes a sweep, --force replaces it")
    specs = expand(sweep)
    folders.make_parent(sweep.folder, "sweep folder", UserError)
    with folders.locked(sweep.folder, "sweep folder", error=UserError):  # one sweep process per folder
        return _run_locked(sweep, specs, parallel, resume, force, report, echo)


def _run_locked(
    sweep: Sweep,
    specs: list[RunSpec],
    parallel: int,
    resume: bool,
    force: bool,
    report: bool,
    echo: Callable[[str], None],
) -> dict:
    previous = _check_folder(sweep, resume=resume, force=force)
    _prepare_datasets(specs)  # before any run: parallel runs must not race to write the same dataset folder
    if force and sweep.folder.exists():
        shutil.rmtree(sweep.folder)
    (sweep.folder / "logs").mkdir(parents=True, exist_ok=True)
    (sweep.folder / "sweep.yaml").write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False), encoding="utf-8")
    records = [_record(sweep, s, previous.get(s.name)) for s in specs]
    _execute(sweep, specs, records, parallel, echo)
    path = _report(sweep, records) if report else None
    return _summary(sweep, records, path)


def _check_folder(sweep: Sweep, *, resume: bool, force: bool) -> dict[str, dict]:
    """Refuse to reuse a sweep folder silently; on --resume return its previous run records by name."""
    folder = sweep.folder
    if not folder.exists() or not any(folder.iterdir()):
        return {}
    saved = folder / "sweep.yaml"
    if not saved.is_file():
        raise UserError(
            f"{folder} exists and is not a sweep folder (no sweep.yaml): choose another sweep name or out_dir"
        )
    if not (resume or force):
        raise UserError(
            f"sweep folder {folder} already exists: pass --resume to finish its missing runs, "
            "--force to replace it, or choose another sweep name"
        )
    if resume:
        _check_same_sweep(sweep, yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
        runs = folder / "runs.json"
        if runs.is_file():
            return {r["name"]: r for r in json.loads(runs.read_text(encoding="utf-8")).get("runs", [])}
    return {}


def _check_same_sweep(sweep: Sweep, saved: dict) -> None:
    now, saved = config_mod.flatten(sweep.to_dict()), config_mod.flatten(saved)
    for k in sorted(set(now) | set(saved)):
        if k != "parallel" and now.get(k) != saved.get(k):
            was, new = (_short(repr(x)) for x in (saved.get(k), now.get(k)))
            raise UserError(
                f"--resume {sweep.folder} with a changed sweep ({k}: {was} -> {new}): "
                "resume with the sweep file it was started from, or choose another sweep name"
            )


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _prepare_datasets(specs: list[RunSpec]) -> None:
    from ..data import store
    from ..run.open import open_dataset

    seen = set()
    for spec in specs:
        key = json.dumps([spec.config.data.dir, store.config_record(spec.config.data)], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            open_dataset(spec.config.data)


def _record(sweep: Sweep, spec: RunSpec, before: dict | None) -> dict:
    run_dir = sweep.folder / spec.name
    rec = {
        "name": spec.name,
        "run_dir": str(run_dir),
        "log": str(sweep.folder / "logs" / f"{spec.name}.log"),
        "choices": spec.choices,
        "overrides": spec.overrides,
        "action": _action(run_dir),
        "status": "pending",
        "exit_code": None,
        "seconds": None,
        sweep.metric: None,
        "error": None,
    }
    if rec["action"] == "skip":
        rec.update(
            status="ok", seconds=(before or {}).get("seconds"), **{sweep.metric: _metric_value(run_dir, sweep.metric)}
        )
    return rec


def _action(run_dir: Path) -> str:
    """skip a finished run; resume one with a checkpoint; restart (--force) a half-written one; else train."""
    if (run_dir / "summary.json").is_file():
        return "skip"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        from ..training.checkpoint import latest_checkpoint

        return "resume" if (run_dir / "config.yaml").is_file() and latest_checkpoint(run_dir) else "restart"
    return "train"


def train_command(sweep: Sweep, spec: RunSpec, action: str = "train", threads: int | None = None) -> list[str]:
    """The ``python -m attnlab train ...`` command line of one run."""
    cmd = [sys.executable, "-m", "attnlab", "train"]
    if action == "resume":
        return cmd + ["--resume", str(sweep.folder / spec.name)]
    cmd += [sweep.base, *sweep.overrides, *spec.overrides, f"name={spec.name}", f"out_dir={sweep.folder}"]
    if threads:
        cmd.append(f"train.threads={threads}")
    return cmd + (["--force"] if action == "restart" else [])


def run_threads(sweep: Sweep, parallel: int) -> int | None:
    """CPU threads per run when several run at once (cores // N), unless the sweep or its base sets train.threads."""
    swept = any("train.threads" in p.config_keys() for p in sweep.parameters)
    if parallel <= 1 or swept or (sweep.base_config and sweep.base_config.train.threads is not None):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // parallel)


@dataclass
class _Job:
    spec: RunSpec
    record: dict
    proc: subprocess.Popen
    log: Any
    start: float


def _execute(sweep: Sweep, specs: list[RunSpec], records: list[dict], parallel: int, echo) -> None:
    queue = [(s, r) for s, r in zip(specs, records) if r["action"] != "skip"]
    for r in records:
        if r["action"] == "skip":
            echo(f"attnlab sweep: {r['name']}: finished earlier, skipped")
    threads, total, running = run_threads(sweep, parallel), len(queue), []
    _write_runs(sweep, records)
    try:
        with folders.sigterm_as_interrupt():  # SIGTERM stops the sweep like Ctrl-C: its runs checkpoint and stop
            _loop(sweep, queue, running, parallel, threads, total, echo, records)
    except KeyboardInterrupt:
        _stop(sweep, running)  # each run saves a checkpoint at its next step boundary; --resume continues it
        _write_runs(sweep, records)
        echo(f"attnlab sweep: interrupted: finish it with attnlab sweep {sweep.path or 'SWEEP.yaml'} --resume")
        raise


def _loop(
    sweep: Sweep,
    queue: list,
    running: list[_Job],
    parallel: int,
    threads: int | None,
    total: int,
    echo,
    records: list[dict],
) -> None:
    while queue or running:
        while queue and len(running) < parallel:
            running.append(_start(sweep, *queue.pop(0), threads))
            _write_runs(sweep, records)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            _finish(sweep, job)
            done = total - len(queue) - len(running)
            echo(f"attnlab sweep: [{done}/{total}] {_describe(job.record, sweep.metric)}")
            _write_runs(sweep, records)
        time.sleep(0.1)


def _start(sweep: Sweep, spec: RunSpec, rec: dict, threads: int | None) -> _Job:
    cmd = train_command(sweep, spec, rec["action"], threads)
    log = open(rec["log"], "a", encoding="utf-8")
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rec.update(status="running", command=cmd)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return _Job(spec, rec, proc, log, time.time())


def _finish(sweep: Sweep, job: _Job) -> None:
    job.log.close()
    rec, rc = job.record, job.proc.returncode
    rec.update(exit_code=rc, seconds=round(time.time() - job.start, 2))
    if rc == 0 and (Path(rec["run_dir"]) / "summary.json").is_file():
        rec.update(status="ok", **{sweep.metric: _metric_value(Path(rec["run_dir"]), sweep.metric)})
    else:
        rec.update(status="failed", error=_last_error(Path(rec["log"])))


def _stop(sweep: Sweep, running: list[_Job]) -> None:
    for job in running:
        if job.proc.poll() is None:
            job.proc.send_signal(signal.SIGINT)
    for job in running:
        try:
            job.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
        _finish(sweep, job)
        if job.record["status"] == "failed" and job.proc.returncode in (130, -signal.SIGINT, -signal.SIGKILL):
            job.record.update(status="interrupted")


def _metric_value(run_dir: Path, metric: str):
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get(metric)
    except (OSError, ValueError):
        return None


def _last_error(log: Path) -> str:
    """The run's ``attnlab: error:`` line, else the last line it printed (a traceback's exception)."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 65536))
        text = f.read().decode("utf-8", "replace")
    lines = [x.strip() for x in re.split(r"[\r\n]+", text) if x.strip()]
    errors = [x for x in lines if x.startswith("attnlab: error:")]
    return (errors or lines or ["(no output)"])[-1]


def _describe(rec: dict, metric: str) -> str:
    if rec["status"] == "ok":
        value = rec.get(metric)
        return f"{rec['name']}: ok in {rec['seconds']} s" + (
            f" ({metric} {value:.4f})" if isinstance(value, float) else ""
        )
    return f"{rec['name']}: {rec['status']} (exit {rec['exit_code']}): {rec['error']} (log: {rec['log']})"


def _write_runs(sweep: Sweep, records: list[dict]) -> None:
    path = sweep.folder / "runs.json"
    tmp = path.with_name(".runs.json.tmp")
    tmp.write_text(
        json.dumps({"sweep": sweep.name, "metric": sweep.metric, "runs": records}, indent=2, default=str),
        encoding="utf-8",
    )
    os.replace(tmp, path)


def _report(sweep: Sweep, records: list[dict]) -> Path | None:
    done = [Path(r["run_dir"]) for r in records if r["status"] == "ok"]
    if not done:
        return None
    from ..eval.report.build import build_report

    # The report folder belongs to the sweep: rebuilding it on --resume is expected.
    return Path(build_report(done, out=sweep.folder / "report", title=f"sweep {sweep.name}", force=True))


def _summary(sweep: Sweep, records: list[dict], report: Path | None) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    scored = [r for r in ok if isinstance(r.get(sweep.metric), (int, float))]
    best = min(scored, key=lambda r: r[sweep.metric]) if scored else None
    return {
        "sweep": str(sweep.folder),
        "runs": len(records),
        "ok": len(ok),
        "failed": sum(r["status"] != "ok" for r in records),
        "skipped": sum(r["action"] == "skip" for r in records),
        "best": best["name"] if best else None,
        sweep.metric: best[sweep.metric] if best else None,
        "report": str(report) if report else None,
    }
