"""attnlab report: run tables, seed statistics, embedded figures, samples and bad input."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import stats as sps

from attnlab import config
from attnlab.cli import main
from attnlab.errors import CheckpointError, UserError
from attnlab.eval.report.build import build_report, fmt_float, fmt_int, fmt_metric, fmt_p, printable
from attnlab.eval.report.run_data import RunData, load_run_data, validation_points
from attnlab.eval.report.stats import group_runs, stats
from attnlab.training.trainer import train
from runkit import tiny_config, write_corpus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img[^>]*src="data:image/png;base64,([^"]+)"')


# ----------------------------------------------------------------- helpers


class Tables(HTMLParser):
    """Every <table> of a page as a list of rows (header row first), cell text unescaped."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self._cell = [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def table_with(page: str, first_header: str, second_header: str) -> list[list[str]]:
    return next(t for t in Tables(page).tables if t[0][:2] == [first_header, second_header])


def row_of(table: list[list[str]], name: str) -> dict[str, str]:
    return dict(zip(table[0], next(r for r in table[1:] if r[0] == name)))


def make_run(
    root: Path,
    name: str,
    final: float | None,
    *overrides: str,
    seed: int = 1,
    old_logs: bool = False,
    sample: str | None = None,
    summary_extra: dict | None = None,
) -> Path:
    """A hand-made run directory: config.yaml, events.jsonl, summary.json (unless final is None), meta.json."""
    run = root / name
    run.mkdir(parents=True)
    cfg = config.load(
        None,
        [
            f"name={name}",
            f"out_dir={root}",
            f"train.seed={seed}",
            "train.max_steps=20",
            "model.context=64",
            "model.n_head=2",
            "model.d_model=32",
            "train.batch_size=4",
            *overrides,
        ],
    )
    config.save(cfg, run / "config.yaml")
    events = []
    for step in (5, 10, 15, 20):
        events.append({"event": "training_step", "step": step, "loss": 5.0 - step / 10 + seed / 100})
        v = {
            "event": "validation_step",
            "time": 1000.0 + step,
            "step": step,
            "val_loss": 4.0 - step / 20,
            "val_bits_per_byte": 6.0 - step / 10 + seed / 100,
            "partial": False,
        }
        if not old_logs:
            v.update(tokens=step * 256, train_seconds=step * 0.5 + seed / 10)
        events.append(v)
    if final is not None:
        events.append({**events[-1], "val_bits_per_byte": final, "final": True})
        summary = {
            "val_bits_per_byte": final,
            "val_nats_per_token": final * 0.7,
            "params": 12345,
            "tokens_per_second": 9876.5,
            "peak_memory_mb": 321.25,
            "steps": 20,
            "train_seconds": 10.25,
            "wall_seconds": 12.5,
            "stop_reason": "max_steps",
            **(summary_extra or {}),
        }
        (run / "summary.json").write_text(json.dumps(summary))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "meta.json").write_text(
        json.dumps(
            {
                "versions": {"torch": "9.9.9", "attnlab": "0.1.0"},
                "git_sha": "abcdef0123456789",
                "device": "cuda",
                "gpu": "Test GPU",
                "started": "2026-01-01T00:00:00Z",
            }
        )
    )
    if sample is not None:
        (run / "samples").mkdir()
        (run / "samples" / "step-0000010.txt").write_text("an older sample")
        (run / "samples" / "step-0000020.txt").write_text(sample)
    return run


def pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in IMG.findall(page)]


def assert_valid_png(data: bytes) -> None:
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size[0] > 200 and im.size[1] > 200
        assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 2  # not a blank picture


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float]:
    ma, mb, va, vb = np.mean(a), np.mean(b), np.var(a, ddof=1), np.var(b, ddof=1)
    se2 = va / len(a) + vb / len(b)
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return t, 2 * sps.t.sf(abs(t), df)


# ----------------------------------------------------------------- trained runs: 2 configs x 2 seeds

