"""The introduction's findings table: each chapter's key headline figures, from the results the pages show."""

from __future__ import annotations

import os

from morphbook.chapters import CHAPTERS
from morphbook.publish.page import same_dir, short_commit
from morphbook.publish.stale import status
from morphbook.publish.store import load_summary

# The headline keys each chapter contributes to the table, in order (the full headline stays in its
# summary.json). A chapter not listed here shows every scalar entry.
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
    "vllm": ("vllm_version", "vllm_vs_hf_fp32_match", "fp16_repeat_match", "restore_match", "baked_checkpoint_match",
             "no_reset_control_match", "swap_ms", "tpot_ratio_swapped_vs_fp16"),
}


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


def table_entries(headline: dict, chapter_name: str | None = None) -> dict:
    """Headline entries for the table: the chapter's FINDINGS keys, else scalars and {'value': ...} dicts."""
    keys = [k for k in FINDINGS.get(chapter_name or "", ()) if k in headline]
    if keys:
        return {k: headline[k] for k in keys}
    return {k: v for k, v in headline.items() if not isinstance(v, dict) or "value" in v}


def findings_markdown(fresh_root: str | os.PathLike, committed_root: str | os.PathLike = "results",
                      present: set[str] | None = None) -> str:
    """The introduction's findings table: committed results where they exist, else the fresh run's."""
    lines = ["| chapter | figure | value | source |", "| --- | --- | --- | --- |"]
    for ch in CHAPTERS:
        link = f"{ch.number}. {{doc}}`{ch.title} </{ch.docname}>`" if present is None or ch.name in present \
            else f"{ch.number}. {ch.title}"
        root = committed_root
        summary = None if same_dir(fresh_root, committed_root) else load_summary(ch.name, committed_root)
        if summary is None:
            root, summary = fresh_root, load_summary(ch.name, fresh_root)
        if summary is None:
            lines.append(f"| {link} | no results yet | | |")
            continue
        prov = summary.get("provenance") or {}
        st = status(ch.name, summary, root)
        src = f"{prov.get('gpu') or ('GPU' if prov.get('profile') == 'gpu' else 'CPU profile')}, " \
              f"{(prov.get('date') or '?')[:10]}, {short_commit(prov)}" + ("" if st.state == "ok" else f" **{st.state}**")
        for i, (key, value) in enumerate(table_entries(summary.get("headline") or {}, ch.name).items()):
            first, source = (link, src) if i == 0 else ("", "")
            lines.append(f"| {first} | {figure_label(key, value)} | {format_value(value)} | {source} |")
    return "\n".join(lines) + "\n"
