"""The benchmarks page: the serving engine (``results/engine``) and the INT4 kernels (``results/kernels``),
each target met or missed, the spread of each figure within its run, and INT4 against FP16 step time
over batch size. Written as Markdown at build time (``scripts/build_book.py``); the charts are
Vega-Lite specs rendered by the page's local vega bundle.

Every entry of a benchmark's headline that carries ``target`` and ``met`` is a row, whatever its key:
a key without a reader's label here is shown with its underscores turned to spaces (and the browser
check then fails the page, so that a label gets written).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from statistics import median

from morphbook.publish import fmt
from morphbook.publish.findings import load, targets
from morphbook.publish.page import provenance_text
from morphbook.publish.tables import markdown_table

ENGINE_LABELS = {
    "decode_step_vs_roofline_7b_bs1": ("Llama-2-7B-shape bf16 decode step over the HBM roofline, batch 1", "ratio"),
    "int4_vs_fp16_step_speedup_7b_bs1": ("All-INT4 over FP16 decode-step speedup, Llama-2-7B shape, batch 1", "times"),
    "smollm2_speedup_vs_hf_compiled_bs1": ("SmolLM2 step speedup over HF static cache + torch.compile, batch 1", "times"),
    "smollm2_speedup_vs_hf_eager_bs1": ("SmolLM2 step speedup over HF eager generate, batch 1", "times"),
    "swap_copy_bw_vs_isolated": ("Side-stream swap copy bandwidth over an isolated pinned copy", "ratio"),
    "decode_slowdown_during_swap": ("Decode slowdown while a Llama-2-7B layer is copied", "change"),
    "gpu_top1_agreement_vs_hf": ("Top-1 agreement with HF bf16 on text prompts", "share"),
    "int4_vs_fp16_step_speedup_7b_bs8": ("All-INT4 over FP16 decode-step speedup, Llama-2-7B shape, batch 8", "times"),
    "int4_vs_fp16_worst_step_speedup": ("All-INT4 over FP16 decode-step speedup, the smallest over batch 1–64 and "
                                        "both models", "times"),
    "top1_decisive_agreement": ("Engine top-1 agreement with fp32 on decisive positions (fp32 top-2 gap above "
                                "4 bf16 ulps)", "share"),
    "top1_gap_vs_hf_incremental_pts": ("Engine top-1 agreement with fp32 below HF bf16's own incremental decode, "
                                       "all positions (points)", "ratio"),
    "kl_ratio_vs_hf_bf16": ("KL from fp32 of the engine over that of HF bf16's incremental decode", "ratio"),
    "positions": ("Forced-continuation positions compared with fp32", "count"),
    "decisive_excluded_share": ("Positions left out as not decisive (fp32 top-2 gap within 4 bf16 ulps)", "share"),
    "kv_blocks_l4_vs_arithmetic": ("Llama-2-7B KV blocks in an L4's budget over chapter 5's capacity arithmetic", "ratio"),
    "peak_over_budget_bytes": ("Llama-2-7B engine's memory peak over its L4 budget (construction and serving)", "bytes"),
    "budget_used_at_peak": ("Llama-2-7B engine's memory peak as a share of its L4 budget (the worse of construction and serving)", "ratio"),
}
BANDS = {"rows_1": ("1 row", 1, 1), "rows_1_4096x4096": ("1 row, 4096×4096", 1, 1), "rows_le_8": ("1–8 rows", 1, 8),
         "rows_le_16": ("1–16 rows", 1, 16), "rows_16_256": ("16–256 rows", 16, 256),
         "rows_512_2048": ("512–2,048 rows", 512, 2048),
         "worst_ratio_vs_gemlite": ("1–2,048 rows: INT4 over GemLite's time", 1, 2048),
         "worst_ratio_vs_tinygemm": ("1–2,048 rows: INT4 over tinygemm's time", 1, 2048)}
YARDSTICK_COLUMNS = {"worst_ratio_vs_gemlite": "gemlite_ms", "worst_ratio_vs_tinygemm": "tinygemm_ms"}
BAND_MODEL = "llama-2-7b"  # the kernels' headline bands are over this shape's linears


def value_text(value, kind: str) -> str:
    """``kind``: "share" (a fraction, as a percentage), "change" (a fraction, as a signed percentage), "times", "ratio",
    "count" (a whole number), "bytes" (as signed MiB)."""
    if kind == "count":
        return fmt.num(value, 0)
    if kind == "bytes":
        return f"{fmt.num(value / 2**20, 0, signed=round(value / 2**20) != 0)}\u00a0MiB"
    if kind == "share":
        return fmt.frac_pct(value)
    if kind == "change":
        return fmt.pct(100 * value, 1, signed=True)
    if kind == "times":
        return fmt.times(value)
    return fmt.num(value, 3 if abs(value) < 10 else 1)


def target_text(target, kind: str) -> str:
    """'<= 1.5' -> '≤ 1.5'; '>= 0.995' -> '≥ 99.5 %' for a share."""
    m = re.fullmatch(r"\s*([<>]=?)\s*([-+0-9.eE]+)\s*", str(target))
    if not m:
        return str(target)
    op = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}[m.group(1)]
    number = float(m.group(2))
    return f"{op}\u00a0{fmt.pct(100 * number, 1) if kind == 'change' else value_text(number, kind)}"


def label_for(key: str) -> tuple[str, str]:
    return ENGINE_LABELS.get(key, (key.replace("_", " "), "ratio"))


# --------------------------------------------------------------------------- spreads within one run
def _rows(run_rows: list[dict], model: str, state: str) -> dict[int, dict]:
    return {r["batch"]: r for r in run_rows if r["model"] == model and r["state"] == state}


def _range(pairs: list[tuple[int, float]], text) -> str:
    if not pairs:
        return "—"
    lo, hi = min(pairs, key=lambda p: p[1]), max(pairs, key=lambda p: p[1])
    return f"{text(lo[1])} (batch {lo[0]}) to {text(hi[1])} (batch {hi[0]})"


def engine_spread(key: str, entry: dict, rows: list[dict], run: dict) -> str:
    ops = (run.get("swap") or {}).get("ops") or []
    big = run.get("big", "llama-2-7b")
    if key == "swap_copy_bw_vs_isolated" and ops:
        vals = [op["bw_ratio"] for op in ops]
        return f"{fmt.num(min(vals), 3)}–{fmt.num(max(vals), 3)} over the run's {len(vals)} copies"
    if key == "decode_slowdown_during_swap" and ops:
        vals = [median(op["overlapped_step_ms"]) / median(op["adjacent_quiet_step_ms"]) - 1 for op in ops
                if op.get("overlapped_step_ms") and op.get("adjacent_quiet_step_ms")]
        if vals:
            return f"{fmt.pct(100 * min(vals), 1, True)} to {fmt.pct(100 * max(vals), 1, True)} over {len(vals)} copies"
    if key == "int4_vs_fp16_worst_step_speedup" and entry.get("at"):
        return f"smallest at {entry['at']}"
    if key in ("int4_vs_fp16_step_speedup_7b_bs1", "int4_vs_fp16_step_speedup_7b_bs8"):
        fp16, int4 = _rows(rows, big, "fp16"), _rows(rows, big, "int4")
        return _range([(b, fp16[b]["step_ms"] / int4[b]["step_ms"]) for b in sorted(fp16) if b in int4], fmt.times)
    if key == "decode_step_vs_roofline_7b_bs1":
        fp16 = _rows(rows, big, "fp16")
        return _range([(b, r["step_ms"] / r["roofline_ms"]) for b, r in sorted(fp16.items()) if r.get("roofline_ms")],
                      lambda v: fmt.num(v, 2))
    if key == "smollm2_speedup_vs_hf_eager_bs1":
        fp16 = _rows(rows, "smollm2-135m", "fp16")
        return _range([(b, r["hf_eager_ms"] / r["step_ms"]) for b, r in sorted(fp16.items()) if r.get("hf_eager_ms")],
                      lambda v: fmt.times(v, 1))
    if key == "smollm2_speedup_vs_hf_compiled_bs1" and entry.get("reference_ms") is not None:
        return f"HF compiled step measured in this run: {fmt.ms(entry['reference_ms'])}"
    if key == "gpu_top1_agreement_vs_hf":
        parts = []
        if entry.get("hf_own_incremental_decode") is not None:
            parts.append(f"HF's own incremental decode: {fmt.frac_pct(entry['hf_own_incremental_decode'])}")
        if entry.get("random_token_prompts") is not None:
            parts.append(f"random-token prompts: {fmt.frac_pct(entry['random_token_prompts'])}")
        if entry.get("within_bf16_ulp") is not None:
            parts.append(f"counting one-ulp ties: {fmt.frac_pct(entry['within_bf16_ulp'], 2)}")
        return "; ".join(parts) or "—"
    return "—"


def engine_rows(headline: dict, rows: list[dict], run: dict) -> list[dict]:
    out = []
    for key, entry in targets(headline):
        label, kind = label_for(key)
        out.append({"what": label, "value": value_text(entry["value"], kind), "target": target_text(entry["target"], kind),
                    "met": "met" if entry["met"] else "**missed**", "spread": engine_spread(key, entry, rows, run)})
    return out


def kernel_rows(headline: dict, rows: list[dict]) -> list[dict]:
    out = []
    for key, entry in targets(headline):
        mode = "exact" if key.startswith("exact_mode_") else "fast"
        band = key.removeprefix("exact_mode_").removeprefix("worst_time_ratio_")
        name, lo, hi = BANDS.get(band, (band.replace("_", " "), None, None))
        field = "exact_ratio" if mode == "exact" else "ratio"
        column = YARDSTICK_COLUMNS.get(band)
        vals = [r["int4_ms"] / r[column] if column else r[field] for r in rows
                if r["model"] == BAND_MODEL and lo is not None and lo <= r["m"] <= hi
                and r.get(column or field) is not None]
        out.append({"band": name, "mode": "bit-exact (chapters)" if mode == "exact" else "fast (engine)",
                    "order": (mode == "exact", list(BANDS).index(band) if band in BANDS else len(BANDS)),
                    "value": fmt.num(entry["value"], 3), "at": str(entry.get("at", "—")).replace("x", "×"),
                    "target": f"≤\u00a0{fmt.num(entry['target'], 2)}", "met": "met" if entry["met"] else "**missed**",
                    "spread": f"{fmt.num(min(vals), 2)}–{fmt.num(max(vals), 2)} over {len(vals)} shapes × rows"
                    if vals else "—"})
    return sorted(out, key=lambda r: r["order"])


# --------------------------------------------------------------------------- charts
def vega_block(name: str, spec: dict) -> str:
    """A raw-HTML block that renders ``spec`` with the page's vega-embed (SVG, no actions menu)."""
    div = f"altair-viz-{name}"
    return (f'<div id="{div}" class="morph-chart"></div>\n'
            f'<script type="text/javascript">vegaEmbed("#{div}", {json.dumps(spec)}, '
            '{"actions": false, "renderer": "svg"});</script>\n')