CONFIGS = {
    "dense-s7": ["train.seed=7"],
    "dense-s8": ["train.seed=8"],
    "local-s7": ["attention.pattern=local", "attention.window=8", "train.seed=7"],
    "local-s8": ["attention.pattern=local", "attention.window=8", "train.seed=8"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("report")
    corpus = write_corpus(root / "corpus.txt")
    runs = []
    for name, ov in CONFIGS.items():
        train(
            tiny_config(
                corpus,
                root / "data",
                root / "runs",
                "train.max_steps=6",
                "train.eval_every=3",
                "logging.sample_tokens=40",
                *ov,
                name=name,
            )
        )
        runs.append(root / "runs" / name)
    out = root / "report"
    page = build_report(runs, out)
    return runs, out, page.read_text(encoding="utf-8")


def test_metrics_table_has_every_run_and_summary_value(trained):
    runs, _, page = trained
    table = table_with(page, "run", "config")
    assert [r[0] for r in table[1:]] == [r.name for r in runs]
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        label = "attention=dense" if "dense" in run.name else "attention=local(window=8)"
        assert row_of(table, run.name) == {
            "run": run.name,
            "config": label,
            "metric": "val bits/byte",
            "final (full split)": fmt_metric(s["val_bits_per_byte"]),
            "nats/token": fmt_metric(s["val_nats_per_token"]),
            "params": fmt_int(s["params"]),
            "tokens/s": fmt_float(s["tokens_per_second"], 0),
            "peak memory MB": fmt_float(s["peak_memory_mb"]),
            "steps": "6",
            "training seconds": fmt_float(s["train_seconds"]),
            "stop reason": "max_steps",
        }
    runs_table = table_with(page, "run", "directory")
    assert {r[0]: r[2] for r in runs_table[1:]} == {r.name: "finished" for r in runs}
    metas = [json.loads((run / "meta.json").read_text()) for run in runs]
    # "+dirty" when the tests run in a checkout with uncommitted changes
    assert [r[6] for r in runs_table[1:]] == [m["git_sha"][:10] + ("+dirty" if m["git_dirty"] else "") for m in metas]


def test_seed_statistics_of_trained_runs_match_scipy(trained):
    runs, _, page = trained
    finals = {r.name: json.loads((r / "summary.json").read_text())["val_bits_per_byte"] for r in runs}
    dense, local = [finals["dense-s7"], finals["dense-s8"]], [finals["local-s7"], finals["local-s8"]]
    seeds = table_with(page, "config", "metric")
    for label, vals in (("attention=dense", dense), ("attention=local(window=8)", local)):
        row = row_of(seeds, label)
        assert row["n"] == "2"
        assert row["mean ± std"] == f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}"
    t, p = welch_by_hand(dense, local)
    assert p == pytest.approx(sps.ttest_ind(dense, local, equal_var=False).pvalue, rel=1e-9)
    word = "significant at p<0.05" if p < 0.05 else "not significant at p<0.05"
    sentence = (
        f"attention=dense vs attention=local(window=8): "
        f"difference of means {np.mean(dense) - np.mean(local):+.4f} val bits/byte "
        f"(Welch's t = {t:.3f}, p = {fmt_p(p)}): {word}."
    )
    assert html.escape(sentence) in page


def test_every_figure_is_an_embedded_valid_png(trained):
    _, out, page = trained
    images = pngs(page)
    # 3 validation curves (steps, tokens, seconds) + training loss + 2 attention patterns; text samples are text
    assert len(images) == page.count("<img") == 6
    assert 'data-figures="6"' in page and "This report has 6 figure(s)." in page
    for data in images:
        assert_valid_png(data)
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    assert captions[:4] == [
        "val bits/byte against steps",
        "val bits/byte against training tokens",
        "val bits/byte against training seconds",
        "training loss (nats/token) against steps",
    ]
    assert captions[4:] == [
        "dense: N=32, 2 heads; used by dense-s7, dense-s8",
        "local: N=32, 2 heads; used by local-s7, local-s8",
    ]


def test_page_is_self_contained(trained):
    _, _, page = trained
    without_data = IMG.sub("<img>", page)
    assert "<script" not in page.lower() and "://" not in without_data
    assert not re.search(r'(src|href)="(?!data:)', page) and "url(" not in page and "@import" not in page


def test_markdown_refers_to_the_embedded_pngs(trained):
    _, out, page = trained
    md = (out / "report.md").read_text(encoding="utf-8")
    files = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(files) == 6 and len(set(files)) == 6
    assert [(out / f).read_bytes() for f in files] == pngs(page)  # the same pictures, in the same order
    assert "| dense-s7 |" in md and "not significant at p<0.05" in md or "significant at p<0.05" in md


def test_last_text_sample_of_each_run_is_shown_escaped(trained):
    runs, _, page = trained
    for run in runs:
        last = sorted((run / "samples").glob("*.txt"))[-1]
        assert last.name == "step-0000006.txt"
        assert html.escape(printable(last.read_text(encoding="utf-8", errors="replace"))) in page


# ----------------------------------------------------------------- hand-made runs: statistics and grouping

A, B, D = [1.10, 1.12, 1.11], [1.30, 1.31], [1.105, 1.125]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """Configs lr=0.001 (3 seeds + 1 unfinished), 0.002 (2), 0.003 (2), 0.004 (1 seed), and its report page."""
    root = tmp_path_factory.mktemp("handmade")
    runs = [make_run(root / "runs", f"a{i}", v, "optim.lr=0.001", seed=i) for i, v in enumerate(A)]
    runs.append(make_run(root / "runs", "a-running", None, "optim.lr=0.001", seed=9))
    runs += [make_run(root / "runs", f"b{i}", v, "optim.lr=0.002", seed=i) for i, v in enumerate(B)]
    runs += [make_run(root / "runs", f"d{i}", v, "optim.lr=0.003", seed=i) for i, v in enumerate(D)]
    runs.append(make_run(root / "runs", "e0", 1.5, "optim.lr=0.004"))
    return runs, build_report(runs, root / "rep").read_text()


def test_mean_std_and_welch_on_handmade_numbers(handmade):
    _, page = handmade
    seeds = table_with(page, "config", "metric")
    for label, vals in (("optim.lr=0.001", A), ("optim.lr=0.002", B), ("optim.lr=0.003", D)):
        row = row_of(seeds, label)
        assert row["n"] == str(len(vals)) and row["mean ± std"] == f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}"
        assert row["values"] == ", ".join(fmt_metric(v) for v in vals)
    assert row_of(seeds, "optim.lr=0.004")["mean ± std"] == "1.5000 (single seed)"
    expected = {}
    for (la, a), (lb, b) in (
        (("optim.lr=0.001", A), ("optim.lr=0.002", B)),
        (("optim.lr=0.001", A), ("optim.lr=0.003", D)),
        (("optim.lr=0.002", B), ("optim.lr=0.003", D)),
    ):
        t, p = welch_by_hand(a, b)
        expected[(la, lb)] = p
        word = "significant at p<0.05" if p < 0.05 else "not significant at p<0.05"
        assert (
            html.escape(
                f"{la} vs {lb}: difference of means {np.mean(a) - np.mean(b):+.4f} val bits/byte "
                f"(Welch's t = {t:.3f}, p = {fmt_p(p)}): {word}."
            )
            in page
        )
    assert expected[("optim.lr=0.001", "optim.lr=0.002")] < 0.05 <= expected[("optim.lr=0.001", "optim.lr=0.003")]
    assert page.count("Welch&#x27;s t = ") == 3
    assert "optim.lr=0.004: 1 finished seed(s), so no significance test is possible for it." in page


