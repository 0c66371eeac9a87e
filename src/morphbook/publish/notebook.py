"""The few calls every chapter notebook makes: set up, then run + save + show in one step.

    setup()                                             # one-line errors, chart theme
    cfg = Config.for_profile(profile, **given(model=model, texts=texts))
    shown = run_chapter("sensitivity", run, cfg, results_root)   # -> Shown: banner displayed, files to chart
"""

from __future__ import annotations

import os

from morphbook.publish.page import Shown, show
from morphbook.publish.plotting import setup_altair
from morphbook.publish.store import save_result
from morphlib.errors import install_notebook_handler


def setup() -> None:
    """One-line errors for bad input (no tracebacks) and the book's chart renderer and theme."""
    install_notebook_handler()
    setup_altair()


def given(**params) -> dict:
    """The parameters a reader actually set (None means: keep the profile's default)."""
    return {k: v for k, v in params.items() if v is not None}


def run_chapter(chapter_name: str, run, cfg, results_root: str | os.PathLike = "results") -> Shown:
    """Run the experiment, save its results with provenance, then show the page's results and banner."""
    result = run(cfg)
    path = save_result(chapter_name, result, results_root)
    print(f"{chapter_name}: {cfg.profile} profile, {result.wall_s:.1f} s; results in {path.parent}")
    return show(chapter_name, cfg, results_root)
