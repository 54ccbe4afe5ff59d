"""`attnlab gpu-check --dry-run`: every stage end to end on CPU, verdict lines, files, time caps, the install step."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab import deps
from attnlab.attention.patterns import Fixed, Local, SinkWindow, Strided
from attnlab.bench.attention import count_density
from attnlab.bench.gpu_check import STAGE_TITLES, TOTAL_S, gpu_check, parse_caps, plan, run_stage, slug
from attnlab.bench.gpu_stages import STAGES, attention_targets, parse_pytest
from attnlab.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


VERDICT = re.compile(r"^\[([a-z0-9-]+)\] (ok|failed|skipped|timed out): (.+)$")
FILES = {  # what each stage must leave in its folder
    "cuda-tests": ["pytest.txt", "junit.xml", "tables.md", "result.json", "log.txt"],
    "attention": ["attention.csv", "attention.png", "tables.md", "raw/dense-128.csv", "raw/sparse-256.csv"],
    "train": ["train.csv", "tables.md"],
    "mainrun": [
        "run/config.yaml",
        "run/events.jsonl",
        "run/summary.json",
        "run/meta.json",
        "run/eval-mainrun-exact.json",
        "tables.md",
    ],
    "cifar10": [
        "cifar10-strided/summary.json",
        "cifar10-dense/summary.json",
        "samples-strided.png",
        "samples-dense.png",
        "tables.md",
    ],
    "generate": ["generate.csv", "tables.md"],
}
MACHINE_KEYS = {
    "dry_run",
    "device",
    "device_name",
    "gpu",
    "gpu_count",
    "driver",
    "cuda",
    "cudnn",
    "torch",
    "triton",
    "python",
    "cpu",
    "cores",
    "platform",
    "attnlab",
    "git_sha",
    "time",
    "install",
}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run through the command line, with no --out: it must land in a temporary folder."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    before = sorted(p.name for p in (REPO / "benchmarks").iterdir())
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab", "gpu-check", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    out = Path(re.search(r"results in (\S+)", proc.stdout).group(1))
    after = sorted(p.name for p in (REPO / "benchmarks").iterdir())
    return {"proc": proc, "out": out, "tmp": tmp, "benchmarks_unchanged": before == after}


def test_dry_run_prints_one_verdict_per_stage_in_order(dry):
    proc = dry["proc"]
    assert proc.returncode == 0, proc.stderr
    verdicts = [VERDICT.match(line).groups() for line in proc.stdout.splitlines() if VERDICT.match(line)]
    assert [v[0] for v in verdicts] == list(STAGES)
    assert all(status == "ok" for _, status, _ in verdicts), verdicts
    assert dict((v[0], v[2]) for v in verdicts)["cuda-tests"].endswith("all skipped: needs CUDA")


def test_dry_run_writes_into_a_temporary_folder_only(dry):
    assert dry["out"].is_relative_to(dry["tmp"]) and dry["benchmarks_unchanged"]


def test_every_stage_leaves_its_files(dry):
    out = dry["out"]
    for stage, files in FILES.items():
        for name in files:
            assert (out / stage / name).is_file(), f"{stage}/{name}"
        assert json.loads((out / stage / "result.json").read_text())["status"] == "ok"
    results = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in results] == list(STAGES) and all(r["seconds"] <= r["cap"] for r in results)


def test_summary_holds_every_verdict_and_table(dry):
    out = dry["out"]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# attnlab GPU check: ") and "Dry run on CPU" in summary
    for stage, title in STAGE_TITLES.items():
        assert f"## {title}" in summary and (out / stage / "tables.md").read_text().strip() in summary
        assert re.search(rf"\| {re.escape(title)} \| ok \|", summary)
    run_summary = json.loads((out / "mainrun" / "run" / "summary.json").read_text())
    assert f"{run_summary['mainrun_val_loss']:.4g}" in summary  # the run's own number, not a copy of something else


def test_machine_json_has_the_versions(dry):
    machine = json.loads((dry["out"] / "machine.json").read_text())
    assert MACHINE_KEYS <= set(machine)
    assert machine["dry_run"] is True and machine["device"] == "cpu" and machine["gpu"] is None


def test_attention_table_is_measured_against_sdpa_and_ideal(dry):
    rows = read_csv(dry["out"] / "attention" / "attention.csv")
    assert {(r["pattern"], r["backend"]) for r in rows} == {
        ("dense", "sdpa_causal"),
        ("dense", "auto(sdpa)"),
        ("local", "blocksparse"),
        ("strided", "blocksparse"),
    }
    assert {int(r["seq_len"]) for r in rows} == {128, 256} and {r["pass"] for r in rows} == {"fwd", "fwdbwd"}
    tables = (dry["out"] / "attention" / "tables.md").read_text()  # sdpa refuses sparse patterns: listed, not fatal
    assert "| local:window=32 | sdpa | 128 | fwd | attention.backend='sdpa' cannot run pattern 'local'" in tables
    for r in rows:
        assert float(r["ideal_speedup"]) == pytest.approx(1 / float(r["density"]))
        if r["backend"] != "sdpa_causal":
            assert float(r["speedup"]) == pytest.approx(float(r["sdpa_ms"]) / float(r["median_ms"]))


def test_train_and_generate_rows(dry):
    train = read_csv(dry["out"] / "train" / "train.csv")
    assert [(r["shape"], r["compile"]) for r in train] == [
        ("gpt2-small", "off"),
        ("gpt2-small", "eager"),
        ("mainrun", "off"),
    ]
    assert all(r["mfu"] == "" for r in train)  # no peak for a CPU
    gen = read_csv(dry["out"] / "generate" / "generate.csv")
    modes = {(r["spec"].split(":")[0], r["length"], r["mode"]) for r in gen}
    assert ("sink_window", "64", "cache+compile") in modes and ("dense", "128", "recompute") in modes
    assert len([r for r in gen if r["mode"] == "cache"]) == 6


def test_a_stage_past_its_cap_is_timed_out_and_the_next_still_runs(tmp_path):
    lines = []
    result = gpu_check(
        dry_run=True, out=tmp_path, stages=["attention", "train"], caps={"attention": 0.5}, log=lines.append
    )
    first, second = result["results"]
    assert (first["status"], second["status"]) == ("timed out", "ok")
    assert "[attention] timed out: stopped at its 0.5 s cap" in lines[1] and lines[2].startswith("[train] ok: ")
    assert (tmp_path / "attention" / "log.txt").is_file() and (tmp_path / "train" / "train.csv").is_file()
    assert "| 2. attention speed | timed out |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "stage,flag,why",
    [
        ("mainrun", "hn_titles", "the HN titles are not at {path}: pass --hn-titles PATH"),
        ("cifar10", "cifar10", "CIFAR-10 is not at {path}: pass --cifar10 PATH"),
    ],
)
def test_a_stage_without_its_data_is_skipped_with_the_reason(tmp_path, stage, flag, why):
    missing = tmp_path / "nowhere"
    result = run_stage(stage, tmp_path / stage, plan(False, **{flag: str(missing)}), cap=60)
    assert result["status"] == "skipped" and result["detail"].startswith(why.format(path=missing))


def test_pytest_output_is_counted_even_when_cut_short():
    text = (
        "tests/test_cuda.py::test_a[x] PASSED                [ 33%]\n"
        "[gw1] [ 66%] FAILED tests/test_cuda.py::test_b\n"
        "tests/test_cuda.py::test_c SKIPPED (needs CUDA)     [100%]\n"
    )
    assert parse_pytest(text) == {"counts": {"passed": 1, "failed": 1, "skipped": 1}, "summary": None, "failed": []}
    done = text + "FAILED tests/test_cuda.py::test_b - AssertionError: x\n= 1 failed, 1 passed, 1 skipped in 3.20s =\n"
    assert parse_pytest(done)["summary"] == "1 failed, 1 passed, 1 skipped"
    assert parse_pytest(done)["failed"] == ["tests/test_cuda.py::test_b"]


def test_caps_and_names():
    assert parse_caps(["attention=60", "cuda-tests=1.5"]) == {"attention": 60.0, "cuda-tests": 1.5}
    for bad in ("attention", "attention=0", "nope=5", "train=x"):
        with pytest.raises(UserError, match=r"is not STAGE=SECONDS .*write e.g. --cap attention=60"):
            parse_caps([bad])
    assert slug("NVIDIA H200") == "h200" and slug("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb"
    real = plan(False)
    assert sum(real["caps"].values()) <= TOTAL_S <= 510 and real["device"] == "cuda"  # nine minutes with the install
    assert real["attention"]["seq_lens"] == [1024, 2048, 4096, 8192, 16384, 32768]
    assert (real["attention"]["batch"], real["attention"]["heads"], real["attention"]["head_dim"]) == (4, 16, 64)


def test_without_a_gpu_the_real_check_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="no CUDA GPU is visible: .* or add --dry-run"):
        gpu_check(dry_run=False)


@pytest.mark.parametrize(
    "pattern",
    [
        Local(window=40),
        SinkWindow(sinks=4, window=40),
        Strided(local_attn_ctx=16, strided_mode="split", n_head=4),
        Fixed(local_attn_ctx=32, blocksize=8),
    ],
)
def test_density_counted_in_chunks_equals_the_patterns_own(pattern):
    assert count_density(pattern, 2100, 4, "cpu") == pytest.approx(pattern.density(2100, 4), abs=1e-12)


class FakePip:
    """Records pip commands; installs succeed or fail as told, by making their modules importable."""

    def __init__(self, present: set[str], network: bool):
        self.present, self.network, self.commands = set(present), network, []

    def find(self, name):
        return object() if name in self.present else None

    def run(self, cmd, **kw):
        self.commands.append(cmd[3 : cmd.index("--disable-pip-version-check")])
        ok = "--no-deps" in cmd or self.network
        if ok and "--no-deps" not in cmd:
            self.present |= {n for n, spec in deps.PACKAGES.items() if spec in cmd}
        return subprocess.CompletedProcess(
            cmd, 0 if ok else 1, "", "" if ok else "ERROR: No matching distribution found"
        )


@pytest.mark.parametrize("network", [True, False])
def test_install_keeps_torch_and_installs_only_what_is_missing(network):
    pip = FakePip({"torch", *deps.PACKAGES} - {"hypothesis", "yaml"}, network)
    report = deps.install_missing("/src/attnlab", find=pip.find, run=pip.run, log=lambda msg: None)
    assert pip.commands[0] == ["install", "--no-deps", "--no-build-isolation", "-e", "/src/attnlab"]
    assert pip.commands[1] == ["install", "pyyaml>=6", "hypothesis>=6"]  # never torch
    assert len(pip.commands) == 2 and report["missing_before"] == ["yaml", "hypothesis"]
    assert report["attnlab"] == "installed"
    if network:
        assert report["installed"] == ["yaml", "hypothesis"] and report["still_missing"] == []
    else:
        assert report["installed"] == [] and report["still_missing"] == ["yaml", "hypothesis"]
        assert report["pip"] == "ERROR: No matching distribution found"


def test_install_from_a_folder_of_wheels():
    pip = FakePip({"torch", *deps.PACKAGES} - {"pytest"}, network=True)
    deps.install_missing("/src/attnlab", wheels="/wheels", find=pip.find, run=pip.run, log=lambda msg: None)
    assert pip.commands[1] == ["install", "--no-index", "--find-links", "/wheels", "pytest>=7"]


def test_attention_targets_name_the_worst_row():
    def row(pattern, backend, T, speedup, of_ideal=None):
        return {
            "pattern": pattern,
            "backend": backend,
            "seq_len": T,
            "pass": "fwdbwd",
            "speedup": speedup,
            "of_ideal": of_ideal,
        }

    table = [
        row("dense", "auto(sdpa)", 1024, 0.99),
        row("dense", "auto(sdpa)", 32768, 0.93),
        row("local", "flex", 4096, 1.0, 0.2),
        row("local", "flex", 8192, 6.0, 0.7),
        row("local", "flex", 16384, 9.0, 0.65),
        row("strided", "flex", 8192, 2.0, 0.4),
        row("strided", "blocksparse", 8192, 5.0, 0.9),
    ]
    assert attention_targets(table, dry=False).splitlines() == [
        "- dense through attnlab >= 0.95x raw SDPA fwd+bwd at every T: worst 0.930x at T=32768: NOT met",
        "- local through flex >= 0.6 of its ideal speed-up at T >= 8k (fwd+bwd): worst 0.65 at T=16384: met",
        "- strided through flex >= 0.6 of its ideal speed-up at T >= 8k (fwd+bwd): worst 0.40 at T=8192: NOT met",
    ]
    assert attention_targets(table, dry=True) == "not judged in a dry run (CPU, tiny sizes)"


def test_a_failing_stage_says_why_and_the_command_exits_1(tmp_path):
    broken = plan(True)
    broken["attention"]["passes"] = ["sideways"]
    result = run_stage("attention", tmp_path / "attention", broken, cap=60)
    assert result["status"] == "failed"
    assert result["detail"] == "ConfigError: unknown pass 'sideways': use --passes fwd, fwdbwd or fwd,fwdbwd"
    assert "Traceback" in (tmp_path / "attention" / "log.txt").read_text()  # the whole story stays in the log
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnlab",
            "gpu-check",
            "--dry-run",
            "--out",
            str(tmp_path / "cli"),
            "--stages",
            "attention",
            "--cap",
            "attention=0.5",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1 and "[attention] timed out: stopped at its 0.5 s cap" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("attnlab: error: 1 stage(s) did not pass (attention): see")


def test_markdown_cells():
    from attnlab.bench.gpu_stages import md_table

    assert md_table(["a", "b", "c"], [[20544.3, 0.0001352, None], [1.5, "x|y", float("nan")]]).splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 20,544 | 0.0001352 | - |",
        "| 1.5 | x\\|y | - |",
    ]
