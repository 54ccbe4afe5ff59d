"""Helpers for the tests of what attnlab promises under bad conditions: one-line CLI errors, a process that
holds a lock, and a folder that cannot be written (also for root, who ignores permission bits)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``attnlab ARGS`` in this process: (exit code, stdout, stderr)."""
    from attnlab.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line(err: str, *needles: str) -> str:
    """The stderr of a refused command: exactly one ``attnlab: error:`` line holding every needle."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnlab: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


HOLDER = """
import sys, time
from attnlab import folders
with folders.locked(sys.argv[1], "folder"):
    print("LOCKED", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_holder(path: Path):
    """Another process holding attnlab's lock on ``path``; yields its PID."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert p.stdout.readline().strip() == "LOCKED"
        yield p
    finally:
        p.kill()
        p.wait()


@contextlib.contextmanager
def read_only(path: Path):
    """Make the folder ``path`` unwritable: chmod for ordinary users, the immutable flag for root."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a folder read-only as root here (no chattr +i)")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (hidden ones too), relative and sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
