"""The README and docs/ pages: the README's Python example runs, every relative link and picture exists,
every page is listed, and the text speaks about the product only."""

import re
import shutil
from pathlib import Path

import pytest

from attnlab import config
from runkit import write_corpus

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.I)
HTML_ANCHOR = re.compile(r"<a\s[^>]*?(?:id|name)=\"([^\"]+)\"", re.I)
PROCESS_WORDS = re.compile(
    r"\b(the|this|that) (issue|task)\b|was lent|not lent|acceptance|targets from|this session"
    r"|working tree",
    re.I,
)

# The README example trains the quickstart preset; here the same code trains a tiny byte-level model on a
# small corpus, so it runs in seconds. Only the data and the model size change, not the code.
TINY = [
    "data.format=lines",
    "data.tokenizer=bytes",
    "data.val_frac=0.1",
    "data.dir=data/tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.context=32",
    "train.batch_size=4",
    "train.max_steps=8",
    "train.eval_batch_size=8",
    "logging.progress=false",
]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


def prose(path: Path) -> str:
    """The page without fenced code blocks and inline code, where link syntax is only an example."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set(HTML_ANCHOR.findall(path.read_text(encoding="utf-8")))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    text = prose(path)
    broken = []
    for target in LINK.findall(text) + HTML_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...: not a file here
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    return broken


# ------------------------------------------------------------------ the README


def test_readme_fits_on_a_short_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines: move detail into a docs/ page"


def test_readme_python_example_trains_loads_samples_and_evaluates(tmp_path, monkeypatch, capsys, one_thread):
    (block,) = python_blocks(README)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp_path / "configs")
    corpus = write_corpus(tmp_path / "corpus.txt")
    monkeypatch.chdir(tmp_path)
    real_load = config.load

    def tiny_load(path, overrides=()):
        extra = [f"data.source={corpus}", *TINY] if path == "configs/quickstart.yaml" else []
        return real_load(path, list(overrides) + extra)

    monkeypatch.setattr(config, "load", tiny_load)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)

    assert (tmp_path / "runs" / "nb" / "summary.json").is_file()
    assert ns["summary"]["steps"] == 8 and ns["run"].config.name == "nb"
    assert ns["text"].startswith("def ") and len(ns["text"]) > len("def ")
    # evaluating the loaded model reproduces the trainer's final full-split number exactly
    assert ns["val"]["bits_per_byte"] == ns["summary"]["val_bits_per_byte"]
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f"{ns['val']['bits_per_byte']} {ns['summary']['val_bits_per_byte']}")


def test_readme_shell_commands_match_the_python_example():
    """The shell equivalents name the same run and settings as the Python example."""
    text = README.read_text(encoding="utf-8")
    assert "attnlab train configs/quickstart.yaml name=nb train.max_steps=50" in text
    assert 'attnlab sample runs/nb --prompt "def " --max-new-tokens 100 --temperature 0.7 --top-k 40 --seed 0' in text
    assert "attnlab eval runs/nb" in text


def test_make_targets_named_in_the_readme_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"demo", "test", "bench"} <= targets
    named = set(re.findall(r"\bmake ([\w-]+)", README.read_text(encoding="utf-8")))
    assert named <= targets, named - targets


# ------------------------------------------------------------------ docs/


def test_patterns_page_python_example_runs(tmp_path, monkeypatch, one_thread):
    blocks = python_blocks(DOCS / "patterns.md")
    assert blocks, "docs/patterns.md shows the Python pattern API"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/patterns.md[{i}]", "exec"), {})
    assert (tmp_path / "fixed.png").stat().st_size > 0


def test_the_plugin_shown_on_the_patterns_page_is_the_tested_example():
    """The page shows the plugin (``py`` block, not run: registering it twice would clash); it must be the file."""
    shown = re.findall(r"^```py\n(.*?)^```", (DOCS / "patterns.md").read_text(encoding="utf-8"), re.S | re.M)
    example = (ROOT / "examples" / "dilated_window.py").read_text(encoding="utf-8")
    assert shown and all(line in example.splitlines() for line in shown[0].splitlines())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_picture_exists(page):
    assert broken_links(page) == []


def test_link_checker_catches_missing_files_and_headings(tmp_path):
    (tmp_path / "b.md").write_text("# Some Heading: with `code`\n\n## Twice\n\n## Twice\n")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#some-heading-with-code) [dup](b.md#twice-1) ![p](pic.png) [web](https://x.org/y)\n"
        "[gone](missing.md) ![gone](nope.png) [bad](b.md#nothing) [self](#local)\n"
        "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n## Local\n"
    )
    assert [b.split(" ")[0] for b in broken_links(page)] == ["missing.md", "nope.png", "b.md#nothing"]


def test_index_lists_every_page_and_the_readme_links_the_index():
    index = prose(DOCS / "index.md")
    listed = {Path(t.partition("#")[0]).name for t in LINK.findall(index)}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages - listed == set(), "docs/index.md must list every page"
    assert "docs/index.md" in LINK.findall(prose(README))
    readme_links = {Path(t.partition("#")[0]).name for t in LINK.findall(prose(README)) if t.startswith("docs/")}
    assert pages - readme_links == set(), "the README links every docs page"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_about_the_product_only(page):
    hits = [
        f"{page.name}:{n}: {line.strip()}"
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if PROCESS_WORDS.search(line)
    ]
    assert hits == []
