"""Glue computed text into a page's prose (MyST-NB ``glue``): ``{glue:text}`key``` inline,
``{glue:md}`key``` for inline Markdown, and the ``{glue:md}`` directive for blocks.

The record has MyST-NB's own format (a display_data output whose mime types carry the papermill
record prefix and whose metadata names the key), written here so that a kernel without MyST-NB
installed (chapter 6's vLLM environment) can glue too. Nothing is displayed in the notebook.
"""

from __future__ import annotations

from collections.abc import Mapping

from morphlib.errors import MorphError

GLUE_PREFIX = "application/papermill.record/"  # myst_nb.ext.glue.GLUE_PREFIX


def record(name: str, text: str, markdown: bool = False) -> dict:
    """The display bundle and metadata of one glued value (what ``glue`` displays)."""
    if not isinstance(text, str):
        raise MorphError(f"glue {name!r}: expected text, got {type(text).__name__} (format numbers with publish.fmt)")
    data = {GLUE_PREFIX + "text/plain": repr(text)}
    if markdown:
        data[GLUE_PREFIX + "text/markdown"] = text
    return {"data": data, "metadata": {"scrapbook": {"name": name, "mime_prefix": GLUE_PREFIX}}}


def glue(name: str, text: str, markdown: bool = False) -> None:
    """Store ``text`` under ``name`` for the page (no visible output; nothing happens outside IPython)."""
    rec = record(name, text, markdown)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is None:
        return
    display(rec["data"], raw=True, metadata=rec["metadata"])


def glue_all(texts: Mapping[str, str], prefix: str = "", markdown: bool = True) -> dict[str, str]:
    """Glue every entry as ``prefix + key`` (Markdown by default, so ``{glue:md}`` can paste emphasis).
    Returns the mapping with the prefixed keys."""
    out = {prefix + key: value for key, value in texts.items()}
    for key, value in out.items():
        glue(key, value, markdown)
    return out
