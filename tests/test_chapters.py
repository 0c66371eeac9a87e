"""The chapter registry (morphbook.chapters) agrees with the book's table of contents and introduction."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from morphbook.chapters import ALL, CHAPTERS, NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_toc_lists_the_chapters_in_order():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    part = next(p for p in toc["parts"] if p.get("caption") == "Chapters")
    assert [c["file"] for c in part["chapters"]] == [c.docname for c in CHAPTERS]


def test_intro_lists_the_chapters_in_order():
    """Each line '<n>. **<title>** ({doc}`/<notebook>`)' of book/intro.md, against the registry."""
    found = re.findall(r"^(\d+)\. \*\*(.+?)\*\* \(\{doc\}`/([^`]+)`\)", (ROOT / "book/intro.md").read_text(), re.M)
    assert [(int(n), doc) for n, _, doc in found] == [(c.number, c.docname) for c in CHAPTERS]
    for (_, title, _), c in zip(found, CHAPTERS):
        assert c.title.lower().startswith(title.lower()), (title, c.title)


def test_registry_is_consistent():
    assert [c.number for c in CHAPTERS] == list(range(1, len(CHAPTERS) + 1))
    assert len(set(NAMES)) == len(NAMES)
    for c in ALL:
        assert (ROOT / "src" / Path(*c.experiment.split("."))).with_suffix(".py").is_file(), c.experiment
        assert c.notebook is None or (ROOT / c.notebook).is_file(), c.notebook
        assert all(NAMES.index(used) < NAMES.index(c.name) for used in c.uses), c.name  # inputs are made first
