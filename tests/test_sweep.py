"""Sweeps: expansion, validation before any run, parallel and sequential runs, failures, resume, wandb conversion."""

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab import config
from attnlab import sweep as sw
from attnlab.cli import main
from attnlab.errors import ConfigError, UserError
from attnlab.training.logs import read_events
from runkit import tiny_config, write_corpus

PATTERNS = {"values": [{"attention.pattern": "dense"}, {"attention.pattern": "local", "attention.window": 8}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny byte-level preset: 4 steps, no periodic evaluation."""
    tmp = tmp_path_factory.mktemp("sweep-base")
    corpus = write_corpus(tmp / "corpus.txt", n_docs=120)
    cfg = tiny_config(corpus, tmp / "data", tmp / "runs", "train.max_steps=4", "model.n_layer=1", "model.dropout=0.0")
    config.save(cfg, tmp / "base.yaml")
    return tmp / "base.yaml"


def sweep_dict(base: Path, out: Path, **kw) -> dict:
    d = {
        "name": "s",
        "base": str(base),
        "out_dir": str(out),
        "parameters": {"optim.lr": {"values": [0.001, 0.003]}, "train.seed": {"values": [0, 1]}},
    }
    d.update(kw)
    return d


def write_sweep(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# ------------------------------------------------------------------ expansion


def test_grid_gives_every_combination_with_readable_unique_names(base, tmp_path):
    specs = sw.expand(sw.sweep_from_dict(sweep_dict(base, tmp_path)))
    assert [(s.name, s.overrides) for s in specs] == [
        ("lr=0.001,seed=0", ["optim.lr=0.001", "train.seed=0"]),
        ("lr=0.001,seed=1", ["optim.lr=0.001", "train.seed=1"]),
        ("lr=0.003,seed=0", ["optim.lr=0.003", "train.seed=0"]),
        ("lr=0.003,seed=1", ["optim.lr=0.003", "train.seed=1"]),
    ]
    cfg = specs[3].config  # validated run config: base + overrides + the sweep's name and folder
    assert (cfg.optim.lr, cfg.train.seed, cfg.name, cfg.out_dir) == (0.003, 1, "lr=0.003,seed=1", str(tmp_path / "s"))
    assert cfg.train.max_steps == 4


def test_names_are_sanitised_and_made_unique(base, tmp_path):
    d = sweep_dict(base, tmp_path, parameters={"data.field": ["a/b", "a b"], "train.seed": [0], "data.seed": [5]})
    names = [s.name for s in sw.expand(sw.sweep_from_dict(d))]
    # two keys ending in .seed keep their full key; '/' and ' ' become '_'; the repeat gets -2
    assert names == ["field=a_b,train.seed=0,data.seed=5", "field=a_b,train.seed=0,data.seed=5-2"]


def test_bundles_set_several_keys_and_are_named_by_their_first_distinct_key(base, tmp_path):
    bundles = {
        "values": [
            {"attention.pattern": "dense"},
            {"attention.pattern": "local", "attention.window": 8},
            {"attention.pattern": "strided", "attention.local_attn_ctx": 8, "attention.strided_mode": "split"},
        ]
    }
    specs = sw.expand(
        sw.sweep_from_dict(sweep_dict(base, tmp_path, parameters={"attention": bundles, "train.seed": [0]}))
    )
    assert [(s.name, s.overrides) for s in specs] == [
        ("attention=dense,seed=0", ["attention.pattern=dense", "train.seed=0"]),
        ("attention=local,seed=0", ["attention.pattern=local", "attention.window=8", "train.seed=0"]),
        (
            "attention=strided,seed=0",
            ["attention.pattern=strided", "attention.local_attn_ctx=8", "attention.strided_mode=split", "train.seed=0"],
        ),
    ]
    assert specs[1].config.attention.window == 8 and specs[2].config.attention.local_attn_ctx == 8
    labelled = dict(bundles, labels=["full", "win8", "st8"])
    names = [
        s.name for s in sw.expand(sw.sweep_from_dict(sweep_dict(base, tmp_path, parameters={"pattern": labelled})))
    ]
    assert names == ["pattern=full", "pattern=win8", "pattern=st8"]


def test_an_empty_bundle_is_the_base_config_an_ablations_control(base, tmp_path):
    ablation = {"values": [{}, {"model.dropout": 0.1, "train.seed": 3}], "labels": ["nothing", "dropout"]}
    sweep = sw.sweep_from_dict(sweep_dict(base, tmp_path, parameters={"without": ablation}))
    control, other = sw.expand(sweep)
    assert (control.name, control.overrides, other.overrides) == (
        "without=nothing",
        [],
        ["model.dropout=0.1", "train.seed=3"],
    )
    base_cfg = config.load(base)
    assert (control.config.model, control.config.train) == (base_cfg.model, base_cfg.train)
    assert other.config.model.dropout == 0.1 != base_cfg.model.dropout


def test_random_is_reproducible_and_log_uniform(base, tmp_path):
    d = sweep_dict(
        base,
        tmp_path,
        method="random",
        count=300,
        seed=3,
        parameters={"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}},
    )
    lrs = [s.choices["optim.lr"] for s in sw.expand(sw.sweep_from_dict(d))]
    assert lrs == [s.choices["optim.lr"] for s in sw.expand(sw.sweep_from_dict(d))]
    # log-uniform: half the mass below the geometric mean 1e-3 (a uniform draw would put ~9% there)
    assert 0.42 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.58


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    count=st.integers(1, 6),
    lo_exp=st.floats(-6, -2),
    span=st.floats(0, 3),
    lo_int=st.integers(0, 100),
    int_span=st.integers(0, 50),
)
def test_random_samples_stay_within_bounds(base, seed, count, lo_exp, span, lo_int, int_span):
    lo, hi = 10**lo_exp, 10 ** (lo_exp + span)
    d = sweep_dict(
        base,
        Path("unused"),
        method="random",
        count=count,
        seed=seed,
        parameters={
            "optim.lr": {"distribution": "log_uniform_values", "min": lo, "max": hi},
            "optim.weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.5},
            "optim.warmup_steps": {"distribution": "int_uniform", "min": lo_int, "max": lo_int + int_span},
            "model.norm": {"values": ["layernorm", "rmsnorm"]},
        },
    )
    specs = sw.expand(sw.sweep_from_dict(d))
    assert len(specs) == count and len({s.name for s in specs}) == count
    for s in specs:
        c = s.choices
        assert lo <= c["optim.lr"] <= hi and 0.0 <= c["optim.weight_decay"] <= 0.5
        assert isinstance(c["optim.warmup_steps"], int) and lo_int <= c["optim.warmup_steps"] <= lo_int + int_span
        assert c["model.norm"] in ("layernorm", "rmsnorm") and s.config.model.norm == c["model.norm"]
        assert s.config.optim.lr == c["optim.lr"]  # the override text round-trips the float exactly


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "bayes"}, "sweep method 'bayes' is not supported: use grid or random"),
        ({"paralel": 2}, "unknown sweep key 'paralel': did you mean parallel?"),
        ({"base": None}, "sweep key 'base' is missing"),
        ({"base": "no/such.yaml"}, "sweep base 'no/such.yaml' not found (it is relative to the current directory)"),
        (
            {"parameters": {"model.n_layr": [1, 2]}},
            "sweep parameter 'model.n_layr': unknown config key 'model.n_layr': did you mean model.n_layer?",
        ),
        ({"parameters": {"model.n_head": [2, 0]}}, "sweep parameter 'model.n_head': model.n_head=0 is out of range"),
        (
            {"parameters": {"optim.lr": {"distribution": "uniform", "min": 0.1, "max": 0.2}}},
            "sweep parameter 'optim.lr': method grid needs a list of values, not a distribution",
        ),
        (
            {
                "method": "random",
                "count": 2,
                "parameters": {"optim.lr": {"distribution": "uniform", "min": 0.01, "max": 0.001}},
            },
            "sweep parameter 'optim.lr': min 0.01 > max 0.001: swap them",
        ),
        ({"method": "random", "parameters": {"optim.lr": [0.1]}}, "method: random needs 'count'"),
        ({"count": 3}, "sweep key 'count' applies to method: random"),
        ({"parameters": {"name": ["a", "b"]}}, "sets 'name', which the sweep sets for every run"),
        ({"parameters": {"x": [{"attention.pattern": "local"}, "dense"]}}, "mixes override bundles and plain values"),
        (
            {"parameters": {"x": [{"attention.window": 8, "train.seed": 1}, {"attention.window": 8, "train.seed": 1}]}},
            "lists a value twice",
        ),
        (
            {
                "parameters": {
                    "x": [{"attention.window": 8, "train.seed": 1}, {"attention.window": 8, "train.seed": 2}],
                    "train.seed": [0],
                }
            },
            "train.seed is swept by parameters 'x' and 'train.seed'",
        ),
        ({"overrides": ["train.seed=3"]}, "train.seed is both a fixed override and swept by parameter 'train.seed'"),
    ],
)
def test_bad_sweeps_are_refused_with_the_key_and_the_fix(base, tmp_path, change, message):
    d = {k: v for k, v in {**sweep_dict(base, tmp_path), **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        sw.expand(sw.sweep_from_dict(d))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_value_bad_only_with_the_base_fails_before_any_run_starts(base, tmp_path, capsys):
    # model.n_head=3 is in range, but d_model=32 is not divisible by it: caught when the run configs are expanded
    f = write_sweep(tmp_path / "bad.yaml", sweep_dict(base, tmp_path / "out", parameters={"model.n_head": [2, 3]}))
    assert main(["sweep", str(f)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(
            "attnlab: error: sweep run 'n_head=3' (model.n_head=3): model.d_model=32 is not divisible by model.n_head=3"
        )
    )
    assert not (tmp_path / "out").exists()  # no sweep folder, no run directory


# ------------------------------------------------------------------ running (the CLI in this process; runs are subprocesses)


def sweep_cli(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(["sweep", *map(str, args)])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), err


def test_parallel_sweep_runs_reports_refuses_reuse_and_resumes(base, tmp_path, capsys):
    d = sweep_dict(base, tmp_path / "out", name="pat", parameters={"attention": PATTERNS, "train.seed": [0, 1]})
    f = write_sweep(tmp_path / "pat.yaml", d)
    assert main(["sweep", str(f), "--dry-run"]) == 0
    assert [json.loads(x)["name"] for x in capsys.readouterr().out.splitlines()] == [
        "attention=dense,seed=0",
        "attention=dense,seed=1",
        "attention=local,seed=0",
        "attention=local,seed=1",
    ]
    assert not (tmp_path / "out").exists()

    code, out, err = sweep_cli(capsys, f, "--parallel", 2)
    assert code == 0, err
    folder = tmp_path / "out" / "pat"
    assert (out["sweep"], out["runs"], out["ok"], out["failed"], out["skipped"]) == (str(folder), 4, 4, 0, 0)
    runs = run_dirs(folder)
    assert [r.name for r in runs] == [
        "attention=dense,seed=0",
        "attention=dense,seed=1",
        "attention=local,seed=0",
        "attention=local,seed=1",
    ]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for r in runs:
        cfg = config.load(r / "config.yaml")
        want = ("local", 8) if "local" in r.name else ("dense", None)  # dense has no window parameter
        assert (cfg.attention.pattern, cfg.attention.window, cfg.train.seed) == (*want, int(r.name[-1]))
        assert cfg.train.threads == threads  # cores // parallel
        assert json.loads((r / "summary.json").read_text())["steps"] == 4
    records = json.loads((folder / "runs.json").read_text())["runs"]
    assert [(x["status"], x["exit_code"], x["action"]) for x in records] == [("ok", 0, "train")] * 4
    assert all(
        x["val_bits_per_byte"] == json.loads((folder / x["name"] / "summary.json").read_text())["val_bits_per_byte"]
        for x in records
    )
    assert out["best"] == min(records, key=lambda x: x["val_bits_per_byte"])["name"]
    assert yaml.safe_load((folder / "sweep.yaml").read_text()) == sw.load_sweep(f).to_dict()
    assert out["report"] == str(folder / "report" / "index.html")
    assert all(r.name in (folder / "report" / "index.html").read_text(encoding="utf-8") for r in runs)

    # an existing sweep folder is never reused silently
    code, _, err = sweep_cli(capsys, f)
    assert code == 2 and "already exists: pass --resume to finish its missing runs, --force to replace it" in err

    # --resume: finished runs are skipped untouched, a half-finished one continues from its checkpoint
    (runs[1] / "summary.json").unlink()
    kept = {r.name: (r / "summary.json").stat().st_mtime_ns for r in runs if r != runs[1]}
    code, out, err = sweep_cli(capsys, f, "--resume", "--no-report")
    assert code == 0, err
    assert (out["ok"], out["failed"], out["skipped"], out["report"]) == (4, 0, 3, None)
    assert {n: (folder / n / "summary.json").stat().st_mtime_ns for n in kept} == kept
    assert [x["action"] for x in json.loads((folder / "runs.json").read_text())["runs"]] == [
        "skip",
        "resume",
        "skip",
        "skip",
    ]
    assert len(read_events(runs[1], "run_resumed")) == 1 and (runs[1] / "summary.json").is_file()

    # --resume refuses a sweep file that changed since the folder was made
    write_sweep(f, dict(d, parameters={"attention": PATTERNS, "train.seed": [0, 1, 2]}))
    code, _, err = sweep_cli(capsys, f, "--resume")
    assert code == 2 and "with a changed sweep (parameters.train.seed.values: [0, 1] -> [0, 1, 2])" in err


def test_force_never_deletes_a_folder_that_is_not_a_sweep(base, tmp_path):
    (tmp_path / "out" / "s").mkdir(parents=True)
    (tmp_path / "out" / "s" / "notes.txt").write_text("mine")
    with pytest.raises(
        UserError, match="is not a sweep folder \\(no sweep.yaml\\): choose another sweep name or out_dir"
    ):
        sw.run_sweep(sw.sweep_from_dict(sweep_dict(base, tmp_path / "out")), force=True)
    assert (tmp_path / "out" / "s" / "notes.txt").read_text() == "mine"


def run_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / "config.yaml").is_file())


def test_a_failed_run_is_recorded_and_the_others_finish(base, tmp_path, capsys):
    # model.position=image passes config validation but fails at train time on a text dataset
    d = sweep_dict(base, tmp_path / "out", name="f", parameters={"model.position": ["image", "learned"]})
    code, out, err = sweep_cli(capsys, write_sweep(tmp_path / "f.yaml", d), "--no-report", "--parallel", 2)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("attnlab: error: 1 of 2 sweep runs did not finish")
    assert (out["ok"], out["failed"], out["best"]) == (1, 1, "position=learned")
    bad, good = json.loads((tmp_path / "out" / "f" / "runs.json").read_text())["runs"]
    assert (bad["status"], bad["exit_code"], good["status"]) == ("failed", 2, "ok")
    assert bad["error"].startswith("attnlab: error: model.position=image needs model.image_shape")
    assert (tmp_path / "out" / "f" / "position=learned" / "summary.json").is_file()


# ------------------------------------------------------------------ wandb


def test_to_wandb_writes_the_same_sweep_for_wandb_agents(base, tmp_path):
    d = sweep_dict(
        base,
        tmp_path / "out",
        name="w",
        overrides=["train.max_steps=3"],
        method="random",
        count=5,
        seed=1,
        parameters={
            "pattern": dict(PATTERNS, labels=["full", "win8"]),
            "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3},
            "attention.schedule": [["local", "dense"]],
        },
    )
    f = write_sweep(tmp_path / "w.yaml", d)
    out = sw.write_wandb(sw.load_sweep(f), tmp_path / "wandb.yaml")
    w = yaml.safe_load(out.read_text())
    assert w == {
        "name": "w",
        "method": "random",
        "metric": {"name": "validation/val_bits_per_byte", "goal": "minimize"},
        "parameters": {
            "pattern": {"values": ["full", "win8"]},
            "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3},
            "attention.schedule": {"values": ["local,dense"]},
        },
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "attnlab",
            "sweep",
            "--one",
            str(f),
            "logging.wandb=online",
            "${args_no_hyphens}",
        ],
        "run_cap": 5,
    }
    with pytest.raises(UserError, match="already exists"):
        sw.write_wandb(sw.load_sweep(f), out)


def test_one_run_from_wandb_choices_matches_the_local_sweep(base, tmp_path, one_thread):
    d = sweep_dict(
        base,
        tmp_path / "out",
        name="w",
        parameters={"pattern": dict(PATTERNS, labels=["full", "win8"]), "train.seed": [0, 1]},
    )
    sweep = sw.sweep_from_dict(d)
    with pytest.raises(UserError, match="has no bundle 'win9': use one of full, win8"):
        sw.run_one(sweep, ["pattern=win9", "train.seed=1"])
    with pytest.raises(UserError, match="missing train.seed: pass train.seed=VALUE"):
        sw.run_one(sweep, ["pattern=win8"])
    # what `wandb agent` runs: labels pick bundles, other keys are plain overrides
    summary = sw.run_one(sweep, ["logging.log_every=2", "pattern=win8", "train.seed=1"], argv=["test"])
    run = tmp_path / "out" / "w" / "pattern=win8,seed=1"
    assert summary["steps"] == 4 and (run / "summary.json").is_file()
    assert run.name in [s.name for s in sw.expand(sweep)]
    cfg = config.load(run / "config.yaml")
    assert (cfg.attention.pattern, cfg.attention.window, cfg.train.seed, cfg.logging.log_every) == ("local", 8, 1, 2)


def test_example_sweep_plans_six_quickstart_runs():
    root = Path(__file__).resolve().parents[1]
    cwd = os.getcwd()
    os.chdir(root)  # the example's paths are relative to the project root
    try:
        sweep = sw.load_sweep("configs/sweeps/patterns.yaml")
        specs = sw.expand(sweep)
    finally:
        os.chdir(cwd)
    assert [s.name for s in specs] == [f"pattern={p},seed={s}" for p in ("dense", "local", "strided") for s in (0, 1)]
    strided = specs[4].config.attention
    assert (strided.pattern, strided.local_attn_ctx, strided.strided_mode) == ("strided", 16, "split")
    assert specs[2].config.attention.window == 64 and specs[0].config.train.time_budget_s is None
    assert math.isclose(specs[0].config.optim.lr, 3e-3)


@pytest.mark.parametrize(
    "path, max_steps",
    [("configs/sweeps/mainrun-ablation.yaml", None), ("benchmarks/mainrun/ablation-1epoch/sweep.yaml", 270)],
)
def test_mainrun_ablation_removes_one_ingredient_per_run_from_mainrun_best(path, max_steps):
    root = Path(__file__).resolve().parents[1]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        specs = sw.expand(sw.load_sweep(path))
        best = config.load("configs/mainrun-best.yaml")
    finally:
        os.chdir(cwd)
    by_name = {s.name.removeprefix("without="): s.config for s in specs}
    assert by_name["nothing"].model == best.model and by_name["nothing"].optim == best.optim
    changed = {
        name: {
            f"{part}.{k}"
            for part in ("model", "attention", "optim")
            for k, v in vars(getattr(cfg, part)).items()
            if v != getattr(getattr(best, part), k)
        }
        for name, cfg in by_name.items()
    }
    assert changed == {
        "nothing": set(),
        "muon": {"optim.name"},
        "wsd": {"optim.schedule"},
        "document_mask": {"attention.document_mask", "model.position_reset"},
        "rope": {"model.position"},
        "swiglu": {"model.mlp"},
        "qk_norm": {"model.qk_norm"},
        "tied_embeddings": {"model.tie_weights"},
        "depth": {"model.n_layer", "model.n_head", "model.d_model"},
    }
    assert all(cfg.train.epochs == 7 and cfg.data == best.data for cfg in by_name.values())
    assert {cfg.train.max_steps for cfg in by_name.values()} == {max_steps}
    assert {cfg.train.dtype for cfg in by_name.values()} == {"bfloat16"}  # as the recorded runs
