"""How the book presents results: number formats, tables, glue records, notebook cells, the provenance
sentence, the introduction's glance box and findings, the benchmarks and reproduce pages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from morphbook.experiments.base import Result
from morphbook.publish import benchmarks, cells, findings, fmt, glue, page, store, tables, timings
from morphlib import fingerprint
from morphlib.errors import MorphError
from test_results import FakeConfig  # a config whose profile defaults are known

RESULTS = Path(__file__).resolve().parents[1] / "results"


def sp(text: str) -> str:
    return text.replace("\u00a0", " ")


# --------------------------------------------------------------------------- numbers
def test_number_formats():
    assert fmt.num(13440.0, 0) == "13,440" and fmt.num(0.26, 2, signed=True) == "+0.26"
    assert fmt.num(-0.004, 2) == "0.00" and fmt.num(-0.3) == "\u22120.30" and fmt.num(None) == "n/a"
    assert [fmt.auto(v) for v in (340.9, 34.09, 4.402, 0.0081)] == ["341", "34.1", "4.40", "0.0081"]
    assert sp(fmt.pct(2.37, signed=True)) == "+2.4 %" and sp(fmt.frac_pct(0.59375)) == "59.4 %"
    assert fmt.interval(0.44, 0.57) == "0.44\u20130.57" and fmt.interval(-0.07, 0.61) == "\u22120.07 to 0.61"
    assert sp(fmt.frac_interval(0.44, 0.57)) == "44\u201357 %"
    assert [fmt.pval(p) for p in (0.0081, 0.0328, 0.9, 0.0004)] == ["p = 0.008", "p = 0.033", "p = 0.9", "p < 0.001"]
    assert fmt.ms(4.402) == "4.40 ms" and fmt.times(1.093) == "1.09\u00d7"
    assert fmt.listing([2]) == "2" and fmt.listing([2, 4]) == "2 and 4" and fmt.listing([2, 4, 12]) == "2, 4 and 12"
    assert fmt.count(1, "swap count") == "1 swap count" and fmt.count(3, "swap count") == "3 swap counts"


# --------------------------------------------------------------------------- tables
def test_table_has_caption_label_readers_headers_and_no_index():
    text = tables.markdown_table([{"k": 2, "ppl": 37.6478, "names": ["a", "b"]}, {"k": 4, "ppl": None, "names": []}],
                                 {"k": "layers swapped", "ppl": "held-out perplexity", "names": "sets"},
                                 "Perplexity per k", "tbl-test-per-k")
    lines = text.splitlines()
    assert lines[:2] == [":::{table} Perplexity per k", ":name: tbl-test-per-k"]
    assert lines[3] == "| layers swapped | held-out perplexity | sets |" and lines[4] == "| ---: | ---: | :--- |"
    assert lines[5] == "| 2 | 37.6 | a b |" and lines[6] == "| 4 | n/a |  |" and lines[-1] == ":::"
    with pytest.raises(MorphError, match="reads like a key"):
        tables.markdown_table([], {"median_ms": "median_ms"}, "c", "tbl-x")
    with pytest.raises(MorphError, match="caption is required"):
        tables.markdown_table([], {"a": "a"}, " ", "tbl-x")
    with pytest.raises(MorphError, match="label"):
        tables.markdown_table([], {"a": "a"}, "c", "Table 1")
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [1, 2]}, index=["x", "y"])
    assert tables.frame_rows(frame) == [{"a": 1}, {"a": 2}]


# --------------------------------------------------------------------------- glue
def test_glue_record_is_what_myst_nb_reads():
    from myst_nb.ext.glue import extract_glue_data_cell

    rec = glue.record("ch1-rho", "ρ = 0.31 (**weak**)", markdown=True)
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("display_data", data=rec["data"], metadata=rec["metadata"])]
    (key, out), = extract_glue_data_cell(cell)
    assert key == "ch1-rho" and out["data"]["text/markdown"] == "ρ = 0.31 (**weak**)"
    assert out["data"]["text/plain"] == repr("ρ = 0.31 (**weak**)") and cell.outputs == []  # nothing displayed
    with pytest.raises(MorphError, match="expected text"):
        glue.record("x", 0.31)
    assert glue.glue_all({"a": "1"}, prefix="p-") == {"p-a": "1"}  # outside IPython: no output, no error


# --------------------------------------------------------------------------- notebook cells
def _notebook():
    nb = nbformat.v4.new_notebook()
    title = nbformat.v4.new_markdown_cell("# My chapter\n\nIntro text.")
    params = nbformat.v4.new_code_cell("profile = 'cpu'", metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell("profile = 'gpu'", metadata={"tags": ["injected-parameters"]})
    run = nbformat.v4.new_code_cell("shown = run_chapter('burst', run, cfg, root)")
    rec = glue.record(page.glue_key("burst"), "*Numbers on this page: ...*", markdown=True)
    run.outputs = [nbformat.v4.new_output("display_data", data=rec["data"], metadata=rec["metadata"])]
    chart = nbformat.v4.new_code_cell("chart")
    hidden = nbformat.v4.new_code_cell("glue_all(x)", metadata={"tags": ["remove-cell"]})
    nb.cells = [title, params, injected, run, chart, hidden]
    return nb


def test_present_hides_plumbing_folds_code_and_pastes_provenance_under_the_title():
    nb = cells.present(_notebook(), "burst")
    sources = [c.source for c in nb.cells]
    assert sources[:3] == ["# My chapter", "```{glue:md} provenance-burst\n:format: myst\n```", "Intro text."]
    tags = {c.source: c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code"}
    assert all("remove-cell" in tags[s] for s in ("profile = 'cpu'", "profile = 'gpu'",
                                                 "shown = run_chapter('burst', run, cfg, root)"))
    assert tags["chart"] == ["hide-input"] and tags["glue_all(x)"] == ["remove-cell"]
    again = cells.present(nb, "burst")
    assert [c.source for c in again.cells] == sources
    assert next(c for c in again.cells if c.source == "chart").metadata["tags"] == ["hide-input"]
    bare = _notebook()
    bare.cells[3].outputs = []  # no provenance glued (the run failed): nothing is pasted
    assert [c.source for c in cells.present(bare, "burst").cells][0] == "# My chapter\n\nIntro text."


def test_present_file_round_trip(tmp_path):
    path = tmp_path / "nb.ipynb"
    nbformat.write(_notebook(), path)
    cells.present_file(path, "burst")
    assert cells.glued_keys(nbformat.read(path, as_version=4)) == {"provenance-burst"}


# --------------------------------------------------------------------------- provenance
def _save(root, chapter, profile, device, params=None, headline=None, edit=None):
    store.save_result(chapter, Result({"profile": profile, "model": "smollm2-135m", **(params or {})},
                                      headline or {"v": 1}, {"r.json": [1]}, 12.0), root,
                      recording=fingerprint.Recording())
    path = root / chapter / "summary.json"
    data = json.loads(path.read_text())
    data["provenance"].update(device=device, gpu="H200" if "H200" in device else None,
                              git={"commit": "abcdef123456", "dirty": False})
    if edit == "stale":
        data["provenance"]["fingerprint"] = {"morphlib/errors.py::check_int": "0" * 16}
    path.write_text(json.dumps(data))
    if edit == "modified":
        (root / chapter / "r.json").write_text("[2]")
    return data


def test_provenance_sentence_says_what_computed_the_numbers(tmp_path):
    committed, fresh = tmp_path / "results", tmp_path / "fresh"
    _save(committed, "strategies", "gpu", "NVIDIA H200", {"device": "cuda:0"})
    _save(fresh, "strategies", "cpu", "cpu", {"device": "cpu"})
    text = page.provenance_text(page.pick("strategies", FakeConfig("cpu"), fresh, committed))
    assert text.startswith("*Numbers on this page: the book's committed results, model `smollm2-135m`, GPU profile, "
                           "computed on GPU (NVIDIA H200) on ")
    assert "at commit abcdef1 in 12 s" in text and "This build re-ran the chapter on the CPU profile as a check" in text
    summary = store.load_summary("strategies", fresh)
    own = page.provenance_text(page.Shown("strategies", summary, fresh, False, page.status("strategies", summary, fresh)))
    assert own.startswith("```{warning}") and "**this run's results**" in own and "re-ran" not in own
    assert "CPU profile (small sizes, for CI), computed on CPU" in own
    _save(committed, "burst", "gpu", "NVIDIA H200")  # no device parameter: arithmetic on the host
    burst = page.provenance_text(page.pick("burst", FakeConfig("gpu"), committed, committed))
    assert "computed on CPU only (the host of an NVIDIA H200 run; no GPU used)" in burst
    _save(committed, "vllm", "gpu", "cpu")
    assert "published profile, computed on CPU on" in page.provenance_text(page.pick("vllm", FakeConfig("gpu"), committed,
                                                                                     committed))
    _save(committed, "overlap", "gpu", "NVIDIA H200", {"device": "cuda"}, edit="stale")
    stale = page.provenance_text(page.pick("overlap", FakeConfig("gpu"), committed, committed))
    assert stale.startswith("```{admonition} Stale results\n:class: danger") and "**commit abcdef1**" in stale
    _save(committed, "transfer", "gpu", "NVIDIA H200", {"device": "NVIDIA H200"}, edit="modified")
    modified = page.provenance_text(page.pick("transfer", FakeConfig("gpu"), committed, committed))
    assert modified.startswith("```{admonition} Modified results") and "r.json" in modified
    assert page.used_device({"device": "NVIDIA H200", "gpu": "H200", "params": {"device": "cuda:0"}}) == \
        ("H200 GPU", "GPU (NVIDIA H200)")


# --------------------------------------------------------------------------- intro: glance and findings
@pytest.fixture(scope="module")
def book_results(tmp_path_factory):
    """A copy of the committed results (the introduction is computed from whatever they hold)."""
    root = tmp_path_factory.mktemp("r") / "results"
    shutil.copytree(RESULTS, root)
    return root


def test_findings_table_rows_have_readers_labels_and_sources(book_results):
    md = findings.findings_markdown(book_results.parent / "fresh", book_results)
    lines = md.strip().splitlines()
    assert lines[0].startswith(":::{table} Findings") and lines[1] == ":name: tbl-findings" and lines[-1] == ":::"
    rows = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert 10 <= len(rows) <= 16  # about a dozen
    assert not any(tables.KEY_LIKE.search(r.split("|")[2]) for r in rows)  # no key-like labels
    vllm = next(r for r in rows if "Swapping inside vLLM" in r)
    assert "| CPU, " in vllm and "GPU" not in vllm.split("|")[4]  # chapter 6 ran on CPU
    burst = next(r for r in rows if "Serving a bursty trace" in r)
    assert "| CPU" in burst and "GPU" not in burst.split("|")[4].replace("no GPU used", "")  # arithmetic: no GPU
    assert "95 % CI" in md and "{doc}`Benchmarks </book/benchmarks>`" in md


def test_glance_box_places_claims_by_their_results(book_results, tmp_path):
    md = sp(findings.glance_markdown(book_results.parent / "fresh", book_results))
    assert md.startswith("::::{admonition} Results at a glance\n:class: tip\n\nThe thesis **")
    sections = {h: md.index(f"**{h}**") for h in ("Holds", "Does not hold", "Not yet tested") if f"**{h}**" in md}
    assert "Not yet tested" in sections and "time to first token" in md
    # move the verdict: a strategies summary whose verdicts say "supported" puts the thesis under Holds
    root = tmp_path / "results"
    shutil.copytree(book_results, root)
    path = root / "strategies" / "summary.json"
    data = json.loads(path.read_text())
    data["headline"].update(verdict_contiguous_vs_lis="supported: x", verdict_contiguous_vs_best_scattered="supported: y")
    fp = data["provenance"]["fingerprint"]
    fp[next(k for k in fp if "strategies.py::" in k)] = "0" * 16  # a function that made it has changed since
    path.write_text(json.dumps(data))
    moved = sp(findings.glance_markdown(tmp_path / "fresh", root))
    assert "The thesis **holds**" in moved
    assert "The block matches or beats greedy LIS" in moved[moved.index("**Holds**"):].split("**Does not hold**")[0]
    assert findings.source(findings.load("strategies", tmp_path / "fresh", root)).endswith("**STALE**")


def test_burst_claim_follows_the_preregistered_verdict():
    untested = findings._burst_claim({"verdict": {"state": "not yet tested", "windows": {}}, "engine_replays": 0,
                                      "engine_replays_registered": 96, "simulator_tpot_error_pct": None})
    assert untested[0] == findings.UNTESTED and "0 of 96" in untested[1]
    assert findings._burst_claim({})[0] == findings.UNTESTED  # made before the verdict existed
    for state, heading in (("holds", findings.HOLDS), ("holds in part", findings.PARTLY),
                           ("does not hold", findings.FAILS)):
        got = findings._burst_claim({"verdict": {"state": state, "setting": "llama7b-l4", "policy": "p",
                                                 "windows": {"a": {}, "b": {}}}})
        assert got[0] == heading and "2 trace windows" in got[1]


def test_verdict_status():
    assert findings.verdict_status("supported") == findings.HOLDS
    assert findings.verdict_status("not supported") == findings.FAILS
    assert findings.verdict_status("partly supported") == findings.PARTLY
    assert findings.verdict_status("'matches' supported, 'beats' not") == findings.PARTLY


def test_no_results_yet(tmp_path):
    md = findings.findings_markdown(tmp_path / "a", tmp_path / "b", present=set())
    assert "| 1. Layer sensitivity to INT4 | no results yet | | |" in md
    assert "Not yet tested" not in findings.glance_markdown(tmp_path / "a", tmp_path / "b", families=[])


# --------------------------------------------------------------------------- benchmarks and times
def test_benchmark_rows_from_the_committed_results():
    head = json.loads((RESULTS / "engine" / "summary.json").read_text())["headline"]
    rows = benchmarks.engine_rows(head, json.loads((RESULTS / "engine" / "rows.json").read_text()),
                                  json.loads((RESULTS / "engine" / "run.json").read_text()))
    assert len(rows) == len(findings.targets(head))
    slow = next(r for r in rows if r["what"].startswith("Decode slowdown"))
    want = head["decode_slowdown_during_swap"]
    assert sp(slow["value"]) == f"{100 * want['value']:+.1f} %" and sp(slow["target"]) == "≤ 5.0 %"
    assert slow["met"] == ("met" if want["met"] else "**missed**")
    assert "over 6 copies" in slow["spread"]
    speed = next(r for r in rows if r["what"].startswith("All-INT4"))
    assert speed["met"] == "**missed**" and "(batch 1)" not in speed["spread"] or "batch" in speed["spread"]
    unknown = benchmarks.engine_rows({"new_ratio": {"value": 2.0, "target": ">= 1", "met": True}}, [], {})
    assert unknown[0]["what"] == "new ratio"  # no label yet: the browser check flags it on the page
    krows = benchmarks.kernel_rows(json.loads((RESULTS / "kernels" / "summary.json").read_text())["headline"],
                                   json.loads((RESULTS / "kernels" / "rows.json").read_text()))
    assert [r["mode"] for r in krows][:4] == ["fast (engine)"] * 4 and krows[0]["band"] == "1 row"
    assert sp(benchmarks.target_text(">= 0.995", "share")) == "≥ 99.5 %"
    assert benchmarks.target_text("about 2", "ratio") == "about 2"


def test_benchmarks_page_renders_tables_and_charts(tmp_path):
    pytest.importorskip("altair")
    md = benchmarks.benchmarks_markdown(tmp_path / "fresh", RESULTS)
    assert md.count(":::{table}") == 2 and 'id="altair-viz-bench-steps"' in md and 'id="altair-viz-bench-kernels"' in md
    spec = json.loads(md.split('vegaEmbed("#altair-viz-bench-steps", ', 1)[1].split(', {"actions"', 1)[0])
    assert spec["facet"]["column"]["title"] == "model shape"
    assert "No engine results yet" in benchmarks.benchmarks_markdown(tmp_path / "a", tmp_path / "b")


def test_times_table(tmp_path):
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"chapters": [{"chapter": "sensitivity", "status": "ok", "wall_s": 95.0},
                                               {"chapter": "strategies", "status": "failed", "wall_s": 200.0}]}))
    md = sp(timings.times_markdown(status, RESULTS))
    assert "ran the chapters in 4.9 min in all" in md and "| 1. Layer sensitivity to INT4 | 95 s | 56 s |" in md
    assert "3.3 min (failed)" in md and "| INT4 linear kernels | — |" in md
    assert "no chapter has run yet" in timings.times_markdown(tmp_path / "none.json", tmp_path).lower()


def test_box_stats_summarise_every_sample_in_one_row_per_box():
    import pandas as pd

    from morphbook.publish.plotting import box_stats, boxes

    frame = pd.DataFrame({"run": ["a"] * 5 + ["b"] * 30000, "ms": list(range(1, 6)) + [2.0] * 30000})
    stats = box_stats(frame, ["run"], "ms")
    a = stats[stats.run == "a"].iloc[0]
    assert (a["min"], a["q1"], a["median"], a["q3"], a["max"], a["n"]) == (1, 2, 3, 4, 5, 5)
    assert len(stats) == 2 and int(stats[stats.run == "b"]["n"].iloc[0]) == 30000
    spec = boxes(stats, "run:N", "ms", "run:N").to_dict()  # 30,005 samples: two rows reach the chart
    assert len(spec["layer"]) == 3 and spec["layer"][0]["encoding"]["y"]["title"] == "ms"
