"""Golden loss curves (tests/golden/*.json) and the facts a run records about itself (meta.json)."""

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
from attnlab.training import runtime

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import curves  # noqa: E402

# Relative tolerance per loss. Re-running with 2 threads instead of 1 (another reduction order, the
# kind of noise another CPU or BLAS build brings) moves the 50 losses by at most 1.6e-7 relative;
# a real change moves them by ~1e-3 (the dense and strided curves, which differ only in which keys
# the attention sees, are 1e-4..6e-3 apart). 1e-4 sits ~600x above the noise and below real changes.
RTOL = 1e-4


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory, one_thread):
    """Both golden runs, trained once: name -> (committed record, fresh record, run directory)."""
    out = {}
    for name in curves.SPECS:
        work = tmp_path_factory.mktemp(name)
        out[name] = (curves.load(name), curves.record(name, work), work / "runs" / f"golden-{name}")
    return out


@pytest.mark.parametrize("name", list(curves.SPECS))
def test_loss_curve_matches_golden(golden_runs, name):
    old, new, _ = golden_runs[name]
    assert old["overrides"] == curves.SPECS[name], (
        f"tests/golden/{name}.json was made with other overrides than curves.SPECS[{name!r}]: "
        f"regenerate it with `{curves.REGENERATE} {name}`"
    )
    assert new["corpus_sha256"] == old["corpus_sha256"], (
        f"the golden corpus (runkit.write_corpus) changed: restore it, or regenerate with `{curves.REGENERATE}`"
    )
    assert len(new["losses"]) == curves.STEPS
    moved = curves.differences(old, new, RTOL)
    torch_note = "" if old["torch"] == new["torch"] else f" (golden made with torch {old['torch']}, now {new['torch']})"
    assert not moved, (
        f"{name} training moved beyond rtol={RTOL}{torch_note}:\n  "
        + "\n  ".join(moved[:10])
        + f"\nIf this change is intended, regenerate with `{curves.REGENERATE} {name}` and commit the JSON."
    )


def test_tolerance_tells_dense_from_strided():
    """The committed curves of two different attention patterns must count as different at RTOL."""
    dense, strided = curves.load("dense"), curves.load("strided")
    moved = curves.differences(dense, strided, RTOL)
    assert len(moved) >= 40, moved  # most of the 50 steps, and the final val bits/byte
    assert curves.differences(dense, dense, RTOL) == []


def test_failure_message_names_step_and_values():
    old = {"losses": [2.0, 3.0], "val_bits_per_byte": 1.0}
    new = {"losses": [2.0, 3.01], "val_bits_per_byte": 1.0}
    assert curves.differences(old, new, RTOL) == ["step 2: golden loss 3.0, now 3.01 (rel. change 3.33e-03)"]
    assert curves.differences(old, {**new, "losses": [2.0, 3.0 * (1 + 1e-6)]}, RTOL) == []


def test_regenerate_check_writes_nothing(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(curves.HERE))
    import regenerate

    before = {n: curves.golden_path(n).read_bytes() for n in curves.SPECS}
    monkeypatch.setattr(regenerate, "record", lambda name: {**curves.load(name), "losses": [9.0] * curves.STEPS})
    assert regenerate.main(["--check", "dense"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dense: 50 value(s) changed") and "step 1: golden loss" in out
    assert {n: curves.golden_path(n).read_bytes() for n in curves.SPECS} == before
    with pytest.raises(SystemExit):
        regenerate.main(["nope"])
    assert "unknown golden curve(s) nope: choose from dense, strided" in capsys.readouterr().err


# ------------------------------------------------------------------ meta.json


def _checkout_head() -> str | None:
    """HEAD of the git checkout holding the imported attnlab package, or None outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(attnlab.__file__).parent, capture_output=True, text=True, timeout=5
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def test_meta_records_versions_git_and_device(golden_runs):
    run_dir = golden_runs["dense"][2]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["versions"]["attnlab"] == attnlab.__version__
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["numpy"] == np.__version__
    assert meta["versions"]["python"] == platform.python_version()
    assert meta["device"] == "cpu" and meta["torch_threads"] == 1
    head = _checkout_head()
    assert meta["git_sha"] == head
    if head is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", meta["git_sha"])
        assert meta["git_dirty"] is runtime.git_dirty() and isinstance(meta["git_dirty"], bool)
    assert meta["seed"] == 7 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["started"])


@pytest.mark.parametrize("outcome", ["no git", "not a checkout"])
def test_git_sha_is_null_outside_a_checkout(monkeypatch, outcome):
    def fake_run(*args, **kwargs):
        if outcome == "no git":
            raise FileNotFoundError("git")
        return subprocess.CompletedProcess(args, 128, stdout="", stderr="fatal: not a git repository")

    monkeypatch.setattr(runtime.subprocess, "run", fake_run)
    assert runtime.git_sha() is None and runtime.git_dirty() is None