def test_unfinished_run_is_marked_and_left_out_of_statistics(handmade):
    _, page = handmade
    row = row_of(table_with(page, "run", "config"), "a-running")
    assert row["final (full split)"] == "unfinished" and row["stop reason"] == "unfinished (no summary.json)"
    assert row["steps"] == "20" and row["params"] == "—"  # the last logged step; no summary
    assert row_of(table_with(page, "config", "metric"), "optim.lr=0.001")["runs"] == "a0, a1, a2, a-running"
    assert "Unfinished (no summary.json, so no final full-split metric; curves only): a-running." in page
    assert row_of(table_with(page, "run", "directory"), "a-running")["state"] == "unfinished"


def test_handmade_report_embeds_one_curve_set_and_one_pattern(handmade):
    runs, page = handmade
    images = pngs(page)
    assert len(images) == page.count("<img") == 5 and 'data-figures="5"' in page  # 3 curves + training loss + 1 pattern
    for data in images:
        assert_valid_png(data)
    assert "dense: N=64, 2 heads; used by " + ", ".join(r.name for r in runs) in page
    assert row_of(table_with(page, "run", "directory"), "b1")["device"] == "cuda (Test GPU)"


def test_single_seed_per_config_says_no_test_is_possible(tmp_path):
    runs = [
        make_run(tmp_path / "runs", "x", 1.2, "attention.pattern=local", "attention.window=16"),
        make_run(tmp_path / "runs", "y", 1.3),
    ]
    page = build_report(runs, tmp_path / "rep").read_text()
    assert "Every config has a single finished seed: no significance test is possible" in page
    assert "Welch&#x27;s t =" not in page
    assert [r[0] for r in table_with(page, "config", "metric")[1:]] == ["attention=local(window=16)", "attention=dense"]


