"""Offline interactive Altair charts for the book.

``setup_altair()`` keeps Altair's html renderer (interactive Vega charts) and a small theme.
The chart scripts would normally load vega / vega-lite / vega-embed from a CDN; the book instead
ships them as one local script, ``book/_static/vega-bundle.js``, written at build time by
``write_vega_bundle`` from ``vl_convert.javascript_bundle``. The bundle also sets
``window.VEGA_DEBUG`` to Altair's versions, which makes Altair's loader skip its CDN fetch.

Set ``MORPHBOOK_ALTAIR=svg`` (or call ``setup_altair("svg")``) for static SVG charts instead
(no JavaScript at all). Book-only module: excluded from the stale check's code hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from morphlib.errors import MorphError

THEME = "morphbook"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"


def _theme() -> dict:
    return {
        "config": {
            "view": {"continuousWidth": 520, "continuousHeight": 280, "stroke": None},
            "font": FONT,
            "title": {"fontSize": 14, "anchor": "start", "fontWeight": 600},
            "axis": {"labelFontSize": 11, "titleFontSize": 12, "grid": True, "gridOpacity": 0.4},
            "legend": {"labelFontSize": 11, "titleFontSize": 12},
            "range": {"category": {"scheme": "tableau10"}},
        }
    }


def setup_altair(mode: str | None = None) -> str:
    """Enable the book's renderer ('html' interactive, default; or 'svg' static) and theme. Returns the mode."""
    import altair as alt

    mode = mode or os.environ.get("MORPHBOOK_ALTAIR", "html")
    if mode not in ("html", "svg"):
        raise MorphError(f"altair mode must be 'html' or 'svg', got {mode!r}")
    alt.renderers.enable(mode)
    # SVG, not canvas: crisp at any zoom, and the browser check can read each axis and its title
    alt.renderers.set_embed_options(actions=False, renderer="svg")
    if THEME not in alt.theme.names():
        alt.theme.register(THEME, enable=False)(_theme)
    alt.theme.enable(THEME)
    alt.data_transformers.enable("default", max_rows=20000)
    return mode


def box_stats(frame, by: list[str], value: str):
    """The five numbers of a box plot per group of ``by`` (min, q1, median, q3, max, and n): every sample
    summarised in one row per box, so that a chart of many thousand samples stays small (Altair embeds the
    data in the page and refuses more than 20,000 rows)."""
    g = frame.groupby(by, sort=False)[value]
    out = g.quantile([0.0, 0.25, 0.5, 0.75, 1.0]).unstack()
    out.columns = ["min", "q1", "median", "q3", "max"]
    out["n"] = g.size()
    return out.reset_index()


def boxes(stats, x, y_title: str, color, log: bool = False, size: int = 18):
    """Box plot over ``box_stats`` rows: whiskers from the smallest to the largest sample, the box from the
    first to the third quartile, a white tick at the median. ``x`` and ``color``: Altair encodings. Returns a
    layered chart (facet it as any chart)."""
    import altair as alt

    scale = alt.Scale(type="log") if log else alt.Scale(zero=False)
    base = alt.Chart().encode(x=x)
    tips = [alt.Tooltip(f"{k}:Q", format=".4g") for k in ("min", "q1", "median", "q3", "max")] + ["n:Q"]
    whisker = base.mark_rule().encode(y=alt.Y("min:Q", title=y_title, scale=scale), y2="max:Q", color=color)
    box = base.mark_bar(size=size).encode(y="q1:Q", y2="q3:Q", color=color, tooltip=tips)
    median = base.mark_tick(color="white", size=size, thickness=2).encode(y="median:Q")
    return alt.layer(whisker, box, median, data=stats)


def heatmap(frame, x: str, y: str, value: str, order: list[str], legend: str, x_title: str, y_title: str,
            title: str, domain=(-1, 1), scheme: str = "redblue", digits: int = 2, cell: int = 40,
            y_order: list[str] | None = None):
    """A labelled heat map whose numbers stay legible: white text on the dark ends of the scale, black in
    between, a font that fits the cell, every axis titled. ``order``: the x categories (and the y ones
    unless ``y_order`` is given)."""
    y_order = order if y_order is None else y_order
    import altair as alt

    lo, hi = domain
    dark = alt.expr.abs((alt.datum[value] - (lo + hi) / 2) / ((hi - lo) / 2)) > 0.6
    base = alt.Chart(frame).encode(x=alt.X(f"{x}:N", sort=order, title=x_title, axis=alt.Axis(labelAngle=-40)),
                                   y=alt.Y(f"{y}:N", sort=y_order, title=y_title))
    rect = base.mark_rect().encode(color=alt.Color(f"{value}:Q", scale=alt.Scale(domain=list(domain), scheme=scheme),
                                                   title=legend),
                                   tooltip=[x, y, alt.Tooltip(f"{value}:Q", format=f".{digits}f")])
    text = base.mark_text(fontSize=max(9, min(13, cell // 3))).encode(
        text=alt.Text(f"{value}:Q", format=f".{digits}f"),
        color=alt.condition(dark, alt.value("white"), alt.value("black")))
    return (rect + text).properties(width=cell * len(order), height=cell * len(y_order), title=title)


def vega_versions() -> dict:
    """The versions Altair's html output asks for, in the keys of its VEGA_DEBUG check."""
    import altair as alt

    return {
        "vega_version": alt.VEGA_VERSION,
        "vegalite_version": alt.VEGALITE_VERSION,
        "vegaembed_version": alt.VEGAEMBED_VERSION,
    }


def vega_bundle_js() -> str:
    """One self-contained script: vega + vega-lite + vega-embed as window globals, then VEGA_DEBUG."""
    import altair as alt
    import vl_convert as vlc

    want = ".".join(alt.VEGALITE_VERSION.split(".")[:2])  # '6.4.1' -> '6.4'
    if want not in vlc.get_vegalite_versions():
        raise MorphError(
            f"vl-convert {vlc.__version__} has no Vega-Lite {want} (has {', '.join(vlc.get_vegalite_versions())});"
            " pin a vl-convert-python that matches altair"
        )
    bundle = vlc.javascript_bundle(vl_version=want)
    # The bundle's top level declares names (e.g. `const _`) that collide with Sphinx's own scripts.
    return (
        "/* vega, vega-lite, vega-embed for offline Altair charts; generated by morphlib.plotting. */\n"
        "(function () {\n" + bundle + "\n})();\n"
        f"window.VEGA_DEBUG = Object.assign(window.VEGA_DEBUG || {{}}, {json.dumps(vega_versions(), sort_keys=True)});\n"
    )


def write_vega_bundle(path: str | os.PathLike) -> Path:
    """Write the bundle (a build artefact, gitignored). Returns the path."""
    from morphbook.publish.files import atomic_write_text

    return atomic_write_text(Path(path), vega_bundle_js())
