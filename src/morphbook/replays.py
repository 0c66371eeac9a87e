"""Chapter 5's resumable GPU replays: run one named slice, write its records with provenance; say which
slices are done, stale or still to run.

    python -m morphbook.replays list                          # every slice in run order, with its state
    python -m morphbook.replays run llama7b-l4.calibrate      # the micro-benchmark, SLOs and the rate rule
    python -m morphbook.replays run llama7b-l4.azure-conv-busiest.a --deadline 480
    python -m morphbook.replays todo                          # the slices still to run (or re-run), in order

A slice is one device command (``burst_preregistration.toml``'s ``[matrix]``). ``run`` records the
fingerprint of the code around it and writes each record (``burst_files``: one gzip'd JSON per replay, one
per calibration) atomically under ``<results>/burst-replays/``, each with its own provenance (device,
commit, date, fingerprint). Replays read the setting's calibration from there, and chapter 2's layer sets
from ``<results>/strategies``. Chapter 5 (``morphbook.experiments.burst``) merges every record on disk; a
record made by code that has changed since is stale and listed for a re-run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from morphbook.publish.files import write_result_file
from morphbook.publish.provenance import provenance
from morphlib import fingerprint
from morphlib.errors import MorphError, one_line_errors


def _modules():
    from morphbook.experiments import burst_files, burst_plan, burst_slices

    return burst_plan, burst_files, burst_slices


def write_record(path: Path, record: dict, params: dict, wall_s: float, fp: dict) -> Path:
    """One records file: the record and its provenance (chapter "burst"), atomically."""
    from morphbook.experiments.burst_files import encode

    prov = provenance("burst", params, wall_s, fp)
    return write_result_file(path, encode(record, prov))


def states(results_root) -> dict:
    """{slice name: (state, detail)}: "done", "partial (n of m)", "stale (...)", "to run"."""
    plan_mod, files, _ = _modules()
    plan = plan_mod.load_plan()
    loaded = {x.key: x for x in files.read_records(files.replays_root(results_root), plan.digest) if x.state != "unreadable"}
    out = {}
    for s in plan.slices():
        keys = [f"{s.setting}.calibrate"] if s.window is None else \
            [plan_mod.replay_key(s.setting, *s.window, p, r) for p, r in s.replays]
        have = [loaded[k] for k in keys if k in loaded]
        stale = [x for x in have if x.state == "stale"]
        if stale:
            out[s.name] = ("stale", stale[0].why)
        elif len(have) == len(keys):
            out[s.name] = ("done", "")
        elif have:
            out[s.name] = ("partial", f"{len(have)} of {len(keys)}")
        else:
            out[s.name] = ("to run", "")
    return out


def run_slice(name: str, results_root="results", deadline_s: float | None = None, workers: int | None = None,
              again: bool = False) -> list[Path]:
    """Run one slice and write its records; returns the paths written. A replay slice runs only the replays not
    yet on disk and current (``again``: all of them)."""
    plan_mod, files, slices = _modules()
    plan = plan_mod.load_plan()
    s = plan.slice(name)
    setting = plan.setting(s.setting)
    root = files.replays_root(results_root)
    t0 = time.perf_counter()
    say = (lambda msg: print(f"[{name}] {msg}", flush=True))
    params = {"profile": "gpu" if setting.runs_on == "gpu" else "cpu", "slice": name, "setting": s.setting,
              "prereg": plan.digest}
    if s.window is None:
        with fingerprint.recording() as rec:
            record = slices.calibrate(plan, setting, workers=workers, progress=say)
        return [write_record(files.calibration_path(root, s.setting), record, params, time.perf_counter() - t0,
                             _checked(rec))]
    cal_path = files.calibration_path(root, s.setting)
    if not cal_path.is_file():
        raise MorphError(f"{name} needs {s.setting}.calibrate first ({cal_path} is missing)")
    calibration = json.loads(gzip.decompress(cal_path.read_bytes()))["record"]
    sets = _chapter2_sets(results_root)
    done = {x.key for x in files.read_records(root, plan.digest) if x.state == "ok"}
    todo = [(p, r) for p, r in s.replays if plan_mod.replay_key(s.setting, *s.window, p, r) not in done or again]
    if not todo:
        say("every replay of this slice is on disk and current (--again runs them anyway)")
        return []
    with fingerprint.recording() as rec:
        made = slices.replay_window_policies(plan, setting, s.window, todo, calibration, sets,
                                             deadline_s=deadline_s, progress=say)
    fp = _checked(rec)
    return [write_record(files.replay_path(root, key), record, {**params, "replay": key}, record["seconds"], fp)
            for key, record in made.items()]


def _checked(rec) -> dict:
    from morphbook.publish.store import checked_fingerprint

    return checked_fingerprint(rec)


def _chapter2_sets(results_root) -> dict:
    path = Path(results_root) / "strategies" / "sets.json"
    if not path.is_file():
        raise MorphError(f"chapter 5's layer orders need chapter 2's results first ({path} is missing)")
    return json.loads(path.read_text(encoding="utf-8"))


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m morphbook.replays", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["list", "todo", "run"])
    ap.add_argument("slice", nargs="?", help="the slice to run (run)")
    ap.add_argument("--results", default="results", help="results root (default: results)")
    ap.add_argument("--deadline", type=float, default=None, help="start no replay that would end after S seconds")
    ap.add_argument("--workers", type=int, default=None, help="simulator worker processes (default: every CPU)")
    ap.add_argument("--again", action="store_true", help="run a slice's replays even when they are on disk and current")
    args = ap.parse_args(argv)
    if args.command == "run":
        if not args.slice:
            ap.error("run needs a slice name (python -m morphbook.replays list)")
        for path in run_slice(args.slice, args.results, args.deadline, args.workers, args.again):
            print(f"wrote {path}", flush=True)
        return 0
    rows = states(args.results)
    if args.command == "todo":
        print("\n".join(n for n, (state, _) in rows.items() if state != "done"))
        return 0
    width = max(map(len, rows))
    for n, (state, why) in rows.items():
        print(f"{n:<{width}}  {state}" + (f" ({why})" if why else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