def step_chart(rows: list[dict]) -> dict:
    import altair as alt
    import pandas as pd

    from morphbook.publish.plotting import setup_altair

    setup_altair()
    d = pd.DataFrame([{"model": r["model"], "batch": r["batch"], "weights": r["state"].upper(), "line": line, "ms": ms}
                      for r in rows for line, ms in (("measured step", r["step_ms"]), ("HBM roofline", r.get("roofline_ms")))
                      if ms is not None])
    chart = alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("batch:Q", scale=alt.Scale(type="log", base=2), title="sequences in the batch (log scale)"),
        y=alt.Y("ms:Q", title="decode step (ms)"),
        color=alt.Color("weights:N", title="weights"),
        strokeDash=alt.StrokeDash("line:N", title="line", sort=["measured step", "HBM roofline"]),
        tooltip=["model", "batch", "weights", "line", alt.Tooltip("ms:Q", format=".3f")],
    ).properties(width=185, height=200).facet(column=alt.Column("model:N", title="model shape")).resolve_scale(y="independent")
    return chart.properties(title="Decode step time, INT4 against FP16, by batch size").to_dict()


def kernel_chart(rows: list[dict]) -> dict:
    import altair as alt
    import pandas as pd

    from morphbook.publish.plotting import setup_altair

    setup_altair()
    d = pd.DataFrame([{"model": r["model"], "rows": r["m"], "shape": f"{r['n']}x{r['k']}", "ratio": r["ratio"]}
                      for r in rows if r.get("ratio") is not None])
    d = d.groupby(["model", "rows"], as_index=False)["ratio"].max()
    lines = alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("rows:Q", scale=alt.Scale(type="log", base=2), title="rows of the input (tokens, log scale)"),
        y=alt.Y("ratio:Q", title="worst INT4 / bf16 time over the linears"),
        color=alt.Color("model:N", title="model shape"), tooltip=["model", "rows", alt.Tooltip("ratio:Q", format=".3f")])
    even = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return (even + lines).properties(width=480, height=240,
                                     title="INT4 linear time over bf16 (below 1: INT4 is faster)").to_dict()


