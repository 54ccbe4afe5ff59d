"""The report page in a real browser (headless Chromium): every embedded picture renders, offline."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from attnlab.eval.report.build import build_report
from test_report import make_run

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-rendered", imgs.map(function (i) { return i.complete && i.naturalWidth > 0 ? "1" : "0"; }).join(""));
  document.body.setAttribute("data-widths", imgs.map(function (i) { return i.naturalWidth; }).join(","));
});
</script>"""


@pytest.fixture(scope="module")
def browser():
    path = next((p for p in map(shutil.which, BROWSERS) if p), None)
    if path is None:
        pytest.skip(
            "no headless Chromium found (chromium-headless-shell or chromium): "
            "install Debian's chromium-headless-shell (make test does so as root with apt)"
        )
    return path


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    runs = [
        make_run(root / "runs", f"{p}{s}", 1.0 + s / 10 + (p == "l") / 5, *ov, seed=s, sample="a sample <b>text</b>")
        for p, ov in (("d", []), ("l", ["attention.pattern=local", "attention.window=16"]))
        for s in range(2)
    ]
    return build_report(runs, root / "rep")


def test_every_picture_renders_in_chromium(browser, report, tmp_path):
    page = report.read_text(encoding="utf-8")
    declared = int(re.search(r'<body data-figures="(\d+)"', page).group(1))
    assert f"This report has {declared} figure(s)." in page
    probe = tmp_path / "probe.html"  # a copy with the probe: the report itself has no scripts
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = _chromium(browser, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body[^>]*>", done.stdout).group(0)
    rendered = re.search(r'data-rendered="([01]*)"', body).group(1)
    assert declared == page.count("<img") == 6  # 3 validation curves + training loss + 2 attention patterns
    assert rendered == "1" * declared
    widths = [int(w) for w in re.search(r'data-widths="([\d,]*)"', body).group(1).split(",")]
    assert min(widths) > 200


def test_screenshot_is_not_blank(browser, report, tmp_path):
    shot = tmp_path / "shot.png"
    done = _chromium(browser, f"--screenshot={shot}", "--window-size=1000,1400", report.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        gray = np.asarray(im.convert("L"))
    assert gray.shape == (1400, 1000)
    assert (gray < 128).mean() > 0.005 and len(np.unique(gray)) > 16  # text, tables and plots drawn, not an empty page
