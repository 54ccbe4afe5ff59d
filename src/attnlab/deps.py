"""Installing attnlab on a machine that already has its own PyTorch (a rented GPU, a cloud image).

``install_missing`` installs attnlab itself without its dependencies (``pip
install --no-deps -e``), so the machine's CUDA build of torch is never
replaced, then only the pure-Python packages that are not importable yet. It
never fails for want of a network: what cannot be installed is reported, and
whatever needs it fails (or skips) on its own later.

This module imports nothing outside the standard library: it runs before the
packages it installs exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# import name -> pip requirement (attnlab's own dependencies, then what its GPU check runs)
PACKAGES = {
    "numpy": "numpy>=1.24",
    "tokenizers": "tokenizers>=0.15",
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm>=4.60",
    "yaml": "pyyaml>=6",
    "matplotlib": "matplotlib>=3.7",
    "scipy": "scipy>=1.10",
    "pytest": "pytest>=7",
    "hypothesis": "hypothesis>=6",
    "xdist": "pytest-xdist>=3",
}
PIP_FLAGS = ["--disable-pip-version-check", "--no-input", "--retries", "0", "--timeout", "10"]
PIP_TIMEOUT_S = 240


def _pip(args: list[str], run: Callable) -> tuple[bool, str]:
    """Run ``python -m pip args``; (ok, last line of its output)."""
    try:
        out = run(
            [sys.executable, "-m", "pip", *args, *PIP_FLAGS], capture_output=True, text=True, timeout=PIP_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{type(e).__name__}: {e}"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode == 0, lines[-1] if lines else f"exit code {out.returncode}"


def missing(find: Callable = importlib.util.find_spec) -> list[str]:
    """The import names in ``PACKAGES`` that cannot be imported here."""
    importlib.invalidate_caches()
    return [name for name in PACKAGES if find(name) is None]


def install_missing(
    root: str | Path,
    *,
    wheels: str | Path | None = None,
    find: Callable = importlib.util.find_spec,
    run: Callable = subprocess.run,
    log: Callable[[str], None] = print,
) -> dict:
    """Install attnlab from ``root`` (no dependencies) and the missing ``PACKAGES``; returns what happened.

    ``wheels``: a folder of wheels (``pip download -d DIR ...`` on a machine with a network) to install
    from instead of the package index, for machines without one.

    The report: ``torch`` (its version or None), ``attnlab`` ("installed" or why not: the tree still
    runs from ``root/src`` on PYTHONPATH), ``missing_before``, ``installed``, ``still_missing`` and
    ``pip`` (its last output line where an install failed).
    """
    report: dict = {"torch": None, "attnlab": "", "missing_before": [], "installed": [], "still_missing": [], "pip": ""}
    if find("torch") is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            report["torch"] = version("torch")
        except PackageNotFoundError:
            report["torch"] = "present (no package metadata)"
    ok, line = _pip(["install", "--no-deps", "--no-build-isolation", "-e", str(root)], run)
    report["attnlab"] = "installed" if ok else f"not installed ({line}); running from {Path(root) / 'src'}"
    before = missing(find)
    report["missing_before"] = before
    if before:
        log(f"installing what is missing: {', '.join(PACKAGES[n] for n in before)}")
        source = ["--no-index", "--find-links", str(wheels)] if wheels else []
        ok, line = _pip(["install", *source, *(PACKAGES[n] for n in before)], run)
        if not ok:
            report["pip"] = line
        report["still_missing"] = missing(find)
        report["installed"] = [n for n in before if n not in report["still_missing"]]
    if report["still_missing"]:
        log(f"still missing (no network?): {', '.join(report['still_missing'])}: the parts that need them are skipped")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m attnlab.deps [--root DIR] [--report FILE]``: install what is missing, print (and save) the report."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m attnlab.deps", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[2]), help="the attnlab checkout")
    p.add_argument("--report", help="write the report here as JSON")
    p.add_argument("--wheels", help="install from this folder of wheels instead of the package index (no network)")
    a = p.parse_args(argv)
    report = install_missing(a.root, wheels=a.wheels or None)
    if report["torch"] is None:
        print(
            "attnlab: error: torch is not installed: install the machine's PyTorch build first "
            "(https://pytorch.org/get-started/locally/), then rerun",
            file=sys.stderr,
        )
        return 2
    if a.report:
        Path(a.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
