"""`attnlab bench attention`: tiny sizes only; checks the outputs' shape, not the speed."""

import csv
import json
import math
import multiprocessing
import os
import threading

import pytest
import torch

from attnlab.attention.backends import BACKENDS
from attnlab.attention.patterns import Dense, Local
from attnlab.bench import busy
from attnlab.bench.attention import (
    COLUMNS,
    bench_attention,
    cpu_peak_supported,
    format_speedups,
    parse_pattern_spec,
    resolve,
    speedups,
)
from attnlab.cli import main
from attnlab.errors import ConfigError

SEQ_LENS = (64, 128)
PASSES = ("fwd", "fwdbwd")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, one_thread):
    """One tiny benchmark through the command line, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "attn.csv"
    rc = main(
        [
            "bench",
            "attention",
            "--patterns",
            "dense",
            "local:window=16",
            "fixed:local_attn_ctx=32:blocksize=8",
            "--seq-lens",
            ",".join(map(str, SEQ_LENS)),
            "--backends",
            "auto,reference,sdpa,sdpa_causal",
            "--out",
            str(out),
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "8",
        ]
    )
    assert rc == 0
    with open(out, newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        rows = list(csv.DictReader(f))
    return out, header, rows


def test_csv_columns_and_one_row_per_runnable_combination(cli_run):
    out, header, rows = cli_run
    assert tuple(header) == COLUMNS
    got = sorted((r["pattern"], r["backend"], int(r["seq_len"]), r["pass"]) for r in rows)
    runnable = [
        ("dense", "sdpa_causal"),
        ("dense", "auto(sdpa)"),
        ("dense", "reference"),
        ("dense", "sdpa"),
        ("local", "auto(blocksparse)"),
        ("local", "reference"),  # sdpa cannot run local: skipped
        ("fixed", "auto(blocksparse)"),
        ("fixed", "reference"),
    ]
    want = sorted((p, b, T, s) for p, b in runnable for T in SEQ_LENS for s in PASSES)
    assert got == want  # sdpa_causal in --backends is the baseline, measured once per length and pass
    by = {(r["pattern"], r["backend"], int(r["seq_len"])): r for r in rows}
    assert by[("local", "reference", 64)]["params"] == "window=16"
    assert by[("dense", "sdpa_causal", 64)]["params"] == ""
    assert float(by[("dense", "reference", 128)]["density"]) == 1.0
    assert float(by[("local", "reference", 64)]["density"]) == pytest.approx(Local(16).density(64, 2))
    assert all(r["device"] == "cpu" for r in rows)
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_skipped_rows_are_noted(cli_run):
    out, _, _ = cli_run
    summary = json.loads(out.with_suffix(".json").read_text())
    skipped = {(s["pattern"], s["backend"], s["seq_len"], s["pass"]) for s in summary["skipped"]}
    assert skipped == {("local:window=16", "sdpa", T, s) for T in SEQ_LENS for s in PASSES} | {
        ("fixed:local_attn_ctx=32:blocksize=8", "sdpa", T, s) for T in SEQ_LENS for s in PASSES
    }
    assert all("cannot run pattern" in s["reason"] for s in summary["skipped"])
    assert summary["settings"]["repeats"] == 2 and summary["memory_method"]
    assert {u["pattern"] for u in summary["speedups"]} == {"dense", "local", "fixed"}


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_is_finite(cli_run):
    _, _, rows = cli_run
    peaks = [float(r["peak_mb"]) for r in rows]
    assert all(math.isfinite(p) and p >= 0 for p in peaks)
    ref = [
        float(r["peak_mb"])
        for r in rows
        if r["backend"] == "reference" and r["pass"] == "fwdbwd" and r["seq_len"] == "128"
    ]
    assert max(ref) > 0  # [1, 2, 128, 128] fp32 scores and their gradients are resident at the peak


def test_plot_and_machine_written(cli_run):
    out, _, _ = cli_run
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = json.loads((out.parent / "machine.json").read_text())
    for key in ("cpu", "cores", "torch", "torch_threads", "device", "device_name"):
        assert key in machine
    assert machine["device"] == "cpu"


def test_library_returns_rows_and_plot_option(tmp_path, one_thread, capsys):
    rows = bench_attention(
        ["sink_window:sinks=2:window=8"],
        [32],
        ["blocksparse"],
        ["fwd"],
        repeats=1,
        heads=2,
        head_dim=4,
        out=tmp_path / "r.csv",
        warmup=0,
        plot=tmp_path / "p" / "plot.png",
    )
    assert [(r["pattern"], r["backend"]) for r in rows] == [("dense", "sdpa_causal"), ("sink_window", "blocksparse")]
    assert set(rows[0]) == set(COLUMNS)
    assert (tmp_path / "p" / "plot.png").is_file() and not (tmp_path / "r.png").exists()
    assert "speed-up vs sdpa_causal" in capsys.readouterr().out


def test_resolve_skips():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="T x T"):
        resolve("reference", Dense(), 8192, "fwd", cpu)
    assert resolve("reference", Dense(), 4096, "fwd", cpu)[0] == "reference"
    with pytest.raises(ConfigError, match="cannot run pattern"):
        resolve("sdpa", Local(8), 64, "fwd", cpu)
    if "flex" in BACKENDS:
        with pytest.raises(ConfigError, match="forward only"):
            resolve("flex", Local(8), 64, "fwdbwd", cpu)
    else:
        with pytest.raises(ConfigError, match="not registered"):
            resolve("flex", Local(8), 64, "fwd", cpu)
    assert resolve("auto", Local(8), 64, "fwd", cpu)[0].startswith("auto(")


def test_pattern_specs():
    assert parse_pattern_spec("local:window=256", 4) == Local(256)
    p = parse_pattern_spec("strided:local_attn_ctx=128:strided_mode=union", 4)
    assert (p.name, p.local_attn_ctx, p.mode) == ("strided", 128, "union")
    p = parse_pattern_spec("fixed:local_attn_ctx=128:blocksize=32:vertsize=1:num_verts=1", 4)
    assert (p.local_attn_ctx, p.blocksize) == (128, 32)
    with pytest.raises(ConfigError, match="fixed:local_attn_ctx=100:blocksize=32"):
        parse_pattern_spec("fixed:local_attn_ctx=100:blocksize=32", 4)  # blocksize must divide local_attn_ctx


def test_speedup_table():
    rows = [
        {"pattern": "dense", "params": "", "backend": "sdpa_causal", "seq_len": 64, "pass": "fwd", "median_ms": 2.0},
        {
            "pattern": "local",
            "params": "window=8",
            "backend": "blocksparse",
            "seq_len": 64,
            "pass": "fwd",
            "median_ms": 1.0,
        },
    ]
    ups = speedups(rows)
    assert ups == [
        {
            "pattern": "local",
            "params": "window=8",
            "backend": "blocksparse",
            "pass": "fwd",
            "seq_len": 64,
            "speedup_vs_sdpa_causal": 2.0,
        }
    ]
    assert "2.00x" in format_speedups(ups, [64, 128])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--patterns", "local:windw=16"], "pattern spec 'local:windw=16'"),
        (["--patterns", "nope"], "pattern spec 'nope'"),
        (["--patterns", "local:window"], "not key=value"),
        (["--patterns", "local", "--seq-lens", "64,abc"], "--seq-lens"),
        (["--patterns", "local", "--backends", "fast"], "unknown backend 'fast'"),
        (["--patterns", "local", "--passes", "bwd"], "unknown pass 'bwd'"),
        (["--patterns", "local", "--repeats", "0"], "--repeats 0"),
        (["--patterns", "local", "--busy", "-1"], "--busy -1 must be >= 0"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    argv = ["bench", "attention", "--seq-lens", "64", "--out", str(tmp_path / "x.csv"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnlab: error: ") and needle in err[0], err
    assert not (tmp_path / "x.csv").exists()


def _spinner_pids() -> list[int]:
    return [p.pid for p in multiprocessing.active_children() if p.name == "attnlab-busy" and p.pid is not None]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_busy_spinners_run_for_every_row_are_recorded_and_stop(tmp_path, one_thread):
    during = []

    def log(msg: str) -> None:
        if " ms " in msg:  # a measured row
            during.append(_spinner_pids())

    out = tmp_path / "r.csv"
    bench_attention(
        ["local:window=8"], [32], ["blocksparse"], ["fwd"], repeats=1, heads=2, head_dim=4, out=out, warmup=0,
        plot=False, log=log, busy=2,
    )  # fmt: skip
    assert len(during) == 2 and all(len(pids) == 2 for pids in during)  # baseline and pattern rows
    assert during[0] == during[1]  # the same spinners for the whole run
    assert _spinner_pids() == [] and all(_gone(pid) for pid in during[0])
    with open(out, newline="") as f:
        assert [r["busy"] for r in csv.DictReader(f)] == ["2", "2"]
    assert json.loads((tmp_path / "machine.json").read_text())["busy"] == 2
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["busy"] == 2


def test_busy_spinners_stop_when_the_run_is_interrupted(tmp_path, one_thread):
    seen = []

    def log(msg: str) -> None:
        if " ms " in msg:
            seen.extend(_spinner_pids())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench_attention(["local:window=8"], [32], ["blocksparse"], ["fwd"], repeats=1, heads=2, head_dim=4,
                        warmup=0, log=log, busy=1)  # fmt: skip
    assert len(seen) == 1 and _gone(seen[0]) and _spinner_pids() == []


def test_quiet_run_records_busy_zero_and_starts_nothing(one_thread):
    rows = bench_attention(["local:window=8"], [32], ["blocksparse"], ["fwd"], repeats=1, heads=2, head_dim=4,
                           warmup=0, log=lambda m: None)  # fmt: skip
    assert {r["busy"] for r in rows} == {0}
    with busy.spinners(0) as pids:
        assert pids == [] and _spinner_pids() == []


def test_orphaned_spinner_exits_by_itself():
    busy._spin(threading.Event(), parent=-1)  # returns: its parent is not the one that started it
