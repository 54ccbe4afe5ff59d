"""Attention ideas from outside attnlab and per-layer specs, end to end through the CLI: train, sample with a
cache, evaluate, and the run directory keeps what it needs (the plugin's copy, each layer's pattern)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab import config
from attnlab.errors import ConfigError
from runkit import write_corpus

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "dilated_window.py"
CLI = [sys.executable, "-m", "attnlab"]


def run(*args, cwd):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300)


def common(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    return [
        f"out_dir={tmp_path / 'runs'}",
        f"data.source={corpus}",
        "data.format=lines",
        "data.tokenizer=bytes",
        f"data.dir={tmp_path / 'data'}",
        "model.n_layer=3",
        "model.n_head=2",
        "model.d_model=32",
        "model.context=32",
        "train.batch_size=4",
        "train.max_steps=3",
        "train.eval_batch_size=8",
        "logging.progress=false",
        "logging.attention_stats=1",
    ]


def test_a_plugin_trains_samples_evaluates_and_travels_with_its_run(tmp_path):
    plugin = tmp_path / "my_patterns.py"
    shutil.copy(PLUGIN, plugin)
    out = run(
        "train",
        "name=dil",
        f"attention.plugins={plugin}",
        "attention.pattern=dilated_window",
        "attention.window=4",
        "attention.dilation=3",
        *common(tmp_path),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "dil"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [a["pattern"] for a in summary["attention"]] == ["dilated_window"] * 3
    assert summary["attention"][0]["params"] == {"window": 4, "dilation": 3}
    assert summary["attention"][0]["backend"] == "blocksparse"
    index = json.loads((run_dir / "plugins.json").read_text())
    assert (run_dir / index[str(plugin)]["copy"]).read_bytes() == PLUGIN.read_bytes()
    plugin.unlink()  # the run uses its own copy from now on
    ev = run("eval", run_dir, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["val_bits_per_byte"] == pytest.approx(summary["val_bits_per_byte"], rel=1e-9)
    cached = run("sample", run_dir, "--prompt", "the", "--max-new-tokens", "20", "--temperature", "0", cwd=tmp_path)
    plain = run(
        "sample", run_dir, "--prompt", "the", "--max-new-tokens", "20", "--temperature", "0", "--no-cache", cwd=tmp_path
    )
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr + plain.stderr
    assert cached.stdout == plain.stdout and cached.stdout.startswith("the")


def test_per_layer_specs_train_sample_and_report_each_layer(tmp_path):
    layers = "[{pattern: local, window: 4}, {pattern: local, window: 8}, {pattern: dense}]"
    out = run("train", "name=layers", f"attention.layers={layers}", *common(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "runs" / "layers"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(a["pattern"], a["params"]) for a in summary["attention"]] == [
        ("local", {"window": 4}),
        ("local", {"window": 8}),
        ("dense", {}),
    ]
    assert config.load(run_dir / "config.yaml").attention.layers[1] == {"pattern": "local", "window": 8}
    cached = run("sample", run_dir, "--prompt", "a", "--max-new-tokens", "20", "--temperature", "0", cwd=tmp_path)
    plain = run(
        "sample", run_dir, "--prompt", "a", "--max-new-tokens", "20", "--temperature", "0", "--no-cache", cwd=tmp_path
    )
    assert cached.returncode == 0 and cached.stdout == plain.stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["attention.layers=[{pattern: local, window: 0}]"],
            "attention.layers[0].window=0 is out of range: use a value >= 1",
        ),
        (
            ["attention.layers=[{pattern: local}, {pattern: lcoal}]"],
            "attention.layers[1].pattern names unknown pattern 'lcoal'",
        ),
        (
            ["attention.layers=[{window: 3}]"],
            "attention.layers[0] has no pattern: write e.g. {pattern: local, window: 64}",
        ),
        (
            ["attention.layers=[{pattern: local, dilation: 2}]"],
            "attention.layers[0]: pattern 'local' has no parameter 'dilation' (its parameters: window)",
        ),
        (
            ["attention.layers=[{pattern: dense}, {pattern: strided, local_attn_ctx: 5}]"],
            "attention.layers[1]: attention.local_attn_ctx=5 must divide model.context=32",
        ),
        (["attention.plugins=nope.py"], "attention.plugins: 'nope.py' not found"),
        (["attention.pattern=dilatd_window"], "attention.pattern names unknown pattern 'dilatd_window'"),
    ],
)
def test_bad_specs_are_refused_in_one_line_naming_the_layer(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, ["train.max_steps=1", "model.context=32", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_broken_plugin_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(
        ConfigError, match=r"attention.plugins: '.*bad.py' failed to load \(RuntimeError: boom\): fix the plugin file"
    ):
        config.load(None, ["train.max_steps=1", f"attention.plugins={bad}"])


def test_patterns_command_lists_every_pattern_and_parameter(tmp_path):
    out = run("patterns", "--plugin", PLUGIN, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for needle in (
        "dense:",
        "local:",
        "window (int, default 256, >= 1)",
        "strided_mode (str, default 'split', one of split, interleave, union)",
        "dilated_window:",
        "dilation (int, default 2, >= 1)",
    ):
        assert needle in out.stdout
