"""What a chapter page shows: which results (committed or this run's), under which banner.

A notebook runs its experiment, saves the result, then calls ``show(chapter, cfg, results_root)``:

* the **committed** results (``results/``) are shown when this run used its profile's published
  configuration (no overrides: e.g. the CPU build of CI) and wrote elsewhere — the book's numbers;
* otherwise **this run's** results are shown, labelled with its own model, profile and device (a
  reader's own model or texts never hide behind the committed numbers).

The banner is the same for every chapter: red when the results are MODIFIED (a detail file no
longer matches its run) or STALE (the code changed since: it names the commit that made the
numbers), blue for a published GPU run, yellow for a CPU run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from morphbook.chapters import chapter
from morphbook.experiments.base import is_published
from morphbook.publish.stale import Status, status
from morphbook.publish.store import load_summary, summary_path
from morphlib.errors import MorphError


def same_dir(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _display_markdown(text: str) -> None:
    """Show a banner: rendered Markdown in a notebook, plain text elsewhere."""
    try:
        from IPython.display import Markdown, display
    except ImportError:
        print(text)
        return
    display(Markdown(text))


@dataclass
class Shown:
    """The results a page renders: summary, where they live, whether they are the committed ones, their status."""

    chapter: str
    summary: dict
    root: Path
    committed: bool
    status: Status

    @property
    def headline(self) -> dict:
        """Headline values with ``{"value": ...}`` dicts unwrapped."""
        return headline_values(self.summary["headline"])

    @property
    def params(self) -> dict:
        return self.summary["provenance"]["params"]

    def path(self, name: str) -> Path:
        return self.root / chapter(self.chapter).name / name

    def json(self, name: str):
        return json.loads(self.path(name).read_text(encoding="utf-8"))

    def frame(self, name: str):
        import pandas as pd

        return pd.DataFrame(self.json(name))


def headline_values(headline: dict) -> dict:
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in headline.items()}


def pick(chapter_name: str, cfg, results_root: str | os.PathLike, committed_root: str | os.PathLike = "results") -> Shown:
    """Which results the page renders (see the module doc)."""
    if not same_dir(results_root, committed_root) and is_published(cfg):
        committed = load_summary(chapter_name, committed_root)
        if committed is not None:
            return Shown(chapter_name, committed, Path(committed_root), True,
                         status(chapter_name, committed, committed_root))
    fresh = load_summary(chapter_name, results_root)
    if fresh is None:
        raise MorphError(f"no results for chapter {chapter_name!r} in {results_root} (run the experiment cell first)")
    return Shown(chapter_name, fresh, Path(results_root), same_dir(results_root, committed_root),
                 status(chapter_name, fresh, results_root))


def short_commit(prov: dict) -> str:
    git = prov.get("git") or {}
    commit = git.get("commit")
    if not commit:
        return "uncommitted code"
    return f"commit {commit[:7]}" + ("+dirty" if git.get("dirty") else "")


def source_text(prov: dict) -> str:
    """'GPU profile, NVIDIA H100 80GB HBM3' or 'CPU profile, cpu'."""
    return f"{'GPU' if prov.get('profile') == 'gpu' else 'CPU'} profile, {prov.get('device') or 'unknown device'}"


def banner(shown: Shown) -> str:
    """A MyST admonition saying where the page's numbers come from (rendered as Markdown)."""
    prov = shown.summary.get("provenance") or {}
    date = (prov.get("date") or "unknown date")[:10]
    wall = f", {prov['wall_s']:.0f} s" if isinstance(prov.get("wall_s"), (int, float)) else ""
    where = summary_path(shown.chapter, shown.root).as_posix()
    made = f"{source_text(prov)}, {date}, {short_commit(prov)}{wall} ({where})"
    model = (prov.get("params") or {}).get("model")
    whose = "the book's committed results" if shown.committed else "**this run's results**"
    model_text = f", model `{model}`" if model else ""
    if shown.status.state == "MODIFIED":
        kind, text = "danger", (f"**Modified results**: {shown.status.message.split('(', 1)[1].rstrip(')')} — "
                                f"the detail files no longer match the run that made them ({made}). Rerun the chapter.")
    elif shown.status.state == "STALE":
        kind, text = "danger", (f"**Stale results**: this chapter's code changed since these numbers were made at "
                                f"**{short_commit(prov)}** ({source_text(prov)}, {date}{wall}{model_text}, {where}). "
                                "Rerun the chapter to refresh them.")
    elif prov.get("profile") == "gpu":
        kind, text = "note", (f"Numbers on this page: {whose}{model_text}, **{source_text(prov)}**, {date}, "
                              f"{short_commit(prov)}{wall} ({where}).")
    else:
        kind, text = "warning", (f"**CPU profile** (small parameters, for CI): {whose}{model_text}, not the book's "
                                 f"published GPU numbers. Made on {made}.")
    if chapter(shown.chapter).runs_on == "cpu" and prov.get("profile") == "gpu":
        kind, text = ("note" if shown.status.state == "ok" else kind), text.replace("GPU profile", "published profile (runs on CPU)")
    return f"```{{{kind}}}\n{text}\n```\n"


def show_saved(chapter_name: str, root: str | os.PathLike, title: str) -> Shown | None:
    """Display saved results of another configuration (e.g. a second model family) under ``title`` with
    their own banner; None (and a line saying so) when there are none."""
    summary = load_summary(chapter_name, root)
    if summary is None:
        print(f"No saved results for {title} in {root}.")
        return None
    shown = Shown(chapter_name, summary, Path(root), False, status(chapter_name, summary, root))
    _display_markdown(banner(shown).replace("**this run's results**", f"**{title}**"))
    return shown


def show(chapter_name: str, cfg, results_root: str | os.PathLike, committed_root: str | os.PathLike = "results") -> Shown:
    """Pick the results, display the banner (in a notebook) and return them for the charts."""
    shown = pick(chapter_name, cfg, results_root, committed_root)
    _display_markdown(banner(shown))
    return shown
