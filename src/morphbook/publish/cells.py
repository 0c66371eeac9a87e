"""How an executed chapter notebook is presented in the book: evidence first, plumbing out of sight.

``present(nb, chapter_name)`` (scripts/build_book.py applies it to every chapter it assembles):

* the parameter cell, papermill's injected-parameters cell and the run cell (the one that calls
  ``run_chapter(``) are removed from the page, outputs included;
* every other code cell without a ``remove-*`` / ``hide-*`` tag of its own has its input folded
  (``hide-input``): charts, tables and prose show, code is one click away;
* the page's provenance sentence (glued by ``page.show`` under ``page.glue_key(chapter)``) is pasted
  right under the title, the first ``# `` heading, which is split from any text that follows it.

A notebook needs nothing of its own for this; applying it twice changes nothing.
"""

from __future__ import annotations

from morphbook.publish.glue import GLUE_PREFIX
from morphbook.publish.page import glue_key

PLUMBING_TAGS = {"parameters", "injected-parameters"}
RUN_CALL = "run_chapter("
PASTED = "provenance-paste"  # the tag of the inserted cell


def _tags(cell) -> list[str]:
    return cell.setdefault("metadata", {}).setdefault("tags", [])


def glued_keys(nb) -> set[str]:
    """The glue keys a notebook's outputs hold."""
    keys = set()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            rec = (out.get("metadata") or {}).get("scrapbook")
            if rec and any(k.startswith(GLUE_PREFIX) for k in out.get("data", {})):
                keys.add(rec["name"])
    return keys


def _is_plumbing(cell) -> bool:
    return bool(PLUMBING_TAGS & set(_tags(cell))) or RUN_CALL in "".join(cell.get("source", ""))


def _split_title(nb) -> int | None:
    """Index of the title cell (split off from its following text); None without a '# ' heading."""
    import nbformat

    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        lines = "".join(cell.source).splitlines()
        for j, line in enumerate(lines):
            if line.startswith("# "):
                rest = "\n".join(lines[j + 1:]).strip()
                cell.source = "\n".join(lines[: j + 1])
                if rest:
                    nb.cells.insert(i + 1, nbformat.v4.new_markdown_cell(rest))
                return i
    return None


def present(nb, chapter_name: str):
    """Apply the book's presentation to an executed notebook in place (see the module doc); returns it."""
    import nbformat

    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tags = _tags(cell)
        if _is_plumbing(cell):
            if "remove-cell" not in tags:
                tags.append("remove-cell")
        elif not any(t.startswith(("remove-", "hide-")) for t in tags):
            tags.append("hide-input")
    key = glue_key(chapter_name)
    already = any(PASTED in _tags(c) for c in nb.cells)
    if not already and key in glued_keys(nb):
        title = _split_title(nb)
        paste = nbformat.v4.new_markdown_cell(f"```{{glue:md}} {key}\n:format: myst\n```")
        paste.metadata["tags"] = [PASTED]
        nb.cells.insert(0 if title is None else title + 1, paste)
    return nb


def present_file(path, chapter_name: str) -> None:
    """Read an executed .ipynb, present it, write it back."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.write(present(nb, chapter_name), path)
