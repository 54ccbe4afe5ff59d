"""The CLI makes torch's idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) before torch loads, unless told not to."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = (
    "import json, os, sys; from attnlab import cli; cli.main(['patterns']); "
    "print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), 'torch': 'torch' in sys.modules}))"
)


def _cli_policy(**env_changes) -> str | None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_changes, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"]  # the command did load torch, after the setting
    return result["policy"]


def test_cli_sets_passive_waits_before_torch_loads():
    assert _cli_policy() == "PASSIVE"


@pytest.mark.parametrize(
    "env, want",
    [
        ({"ATTNLAB_NO_THREAD_TUNING": "1"}, None),
        ({"ATTNLAB_NO_THREAD_TUNING": "0"}, "PASSIVE"),  # 0 or empty: not opted out
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        ({"GOMP_SPINCOUNT": "100000"}, None),  # the user tuned the spinning: left alone
    ],
)
def test_opt_out_and_the_users_own_choice_win(env, want):
    assert _cli_policy(**env) == want


def test_library_never_sets_it_and_it_is_too_late_once_torch_is_loaded(monkeypatch):
    from attnlab import openmp

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv(openmp.NO_THREAD_TUNING, raising=False)
    assert "torch" in sys.modules  # this test process: libgomp has read its settings already
    assert openmp.passive_waits() is False and "OMP_WAIT_POLICY" not in os.environ
