"""Caches keyed by their producer: the AWQ scales and the GGUF conversions are reused only while the code
that made them is unchanged (and, for the book's environment, the library versions); a reuse brings
that code into the running result's fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from morphlib import convert, fingerprint, morph, producer
from morphlib.errors import MorphError
from morphlib.models import synthetic_model


def edited_copy(tmp_path, rel: str, old: str, new: str):
    """A copy of the source root with one edit, for ``MORPHBOOK_SRC``."""
    src = tmp_path / "src-copy"
    shutil.copytree(fingerprint.source_root(), src, ignore=shutil.ignore_patterns("__pycache__", "data"))
    path = src / rel
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return src


# ----------------------------------------------------------------------------- the record


def test_a_record_without_code_or_with_other_versions_is_stale():
    assert producer.stale_reason(None) == "no record of the code that made it"
    assert producer.stale_reason({"producer": {}}) == "no record of the code that made it"
    assert "unreadable" in producer.stale_reason({"producer": {"no separator": "abc"}})
    with producer.producing("torch") as meta:
        producer.versions("torch")  # project code that runs: the producer
    assert "morphlib/producer.py::versions" in meta["producer"] and meta["versions"]["torch"] == torch.__version__
    assert producer.stale_reason(meta, "torch") is None
    other = {**meta, "versions": {"torch": "0.0.1"}}
    assert producer.stale_reason(other, "torch") == f"made with torch 0.0.1 (here {torch.__version__})"
    assert producer.stale_reason(other, "torch", any_versions=True) is None
    gone = {**meta, "producer": {**meta["producer"], "morphlib/producer.py::versions": "0" * 16}}
    assert producer.stale_reason(gone, "torch") == ("made by code that has changed since "
                                                    "(morphlib/producer.py::versions)")


def test_producer_keeps_only_the_modules_whose_code_ran():
    import morphlib.shapes  # noqa: F401  (loaded, but none of its functions runs below)

    with producer.producing() as meta:
        producer.versions("torch")
    assert not any(name.startswith("morphlib/shapes.py") for name in meta["producer"])
    assert "morphlib/producer.py::<module>" in meta["producer"]


# ----------------------------------------------------------------------------- AWQ scales


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A named 2-layer model, its calibration ids, an AWQ config and an empty cache."""
    monkeypatch.setenv("MORPHLIB_CACHE", str(tmp_path / "cache"))
    model = synthetic_model("smollm2-135m", num_layers=2, dtype=torch.float32, device="cpu")
    model.morphlib_name = "tiny-smollm2-for-the-cache-test"  # a name: the cache is used
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, ids, morph.QuantConfig(method="awq", awq_grid=2, awq_tokens=32)


def test_awq_cache_is_reused_while_its_code_is_unchanged_and_its_units_join_the_fingerprint(tiny, monkeypatch):
    model, ids, cfg = tiny
    first = morph._cached_awq_scales(model, cfg, ids, progress=False)
    (entry,) = (morph.cache_dir() / "awq").glob("*.pt")
    meta = torch.load(entry, weights_only=True)["meta"]
    assert "morphlib/awq.py::search_scale" in meta["producer"] and set(meta["versions"]) == set(morph.AWQ_DISTS)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache is valid")

    monkeypatch.setattr(morph, "awq_scales", fail)
    with fingerprint.recording() as rec:
        again = morph._cached_awq_scales(model, cfg, ids, progress=False)
    assert all(torch.equal(first[li][n], again[li][n]) for li in first for n in first[li])
    assert "morphlib/awq.py::search_scale" in rec.fingerprint()  # merged in: it did not run here


def test_awq_cache_made_by_changed_code_is_not_reused(tiny, tmp_path, monkeypatch):
    model, ids, cfg = tiny
    morph._cached_awq_scales(model, cfg, ids, progress=False)
    calls = []
    real = morph.awq_scales
    monkeypatch.setattr(morph, "awq_scales", lambda *a, **k: calls.append(1) or real(*a, **k))
    morph._cached_awq_scales(model, cfg, ids, progress=False)
    assert calls == []  # unchanged code: reused
    src = edited_copy(tmp_path, "morphlib/awq.py", "    x = x.float()\n", "    x = x.float() * 1.0\n")
    monkeypatch.setenv("MORPHBOOK_SRC", str(src))
    morph._cached_awq_scales(model, cfg, ids, progress=False)
    assert calls == [1]  # search_scale changed since the cache was made: recomputed


# ----------------------------------------------------------------------------- GGUF conversions


@pytest.fixture
def converted(tmp_path):
    """A fake GGUF and a finished conversion of it whose record names code that ran (convert.cache_key)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    out = tmp_path / "cached" / "hf"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    with producer.producing(*convert.CONVERSION_DISTS) as meta:
        convert.cache_key(gguf)
    (out / ".complete").write_text(json.dumps(meta))
    return gguf, out


def test_converted_gguf_cache_key_follows_the_file(converted):
    import os

    gguf, out = converted
    first = convert.cache_key(gguf)
    os.utime(gguf, ns=(1, 1))
    assert convert.cache_key(gguf) != first  # a replaced file is converted again


def test_conversion_is_reused_while_its_code_is_unchanged_and_its_units_join_the_fingerprint(converted):
    gguf, out = converted
    with fingerprint.recording() as rec:
        assert convert.hf_folder(gguf, out) == out  # reused: the fake GGUF is never read
    assert "morphlib/convert.py::cache_key" in rec.fingerprint()  # merged in: hf_folder did not run it


def test_conversion_by_changed_code_or_without_record_is_converted_again(converted, tmp_path, monkeypatch):
    gguf, out = converted
    src = edited_copy(tmp_path, "morphlib/convert.py", "    st = path.stat()\n", "    st = path.stat()  # \n    st = st\n")
    monkeypatch.setenv("MORPHBOOK_SRC", str(src))
    with pytest.raises(MorphError, match="m.gguf is not a readable GGUF file"):  # it tried to convert again
        convert.hf_folder(gguf, out)
    monkeypatch.delenv("MORPHBOOK_SRC")
    (out / ".complete").write_text("{}")  # a conversion from before records were kept
    with pytest.raises(MorphError, match="not a readable GGUF file"):
        convert.hf_folder(gguf, out)


def test_an_environment_with_vllm_reads_other_versions_but_never_converts(converted, monkeypatch):
    gguf, out = converted
    monkeypatch.setattr(convert, "converts_here", lambda: False)
    record = json.loads((out / ".complete").read_text())
    (out / ".complete").write_text(json.dumps({**record, "versions": {d: "0.0.1" for d in convert.CONVERSION_DISTS}}))
    assert convert.hf_folder(gguf, out) == out  # the book environment's conversion, made with other versions
    (out / ".complete").write_text("{}")
    with pytest.raises(MorphError, match=r"never converts: run `bash scripts/setup.sh` first") as exc:
        convert.hf_folder(gguf, out)
    assert "\n" not in str(exc.value)
