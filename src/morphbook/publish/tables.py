"""Tables as the book prints them: a MyST ``{table}`` with a caption and a label, readers' column
names with units, no index, numbers formatted by ``publish.fmt``.

    show_table(frame, {"k": "layers swapped", "heldout_ppl": "held-out perplexity"}, "Perplexity per k",
               "tbl-strategies-per-k", formats={"heldout_ppl": fmt.auto})

A column name that still looks like a key (``snake_case``) is refused: a reader should never see one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from morphbook.publish import fmt
from morphlib.errors import MorphError

KEY_LIKE = re.compile(r"\b[a-z0-9]+(?:_[a-z0-9]+)+\b")
LABEL = re.compile(r"^[a-z][a-z0-9-]*$")


def cell_text(value, format: Callable | None = None) -> str:
    """One cell: ``format(value)`` if given; floats by magnitude; lists joined; '|' escaped."""
    if format is not None:
        text = format(value)
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = fmt.auto(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, (list, tuple)):
        text = " ".join(str(v) for v in value)
    elif value is None:
        text = "n/a"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping], columns: Mapping[str, str], caption: str, label: str,
                   formats: Mapping[str, Callable] | None = None, align: Mapping[str, str] | None = None) -> str:
    """A captioned, labelled MyST table of ``rows`` (dicts) with the ``columns`` {key: header} in that order.

    ``align``: {key: "left" | "right"}; numeric columns default to right."""
    if not LABEL.match(label):
        raise MorphError(f"table label {label!r} must be lowercase letters, digits and hyphens (e.g. tbl-ch2-per-k)")
    for header in columns.values():
        if KEY_LIKE.search(header):
            raise MorphError(f"table column {header!r} reads like a key: give it a reader's name (and its unit)")
    if not caption.strip():
        raise MorphError(f"table {label}: a caption is required")
    formats, align = formats or {}, dict(align or {})
    keys = list(columns)
    for key in keys:
        if key not in align:
            values = [r.get(key) for r in rows]
            numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
            align[key] = "right" if numeric else "left"
    head = "| " + " | ".join(columns[k].replace("|", "\\|") for k in keys) + " |"
    rule = "| " + " | ".join("---:" if align[k] == "right" else ":---" for k in keys) + " |"
    body = ["| " + " | ".join(cell_text(r.get(k), formats.get(k)) for k in keys) + " |" for r in rows]
    options = [f":name: {label}"] + ([":class: wide"] if len(keys) >= WIDE_COLUMNS else [])
    return "\n".join([f":::{{table}} {caption}", *options, "", head, rule, *body, ":::", ""])


WIDE_COLUMNS = 9  # from this many columns a table is set in smaller type with tighter cells (book/_static/morphbook.css)


def frame_rows(frame) -> list[dict]:
    """A DataFrame's rows as dicts (its index dropped: a reader never sees it)."""
    return frame.to_dict(orient="records")


def show_table(data, columns: Mapping[str, str], caption: str, label: str,
               formats: Mapping[str, Callable] | None = None, align: Mapping[str, str] | None = None) -> None:
    """Display the table in a notebook (rendered as MyST); ``data``: a DataFrame or a list of dicts.
    Returns nothing, so that a cell ending with it shows the table once."""
    rows = frame_rows(data) if hasattr(data, "to_dict") and hasattr(data, "columns") else list(data)
    text = markdown_table(rows, columns, caption, label, formats, align)
    try:
        from IPython.display import Markdown, display
    except ImportError:
        print(text)
        return
    display(Markdown(text))