# --------------------------------------------------------------------------- page
def benchmarks_markdown(fresh_root: str | os.PathLike, committed_root: str | os.PathLike = "results") -> str:
    parts = []
    engine = load("engine", fresh_root, committed_root)
    parts.append("## Serving engine\n")
    if engine is None:
        parts.append("No engine results yet (`python -m morphbook.run --profile gpu --only engine`).\n")
    else:
        rows, run = engine.json("rows.json"), engine.json("run.json")
        parts.append(provenance_text(engine))
        parts.append(markdown_table(
            engine_rows(engine.summary["headline"], rows, run),
            {"what": "figure", "value": "value", "target": "target", "met": "met?", "spread": "spread within this run"},
            "The engine's targets: each value from one benchmark run, its spread over that run's batch sizes or copies",
            "tbl-bench-engine"))
        parts.append(vega_block("bench-steps", step_chart(rows)))
    kernels = load("kernels", fresh_root, committed_root)
    parts.append("## INT4 linear kernels\n")
    if kernels is None:
        parts.append("No kernel results yet (`python -m morphbook.run --profile gpu --only kernels`).\n")
    else:
        rows = kernels.json("rows.json")
        parts.append(provenance_text(kernels))
        parts.append(markdown_table(
            kernel_rows(kernels.summary["headline"], rows),
            {"band": "input rows", "mode": "dispatch", "value": "worst INT4 / bf16 time", "at": "where (shape, rows)",
             "target": "target", "met": "met?", "spread": "range over the band"},
            "INT4 kernel targets per band of input rows: the worst INT4 over bf16 time ratio of the "
            "Llama-2-7B linears (below 1: INT4 is faster)", "tbl-bench-kernels"))
        parts.append(vega_block("bench-kernels", kernel_chart(rows)))
    return "\n".join(parts) + "\n"


def write(path: str | os.PathLike, fresh_root, committed_root="results") -> Path:
    from morphbook.publish.files import atomic_write_text

    return atomic_write_text(Path(path), "<!-- generated by scripts/build_book.py; do not edit -->\n\n"
                             + benchmarks_markdown(fresh_root, committed_root))
