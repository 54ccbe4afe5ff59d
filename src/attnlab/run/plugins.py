"""Plugins in run directories: a run keeps a copy of every plugin file it used, so it stays reproducible.

``copy_plugins`` writes ``plugins/<file>`` and ``plugins.json`` (each plugin as the config names it, its
copy and the copy's sha256) into a new run directory; ``load_run_plugins`` registers those copies before
the run's config is read, so eval, sample and resume use the code the run trained with, even where the
original file was edited, moved or never existed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..attention.patterns.registry import load_plugin, provide_plugin
from ..errors import CheckpointError

INDEX = "plugins.json"


def copy_plugins(plugins: list[str], run_dir: Path) -> None:
    """Copy each .py plugin into ``run_dir/plugins/`` and record it (modules on sys.path are recorded by hash)."""
    if not plugins:
        return
    folder = Path(run_dir) / "plugins"
    folder.mkdir(exist_ok=True)
    index = {}
    for i, ref in enumerate(plugins):
        sha = load_plugin(ref)
        entry = {"sha256": sha}
        if ref.endswith(".py"):
            copy = folder / f"{i}-{Path(ref).name}"
            shutil.copyfile(ref, copy)
            entry["copy"] = str(copy.relative_to(run_dir))
        index[ref] = entry
    (Path(run_dir) / INDEX).write_text(json.dumps(index, indent=2))


def load_run_plugins(run_dir: Path) -> None:
    """Register the run's own plugin copies (checked against their recorded hashes) under the names its config uses."""
    path = Path(run_dir) / INDEX
    if not path.exists():
        return
    for ref, entry in json.loads(path.read_text()).items():
        if "copy" not in entry:
            continue
        copy = Path(run_dir) / entry["copy"]
        if not copy.is_file() or hashlib.sha256(copy.read_bytes()).hexdigest() != entry["sha256"]:
            raise CheckpointError(
                f"{copy} is missing or differs from the plugin the run trained with (sha256 "
                f"{entry['sha256'][:12]}): restore the run's plugins/ folder"
            )
        provide_plugin(ref, str(copy))
