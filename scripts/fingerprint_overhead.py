"""What recording the fingerprint costs: one chapter run in fresh processes, alternately without and with
``morphlib.fingerprint.recording()``, each timed (wall clock and process CPU time) from the experiment
module's import to the end of ``run(cfg)``: what ``python -m morphbook.run`` records (torch and the
publishing side are imported before).

    python scripts/fingerprint_overhead.py                         # chapter 1, CPU profile, this Python's hook
    python scripts/fingerprint_overhead.py --hook setprofile --repeats 3 --chapter burst
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = '''
import json, sys, time, contextlib
import morphbook.publish.inputs  # noqa: F401 - imported before the recording, as in morphbook.run (torch too)
from morphlib import fingerprint
chapter, profile, hook = sys.argv[1:4]
t0, c0 = time.perf_counter(), time.process_time()
with (fingerprint.recording(hook=hook) if hook != "off" else contextlib.nullcontext()) as rec:
    import importlib
    from morphbook.chapters import chapter as lookup
    module = importlib.import_module(lookup(chapter).experiment)
    result = module.run(module.Config.for_profile(profile))
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
t1 = time.perf_counter()
units = len(rec.units_run()) if rec else 0
mismatches = rec.loaded_mismatches() if rec else []
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "run_s": result.wall_s, "units": units, "check_s": time.perf_counter() - t1,
                  "mismatches": mismatches}))
'''


def main(argv: list[str] | None = None) -> int:
    from morphlib import fingerprint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chapter", default="sensitivity", help="a chapter without inputs (default: sensitivity)")
    ap.add_argument("--profile", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--hook", default=fingerprint.default_hook(), choices=fingerprint.HOOKS)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (default: 2)")
    args = ap.parse_args(argv)
    times: dict[str, list[float]] = {"off": [], args.hook: []}
    cpu: dict[str, list[float]] = {"off": [], args.hook: []}
    for rep in range(args.repeats):
        for mode in ("off", args.hook) if rep % 2 == 0 else (args.hook, "off"):
            out = subprocess.run([sys.executable, "-c", CHILD, args.chapter, args.profile, mode],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(out.stdout.strip().splitlines()[-1])
            times[mode].append(row["wall_s"])
            cpu[mode].append(row["cpu_s"])
            print(f"{mode:>10}: {row['wall_s']:7.1f} s wall, {row['cpu_s']:7.1f} s CPU (run {row['run_s']:.1f} s)"
                  + (f", {row['units']} units, check {row['check_s']:.2f} s, mismatches {row['mismatches']}"
                     if mode != "off" else ""), flush=True)
    for what, got in (("wall", times), ("CPU", cpu)):
        off, on = statistics.median(got["off"]), statistics.median(got[args.hook])
        print(f"{args.chapter} ({args.profile} profile, Python {sys.version.split()[0]}), {what} time: median "
              f"{off:.1f} s without, {on:.1f} s with the {args.hook} recording ({100 * (on / off - 1):+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
