"""The book's chapter registry and the helpers chapters use to show which numbers a page renders.

Book-only module: excluded from the stale check's code hash, so rendering changes never
invalidate results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from morphlib.errors import MorphError


@dataclass(frozen=True)
class Chapter:
    name: str  # short name, also the results subfolder
    number: int
    title: str
    notebook: str  # jupytext percent source, relative to the repository root
    needs_gpu: bool  # the gpu profile needs CUDA (the cpu profile still runs on CPU)

    @property
    def results_subdir(self) -> str:
        return self.name

    @property
    def docname(self) -> str:
        """Sphinx document name (toc path without extension)."""
        return self.notebook.rsplit(".", 1)[0]


CHAPTERS: tuple[Chapter, ...] = (
    Chapter("sensitivity", 1, "Layer sensitivity to INT4", "notebooks/01_sensitivity.py", False),
    Chapter("strategies", 2, "Which layers to swap", "notebooks/02_strategies.py", False),
    Chapter("transfer", 3, "Swap transfer cost", "notebooks/03_transfer.py", True),
    Chapter("overlap", 4, "Overlapping swaps with decoding", "notebooks/04_overlap.py", True),
    Chapter("burst", 5, "Serving a bursty trace", "notebooks/05_burst.py", False),
    Chapter("vllm", 6, "Swapping inside vLLM", "notebooks/06_vllm.py", False),
)
CHAPTER_NAMES: tuple[str, ...] = tuple(c.name for c in CHAPTERS)


def chapter(name: str) -> Chapter:
    for c in CHAPTERS:
        if c.name == name:
            return c
    raise MorphError(f"unknown chapter {name!r} (expected one of {', '.join(CHAPTER_NAMES)})")


def _same_dir(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def shown_results(chapter_name: str, fresh_root: str | os.PathLike, committed_root: str | os.PathLike = "results"):
    """Which results a page renders: ``(summary, root, label)`` with label 'committed' or 'fresh'.

    Committed results win when they exist and this run is not itself writing to committed_root
    (a CI build on the cpu profile then shows the book's published GPU numbers).
    """
    from morphlib.results import load_summary

    chapter(chapter_name)
    if not _same_dir(fresh_root, committed_root):
        committed = load_summary(chapter_name, committed_root)
        if committed is not None:
            return committed, Path(committed_root), "committed"
    fresh = load_summary(chapter_name, fresh_root)
    if fresh is None:
        raise MorphError(f"no results for chapter {chapter_name!r} in {fresh_root} (nor in {committed_root})")
    return fresh, Path(fresh_root), "fresh"


def short_commit(prov: dict) -> str:
    git = prov.get("git") or {}
    commit = git.get("commit")
    if not commit:
        return "uncommitted code"
    return f"commit {commit[:7]}" + ("+dirty" if git.get("dirty") else "")


def source_text(prov: dict) -> str:
    """'GPU profile, NVIDIA H100 80GB HBM3' or 'CPU profile'."""
    if prov.get("profile") == "gpu":
        return f"GPU profile, {prov.get('device') or 'unknown GPU'}"
    return "CPU profile"


def provenance_banner(summary: dict, stale: bool, path: str | os.PathLike | None = None,
                      changed: list[str] | None = None) -> str:
    """A MyST admonition saying where this page's numbers come from (show with IPython Markdown).

    ``changed``: detail files that no longer match the run's sha256 manifest (see results.changed_files).
    """
    prov = summary.get("provenance") or {}
    date = (prov.get("date") or "unknown date")[:10]
    where = f" ({Path(path).as_posix()})" if path else ""
    made = f"{date}, {short_commit(prov)}{where}"
    if changed:
        kind, text = "danger", (
            f"**Modified results**: {', '.join(changed)} no longer match the files this run wrote "
            f"({source_text(prov)}, {made}). Rerun the chapter."
        )
    elif stale:
        kind, text = "danger", (
            f"**Stale results**: this chapter's code changed since these numbers were made "
            f"({source_text(prov)}, {made}). Rerun the chapter to refresh them."
        )
    elif prov.get("profile") == "gpu":
        kind, text = "note", f"Numbers on this page: **{source_text(prov)}**, {made}."
    else:
        kind, text = "warning", (
            f"**CPU profile** (small parameters, for CI): not the book's published GPU numbers. "
            f"Made on {prov.get('device') or 'cpu'}, {made}."
        )
    return f"```{{{kind}}}\n{text}\n```\n"


def show_provenance(chapter_name: str, summary: dict, root: str | os.PathLike):
    """Display the banner for results shown from ``root`` (checks staleness against the current code).

    Returns None on purpose, so a trailing call in a cell does not show the banner twice.
    """
    from IPython.display import Markdown, display

    from morphlib.results import changed_files
    from morphlib.stale import is_stale

    path = Path(root) / chapter(chapter_name).results_subdir / "summary.json"
    display(Markdown(provenance_banner(summary, is_stale(chapter_name, summary), path=path,
                                       changed=changed_files(chapter_name, summary, root))))


# --------------------------------------------------------------------------- findings table
def format_value(value) -> str:
    """A headline value as table text: numbers to 4 significant digits, dicts {'value', 'unit'}."""
    unit = ""
    if isinstance(value, dict):
        unit = f" {str(value['unit']).strip()}" if str(value.get("unit") or "").strip() else ""
        value = value.get("value")
    if value is None:
        text = "n/a"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(format_value(v) for v in value)
    else:
        text = str(value)
    return (text + unit).replace("|", "\\|").replace("\n", " ")


def figure_label(key: str, value) -> str:
    if isinstance(value, dict) and value.get("label"):
        return str(value["label"]).replace("|", "\\|")
    return key.replace("_", " ")


def source_cell(prov: dict, stale: bool) -> str:
    src = prov.get("gpu") or ("GPU" if prov.get("profile") == "gpu" else "CPU profile")
    text = f"{src}, {(prov.get('date') or '?')[:10]}, {short_commit(prov)}"
    return text + (" **STALE**" if stale else "")


# The headline keys each chapter contributes to the introduction's findings table, in order (the full
# headline stays in the chapter's summary.json). A chapter not listed here shows every scalar entry.
FINDINGS: dict[str, tuple[str, ...]] = {
    "sensitivity": ("lis_dominant_term", "lis_variance_share_lts", "spearman_lis_vs_direct_cost",
                    "spearman_lis_norm_vs_direct_cost", "dearest_layer", "dearest_layer_dppl_pct"),
    "strategies": ("heldout_win_rate_block_vs_greedy_lis", "ci95", "sign_test_p",
                   "heldout_win_rate_block_vs_best_scattered", "ci95_vs_best_scattered", "seed_protocol_wins",
                   "seed_protocol_trials", "seed_protocol_selection_expected", "verdict_contiguous_vs_lis",
                   "verdict_contiguous_vs_best_scattered", "verdict_middle_layers_safest"),
    "transfer": ("shape", "timer", "ceiling_gbps", "fp16_layer_ms", "int4_layer_ms",
                 "packed_vs_pertensor_speedup_fp16_8_layers", "scattered_vs_block_ratio_fp16_8_layers",
                 "copies_bitwise_exact"),
    "overlap": ("tpot_ms_no_swap", "tpot_ms_sync_swap_step", "tpot_ms_async_swap_step", "swap_ms",
                "async_tokens_match_sync", "freed_mib_measured", "freed_mib_expected"),
    "burst": ("conv_peak_to_mean_rps_1s", "code_peak_to_mean_rps_1s", "kv_kib_per_token", "l4_kv_gain_pct_16_layers",
              "l4_conv_overload_pct_0_layers", "l4_conv_overload_pct_16_layers"),
    "vllm": ("engine", "fp16_repeat_match", "all_layers_match", "block_match_2", "scattered_match_2",
             "block_match_6", "scattered_match_6", "block_match_8", "scattered_match_8"),
}


def table_entries(headline: dict, chapter_name: str | None = None) -> dict:
    """Headline entries for the findings table: scalars and {'value': ...} dicts (nested tables are skipped).

    Only the chapter's ``FINDINGS`` keys when it has some; else, if any entry is a dict with
    ``"finding": true``, only those entries.
    """
    keys = [k for k in FINDINGS.get(chapter_name or "", ()) if k in headline]
    if keys:
        return {k: headline[k] for k in keys}
    shown = {k: v for k, v in headline.items()
             if not isinstance(v, dict) or "value" in v}
    picked = {k: v for k, v in shown.items() if isinstance(v, dict) and v.get("finding") is True}
    return picked or shown


def findings_markdown(fresh_root, committed_root="results", present: set[str] | None = None,
                      root: str | os.PathLike | None = None) -> str:
    """The introduction's findings table, from each chapter's shown summary.json headline."""
    from morphlib.results import load_summary
    from morphlib.stale import is_stale

    lines = ["| chapter | figure | value | source |", "| --- | --- | --- | --- |"]
    for ch in CHAPTERS:
        link = f"{ch.number}. {{doc}}`{ch.title} </{ch.docname}>`" if present is None or ch.name in present \
            else f"{ch.number}. {ch.title}"
        committed = None if _same_dir(fresh_root, committed_root) else load_summary(ch.name, committed_root)
        summary = committed or load_summary(ch.name, fresh_root)
        if summary is None:
            lines.append(f"| {link} | no results yet | | |")
            continue
        prov = summary.get("provenance") or {}
        stale = is_stale(ch.name, summary, root)
        headline = table_entries(summary.get("headline") or {}, ch.name)
        for i, (key, value) in enumerate(headline.items()):
            first, source = (link, source_cell(prov, stale)) if i == 0 else ("", "")
            lines.append(f"| {first} | {figure_label(key, value)} | {format_value(value)} | {source} |")
    return "\n".join(lines) + "\n"