def test_identical_seeds_are_not_testable(tmp_path):
    runs = [
        make_run(tmp_path / "runs", f"{g}{i}", v, f"optim.lr={lr}", seed=i)
        for g, v, lr in (("p", 1.0, 0.001), ("q", 2.0, 0.002))
        for i in range(2)
    ]
    page = build_report(runs, tmp_path / "rep").read_text()
    assert (
        "(Welch&#x27;s t = nan, p = nan): no significance test is possible (every seed of both configs gave the same value)."
        in page
    )


def _fake_run(lr: float, seed: int, i: int) -> RunData:
    cfg = config.Config()
    cfg.optim.lr, cfg.train.seed, cfg.name, cfg.logging.log_every = lr, seed, f"r{i}", 1 + seed
    cfg.train.checkpoint_every = 10 + i  # changes nothing a run computes
    return RunData(
        dir=Path(f"r{i}"), name=f"r{i}", cfg=cfg, summary={"val_bits_per_byte": lr}, meta={}, metric="val_bits_per_byte"
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.001, 0.002, 0.003]), st.integers(0, 5)), min_size=1, max_size=8))
def test_groups_are_configs_up_to_seed_name_and_logging(specs):
    runs = [_fake_run(lr, seed, i) for i, (lr, seed) in enumerate(specs)]
    groups = group_runs(runs)
    lrs = list(dict.fromkeys(lr for lr, _ in specs))
    assert [[r.name for r in g.runs] for g in groups] == [
        [f"r{i}" for i, (l, _) in enumerate(specs) if l == lr] for lr in lrs
    ]
    assert [g.label for g in groups] == ([f"optim.lr={lr}" for lr in lrs] if len(lrs) > 1 else ["one config"])


@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=10))
def test_stats_are_mean_and_sample_std(values):
    s = stats(values)
    assert s.n == len(values) and s.mean == pytest.approx(np.mean(values), abs=1e-9)
    assert (s.std is None) if len(values) == 1 else s.std == pytest.approx(np.std(values, ddof=1), abs=1e-9)


# ----------------------------------------------------------------- older logs, unfinished runs, images, escaping


def test_old_logs_derive_tokens_and_leave_out_wall_clock(tmp_path):
    old = make_run(tmp_path / "runs", "old", 1.2, old_logs=True)
    run = load_run_data(old)
    assert [(p.step, p.tokens, p.seconds) for p in run.val] == [(s, s * 4 * 1 * 64, None) for s in (5, 10, 15, 20)]
    page = build_report([old], tmp_path / "rep").read_text()
    assert (
        "No run logged training seconds with its evaluations (val bits/byte): no plot against training seconds." in page
    )
    assert "Left out of the wall-clock plot (their logs predate train_seconds): old." in page
    assert len(pngs(page)) == page.count("<img") == 4  # steps, tokens, training loss, pattern


