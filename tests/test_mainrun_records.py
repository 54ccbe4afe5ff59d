"""The mainrun results quoted in the docs are the numbers in the committed run records."""

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "mainrun"
DOCS = [RECORDS / "README.md", ROOT / "docs" / "mainrun.md"]
SUMMARIES = sorted(RECORDS.glob("**/summary.json"))
EXACT = sorted(RECORDS.glob("**/eval-mainrun-exact.json"))


def quoted(value: float) -> str:
    return f"{value:.4f}"


def signed(delta: float) -> str:
    """A change as the tables print it: +0.0443, −0.0054 (a typographic minus)."""
    return f"{delta:+.4f}".replace("-", "\N{MINUS SIGN}")


def rel(path: Path) -> str:
    return str(path.relative_to(RECORDS))


def test_there_are_records_to_check():
    assert {rel(p.parent) for p in SUMMARIES} >= {"baseline", "fixed", "best", "ablation-1epoch/nothing"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
@pytest.mark.parametrize("summary", SUMMARIES, ids=lambda p: rel(p.parent))
def test_every_recorded_run_is_quoted_with_its_own_numbers(summary, doc):
    s = json.loads(summary.read_text())
    text = doc.read_text()
    for key in ("val_bits_per_byte", "mainrun_val_loss"):
        assert quoted(s[key]) in text, f"{doc.name} does not quote {rel(summary.parent)}'s {key} {quoted(s[key])}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
@pytest.mark.parametrize("record", EXACT, ids=lambda p: rel(p.parent))
def test_every_mainrun_exact_evaluation_is_quoted(record, doc):
    value = quoted(json.loads(record.read_text())["mainrun_exact_val_loss"])
    assert value in doc.read_text(), f"{doc.name} does not quote {rel(record.parent)}'s exact number {value}"


def bits_per_byte(folder: Path) -> float:
    return json.loads((folder / "summary.json").read_text())["val_bits_per_byte"]


# (sweep file, folder of its runs by label, the whole recipe's run)
ABLATIONS = {
    "one epoch": (
        RECORDS / "ablation-1epoch" / "sweep.yaml",
        RECORDS / "ablation-1epoch",
        RECORDS / "ablation-1epoch" / "nothing",
    ),
    "full length": (ROOT / "configs" / "sweeps" / "mainrun-ablation.yaml", RECORDS / "ablation", RECORDS / "best"),
}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
@pytest.mark.parametrize("ablation", ABLATIONS, ids=str)
def test_ablation_changes_are_differences_from_the_whole_recipe(ablation, doc):
    sweep, folder, whole = ABLATIONS[ablation]
    labels = yaml.safe_load(sweep.read_text())["parameters"]["without"]["labels"]
    runs = {label: folder / label for label in labels[1:] if (folder / label / "summary.json").is_file()}
    assert runs, f"no {ablation} ablation runs recorded in {rel(folder)}"
    lines = doc.read_text().splitlines()
    reference = round(bits_per_byte(whole), 4)
    for label, run in runs.items():
        value = bits_per_byte(run)
        line = next((ln for ln in lines if f"| {quoted(value)} |" in ln), None)
        assert line is not None, f"{doc.name} has no {ablation} ablation row for without={label}"
        delta = signed(round(value, 4) - reference)
        assert delta in line, f"{doc.name}'s {ablation} without={label} row should say {delta}: {line}"


def test_recorded_configs_name_no_machine_specific_out_dir():
    """`attnlab train RECORD/config.yaml` must run anywhere: results go under the working directory."""
    for cfg in sorted(RECORDS.glob("**/config.yaml")):
        out_dir = yaml.safe_load(cfg.read_text())["out_dir"]
        assert not Path(out_dir).is_absolute(), f"{rel(cfg)} writes to {out_dir}"
