"""`attnlab bench generate`: a tiny model and short lengths; checks rows, exact cache sizes and notes, not speed."""

import argparse
import csv
import json
import math
from pathlib import Path

import pytest

from attnlab import config
from attnlab.bench.generate import COLUMNS, add_parser, bench_generate, row_config, run
from attnlab.bench.measure import cpu_peak_supported
from attnlab.errors import ConfigError

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.vocab_size=300"]
N_LAYER, N_HEAD, D_MODEL, HEAD_DIM, BATCH = 1, 2, 32, 16, 2
LENGTHS = (32, 64)
SPECS = [
    "dense",
    "local:window=8",
    "sink_window:sinks=2:window=8:context=32",
    "strided:local_attn_ctx=16",
    "fixed:local_attn_ctx=16:blocksize=4",
    "linear",
]
BOUNDED = {"local", "sink_window", "linear"}
FP32 = 4


def _parse(argv: list[str]) -> argparse.Namespace:
    """The way cli.py wires the module: ``add_parser`` on the bench subparsers, then ``run``."""
    parser = argparse.ArgumentParser(prog="attnlab bench")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, one_thread):
    """One tiny benchmark through the command-line arguments, shared by the tests below."""
    out = tmp_path_factory.mktemp("gen") / "results.csv"
    run(
        _parse(
            [
                "generate",
                *TINY,
                "--config",
                str(QUICKSTART),
                "--patterns",
                *SPECS,
                "--lengths",
                ",".join(map(str, LENGTHS)),
                "--prompt-len",
                "8",
                "--window",
                "4",
                "--batch",
                str(BATCH),
                "--repeats",
                "1",
                "--recompute-max",
                "32",
                "--out",
                str(out),
            ]
        )
    )
    with open(out, newline="") as f:
        header = next(csv.reader(f))
        f.seek(0)
        rows = list(csv.DictReader(f))
    return out, header, rows


def _cache_bytes(rows: list[dict]) -> dict[tuple[str, int], int]:
    return {(r["pattern"], int(r["length"])): round(float(r["cache_mb"]) * 2**20) for r in rows if r["mode"] == "cache"}


def test_csv_has_one_row_per_pattern_length_and_mode(cli_run):
    _, header, rows = cli_run
    assert tuple(header) == COLUMNS
    patterns = ["dense", "local", "sink_window", "strided", "fixed", "linear"]
    got = [(r["pattern"], int(r["length"]), r["mode"]) for r in rows]
    # recompute only up to --recompute-max 32; the cache row of a length comes before its recompute row
    assert got == [
        (p, L, m) for p in patterns for L, modes in ((32, ("cache", "recompute")), (64, ("cache",))) for m in modes
    ]
    contexts = {r["pattern"]: int(r["context"]) for r in rows}
    assert contexts == {**{p: max(LENGTHS) for p in patterns}, "sink_window": 32}  # context= of its spec
    params = {r["pattern"]: r["params"] for r in rows}
    assert params["local"] == "window=8" and params["dense"] == ""
    assert all(float(r["ms_per_token"]) > 0 for r in rows)
    for r in rows:
        assert float(r["tokens_per_s"]) == pytest.approx(BATCH * 1e3 / float(r["ms_per_token"]), rel=1e-3)
        assert (r["cache_mb"] == "") == (r["mode"] == "recompute")


