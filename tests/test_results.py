"""Results on disk, provenance, which results a page shows (the page's provenance sentence, the glance box
and the findings table are tested in test_presentation.py)."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphbook.experiments.base import Result
from morphbook.publish import page, store
from morphbook.publish.files import atomic_write_json, atomic_write_text
from morphbook.publish.provenance import gpu_kind, provenance
from morphbook.publish.store import load_summary
from morphlib import fingerprint
from morphlib.errors import MorphError

PARAMS = {"profile": "cpu", "model": "smollm2-135m", "seed": 0}


def save_summary(chapter, params, headline, root, extra_files=None, wall_s=1.0):
    """A result saved with the fingerprint of the modules this process has loaded (nothing ran)."""
    return store.save_result(chapter, Result(params, headline, extra_files or {}, wall_s), root,
                             recording=fingerprint.Recording()).path


FINGERPRINT = {"morphlib/errors.py::check_int": "0" * 16}


def test_atomic_json_sorted_nan_numpy(tmp_path):
    path = tmp_path / "a" / "b.json"
    atomic_write_json(path, {"z": np.float32(1.5), "a": float("nan"), "m": [np.int64(3), np.inf],
                             "arr": np.arange(3), "p": Path("x/y")})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert list(data) == ["a", "arr", "m", "p", "z"]
    assert data == {"a": None, "arr": [0, 1, 2], "m": [3, None], "p": "x/y", "z": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no temp files left


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(MorphError, match="cannot write object"):
        atomic_write_json(path, {"v": object()})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_gpu_kind():
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_kind("NVIDIA H200") == "H200"
    assert gpu_kind("cpu") is None and gpu_kind(None) is None


def test_provenance_fields_and_no_hostname():
    prov = provenance("strategies", PARAMS, 12.34, FINGERPRINT, {"sensitivity": "ab" * 8})
    assert prov["fingerprint"] == FINGERPRINT and prov["inputs"] == {"sensitivity": "ab" * 8}
    assert len(prov["code_hash"]) == 16
    for key in ("code_hash", "git", "device", "gpu", "versions", "params", "profile", "date", "chapter", "wall_s"):
        assert key in prov
    assert prov["profile"] == "cpu" and prov["params"] == PARAMS and prov["wall_s"] == 12.3
    assert set(prov["git"]) == {"commit", "dirty"}
    assert set(prov["versions"]) >= {"python", "torch", "transformers"}
    assert prov["date"].endswith("Z")
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in json.dumps(prov)


@pytest.mark.parametrize("chapter, params, match", [
    ("nope", PARAMS, "unknown chapter"),
    ("burst", {**PARAMS, "profile": "tpu"}, "profile"),
    ("burst", ["profile", "cpu"], "params must be a dict"),
])
def test_bad_input_is_one_line_error(chapter, params, match):
    with pytest.raises(MorphError, match=match):
        provenance(chapter, params, 1.0, FINGERPRINT)
    with pytest.raises(MorphError, match="needs the fingerprint"):
        provenance("burst", PARAMS, 1.0, {})


def test_save_summary_writes_extras_then_summary(tmp_path, monkeypatch):
    order = []
    real = store.write_result_file
    real_json = store.atomic_write_json
    monkeypatch.setattr(store, "write_result_file", lambda p, o: (order.append(Path(p).name), real(p, o))[1])
    monkeypatch.setattr(store, "atomic_write_json", lambda p, o: (order.append(Path(p).name), real_json(p, o))[1])
    df = pd.DataFrame({"layer": [0, 1], "ppl": [1.0, math.nan]})
    path = save_summary("burst", PARAMS, {"p95": 1.5}, tmp_path, extra_files={"t.json": df, "notes.md": "hi"})
    assert order[-1] == "summary.json" and set(order[:-1]) >= {"t.json", "notes.md"}
    assert path == tmp_path / "burst" / "summary.json"
    assert json.loads((tmp_path / "burst" / "t.json").read_text()) == [{"layer": 0, "ppl": 1.0}, {"layer": 1, "ppl": None}]
    summary = load_summary("burst", tmp_path)
    assert summary["headline"] == {"p95": 1.5} and summary["provenance"]["chapter"] == "burst"


def test_failed_extra_file_means_no_summary(tmp_path):
    with pytest.raises(MorphError, match="DataFrame"):
        save_summary("burst", PARAMS, {"p95": 1.5}, tmp_path, extra_files={"a.csv": [1, 2]})
    assert load_summary("burst", tmp_path) is None
    for bad in ("../x.json", "/abs.json", "summary.json", "a b.json"):
        with pytest.raises(MorphError, match="bad detail file name"):
            save_summary("burst", PARAMS, {"p95": 1.5}, tmp_path, extra_files={bad: {}})
    with pytest.raises(MorphError, match="headline"):
        save_summary("burst", PARAMS, {}, tmp_path)


def test_load_summary_missing_and_corrupt(tmp_path):
    assert load_summary("vllm", tmp_path) is None
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "summary.json").write_text("{not json")
    with pytest.raises(MorphError, match="not valid JSON"):
        load_summary("vllm", tmp_path)


class FakeConfig:
    """A config whose profile defaults are known: published = no overrides (like Config.for_profile)."""

    def __init__(self, profile, model="smollm2-135m"):
        self.profile, self.model = profile, model

    def __eq__(self, other):
        return (self.profile, self.model) == (other.profile, other.model)

    @classmethod
    def for_profile(cls, profile):
        return cls(profile)


def test_page_shows_committed_only_for_the_published_configuration(tmp_path):
    committed, fresh = tmp_path / "results", tmp_path / "fresh"
    save_summary("burst", PARAMS, {"v": 1}, fresh)
    shown = page.pick("burst", FakeConfig("cpu"), fresh, committed)
    assert (shown.summary["headline"], shown.root, shown.committed) == ({"v": 1}, fresh, False)
    save_summary("burst", {**PARAMS, "profile": "gpu"}, {"v": 2}, committed)
    shown = page.pick("burst", FakeConfig("cpu"), fresh, committed)
    assert (shown.summary["headline"], shown.root, shown.committed) == ({"v": 2}, committed, True)
    # a reader's own model: the page shows the reader's numbers, labelled as this run's
    own = page.pick("burst", FakeConfig("cpu", model="my/model"), fresh, committed)
    assert (own.summary["headline"], own.committed) == ({"v": 1}, False)
    assert "**this run's results**" in page.provenance_text(own)
    # a run that writes the committed results shows its own
    shown = page.pick("burst", FakeConfig("gpu"), committed, committed)
    assert shown.summary["headline"] == {"v": 2} and shown.committed
    with pytest.raises(MorphError, match="no results"):
        page.pick("vllm", FakeConfig("cpu"), fresh, committed)


def test_vega_bundle_sets_altair_versions():
    pytest.importorskip("vl_convert")
    import altair as alt

    from morphbook.publish.plotting import setup_altair, vega_bundle_js

    js = vega_bundle_js()
    assert js.splitlines()[1] == "(function () {"
    assert f'"vegalite_version": "{alt.VEGALITE_VERSION}"' in js and "window.vegaEmbed" in js
    assert setup_altair() == "html" and alt.theme.active == "morphbook"


def test_loaded_summary_orders_integer_keys_numerically(tmp_path):
    per_k = {"2": 1.0, "10": 3.0, "4": 2.0, "24": 4.0}
    save_summary("strategies", PARAMS, {"per_k": per_k, "by_name": {"b": 1, "a": 2}}, tmp_path)
    on_disk = json.loads((tmp_path / "strategies" / "summary.json").read_text())["headline"]["per_k"]
    assert list(on_disk) == ["10", "2", "24", "4"]  # text order in the file
    loaded = load_summary("strategies", tmp_path)["headline"]
    assert list(loaded["per_k"]) == ["2", "4", "10", "24"] and loaded["per_k"]["10"] == 3.0
    assert list(loaded["by_name"]) == ["a", "b"]  # other dicts keep the file's order
