"""The browser check's reader checks: overflowing text, raw keys in tables or findings, untitled chart axes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import browser_check  # noqa: E402

LONG = "x" * 400
BAD = f"""<html><body><article class="bd-article" style="width:600px; padding:0 24px">
<p>Readable text that wraps at the column.</p>
<pre style="white-space:pre; overflow-x:auto">{LONG}</pre>
<div style="width:900px; height:10px"><p style="width:900px">{'wide ' * 5}</p></div>
<table><tr><th>median_ms</th><td>the swap ms per layer</td><td><code>greedy_lis</code> is a strategy</td></tr></table>
<div class="admonition tip"><p>LIS ranks layers by <code>lis_norm</code>; lis_dominant_term</p></div>
<div id="altair-viz-a"><svg width="200" height="100">
  <g class="role-axis"><g class="role-axis-label"><text>1</text></g></g>
  <g class="role-axis"><g class="role-axis-label"><text>2</text></g><g class="role-axis-title"><text>layers</text></g></g>
  <g class="role-axis"><g class="role-axis-grid"></g></g>
</svg></div>
<details><summary>Show code</summary><pre style="white-space:pre; overflow-x:auto">{LONG}</pre></details>
</article></body></html>"""
GOOD = """<html><body><article class="bd-article" style="width:600px; padding:0 24px">
<p>Readable text.</p><pre style="white-space:pre-wrap">short</pre>
<table><tr><th>median (ms)</th><td>greedy LIS</td></tr></table>
<div id="altair-viz-b"><svg width="200" height="100"><g class="role-axis"><g class="role-axis-label"><text>1</text></g>
<g class="role-axis-title"><text>decoder layer</text></g></g></svg></div>
</article></body></html>"""


def test_raw_keys_and_result_keys(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text(json.dumps({"headline": {"swap_ms_per_layer": 1, "swap_ms": 2}}))
    keys = browser_check.result_keys(tmp_path)
    assert keys == ["swap ms per layer"]  # keys with one underscore are ordinary words once spaced
    found = browser_check.raw_keys(["the swap ms per layer", "median_ms and p99_ms", "greedy LIS", "swap ms per layers"],
                                   keys)
    assert found == ["swap ms per layer", "median_ms", "p99_ms"]


@pytest.fixture(scope="module")
def chromium_page():
    if not Path(browser_check.CHROMIUM).exists():
        pytest.skip(f"{browser_check.CHROMIUM} is not installed")
    sync = pytest.importorskip("playwright.sync_api")
    with sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_check.CHROMIUM, args=browser_check.FLAGS)
        page = browser.new_page(viewport={"width": browser_check.WIDTH, "height": browser_check.HEIGHT})
        yield page
        browser.close()


def test_reader_problems_are_found(chromium_page):
    chromium_page.set_content(BAD)
    problems = browser_check.reader_problems(chromium_page, ["swap ms per layer"])
    text = "\n".join(problems)
    assert "overflow: pre scrolls sideways" in text and "overflow: p sticks out of the column" in text
    assert text.count("scrolls sideways") == 1  # the folded code inside a closed <details> is not counted
    assert "raw key in a table or the findings: median_ms" in text
    assert "raw key in a table or the findings: swap ms per layer" in text
    assert "lis_dominant_term" in text and "greedy_lis" not in text and "lis_norm" not in text  # code is exempt
    assert problems[-1] == "chart axis without a title: #altair-viz-a" and text.count("chart axis") == 1


def test_a_readable_page_passes(chromium_page):
    chromium_page.set_content(GOOD)
    assert browser_check.reader_problems(chromium_page, ["swap ms per layer"]) == []


def test_screenshots_for_intro_benchmarks_and_chapters():
    assert browser_check._wants_shot("book/intro.html") and browser_check._wants_shot("book/benchmarks.html")
    assert browser_check._wants_shot("notebooks/02_strategies.html")
    assert not browser_check._wants_shot("book/references.html") and not browser_check._wants_shot("search.html")