def test_cache_sizes_are_exact(cli_run):
    _, _, rows = cli_run
    nbytes = _cache_bytes(rows)
    kv = 2 * N_LAYER * BATCH * FP32  # keys and values, per position of one head dimension
    for L in LENGTHS:
        assert nbytes[("dense", L)] == kv * L * D_MODEL  # every position
        assert nbytes[("strided", L)] == kv * (16 + L) * HEAD_DIM  # split: a ring of l=16 + one head keeps all
        assert nbytes[("fixed", L)] == kv * (16 + L // 16 * 4) * D_MODEL  # the chunk + c=4 columns per chunk
        assert nbytes[("local", L)] == kv * 8 * D_MODEL  # a ring of window=8
        assert (
            nbytes[("sink_window", L)] == kv * (2 + 8) * D_MODEL + kv // 2 * 2 * D_MODEL
        )  # sinks + window + sink keys kept
        assert nbytes[("linear", L)] == N_LAYER * BATCH * N_HEAD * (HEAD_DIM * HEAD_DIM + HEAD_DIM) * FP32  # S and z
    assert nbytes[("dense", 64)] == 2 * nbytes[("dense", 32)]


def test_speedup_is_recompute_over_cache(cli_run):
    _, _, rows = cli_run
    rec = {(r["pattern"], r["length"]): float(r["ms_per_token"]) for r in rows if r["mode"] == "recompute"}
    for r in rows:
        if r["mode"] == "cache" and (r["pattern"], r["length"]) in rec:
            assert float(r["speedup"]) == pytest.approx(
                rec[(r["pattern"], r["length"])] / float(r["ms_per_token"]), rel=2e-3
            )
        else:
            assert r["speedup"] == ""


def test_recompute_above_max_is_skipped_with_a_note(cli_run):
    out, _, _ = cli_run
    summary = json.loads((out.parent / "results.json").read_text())
    assert [(s["spec"], s["length"], s["mode"]) for s in summary["skipped"]] == [(s, 64, "recompute") for s in SPECS]
    assert all("--recompute-max 32" in s["reason"] for s in summary["skipped"])


def test_sink_window_streams_past_its_context(cli_run):
    _, _, rows = cli_run
    sink = [r for r in rows if r["pattern"] == "sink_window" and r["mode"] == "cache"]
    assert [(int(r["context"]), int(r["length"])) for r in sink] == [(32, 32), (32, 64)]
    assert sink[0]["cache_mb"] == sink[1]["cache_mb"]


def test_context_below_length_is_refused_without_a_bounded_cache(one_thread, capsys):
    base = config.load(QUICKSTART, TINY)
    with pytest.raises(ConfigError, match="cannot decode past its context") as e:
        bench_generate(base, ["local:window=8", "dense:context=32"], list(LENGTHS), prompt_len=8, window=4)
    assert "'dense:context=32'" in str(e.value) and "\n" not in str(e.value)
    assert capsys.readouterr().out == ""  # refused before anything was measured


def test_results_json_targets_and_side_files(cli_run):
    out, _, _ = cli_run
    summary = json.loads((out.parent / "results.json").read_text())
    targets = summary["targets"]
    assert [(t["spec"], t["length"]) for t in targets["speedup"]] == [(s, 32) for s in SPECS]
    assert all(t["met"] == (t["speedup"] >= targets["speedup_min"]) for t in targets["speedup"])
    flat = {t["spec"].split(":")[0]: t for t in targets["flat"]}
    assert set(flat) == BOUNDED  # the caches whose memory is bounded
    assert all(t["cache_mb_ratio"] == 1.0 and (t["from"], t["to"]) == LENGTHS for t in flat.values())
    assert summary["settings"]["lengths"] == list(LENGTHS) and summary["settings"]["batch"] == BATCH
    assert len(summary["rows"]) == 3 * len(SPECS) and summary["memory_method"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = json.loads((out.parent / "machine.json").read_text())
    assert {"cpu", "cores", "torch", "torch_threads", "device"} <= set(machine)


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_is_finite(cli_run):
    _, _, rows = cli_run
    for r in rows:
        peak, rss = float(r["peak_rss_mb"]), float(r["rss_mb"])
        assert math.isfinite(peak) and peak >= rss > 0


def test_library_returns_rows_and_prints_a_summary(tmp_path, one_thread, capsys):
    base = config.load(QUICKSTART, TINY)
    rows = bench_generate(base, ["local:window=8"], [16], prompt_len=4, window=4, repeats=1, plot=tmp_path / "p.png")
    assert [(r["spec"], r["mode"]) for r in rows] == [("local:window=8", "cache"), ("local:window=8", "recompute")]
    assert set(COLUMNS) <= set(rows[0]) and (tmp_path / "p.png").is_file()
    assert "cached ms/tok" in capsys.readouterr().out


def test_row_config_sets_pattern_and_context():
    base = config.load(QUICKSTART, [*TINY, "attention.schedule=dense,local"])
    cfg = row_config(base, "sink_window:sinks=2:window=8:context=32", 64)
    assert (cfg.attention.pattern, cfg.attention.sinks, cfg.attention.window) == ("sink_window", 2, 8)
    assert cfg.model.context == 32 and cfg.attention.schedule == []  # the spec decides every layer
    assert row_config(base, "dense", 64).model.context == 64 and base.model.context == 256


@pytest.mark.parametrize(
    "patterns, kwargs, needle",
    [
        (["local:windw=8"], {}, "pattern spec 'local:windw=8'"),
        (["local:window"], {}, "not key=value"),
        (["model.n_layer=2"], {}, "put config overrides before --patterns"),
        (["fixed:local_attn_ctx=16:blocksize=4:context=40"], {}, "must divide model.context=40"),
        (["local"], {"prompt_len": 40}, "--prompt-len + --window"),
        (["local:context=16"], {"prompt_len": 20, "window": 4, "lengths": [32]}, "exceeds the context 16"),
        (["local"], {"repeats": 0}, "--repeats 0"),
        (["local"], {"out": "x.txt"}, "must be a .csv"),
    ],
)
def test_errors_are_one_line(tmp_path, patterns, kwargs, needle):
    kwargs = {"lengths": list(LENGTHS), "prompt_len": 8, "window": 4, **kwargs}
    if "out" in kwargs:
        kwargs["out"] = tmp_path / kwargs["out"]
    with pytest.raises(ConfigError) as e:
        bench_generate(config.load(QUICKSTART, TINY), patterns, kwargs.pop("lengths"), **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())
