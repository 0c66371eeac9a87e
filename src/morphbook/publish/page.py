"""What a chapter page shows: which results (committed or this run's), under which banner.

A notebook runs its experiment, saves the result, then calls ``show(chapter, cfg, results_root)``:

* the **committed** results (``results/``) are shown when this run used its profile's published
  configuration (no overrides: e.g. the CPU build of CI) and wrote elsewhere — the book's numbers;
* otherwise **this run's** results are shown, labelled with its own model, profile and device (a
  reader's own model or texts never hide behind the committed numbers).

Every page says where its numbers come from in one sentence under its title (``provenance_text``:
whose numbers, profile, what computed them, date, commit, the summary file, and whether this build
re-ran the chapter as a check), after a red box when the results are MODIFIED (a detail file no longer
matches its run) or STALE (the code changed since: it names the commit that made the numbers), inside
a yellow box when the page shows a CPU-profile run instead of published numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from morphbook.chapters import chapter
from morphbook.experiments.base import is_published
from morphbook.publish.glue import glue
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
    ran: str | None = None  # the profile this run used, when the page shows other (committed) results instead

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


def pick(chapter_name: str, cfg, results_root: str | os.PathLike, committed_root: str | os.PathLike | None = "results") -> Shown:
    """Which results the page renders (see the module doc; ``committed_root=None``: this run's, whatever is committed)."""
    if committed_root is not None and not same_dir(results_root, committed_root) and is_published(cfg):
        committed = load_summary(chapter_name, committed_root)
        if committed is not None:
            return Shown(chapter_name, committed, Path(committed_root), True,
                         status(chapter_name, committed, committed_root), ran=cfg.profile)
    fresh = load_summary(chapter_name, results_root)
    if fresh is None:
        raise MorphError(f"no results for chapter {chapter_name!r} in {results_root} (run the experiment cell first)")
    return Shown(chapter_name, fresh, Path(results_root), committed_root is not None and same_dir(results_root, committed_root),
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


def used_device(prov: dict, chapter_name: str | None = None) -> tuple[str, str]:
    """(short, long) name of what computed the numbers, from the result's own record.

    An experiment that places work on a device records it as its ``device`` parameter ("cuda:0",
    "cpu", or a card's name); one without that parameter computed on the host's CPU, whatever card
    the host had (e.g. chapter 5's arithmetic on the GPU machine). A chapter registered to run on
    CPU ran on CPU."""
    host = prov.get("device") or "unknown device"
    param = str((prov.get("params") or {}).get("device") or "")
    on_cpu = host == "cpu" or (chapter_name is not None and chapter(chapter_name).runs_on == "cpu")
    if param and not param.startswith("cpu") and not on_cpu:
        return f"{prov.get('gpu') or host} GPU", f"GPU ({host})"
    if param.startswith("cpu") or on_cpu or not prov.get("gpu"):
        return "CPU", "CPU"
    return f"CPU ({prov['gpu']} host, no GPU used)", f"CPU only (the host of an {host} run; no GPU used)"


def profile_words(prov: dict, chapter_name: str) -> str:
    if prov.get("profile") != "gpu":
        return "CPU profile (small sizes, for CI)"
    return "published profile" if chapter(chapter_name).runs_on == "cpu" else "GPU profile"


def provenance_text(shown: Shown) -> str:
    """One sentence under a page's title: whose numbers, which profile, made on what, when, at which commit,
    from which file; a danger box first when the results are STALE or MODIFIED, a warning box when the page
    shows a CPU-profile run instead of published numbers."""
    prov = shown.summary.get("provenance") or {}
    date = (prov.get("date") or "unknown date")[:10]
    wall = f" in {prov['wall_s']:.0f} s" if isinstance(prov.get("wall_s"), (int, float)) else ""
    where = summary_path(shown.chapter, shown.root)
    if where.is_absolute() and where.is_relative_to(Path.cwd()):
        where = where.relative_to(Path.cwd())  # as the repository names it
    where = where.as_posix()
    model = (prov.get("params") or {}).get("model")
    whose = "the book's committed results" if shown.committed else "**this run's results**"
    model_text = f", model `{model}`" if model else ""
    _, device = used_device(prov, shown.chapter)
    sentence = (f"Numbers on this page: {whose}{model_text}, {profile_words(prov, shown.chapter)}, computed on "
                f"{device} on {date} at {short_commit(prov)}{wall} (`{where}`).")
    if shown.ran:
        sentence += (f" This build re-ran the chapter on the {shown.ran.upper()} profile as a check; those numbers "
                     "are not shown.")
    if shown.status.state == "MODIFIED":
        return (f"```{{admonition}} Modified results\n:class: danger\n{_reason(shown.status)}"
                f": the detail files no longer match the run that made them. Rerun the chapter.\n```\n\n{sentence}\n")
    if shown.status.state == "STALE":
        why = _reason(shown.status) or "its code changed"
        return (f"```{{admonition}} Stale results\n:class: danger\nThese numbers were made at commit "
                f"**{short_commit(prov)}**, and what made them has changed since: {why}. They await a rerun.\n```\n\n"
                f"{sentence}\n")
    if prov.get("profile") != "gpu":
        return f"```{{warning}}\n{sentence} These are not the book's published numbers.\n```\n"
    return f"*{sentence}*\n"


def _reason(st) -> str:
    """What a status message says after its state: "STALE (x)" and "STALE: x" both give "x"."""
    rest = st.message.removeprefix(st.state).strip()
    return rest[1:].rstrip(")") if rest.startswith("(") else rest.removeprefix(":").strip()


def glue_key(chapter_name: str) -> str:
    """The glue key under which a page's provenance is stored (``publish.cells`` pastes it under the title)."""
    return f"provenance-{chapter_name}"


def show_saved(chapter_name: str, root: str | os.PathLike, title: str) -> Shown | None:
    """Display saved results of another configuration (e.g. a second model family) under ``title`` with
    their own banner; None (and a line saying so) when there are none."""
    summary = load_summary(chapter_name, root)
    if summary is None:
        print(f"No saved results for {title} in {root}.")
        return None
    shown = Shown(chapter_name, summary, Path(root), False, status(chapter_name, summary, root))
    _display_markdown(provenance_text(shown).replace("**this run's results**", f"**{title}**"))
    return shown


def show(chapter_name: str, cfg, results_root: str | os.PathLike,
         committed_root: str | os.PathLike | None = "results") -> Shown:
    """Pick the results, display their provenance (in a notebook), glue it for the page (``glue_key``) and
    return them for the charts."""
    shown = pick(chapter_name, cfg, results_root, committed_root)
    text = provenance_text(shown)
    _display_markdown(text)
    glue(glue_key(chapter_name), text, markdown=True)
    return shown
