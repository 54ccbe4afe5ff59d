"""`attnlab bench train --patterns`: the attention-free step, each pattern's Amdahl bound, tiny shapes only."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from attnlab import config
from attnlab.attention.backends import BACKENDS, select_backend
from attnlab.attention.patterns import Dense
from attnlab.bench import train as bench_train_mod
from attnlab.bench.train import (
    EOS_ID,
    IDENTITY,
    MEAN_DOC_TOKENS,
    amdahl_bound,
    build,
    identity_attention,
    mean_density,
    pattern_config,
    synthetic_batch,
)
from attnlab.cli import main
from attnlab.errors import ConfigError

TINY = ["model.context=64", "model.d_model=16", "model.n_layer=2", "model.n_head=2", "train.batch_size=1"]


def test_bound_arithmetic_from_fake_timings():
    steps = {IDENTITY: 100.0, "dense": 500.0, "local": 150.0, "slow": 400.0}
    got = amdahl_bound(steps, {"dense": 1.0, "local": 0.1, "slow": 0.25}, tokens_per_step=1000)
    assert IDENTITY not in got
    assert got["dense"]["bound_step_ms"] == 500.0 and got["dense"]["fraction_of_bound"] == 1.0
    assert got["local"]["bound_step_ms"] == pytest.approx(100.0 + 400.0 * 0.1)  # identity + attention x density
    assert got["local"]["fraction_of_bound"] == pytest.approx(140.0 / 150.0)
    assert got["slow"]["fraction_of_bound"] == pytest.approx(200.0 / 400.0)
    assert got["local"]["tokens_per_second"] == pytest.approx(1000 / 0.150)
    assert got["local"]["speedup_vs_dense"] == pytest.approx(500.0 / 150.0)


def test_identity_attention_is_unreachable_from_configs():
    assert IDENTITY not in BACKENDS
    with pytest.raises(ConfigError, match="attention.backend='identity' is not allowed"):
        config.load("configs/longctx-8192.yaml", [*TINY, "attention.backend=identity"]).validate()
    with pytest.raises(ConfigError, match="attention.backend='identity' is unknown"):
        select_backend(IDENTITY, Dense(), "cpu")


def test_identity_attention_returns_the_values_per_query_head_and_keeps_the_graph():
    q, k = torch.randn(1, 4, 8, 3, requires_grad=True), torch.randn(1, 2, 8, 3, requires_grad=True)
    v = torch.randn(1, 2, 8, 5, requires_grad=True)  # grouped-query: 2 key/value heads for 4 query heads
    out = identity_attention(q, k, v, None, 0.0, True)
    assert torch.equal(out, v.repeat_interleave(2, dim=1))
    out.sum().backward()
    assert torch.equal(v.grad, torch.full_like(v, 2.0))


def test_density_is_the_layers_mean():
    cfg = config.load("configs/longctx-8192.yaml", TINY)
    assert mean_density(pattern_config(cfg, "dense")) == 1.0
    local = pattern_config(cfg, "local:window=16")
    assert local.attention.pattern == "local" and cfg.attention.pattern == "dense"  # a copy
    assert 0 < mean_density(local) < 0.5


def test_cli_patterns_run_writes_bounds(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "train", "configs/longctx-8192.yaml", *TINY, "--patterns", "local:window=16"]
    assert main([*argv, "--steps", "1", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["patterns"]) == ["dense", "local:window=16"]
    assert summary["identity"]["step_ms"] > 0 and "omp_wait_policy" in summary["machine"]
    local = summary["patterns"]["local:window=16"]
    ident, dense = summary["identity"]["step_ms"], summary["patterns"]["dense"]["step_ms"]
    assert local["bound_step_ms"] == pytest.approx(ident + (dense - ident) * local["density"])
    assert local["fraction_of_bound"] == pytest.approx(local["bound_step_ms"] / local["step_ms"])
    with open(out / "results.csv", newline="") as f:
        assert sorted(r["pattern"] for r in csv.DictReader(f)) == ["dense", IDENTITY, "local:window=16"]
    assert (out / "train_patterns.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_pattern_is_one_line(tmp_path, capsys):
    argv = ["bench", "train", "configs/longctx-8192.yaml", *TINY, "--patterns", "local:windw=16"]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pattern spec 'local:windw=16'" in err[0], err
    assert not (tmp_path / "b").exists()


def test_a_document_masked_config_is_timed_with_attnlabs_separator():
    """No dataset gives the separator here: the benchmark uses <eos> = 0, as every attnlab tokenizer does,
    and its synthetic batch holds documents (the model sees real boundaries, not one long document)."""
    cfg = config.load("configs/mainrun-best.yaml", [*TINY, "train.batch_size=8"])
    assert cfg.attention.document_mask and cfg.model.eos_id is None
    assert build("attnlab", cfg).eos_id == EOS_ID == 0
    eos_share = (synthetic_batch(cfg, "cpu") == EOS_ID).float().mean().item()
    assert 0.5 / MEAN_DOC_TOKENS < eos_share < 2 / MEAN_DOC_TOKENS
    plain = config.load("configs/mainrun.yaml", [*TINY, "train.batch_size=8"])
    assert (synthetic_batch(plain, "cpu") == EOS_ID).float().mean().item() < 0.5 / MEAN_DOC_TOKENS


def test_the_bf16_cost_benchmark_times_every_dtype_setting(tmp_path):
    from attnlab.bench.bf16_cpu import COLUMNS, run

    rows = run("configs/mainrun-best.yaml", tmp_path, rounds=1, warmup=0, overrides=TINY)
    settings = [(r["train_dtype"], r["muon_ns_dtype"]) for r in rows]
    assert settings == [
        ("float32", "float32"),
        ("float32", "bfloat16"),
        ("bfloat16", "float32"),
        ("bfloat16", "bfloat16"),
    ]
    assert all(r["step_s"] == pytest.approx(r["forward_backward_s"] + r["optimizer_s"], abs=2e-3) for r in rows)
    assert rows[0]["vs_float32"] == 1.0
    with open(tmp_path / "results.csv") as f:
        assert list(csv.DictReader(f))[0].keys() == set(COLUMNS)
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert set(machine["matmul_tflops_1024"]) == {"float32", "bfloat16"}
    assert {p.name for p in tmp_path.iterdir()} == {"results.csv", "results.png", "machine.json"}


@pytest.mark.parametrize("compiled", [False, True])
def test_bench_train_compiles_both_models_when_the_config_asks(monkeypatch, capsys, compiled):
    """train.compile reaches each measuring process (as torch.compile's default backend) and the summary."""
    calls = []

    def fake_measure(impl, cfg, steps, warmup, plain_runtime=False, compile=None, identity=False):
        calls.append((impl, compile))
        return {"impl": impl, "step_ms": 1.0, "tokens_per_second": 1.0, "peak_memory_mb": 1.0}

    def run_here(argv, **kw):  # the child's `python -c CODE CONFIG`, run in this process
        monkeypatch.setattr(sys, "argv", ["-c", argv[3]])
        exec(argv[2], {})
        return subprocess.CompletedProcess(argv, 0, stdout=capsys.readouterr().out)

    monkeypatch.setattr(bench_train_mod, "measure", fake_measure)
    monkeypatch.setattr(bench_train_mod.subprocess, "run", run_here)
    cfg = config.load("configs/mainrun.yaml", [*TINY, f"train.compile={str(compiled).lower()}"])
    result = bench_train_mod.bench_train(cfg, steps=1, warmup=0, repeats=2, out=None)
    backend = "inductor" if compiled else None
    assert sorted(calls, key=str) == [("attnlab", backend)] * 2 + [("nanogpt", backend)] * 2
    assert result["compile"] is compiled