def test_final_evaluation_wins_at_a_step_evaluated_twice():
    cfg = config.load(None, ["train.max_steps=1"])
    events = [
        {"step": 4, "val_bits_per_byte": 2.0},
        {"step": 4, "val_bits_per_byte": 1.5, "final": True},
        {"step": 2, "val_bits_per_byte": 3.0},
        {"step": 3, "val_bits_per_byte": "nan"},
    ]
    pts = validation_points(events, "val_bits_per_byte", cfg)
    assert [(p.step, p.value, p.final) for p in pts] == [(2, 3.0, False), (4, 1.5, True)]


def test_image_run_shows_bits_per_dim_test_metric_and_sample_grid(tmp_path):
    import matplotlib.pyplot as plt

    run = make_run(tmp_path / "runs", "img", None)
    (run / "summary.json").write_text(
        json.dumps({"val_bits_per_dim": 3.25, "test_bits_per_dim": 3.5, "stop_reason": "epochs"})
    )
    (run / "samples").mkdir()
    grid = np.random.default_rng(0).random((300, 300, 3))
    plt.imsave(run / "samples" / "step-0000005.png", grid * 0.2)
    plt.imsave(run / "samples" / "step-0000020.png", grid)
    page = build_report([run], tmp_path / "rep").read_text()
    row = row_of(table_with(page, "run", "config"), "img")
    assert (row["metric"], row["final (full split)"], row["test"]) == ("val bits/dim", "3.2500", "3.5000")
    assert row["nats/token"] == fmt_metric(3.25 * math.log(2))
    assert pngs(page)[-1] == (run / "samples" / "step-0000020.png").read_bytes()
    assert "img: last sample grid (step-0000020.png)" in page


def test_samples_are_escaped_and_cut(tmp_path):
    text = "<script>alert(1)</script>\x07 & more " + "z" * 5000
    run = make_run(tmp_path / "runs", "esc", 1.0, sample=text)
    page = build_report([run], tmp_path / "rep").read_text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x07 &amp; more zzz" in page
    assert "[... cut at 1200 of 5034 characters]" in page and "an older sample" not in page


# ----------------------------------------------------------------- bad input


def test_not_a_run_directory_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"is not a run directory \(no config.yaml\)"):
        build_report([tmp_path / "empty"], tmp_path / "rep")
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]) == 4
    err = capsys.readouterr().err
    assert err.startswith("attnlab: error: ") and err.count("\n") == 1 and "no config.yaml" in err
    assert not (tmp_path / "rep").exists()


