#!/usr/bin/env python3
"""Where the simulator's step-time model and a real replay part ways, step by step.

    python scripts/simulator_steps.py [--setting cpu-micro] [--threads 1] [--windows azure-conv:busiest ...]

Calibrates a chapter-5 setting (its micro-benchmark and step-time fit, as ``burst_slices.calibrate``), then,
per window at the calibrated rate, replays FP16-static on the engine and on the simulator and prints: the
replay's busy steps by kind (path, prefill or decode, sequences, prefill tokens) with the observed and the
modelled median step period (only steps followed at once by the next one: no idle sleep inside), and the
TTFT / TPOT metrics of both. A GPU setting needs the GPU machine. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _main(argv=None) -> int:
    import numpy as np
    import torch

    from morphbook.experiments import burst_slices as bs
    from morphbook.experiments.burst_plan import load_plan, make_window
    from morphlib.engine.steptime import StepTimeFit
    from morphlib.engine.sweep import metrics, serve, simulate, trace_dict
    from morphlib.errors import MorphError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="cpu-micro")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1, as the chapter)")
    ap.add_argument("--windows", nargs="+", default=["azure-conv:busiest", "azure-code:median"])
    args = ap.parse_args(argv)
    plan = load_plan()
    if args.setting not in plan.settings:
        raise MorphError(f"unknown setting {args.setting!r}: choose one of {', '.join(plan.settings)}")
    setting = plan.settings[args.setting]
    torch.set_num_threads(args.threads)
    cal = bs.calibrate(plan, setting, workers=1)
    fit = StepTimeFit.from_dict(cal["fit"])
    rep = cal["fit_report"]
    print(f"fit on the micro-benchmark: median error {rep['fit']['median_abs_pct']:.1f} %, held-out "
          f"{rep['holdout']['median_abs_pct']:.1f} %, copy factor {rep['copy_factor']:.2f}")
    traces = bs._traces(setting)
    for wkey in args.windows:
        if wkey not in cal["rates"]:
            raise MorphError(f"window {wkey!r} has no calibrated rate: choose one of {', '.join(cal['rates'])}")
        name, kind = wkey.split(":")
        w = make_window(traces[name], setting, kind, cal["rates"][wkey]["rate"], plan.windows["grid_s"])
        fields = bs.engine_fields(setting)
        llm = bs.build_llm(setting, fields)
        try:
            real = serve(llm, w.trace, w.measured, warmup=plan.windows["warmup_requests"], seed=0)
        finally:
            bs._close(llm)
        st = real["steps"]
        rows = [{f: st[f][i] for f in st} for i in range(len(st["start"]))]
        kinds: dict[tuple, list] = {}
        for a, b in zip(rows, rows[1:]):
            period, duration = b["start"] - a["start"], a["end"] - a["start"]
            if a["num_seqs"] and b["index"] == a["index"] + 1 and period - duration < 1e-3:
                key = (a["path"], "prefill" if a["prefill_tokens"] else "decode", a["num_seqs"] // 4 * 4,
                       min(a["prefill_tokens"], 256) // 64 * 64)
                kinds.setdefault(key, []).append((period, fit.row_seconds(a)))
        print(f"\n{wkey} at {cal['rates'][wkey]['rate']:g} req/s: {len(rows)} steps")
        print(f"  {'path, kind, seqs (4s), prefill tokens (64s)':44s} {'n':>5} {'observed':>9} {'model':>9} {'model/obs':>9}")
        for key in sorted(kinds):
            obs, mod = np.array(kinds[key]).T
            print(f"  {str(key):44s} {len(obs):5d} {1e3 * np.median(obs):7.2f}ms {1e3 * np.median(mod):7.2f}ms "
                  f"{np.median(mod / obs):9.3f}")
        sim = simulate({"model": setting.model, "engine": bs.sim_fields(setting, fields, cal["engine"]),
                        "step_time": cal["fit"], "trace": trace_dict(w.trace), "measured": w.measured,
                        "warmup": plan.windows["warmup_requests"], "seed": 0})
        for label, pay in (("engine", real), ("simulator", sim)):
            m = metrics(pay, 1.0, 1.0, w.length_s)
            print(f"  {label:9s}: TTFT P50 {1e3 * m['ttft_p50_s']:.1f} ms, P95 {1e3 * m['ttft_p95_s']:.1f} ms, "
                  f"mean TPOT {m['tpot_mean_ms']:.2f} ms, {len(pay['steps']['start'])} steps")
    return 0


def main(argv=None) -> int:
    from morphlib.errors import one_line_errors

    return one_line_errors(_main)(argv)


if __name__ == "__main__":
    sys.exit(main())
