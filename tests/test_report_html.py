"""The HTML report: self-contained, and it renders in headless Chromium without console errors."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from modelkin.compare.api import compare
from modelkin.compare.report.document import ComparisonReport
from modelkin.compare.report.html import render_html, render_index
from modelkin.compare.settings import BehaviourSettings
from modelkin.synth.tiny import make_tiny

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    a = make_tiny("qwen2", root / "a", seed=0, overrides={"num_hidden_layers": 4})
    b = make_tiny("qwen2", root / "b", seed=1, overrides={"num_hidden_layers": 4})
    settings = BehaviourSettings(max_prompts=6, greedy_tokens=6, mmd_prompts=2, mmd_samples=3, mmd_tokens=4,
                                 permutations=200)
    return compare(a, b, device="cpu", settings=settings, methods=["std_curve", "pcs"])


def test_page_is_self_contained_and_escapes_text(report):
    data = report.to_json()
    data["behaviour"]["per_prompt"][0]["prompt"] = "<script>alert(1)</script> & 'quotes'"
    page = render_html(ComparisonReport.from_json(data))
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#x27;quotes&#x27;" in page
    assert not re.search(r"""(src|href)=['"](https?:|//)""", page)  # no external assets
    assert page.count("data:image/png;base64,") >= 3  # std curves, bpb scatter, per-prompt bars
    for heading in ("Verdict", "Weight fingerprints", "Behaviour", "Per prompt", "How the verdict is reached"):
        assert heading in page


def test_save_html_is_atomic(report, tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("old")
    from modelkin.compare.report import html

    def boom(_data):
        raise RuntimeError("render failed")

    monkeypatch.setattr(html, "render_html", boom)
    with pytest.raises(RuntimeError):
        report.save_html(target)
    assert target.read_text() == "old"
    monkeypatch.undo()
    report.save_html(target)
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary files left


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_report_without_console_errors(report, tmp_path):
    page = tmp_path / "report.html"
    report.save_html(page)
    index = tmp_path / "index.html"
    index.write_text(render_index([{"name": "a vs b", "href": "report.html", "verdict": report.verdict}], "demo"))
    for target in (page, index):
        shot = tmp_path / f"{target.stem}.png"
        profile = tmp_path / f"profile-{target.stem}"
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1280,2000", f"--screenshot={shot}",
               "--enable-logging=stderr", "--v=0", target.as_uri()]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert console == [], console
        assert shot.is_file() and _png_size(shot) == (1280, 2000)
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    shutil.rmtree(tmp_path / "profile-report", ignore_errors=True)
