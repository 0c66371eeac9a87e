"""Run chapters' experiments without notebooks and save their results: how the published GPU numbers are made.

    python -m morphbook.run --profile gpu                                   # every chapter and benchmark
    python -m morphbook.run --profile gpu --only sensitivity,strategies     # a subset, in book order
    python -m morphbook.run --profile cpu --results _build/results-cpu --only burst
    python -m morphbook.run --profile cpu --only sensitivity,strategies --set model=gemma3-270m \
        --results results/families/gemma3-270m                              # another model

Each experiment runs with its profile's published configuration (``Config.for_profile(profile)``) and
writes ``<results>/<name>/`` with provenance (``morphbook.publish.store``): the fingerprint of the code
that ran (recorded from before the experiment module is imported) and the identity of the inputs it
declares (read from the same results root; ``run(cfg, inputs)``). A rerun that reproduces the saved
result prints "re-verified at <commit>" instead of writing a new one. A failing experiment is
reported and the others still run (each in a fresh process); the exit status is 1 if any failed. ``--deadline S``
skips experiments that would start after S seconds (a GPU call has a hard time limit; an experiment
writes its summary.json last, so one cut off leaves no half-written results). The notebooks then
render these results; CI re-executes the notebooks on the CPU profile.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

from morphbook.chapters import ALL, chapter
from morphbook.publish.inputs import call_run, load_inputs
from morphbook.publish.store import save_result
from morphlib import fingerprint
from morphlib.errors import MorphError


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs -> {key: value}; a VALUE that parses as JSON (numbers, lists, true) is taken as such."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MorphError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model=gemma3-270m")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run_isolated(name: str, profile: str, results_root: str, overrides: list[str] = ()) -> int:
    """Run one experiment in a fresh Python process (its own CUDA context: an experiment that turns on
    deterministic cuBLAS, e.g. chapter 2, must do so before any CUDA work, and must not impose it on
    the next one). Returns the process's exit status."""
    cmd = [sys.executable, "-m", "morphbook.run", "--profile", profile, "--results", results_root, "--one", name]
    cmd += [arg for item in overrides for arg in ("--set", item)]
    return subprocess.run(cmd).returncode


def run_one(name: str, profile: str, results_root: str, overrides: dict | None = None) -> float:
    """Run one experiment on ``profile`` (config fields replaced by ``overrides``) and save it; returns its
    wall time. The fingerprint recording starts before the experiment module is imported, so its
    module-level code counts; the inputs it declares are read from ``results_root``."""
    inputs = load_inputs(name, results_root)
    with fingerprint.recording() as rec:
        module = importlib.import_module(chapter(name).experiment)
        cfg = module.Config.for_profile(profile, **(overrides or {}))
        result = call_run(name, module.run, cfg, inputs)
    saved = save_result(name, result, results_root, recording=rec, inputs=inputs)
    print(f"  {saved.describe(result.wall_s)}", flush=True)
    return result.wall_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m morphbook.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=["cpu", "gpu"], default="gpu", help="configuration profile (default: gpu)")
    ap.add_argument("--results", default="results", help="results root (default: results, the committed ones)")
    ap.add_argument("--only", default=None, help="comma-separated experiments (default: all, in book order): "
                                                 + ", ".join(c.name for c in ALL))
    ap.add_argument("--deadline", type=float, default=None, help="start no experiment after this many seconds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="replace one config field of every experiment run, e.g. --set model=gemma3-270m "
                         "(repeatable; VALUE parsed as JSON when it can be; default: none). Use it with --results "
                         "pointing elsewhere: the committed results are the profile's own configuration")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one experiment in this process
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except MorphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.one:
        try:
            run_one(args.one, args.profile, args.results, overrides)
        except MorphError as exc:
            print(f"[{args.one}] error: {exc}", flush=True)
            return 2
        return 0
    names = [c.name for c in ALL]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"error: unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(names)}", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    t0 = time.perf_counter()
    failed = []
    for name in names:
        elapsed = time.perf_counter() - t0
        if args.deadline is not None and elapsed > args.deadline:
            print(f"[{name}] skipped: deadline of {args.deadline:.0f} s passed ({elapsed:.0f} s)", flush=True)
            failed.append(name)
            continue
        print(f"[{name}] {args.profile} profile ...", flush=True)
        if run_isolated(name, args.profile, args.results, args.set) != 0:  # a failure is reported by the child
            failed.append(name)
    print(f"done in {time.perf_counter() - t0:.0f} s; {len(names) - len(failed)} ok"
          + (f", failed or skipped: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
