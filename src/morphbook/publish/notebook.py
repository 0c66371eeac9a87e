"""The few calls every chapter notebook makes: set up, then run + save + show in one step.

    setup()                                             # one-line errors, chart theme
    cfg = Config.for_profile(profile, **given(model=model, texts=texts))
    shown = run_chapter("sensitivity", run, cfg, results_root)   # -> Shown: banner displayed, files to chart
"""

from __future__ import annotations

import os

from morphbook.publish.inputs import call_run, load_inputs
from morphbook.publish.page import Shown, show
from morphbook.publish.plotting import setup_altair
from morphbook.publish.store import load_summary, save_result
from morphlib import fingerprint
from morphlib.errors import install_notebook_handler


def setup() -> None:
    """One-line errors for bad input (no tracebacks) and the book's chart renderer and theme."""
    install_notebook_handler()
    setup_altair()


def given(**params) -> dict:
    """The parameters a reader actually set (None means: keep the profile's default)."""
    return {k: v for k, v in params.items() if v is not None}


def run_chapter(chapter_name: str, run, cfg, results_root: str | os.PathLike = "results", needs: str | None = None) -> Shown:
    """Run the experiment (``run(cfg, inputs)`` when the chapter declares inputs: they are read from
    ``results_root``), save its results with provenance, then show the page's results and banner.
    ``needs``: a headline key the page draws on; committed results without it (made by an earlier version
    of the chapter) are not shown, this run's are.

    The fingerprint is recorded around the run; the kernel imported the experiment earlier, so saving
    also refuses when the kernel holds code older than the files (restart the kernel and re-run)."""
    inputs = load_inputs(chapter_name, results_root)
    with fingerprint.recording() as rec:
        result = call_run(chapter_name, run, cfg, inputs)
    saved = save_result(chapter_name, result, results_root, recording=rec, inputs=inputs)
    print(f"{chapter_name}: {cfg.profile} profile; {saved.describe(result.wall_s)}")
    committed = load_summary(chapter_name) if needs is not None else None
    drawable = committed is None or needs in committed["headline"]
    return show(chapter_name, cfg, results_root, "results" if drawable else None)