def test_existing_report_needs_force_and_force_keeps_other_files(tmp_path, capsys):
    run = make_run(tmp_path / "runs", "r", 1.0)
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "pattern-07.png").write_bytes(b"stale")
    with pytest.raises(UserError, match="already exists and is not empty: choose another folder or pass --force"):
        build_report([run], out)
    assert main(["report", str(run), "--out", str(out), "--title", "My <runs>"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["report", str(run), "--out", str(out), "--force", "--title", "My <runs>"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out / "index.html")
    assert (out / "notes.txt").read_text() == "mine" and not (out / "pattern-07.png").exists()
    assert "<title>My &lt;runs&gt;</title>" in (out / "index.html").read_text()


def test_run_listed_twice_and_corrupt_summary_are_refused(tmp_path):
    run = make_run(tmp_path / "runs", "r", 1.0)
    with pytest.raises(UserError, match="is listed twice"):
        build_report([run, tmp_path / "runs" / ".." / "runs" / "r"], tmp_path / "rep")
    (run / "summary.json").write_text("{cut")
    with pytest.raises(CheckpointError, match="summary.json is not valid JSON"):
        build_report([run], tmp_path / "rep")


def test_long_labels_become_numbered_configs_with_their_settings_spelled_out(tmp_path):
    many = ["model.n_layer=3", "model.d_model=64", "optim.lr=0.002", "optim.warmup_steps=5", "train.batch_size=8"]
    runs = [make_run(tmp_path / "runs", "base", 1.0), make_run(tmp_path / "runs", "other", 1.1, *many)]
    groups = group_runs([load_run_data(r) for r in runs])
    assert [g.short for g in groups] == ["config 1", "config 2"]
    assert groups[1].label == (
        "model.d_model=64, model.n_layer=3, optim.lr=0.002, optim.warmup_steps=5, train.batch_size=8"
    )
    page = build_report(runs, tmp_path / "rep").read_text()
    assert row_of(table_with(page, "config", "settings"), "config 2")["settings"] == groups[1].label
    assert row_of(table_with(page, "run", "config"), "other")["config"] == "config 2"


def test_seed_curve_is_the_per_step_mean_with_a_min_max_band(handmade):
    from matplotlib.figure import Figure

    from attnlab.eval.report.figures import _draw_group

    runs, _ = handmade
    group = group_runs([load_run_data(r) for r in runs])[0]  # a0, a1, a2 and the unfinished a-running (seed 9)
    ax = Figure().subplots()
    assert _draw_group(ax, group, "C0", "tokens", train=False)
    per_seed = {step: [6.0 - step / 10 + s / 100 for s in (0, 1, 2, 9)] for step in (5, 10, 15)}
    per_seed[20] = A + [6.0 - 2.0 + 0.09]  # finished seeds: their final full-split value wins at step 20
    (line,) = ax.lines
    assert list(line.get_xdata()) == [s * 256 for s in (5, 10, 15, 20)]
    assert np.allclose(line.get_ydata(), [np.mean(v) for v in per_seed.values()])
    band = ax.collections[0].get_paths()[0].vertices
    assert np.isclose(band[:, 1].min(), min(min(v) for v in per_seed.values()))
    assert np.isclose(band[:, 1].max(), max(max(v) for v in per_seed.values()))
    assert line.get_label() == "optim.lr=0.001 (mean of 4 seeds, band min–max)"


def test_a_long_pattern_label_is_shortened_to_its_non_default_parameters(tmp_path):
    fixed = ["attention.pattern=fixed", "attention.local_attn_ctx=64", "attention.blocksize=16", "model.context=256"]
    runs = [
        make_run(tmp_path / "runs", "dense", 1.0, "model.context=256"),
        make_run(tmp_path / "runs", "f", 1.1, *fixed),
    ]
    groups = group_runs([load_run_data(r) for r in runs])
    assert groups[1].label == "attention=fixed(local_attn_ctx=64, blocksize=16, vertsize=1, num_verts=1)"
    assert groups[1].short == "attention=fixed(local_attn_ctx=64, blocksize=16)"


def test_attention_settings_outside_the_pattern_are_labelled(tmp_path):
    runs = [
        make_run(tmp_path / "runs", "masked", 1.0, "attention.document_mask=true"),
        make_run(tmp_path / "runs", "open", 1.1),
        make_run(tmp_path / "runs", "local", 1.2, "attention.pattern=local", "attention.window=8"),
    ]
    groups = group_runs([load_run_data(r) for r in runs])
    assert [g.label for g in groups] == [
        "attention=dense, attention.document_mask=True",
        "attention=dense, attention.document_mask=False",
        "attention=local(window=8), attention.document_mask=False",
    ]


def test_configs_whose_first_layers_look_alike_are_labelled_key_by_key(tmp_path):
    mixed = ["attention.schedule=dense,local", "model.n_layer=2"]
    runs = [
        make_run(tmp_path / "runs", "w8", 1.0, *mixed, "attention.window=8"),
        make_run(tmp_path / "runs", "w16", 1.1, *mixed, "attention.window=16"),
    ]
    groups = group_runs([load_run_data(r) for r in runs])
    assert [g.label for g in groups] == ["attention.window=8", "attention.window=16"]
